"""Runs generation requests on one BatchEngine in one worker thread: continuous batching.

The engine has N sequence slots over one KV cache of N rows. The worker thread loops: it admits
queued requests into free slots (in arrival order), asks the engine for one step (prefill chunks of
the newcomers, then one decode token for every running sequence, all rows in one forward), and turns
each sequence's new token into text (stop ids, stop strings, UTF-8 pieces) for its request. Requests
join and leave between any two steps. Generation happens off the event loop, which stays free to
accept requests and notice disconnects; text reaches the loop through an asyncio.Queue per request.
Cancelling a request (the client went away, or its async iterator was closed) frees its slot before
the next step, or drops it from the queue if it had not started."""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Mapping

from torchchat.generation.batch import BatchEngine, LogitsProcessor, Penalties, Sequence, SequenceRequest, TokenLogprob
from torchchat.generation.engine import GenerationConfig
from torchchat.server.metrics import ServerMetrics
from torchchat.server.stop_strings import StopStrings

log = logging.getLogger("torchchat.server")


@dataclass(frozen=True)
class Job:
    prompt_ids: list[int]
    cfg: GenerationConfig  # max_new_tokens, sampling, stop_ids (None: the tokenizer's)
    stop: tuple[str, ...] = ()
    seed: int | None = None  # None: a fresh random seed, independent of earlier seeded requests
    penalties: Penalties = Penalties()
    logit_bias: Mapping[int, float] | None = None
    top_logprobs: int | None = None  # None: no logprobs; n: each token's logprob and the n most likely
    prompt_logprobs: bool = False  # also every prompt token's (completions' echo + logprobs)
    logits_processor: LogitsProcessor | None = None  # e.g. a grammar (one per job: it keeps state)


@dataclass(frozen=True)
class TokenInfo:
    """One generated (or prompt) token with its logprob, for `logprobs` in responses."""

    token: int
    logprob: TokenLogprob | None


@dataclass(frozen=True)
class Delta:
    text: str
    tokens: tuple[TokenInfo, ...] = ()  # with logprobs: the tokens this text completes (stop strings may hold some back)


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" (stop token or stop string) | "length"
    prompt_tokens: int
    completion_tokens: int  # tokens the model generated, a stop token included
    time_to_first_token: float  # seconds from the start of prefill (not of queueing) to the first token
    total_time: float  # seconds from the start of prefill to the last token
    cached_tokens: int = 0  # prompt tokens whose K/V a slot already held (not prefilled again)
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()  # with Job.prompt_logprobs: one per prompt token


@dataclass
class WorkerStats:
    """What /health reports; updated by the worker thread under `lock`."""

    queued: int = 0  # submitted, not started
    active: int = 0  # sequences in slots
    completed: int = 0
    cancelled: int = 0  # stopped early because the client went away
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {"queued": self.queued, "active": self.active, "completed": self.completed,
                    "cancelled": self.cancelled}


class _Running:
    """A request's text state while its sequence runs."""

    def __init__(self, job: Job, emit: Callable[[object], None], cancel: threading.Event, tokenizer):
        from torchchat.tokenizer.stream import StreamDecoder

        self.job, self.emit, self.cancel = job, emit, cancel
        self.stop_ids = tokenizer.stop_ids if job.cfg.stop_ids is None else job.cfg.stop_ids
        self.decoder = StreamDecoder(tokenizer, prefix=job.prompt_ids)
        self.stops = StopStrings(job.stop)
        self.held: list[TokenInfo] = []  # tokens whose text is not yet emitted
        self.t_start = time.perf_counter()
        self.seq: Sequence | None = None


class ModelWorker:
    def __init__(self, engine: BatchEngine, tokenizer, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.stats = WorkerStats()
        self.metrics = metrics or ServerMetrics()
        self.metrics.max_concurrent = engine.max_batch
        self.max_concurrent = engine.max_batch
        self._queue: collections.deque[_Running] = collections.deque()
        self._running: dict[int, _Running] = {}  # id(Sequence) -> its request
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="torchchat-model", daemon=True)
        self._thread.start()

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

        with self._wake:
            self._queue.append(_Running(job, emit, cancel, self.tokenizer))
            with self.stats.lock:
                self.stats.queued += 1
            self._wake.notify()
        try:
            while True:
                item = await queue.get()
                # When the event loop falls behind the model (many streams at once), a stream's tokens
                # pile up here: hand them on as one Delta, one chunk to encode and send instead of
                # several, so the loop's work per step shrinks as the load grows.
                while isinstance(item, Delta) and not queue.empty():
                    nxt = queue.get_nowait()
                    if not isinstance(nxt, Delta):
                        yield item
                        item = nxt
                        break
                    item = Delta(item.text + nxt.text, item.tokens + nxt.tokens)
                if isinstance(item, Exception):
                    raise item
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            if not cancel.is_set():
                cancel.set()
                with self._wake:  # wake the thread so the slot is freed now, not after the next request
                    self._wake.notify()

    def close(self) -> None:
        """Cancel every job and stop the thread."""
        with self._wake:
            self._closed = True
            for r in list(self._queue) + list(self._running.values()):
                r.cancel.set()
            self._wake.notify()

    # -- the worker thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._queue and not self._running:
                    self._wake.wait()
                if self._closed:
                    return
                self._drop_cancelled()
                self._admit()
            if not self._running:
                continue
            try:
                outs = self.engine.step()
            except Exception as e:  # handed to every running request, which reports it to its client
                log.exception("generation step failed")
                for r in list(self._running.values()):
                    self._finish(r, "completed")
                    r.emit(e)
                continue
            t = time.perf_counter()
            self.metrics.step(len(outs), self.stats.queued, len(self._running), t)
            for o in outs:
                r = self._running.get(id(o.seq))
                if r is not None:
                    self._on_token(r, o)

    def _drop_cancelled(self) -> None:
        """Free the slots of cancelled requests and drop cancelled queued ones (lock held)."""
        for r in [r for r in self._running.values() if r.cancel.is_set()]:
            self._finish(r, "cancelled")
        kept = collections.deque(r for r in self._queue if not r.cancel.is_set())
        dropped = len(self._queue) - len(kept)
        if dropped:
            self._queue = kept
            with self.stats.lock:
                self.stats.queued -= dropped
                self.stats.cancelled += dropped

    def _admit(self) -> None:
        while self._queue and self.engine.free_slots():
            r = self._queue.popleft()
            job = r.job
            req = SequenceRequest(
                prompt_ids=tuple(job.prompt_ids), max_new_tokens=job.cfg.max_new_tokens, sampling=job.cfg.sampling,
                stop_ids=frozenset(r.stop_ids), seed=job.seed, penalties=job.penalties, logit_bias=job.logit_bias,
                top_logprobs=job.top_logprobs, prompt_logprobs=job.prompt_logprobs,
                logits_processor=job.logits_processor)
            with self.stats.lock:
                self.stats.queued -= 1
            try:
                r.seq = self.engine.add(req)
            except Exception as e:
                with self.stats.lock:
                    self.stats.completed += 1
                r.emit(e)
                continue
            r.t_start = time.perf_counter()
            self._running[id(r.seq)] = r
            with self.stats.lock:
                self.stats.active += 1

    def _finish(self, r: _Running, outcome: str) -> None:
        self.engine.release(r.seq)
        self._running.pop(id(r.seq), None)
        with self.stats.lock:
            self.stats.active -= 1
            if outcome == "cancelled":
                self.stats.cancelled += 1
            else:
                self.stats.completed += 1

    def _on_token(self, r: _Running, o) -> None:
        if r.cancel.is_set():
            return  # freed before the next step
        seq = o.seq
        if seq.generated == 1:
            self.metrics.first_token(seq.t_first - r.t_start)
        finish = o.finish_reason
        if o.token in r.stop_ids:  # never rendered as text
            piece = r.decoder.flush()
        else:
            if r.job.top_logprobs is not None:
                r.held.append(TokenInfo(o.token, o.logprob))
            piece = r.decoder.add(o.token)
            if finish is not None:
                piece += r.decoder.flush()
        text = r.stops.feed(piece)
        if r.stops.stopped:
            finish = "stop"
        elif finish is not None:
            text += r.stops.flush()
        if text or (finish is not None and r.held):
            r.emit(Delta(text, tuple(r.held)))
            r.held = []
        if finish is None:
            return
        now = time.perf_counter()
        ttft = (seq.t_first or now) - r.t_start
        r.emit(Finished(finish, len(r.job.prompt_ids), seq.generated, ttft, max(now - r.t_start, ttft),
                        seq.cached_tokens, tuple(seq.prompt_logprobs)))
        self._finish(r, "completed")
