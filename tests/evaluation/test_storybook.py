"""lm-eval over stories260K on the shipped storybook tasks: the metrics lm-eval reports equal the same
metrics computed by hand from the runtime's log-likelihoods and the engine's greedy text."""
from __future__ import annotations

import json
import math
import re
import string
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from tests.evaluation.reference import continuation_logprob, token_logprobs

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")

LIMIT = 8
MAX_LENGTH = 256  # every story fits one window, so a story's log-likelihood is one forward
DATA = Path(__file__).resolve().parents[2] / "torchchat" / "evaluation" / "tasks" / "storybook"


def _docs(name: str) -> list[dict]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:LIMIT]]


def _refuse(*args, **kwargs):
    raise AssertionError("evaluation tried to load a Hugging Face model or file")


@pytest.fixture(scope="module")
def report(stories):
    """One lm-eval run of the three storybook tasks, with every way of loading another model blocked."""
    import huggingface_hub
    import transformers

    from torchchat.evaluation.evaluate import EvalSpec, run_eval
    from torchchat.evaluation.tasks import load_tasks

    blocked = [
        mock.patch.object(transformers.PreTrainedModel, "from_pretrained", _refuse),
        mock.patch.object(transformers.AutoTokenizer, "from_pretrained", _refuse),
        mock.patch.object(huggingface_hub, "hf_hub_download", _refuse),
        mock.patch.object(huggingface_hub, "snapshot_download", _refuse),
    ]
    for b in blocked:
        b.start()
    try:
        spec = EvalSpec(tasks=("storybook",), limit=LIMIT, batch_size=4, max_length=MAX_LENGTH)
        tasks = load_tasks(spec.tasks)
        return run_eval(stories.runtime, stories.tokenizer, tasks, spec, model_name="stories260K")
    finally:
        for b in blocked:
            b.stop()


def test_perplexities_equal_the_log_likelihood_summed_by_hand(report, stories):
    got = report.results["results"]["storybook_ppl"]
    total = words = nbytes = 0.0
    for doc in _docs("stories.jsonl"):
        text = doc["text"]
        total += float(token_logprobs(stories.runtime, stories.tokenizer.encode(text, bos=True)).sum())
        words += len(re.split(r"\s+", text))
        nbytes += len(text.encode("utf-8"))
    assert got["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-4)
    assert got["byte_perplexity,none"] == pytest.approx(math.exp(-total / nbytes), rel=1e-4)
    assert got["bits_per_byte,none"] == pytest.approx(-total / nbytes / math.log(2), rel=1e-4)
    assert all(math.isfinite(got[k]) for k in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"))


def test_accuracy_equals_the_argmax_of_hand_log_likelihoods(report, stories):
    got = report.results["results"]["storybook_cloze"]
    acc, acc_norm = [], []
    for doc in _docs("cloze.jsonl"):
        lls = np.array([continuation_logprob(stories.runtime, stories.tokenizer, doc["context"], " " + c)
                        for c in doc["choices"]])
        lengths = np.array([len(c) for c in doc["choices"]], dtype=float)
        acc.append(float(np.argmax(lls) == doc["answer"]))
        acc_norm.append(float(np.argmax(lls / lengths) == doc["answer"]))
    assert got["acc,none"] == pytest.approx(np.mean(acc))
    assert got["acc_norm,none"] == pytest.approx(np.mean(acc_norm))
    assert 0.0 < got["acc,none"] <= 1.0


def test_exact_match_equals_the_engines_greedy_text_cut_at_the_stop_strings(report, stories):
    from torchchat.generation.engine import GenerationConfig, make_engine
    from torchchat.generation.sampling import SamplingParams

    engine = make_engine(stories, max_seq_len=MAX_LENGTH)
    cfg = GenerationConfig(max_new_tokens=16, sampling=SamplingParams(temperature=0.0, top_k=None))
    stops = [".", ",", "!", "?", "\n"]  # storybook_gen.yaml
    hits = []
    for doc in _docs("gen.jsonl"):
        text = "".join(r.text for r in engine.stream(stories.tokenizer.encode(doc["prompt"], bos=True), cfg))
        cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
        text = text[: min(cuts)] if cuts else text
        normal = text.strip().lower().translate(str.maketrans("", "", string.punctuation))
        hits.append(float(normal == doc["answer"].lower()))
    assert report.results["results"]["storybook_gen"]["exact_match,none"] == pytest.approx(np.mean(hits))


def test_report_lines_table_and_json(report, tmp_path):
    lines = report.timing_lines()
    assert lines[0].startswith("Time to run eval: ")
    assert re.match(r"Time in model\.forward: [\d.]+s, over (\d+) model evaluations", lines[1])
    assert int(re.match(r".*over (\d+)", lines[1]).group(1)) == len(report.forward_seconds) > 0
    table = report.table()
    expected = (("storybook_ppl", "word_perplexity"), ("storybook_cloze", "acc"), ("storybook_gen", "exact_match"))
    for task, metric in expected:
        assert task in table and metric in table
    out = tmp_path / "results.json"
    report.write_json(out)
    saved = json.loads(out.read_text())
    assert saved["results"]["storybook_cloze"]["acc,none"] == report.results["results"]["storybook_cloze"]["acc,none"]
    assert saved["config"]["model"] == "stories260K" and saved["config"]["limit"] == LIMIT
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind
