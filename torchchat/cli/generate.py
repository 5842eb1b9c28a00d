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
    p.add_argument("--num-samples", type=int, default=1,
                   help="How many times to generate (metrics are averaged). Sampled (temperature > 0) samples "
                        "run as one batch, sample i seeded --seed + i; greedy ones, and those with a draft model, "
                        "run one after another")
    p.add_argument("--serial-samples", action="store_true",
                   help="Run --num-samples one after another even where they could be one batch (timing runs: "
                        "with --compile the first is the warm-up and is not averaged)")
    cli_args.add_chat_template(p, generate=True)
    cli_args.add_sampling(p)
    cli_args.add_compile(p)
    cli_args.add_speculative(p)
    cli_args.add_tensor_parallel(p)
    p.add_argument("--metrics-json", type=Path, default=None, help="Also write the metrics as JSON to this file")
    cli_args.add_verbose(p)
    return p


def _chat_prompt(args: argparse.Namespace, opening, gen):
    """--prompt as one user turn (after --system-prompt) of the chat template, and a config that stops
    at the template's end-of-turn tokens. Says so when the model is not known to be tuned for chat."""
    from dataclasses import replace

    from torchchat.generation.chat_format import Message

    setup = opening.chat_format()
    tok = opening.built.tokenizer
    messages = ([Message("system", args.system_prompt)] if args.system_prompt else []) + [Message("user", args.prompt)]
    stops = tok.stop_ids | setup.format.stop_ids(tok)
    return setup.format.encode(tok, messages), replace(gen, stop_ids=stops)


def run(args: argparse.Namespace) -> int:
    from torchchat.errors import UserInputError

    if args.num_samples <= 0:
        raise UserInputError("--num-samples must be positive")
    _check_metrics_json(args.metrics_json)
    notes: list[str] = []
    spec = cli_args.build_spec(args, notes)
    tp = cli_args.tensor_parallel_size(args)
    if tp == 1:
        return _generate(args, spec, notes, args.seed, writes=True, may_batch=True)
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
        return _generate(args, replace(spec, device=ctx.device, tp=ctx), notes, seed, writes=ctx.rank == 0,
                         may_batch=False)
    finally:
        shutdown()


def _batched(args: argparse.Namespace, opening, gen, may_batch: bool) -> bool:
    """Whether --num-samples runs as one batch: the samples must be independent draws (greedy ones
    would all be the same text, and then they are timing runs), the draft's cache holds one sequence,
    and the runtime must take a cache row per sequence (eager; not exported programs or --tp)."""
    return (args.num_samples > 1 and may_batch and not args.serial_samples and not gen.sampling.greedy
            and opening.draft is None and getattr(opening.built.runtime, "supports_batching", False))


def _generate(args: argparse.Namespace, spec, notes: list[str], seed: int | None, writes: bool,
              may_batch: bool) -> int:
    """Build, generate, print; `writes`: this process also writes --metrics-json (rank 0 only under --tp)."""
    from dataclasses import replace

    import torch

    from torchchat.errors import UserInputError
    from torchchat.cli.opening import Opening
    from torchchat.generation.metrics import Summary, peak_memory_bytes, print_sample, sample_report
    from torchchat.model.size import bytes_read_per_token

    gen = cli_args.generation_config(args)
    opening = Opening(args, spec, notes, streams_text=True)
    notices = opening.notices
    built = opening.build()
    tok = built.tokenizer
    if args.chat_template is not None:
        prompt_ids, gen = _chat_prompt(args, opening, gen)
    else:
        if args.system_prompt is not None:
            raise UserInputError("--system-prompt needs --chat-template (e.g. auto), which formats the prompt "
                                 "as a chat turn")
        prompt_ids = tok.encode(args.prompt, bos=tok.bos_id is not None)
    batched = _batched(args, opening, gen, may_batch)
    engine = opening.engine(args.max_seq_length or len(prompt_ids) + gen.max_new_tokens,
                            slots=args.num_samples if batched else 1)
    model_bytes = bytes_read_per_token(built.model) if built.model is not None else built.runtime.weight_bytes
    compiled = opening.compile.decode or opening.compile.prefill
    if seed is not None:
        torch.manual_seed(seed)
    if batched:
        if compiled:
            # Compile the batch's steps first, so that the samples' metrics time generation only (the
            # serial runs report their first sample apart instead). Fresh seeds: the samples' own
            # generators are made and seeded afterwards, so their texts do not change.
            for _ in engine.samples(prompt_ids, replace(gen, max_new_tokens=2), [None] * args.num_samples):
                pass
        results = _batch_samples(engine, prompt_ids, gen, args.num_samples, seed, args.prompt)
    else:
        results = _serial_samples(engine, prompt_ids, gen, args, seed)
    reports = []
    for i, (stats, finish) in enumerate(results):
        if finish == "length" and stats.generated_tokens < gen.max_new_tokens:
            notices.say(_context_end_note(stats, gen.max_new_tokens, engine.max_seq_len, args.max_seq_length))
        warmup = compiled and i == 0 and args.num_samples > 1 and not batched
        report = sample_report(i + 1, stats, model_bytes, compile_sample=warmup)
        reports.append(report)
        print_sample(report, sys.stderr)
        if stats.draft_proposed:
            print(f"Acceptance rate: {stats.acceptance_rate:.1%} ({stats.draft_accepted} of {stats.draft_proposed} "
                  f"draft tokens, k={stats.speculate_k})", file=sys.stderr)
    if batched:
        total = sum(s.generated_tokens for s, _ in results)
        wall = max(s.total_time for s, _ in results)
        print(f"Batch of {args.num_samples} samples: {total} tokens in {wall:.2f} sec, "
              f"{total / max(wall, 1e-9):.2f} tokens/sec in all", file=sys.stderr)
    summary = Summary(reports, model_bytes, peak_memory_bytes(engine.device), str(engine.device), str(built.dtype))
    summary.print(sys.stderr)
    if writes and args.metrics_json is not None:
        summary.write_json(args.metrics_json)
    return 0


def _serial_samples(engine, prompt_ids, gen, args: argparse.Namespace, seed: int | None):
    """Each sample streamed to stdout as it comes; sample i seeded `seed` + i (as a batch would be).
    Yields (stats, finish_reason) as each sample ends, so that its metrics follow its text."""
    for i in range(args.num_samples):
        if seed is not None:
            engine.generator.manual_seed(seed + i)
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        stats, finish = None, None
        for r in engine.stream(prompt_ids, gen):
            if r.text:
                sys.stdout.write(r.text)
                sys.stdout.flush()
            stats = r.stats or stats
            finish = r.finish_reason or finish
        sys.stdout.write("\n")
        sys.stdout.flush()
        yield stats, finish


def _batch_samples(engine, prompt_ids, gen, n: int, seed: int | None, prompt: str):
    """The n samples as one batch, each printed whole (prompt and text) when the batch is done, in order.
    Returns (stats, finish_reason) per sample."""
    seeds = [None if seed is None else seed + i for i in range(n)]
    texts = [[] for _ in range(n)]
    results: list = [None] * n
    for i, r in engine.samples(prompt_ids, gen, seeds):
        texts[i].append(r.text)
        if r.finish_reason is not None:
            results[i] = (r.stats, r.finish_reason)
    for parts in texts:
        sys.stdout.write(prompt + "".join(parts) + "\n")
    sys.stdout.flush()
    return results
