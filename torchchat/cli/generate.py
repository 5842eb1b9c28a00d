"""`generate`: complete a prompt, streaming text to stdout and metrics to stderr."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torchchat.cli import args as cli_args


def register(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    cli_args.add_model_source(p)
    cli_args.add_build(p)
    p.add_argument("--prompt", default="Hello, my name is", help="Text to continue")
    p.add_argument("--num-samples", type=int, default=1, help="How many times to generate (metrics are averaged)")
    cli_args.add_chat_template(p, generate=True)
    cli_args.add_sampling(p)
    cli_args.add_compile(p)
    cli_args.add_speculative(p)
    cli_args.add_tensor_parallel(p)
    p.add_argument("--metrics-json", type=Path, default=None, help="Also write the metrics as JSON to this file")
    cli_args.add_verbose(p)
    return p


def _chat_prompt(args: argparse.Namespace, built, cfg, notices: cli_args.Notices):
    """--prompt as one user turn (after --system-prompt) of the chat template, and a config that stops
    at the template's end-of-turn tokens. Says so when the model is not known to be tuned for chat."""
    from dataclasses import replace

    from torchchat.generation.chat_format import Message, resolve_chat_format

    override = None if args.chat_template == "auto" else args.chat_template
    setup = resolve_chat_format(built.tokenizer, override, built.chat_template, built.is_chat)
    notices.say(*setup.notices)
    messages = ([Message("system", args.system_prompt)] if args.system_prompt else []) + [Message("user", args.prompt)]
    stops = built.tokenizer.stop_ids | setup.format.stop_ids(built.tokenizer)
    return setup.format.encode(built.tokenizer, messages), replace(cfg, stop_ids=stops)


def run(args: argparse.Namespace) -> int:
    from torchchat.errors import UserInputError

    if args.num_samples <= 0:
        raise UserInputError("--num-samples must be positive")
    _check_metrics_json(args.metrics_json)
    notes: list[str] = []
    spec = cli_args.build_spec(args, notes)
    tp = cli_args.tensor_parallel_size(args)
    if tp == 1:
        return _generate(args, spec, notes, args.seed, writes=True)
    from torchchat.distributed.launch import inside_torchrun, relaunch

    if not inside_torchrun():
        return relaunch(args.argv, tp, verbose=args.verbose)
    return _generate_tp(args, spec, notes, tp)


def _context_end_note(stats, asked: int, context: int, chosen: int | None) -> str:
    """Why a sample stopped short of --max-new-tokens: the KV cache is full. `chosen`: --max-seq-length."""
    note = (f"Stopped at the end of the context: {stats.generated_tokens} of the {asked} new tokens asked for "
            f"({stats.prompt_tokens} prompt + {stats.generated_tokens} generated = {context} positions)")
    if chosen is not None and chosen <= context:
        return note + "; a larger --max-seq-length makes room for more"
    return note + f"; {context} positions is all the model holds"


def _check_metrics_json(path: Path | None) -> None:
    """Before the model loads: a path that cannot be written would fail only after the whole generation."""
    from torchchat.errors import UserInputError

    if path is None:
        return
    if path.is_dir():
        raise UserInputError(f"--metrics-json {path}: is a folder; give a file path")
    if not path.parent.is_dir():
        raise UserInputError(f"--metrics-json {path}: the folder {path.parent} does not exist")


def _generate_tp(args: argparse.Namespace, spec, notes: list[str], tp: int) -> int:
    """One rank of a `--tp` run: every rank computes, only rank 0 writes."""
    import os
    from dataclasses import replace

    from torchchat.distributed.tensor_parallel import agree_on_seed, init_tp, shutdown

    ctx = init_tp(tp, spec.device)
    try:
        if ctx.rank != 0:
            sys.stdout = open(os.devnull, "w")
            if not args.verbose:
                sys.stderr = open(os.devnull, "w")
        seed = agree_on_seed(args.seed)
        return _generate(args, replace(spec, device=ctx.device, tp=ctx), notes, seed, writes=ctx.rank == 0)
    finally:
        shutdown()


def _generate(args: argparse.Namespace, spec, notes: list[str], seed: int | None, writes: bool) -> int:
    """Build, generate, print; `writes`: this process also writes --metrics-json (rank 0 only under --tp)."""
    import torch

    from torchchat.errors import UserInputError
    from torchchat.generation.engine import make_engine
    from torchchat.generation.metrics import Summary, peak_memory_bytes, print_sample, sample_report
    from torchchat.model.size import bytes_read_per_token

    cfg = cli_args.generation_config(args)
    notices = cli_args.Notices(streams_text=True)
    options = cli_args.compile_options(args, notices)
    draft = cli_args.draft_spec(args, spec)
    notices.say(*notes)
    built = cli_args.build(spec, notices)
    tok = built.tokenizer
    if args.chat_template is not None:
        prompt_ids, cfg = _chat_prompt(args, built, cfg, notices)
    else:
        if args.system_prompt is not None:
            raise UserInputError("--system-prompt needs --chat-template (e.g. auto), which formats the prompt "
                                 "as a chat turn")
        prompt_ids = tok.encode(args.prompt, bos=tok.bos_id is not None)
    need = len(prompt_ids) + cfg.max_new_tokens
    engine = make_engine(built, options, max_seq_len=args.max_seq_length or need,
                         parallel_prefill=not args.sequential_prefill)
    if draft is not None:
        engine.attach_draft(cli_args.build(draft, notices).runtime, args.speculate_k)
    model_bytes = bytes_read_per_token(built.model) if built.model is not None else built.runtime.weight_bytes
    compiled = options.decode or options.prefill
    if seed is not None:
        torch.manual_seed(seed)
    reports = []
    for i in range(args.num_samples):
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        stats, finish = None, None
        for r in engine.stream(prompt_ids, cfg):
            if r.text:
                sys.stdout.write(r.text)
                sys.stdout.flush()
            stats = r.stats or stats
            finish = r.finish_reason or finish
        sys.stdout.write("\n")
        sys.stdout.flush()
        if finish == "length" and stats.generated_tokens < cfg.max_new_tokens:
            notices.say(_context_end_note(stats, cfg.max_new_tokens, engine.max_seq_len, args.max_seq_length))
        report = sample_report(i + 1, stats, model_bytes, compile_sample=compiled and i == 0 and args.num_samples > 1)
        reports.append(report)
        print_sample(report, sys.stderr)
        if stats.draft_proposed:
            print(f"Acceptance rate: {stats.acceptance_rate:.1%} ({stats.draft_accepted} of {stats.draft_proposed} "
                  f"draft tokens, k={stats.speculate_k})", file=sys.stderr)
    summary = Summary(reports, model_bytes, peak_memory_bytes(engine.device), str(engine.device), str(built.dtype))
    summary.print(sys.stderr)
    if writes and args.metrics_json is not None:
        summary.write_json(args.metrics_json)
    return 0
