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
    cli_args.add_sampling(p)
    cli_args.add_compile(p)
    p.add_argument("--metrics-json", type=Path, default=None, help="Also write the metrics as JSON to this file")
    cli_args.add_verbose(p)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from torchchat.build import build_model
    from torchchat.errors import UserInputError
    from torchchat.generation.engine import make_engine
    from torchchat.generation.metrics import Summary, bytes_read_per_token, peak_memory_bytes, print_sample, sample_report

    if args.num_samples <= 0:
        raise UserInputError("--num-samples must be positive")
    notes: list[str] = []
    spec = cli_args.build_spec(args, notes)
    cfg = cli_args.generation_config(args)
    options = cli_args.compile_options(args)
    for note in notes:
        print(note, file=sys.stderr)
    built = build_model(spec)
    for note in built.notes:
        print(note, file=sys.stderr)
    tok = built.tokenizer
    prompt_ids = tok.encode(args.prompt, bos=tok.bos_id is not None)
    need = len(prompt_ids) + cfg.max_new_tokens
    engine = make_engine(built, options, max_seq_len=args.max_seq_length or need,
                         parallel_prefill=not args.sequential_prefill)
    model_bytes = bytes_read_per_token(built.model) if built.model is not None else built.runtime.weight_bytes
    compiled = options.decode or options.prefill
    if args.seed is not None:
        torch.manual_seed(args.seed)
    reports = []
    for i in range(args.num_samples):
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        stats = None
        for r in engine.stream(prompt_ids, cfg):
            if r.text:
                sys.stdout.write(r.text)
                sys.stdout.flush()
            stats = r.stats or stats
        sys.stdout.write("\n")
        sys.stdout.flush()
        report = sample_report(i + 1, stats, model_bytes, compile_sample=compiled and i == 0 and args.num_samples > 1)
        reports.append(report)
        print_sample(report, sys.stderr)
    summary = Summary(reports, model_bytes, peak_memory_bytes(engine.device), str(engine.device), str(spec.dtype))
    summary.print(sys.stderr)
    if args.metrics_json is not None:
        summary.write_json(args.metrics_json)
    return 0
