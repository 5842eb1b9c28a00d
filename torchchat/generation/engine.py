"""The single-sequence face of the engine: prompt ids -> generated ids -> response records with text
deltas and statistics, for `generate`, `chat` and `eval`.

Layered iterators (tokens -> stream). The work is the batched engine's (torchchat.generation.batch):
an Engine is its core with one slot (or a few, for `generate --num-samples`), so setup, prefill,
positions, the ids the cache holds, stop ids and budgets are kept in one place for every command and
the server alike; this module adds what a single caller wants around it: timing statistics, text,
chat turns."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch

from torchchat.generation.batch import BatchEngine, Sequence as BatchSequence, SequenceRequest, make_steps
from torchchat.generation.sampling import SamplingParams, default_generator
from torchchat.generation.speculative import Draft
from torchchat.generation.steps import Steps
from torchchat.runtime.base import Runtime


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 200
    sampling: SamplingParams = SamplingParams()
    stop_ids: frozenset[int] | None = None  # None: the tokenizer's stop ids
    echo_stop: bool = False  # yield the stop token itself (never as text)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token: float = 0.0  # seconds, prefill included
    total_time: float = 0.0  # seconds, prefill to last token
    prefill_parallel: bool = True
    cached_tokens: int = 0  # prompt tokens whose K/V were already in the cache (chat turns), not in prompt_tokens
    draft_proposed: int = 0  # speculative decoding: draft tokens proposed ...
    draft_accepted: int = 0  # ... and accepted by the target
    speculate_k: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.draft_accepted / self.draft_proposed if self.draft_proposed else 0.0

    @property
    def decode_time(self) -> float:
        return self.total_time - self.time_to_first_token

    @property
    def total_tokens_per_s(self) -> float:
        return self.generated_tokens / self.total_time if self.total_time > 0 else 0.0

    @property
    def first_token_per_s(self) -> float:
        return 1.0 / self.time_to_first_token if self.time_to_first_token > 0 else 0.0

    @property
    def next_tokens_per_s(self) -> float:
        n = self.generated_tokens - 1
        return n / self.decode_time if n > 0 and self.decode_time > 0 else 0.0


@dataclass
class Response:
    text: str  # text completed by this token (may be "" while a UTF-8 sequence is incomplete)
    token: int | None  # the generated id, None on the final record
    finish_reason: str | None = None  # "stop" | "length" on the final record
    stats: GenerationStats | None = None  # on the final record


class Engine:
    """One sequence at a time (or a batch of independent samples of one prompt, `samples`) over a
    BatchEngine core. Sampling draws from `generator`, by default the process's own (so
    torch.manual_seed seeds it, and a compiled step draws inside its graph)."""

    def __init__(self, runtime: Runtime, tokenizer, steps: Steps, max_seq_len: int, parallel_prefill: bool = True,
                 *, slots: int = 1):
        self.core = BatchEngine(runtime, slots, max_seq_len, steps=steps, parallel_prefill=parallel_prefill)
        self.tokenizer = tokenizer
        self.generator = default_generator(runtime.device)
        self.position = 0  # next free KV position after the last call (chat continues from here)
        self.last_stats: GenerationStats | None = None

    runtime = property(lambda self: self.core.runtime)
    steps = property(lambda self: self.core.steps)
    device = property(lambda self: self.core.device)
    max_seq_len = property(lambda self: self.core.max_seq_len)
    parallel_prefill = property(lambda self: self.core.parallel_prefill)

    @property
    def kv_ids(self) -> list[int]:
        """Ids whose K/V the (first) cache row holds at positions [0, len); -1: unknown content."""
        return self.core.slot_ids[0]

    @kv_ids.setter
    def kv_ids(self, ids: list[int]) -> None:
        self.core.slot_ids[0] = list(ids)

    @property
    def draft(self) -> Draft | None:
        return self.core.draft

    @draft.setter
    def draft(self, draft: Draft | None) -> None:
        self.core.draft = draft

    def attach_draft(self, runtime: Runtime, k: int) -> None:
        """Decode speculatively from now on: `runtime` (a smaller model with the same vocabulary)
        proposes `k` tokens per step and this engine's model verifies them in one forward."""
        self.core.attach_draft(runtime, k)

    def _request(self, prompt_ids: Sequence[int], cfg: GenerationConfig, reuse_prefix: bool) -> SequenceRequest:
        stop_ids = self.tokenizer.stop_ids if cfg.stop_ids is None else cfg.stop_ids
        return SequenceRequest(tuple(int(i) for i in prompt_ids), cfg.max_new_tokens, cfg.sampling,
                               frozenset(stop_ids), reuse_prefix=reuse_prefix)

    def tokens(self, prompt_ids: Sequence[int], cfg: GenerationConfig, start_pos: int = 0, *,
               reuse_prefix: bool = False) -> Iterator[int]:
        """Prefill `prompt_ids` at positions [start_pos, ...) and yield generated ids, stop token
        included. Stops at a stop id, at max_new_tokens, or when the context is full. Afterwards
        `self.position` is the position the last yielded token would take, and `self.last_stats` is set.
        `reuse_prefix`: `prompt_ids` is the whole sequence (start_pos ignored) and the part of it the
        cache already holds is not prefilled again (`stats.cached_tokens` says how much)."""
        request = self._request(prompt_ids, cfg, reuse_prefix)
        keep = None if reuse_prefix else start_pos
        if cfg.max_new_tokens <= 0:
            # Nothing to generate: only check that the prompt fits, as a real call would.
            self.core.release(self.core.add(request, generator=self.generator, keep=keep))
            self.position = (start_pos if keep is not None else 0) + len(request.prompt_ids)
            self.last_stats = GenerationStats(prompt_tokens=len(request.prompt_ids),
                                              prefill_parallel=self.parallel_prefill)
            return
        t0 = time.perf_counter()
        seq = self.core.add(request, generator=self.generator, keep=keep)
        stats = self._stats(seq)
        self.last_stats = stats
        for token in self._run([seq], t0, {id(seq): stats}):
            self.position = seq.position
            yield token.token

    def _stats(self, seq: BatchSequence) -> GenerationStats:
        speculative = self.core.draft is not None and seq.plain
        return GenerationStats(prompt_tokens=len(seq.pending), cached_tokens=seq.cached_tokens,
                               speculate_k=self.core.draft.k if speculative else 0,
                               prefill_parallel=self.parallel_prefill)

    def _run(self, seqs: list[BatchSequence], t0: float, stats: dict[int, GenerationStats]):
        """Step the core until `seqs` are done, yielding their TokenOuts and keeping `stats` (by
        id(seq)) current. Closing the iterator early releases the slots that are still busy."""
        running = len(seqs)
        try:
            while running:
                for o in self.core.step():  # (BatchEngine.step runs under no_grad)
                    st = stats[id(o.seq)]
                    now = time.perf_counter()
                    if st.generated_tokens == 0:
                        st.time_to_first_token = now - t0
                    st.generated_tokens += 1
                    st.total_time = now - t0
                    st.draft_proposed, st.draft_accepted = o.seq.draft_proposed, o.seq.draft_accepted
                    running -= o.finish_reason is not None
                    yield o
        finally:
            for s in seqs:
                self.core.release(s)

    def samples(self, prompt_ids: Sequence[int], cfg: GenerationConfig,
                seeds: Sequence[int | None]) -> Iterator[tuple[int, Response]]:
        """len(seeds) independent samples of one prompt as one batch (one slot each; the engine needs
        that many): (sample index, Response) pairs as tokens come, each sample's last with its
        finish_reason and stats. Sample i draws from a generator seeded with seeds[i] (None: fresh), so
        it is what a one-sample run seeded the same gives, whatever else shares the batch."""
        from torchchat.tokenizer.stream import StreamDecoder

        if len(seeds) > self.core.max_batch:
            raise ValueError(f"{len(seeds)} samples need {len(seeds)} slots; this engine has {self.core.max_batch}")
        request = self._request(prompt_ids, cfg, reuse_prefix=False)
        t0 = time.perf_counter()
        seqs, stats, text = [], {}, {}
        for seed in seeds:
            generator = torch.Generator(device=self.device)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
            seq = self.core.add(request, generator=generator)
            seqs.append(seq)
            stats[id(seq)] = self._stats(seq)
            text[id(seq)] = StreamDecoder(self.tokenizer, prefix=prompt_ids)
        index = {id(s): i for i, s in enumerate(seqs)}
        for o in self._run(seqs, t0, stats):
            i, decoder = index[id(o.seq)], text[id(o.seq)]
            if o.finish_reason == "stop":
                if cfg.echo_stop:
                    yield i, Response(text="", token=o.token)
            else:
                yield i, Response(text=decoder.add(o.token), token=o.token)
            if o.finish_reason is not None:
                yield i, Response(text=decoder.flush(), token=None, finish_reason=o.finish_reason,
                                  stats=stats[id(o.seq)])

    def stream(self, prompt_ids: Sequence[int], cfg: GenerationConfig, start_pos: int = 0, *,
               text_prefix: Sequence[int] | None = None, reuse_prefix: bool = False) -> Iterator[Response]:
        """Like `tokens`, as Response records carrying text deltas; the last record has finish_reason
        and stats. Stop tokens are never rendered as text. The text continues `text_prefix` (default:
        the prompt; () decodes the generated ids on their own, as a new message)."""
        from torchchat.tokenizer.stream import StreamDecoder

        stop_ids = self.tokenizer.stop_ids if cfg.stop_ids is None else cfg.stop_ids
        decoder = StreamDecoder(self.tokenizer, prefix=prompt_ids if text_prefix is None else text_prefix)
        finish = "length"
        for token in self.tokens(prompt_ids, cfg, start_pos, reuse_prefix=reuse_prefix):
            if token in stop_ids:
                finish = "stop"
                if cfg.echo_stop:
                    yield Response(text="", token=token)
                break
            yield Response(text=decoder.add(token), token=token)
        tail = decoder.flush()
        yield Response(text=tail, token=None, finish_reason=finish, stats=self.last_stats)

    def chat_prompt(self, messages, chat_format) -> list[int]:
        """Token ids of a conversation (Message objects or {"role", "content"} dicts) rendered with
        `chat_format` (a ChatFormat), ending in the assistant's generation prompt."""
        return chat_format.encode(self.tokenizer, messages)

    def chat(self, messages, cfg: GenerationConfig, chat_format) -> Iterator[Response]:
        """Stream the assistant's reply to a conversation, as `stream` does. Give the whole conversation
        every turn: the prompt's common prefix with what the KV cache already holds is reused, so a turn
        that extends the previous one prefills only its new tokens (`stats.cached_tokens` says how many
        were reused). The model sees exactly the tokenization of the full rendered conversation. The
        format's stop tokens (eos, end-of-turn) end the reply and are never rendered as text. The reply
        text is decoded as a message of its own, except with a format whose reply continues the text
        (plain turns), where it keeps the spacing that joins it to the prompt. `chat_format`: a
        torchchat.generation.chat_format.ChatFormat."""
        ids = self.chat_prompt(messages, chat_format)
        base_stops = self.tokenizer.stop_ids if cfg.stop_ids is None else cfg.stop_ids
        cfg = replace(cfg, stop_ids=frozenset(base_stops) | chat_format.stop_ids(self.tokenizer))
        text_prefix = None if chat_format.continues_text else ()
        yield from self.stream(ids, cfg, text_prefix=text_prefix, reuse_prefix=True)


def make_engine(built, options=None, max_seq_len: int | None = None, parallel_prefill: bool = True,
                slots: int = 1) -> Engine:
    """An Engine over a BuiltModel: steps compiled per `options` (a CompileOptions), context
    `max_seq_len` (default: the model's own limit), `slots` sequences at once (for batched samples)."""
    runtime = built.runtime
    steps = make_steps(runtime, options)
    ctx = min(max_seq_len or runtime.max_seq_len, runtime.max_seq_len)
    return Engine(runtime, built.tokenizer, steps, ctx, parallel_prefill, slots=slots)
