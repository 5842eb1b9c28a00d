"""Several choices of one request (`n` > 1, a batch of completion prompts) as jobs run together on the
worker, which batches them like separate requests: collected whole, or merged into one stream."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

from torchchat.server.worker import Delta, Finished, Job, ModelWorker, TokenInfo


@dataclass
class Collected:
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finished: Finished | None = None


async def collect_all(worker: ModelWorker, jobs: Sequence[Job]) -> list[Collected]:
    """Run every job to its end; a job's failure is raised (the others are then cancelled)."""

    async def one(job: Job) -> Collected:
        out, parts = Collected(), []
        async for item in worker.run(job):
            if isinstance(item, Delta):
                parts.append(item.text)
                out.tokens.extend(item.tokens)
            else:
                out.finished = item
        out.text = "".join(parts)
        if out.finished is None:
            raise RuntimeError("the worker ended without a Finished record")
        return out

    tasks = [asyncio.ensure_future(one(j)) for j in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()


async def merged(worker: ModelWorker, jobs: Sequence[Job]) -> AsyncIterator[tuple[int, Delta | Finished]]:
    """(job index, item) from every job as they come. Ends after every job's Finished; a failure is
    raised. Closing the iterator cancels the jobs still running."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, job: Job) -> None:
        try:
            async for item in worker.run(job):
                await queue.put((i, item))
        except Exception as e:  # re-raised by the consumer
            await queue.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, j)) for i, j in enumerate(jobs)]
    try:
        left = len(jobs)
        while left:
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            yield i, item
            if isinstance(item, Finished):
                left -= 1
    finally:
        for t in tasks:
            t.cancel()
