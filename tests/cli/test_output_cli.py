"""What the commands print besides the model's text: our notes once each on stderr, the libraries' noise
only with -v, a quiet stop when the reader of stdout goes away, and a bad flag or path refused with the
command's own usage or one line before anything loads."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from torchchat.cli import main

from tests.cli.helpers import ROOT, run_cli

INT8 = '{"linear:int8": {"bitwidth": 8, "groupsize": 0}}'
SLOW_INT8 = "linear:int8 on an fp32 CPU model runs slower than no quantization"
# That note belongs to torchao's int8 path, which the runs below take (--no-cpu-kernels) because torchao
# is also what prints the library noise being checked.
TORCHAO_INT8 = ("--quantize", INT8, "--no-cpu-kernels")
# One line of each kind of library noise a --quantize run used to print.
NOISE = ("Failed to load", "KernelPreference", "_C_mxfp8")


def _stories(folder) -> list[str]:
    return ["--checkpoint-path", str(folder / "stories260K.bin"), "--tokenizer-path", str(folder / "tok512.model"),
            "--device", "cpu", "--dtype", "fp32"]


def test_generate_says_each_note_once_and_no_library_noise(stories260k_dir):
    # The prompt is 11 tokens: a 14-position context leaves room for 3 of the 10 tokens asked for.
    r = run_cli("generate", *_stories(stories260k_dir), *TORCHAO_INT8, "--max-seq-length", "14",
                "--max-new-tokens", "10", "--num-samples", "2", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(SLOW_INT8) == 1
    assert r.stderr.count("Stopped at the end of the context: 3 of the 10 new tokens asked for (11 prompt + "
                          "3 generated = 14 positions); a larger --max-seq-length makes room for more") == 1
    assert not [n for n in NOISE if n in r.stderr + r.stdout], r.stderr


def test_verbose_keeps_the_library_lines(stories260k_dir):
    r = run_cli("generate", *_stories(stories260k_dir), *TORCHAO_INT8, "--max-new-tokens", "1", "-v")
    assert r.returncode == 0, r.stderr
    assert all(n in r.stderr for n in NOISE), r.stderr
    assert r.stderr.count(SLOW_INT8) == 1


def test_chat_says_the_build_notes_too(stories260k_dir):
    r = run_cli("chat", *_stories(stories260k_dir), *TORCHAO_INT8, "--max-seq-length", "9999",
                "--system-prompt", "", input="/bye\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(SLOW_INT8) == 1
    assert r.stderr.count("--max-seq-length 9999 is more than the model's context (512): using 512") == 1
    assert not [n for n in NOISE if n in r.stderr + r.stdout], r.stderr
    assert "context: 512 tokens" in r.stdout


def test_every_command_builds_through_the_notice_channel():
    """A command calling build_model itself would drop the build's notes (as export, eval, chat and server
    once did): they all go through torchchat.cli.args.build."""
    for path in (ROOT / "torchchat" / "cli").glob("*.py"):
        if path.name != "args.py":
            assert "build_model(" not in path.read_text(), path


@pytest.mark.parametrize("command", [["list"], ["generate", "--max-new-tokens", "3"]], ids=["list", "generate"])
def test_closed_stdout_ends_quietly(command, stories260k_dir):
    """`... | head -1`: the reader is gone before we write; no BrokenPipeError traceback, the status `cat`
    gets from SIGPIPE."""
    args = command + (_stories(stories260k_dir) if command[0] == "generate" else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TORCHCHAT_VERBOSE", None)
    p = subprocess.Popen([sys.executable, str(ROOT / "torchchat.py"), *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_unknown_flag_prints_the_commands_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: torchchat generate ")
    assert err.splitlines()[-1] == "torchchat generate: error: unrecognized arguments: --bogus"
    assert sum("error" in line for line in err.splitlines()) == 1


def test_metrics_json_in_a_missing_folder_is_refused_before_loading(tmp_path, capsys):
    # No model source is given: the path is checked before anything else is looked at.
    assert main(["generate", "--metrics-json", str(tmp_path / "no" / "such" / "m.json")]) == 2
    err = capsys.readouterr().err
    assert err == f"Error: --metrics-json {tmp_path}/no/such/m.json: the folder {tmp_path}/no/such does not exist\n"


def test_export_help_states_the_fp32_default(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "default: fp32" in " ".join(out.split())
    assert "bfloat16;" not in out


def test_compile_line_starts_a_line_of_its_own_on_a_shared_terminal():
    """Compiling starts after the first token is printed; on the terminal the line does not join the text."""
    import pty

    code = ("import sys\n"
            "from torchchat.cli.args import Notices\n"
            "sys.stdout.write('Hello, my name is Max'); sys.stdout.flush()\n"
            "Notices(streams_text=True).progress('Compiling the decode step')\n"
            "sys.stdout.write(' He\\n')\n")
    leader, follower = pty.openpty()
    p = subprocess.Popen([sys.executable, "-c", code], stdout=follower, stderr=follower, cwd=ROOT)
    os.close(follower)
    assert p.wait(timeout=60) == 0
    out = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the pseudo-terminal is closed once the child is gone
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert out.replace(b"\r\n", b"\n") == b"Hello, my name is Max\nCompiling the decode step\n He\n"
