"""The libstdc++ preload for loading AOT Inductor artifacts (torchchat/runtime/cxx_runtime.py): when it is
asked for, that the process starts again at most once, and that a command run here is left alone."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from torchchat.runtime.cxx_runtime import (PRELOAD_ENV, compiler_libstdcxx, loaded_libstdcxx, preload_needed,
                                           relaunch_env)

MAPS = """7f00-7f01 r--p 00000000 08:01 123 /usr/lib/x86_64-linux-gnu/libc.so.6
7f02-7f03 r-xp 00001000 08:01 456 /opt/env/lib/libstdc++.so.6.0.33
7f04-7f05 r--p 00002000 08:01 456 /opt/env/lib/libstdc++.so.6.0.33
7f06-7f07 rw-p 00000000 00:00 0
"""


def test_the_mapped_libstdcxx_is_read_from_the_maps():
    assert loaded_libstdcxx(MAPS) == [Path("/opt/env/lib/libstdc++.so.6.0.33")]
    assert loaded_libstdcxx("7f06-7f07 rw-p 00000000 00:00 0\n") == []


def test_preload_only_where_the_process_has_another_libstdcxx(tmp_path):
    compiler = tmp_path / "libstdc++.so.6.0.30"
    compiler.write_bytes(b"")
    other = tmp_path / "libstdc++.so.6.0.33"
    other.write_bytes(b"")
    link = tmp_path / "libstdc++.so.6"
    link.symlink_to(compiler.name)
    assert preload_needed([other], compiler) == compiler
    assert preload_needed([link], compiler) is None  # the same file under its soname link
    assert preload_needed([], compiler) is None  # nothing of C++ loaded: nothing to replace
    assert preload_needed([other], None) is None  # no compiler here: nothing built here either
    # A CUDA build of torch: preloaded even where the mapped library is the compiler's own (the GPU image).
    assert preload_needed([link], compiler, cuda_build=True) == compiler


def test_the_process_starts_again_at_most_once(tmp_path):
    lib = tmp_path / "libstdc++.so.6"
    env = relaunch_env(lib, {"LD_PRELOAD": "/x/libfoo.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == f"{lib}:/x/libfoo.so" and env[PRELOAD_ENV] == "1" and env["PATH"] == "/bin"
    assert relaunch_env(lib, env) is None
    assert relaunch_env(lib, {"LD_PRELOAD": f"{lib}:/x/libfoo.so"}) is None  # the user preloads it already
    assert relaunch_env(lib, {PRELOAD_ENV: "1"}) is None  # the user's switch


def test_this_machine_needs_no_preload_and_a_cpu_package_loads(tmp_path):
    """Here (a CPU build of torch) torch and the compiler share the system's libstdc++: nothing is preloaded."""
    import torch

    if torch.version.cuda is not None:
        import pytest

        pytest.skip("a CUDA build of torch: the preload applies")
    compiler = compiler_libstdcxx()
    assert compiler is None or compiler.exists()
    assert preload_needed(loaded_libstdcxx(), compiler) is None
    r = subprocess.run([sys.executable, str(ROOT / "torchchat.py"), "generate", "--aoti-package-path",
                        str(tmp_path / "missing.pt2"), "--verbose"], capture_output=True, text=True, timeout=300)
    assert "restarting with LD_PRELOAD" not in r.stderr


def test_a_command_that_needs_the_preload_starts_again_once_with_it(tmp_path):
    """Told that this process has the wrong libstdc++, `generate --aoti-package-path` starts itself again
    with the compiler's preloaded, and the second process runs the command (here: a missing file)."""
    compiler = compiler_libstdcxx()
    if compiler is None:
        import pytest

        pytest.skip("no C++ compiler on this machine")
    code = ("import sys, os; import torchchat.runtime.cxx_runtime as c; "
            f"c.preload_needed = lambda loaded, comp, cuda_build: c.Path({str(compiler)!r}); "
            "print('run', os.environ.get('LD_PRELOAD', ''), file=sys.stderr, flush=True); "
            "from torchchat.cli import main; sys.exit(main())")
    r = subprocess.run([sys.executable, "-c", code, "generate", "--aoti-package-path", str(tmp_path / "missing.pt2"),
                        "--verbose"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    runs = [line for line in r.stderr.splitlines() if line.startswith("run ")]
    assert runs == ["run ", f"run {compiler}"], r.stderr  # two processes: the second with the preload
    assert r.stderr.count("restarting with LD_PRELOAD") == 1
    assert r.returncode != 0 and "missing.pt2" in r.stderr
