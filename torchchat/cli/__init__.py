"""Command-line interface: argparse lives here and nowhere else.

Each subcommand is a module in this package exposing `register(subparsers)` and `run(args) -> int`.
Modules are imported only when their command runs, so `--help` stays fast and a missing optional
dependency of one command never breaks another.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

# command name -> (module in torchchat.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "download": ("inventory", "Download a known model into the model directory"),
    "list": ("inventory", "List known models and whether they are downloaded"),
    "where": ("inventory", "Print the directory a model is downloaded to"),
    "remove": ("inventory", "Remove a downloaded model"),
    "generate": ("generate", "Generate text from a prompt"),
    "chat": ("chat", "Chat interactively with a model"),
    "browser": ("browser", "Serve a chat page in the browser"),
    "server": ("server", "Serve an OpenAI-compatible API"),
    "export": ("export", "Export a model for AOT Inductor (.pt2/.so) or ExecuTorch (.pte)"),
    "eval": ("eval", "Evaluate a model with lm-eval tasks"),
}


def _command_module(name: str):
    return importlib.import_module(f"torchchat.cli.{COMMANDS[name][0]}")


# Commands that load a model, and with it the libraries whose log lines the CLI hides unless -v.
MODEL_COMMANDS = frozenset({"generate", "chat", "browser", "server", "export", "eval"})


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    return _build_parsers(command)[0]


def _build_parsers(command: str | None) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]:
    """The top-level parser, and the full parser of `command` (None when no command is named)."""
    parser = argparse.ArgumentParser(
        prog="torchchat",
        description="Run Llama-family language models with PyTorch.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    command_parser = None
    for name, (module, help_text) in COMMANDS.items():
        if command is not None and name == command:
            command_parser = _command_module(name).register(sub, name, help_text)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser, command_parser


def _silence_stdout() -> None:
    """The reader of stdout went away (`... | head -1`): send what is still buffered to /dev/null, so
    the interpreter's final flush does not print a second BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _relaunch_for_compiled_wrapper(args: argparse.Namespace) -> None:
    """Start this command again with the C++ compiler's libstdc++ preloaded where an AOT Inductor artifact
    is to be loaded and the process has another libstdc++ (torchchat/runtime/cxx_runtime.py says why).
    Returns where nothing needs doing; otherwise this process is replaced."""
    if not (getattr(args, "aoti_package_path", None) or getattr(args, "dso_path", None)):
        return
    import torch  # (maps the libstdc++ torch was linked with, if any)

    from torchchat.runtime.cxx_runtime import compiler_libstdcxx, loaded_libstdcxx, preload_needed, relaunch_env

    library = preload_needed(loaded_libstdcxx(), compiler_libstdcxx(), cuda_build=torch.version.cuda is not None)
    env = relaunch_env(library, dict(os.environ)) if library is not None else None
    if env is None:
        return
    if getattr(args, "verbose", False):
        print(f"[restarting with LD_PRELOAD={library}: the compiled model needs the compiler's libstdc++]",
              file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def main(argv: Sequence[str] | None = None) -> int:
    from torchchat.errors import TorchchatError

    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    parser, command_parser = _build_parsers(command)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # argparse reports a subcommand's unknown flag with the top-level usage; name the command's own.
        (command_parser or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    args.argv = argv  # a command that re-launches itself (generate --tp) passes its arguments on
    if args.command is None:
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    verbose = bool(getattr(args, "verbose", False)) or os.environ.get("TORCHCHAT_VERBOSE") == "1"
    if not verbose and args.command in MODEL_COMMANDS:
        from torchchat.cli.quiet import hide_library_noise

        hide_library_noise(max_autotune=bool(getattr(args, "max_autotune", False)))
    if from_command_line:  # (a process that called main() itself is never replaced)
        _relaunch_for_compiled_wrapper(args)
    try:
        return int(_command_module(args.command).run(args) or 0)
    except BrokenPipeError:
        # As `cat` does when its reader exits: stop quietly, with the status a SIGPIPE death gives.
        _silence_stdout()
        return 141
    except TorchchatError as e:
        if verbose:
            raise
        print(f"Error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130
