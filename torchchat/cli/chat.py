"""`chat`: an interactive conversation. `User:` turns are read from stdin (on a terminal with line
editing and history: line_input.py), replies stream to stdout, notices go to stderr. /bye, end of input (Ctrl-D) or Ctrl-C at the prompt leave; Ctrl-C during a
reply stops that reply."""
from __future__ import annotations

import argparse
import contextlib
import sys

from torchchat.cli import args as cli_args
from torchchat.cli.line_input import LineInput, history_path

# Context allocated when --max-seq-length is not given: the model's own, up to this many positions
# (a 128K-token KV cache for Llama 3.1 8B alone would take 16 GiB).
DEFAULT_CHAT_CONTEXT = 8192


def register(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    cli_args.add_model_source(p)
    cli_args.add_build(p)
    cli_args.add_chat_template(p)
    cli_args.add_sampling(p)
    cli_args.add_compile(p)
    cli_args.add_speculative(p)
    p.add_argument("--stats", action="store_true",
                   help="After each reply, print tokens, speed, reused prompt tokens and draft acceptance to stderr")
    cli_args.add_verbose(p)
    return p


def _stats_line(stats) -> str:
    line = (f"[{stats.generated_tokens} tokens, {stats.next_tokens_per_s:.1f} tok/s; prompt: "
            f"{stats.prompt_tokens} new + {stats.cached_tokens} reused tokens")
    if stats.draft_proposed:
        line += f"; draft acceptance {stats.acceptance_rate:.1%} at k={stats.speculate_k}"
    return line + "]"


def _turn(session, engine, text: str, gen, show_stats: bool) -> None:
    """One exchange: the user's message, then the reply streamed to stdout. `gen`: a GenerationConfig."""
    from torchchat.errors import ContextLengthError

    try:
        fresh = session.add_user(text, gen)
    except ContextLengthError as e:
        print(f"[{e}]", flush=True)
        return
    if fresh:
        print("[The context is full: starting a fresh one (earlier turns are forgotten, the system prompt is kept).]")
    print("Model: ", end="", flush=True)
    with contextlib.closing(session.reply(gen)) as reply:
        for r in reply:
            if r.text:
                sys.stdout.write(r.text)
                sys.stdout.flush()
    print(flush=True)
    if session.last_finish == "length" and engine.position >= engine.max_seq_len - 1:
        print("[The reply reached the end of the context; the next message starts a fresh one.]")
    if show_stats and session.last_stats is not None:
        print(_stats_line(session.last_stats), file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    import torch

    from torchchat.cli.opening import Opening

    notes: list[str] = []
    spec = cli_args.build_spec(args, notes)
    gen = cli_args.generation_config(args)
    opening = Opening(args, spec, notes, streams_text=True)
    built = opening.build()
    setup = opening.chat_format()  # before the engine and the draft: a template that cannot work fails first
    engine = opening.engine(args.max_seq_length or min(built.runtime.max_seq_len, DEFAULT_CHAT_CONTEXT))
    if args.seed is not None:
        torch.manual_seed(args.seed)

    with LineInput(history_path()) as lines:
        return _converse(args, built, engine, setup, gen, lines)


def _converse(args: argparse.Namespace, built, engine, setup, gen, lines: LineInput) -> int:
    from torchchat.generation.chat_session import ChatSession

    system = args.system_prompt
    if system is None and sys.stdin.isatty():
        try:
            system = lines.read("System prompt (Enter for none): ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
    session = ChatSession(engine, setup.format, system)
    print(f"Chatting with {built.name} (chat template: {setup.format.name}, context: {engine.max_seq_len} tokens). "
          "Type /bye to leave.", flush=True)
    while True:
        try:
            line = lines.read("User: ")
        except (EOFError, KeyboardInterrupt):
            print()
            break
        try:
            text = line.strip()
            if text == "/bye":
                break
            if text:
                _turn(session, engine, text, gen, args.stats)
        except KeyboardInterrupt:
            # Ctrl-C during a turn stops that turn (what was said so far stays in the conversation).
            print(" [interrupted]", flush=True)
    print("Exiting chat.")
    return 0
