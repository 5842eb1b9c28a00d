"""GGUF files of Llama's relatives (llama.cpp architectures qwen2, qwen3, gemma2, gemma3, phi3, smollm3),
converted from tiny random Hugging Face folders by llama.cpp's own convert_hf_to_gguf.py, load into the
one Transformer and give transformers' logits (full forward and cached decode, fp32, atol 1e-4); their
byte-level BPE vocabularies round-trip. Where llama.cpp's source tree is absent (TORCHCHAT_LLAMACPP, default
../llamacpp beside the project; tools/build_llamacpp.sh makes it), or TORCHCHAT_GGUF_WRITER=gguf, the files
are written with the gguf package in the converter's layout instead (gguf_family_writer.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from gguf_family_writer import write_family_gguf  # noqa: E402
from hf_family_folders import CORPUS, write_folder  # noqa: E402
from test_hf_families import CASES  # noqa: E402

from torchchat.build import load_weights  # noqa: E402
from torchchat.checkpoint import load_checkpoint  # noqa: E402
from torchchat.model.transformer import Transformer  # noqa: E402
from tests.conftest import assert_prefill_and_steps_match  # noqa: E402

LLAMACPP = Path(os.environ.get("TORCHCHAT_LLAMACPP", Path(__file__).resolve().parents[3] / "llamacpp"))
CONVERTER = LLAMACPP / "src" / "convert_hf_to_gguf.py"
USE_CONVERTER = CONVERTER.is_file() and os.environ.get("TORCHCHAT_GGUF_WRITER") != "gguf"


def _with(case: str, **changes):
    config_cls, model_cls, kwargs = CASES[case]
    return config_cls, model_cls, dict(kwargs, **changes)


# name -> (GGUF architecture, tokenizer family, tokenizer.ggml.pre, (config class, model class, kwargs)).
# GGUF keeps no query_pre_attn_scalar (llama.cpp scales Gemma by 1/sqrt(head_dim)), the converter writes no
# Gemma 3 layer pattern (llama.cpp assumes 5 sliding layers, then a global one) and llama.cpp leaves RoPE out
# of every 4th SmolLM3 layer, so those cases take the values llama.cpp assumes.
GGUF_CASES = {
    "qwen2": ("qwen2", "qwen", "qwen2", CASES["qwen2.5-tied-qkv-bias"]),
    "qwen3": ("qwen3", "qwen", "qwen2", CASES["qwen3-qk-norm-head-dim"]),
    "gemma2": ("gemma2", "gemma", "gpt-2", _with("gemma2-softcaps-sliding", query_pre_attn_scalar=16)),
    "gemma3": ("gemma3", "gemma", "gpt-2", _with("gemma3-local-global-rope", query_pre_attn_scalar=16, num_hidden_layers=6,
                                                 layer_types=["sliding_attention"] * 5 + ["full_attention"])),
    "phi3": ("phi3", "phi", "gpt-4o", CASES["phi4mini-longrope-long-tied"]),
    "smollm3": ("smollm3", "smollm", "smollm", _with("smollm3-nope-layers", num_hidden_layers=4, no_rope_layers=None)),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, tuple]:
    """Every case's tiny HF folder and its GGUF (f32) from llama.cpp's converter, converted in one
    subprocess (the converter's imports cost more than a conversion): case -> (hf model, folder, gguf)."""
    out, jobs = {}, []
    for case, (arch, family, pre, (config_cls, model_cls, kwargs)) in GGUF_CASES.items():
        folder = tmp_path_factory.mktemp(case)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        out[case] = (write_folder(folder, config_cls, model_cls, kwargs, family), folder, folder / "model.gguf")
        jobs += [str(folder), str(folder / "model.gguf"), pre]
    if not USE_CONVERTER:
        for case, (arch, _, pre, _) in GGUF_CASES.items():
            write_family_gguf(out[case][1], arch, pre, out[case][2])
        return out
    helper = Path(__file__).with_name("llamacpp_convert.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the converter's own gguf-py, not ours
    done = subprocess.run([sys.executable, str(helper), str(LLAMACPP / "src"), *jobs],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_converted_gguf_matches_transformers(case, converted):
    hf, folder, path = converted[case]
    loaded = load_checkpoint(path)
    assert loaded.format == "gguf"
    with torch.device("meta"):
        ours = Transformer(loaded.config)
    load_weights(ours, loaded.state_dict, str(path))
    ours.eval()
    tokens = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
    assert_prefill_and_steps_match(ours, tokens, expected)

    tok = loaded.tokenizer
    assert tok is not None and tok.kind == "gguf"
    for text in CORPUS:
        assert tok.decode(tok.encode(text)) == text
    if GGUF_CASES[case][2] == "gpt-2":  # the same pre-tokenizer as the folder's tokenizer.json
        hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
        for text in CORPUS:
            assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
