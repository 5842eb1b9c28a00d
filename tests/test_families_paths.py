"""Every family (tiny random Hugging Face folders of Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3, SmolLM3)
through the other paths, each against eager: compiled decode and a quantize recipe for all of them;
exports for the families whose switches reach the exported graph differently from Llama's, one backend
each to keep the suite's time (an export costs 10-30 s here): Gemma 3 (sliding and global layers with
their own RoPE tables, q/k norms) to an AOT Inductor .pt2 package; Gemma 2 (soft-capped attention, its
own attention function, which once failed to trace with a dynamic length; sliding window, GeGLU, sandwich
norms) to an ExecuTorch .pte program; Phi-3 (fused qkv / gate_up split at load and restacked for AOTI,
partial LongRoPE) to .pt2. The others' switches are a linear's bias (Qwen2, restacked by the compiled path too),
a per-head norm with another head_dim (Qwen3) and a layer without RoPE (SmolLM3); every family was
exported to both forms by hand (docs/models.md)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent / "checkpoint"))

from hf_family_folders import write_folder  # noqa: E402
from test_hf_families import CASES, FAMILIES, GEMMA  # noqa: E402

from torchchat.build import BuildSpec, ModelSource, build_model  # noqa: E402
from torchchat.generation.engine import GenerationConfig, make_engine  # noqa: E402
from torchchat.generation.sampling import SamplingParams  # noqa: E402
from torchchat.generation.steps import CompileOptions  # noqa: E402

# Gemma 3 with two sliding layers before the global one, as the real models interleave them.
GEMMA3 = dict(GEMMA, num_hidden_layers=3, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                               "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})
EXPORTED = {"gemma3": ("pt2",), "gemma2": ("pte",), "phi3": ("pt2",)}
GREEDY = GenerationConfig(max_new_tokens=24, sampling=SamplingParams(temperature=0), stop_ids=frozenset())
MAX_SEQ = 64


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> its tiny folder, written on first use."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            case, tokenizer = FAMILIES[family]
            config_cls, model_cls, kwargs = CASES[case]
            made[family] = tmp_path_factory.mktemp(family)
            write_folder(made[family], config_cls, model_cls, GEMMA3 if family == "gemma3" else kwargs, tokenizer)
        return made[family]

    return get


def _build(folder: Path, quant=None):
    return build_model(BuildSpec(source=ModelSource(checkpoint_path=folder), dtype=torch.float32, quant=quant,
                                 max_seq_len=MAX_SEQ))


def _prompt(built) -> list[int]:
    tok = built.tokenizer
    return tok.encode("Once upon a time there was a little robot", bos=tok.bos_id is not None)


def _logits(forward, ids: list[int]) -> torch.Tensor:
    """Prefill of the first 8 ids, then one call per id (past the 8-position sliding window)."""
    tokens = torch.tensor([ids])
    with torch.no_grad():
        out = [forward(tokens[:, :8], torch.arange(8))]
        out += [forward(tokens[:, i : i + 1], torch.tensor([i])) for i in range(8, len(ids))]
    return torch.cat(out, dim=1).float()


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_compiled_decode_gives_eager_tokens(family, folders):
    built = _build(folders(family))
    ids = _prompt(built)
    eager = list(make_engine(built, max_seq_len=MAX_SEQ).tokens(ids, GREEDY))
    compiled = make_engine(_build(folders(family)), CompileOptions(decode=True), max_seq_len=MAX_SEQ)
    assert list(compiled.tokens(ids, GREEDY)) == eager and len(eager) == GREEDY.max_new_tokens


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_quantize_recipe_follows_eager(family, folders):
    from torchchat.quantize import parse_quantize

    plain = _build(folders(family))
    quantized = _build(folders(family), parse_quantize('{"linear:int8": {}, "embedding": {"bitwidth": 8}}'))
    ids = _prompt(plain) + list(range(20, 40))
    plain.runtime.setup(1, MAX_SEQ)
    quantized.runtime.setup(1, MAX_SEQ)
    ref, out = _logits(plain.runtime.forward, ids), _logits(quantized.runtime.forward, ids)
    assert ((out - ref).norm() / ref.norm()).item() < 0.05  # random N(0, 0.1) weights: at most 2.2% measured
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9
    assert len(list(make_engine(quantized, max_seq_len=MAX_SEQ).tokens(_prompt(plain), GREEDY))) == GREEDY.max_new_tokens


@pytest.mark.slow
@pytest.mark.parametrize("family", list(EXPORTED))
def test_exported_logits_follow_eager(family, folders, tmp_path):
    """The artifact loads back with the eager model's config and gives its logits, prefill (dynamic
    shapes) and cached decode, sliding window included."""
    from torchchat.export.exporter import ExportTargets, export_model

    forms = EXPORTED[family]
    if "pte" in forms:
        pytest.importorskip("executorch")
    folder = folders(family)
    built = _build(folder)
    ids = _prompt(built) + list(range(20, 40))
    built.runtime.setup(1, MAX_SEQ)
    eager = _logits(built.runtime.forward, ids)
    paths = {form: tmp_path / f"model.{form}" for form in forms}
    export_model(_build(folder), ExportTargets(aoti_package_path=paths.get("pt2"), pte_path=paths.get("pte"),
                                               max_seq_len=MAX_SEQ))
    for form, path in paths.items():
        kind, atol = ("aoti_package_path", 1e-3) if form == "pt2" else ("pte_path", 3e-3)  # XNNPACK fp32: 7.4e-4 seen
        exported = build_model(BuildSpec(source=ModelSource(**{kind: path}, tokenizer_path=folder / "tokenizer.json"),
                                         dtype=None))
        exported.runtime.setup(1, MAX_SEQ)
        assert exported.config == built.config
        # The C++ runners' chat format, recognised from the folder's chat template (runner/chat_format.cpp).
        assert exported.runtime.metadata.runner_chat_format == {"gemma2": "gemma", "gemma3": "gemma", "phi3": "phi3"}[family]
        torch.testing.assert_close(_logits(exported.runtime.forward, ids), eager, atol=atol, rtol=1e-3)
