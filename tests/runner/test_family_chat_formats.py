"""The C++ runners' chat formats of Llama's relatives (chatml, gemma, phi3; runner/chat_format.cpp) give the
ids the Python chat command gives when it renders the family's Hugging Face chat template
(tests/checkpoint/hf_family_folders.py, shortened from the published ones), turn by turn, with a small
SentencePiece vocabulary whose control pieces are the families' special tokens."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from runner_process import run_binary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checkpoint"))
from hf_family_folders import CHATML, CORPUS, GEMMA, PHI  # noqa: E402
from test_tokenizers import REPLY, SYSTEM, USER1, USER2, chat_turn_ids  # noqa: E402

pytestmark = pytest.mark.slow  # needs the C++ build

SPECIALS = ["<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<|system|>", "<|user|>",
            "<|assistant|>", "<|end|>"]
TEMPLATES = {"chatml": CHATML, "gemma": GEMMA, "phi3": PHI}


@pytest.fixture(scope="module")
def spm(tmp_path_factory) -> Path:
    """A SentencePiece model (BPE, byte fallback, text kept as written) with the special tokens as control pieces."""
    sentencepiece = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4 + [SYSTEM, USER1, REPLY, USER2]), model_writer=model, model_type="bpe",
        vocab_size=400, hard_vocab_limit=False, byte_fallback=True, control_symbols=SPECIALS,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "families.model"
    path.write_bytes(model.getvalue())
    return path


@pytest.mark.parametrize("fmt", list(TEMPLATES))
def test_family_chat_turns_match_the_python_rendered_template(runner_bins, spm, fmt):
    from torchchat.generation.chat_format import HFTemplateFormat, Message, runner_format, token_text
    from torchchat.tokenizer.load import load_tokenizer

    tok = load_tokenizer(spm)
    assert runner_format(None, TEMPLATES[fmt]) == fmt  # what export writes for such a model
    python = HFTemplateFormat(TEMPLATES[fmt], token_text(tok, tok.bos_id), token_text(tok, tok.eos_id))

    def ids(*messages):
        return python.encode(tok, [Message(role, content) for role, content in messages])

    first, second = chat_turn_ids(runner_bins, "sentencepiece", spm, fmt,
                                  [{"system": SYSTEM, "user": USER1}, {"user": USER2}])
    assert first == ids(("system", SYSTEM), ("user", USER1))
    # The reply's tokens sit between the turns in the KV cache; the next turn starts with the token that
    # closes the reply (sampled as a stop token, so not yet in the cache).
    whole = ids(("system", SYSTEM), ("user", USER1), ("assistant", REPLY), ("user", USER2))
    reply = tok.encode(REPLY.strip() if fmt == "gemma" else REPLY)  # Gemma's template trims every message
    assert first + reply + second == whole
    (no_system,) = chat_turn_ids(runner_bins, "sentencepiece", spm, fmt, [{"user": USER1}])
    assert no_system == ids(("user", USER1))


def test_a_jinja_template_the_runner_cannot_render_names_the_flag(runner_bins, spm):
    res = run_binary(runner_bins / "tokenizer_test", "sentencepiece", spm, "chat-hf", stdin="")
    assert res.returncode == 2
    assert res.stderr.strip() == ("error: the model's chat template is a Hugging Face Jinja template the runners "
                                  "cannot render; name the format with -f llama2|llama3|chatml|gemma|phi3")


def test_a_format_whose_tokens_the_tokenizer_lacks_is_one_line(runner_bins, stories260k_dir):
    res = run_binary(runner_bins / "tokenizer_test", "sentencepiece", stories260k_dir / "tok512.model", "chat-chatml",
                     stdin="")
    assert res.returncode == 2
    assert res.stderr.strip() == "error: the tokenizer has no <|im_start|> token; pass the model's own tokenizer"
