"""Runs generation requests one at a time on one Engine, in one worker thread.

The engine has a single KV cache, so requests queue: the worker is a one-thread executor and jobs run
in arrival order, never interleaved. Generation happens off the event loop, which stays free to accept
requests and notice disconnects; text reaches the loop through an asyncio.Queue. Cancelling a job (the
client went away, or its async iterator was closed) stops it at the next token, or before it starts if
it is still queued."""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import torch

from torchchat.generation.engine import Engine, GenerationConfig
from torchchat.server.stop_strings import StopStrings


@dataclass(frozen=True)
class Job:
    prompt_ids: list[int]
    cfg: GenerationConfig
    stop: tuple[str, ...] = ()
    seed: int | None = None  # None: a fresh random seed, independent of earlier seeded requests


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" (stop token or stop string) | "length"
    prompt_tokens: int
    completion_tokens: int  # tokens the model generated, a stop token included
    time_to_first_token: float  # seconds from the start of prefill (not of queueing) to the first token
    total_time: float  # seconds from the start of prefill to the last token


@dataclass
class WorkerStats:
    """What /health reports; updated by the worker thread under `lock`."""

    queued: int = 0  # submitted, not started
    active: int = 0  # 0 or 1
    completed: int = 0
    cancelled: int = 0  # stopped early because the client went away
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {"queued": self.queued, "active": self.active, "completed": self.completed,
                    "cancelled": self.cancelled}


class ModelWorker:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.stats = WorkerStats()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchchat-model")
        self._cancels: set[threading.Event] = set()

    async def run(self, job: Job) -> AsyncIterator[Delta | Finished]:
        """Deltas of generated text, then one Finished. Closing the iterator early cancels the job."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed: the server is shutting down
                cancel.set()

        with self.stats.lock:
            self.stats.queued += 1
        self._cancels.add(cancel)
        loop.run_in_executor(self._executor, self._work, job, emit, cancel)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            cancel.set()
            self._cancels.discard(cancel)

    def close(self) -> None:
        """Cancel every job and stop the thread once the running one has noticed."""
        for cancel in list(self._cancels):
            cancel.set()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _work(self, job: Job, emit: Callable[[object], None], cancel: threading.Event) -> None:
        with self.stats.lock:
            self.stats.queued -= 1
            self.stats.active += 1
        outcome = "cancelled"
        try:
            if not cancel.is_set():
                outcome = self._generate(job, emit, cancel)
        except Exception as e:  # handed to the request's coroutine, which reports it to its client
            outcome = "completed"
            emit(e)
        finally:
            with self.stats.lock:
                self.stats.active -= 1
                if outcome == "cancelled":
                    self.stats.cancelled += 1
                else:
                    self.stats.completed += 1

    def _generate(self, job: Job, emit: Callable[[object], None], cancel: threading.Event) -> str:
        if job.seed is not None:
            torch.manual_seed(job.seed)
        else:
            torch.seed()
        stops = StopStrings(job.stop)
        finish = "length"
        stream = self.engine.stream(job.prompt_ids, job.cfg)
        try:
            for record in stream:
                if cancel.is_set():
                    return "cancelled"
                text = stops.feed(record.text)
                if record.finish_reason is not None and not stops.stopped:
                    finish = record.finish_reason
                    text += stops.flush()
                if text:
                    emit(Delta(text))
                if stops.stopped:
                    finish = "stop"
                    break
        finally:
            stream.close()
        # The engine updates its stats as tokens are yielded, so they are right after an early break too.
        stats = self.engine.last_stats
        emit(Finished(finish, len(job.prompt_ids), stats.generated_tokens, stats.time_to_first_token,
                      max(stats.total_time, stats.time_to_first_token)))
        return "completed"
