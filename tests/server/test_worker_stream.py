"""The model worker's stream to one request (ModelWorker.run), in process over stories260K: a consumer
that falls behind gets the tokens that piled up as one Delta, and the text is the same as read token by
token."""
import asyncio

import pytest
import torch

from torchchat.build import BuildSpec, ModelSource, build_model
from torchchat.generation.batch import BatchEngine
from torchchat.generation.engine import GenerationConfig
from torchchat.generation.sampling import SamplingParams
from torchchat.server.worker import Delta, Finished, Job, ModelWorker


@pytest.fixture(scope="module")
def built(stories260k_dir):
    src = ModelSource(checkpoint_path=stories260k_dir / "stories260K.bin", tokenizer_path=stories260k_dir / "tok512.model")
    return build_model(BuildSpec(source=src, dtype=torch.float32))


def _read(worker: ModelWorker, job: Job, pause_after_first: float) -> list:
    async def go():
        items = []
        async for item in worker.run(job):
            items.append(item)
            if len(items) == 1:
                await asyncio.sleep(pause_after_first)  # the model runs on meanwhile
        return items

    return asyncio.run(go())


def test_a_slow_reader_gets_piled_up_tokens_as_one_delta(built):
    tok = built.tokenizer
    job = Job(tok.encode("Once upon a time", bos=True),
              GenerationConfig(max_new_tokens=40, sampling=SamplingParams(temperature=0), stop_ids=frozenset()))
    worker = ModelWorker(BatchEngine(built.runtime, max_batch=2, max_seq_len=128), tok)
    try:
        prompt = tuple(job.prompt_ids)
        eager = _read(worker, job, 0.0)
        slow = _read(worker, job, 2.0)  # 40 tokens of stories260K take well under a second
    finally:
        worker.close()
    for items in (eager, slow):
        assert isinstance(items[-1], Finished) and items[-1].completion_tokens == 40
        assert all(isinstance(i, Delta) for i in items[:-1])
    text = "".join(i.text for i in eager[:-1])
    assert "".join(i.text for i in slow[:-1]) == text
    assert text == tok.decode(list(prompt) + _ids(built, prompt, 40))[len(tok.decode(list(prompt))):]
    # Everything after the first read arrived while the reader slept: one Delta, then Finished.
    assert len(slow) <= 3 < len(eager)


def _ids(built, prompt, n):
    from torchchat.generation.engine import make_engine

    engine = make_engine(built, max_seq_len=128)
    return list(engine.tokens(list(prompt), GenerationConfig(max_new_tokens=n, sampling=SamplingParams(temperature=0),
                                                             stop_ids=frozenset())))
