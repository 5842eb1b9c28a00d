"""aoti_run (.pt2, .so) and et_run (.pte) on exported stories260K: greedy output equal to llama2.c's
golden file and to Python's engine, sampling flags, chat turns, and one-line errors for bad input."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import torch

from runner_process import MAX_SEQ_LEN, run_binary
from tests.conftest import shared_path

pytestmark = pytest.mark.slow  # builds the runners and exports three artifacts (a few minutes)

FORMS = ("pt2", "so", "pte")
STATS = re.compile(r"prompt tokens: (\d+), generated tokens: (\d+), prefill: [\d.]+ ms, decode: [\d.]+ tok/s")


def runner_for(bins, form):
    return bins / ("et_run" if form == "pte" else "aoti_run")


def artifact(arts, form):
    return getattr(arts, form)


@pytest.fixture(scope="module")
def python_engine(stories260k_dir):
    """Python's generation engine over the same checkpoint, eager fp32."""
    from torchchat.build import BuildSpec, ModelSource, build_model
    from torchchat.generation.engine import make_engine

    source = ModelSource(checkpoint_path=stories260k_dir / "stories260K.bin",
                         tokenizer_path=stories260k_dir / "tok512.model")
    return make_engine(build_model(BuildSpec(source=source, dtype=torch.float32)), max_seq_len=MAX_SEQ_LEN)


@pytest.fixture(scope="module")
def sp(stories260k_dir):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(stories260k_dir / "tok512.model"))


def python_greedy(engine, prompt_ids, max_new, start_pos=0):
    """(generated ids without the stop token, whether it stopped at EOS)."""
    from torchchat.generation.engine import GenerationConfig
    from torchchat.generation.sampling import SamplingParams

    cfg = GenerationConfig(max_new_tokens=max_new, sampling=SamplingParams(temperature=0.0), stop_ids=frozenset({2}))
    with torch.no_grad():
        ids = list(engine.tokens(prompt_ids, cfg, start_pos))
    stopped = bool(ids) and ids[-1] == 2
    return (ids[:-1] if stopped else ids), stopped


@pytest.mark.parametrize("form", FORMS)
def test_greedy_200_equals_llama2c_golden(runner_bins, stories_artifacts, form):
    res = run_binary(runner_for(runner_bins, form), artifact(stories_artifacts, form), "-z", stories_artifacts.tokenizer,
                     "-n", "200", "-t", "0")
    assert res.returncode == 0, res.stderr
    golden = shared_path("models", "stories260K", "expected_greedy_200.txt").read_text(encoding="utf-8")
    assert res.stdout == golden + "\n"
    assert STATS.search(res.stderr).groups() == ("1", "200")


@pytest.mark.parametrize("form", FORMS)
def test_greedy_with_prompt_equals_python(runner_bins, stories_artifacts, python_engine, sp, form):
    prompt = "Once upon a time, Tom found a box"
    ids = [1] + sp.encode(prompt)
    generated, _ = python_greedy(python_engine, ids, 120)
    res = run_binary(runner_for(runner_bins, form), artifact(stories_artifacts, form), "-z", stories_artifacts.tokenizer,
                     "-i", prompt, "-n", "120", "-t", "0")
    assert res.returncode == 0, res.stderr
    assert res.stdout == sp.decode(ids[1:] + generated) + "\n"
    assert STATS.search(res.stderr).groups() == (str(len(ids)), str(len(generated)))


def test_generation_stops_when_the_context_is_full(runner_bins, stories_artifacts, python_engine, sp):
    ids = [1] + sp.encode("Lily and Ben")
    generated, stopped = python_greedy(python_engine, ids, 1000)
    res = run_binary(runner_bins / "aoti_run", stories_artifacts.pt2, "-z", stories_artifacts.tokenizer,
                     "-i", "Lily and Ben", "-n", "0", "-t", "0")
    assert res.returncode == 0, res.stderr
    assert res.stdout == sp.decode(ids[1:] + generated) + "\n"
    assert int(STATS.search(res.stderr).group(2)) == len(generated)
    if not stopped:
        assert len(ids) + len(generated) == MAX_SEQ_LEN  # every position used


def sampled(bins, arts, *flags):
    res = run_binary(bins / "aoti_run", arts.pt2, "-z", arts.tokenizer, "-i", "Once upon a time", "-n", "60", *flags)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_top_k_1_and_a_tiny_nucleus_are_greedy(runner_bins, stories_artifacts):
    greedy = sampled(runner_bins, stories_artifacts, "-t", "0")
    assert sampled(runner_bins, stories_artifacts, "-t", "1", "-k", "1", "-s", "5") == greedy
    assert sampled(runner_bins, stories_artifacts, "-t", "1", "-k", "0", "-p", "0.001", "-s", "5") == greedy


def test_sampling_repeats_with_a_seed_and_varies_without(runner_bins, stories_artifacts):
    flags = ("-t", "1.0", "-k", "0", "-p", "1")
    first = sampled(runner_bins, stories_artifacts, *flags, "-s", "42")
    assert sampled(runner_bins, stories_artifacts, *flags, "-s", "42") == first
    others = {sampled(runner_bins, stories_artifacts, *flags, "-s", str(seed)) for seed in (1, 2, 3)}
    assert len(others | {first}) > 1


def test_the_runner_chat_format_in_metadata_wins_and_f_wins_over_it(runner_bins, stories_artifacts, tmp_path):
    # A model with a Jinja template ("hf") whose family export recognised: the runner writes that format.
    meta = json.loads((stories_artifacts.so.parent / "model.so.json").read_text())
    meta.update(chat_template="hf", runner_chat_format="gemma")
    meta_path = tmp_path / "gemma.json"
    meta_path.write_text(json.dumps(meta))
    args = [stories_artifacts.so, "-z", stories_artifacts.tokenizer, "-j", meta_path, "-m", "chat", "-i", "Hi", "-n", "5"]
    res = run_binary(runner_bins / "aoti_run", *args, stdin="")
    assert res.returncode == 2
    assert res.stderr.strip() == "error: the tokenizer has no <start_of_turn> token; pass the model's own tokenizer"
    res = run_binary(runner_bins / "aoti_run", *args, "-f", "llama2", stdin="")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Assistant: ")


def test_chat_turns_follow_the_llama2_format_and_keep_the_cache(runner_bins, stories_artifacts, python_engine, sp, tmp_path):
    # stories260K is a base model; metadata naming the llama2 template makes the runner chat with it.
    meta = json.loads((stories_artifacts.so.parent / "model.so.json").read_text())
    meta["chat_template"] = "llama2"
    meta_path = tmp_path / "chat.json"
    meta_path.write_text(json.dumps(meta))
    system, first, second = "Be kind.", "Tell me about a dog.", "And a cat?"
    res = run_binary(runner_bins / "aoti_run", stories_artifacts.so, "-z", stories_artifacts.tokenizer, "-j", meta_path,
                     "-m", "chat", "-y", system, "-i", first, "-n", "40", "-t", "0", stdin=second + "\n")
    assert res.returncode == 0, res.stderr

    # Meta's Llama 2 chat format: BOS "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]", the reply,
    # then EOS BOS "[INST] {user} [/INST]" for the next turn, continuing in the same KV cache. A reply cut
    # at -n has its last token fed first.
    turn1 = [1] + sp.encode(f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{first} [/INST]")
    reply1, stopped = python_greedy(python_engine, turn1, 40)
    turn2 = ([] if stopped else reply1[-1:]) + [2, 1] + sp.encode(f"[INST] {second} [/INST]")
    start2 = len(turn1) + len(reply1) - (0 if stopped else 1)
    reply2, _ = python_greedy(python_engine, turn2, 40, start_pos=start2)
    expected = f"Assistant: {sp.decode(reply1)}\nUser: Assistant: {sp.decode(reply2)}\nUser: "
    assert res.stdout == expected


def test_runners_do_not_link_python(runner_bins):
    for name in ("aoti_run", "et_run"):
        deps = subprocess.run(["ldd", str(runner_bins / name)], capture_output=True, text=True, check=True).stdout
        assert "not found" not in deps, deps
        assert "libpython" not in deps, deps


@pytest.fixture
def so_without_metadata(stories_artifacts, tmp_path):
    bare = tmp_path / "bare.so"
    shutil.copy(stories_artifacts.so, bare)
    return bare


def test_so_without_sidecar_runs_with_kind_and_context_flags(runner_bins, stories_artifacts, so_without_metadata):
    res = run_binary(runner_bins / "aoti_run", so_without_metadata, "-z", stories_artifacts.tokenizer,
                     "-l", "sentencepiece", "-c", str(MAX_SEQ_LEN), "-n", "200", "-t", "0")
    assert res.returncode == 0, res.stderr
    assert res.stdout == shared_path("models", "stories260K", "expected_greedy_200.txt").read_text() + "\n"


BAD_INPUT = {
    # name: (form, extra args, words the one-line error must contain)
    "missing model": ("pt2", ["-z", "{tok}"], "not found"),
    "no tokenizer flag": ("pt2", [], "-z"),
    "unknown flag": ("pt2", ["-z", "{tok}", "-x", "1"], "-x"),
    "bad number": ("pt2", ["-z", "{tok}", "-t", "hot"], "-t"),
    "bad top-p": ("pt2", ["-z", "{tok}", "-p", "1.5"], "-p"),
    "bad mode": ("pt2", ["-z", "{tok}", "-m", "talk"], "-m"),
    "pte to aoti_run": ("pte-as-aoti", ["-z", "{tok}"], "et_run"),
    "pt2 to et_run": ("pt2-as-et", ["-z", "{tok}"], "aoti_run"),
    "tiktoken file for a sentencepiece model": ("pt2", ["-z", "{llama3_tok}"], "sentencepiece"),
    "tokenizer larger than the model": ("pt2", ["-z", "{llama2_tok}"], "32000"),
    "chat with a base model": ("pt2", ["-z", "{tok}", "-m", "chat"], "generate"),
    "chat format the tokenizer cannot write": ("pt2", ["-z", "{tok}", "-m", "chat", "-f", "chatml"], "<|im_start|>"),
    "unknown chat format": ("pt2", ["-z", "{tok}", "-m", "chat", "-f", "zephyr"], "llama2|llama3|chatml|gemma|phi3"),
    "prompt longer than the context": ("pte", ["-z", "{tok}", "-i", "{long}"], "shorten"),
    "so without metadata or flags": ("bare-so", ["-z", "{tok}"], "-j"),
    "unknown tokenizer kind for a so": ("bare-so", ["-z", "{tok}", "-l", "bpe", "-c", "{ctx}"], "-l"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_2(runner_bins, stories_artifacts, so_without_metadata, tmp_path, case):
    form, args, must_contain = BAD_INPUT[case]
    binary = {"pte": "et_run", "pt2-as-et": "et_run"}.get(form, "aoti_run")
    model = {
        "pt2": stories_artifacts.pt2, "pte": stories_artifacts.pte, "pte-as-aoti": stories_artifacts.pte,
        "pt2-as-et": stories_artifacts.pt2, "bare-so": so_without_metadata,
    }[form]
    if case == "missing model":
        model = tmp_path / "absent.pt2"
    values = {
        "tok": str(stories_artifacts.tokenizer),
        "llama3_tok": str(shared_path("tokenizers", "llama3", "tokenizer.model")),
        "llama2_tok": str(shared_path("tokenizers", "llama2", "tokenizer.model")),
        "long": "Once upon a time " * 200,
        "ctx": str(MAX_SEQ_LEN),
    }
    res = run_binary(runner_bins / binary, model, *(a.format(**values) for a in args))
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert must_contain in lines[0]
    assert res.stdout == ""
