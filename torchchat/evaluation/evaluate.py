"""Run lm-eval tasks on a built model and report metrics and timing."""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchchat.errors import UserInputError
from torchchat.evaluation.scoring import forward_time_lines
from torchchat.evaluation.tasks import LoadedTasks, require_lm_eval

DEFAULT_TASKS = ("wikitext",)
DEFAULT_MAX_LENGTH = 2048  # positions per forward unless --max-seq-length says otherwise (as the original)
DEFAULT_BATCH_SIZE = 8  # rows per scoring forward on eager models (bench/eval_bench.py)
LOGITS_BUDGET_BYTES = 1 << 30  # the default batch shrinks so one forward's fp32 logits stay under 1 GiB


@dataclass(frozen=True)
class EvalSpec:
    tasks: tuple[str, ...] = DEFAULT_TASKS
    task_dirs: tuple[Path, ...] = ()  # local task folders, searched before lm-eval's registry
    limit: int | None = None  # documents per task; None: all
    batch_size: int | None = None  # rows per scoring forward; None: default_batch_size()
    max_length: int | None = None  # positions per forward; None: the model's context, at most 2048
    compile: bool = False  # torch.compile the eager model's forward (eval --compile)


@dataclass
class EvalReport:
    results: dict[str, Any]  # what lm_eval.simple_evaluate returned, plus torchchat's settings in "config"
    eval_seconds: float  # wall time of the whole evaluation
    forward_seconds: list[float] = field(default_factory=list)  # one entry per model forward
    notes: list[str] = field(default_factory=list)  # settings changed to fit the runtime

    def timing_lines(self) -> list[str]:
        return [f"Time to run eval: {self.eval_seconds:.2f}s.", *forward_time_lines(self.forward_seconds)]

    def table(self) -> str:
        """lm-eval's markdown table of metrics (and of group aggregates, when a group ran)."""
        from lm_eval.utils import make_table

        text = make_table(self.results)
        if self.results.get("groups"):
            text += "\n" + make_table(self.results, "groups")
        return text

    def write_json(self, path: Path) -> None:
        """Write the results as JSON, atomically: a failed write leaves no partial file."""
        from lm_eval.utils import handle_non_serializable

        text = json.dumps(self.results, indent=2, default=handle_non_serializable, ensure_ascii=False)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def default_batch_size(batched: bool, max_length: int, vocab_size: int) -> int:
    """Rows per scoring forward when none is asked for: 1 where the runtime takes one row (exported
    programs), else DEFAULT_BATCH_SIZE, fewer if a forward's logits (B, max_length, vocab) fp32 would
    pass LOGITS_BUDGET_BYTES (Llama 3 at 2048 positions: 1 GiB per row)."""
    if not batched:
        return 1
    return max(1, min(DEFAULT_BATCH_SIZE, LOGITS_BUDGET_BYTES // (max_length * vocab_size * 4)))


def _evaluate(lm, tasks: LoadedTasks, limit: int | None) -> dict[str, Any]:
    """lm_eval.evaluator.evaluate with the task preparation and seeds lm_eval.simple_evaluate applies
    (zero-shot unless a task says otherwise, lm-eval's default seeds), but without simple_evaluate's
    environment report (a `pip list` subprocess and a transformers import: seconds on every run)."""
    import random

    import numpy as np
    import torch
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
    from lm_eval.evaluator import evaluate

    loaded = tasks.manager.load(tasks.objects)
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    torch.manual_seed(DEFAULT_OTHER_SEED)
    return evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=False)


def run_eval(runtime, tokenizer, tasks: LoadedTasks, spec: EvalSpec, model_name: str = "model") -> EvalReport:
    """Evaluate `tasks` (from load_tasks) on a runtime + tokenizer with lm-eval.

    Exported programs take one row per call (docs/export-metadata.md), so their batch size is 1."""
    require_lm_eval()
    from importlib.metadata import version

    from torchchat.evaluation.adapter import TorchchatLM
    from torchchat.runtime.base import EagerRuntime

    notes = []
    if spec.compile and not isinstance(runtime, EagerRuntime):
        raise UserInputError("compile: an exported model is compiled already; evaluate it without compile")
    batched = isinstance(runtime, EagerRuntime) and runtime.supports_parallel_prefill
    max_length = min(spec.max_length or DEFAULT_MAX_LENGTH, runtime.max_seq_len)
    batch = spec.batch_size or default_batch_size(batched, max_length, runtime.config.vocab_size)
    if batch > 1 and not batched:
        notes.append(f"this runtime scores one row per forward; --batch-size {batch} ignored")
        batch = 1
    lm = TorchchatLM(runtime, tokenizer, max_length=max_length, batch_size=batch, compile=spec.compile)
    start = time.perf_counter()
    results = _evaluate(lm, tasks, spec.limit)
    seconds = time.perf_counter() - start
    results["config"] = dict(
        model=model_name, runtime=type(runtime).__name__, device=str(runtime.device), batch_size=batch,
        max_length=max_length, limit=spec.limit, compile=spec.compile,
    )
    results["lm_eval_version"] = version("lm_eval")
    return EvalReport(results=results, eval_seconds=seconds, forward_seconds=list(lm.timer.seconds), notes=notes)
