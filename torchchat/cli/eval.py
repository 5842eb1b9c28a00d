"""`eval`: score a model on lm-eval tasks (lm-eval's registry, or local task folders that run offline)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from torchchat.cli import args as cli_args


def register(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    from torchchat.evaluation.evaluate import DEFAULT_TASKS

    p = sub.add_parser(name, help=help_text, description=help_text)
    cli_args.add_model_source(p)
    cli_args.add_build(p)
    g = p.add_argument_group("evaluation")
    g.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), metavar="TASK",
                   help="lm-eval tasks, groups or tags (default: wikitext); the shipped local tasks: storybook "
                        "(storybook_ppl, storybook_cloze, storybook_gen)")
    g.add_argument("--tasks-dir", type=Path, action="append", default=[], metavar="DIR",
                   help="A folder of task YAMLs to search before lm-eval's registry (repeatable); a YAML's !function "
                        "runs Python from it: trust its source")
    g.add_argument("--limit", type=int, default=None, help="Evaluate at most N documents per task")
    g.add_argument("--batch-size", type=int, default=None,
                   help="Sequences per forward when scoring log-likelihoods "
                        "(default 8, fewer for large vocabularies; exported models: 1)")
    g.add_argument("--output-json", type=Path, default=None, metavar="PATH", help="Write lm-eval's results as JSON")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model's forward (dynamic shapes); pays off on long evaluations")
    cli_args.add_verbose(p)
    return p


def _eval_spec(args: argparse.Namespace):
    from torchchat.errors import UserInputError
    from torchchat.evaluation.evaluate import EvalSpec

    if args.limit is not None and args.limit <= 0:
        raise UserInputError("--limit must be positive")
    if args.batch_size is not None and args.batch_size <= 0:
        raise UserInputError("--batch-size must be positive")
    if args.compile and cli_args.exported_flag(args):
        raise UserInputError(f"{cli_args.exported_flag(args)}: an exported model is compiled already; drop --compile")
    if args.output_json is not None and args.output_json.is_dir():
        raise UserInputError(f"--output-json {args.output_json}: is a folder; give a file path")
    return EvalSpec(tasks=tuple(args.tasks), task_dirs=tuple(args.tasks_dir), limit=args.limit,
                    batch_size=args.batch_size, max_length=args.max_seq_length, compile=args.compile)


def run(args: argparse.Namespace) -> int:
    from torchchat.evaluation.evaluate import run_eval
    from torchchat.evaluation.tasks import load_tasks

    # lm-eval warns about every task config detail; keep the output to our lines unless asked.
    logging.getLogger("lm_eval").setLevel(logging.INFO if args.verbose else logging.ERROR)
    notes: list[str] = []
    spec = cli_args.build_spec(args, notes)
    eval_spec = _eval_spec(args)
    notices = cli_args.Notices()
    notices.say(*notes)
    # Tasks first: a bad name or an unreachable dataset fails before the model is loaded.
    tasks = load_tasks(eval_spec.tasks, eval_spec.task_dirs, notify=notices.progress)
    built = cli_args.build(spec, notices)
    report = run_eval(built.runtime, built.tokenizer, tasks, eval_spec, model_name=built.name)
    notices.say(*report.notes)
    for line in report.timing_lines():
        print(line)
    print(f"For model {built.name}")
    print(report.table())
    if args.output_json is not None:
        report.write_json(args.output_json)
        print(f"Results written to {args.output_json}", file=sys.stderr)
    return 0
