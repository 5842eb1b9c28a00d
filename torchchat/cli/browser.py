"""`browser`: the `server` command plus its chat page opened in the default web browser."""
from __future__ import annotations

import argparse

from torchchat.cli import server as server_cli


def register(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=f"{help_text}: the chat page at / of the `server` command.")
    server_cli.add_arguments(p)
    p.add_argument("--no-open", action="store_true", help="Do not open the default web browser; just print the URL")
    return p


def run(args: argparse.Namespace) -> int:
    return server_cli.serve(args, server_cli.server_options(args, open_browser=not args.no_open))
