"""ExecuTorch export: lower the exported program to the XNNPACK delegate and write a .pte whose
constant methods carry the metadata (`torchchat_metadata`: the JSON text as a 1-D uint8 tensor) and,
for runners that read only these, `get_max_seq_len` and `get_vocab_size`."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


@dataclass(frozen=True)
class DelegationSummary:
    """How much of the lowered graph XNNPACK runs (executorch's `get_delegation_info`): operator nodes
    inside delegated subgraphs, and those left to ExecuTorch's portable/optimized kernels."""

    delegated_subgraphs: int
    delegated_nodes: int
    non_delegated_nodes: int
    by_operator: tuple[tuple[str, int, int], ...]  # (operator, delegated, non-delegated), by name

    def line(self) -> str:
        total = self.delegated_nodes + self.non_delegated_nodes
        share = f" ({self.delegated_nodes / total:.0%} of {total})" if total else ""
        return (f"Delegation: {self.delegated_nodes} nodes delegated to XNNPACK{share} in "
                f"{self.delegated_subgraphs} subgraph(s), {self.non_delegated_nodes} not delegated")

    def table(self) -> str:
        """The per-operator table of the delegated graph (printed by `export -v`)."""
        width = max([len("operator"), *(len(op) for op, _, _ in self.by_operator)])
        rows = [f"{'operator':<{width}}  delegated  not delegated"]
        for op, delegated, other in (*self.by_operator, ("Total", self.delegated_nodes, self.non_delegated_nodes)):
            rows.append(f"{op:<{width}}  {delegated:>9}  {other:>13}")
        return "\n".join(rows)


def delegation_summary(graph_module) -> DelegationSummary:
    """The DelegationSummary of a lowered edge program's graph module."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    ops = tuple(sorted((b.op_type, b.delegated, b.non_delegated) for b in info.delegation_by_operator.values()))
    return DelegationSummary(info.num_delegated_subgraphs, info.num_delegated_nodes, info.num_non_delegated_nodes, ops)


def constant_methods(metadata: ArtifactMetadata) -> dict[str, object]:
    text = metadata.to_json().encode("utf-8")
    return {
        METADATA_METHOD: torch.tensor(list(text), dtype=torch.uint8),
        "get_max_seq_len": metadata.max_seq_len,
        "get_vocab_size": metadata.vocab_size,
    }


def write_pte(ep: ExportedProgram, metadata: ArtifactMetadata, path: Path, timer=None,
              on_delegation: Callable[[DelegationSummary], None] | None = None) -> Path:
    """Lower `ep` to ExecuTorch with the XNNPACK delegate and write it to `path`.
    `timer` (a StepTimer) times the lowering and serialisation separately; `on_delegation` is given the
    DelegationSummary of the lowered graph (the CLI prints it)."""
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
                constant_methods=constant_methods(metadata),
            )
        if on_delegation is not None:
            on_delegation(delegation_summary(edge.exported_program().graph_module))
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
