"""The batched engine over stories260K: sequences joining and leaving at any step decode exactly as
they do alone (greedy, fp32); prefix reuse prefills only the new tokens; per-request seeds."""
import pytest
import torch

from tests.generation.runtimes import drive
from torchchat.build import BuildSpec, ModelSource, build_model
from torchchat.generation.batch import BatchEngine, Penalties, SequenceRequest, sample_rows
from torchchat.generation.engine import GenerationConfig, make_engine
from torchchat.generation.sampling import SamplingParams, sample

GREEDY = SamplingParams(temperature=0)
TEXTS = ["Once upon a time", "Lily and Tom went to the park. They", "The cat", "Tim had a red ball.",
         "One day, a little bird named Blue flew over the big green hill and saw"]
BUDGETS = [30, 12, 25, 7, 20]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a 2-core machine that other jobs keep busy, two OpenMP threads spin against each other and a
    # step takes several times longer; this tiny model gains nothing from a second thread anyway.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(stories260k_dir):
    src = ModelSource(checkpoint_path=stories260k_dir / "stories260K.bin", tokenizer_path=stories260k_dir / "tok512.model")
    return build_model(BuildSpec(source=src, dtype=torch.float32))


def serial(built, ids, n):
    engine = make_engine(built, max_seq_len=128)
    return list(engine.tokens(ids, GenerationConfig(max_new_tokens=n, sampling=GREEDY, stop_ids=frozenset())))


def test_joining_and_leaving_sequences_equal_serial_runs(built):
    tok = built.tokenizer
    prompts = [tok.encode(t, bos=True) for t in TEXTS]
    expected = [serial(built, p, n) for p, n in zip(prompts, BUDGETS)]
    engine = BatchEngine(built.runtime, max_batch=4, max_seq_len=128, prefill_chunk=16)
    reqs = [SequenceRequest(tuple(p), n) for p, n in zip(prompts, BUDGETS)]
    got, _ = drive(engine, reqs, join_at=[0, 0, 3, 5, 6])  # 5 requests, 4 slots: one waits for a free slot
    assert got == expected


def _count_prefill_forwards(engine):
    """Wrap the engine's last-position forward (every prompt chunk here takes it): returns the list of
    the batch sizes it was called with."""
    calls = []
    inner = engine.steps.forward_last

    def counted(tokens, pos, **kw):
        calls.append(tokens.size(0))
        return inner(tokens, pos, **kw)

    engine.steps.forward_last = counted
    return calls


def test_prompts_joining_together_share_one_prefill_forward(built):
    tok = built.tokenizer
    texts = ["Once upon a time", "Tim had a red ball.", "The cat sat", "Lily and Tom went"]
    prompts = [tok.encode(t, bos=True) for t in texts]
    assert len({len(p) for p in prompts}) > 1  # different lengths: the shorter ones are padded
    expected = [serial(built, p, 15) for p in prompts]
    engine = BatchEngine(built.runtime, max_batch=4, max_seq_len=128)
    calls = _count_prefill_forwards(engine)
    got, _ = drive(engine, [SequenceRequest(tuple(p), 15) for p in prompts], [0, 0, 0, 0])
    assert got == expected
    assert calls == [4]


def test_joint_prefill_skips_a_busy_row_and_long_padding(built):
    tok = built.tokenizer
    short, other = tok.encode("The cat", bos=True), tok.encode("Tim had a red ball.", bos=True)
    long_ = tok.encode("One day, a little bird named Blue flew over the big green hill and saw", bos=True)
    reqs = [SequenceRequest(tuple(p), 12) for p in (other, short, long_, short)]
    expected = [serial(built, r.prompt_ids, 12) for r in reqs]
    engine = BatchEngine(built.runtime, max_batch=4, max_seq_len=128)
    calls = _count_prefill_forwards(engine)
    # Request 0 takes slot 0 and decodes; at step 1 requests 1-3 take slots 1, 2, 3 together. The short
    # prompts (4 ids) padded to the long one (29) would be mostly padding: three forwards.
    got, _ = drive(engine, reqs, [0, 1, 1, 1])
    assert got == expected
    assert calls == [1, 1, 1, 1]
    # Two prompts of similar length in neighbouring rows, next to a busy one, do share a forward.
    engine = BatchEngine(built.runtime, max_batch=4, max_seq_len=128)
    calls = _count_prefill_forwards(engine)
    reqs = [SequenceRequest(tuple(p), 12) for p in (long_, other, short)]
    got, _ = drive(engine, reqs, [0, 1, 1])
    assert got == [serial(built, r.prompt_ids, 12) for r in reqs]
    assert calls == [1, 2]


def test_prefix_reuse_prefills_only_the_new_tokens(built):
    tok = built.tokenizer
    engine = BatchEngine(built.runtime, max_batch=2, max_seq_len=128)
    first = tok.encode("Once upon a time", bos=True)
    (reply,), _ = drive(engine, [SequenceRequest(tuple(first), 10)], [0])
    before = engine.prefilled_tokens
    # The next turn: the whole conversation so far plus new text.
    turn = first + reply + tok.encode(" Then they", bos=False)
    (out,), seqs = drive(engine, [SequenceRequest(tuple(turn), 10)], [0])
    # The first prompt and all but the last reply token were in the cache already.
    assert seqs[0].cached_tokens == len(first) + len(reply) - 1
    assert engine.prefilled_tokens - before == len(turn) - seqs[0].cached_tokens
    assert out == serial(built, turn, 10)


def test_seeded_sampling_ignores_batch_neighbours(built):
    tok = built.tokenizer
    p = tuple(tok.encode("The cat", bos=True))
    hot = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
    alone, _ = drive(BatchEngine(built.runtime, max_batch=3, max_seq_len=128),
                   [SequenceRequest(p, 20, hot, seed=7)], [0])
    crowd, _ = drive(BatchEngine(built.runtime, max_batch=3, max_seq_len=128),
                   [SequenceRequest(p, 20, hot, seed=1), SequenceRequest(p, 20, hot, seed=7),
                    SequenceRequest(p, 20, GREEDY)], [0, 1, 0])
    assert crowd[1] == alone[0] and crowd[0] != alone[0]


def test_sample_rows_matches_sample_row_by_row():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0.7, top_k=5), GREEDY, SamplingParams(temperature=1.0, top_p=0.5)]
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    got = sample_rows(logits, params, gens)
    for i, p in enumerate(params):
        torch.manual_seed(i)
        assert int(got[i]) == int(sample(logits[i : i + 1], p)[0])


def test_penalties_and_bias_change_the_greedy_choice(built):
    tok = built.tokenizer
    p = tuple(tok.encode("Once upon a time", bos=True))
    (plain,), _ = drive(BatchEngine(built.runtime, 1, 128), [SequenceRequest(p, 30)], [0])
    (banned,), _ = drive(BatchEngine(built.runtime, 1, 128),
                       [SequenceRequest(p, 30, logit_bias={plain[0]: -100.0})], [0])
    assert banned[0] != plain[0]
    (penal,), _ = drive(BatchEngine(built.runtime, 1, 128),
                      [SequenceRequest(p, 30, penalties=Penalties(frequency=2.0))], [0])
    assert len(set(penal)) > len(set(plain))


def test_prompt_logprobs_across_prefill_chunks(built):
    tok = built.tokenizer
    ids = tok.encode("Once upon a time, there was a little girl named Lily.", bos=True)
    engine = BatchEngine(built.runtime, max_batch=2, max_seq_len=128, prefill_chunk=3)
    (_,), seqs = drive(engine, [SequenceRequest(tuple(ids), 1, top_logprobs=2, prompt_logprobs=True)], [0])
    got = seqs[0].prompt_logprobs
    built.runtime.setup(1, 128)
    with torch.no_grad():
        ref = torch.log_softmax(built.runtime.forward(torch.tensor([ids]), torch.arange(len(ids)))[0], -1)
    assert got[0] is None and len(got) == len(ids)
    for i in range(1, len(ids)):
        assert got[i].logprob == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)
        assert got[i].top[0][0] == int(ref[i - 1].argmax())
