"""The artifact metadata (docs/export-metadata.md): round trip, and clear errors for what is not ours."""
import json

import pytest
import torch

from torchchat.errors import ExportError, TokenizerError
from torchchat.export.metadata import FORMAT_VERSION, ArtifactMetadata, TokenizerInfo
from torchchat.model.config import ModelConfig, RopeScaling
from torchchat.model.registry import params_table


def _meta(**overrides) -> ArtifactMetadata:
    fields = dict(
        model_name="stories260K",
        config=params_table("stories260K"),
        tokenizer=TokenizerInfo("sentencepiece", 1, 2, (2,)),
        max_seq_len=256,
        dtype="float32",
        backend="aoti",
        device="cpu",
        dynamic_shapes=True,
        weight_bytes=1_000_000,
        quantize={"linear:int8": {"bitwidth": 8, "groupsize": 0}},
        chat_template=None,
    )
    fields.update(overrides)
    return ArtifactMetadata(**fields)


def test_round_trip_keeps_every_field():
    scaled = ModelConfig.from_params(dict(dim=64, n_layers=2, n_heads=8, vocab_size=512, multiple_of=32,
                                          rope_scaling=dict(factor=8.0)))
    meta = _meta(config=scaled, chat_template="llama3", dtype="bfloat16")
    back = ArtifactMetadata.from_json(meta.to_json(), "x.pt2")
    assert back == meta
    assert back.config.rope_scaling == RopeScaling(factor=8.0)
    assert back.torch_dtype == torch.bfloat16


def test_json_has_the_fields_the_runners_read():
    data = json.loads(_meta().to_json())
    assert data["format_version"] == FORMAT_VERSION
    assert data["tokenizer"] == {"kind": "sentencepiece", "bos_id": 1, "eos_id": 2, "stop_ids": [2]}
    assert data["max_seq_len"] == 256 and data["dynamic_shapes"] is True
    assert data["config"]["vocab_size"] == 512 and data["chat_template"] is None


def test_unknown_keys_are_kept_aside():
    data = json.loads(_meta().to_json())
    data["artifact_bytes"] = 123
    assert ArtifactMetadata.from_json(json.dumps(data), "x.so.json").extra == {"artifact_bytes": 123}


@pytest.mark.parametrize("text, pattern", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"format_version": 99}', "format_version 99"),
    ('{"format_version": 1, "model_name": "x"}', "incomplete or malformed"),
])
def test_bad_metadata_is_a_clear_error(text, pattern):
    with pytest.raises(ExportError, match=pattern):
        ArtifactMetadata.from_json(text, "x.pt2")


def test_bad_dtype_is_refused():
    data = json.loads(_meta().to_json())
    data["dtype"] = "int3"
    with pytest.raises(ExportError, match="dtype 'int3'"):
        ArtifactMetadata.from_json(json.dumps(data), "x.pt2")


class _Tok:
    def __init__(self, kind, vocab_size):
        self.kind, self.vocab_size, self.source = kind, vocab_size, "tok"


def test_tokenizer_of_another_kind_or_size_is_refused():
    meta = _meta()
    meta.check_tokenizer(_Tok("sentencepiece", 512), "x.pt2")
    with pytest.raises(TokenizerError, match="exported with a sentencepiece tokenizer.*tiktoken"):
        meta.check_tokenizer(_Tok("tiktoken", 512), "x.pt2")
    with pytest.raises(TokenizerError, match="32000"):
        meta.check_tokenizer(_Tok("sentencepiece", 32000), "x.pt2")


def test_architecture_check_ignores_context_length_only():
    meta = _meta()
    meta.check_config(params_table("stories260K").with_max_seq_len(4096), "model 'stories260K'", "x.pt2")
    with pytest.raises(ExportError, match="differs from model 'stories15M'.*dim 64 vs 288"):
        meta.check_config(params_table("stories15M"), "model 'stories15M'", "x.pt2")


def test_the_runner_chat_format_round_trips_and_is_written_only_when_set():
    meta = _meta(chat_template="hf", runner_chat_format="chatml")
    assert json.loads(meta.to_json())["runner_chat_format"] == "chatml"
    assert ArtifactMetadata.from_json(meta.to_json(), "x.pt2") == meta
    assert "runner_chat_format" not in json.loads(_meta().to_json())
