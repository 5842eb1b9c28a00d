"""The OpenAI API surface beyond plain generation, through the real `openai` client: logprobs, echo,
penalties, logit_bias, n > 1, many stop strings, cached prompt tokens and /metrics."""
from __future__ import annotations

import math
import urllib.request

import pytest
import torch

from tests.conftest import shared_path

openai = pytest.importorskip("openai", reason="the openai client is in the test extra: pip install -e '.[test]'")

STORY = "Once upon a time"


@pytest.fixture(scope="module")
def model():
    """stories260K in this process, for reference logprobs."""
    from torchchat.build import BuildSpec, ModelSource, build_model

    folder = shared_path("models", "stories260K")
    src = ModelSource(checkpoint_path=folder / "stories260K.bin", tokenizer_path=folder / "tok512.model")
    return build_model(BuildSpec(source=src, dtype=torch.float32))


def chat(client, **kw):
    kw.setdefault("messages", [{"role": "user", "content": STORY}])
    return client.chat.completions.create(model="x", **kw)


def test_chat_logprobs_and_top_logprobs(client):
    out = chat(client, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    choice = out.choices[0]
    content = choice.logprobs.content
    assert len(content) == 12
    assert "".join(c.token for c in content) == choice.message.content
    for c in content:
        assert len(c.top_logprobs) == 3 and c.logprob <= 0
        assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)
        assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == c.logprob  # greedy
        assert bytes(c.bytes).decode() == c.token
    assert chat(client, max_tokens=3).choices[0].logprobs is None


def test_completion_echo_logprobs_equal_the_models(client, model):
    # What lm-eval's local-completions backend sends to score a continuation.
    tok = model.tokenizer
    ids = tok.encode("Once upon a time, there was a little girl", bos=True)
    out = client.completions.create(model="x", prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    model.runtime.setup(1, 64)
    with torch.no_grad():
        ref = torch.log_softmax(model.runtime.forward(torch.tensor([ids]), torch.arange(len(ids)))[0], -1)
    expected = [float(ref[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    # The generated token is the greedy one, its logprob the best of its top-1.
    assert lp.token_logprobs[-1] == pytest.approx(float(ref[-1].max()), abs=1e-4)
    assert max(lp.top_logprobs[-1].values()) == lp.token_logprobs[-1]


def test_completion_prompt_batch_and_n(client):
    prompts = ["Once upon a time", "The cat"]
    out = client.completions.create(model="x", prompt=prompts, max_tokens=8, temperature=1.0, n=2, seed=11)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    alone = [client.completions.create(model="x", prompt=p, max_tokens=8, temperature=1.0, seed=11 + i)
             .choices[0].text for p in prompts for i in range(2)]
    assert [c.text for c in out.choices] == alone  # choice i of a prompt samples with seed + i
    assert out.usage.completion_tokens == 32


def test_chat_n_streamed_equals_not_streamed(client):
    kw = dict(max_tokens=15, temperature=1.0, n=3, seed=5)
    whole = chat(client, **kw)
    assert len({c.message.content for c in whole.choices}) > 1
    parts = ["", "", ""]
    finished = set()
    for chunk in chat(client, stream=True, **kw):
        for c in chunk.choices:
            parts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert parts == [c.message.content for c in whole.choices] and finished == {0, 1, 2}


def test_penalties_and_logit_bias(client, model):
    def complete(max_tokens=40, **kw):
        return client.completions.create(model="x", prompt=[1], max_tokens=max_tokens, temperature=0, logprobs=0,
                                         **kw).choices[0]

    plain = complete()
    repeated = len(plain.logprobs.tokens) - len(set(plain.logprobs.tokens))
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra_body": {"repetition_penalty": 3.0}}):
        out = complete(**kw)
        assert len(out.logprobs.tokens) - len(set(out.logprobs.tokens)) < repeated, kw
    # Ban the greedy first token (the model's argmax after BOS): another one comes first.
    model.runtime.setup(1, 64)
    with torch.no_grad():
        first = int(model.runtime.forward(torch.tensor([[1]]), torch.arange(1))[0, -1].argmax())
    assert complete(max_tokens=1, logit_bias={str(first): -100}).logprobs.tokens[0] != plain.logprobs.tokens[0]
    # A +100 bias makes a token near certain.
    forced = complete(max_tokens=3, logit_bias={"100": 100})
    assert forced.logprobs.token_logprobs == pytest.approx([0.0] * 3, abs=1e-3)


def test_six_stop_strings(client):
    plain = chat(client, max_tokens=40, temperature=0).choices[0].message.content
    word = plain.split()[3]
    stops = ["\n\n", "Question:", "###", "zzz", "qqq", word]
    out = chat(client, max_tokens=40, temperature=0, stop=stops).choices[0]
    assert out.finish_reason == "stop" and out.message.content == plain[: plain.index(word)]


def test_chat_turns_reuse_the_cached_prompt(client):
    first = chat(client, max_tokens=10, temperature=0)
    history = [{"role": "user", "content": STORY}, {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "The end."}]
    second = chat(client, messages=history, max_tokens=10, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens
    # The same conversation again gives the same reply (the cache only skips work).
    assert chat(client, messages=history, max_tokens=10, temperature=0).choices[0].message.content == \
        second.choices[0].message.content


def test_metrics_in_prometheus_format(api_server, client):
    chat(client, max_tokens=3)
    with urllib.request.urlopen(api_server.base_url + "/metrics", timeout=10) as r:
        assert r.headers["content-type"].startswith("text/plain")
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    for name in ("torchchat_queue_requests", "torchchat_active_slots", "torchchat_tokens_per_second",
                 "torchchat_max_slots"):
        assert name in values
    assert values["torchchat_generated_tokens_total"] >= 3
    assert values["torchchat_time_to_first_token_seconds_count"] >= 1
    assert values['torchchat_time_to_first_token_seconds_bucket{le="+Inf"}'] == \
        values["torchchat_time_to_first_token_seconds_count"]
    assert not math.isnan(values["torchchat_time_to_first_token_seconds_sum"])
