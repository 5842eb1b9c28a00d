"""ExecuTorch export: lower the exported program to the XNNPACK delegate and write a .pte whose
constant methods carry the metadata (`torchchat_metadata`: the JSON text as a 1-D uint8 tensor) and,
for runners that read only these, `get_max_seq_len` and `get_vocab_size`."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch.export import ExportedProgram

from torchchat.errors import ExportError, MissingDependencyError
from torchchat.export.files import written_in_place
from torchchat.export.metadata import ArtifactMetadata

METADATA_METHOD = "torchchat_metadata"
INSTALL_HINT = "install the export extra: pip install -e '.[export]' (or ./install/install_requirements.sh)"


def import_executorch_lowering():
    """The compiler side of ExecuTorch (seconds to import: it brings the exir compiler)."""
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
        from executorch.exir.passes import MemoryPlanningPass
        from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

        # Registers the quantized_decomposed ops (8/4-bit embeddings) with the lowering.
        import executorch.kernels.quantized  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(f"ExecuTorch export needs executorch==1.5.1 ({e}); {INSTALL_HINT}") from e
    return (XnnpackPartitioner, EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower,
            MemoryPlanningPass, ConstraintBasedSymShapeEvalPass)


def constant_methods(meta: ArtifactMetadata) -> dict[str, object]:
    text = meta.to_json().encode("utf-8")
    return {
        METADATA_METHOD: torch.tensor(list(text), dtype=torch.uint8),
        "get_max_seq_len": meta.max_seq_len,
        "get_vocab_size": meta.vocab_size,
    }


def write_pte(ep: ExportedProgram, meta: ArtifactMetadata, path: Path, timer=None) -> Path:
    """Lower `ep` to ExecuTorch with the XNNPACK delegate and write it to `path`.
    `timer` (a StepTimer) times the lowering and serialisation separately."""
    from contextlib import nullcontext

    path = Path(path)
    (XnnpackPartitioner, EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower,
     MemoryPlanningPass, ConstraintBasedSymShapeEvalPass) = import_executorch_lowering()
    step = timer.step if timer is not None else (lambda name: nullcontext())
    try:
        with step("Lowering to ExecuTorch (XNNPACK)"):
            edge = to_edge_transform_and_lower(
                ep,
                partitioner=[XnnpackPartitioner()],
                # The KV cache's in-place index_copy_ is not core ATen IR; XNNPACK and the portable
                # kernels run it all the same.
                compile_config=EdgeCompileConfig(_check_ir_validity=False),
                constant_methods=constant_methods(meta),
            )
        with step("Planning memory and serialising the .pte"), warnings.catch_warnings():
            # The KV cache's initial contents are not stored (only its shape): runtimes hand the program
            # zeroed memory, and every position is written before attention reads it unmasked.
            warnings.filterwarnings("ignore", message="Mutation on a buffer in the model is detected")
            program = edge.to_executorch(
                ExecutorchBackendConfig(
                    extract_delegate_segments=True,
                    do_quant_fusion_and_const_prop=True,
                    # Inputs are the caller's tensors: do not copy them into planned memory.
                    memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
                    # Plan activations for the largest sequence the dynamic dimension allows.
                    sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
                )
            )
            data = program.buffer
    except Exception as e:  # lowering raises many kinds; all mean the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"ExecuTorch lowering failed: {first} (--verbose for details)") from e
    with written_in_place(path) as tmp:
        tmp.write_bytes(data)
    return path
