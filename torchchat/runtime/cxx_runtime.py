"""Which C++ runtime library an AOT Inductor artifact's compiled wrapper meets in this process.

The wrapper (`*.wrapper.so` inside a .pt2, or the .so itself) is compiled by the machine's own C++
compiler and parses its device string with `std::regex` when it is loaded. On the lent GPU machines'
image (CUDA build of torch 2.11, Ubuntu 24.04, GCC 13) that regex code recursed without end and the
process died with SIGSEGV, printing nothing, for CPU and CUDA packages alike (docs/export.md). The
process there has the system's libstdc++ mapped, the very file the compiler links against, yet with
that same file preloaded (LD_PRELOAD) the package loads and runs: the wrapper's C++ symbols then
resolve to libstdc++ before any other loaded library that carries its own copies of them. So
`torchchat.cli` starts the commands that load such an artifact again, once, with the compiler's
libstdc++ preloaded: where torch is a CUDA build (where the crash was seen; a CPU-only install
never needed it), or where the process has a different libstdc++ than the compiler's.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

PRELOAD_ENV = "TORCHCHAT_NO_CXX_PRELOAD"  # set to 1 to keep the process as it is


def loaded_libstdcxx(maps: str | None = None) -> list[Path]:
    """The libstdc++ files mapped into this process (from /proc/self/maps; empty where there is none)."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return []
    found = []
    for line in maps.splitlines():
        name = line.split()[-1] if line.split() else ""
        if "/libstdc++.so" in name and Path(name) not in found:
            found.append(Path(name))
    return found


def compiler_libstdcxx() -> Path | None:
    """The libstdc++ the C++ compiler links against (the one inductor's wrappers are built with), or None."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        return None
    try:
        out = subprocess.run([cxx, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(out.stdout.strip())
    return path.resolve() if out.returncode == 0 and path.is_absolute() and path.exists() else None


def preload_needed(loaded: list[Path], compiler: Path | None, cuda_build: bool = False) -> Path | None:
    """The library to preload, or None: the compiler's libstdc++ under a CUDA build of torch, or where
    the process has another libstdc++ than the compiler's."""
    if compiler is None or not loaded:
        return None
    if cuda_build:
        return compiler
    if any(p.resolve() == compiler for p in loaded if p.exists()):
        return None
    return compiler


def relaunch_env(library: Path, env: dict[str, str]) -> dict[str, str] | None:
    """The environment to start this command again with `library` preloaded, or None where it already is
    (or the user turned the preload off): the process starts again at most once."""
    if env.get(PRELOAD_ENV) == "1" or env.get("LD_PRELOAD", "").split(":")[0] == str(library):
        return None
    new = dict(env)
    new["LD_PRELOAD"] = ":".join(p for p in (str(library), env.get("LD_PRELOAD", "")) if p)
    new[PRELOAD_ENV] = "1"
    return new
