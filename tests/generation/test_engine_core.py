"""Engine as the one-slot face of the batched engine's core (stories260K, fp32): batched samples equal
serial runs with the same seeds, sampling draws from the process's generator exactly as a plain
forward-and-sample loop does, a stream closed early frees its slot, a prompt may continue kept cache
positions, and speculative decoding stays one slot."""
import pytest
import torch

from tests.generation.runtimes import stories_runtime
from torchchat.errors import UserInputError
from torchchat.generation.batch import SequenceRequest
from torchchat.generation.engine import Engine, GenerationConfig
from torchchat.generation.sampling import SamplingParams, sample
from torchchat.generation.steps import Steps

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
PROMPT = [1, 403, 407, 261, 378]  # BOS "Once upon a time"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runtime(stories260k_dir):
    return stories_runtime(stories260k_dir)


@pytest.fixture(scope="module")
def engine_of(runtime, stories260k_dir):
    """engine_of(slots=1) -> a fresh Engine over the shared stories260K runtime."""
    from torchchat.tokenizer.load import load_tokenizer

    tok = load_tokenizer(stories260k_dir / "tok512.model")
    return lambda slots=1: Engine(runtime, tok, Steps(runtime.forward, runtime.device), 128, slots=slots)


def _cfg(n, sampling=SAMPLED):
    return GenerationConfig(max_new_tokens=n, sampling=sampling, stop_ids=frozenset())


def _serial(engine_of, seed, n, sampling=SAMPLED):
    engine = engine_of()
    engine.generator.manual_seed(seed)
    return list(engine.tokens(PROMPT, _cfg(n, sampling)))


def _batch(engine, seeds, n, sampling=SAMPLED):
    out = {i: [] for i in range(len(seeds))}
    stats = {}
    for i, r in engine.samples(PROMPT, _cfg(n, sampling), seeds):
        if r.token is not None:
            out[i].append(r.token)
        if r.stats is not None:
            stats[i] = r.stats
    return [out[i] for i in range(len(seeds))], stats


def test_batched_samples_equal_serial_runs_with_their_seeds(engine_of):
    seeds = [11, 12, 13, 14]
    got, stats = _batch(engine_of(4), seeds, 30)
    expected = [_serial(engine_of, s, 30) for s in seeds]
    assert got == expected
    assert len({tuple(t) for t in got}) > 1  # different seeds, different texts
    assert all(stats[i].generated_tokens == 30 and stats[i].prompt_tokens == len(PROMPT) for i in range(4))


def test_greedy_batch_equals_greedy_alone(engine_of):
    got, _ = _batch(engine_of(3), [None, None, None], 40, GREEDY)
    alone = list(engine_of().tokens(PROMPT, _cfg(40, GREEDY)))
    assert got == [alone] * 3


def test_sampling_draws_from_the_process_generator_as_a_plain_loop_does(engine_of, runtime):
    """The one-slot engine samples exactly as forward + torchchat.generation.sampling.sample with the
    process's random generator (what the single-sequence engine did before it became the core's face)."""
    torch.manual_seed(7)
    got = list(engine_of().tokens(PROMPT, _cfg(25)))

    torch.manual_seed(7)
    runtime.setup(1, 128)
    with torch.no_grad():
        logits = runtime.forward(torch.tensor([PROMPT]), torch.arange(len(PROMPT)))
        expected = [int(sample(logits[:, -1], SAMPLED))]
        for _ in range(24):
            pos = torch.tensor([len(PROMPT) + len(expected) - 1])
            logits = runtime.forward(torch.tensor([[expected[-1]]]), pos)
            expected.append(int(sample(logits[:, -1], SAMPLED)))
    assert got == expected


def test_a_request_generator_gives_what_the_process_generator_gives(engine_of):
    """A one-slot engine decoding with a request's own generator (the noise handed to the fused step)
    draws the same tokens as with the process's generator seeded alike (drawn inside the step)."""
    engine = engine_of()
    generator = torch.Generator().manual_seed(5)
    seq = engine.core.add(SequenceRequest(tuple(PROMPT), 25, SAMPLED), generator=generator)
    own = []
    while not seq.done:
        own += [o.token for o in engine.core.step()]
    assert own == _serial(engine_of, 5, 25)


def test_closing_a_stream_early_frees_the_slot(engine_of):
    engine = engine_of()
    stream = engine.tokens(PROMPT, _cfg(30, GREEDY))
    first = [next(stream) for _ in range(3)]
    stream.close()
    assert engine.core.free_slots() == 1
    again = list(engine.tokens(PROMPT, _cfg(30, GREEDY)))
    assert again[:3] == first and len(again) == 30


def test_a_prompt_continues_after_kept_positions(engine_of):
    """tokens(..., start_pos): the cache's first start_pos positions are kept as the last call left them."""
    engine = engine_of()
    reply = list(engine.tokens(PROMPT, _cfg(10, GREEDY)))
    turn2 = [reply[-1], 261, 378]  # the reply's last token was never fed
    held = len(PROMPT) + len(reply) - 1
    cont = list(engine.tokens(turn2, _cfg(15, GREEDY), start_pos=held))
    assert engine.last_stats.cached_tokens == held and engine.last_stats.prompt_tokens == len(turn2)
    fresh = list(engine_of().tokens(PROMPT + reply + [261, 378], _cfg(15, GREEDY)))
    assert cont == fresh


def test_chat_style_reuse_prefills_only_the_new_tokens(engine_of):
    engine = engine_of()
    reply = list(engine.tokens(PROMPT, _cfg(10, GREEDY)))
    longer = PROMPT + reply + [261]
    out = list(engine.tokens(longer, _cfg(10, GREEDY), reuse_prefix=True))
    assert engine.last_stats.cached_tokens == len(PROMPT) + len(reply) - 1
    assert engine.last_stats.prompt_tokens == 2
    assert out == list(engine_of().tokens(longer, _cfg(10, GREEDY)))


def test_speculative_decoding_needs_one_slot(engine_of, stories260k_dir):
    with pytest.raises(UserInputError, match="one slot"):
        engine_of(2).attach_draft(stories_runtime(stories260k_dir), 3)


def test_speculative_sampling_follows_the_engine_generator(engine_of, stories260k_dir):
    engine = engine_of()
    engine.attach_draft(stories_runtime(stories260k_dir), 3)
    runs = []
    for _ in range(2):
        engine.generator.manual_seed(9)
        runs.append(list(engine.tokens(PROMPT, _cfg(30))))
    assert runs[0] == runs[1] and len(runs[0]) == 30
    assert engine.last_stats.draft_proposed > 0


def test_sequential_prefill_runs_through_the_one_compiled_decode_step(engine_of, runtime, monkeypatch):
    """--sequential-prefill --compile: the prompt goes through the same fused decode step as the
    decode loop, so one step is compiled, not a second one for the prompt."""
    from torchchat.generation.steps import CompileOptions

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or fn)
    tok = engine_of().tokenizer
    steps = Steps(runtime.forward, runtime.device, CompileOptions(decode=True))
    engine = Engine(runtime, tok, steps, 128, parallel_prefill=False)
    got = list(engine.tokens(PROMPT, _cfg(20, GREEDY)))
    assert len(compiled) == 1 and not engine.last_stats.prefill_parallel
    assert got == list(engine_of().tokens(PROMPT, _cfg(20, GREEDY)))
