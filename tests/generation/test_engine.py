"""The engine over a real model (stories260K) and its tokenizer."""
import pytest
import torch

from torchchat.build import BuildSpec, ModelSource, build_model
from torchchat.errors import ContextLengthError
from torchchat.generation.engine import GenerationConfig, make_engine
from torchchat.generation.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def built(stories260k_dir):
    src = ModelSource(checkpoint_path=stories260k_dir / "stories260K.bin", tokenizer_path=stories260k_dir / "tok512.model")
    return build_model(BuildSpec(source=src, dtype=torch.float32))


def test_streamed_text_is_the_decoded_continuation(built):
    engine = make_engine(built, max_seq_len=128)
    tok = built.tokenizer
    prompt = tok.encode("Once upon a time", bos=True)
    records = list(engine.stream(prompt, GenerationConfig(max_new_tokens=40, sampling=GREEDY)))
    ids = [r.token for r in records if r.token is not None]
    text = "".join(r.text for r in records)
    assert text == tok.decode(prompt + ids)[len(tok.decode(prompt)) :]
    last = records[-1]
    assert last.finish_reason == "length" and last.stats.generated_tokens == 40 == len(ids)
    assert engine.position == len(prompt) + 39  # the last sampled token is not yet in the cache


def test_stop_token_ends_generation_and_is_not_rendered(built):
    engine = make_engine(built, max_seq_len=128)
    prompt = built.tokenizer.encode("Once upon a time", bos=True)
    first = next(iter(engine.tokens(prompt, GenerationConfig(max_new_tokens=5, sampling=GREEDY))))
    cfg = GenerationConfig(max_new_tokens=5, sampling=GREEDY, stop_ids=frozenset({first}))
    records = list(engine.stream(prompt, cfg))
    assert [r.token for r in records] == [None]
    assert records[-1].finish_reason == "stop" and records[-1].text == ""


def test_generation_stops_when_the_context_is_full(built):
    engine = make_engine(built, max_seq_len=16)
    prompt = built.tokenizer.encode("Once upon a time", bos=True)
    ids = list(engine.tokens(prompt, GenerationConfig(max_new_tokens=100, sampling=GREEDY, stop_ids=frozenset())))
    assert len(ids) == 16 - len(prompt)
    with pytest.raises(ContextLengthError, match="context holds 16"):
        list(engine.tokens(list(range(3, 19)), GenerationConfig(max_new_tokens=1)))


def test_sequential_prefill_gives_the_same_tokens(built):
    prompt = built.tokenizer.encode("The dog ran to the park", bos=True)
    cfg = GenerationConfig(max_new_tokens=30, sampling=GREEDY)
    parallel = list(make_engine(built, max_seq_len=64).tokens(prompt, cfg))
    sequential_engine = make_engine(built, max_seq_len=64, parallel_prefill=False)
    sequential = list(sequential_engine.tokens(prompt, cfg))
    assert parallel == sequential
    assert not sequential_engine.last_stats.prefill_parallel


def test_continuation_keeps_its_leading_space(built):
    """SentencePiece drops a piece's leading space at the start of a decode; streaming after a prompt
    must not (the prompt ends "time", the continuation must start " there", not "there")."""
    engine = make_engine(built, max_seq_len=64)
    tok = built.tokenizer
    prompt = tok.encode("Once upon a time,", bos=True)
    text = "".join(r.text for r in engine.stream(prompt, GenerationConfig(max_new_tokens=3, sampling=GREEDY)))
    assert text.startswith(" ") and text == tok.decode(prompt + tok.encode(text))[len(tok.decode(prompt)):]
