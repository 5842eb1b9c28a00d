"""The engine: prompt ids -> generated ids -> response records with text deltas and statistics.

Layered iterators (tokens -> stream): `generate`, `chat`, the server and eval all consume these and
none re-implements decoding."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch

from torchchat.errors import ContextLengthError
from torchchat.generation.decoding import PlainDecoder, common_prefix_len
from torchchat.generation.sampling import SamplingParams
from torchchat.generation.speculative import Draft, SpeculativeDecoder
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
    def __init__(self, runtime: Runtime, tokenizer, steps: Steps, max_seq_len: int, parallel_prefill: bool = True):
        self.runtime = runtime
        self.parallel_prefill = parallel_prefill and runtime.supports_parallel_prefill
        self.tokenizer = tokenizer
        self.steps = steps
        self.max_seq_len = max_seq_len
        self.device = runtime.device
        self.position = 0  # next free KV position after the last call (chat continues from here)
        self.last_stats: GenerationStats | None = None
        # Ids whose K/V the cache holds at positions [0, len): chat reuses their common prefix with the
        # next prompt. -1 marks a position of unknown content.
        self.kv_ids: list[int] = []
        self.draft: Draft | None = None  # when decoding speculatively
        self._plain = PlainDecoder(steps, self.device, self.parallel_prefill)
        runtime.setup(1, max_seq_len)

    def attach_draft(self, runtime: Runtime, k: int) -> None:
        """Decode speculatively from now on: `runtime` (a smaller model with the same vocabulary)
        proposes `k` tokens per step and this engine's model verifies them in one forward."""
        self.draft = Draft.create(runtime, k, self.max_seq_len, self.runtime)

    def _claim_prefix(self, start_pos: int) -> None:
        """Forget what the cache holds from `start_pos` on (it is about to be overwritten)."""
        del self.kv_ids[start_pos:]
        self.kv_ids.extend([-1] * (start_pos - len(self.kv_ids)))

    def _check_fits(self, start_pos: int, n_prompt: int) -> None:
        if n_prompt == 0:
            raise ContextLengthError("the prompt is empty: give at least one token (BOS counts)")
        if start_pos + n_prompt >= self.max_seq_len:
            raise ContextLengthError(
                f"the prompt needs {start_pos + n_prompt} positions but the context holds {self.max_seq_len}; "
                "shorten it or raise --max-seq-length (up to the model's own limit)"
            )

    def decoder(self):
        """The decoder for the next call: speculative while a draft is attached, else plain."""
        if self.draft is None:
            return self._plain
        return SpeculativeDecoder(self.runtime, self.steps, self.draft)

    def tokens(self, prompt_ids: Sequence[int], cfg: GenerationConfig, start_pos: int = 0) -> Iterator[int]:
        """Prefill `prompt_ids` at positions [start_pos, ...) and yield generated ids, stop token
        included. Stops at a stop id, at max_new_tokens, or when the context is full. Afterwards
        `self.position` is the position the last yielded token would take, and `self.last_stats` is set.

        The decoder (plain or speculative) only produces tokens; the budget, stop ids, the ids the KV
        cache holds, positions and statistics are kept here, once for both."""
        decoder = self.decoder()
        self._check_fits(start_pos, len(prompt_ids))
        self._claim_prefix(start_pos)
        stop_ids = self.tokenizer.stop_ids if cfg.stop_ids is None else cfg.stop_ids
        budget = min(cfg.max_new_tokens, self.max_seq_len - start_pos - len(prompt_ids))
        stats = GenerationStats(prompt_tokens=len(prompt_ids), speculate_k=decoder.k,
                                prefill_parallel=decoder.parallel_prefill)
        self.last_stats = stats
        if budget <= 0:
            self.position = start_pos + len(prompt_ids)
            return
        t0 = time.perf_counter()
        with torch.no_grad():
            x = decoder.prefill(prompt_ids, start_pos, cfg.sampling)
        self.kv_ids.extend(int(i) for i in prompt_ids)
        stats.time_to_first_token = time.perf_counter() - t0
        stats.generated_tokens = 1
        self.position = len(self.kv_ids)
        yield x
        while x not in stop_ids and stats.generated_tokens < budget:
            pos = len(self.kv_ids)  # where x goes; the cache holds [0, pos)
            with torch.no_grad():
                out = decoder.step(x, self.kv_ids, cfg.sampling, budget - stats.generated_tokens)
            # kv_ids may run past the last yielded token (accepted drafts after a stop token); they are
            # still the true ids at those positions, which is what cache reuse compares against.
            self.kv_ids += [x] + out.tokens[:-1]
            stats.draft_proposed += out.proposed
            stats.draft_accepted += out.accepted
            for i, token in enumerate(out.tokens):
                x = token
                stats.generated_tokens += 1
                stats.total_time = time.perf_counter() - t0
                self.position = pos + 1 + i
                yield token
                if token in stop_ids or stats.generated_tokens >= budget:
                    break
        stats.total_time = time.perf_counter() - t0

    def stream(self, prompt_ids: Sequence[int], cfg: GenerationConfig, start_pos: int = 0, *,
               text_prefix: Sequence[int] | None = None) -> Iterator[Response]:
        """Like `tokens`, as Response records carrying text deltas; the last record has finish_reason
        and stats. Stop tokens are never rendered as text. The text continues `text_prefix` (default:
        the prompt; () decodes the generated ids on their own, as a new message)."""
        from torchchat.tokenizer.stream import StreamDecoder

        stop_ids = self.tokenizer.stop_ids if cfg.stop_ids is None else cfg.stop_ids
        decoder = StreamDecoder(self.tokenizer, prefix=prompt_ids if text_prefix is None else text_prefix)
        finish = "length"
        for token in self.tokens(prompt_ids, cfg, start_pos):
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
        reuse = common_prefix_len(self.kv_ids, ids)
        reuse = max(0, min(reuse, len(ids) - 1))  # at least one token is fed, for the next-token logits
        base_stops = self.tokenizer.stop_ids if cfg.stop_ids is None else cfg.stop_ids
        cfg = replace(cfg, stop_ids=frozenset(base_stops) | chat_format.stop_ids(self.tokenizer))
        text_prefix = None if chat_format.continues_text else ()
        for r in self.stream(ids[reuse:], cfg, start_pos=reuse, text_prefix=text_prefix):
            if r.stats is not None:
                r.stats.cached_tokens = reuse
            yield r


def make_engine(built, options=None, max_seq_len: int | None = None, parallel_prefill: bool = True) -> Engine:
    """An Engine over a BuiltModel: steps compiled per `options` (a CompileOptions), context
    `max_seq_len` (default: the model's own limit)."""
    from torchchat.generation.steps import CompileOptions
    from torchchat.model.layout import optimize_for_decode
    from torchchat.runtime.base import EagerRuntime

    runtime = built.runtime
    if isinstance(runtime, EagerRuntime):
        optimize_for_decode(runtime.model)
    steps = Steps(runtime.forward, runtime.device, options or CompileOptions(), getattr(runtime, "graph_key", None),
                  getattr(runtime, "forward_last", None))
    ctx = min(max_seq_len or runtime.max_seq_len, runtime.max_seq_len)
    return Engine(runtime, built.tokenizer, steps, ctx, parallel_prefill)
