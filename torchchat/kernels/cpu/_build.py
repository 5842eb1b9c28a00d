"""Build and load the C++ kernels (csrc/) once per machine, cached by a hash of everything that
changes the binary.

The library is compiled with torch.utils.cpp_extension into a fresh temporary folder and moved into
`${TORCHCHAT_CACHE:-~/.cache/torchchat}/kernels/<key>/` with an atomic rename, so two processes building
at the same time each finish a whole library and neither ever loads a half-written one. Later
processes find the file and only dlopen it (milliseconds)."""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("ops.cpp", "prefill_ops.cpp", "repack.cpp", "kern_scalar.cpp", "kern_avx2.cpp", "kern_avx512.cpp", "kern_avx512vnni.cpp")
HEADERS = ("common.h", "kern_x86.inc")
LIB_NAME = "torchchat_cpu_kernels"
# Measured on a 2-core VM (g++ 12): the torch headers of ops.cpp dominate.
BUILD_SECONDS = 60


class BuildError(RuntimeError):
    """The kernels could not be compiled or loaded; str() says why in a few lines."""


def _flags() -> tuple[list[str], list[str]]:
    cflags = ["-O3", "-fno-math-errno"]
    ldflags: list[str] = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an inline OpenMP region: without -fopenmp it silently runs on one thread.
        # The process then shares torch's own libgomp.so.1 (same soname), so torch.set_num_threads holds.
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


def cache_root() -> Path:
    return Path(os.environ.get("TORCHCHAT_CACHE") or Path.home() / ".cache" / "torchchat") / "kernels"


def build_key() -> str:
    """Hash of the sources, flags, torch and Python versions and the machine architecture."""
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    cflags, ldflags = _flags()
    for part in (cflags, ldflags, [torch.__version__, sys.version, platform.machine(), os.environ.get("CXX", "")]):
        h.update(repr(part).encode())
    return h.hexdigest()[:16]


def library_path() -> Path:
    return cache_root() / build_key() / f"{LIB_NAME}.so"


def _compiler_missing() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler '{cxx}' on PATH (install g++ or clang, or set CXX)"
    try:
        from torch.utils.cpp_extension import is_ninja_available
    except ImportError as e:  # a torch build without cpp_extension
        return f"torch.utils.cpp_extension is unavailable: {e}"
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def build(quiet: bool = False) -> tuple[Path, bool]:
    """Compile into the cache unless it is there already. Returns (library path, whether it was built
    now and is therefore already loaded into this process). Raises BuildError."""
    final = library_path()
    if final.exists():
        return final, False
    missing = _compiler_missing()
    if missing:
        raise BuildError(missing)
    from torch.utils import cpp_extension

    final.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"building torchchat CPU kernels (once, ~{BUILD_SECONDS} s) into {final.parent}", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.parent.name}.tmp-", dir=final.parent.parent))
    start = time.monotonic()
    cflags, ldflags = _flags()
    try:
        cpp_extension.load(
            name=LIB_NAME,
            sources=[str(CSRC / s) for s in SOURCES],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            extra_include_paths=[str(CSRC)],
            build_directory=str(tmp),
            is_python_module=False,
            verbose=False,
        )
        os.replace(tmp / f"{LIB_NAME}.so", final)
    except (RuntimeError, OSError, ImportError) as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        raise BuildError("building the CPU kernels failed: " + "\n".join(lines[-15:])) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        print(f"built torchchat CPU kernels in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return final, True
