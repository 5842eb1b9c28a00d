"""A non-Llama family (a tiny random Gemma 3 text folder: sliding-window and global layers with their
own RoPE bases, q/k norms, post-norms, GeGLU, scaled embeddings) through the other paths: compiled
decode, an AOT Inductor .pt2 package, an ExecuTorch .pte program and a quantize recipe, each against eager."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent / "checkpoint"))

from hf_family_folders import write_folder  # noqa: E402
from test_hf_families import GEMMA  # noqa: E402

from torchchat.build import BuildSpec, ModelSource, build_model  # noqa: E402
from torchchat.generation.engine import GenerationConfig, make_engine  # noqa: E402
from torchchat.generation.sampling import SamplingParams  # noqa: E402
from torchchat.generation.steps import CompileOptions  # noqa: E402

GEMMA3 = dict(GEMMA, num_hidden_layers=3, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                               "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})
GREEDY = GenerationConfig(max_new_tokens=24, sampling=SamplingParams(temperature=0), stop_ids=frozenset())
MAX_SEQ = 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gemma3")
    write_folder(path, "Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA3, "gemma")
    return path


def _build(folder: Path, quant=None):
    return build_model(BuildSpec(source=ModelSource(checkpoint_path=folder), dtype=torch.float32, quant=quant,
                                 max_seq_len=MAX_SEQ))


def _prompt(built) -> list[int]:
    return built.tokenizer.encode("Once upon a time there was a little robot", bos=True)


def _logits(forward, ids: list[int]) -> torch.Tensor:
    """Prefill of the first 8 ids, then one call per id (past the 8-position sliding window)."""
    tokens = torch.tensor([ids])
    with torch.no_grad():
        out = [forward(tokens[:, :8], torch.arange(8))]
        out += [forward(tokens[:, i : i + 1], torch.tensor([i])) for i in range(8, len(ids))]
    return torch.cat(out, dim=1).float()


@pytest.mark.slow
def test_compiled_decode_gives_eager_tokens(folder):
    built = _build(folder)
    ids = _prompt(built)
    eager = list(make_engine(built, max_seq_len=MAX_SEQ).tokens(ids, GREEDY))
    compiled = list(make_engine(_build(folder), CompileOptions(decode=True), max_seq_len=MAX_SEQ).tokens(ids, GREEDY))
    assert compiled == eager and len(eager) == GREEDY.max_new_tokens


@pytest.mark.slow
def test_pt2_package_logits_follow_eager(folder, tmp_path):
    from torchchat.export.exporter import ExportTargets, export_model

    built = _build(folder)
    ids = _prompt(built) + list(range(20, 40))
    built.runtime.setup(1, MAX_SEQ)
    eager = _logits(built.runtime.forward, ids)
    package = tmp_path / "gemma3.pt2"
    export_model(_build(folder), ExportTargets(aoti_package_path=package, max_seq_len=MAX_SEQ))
    exported = build_model(BuildSpec(source=ModelSource(aoti_package_path=package, tokenizer_path=folder / "tokenizer.json"),
                                     dtype=None))
    exported.runtime.setup(1, MAX_SEQ)
    assert exported.config == built.config
    torch.testing.assert_close(_logits(exported.runtime.forward, ids), eager, atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_quantize_recipe_follows_eager(folder):
    from torchchat.quantize import parse_quantize

    plain = _build(folder)
    quantized = _build(folder, parse_quantize('{"linear:int8": {}, "embedding": {"bitwidth": 8}}'))
    ids = _prompt(plain) + list(range(20, 40))
    plain.runtime.setup(1, MAX_SEQ)
    quantized.runtime.setup(1, MAX_SEQ)
    ref, out = _logits(plain.runtime.forward, ids), _logits(quantized.runtime.forward, ids)
    assert ((out - ref).norm() / ref.norm()).item() < 0.05  # random N(0, 0.1) weights: 2.2% measured
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9
    assert len(list(make_engine(quantized, max_seq_len=MAX_SEQ).tokens(_prompt(plain), GREEDY))) == GREEDY.max_new_tokens


@pytest.mark.slow
def test_pte_program_logits_follow_eager(folder, tmp_path):
    pytest.importorskip("executorch")
    from torchchat.export.exporter import ExportTargets, export_model

    built = _build(folder)
    ids = _prompt(built) + list(range(20, 40))
    built.runtime.setup(1, MAX_SEQ)
    eager = _logits(built.runtime.forward, ids)
    program = tmp_path / "gemma3.pte"
    export_model(_build(folder), ExportTargets(pte_path=program, max_seq_len=MAX_SEQ))
    exported = build_model(BuildSpec(source=ModelSource(pte_path=program, tokenizer_path=folder / "tokenizer.json"),
                                     dtype=None))
    exported.runtime.setup(1, MAX_SEQ)
    torch.testing.assert_close(_logits(exported.runtime.forward, ids), eager, atol=3e-3, rtol=1e-3)  # XNNPACK fp32: 1e-3 seen
