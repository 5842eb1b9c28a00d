"""The lm-eval adapter on stories260K: each request type against a computation by hand with the runtime
and the engine."""
from __future__ import annotations

import math

import pytest

from tests.evaluation.reference import continuation_logprob, token_logprobs
from torchchat.errors import UserInputError

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402

from torchchat.evaluation.adapter import TorchchatLM  # noqa: E402

STORY = (
    "Tom had a little red boat. Every morning he took it to the pond and watched it float. One day the wind "
    "pushed the boat far away. Tom ran around the pond, and a friendly duck pushed the boat back to him."
)


def _req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_rolling_loglikelihood_of_a_short_text_is_one_forward_summed_by_hand(stories):
    lm = TorchchatLM(stories.runtime, stories.tokenizer, max_length=256, batch_size=2)
    got = lm.loglikelihood_rolling([_req("loglikelihood_rolling", t) for t in (STORY, "Once upon a time")])
    tok = stories.tokenizer
    for text, value in zip((STORY, "Once upon a time"), got):
        want = float(token_logprobs(stories.runtime, tok.encode(text, bos=True)).sum())
        assert value == pytest.approx(want, abs=1e-3)
    assert math.isfinite(got[0]) and got[0] < 0


def test_rolling_windows_predict_each_token_once_with_the_documented_context(stories):
    """max_length 16: the first window sees BOS + the text, later ones are disjoint blocks of 16 predictions,
    the last one with a full 16-token input (lm-eval's loglikelihood_rolling contract)."""
    L = 16
    tok = stories.tokenizer
    ids = tok.encode(STORY)
    n = len(ids)
    assert n > 3 * L
    seq = [tok.bos_id, *ids]  # ids[j] is seq[j + 1]
    want = 0.0
    for s in range(0, n, L):  # predictions ids[s:e] share one input
        e = min(s + L, n)
        start = 0 if s == 0 else e - L  # in seq: the L ids before seq[e]
        lp = token_logprobs(stories.runtime, seq[start : e + 1])  # predicts seq[start+1 : e+1]
        want += float(lp[s - start :].sum())
    lm = TorchchatLM(stories.runtime, stories.tokenizer, max_length=L, batch_size=3)
    (got,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", STORY)])
    assert got == pytest.approx(want, abs=1e-3)


def test_loglikelihood_matches_hand_computation_and_batching_changes_nothing(stories):
    pairs = [
        ("Lily was thirsty, so she drank a glass of", " water"),
        ("Lily was thirsty, so she drank a glass of", " sand"),
        ("The cat climbed up the tree and could not get", " down"),
        ("Once upon a time, there was a", " little girl named Lily"),
        ("", "Once upon a time"),
    ]
    reqs = [_req("loglikelihood", c, x) for c, x in pairs]
    one, four = (TorchchatLM(stories.runtime, stories.tokenizer, max_length=128, batch_size=b).loglikelihood(reqs)
                 for b in (1, 4))
    tok = stories.tokenizer
    for (ctx, cont), (lp1, g1), (lp4, g4) in zip(pairs, one, four):
        assert lp4 == pytest.approx(lp1, abs=1e-4) and g4 == g1
        if ctx:
            want = continuation_logprob(stories.runtime, tok, ctx, cont)
        else:  # an empty context is BOS
            want = float(token_logprobs(stories.runtime, tok.encode(cont, bos=True)).sum())
        assert lp1 == pytest.approx(want, abs=1e-3)
    assert one[0][0] > one[1][0]  # water beats sand


def _hf_backend_answer(stories, prompt: str, n: int, until: list[str]) -> str:
    """What lm-eval's `hf` backend returns for a greedy generate_until request: the generated tokens after
    the context decoded on their own (`tok_decode(cont_toks[context_len:])`), then cut with lm-eval's own
    stop handling (`handle_stop_sequences` adds the decoded EOS, `postprocess_generated_text` splits)."""
    from lm_eval.models.utils import handle_stop_sequences, postprocess_generated_text

    tok = stories.tokenizer
    eos = tok.decode([tok.eos_id])  # "" for SentencePiece: a control piece (the hf backend skips "")
    return postprocess_generated_text(_continuation(stories, prompt, n), handle_stop_sequences(list(until), eos=eos), None)


_CONTINUATIONS: dict[tuple[str, int], str] = {}  # one greedy run per (prompt, n) for the whole module


def _continuation(stories, prompt: str, n: int) -> str:
    """The engine's n greedy tokens after BOS + prompt (stop tokens left out), decoded on their own."""
    from torchchat.generation.engine import GenerationConfig, make_engine
    from torchchat.generation.sampling import SamplingParams

    if (prompt, n) not in _CONTINUATIONS:
        tok = stories.tokenizer
        engine = make_engine(stories, max_seq_len=128)
        cfg = GenerationConfig(max_new_tokens=n, sampling=SamplingParams(temperature=0.0, top_k=None))
        cont = [t for t in engine.tokens(tok.encode(prompt, bos=True), cfg) if t not in tok.stop_ids]
        _CONTINUATIONS[prompt, n] = tok.decode(cont)
    return _CONTINUATIONS[prompt, n]


def test_generate_until_stops_at_the_first_stop_string(stories):
    prompts = [
        "Once upon a time, there was a little girl named Lily. She",
        "Tom had a red ball. He liked to play with his ball every day. One day",
        "The sun was hot, so the children went to the",
    ]
    stops = [".", ",", "!"]
    lm = TorchchatLM(stories.runtime, stories.tokenizer, max_length=128, batch_size=4)
    options = {"until": stops, "max_gen_toks": 40, "do_sample": False}
    got = lm.generate_until([_req("generate_until", p, options) for p in prompts])
    cut_somewhere = False
    for prompt, text in zip(prompts, got):
        assert text == _hf_backend_answer(stories, prompt, 40, stops)
        assert not any(s in text for s in stops)
        cut_somewhere |= len(text) < len(_hf_backend_answer(stories, prompt, 40, []))
    assert cut_somewhere  # a stop string really ended some generation early


def test_generate_until_answers_do_not_start_with_the_joining_space(stories):
    """Decoded after the prompt, SentencePiece's first piece ("▁went") would give " went": an exact-match
    task that does not strip whitespace scored 0 that way where the hf backend scores the same weights
    correctly (issue 14). The answer is the continuation decoded alone, as the hf backend does."""
    prompts = ["The sun was hot, so the children went to the", "Once upon a time, there was a"]
    lm = TorchchatLM(stories.runtime, stories.tokenizer, max_length=128)
    got = lm.generate_until([_req("generate_until", p, {"until": ["."], "max_gen_toks": 8}) for p in prompts])
    for prompt, text in zip(prompts, got):
        assert text and not text.startswith(" "), text
        assert text == _hf_backend_answer(stories, prompt, 8, ["."])


def test_generate_until_honours_max_gen_toks(stories):
    prompt = "Once upon a time"
    lm = TorchchatLM(stories.runtime, stories.tokenizer, max_length=128)
    (text,) = lm.generate_until([_req("generate_until", prompt, {"until": [], "max_gen_toks": 6})])
    assert text == _hf_backend_answer(stories, prompt, 6, [])
    assert len(stories.tokenizer.encode(text)) <= 7  # 6 tokens; re-encoding may merge or split one


def test_generation_options_the_engine_lacks_are_refused(stories):
    lm = TorchchatLM(stories.runtime, stories.tokenizer, max_length=128)
    with pytest.raises(UserInputError, match="num_beams"):
        lm.generate_until([_req("generate_until", "Hi", {"until": ["."], "num_beams": 4})])


@pytest.mark.slow  # one torch.compile: ~25 s on an idle 2-core machine, minutes on a busy one
def test_compiled_forward_scores_what_eager_does(stories):
    """eval --compile: the forward is torch.compile'd (dynamic shapes) and scores as the eager one does.
    Both requests go in one padded batch: one compile."""
    reqs = [_req("loglikelihood", c, x) for c, x in (("Lily was thirsty, so she drank a glass of", " water"),
                                                      ("The cat climbed up the tree", " and could not get down"))]
    eager = TorchchatLM(stories.runtime, stories.tokenizer, max_length=64, batch_size=2)
    compiled = TorchchatLM(stories.runtime, stories.tokenizer, max_length=64, batch_size=2, compile=True)
    for (lp_e, g_e), (lp_c, g_c) in zip(eager.loglikelihood(reqs), compiled.loglikelihood(reqs)):
        assert lp_c == pytest.approx(lp_e, abs=1e-3) and g_c == g_e
    assert len(compiled.timer.seconds) == 1
