"""Loads a storybook data file (JSON lines, beside this module) as the task's test split.

lm-eval resolves `data_files` against the working directory; loading through this function keeps
the task runnable from anywhere."""
from __future__ import annotations

import json
from pathlib import Path


def load(data_file: str, **task_metadata):
    """`data_file`: a name in this folder. `task_metadata` (version, model info) is what lm-eval passes
    every custom dataset loader; it does not change the data. Returns a datasets.DatasetDict."""
    import datasets

    path = Path(__file__).with_name(data_file)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
