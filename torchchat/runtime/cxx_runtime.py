"""Which C++ runtime library an AOT Inductor artifact's compiled wrapper meets in this process.

The wrapper (`*.wrapper.so` inside a .pt2, or the .so itself) is compiled by the machine's own C++
compiler against that compiler's libstdc++ headers, and parses its device string with `std::regex`
when it is loaded. On a machine whose Python process has another libstdc++ loaded first, that inline
regex code runs against the other library's locale facets, recurses without end and the process dies
with SIGSEGV, printing nothing (seen on the lent GPU machines' image: docs/export.md). Starting the
process with the compiler's libstdc++ preloaded avoids it; `torchchat.cli` does that for the commands
that load such an artifact, once, before anything else runs.
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


def preload_needed(loaded: list[Path], compiler: Path | None) -> Path | None:
    """The library to preload, or None: the compiler's libstdc++ where the process has another one."""
    if compiler is None or not loaded:
        return None
    if any(p.resolve() == compiler for p in loaded if p.exists()):
        return None
    return compiler


def relaunch_env(library: Path, env: dict[str, str]) -> dict[str, str] | None:
    """The environment to start this command again with `library` preloaded, or None where it already is
    (or the user turned the preload off): the process starts again at most once."""
    if env.get(PRELOAD_ENV) == "1" or str(library) in env.get("LD_PRELOAD", "").split(":"):
        return None
    new = dict(env)
    new["LD_PRELOAD"] = ":".join(p for p in (str(library), env.get("LD_PRELOAD", "")) if p)
    new[PRELOAD_ENV] = "1"
    return new
