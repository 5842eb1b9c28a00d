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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchchat",
        description="Run Llama-family language models with PyTorch.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if command is not None and name == command:
            _command_module(name).register(sub, name, help_text)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from torchchat.errors import TorchchatError

    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    args.argv = argv  # a command that re-launches itself (generate --tp) passes its arguments on
    if args.command is None:
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    verbose = bool(getattr(args, "verbose", False)) or os.environ.get("TORCHCHAT_VERBOSE") == "1"
    try:
        return int(_command_module(args.command).run(args) or 0)
    except TorchchatError as e:
        if verbose:
            raise
        print(f"Error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130
