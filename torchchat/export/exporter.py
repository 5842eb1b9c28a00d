"""A built model -> exported artifacts (.pt2, .so, .pte), each with its metadata."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from torchchat.errors import UserInputError
from torchchat.export.metadata import METADATA_DTYPE_NAMES, ArtifactMetadata, TokenizerInfo
from torchchat.export.progress import StepTimer


# The KV cache is allocated inside the artifact: a Llama 3.1 context of 131072 positions would take
# tens of GB, so without --max-seq-length the export stops here.
DEFAULT_MAX_SEQ_LEN = 2048


@dataclass(frozen=True)
class ExportTargets:
    aoti_package_path: Path | None = None  # .pt2
    dso_path: Path | None = None  # .so (+ .so.json)
    pte_path: Path | None = None  # .pte
    dynamic_shapes: bool = True  # False: S == 1 only (prompts fed one token at a time)
    max_seq_len: int | None = None  # KV cache positions; None: the model's context, at most DEFAULT_MAX_SEQ_LEN

    def paths(self) -> list[Path]:
        return [p for p in (self.aoti_package_path, self.dso_path, self.pte_path) if p is not None]

    def check(self) -> None:
        """Names and folders, checked before minutes of compiling."""
        if not self.paths():
            raise UserInputError("nothing to export: give --output-aoti-package-path, --output-dso-path or --output-pte-path")
        for flag, path, suffix in (("--output-aoti-package-path", self.aoti_package_path, ".pt2"),
                                   ("--output-dso-path", self.dso_path, ".so"),
                                   ("--output-pte-path", self.pte_path, ".pte")):
            if path is None:
                continue
            if Path(path).suffix != suffix:
                raise UserInputError(f"{flag} {path}: the file name must end in {suffix}")
            if not Path(path).parent.is_dir():
                raise UserInputError(f"{flag} {path}: the folder {Path(path).parent} does not exist")
        if len(set(map(str, self.paths()))) != len(self.paths()):
            raise UserInputError("the output paths must differ")


def quantize_recipe(plan) -> tuple[dict[str, Any] | None, frozenset[str]]:
    """(the normalised recipe for the metadata, its scheme keys such as "linear:int8") of a
    torchchat.quantize.QuantPlan, or (None, empty) for no quantization."""
    if plan is None or plan.is_empty:
        return None, frozenset()
    return plan.to_json(), frozenset(s.key for s in plan.schemes)


def _cpu_kernels_run(device: str) -> bool:
    """On the CPU with torchchat's native kernels, linear:a8w4dq runs them (not torchao's slow reference)."""
    if not device.startswith("cpu"):
        return False
    from torchchat.model.packed import kernels_unavailable

    return kernels_unavailable() is None


def check_supported(backend: str, dtype: torch.dtype, device: str, schemes: frozenset[str], cpu_kernels: bool = True) -> None:
    """The combinations docs/export.md lists as supported; anything else is refused up front rather
    than failing minutes into a compile. `schemes`: the --quantize keys (e.g. {"linear:int8"})."""
    if backend == "aoti":
        if dtype == torch.float16 and device.startswith("cpu"):
            raise UserInputError("AOT Inductor export on the CPU supports --dtype fp32 or bf16 (fp16 CPU kernels are slow)")
        if "linear:a8w4dq" in schemes and not (cpu_kernels and _cpu_kernels_run(device)):
            raise UserInputError(
                "--quantize linear:a8w4dq is the ExecuTorch (--output-pte-path) recipe: under AOT Inductor it runs "
                "a slow reference kernel; use linear:int8 or linear:int4"
            )
    if backend == "executorch":
        if dtype != torch.float32:
            raise UserInputError(
                f"ExecuTorch export supports --dtype fp32 (got {METADATA_DTYPE_NAMES.get(dtype, dtype)}); XNNPACK "
                "delegates fp32 and int8/int4-quantized linears, not half-precision models"
            )
        if not device.startswith("cpu"):
            raise UserInputError(f"ExecuTorch export runs on the CPU: use --device cpu (got {device})")
        unsupported = schemes - {"linear:a8w4dq", "embedding"}
        if unsupported:
            raise UserInputError(
                f"ExecuTorch export supports --quantize linear:a8w4dq and embedding, not {', '.join(sorted(unsupported))}; "
                f"try --quantize mobile: {_shipped_recipe('mobile')}"
            )


def _shipped_recipe(name: str) -> str:
    """A recipe of torchchat/quant_config/ on one line, read from its file so that a message quoting it
    cannot drift from what `--quantize NAME` applies."""
    import json

    from torchchat.quantize import RECIPE_DIR

    return json.dumps(json.loads((RECIPE_DIR / f"{name}.json").read_text()))


def check_export(targets: ExportTargets, dtype: torch.dtype, device: str, schemes: frozenset[str],
                 cpu_kernels: bool = True) -> None:
    """Everything about an export that can be checked before building the model."""
    targets.check()
    if targets.aoti_package_path or targets.dso_path:
        check_supported("aoti", dtype, device, schemes, cpu_kernels)
    if targets.pte_path:
        check_supported("executorch", dtype, device, schemes)


def metadata_for(built, backend: str, max_seq_len: int, dynamic: bool, quantize: dict[str, Any] | None) -> ArtifactMetadata:
    """The metadata of `built` (a BuiltModel with an eager model) exported for `backend`."""
    from torchchat.generation.chat_format import runner_format
    from torchchat.model.packed import has_packed
    from torchchat.model.size import bytes_read_per_token

    model = built.model
    runner_chat = runner_format(built.chat_template, getattr(built.tokenizer, "chat_template", None))
    return ArtifactMetadata(
        model_name=built.name,
        config=built.config,
        tokenizer=TokenizerInfo.of(built.tokenizer),
        max_seq_len=max_seq_len,
        dtype=METADATA_DTYPE_NAMES[model.norm.weight.dtype],
        backend=backend,
        device=model.norm.weight.device.type,
        dynamic_shapes=dynamic,
        weight_bytes=bytes_read_per_token(model),
        quantize=quantize,
        chat_template=built.chat_template,
        runner_chat_format=runner_chat if runner_chat != built.chat_template else None,
        native_ops=("torchchat_cpu",) if has_packed(model) else (),
    )


def export_model(built, targets: ExportTargets, quantize: dict[str, Any] | None = None,
                 schemes: frozenset[str] = frozenset(), timer: StepTimer | None = None,
                 on_delegation: Callable | None = None) -> list[Path]:
    """Export `built` (a BuiltModel from torchchat.build, with its eager model) to every path in
    `targets`. Returns the paths written: the artifacts, then for a model whose SentencePiece vocabulary
    came from a GGUF file the `<artifact>.tokenizer.model` the C++ runners read (runner_tokenizer.py).
    `on_delegation` receives the .pte's DelegationSummary (executorch.py) once it is lowered."""
    from torchchat.export.runner_tokenizer import write_runner_tokenizer

    written = _export_artifacts(built, targets, quantize, schemes, timer, on_delegation)
    return written + write_runner_tokenizer(built.tokenizer, written)


def _export_artifacts(built, targets: ExportTargets, quantize: dict[str, Any] | None,
                      schemes: frozenset[str], timer: StepTimer | None, on_delegation: Callable | None) -> list[Path]:
    from torchchat.export.program import export_forward

    timer = timer or StepTimer()
    if built.model is None:
        raise UserInputError("export needs a model built from a checkpoint, not an exported artifact")
    from torchchat.model.packed import has_packed

    check_export(targets, built.model.norm.weight.dtype, str(built.model.norm.weight.device), schemes,
                 has_packed(built.model))
    max_seq_len = min(targets.max_seq_len or DEFAULT_MAX_SEQ_LEN, built.config.max_seq_len)
    shapes = f"{'dynamic' if targets.dynamic_shapes else 'one-token'} shapes, {max_seq_len} positions"
    written = []
    if targets.pte_path:
        from torchchat.export.executorch import write_pte

        if has_packed(built.model):
            raise UserInputError(
                "ExecuTorch cannot run torchchat's native CPU kernels: build the model with "
                "BuildSpec(cpu_kernels=False) (what `export --output-pte-path` does) so GGUF weights are "
                "dequantized and --quantize recipes go to torchao"
            )

        # XNNPACK delegates nn.Linear as it is; the pte is traced before the layout below changes it.
        with timer.step(f"Tracing with torch.export ({shapes})"):
            ep = export_forward(built.model, max_seq_len, targets.dynamic_shapes)
        metadata = metadata_for(built, "executorch", max_seq_len, targets.dynamic_shapes, quantize)
        written.append(write_pte(ep, metadata, targets.pte_path, timer, on_delegation))
    if not (targets.aoti_package_path or targets.dso_path):
        return written
    from torchchat.model.layout import optimize_for_decode

    # AOT Inductor compiles what `generate --compile` would: the same stacked projections and fp32
    # output layout (torchchat.model.layout); the artifact's interface is unchanged.
    optimize_for_decode(built.model)
    with timer.step(f"Tracing with torch.export ({shapes})"):
        ep = export_forward(built.model, max_seq_len, targets.dynamic_shapes)
    if targets.aoti_package_path:
        from torchchat.export.aoti import write_package

        metadata = metadata_for(built, "aoti", max_seq_len, targets.dynamic_shapes, quantize)
        with timer.step(f"Compiling with AOT Inductor -> {targets.aoti_package_path}"):
            written.append(write_package(ep, metadata, targets.aoti_package_path))
    if targets.dso_path:
        from torchchat.export.aoti import write_shared_library

        metadata = metadata_for(built, "aoti", max_seq_len, targets.dynamic_shapes, quantize)
        with timer.step(f"Compiling with AOT Inductor -> {targets.dso_path}"):
            written.append(write_shared_library(ep, metadata, targets.dso_path))
    return written
