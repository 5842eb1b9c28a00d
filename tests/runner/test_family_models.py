"""The C++ runners with a model of Llama's relatives: the byte-level BPE tokenizer.json of Qwen, SmolLM and
Phi-4-mini (runner/tokenizer_hf.cpp) against the `tokenizers` package, and a tiny random Qwen2.5 folder
exported to .pt2: aoti_run's greedy text and its ChatML chat turn (the format export recognised from the
folder's chat template) equal Python's."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runner_process import export, run_binary

from tests.conftest import shared_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checkpoint"))
from hf_family_folders import CORPUS, write_folder  # noqa: E402
from llamacpp_tools import pieces_bytes  # noqa: E402
from test_hf_families import CASES  # noqa: E402
from test_tokenizers import SYSTEM, USER1  # noqa: E402

pytestmark = pytest.mark.slow  # needs the C++ build and an export

# Qwen2's pre-tokenizer split (tokenizer.json: Split with this regex, then ByteLevel without its own).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
MAX_SEQ = 128


def _texts() -> list[str]:
    inp = shared_path("tokenizers", "llama.cpp-vocab-tests", "ggml-vocab-llama-bpe.gguf.inp").read_text(encoding="utf-8")
    return CORPUS + inp.split("\n__ggml_vocab_test__\n")[:-1]  # 46 strings: Unicode, emoji, whitespace runs


def _qwen_style_tokenizer(path: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 3 + _texts(), trainer)
    tok.save(str(path))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A tiny Qwen2.5 folder (ByteLevel tokenizer.json, ChatML template) and its .pt2."""
    folder = tmp_path_factory.mktemp("qwen")
    config_cls, model_cls, kwargs = CASES["qwen2.5-tied-qkv-bias"]
    write_folder(folder, config_cls, model_cls, kwargs, "qwen")
    export("--checkpoint-path", folder, "--dtype", "fp32", "--max-seq-length", str(MAX_SEQ),
           "--output-aoti-package-path", folder / "model.pt2")
    return folder


@pytest.mark.parametrize("style", ["byte-level", "split-then-byte-level"])
def test_tokenizer_json_encodes_and_decodes_like_tokenizers(runner_bins, qwen, tmp_path, style):
    from tokenizers import Tokenizer

    path = qwen / "tokenizer.json"
    if style == "split-then-byte-level":
        path = tmp_path / "tokenizer.json"
        _qwen_style_tokenizer(path)
    reference = Tokenizer.from_file(str(path))
    texts = _texts()
    res = run_binary(runner_bins / "tokenizer_test", "hf", path, "encode", stdin="".join(json.dumps(t) + "\n" for t in texts))
    assert res.returncode == 0, res.stderr
    got = [[int(i) for i in line.split()] for line in res.stdout.splitlines()]
    assert got == [reference.encode(t, add_special_tokens=False).ids for t in texts]
    res = run_binary(runner_bins / "tokenizer_test", "hf", path, "decode", stdin="".join(" ".join(map(str, g)) + "\n" for g in got))
    assert [json.loads(line) for line in res.stdout.splitlines()] == texts


def _runner(bins: Path, *args) -> subprocess.CompletedProcess:
    """aoti_run with its stdout as bytes: a random model's tokens are often pieces of UTF-8 characters."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run([str(bins / "aoti_run"), *map(str, args)], capture_output=True, env=dict(env, OMP_NUM_THREADS="1"),
                          timeout=120, stdin=subprocess.DEVNULL)


def _python_greedy(folder: Path, ids: list[int], n: int, stop_ids) -> list[int]:
    import torch

    from torchchat.build import BuildSpec, ModelSource, build_model
    from torchchat.generation.engine import GenerationConfig, make_engine
    from torchchat.generation.sampling import SamplingParams

    built = build_model(BuildSpec(source=ModelSource(checkpoint_path=folder), dtype=torch.float32, max_seq_len=MAX_SEQ))
    cfg = GenerationConfig(max_new_tokens=n, sampling=SamplingParams(temperature=0), stop_ids=frozenset(stop_ids))
    out = list(make_engine(built, max_seq_len=MAX_SEQ).tokens(ids, cfg))
    return out[:-1] if out and out[-1] in stop_ids else out


def test_exported_qwen_generates_and_chats_as_python_does(runner_bins, qwen):
    from tokenizers import Tokenizer

    from torchchat.generation.chat_format import Message, resolve_chat_format
    from torchchat.tokenizer.load import load_tokenizer

    tok = load_tokenizer(qwen / "tokenizer.json")
    pieces = Tokenizer.from_file(str(qwen / "tokenizer.json")).id_to_token
    prompt = "Once upon a time"
    new = _python_greedy(qwen, tok.encode(prompt), 12, tok.stop_ids)
    res = _runner(runner_bins, qwen / "model.pt2", "-z", qwen / "tokenizer.json", "-i", prompt, "-n", "12", "-t", "0")
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout == prompt.encode() + pieces_bytes([pieces(i) for i in new]) + b"\n"
    again = _runner(runner_bins, qwen / "model.pt2", "-z", qwen / "tokenizer.json", "-l", "hf", "-i", prompt, "-n", "12",
                    "-t", "0")
    assert again.stdout == res.stdout  # -l names the kind the metadata says

    fmt = resolve_chat_format(tok).format  # the folder's ChatML template, rendered by Python
    ids = fmt.encode(tok, [Message("system", SYSTEM), Message("user", USER1)])
    reply = _python_greedy(qwen, ids, 8, fmt.stop_ids(tok))
    res = _runner(runner_bins, qwen / "model.pt2", "-z", qwen / "tokenizer.json", "-m", "chat", "-y", SYSTEM,
                  "-i", USER1, "-n", "8", "-t", "0")
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.startswith(b"Assistant: " + pieces_bytes([pieces(i) for i in reply]) + b"\n")
    assert re.search(rb"prompt tokens: (\d+)", res.stderr).group(1) == str(len(ids)).encode()
