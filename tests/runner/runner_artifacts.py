"""Exported artifacts for the C++ runner tests and bench/runner_bench.py, written exactly to the contract
in docs/export-metadata.md: forward(tokens (1, S) int64, input_pos (S,) int64) -> logits (1, S, V) fp32,
metadata JSON in the .pt2 package metadata (key "torchchat"), in the .pte's constant method
`torchchat_metadata` (uint8 tensor) and beside a .so as `<file>.so.json`.

Usable as a script:  python3 tests/runner/runner_artifacts.py --checkpoint stories260K.bin --out DIR
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from torchchat.model.config import ModelConfig
from torchchat.model.transformer import Transformer

KINDS = ("pt2", "so", "pte")


def load_llama2c_model(checkpoint: Path) -> Transformer:
    """The llama2.c checkpoint as an eval-mode fp32 Transformer (no caches yet)."""
    from torchchat.build import load_weights
    from torchchat.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    with torch.device("meta"):
        model = Transformer(loaded.config)
    load_weights(model, loaded.state_dict, str(checkpoint))
    # The loader's tensors are views into one buffer over the whole file, and AOT Inductor stores each
    # constant's entire storage: without own storages a 1 MB model exports as a 50 MB package.
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    return model.eval().requires_grad_(False)


def random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """A Transformer of `config`'s shape with small random weights (for speed measurements)."""
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def metadata(model_name: str, config: ModelConfig, max_seq_len: int, *, dynamic: bool,
             tokenizer_kind: str = "sentencepiece", bos_id: int = 1, eos_id: int = 2,
             stop_ids: tuple[int, ...] = (2,), chat_template: str | None = None) -> dict:
    return {
        "format_version": 1,
        "model_name": model_name,
        "config": config.with_max_seq_len(max_seq_len).to_dict(),
        "tokenizer": {"kind": tokenizer_kind, "bos_id": bos_id, "eos_id": eos_id, "stop_ids": list(stop_ids)},
        "max_seq_len": max_seq_len,
        "dtype": "float32",
        "quantize": None,
        "dynamic_shapes": dynamic,
        "chat_template": chat_template,
    }


def _exported_program(model: Transformer, max_seq_len: int, dynamic: bool):
    """(the exported program, its example inputs)."""
    model.setup_caches(1, max_seq_len)
    if dynamic:
        tokens, input_pos = torch.zeros(1, 2, dtype=torch.int64), torch.arange(2)
        seq = torch.export.Dim("seq", min=1, max=max_seq_len)
        shapes = ({1: seq}, {0: seq})
    else:
        tokens, input_pos = torch.zeros(1, 1, dtype=torch.int64), torch.arange(1)
        shapes = None
    with torch.no_grad():
        ep = torch.export.export(model, (tokens, input_pos), dynamic_shapes=shapes, strict=False)
    return ep, (tokens, input_pos)


def export_pt2(model: Transformer, path: Path, meta: dict) -> Path:
    ep, _ = _exported_program(model, meta["max_seq_len"], meta["dynamic_shapes"])
    configs = {"aot_inductor.metadata": {"torchchat": json.dumps(meta)}}
    return Path(torch._inductor.aoti_compile_and_package(ep, package_path=str(path), inductor_configs=configs))


def export_so(model: Transformer, path: Path, meta: dict) -> Path:
    """The bare shared library, which holds no metadata: it goes beside it as <path>.json."""
    ep, example = _exported_program(model, meta["max_seq_len"], meta["dynamic_shapes"])
    # aot_compile leaves its generated sources beside the library: build in a scratch folder.
    with tempfile.TemporaryDirectory() as scratch, torch.no_grad():
        so = torch._inductor.aot_compile(ep.module(), example,
                                         options={"aot_inductor.output_path": str(Path(scratch) / path.name)})
        shutil.move(so, path)
    Path(str(path) + ".json").write_text(json.dumps(meta))
    return path


def export_pte(model: Transformer, path: Path, meta: dict) -> Path:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    ep, _ = _exported_program(model, meta["max_seq_len"], meta["dynamic_shapes"])
    constants = {
        "torchchat_metadata": torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8),
        "get_max_seq_len": meta["max_seq_len"],
        "get_vocab_size": meta["config"]["vocab_size"],
    }
    edge = to_edge_transform_and_lower(
        ep, partitioner=[XnnpackPartitioner()], compile_config=EdgeCompileConfig(_check_ir_validity=False),
        constant_methods=constants,
    )
    program = edge.to_executorch(ExecutorchBackendConfig(
        extract_delegate_segments=True, do_quant_fusion_and_const_prop=True,
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
        sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
    ))
    path.write_bytes(program.buffer)
    return path


EXPORTERS = {"pt2": export_pt2, "so": export_so, "pte": export_pte}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a llama2.c .bin checkpoint")
    source.add_argument("--params-table", help="random weights of a shipped params table's shape, e.g. stories15M")
    parser.add_argument("--out", type=Path, required=True, help="folder for model.pt2, model.so(.json), model.pte")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of pt2,so,pte")
    parser.add_argument("--max-seq-len", type=int, default=None)
    parser.add_argument("--static", action="store_true", help="export S == 1 only (no parallel prefill)")
    args = parser.parse_args()

    if args.checkpoint:
        model, name = load_llama2c_model(args.checkpoint), args.checkpoint.stem
    else:
        from torchchat.model.registry import params_table

        model, name = random_model(params_table(args.params_table)), args.params_table
    max_seq_len = min(args.max_seq_len or model.config.max_seq_len, model.config.max_seq_len)
    meta = metadata(name, model.config, max_seq_len, dynamic=not args.static)
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in args.kinds.split(","):
        print(EXPORTERS[kind](model, args.out / f"model.{kind}", meta))


if __name__ == "__main__":
    main()
