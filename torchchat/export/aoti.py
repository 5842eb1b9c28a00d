"""AOT Inductor export: a .pt2 package (metadata inside) or a bare shared library .so (metadata in the
sidecar `X.so.json`). Both are written to a temporary name beside the target and renamed into place
at the end, so a failed or interrupted export leaves nothing half-written."""
from __future__ import annotations

import json
import os
from pathlib import Path

from torch.export import ExportedProgram

from torchchat.errors import ExportError
from torchchat.export.files import written_in_place
from torchchat.export.metadata import ArtifactMetadata

METADATA_KEY = "torchchat"  # the .pt2 package metadata key holding the JSON text


def sidecar_path(so_path: Path) -> Path:
    """Where a .so's metadata lives: the same name with `.json` appended (model.so -> model.so.json)."""
    return so_path.with_name(so_path.name + ".json")


def _compile_error(e: Exception) -> ExportError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ExportError(f"AOT Inductor compilation failed: {first} (--verbose for details)")


def write_package(ep: ExportedProgram, metadata: ArtifactMetadata, path: Path) -> Path:
    """Compile `ep` into the AOT Inductor package `path`, carrying `metadata` under
    the package metadata key "torchchat"."""
    import torch._inductor

    path = Path(path)
    with written_in_place(path) as tmp:
        try:
            torch._inductor.aoti_compile_and_package(
                ep, package_path=str(tmp), inductor_configs={"aot_inductor.metadata": {METADATA_KEY: metadata.to_json()}}
            )
        except Exception as e:  # compilation errors come as many types (C++ compiler, lowering)
            raise _compile_error(e) from e
    return path


def write_shared_library(ep: ExportedProgram, metadata: ArtifactMetadata, path: Path) -> Path:
    """Compile `ep` into a bare AOT Inductor shared library `path` with its weights inside, and write
    the metadata beside it (`sidecar_path(path)`), with the library's size to tie the two together.

    torch 2.13 deprecates this form (`aot_compile` + `aot_load`) in favour of .pt2 packages; it is kept
    for the original torchchat's `--output-dso-path`. The library is loaded with
    `torch._C._aoti.AOTIModelContainerRunnerCpu` (Python) or `AOTIModelContainerRunnerCpu` (C++)."""
    import torch._inductor

    path = Path(path)
    side = sidecar_path(path)
    with written_in_place(path) as tmp, written_in_place(side) as side_tmp:
        options = {
            "aot_inductor.package": False,
            "aot_inductor.output_path": str(tmp),
            "aot_inductor.metadata": {METADATA_KEY: metadata.to_json()},
        }
        try:
            built = torch._inductor.aot_compile(ep.module(), ep.example_inputs[0], options=options)
        except Exception as e:  # compilation errors come as many types (C++ compiler, lowering)
            raise _compile_error(e) from e
        if Path(built) != tmp:
            os.replace(built, tmp)
        data = metadata.to_dict()
        data["artifact_bytes"] = tmp.stat().st_size
        side_tmp.write_text(json.dumps(data, sort_keys=True, indent=1) + "\n")
    return path
