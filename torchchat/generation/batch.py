"""The batched engine: N sequence slots over one KV cache of N rows (continuous batching).

Each slot holds one sequence at its own position. A step (1) prefills prompt chunks of sequences that
joined since the last step, up to `prefill_chunk` tokens in all, each in its own cache row, and (2)
decodes one token for every sequence that already had one, all rows in one forward with a position per
row, then samples all of them in one batched step with each request's own parameters and random
generator. Sequences join (`add`) and leave (`release`, or on finishing) between any two steps.

A slot remembers the ids whose K/V its cache row holds after its sequence leaves, so a later prompt
that starts with them (the same chat one turn longer, a shared system prompt) prefills only the rest.

Why the decode batch is rows [0, bucket): a contiguous slice of the cache is a view, while gathering
scattered rows would copy every layer's whole cache each step; new sequences take the lowest free
slot for that reason. The bucket is the next power of two at or above the highest busy slot, so a
compiled decode step sees at most log2(N) + 1 shapes. Idle rows inside the bucket compute a throwaway
token at the last cache position, which no sequence ever writes (a sequence's last sampled token is
never fed back), so they disturb nothing a slot remembers; a runtime may name its own idle position
instead (`idle_position`: -1 for the fused CUDA model, whose attention then skips those rows).

This is the one engine: `generate`, `chat` and `eval` run through it with one slot (Engine in
torchchat.generation.engine is their single-sequence face), and `generate --num-samples` runs its
samples as one batch. An engine of one slot decodes through a decoder that only produces tokens: the
plain one (forward and sampling fused in one compiled step or CUDA graph, as the single-sequence path
always did), or the speculative one when a draft model is attached. Several busy rows, or a request
that wants more from the logits than a token (logprobs, penalties, bias, a grammar), take the batched
forward and one batched sampling step. Either way the bookkeeping (budget, stop ids, the ids each row
holds, positions) is this module's, once. With one busy row the decode forward gets a shared (1,)
position, so runtimes that take only shared positions (AOTI, ExecuTorch) serve one slot.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence as Seq

import torch
from torch import Tensor

from torchchat.errors import ContextLengthError, UserInputError
from torchchat.generation.decoding import DecodeStep, PlainDecoder, common_prefix_len
from torchchat.generation.sampling import SamplingParams
from torchchat.generation.speculative import Draft, SpeculativeDecoder
from torchchat.generation.steps import Steps

# (ids this sequence generated so far, its next-token logits (V,) float) -> logits (V,). Called once
# per generated token, in order, after penalties and bias; e.g. a grammar mask (generation/constraints.py).
LogitsProcessor = Callable[[Seq[int], Tensor], Tensor]

# Joining prompts share one forward while their right-padding stays within this multiple of their real
# tokens (BatchEngine._prefill_groups).
PREFILL_PAD_RATIO = 1.5


@dataclass(frozen=True)
class Penalties:
    """OpenAI's presence and frequency penalties (on generated tokens) and the repetition penalty of
    vLLM / Hugging Face (on prompt and generated tokens: positive logits divided by it, negative ones
    multiplied)."""

    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0

    @property
    def active(self) -> bool:
        return self.presence != 0.0 or self.frequency != 0.0 or self.repetition != 1.0


@dataclass(frozen=True)
class SequenceRequest:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams(temperature=0.0)
    stop_ids: frozenset[int] = frozenset()
    seed: int | None = None  # None: a fresh random seed
    penalties: Penalties = Penalties()
    logit_bias: Mapping[int, float] | None = None  # token id -> added to its logit
    top_logprobs: int | None = None  # None: no logprobs; n >= 0: the chosen token's and the n most likely
    prompt_logprobs: bool = False  # also the logprob of every prompt token after the first (echo)
    reuse_prefix: bool = True
    logits_processor: LogitsProcessor | None = None


@dataclass(frozen=True)
class TokenLogprob:
    logprob: float  # of the chosen (or prompt) token, natural log, after penalties and bias
    top: tuple[tuple[int, float], ...] = ()  # the most likely ids and their logprobs, best first


@dataclass(frozen=True)
class TokenOut:
    seq: "Sequence"
    token: int
    finish_reason: str | None = None  # "stop" (a stop id; the token is that id) | "length"
    logprob: TokenLogprob | None = None


@dataclass(eq=False)
class Sequence:
    """One request's state in a slot; owned by the BatchEngine, read by its caller."""

    request: SequenceRequest
    slot: int
    position: int  # the next cache position to write
    pending: list[int]  # prompt ids not yet prefilled
    budget: int  # most tokens to generate
    generator: torch.Generator
    cached_tokens: int = 0  # prompt ids whose K/V were reused from the slot (or kept, see BatchEngine.add)
    next_token: int | None = None  # sampled, not yet fed
    generated: int = 0
    output: list[int] = field(default_factory=list)  # the generated ids, in order
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    t_added: float = field(default_factory=time.perf_counter)
    t_first: float | None = None  # perf_counter at the first token
    counts: Tensor | None = None  # (V,) generated-token counts, for penalties
    seen: Tensor | None = None  # (V,) bool: in the prompt or generated, for the repetition penalty
    bias: Tensor | None = None  # (V,) logit bias
    draft_proposed: int = 0  # speculative decoding: draft tokens proposed ...
    draft_accepted: int = 0  # ... and accepted by the target
    plain: bool = False  # wants nothing from the logits but a token sampled with its SamplingParams
    _last_logprobs: Tensor | None = None  # (V,) log-probs after the last prefilled chunk (prompt_logprobs)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class BatchEngine:
    def __init__(self, runtime, max_batch: int, max_seq_len: int, *, prefill_chunk: int = 512,
                 steps: Steps | None = None, parallel_prefill: bool = True):
        """`runtime`: a torchchat Runtime; with max_batch > 1 it must take (B, S) positions and a cache
        `row` (EagerRuntime.supports_batching). `steps`: the prefill and decode functions (compiled
        or not; torchchat.generation.steps, the only compile boundary); default the runtime's forwards
        as they are. `parallel_prefill` False (or a runtime without it) feeds prompts one token per
        forward."""
        if max_batch > 1 and not getattr(runtime, "supports_batching", False):
            raise ValueError(f"{type(runtime).__name__} serves one sequence at a time; use max_batch=1")
        self.runtime = runtime
        self.device = runtime.device
        self.max_batch, self.max_seq_len, self.prefill_chunk = max_batch, max_seq_len, prefill_chunk
        self.vocab_size = runtime.config.vocab_size
        # Idle rows of a decode bucket: the runtime's own marker, or a position no sequence writes.
        idle = getattr(runtime, "idle_position", None)
        self.idle_position = max_seq_len - 1 if idle is None else idle
        # A prompt chunk whose request wants no prompt logprobs samples from its last position only:
        # the runtime's last-position forward (EagerRuntime.forward_last) skips the output matrix for
        # the others.
        self.steps = steps or Steps(runtime.forward, runtime.device,
                                    forward_last=getattr(runtime, "forward_last", None))
        self.parallel_prefill = parallel_prefill and runtime.supports_parallel_prefill
        # Joining prompts of several sequences in one forward (_prefill_groups): needs per-row positions
        # and each row's own last position (EagerRuntime.forward_last's last_index), which steps made
        # without a last-position forward lack.
        self._batch_prefill = max_batch > 1 and self.parallel_prefill and self.steps.forward_last is not self.steps.forward
        # One slot decodes through a decoder that only produces tokens (see the module docstring).
        self._plain = PlainDecoder(self.steps, self.device, self.vocab_size) if max_batch == 1 else None
        self.draft: Draft | None = None
        self.slots: list[Sequence | None] = [None] * max_batch
        self.slot_ids: list[list[int]] = [[] for _ in range(max_batch)]  # ids whose K/V each row holds
        self.prefilled_tokens = 0  # prompt tokens run through the model, over the engine's life
        runtime.setup(max_batch, max_seq_len)

    def attach_draft(self, runtime, k: int) -> None:
        """Decode speculatively from now on: `runtime` (a smaller model with the same vocabulary)
        proposes `k` tokens per step and the target verifies them in one forward. One slot only: the
        draft's own cache holds one sequence. Set `draft` to None to decode plainly again."""
        if self.max_batch != 1:
            raise UserInputError("speculative decoding runs one sequence at a time; it needs an engine of one slot")
        self.draft = Draft.create(runtime, k, self.max_seq_len, self.runtime)

    # -- joining and leaving -------------------------------------------------------------------------

    @property
    def active(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    def free_slots(self) -> int:
        return sum(s is None for s in self.slots)

    def add(self, request: SequenceRequest, *, generator: torch.Generator | None = None,
            keep: int | None = None) -> Sequence:
        """Give `request` a free slot (raises RuntimeError when none is); it is prefilled by the next
        `step`s. Prefers the free slot whose remembered ids share the longest prefix with the prompt.

        `generator`: what the sequence samples with (default: one seeded with request.seed, or freshly).
        `keep`: one-slot engines only: the prompt continues after the first `keep` cache positions as
        the last sequence left them, whatever they hold (a caller that tracks its own conversation, as
        the exported runners' chat does); the request's ids are then only the new ones."""
        ids = [int(i) for i in request.prompt_ids]
        start = keep or 0
        if not ids:
            raise ContextLengthError("the prompt is empty: give at least one token (BOS counts)")
        if start + len(ids) >= self.max_seq_len:
            raise ContextLengthError(
                f"the prompt needs {start + len(ids)} positions but the context holds {self.max_seq_len}; "
                "shorten it or raise --max-seq-length (up to the model's own limit)"
            )
        free = [i for i, s in enumerate(self.slots) if s is None]
        if not free:
            raise RuntimeError("no free slot: wait for a sequence to finish")
        reuse, slot = 0, free[0]
        if keep is not None:
            if self.max_batch != 1:
                raise ValueError("`keep` continues the one slot's cache; this engine has several")
            held = self.slot_ids[slot]
            del held[keep:]
            held.extend([-1] * (keep - len(held)))  # -1: a position of unknown content
            reuse, pending = keep, ids
        else:
            if request.reuse_prefix and not request.prompt_logprobs:
                best = max(free, key=lambda i: (common_prefix_len(self.slot_ids[i], ids), -i))
                # At least one prompt id is fed, for the logits of the first generated token.
                reuse = min(common_prefix_len(self.slot_ids[best], ids), len(ids) - 1)
                if reuse > 0:
                    slot = best
            del self.slot_ids[slot][reuse:]
            pending = ids[reuse:]
        if generator is None:
            generator = torch.Generator(device=self.device)
            if request.seed is None:
                generator.seed()
            else:
                generator.manual_seed(request.seed)
        seq = Sequence(request, slot, position=reuse, pending=pending, cached_tokens=reuse,
                       budget=min(request.max_new_tokens, self.max_seq_len - start - len(ids)), generator=generator)
        self._init_logit_state(seq, ids)
        seq.plain = (seq.counts is None and seq.bias is None and request.logits_processor is None
                     and request.top_logprobs is None)
        self.slots[slot] = seq
        return seq

    def release(self, seq: Sequence) -> None:
        """Free `seq`'s slot (finished, cancelled, or stopped by its caller); the slot keeps the ids
        its cache row holds for prefix reuse."""
        if self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None

    def _init_logit_state(self, seq: Sequence, prompt: list[int]) -> None:
        req, V = seq.request, self.vocab_size
        if req.penalties.active:
            seq.counts = torch.zeros(V, device=self.device)
            seq.seen = torch.zeros(V, dtype=torch.bool, device=self.device)
            seq.seen[torch.tensor(prompt, device=self.device).clamp(0, V - 1)] = True
        if req.logit_bias:
            seq.bias = torch.zeros(V, device=self.device)
            ids = torch.tensor(list(req.logit_bias), device=self.device)
            seq.bias[ids] = torch.tensor(list(req.logit_bias.values()), device=self.device)

    # -- one step ------------------------------------------------------------------------------------

    def step(self) -> list[TokenOut]:
        """Prefill what fits of the joining sequences' prompts, decode one token for every sequence
        that had one, sample. Returns the new tokens; finished sequences have left their slots."""
        decoding = [s for s in self.slots if s is not None and s.next_token is not None]
        out: list[TokenOut] = []
        with torch.no_grad():
            out += self._prefill()
            if decoding:
                out += self._decode(decoding)
        return out

    def _prefill(self) -> list[TokenOut]:
        joining = [s for s in self.slots if s is not None and s.pending]
        if not joining:  # most steps: a one-slot engine decoding pays only this line here
            return []
        budget = self.prefill_chunk
        chunks: list[tuple[Sequence, list[int]]] = []
        out: list[TokenOut] = []
        for seq in sorted(joining, key=lambda s: s.t_added):
            if budget <= 0:
                break
            chunk, seq.pending = seq.pending[:budget], seq.pending[budget:]
            budget -= len(chunk)
            if not self.parallel_prefill and self._plain is not None and seq.plain:
                first = self._prefill_one_by_one(seq, chunk)
                if not seq.pending:
                    out.append(self._emit(seq, first))
                continue
            chunks.append((seq, chunk))
        firsts: list[tuple[Sequence, Tensor]] = []
        for group in self._prefill_groups(chunks):
            if len(group) == 1:
                seq, chunk = group[0]
                tokens = torch.tensor([chunk], dtype=torch.int64, device=self.device)
                pos = torch.arange(seq.position, seq.position + len(chunk), device=self.device)
                logits = self._prefill_forward(tokens, pos, seq.slot, last_only=not seq.request.prompt_logprobs)
                if seq.request.prompt_logprobs:
                    self._prompt_logprobs(seq, chunk, logits[0])
                lasts = logits[:, -1]
            else:
                lasts = self._prefill_rows(group)
            for (seq, chunk), last in zip(group, lasts):
                seq.position += len(chunk)
                self.slot_ids[seq.slot].extend(chunk)
                self.prefilled_tokens += len(chunk)
                if not seq.pending:
                    firsts.append((seq, last))
        if firsts:
            out += self._sample([s for s, _ in firsts], torch.stack([l for _, l in firsts]))
        return out

    def _prefill_groups(self, chunks: list[tuple[Sequence, list[int]]]) -> list[list[tuple[Sequence, list[int]]]]:
        """The prompt chunks of one step, grouped into forwards. Sequences in consecutive cache rows
        that want only their last position's logits share one forward (each prompt right-padded to the
        longest): a forward reads every weight once, so on a GPU eight joining prompts cost about what
        one does. A group grows while its padding stays at most PREFILL_PAD_RATIO times its real tokens
        (on a CPU a prompt's forward is compute-bound and padding costs in full) and the padded
        positions stay inside the cache."""
        if not self._batch_prefill:
            return [[c] for c in chunks]
        groups: list[list[tuple[Sequence, list[int]]]] = []
        for seq, chunk in sorted(chunks, key=lambda c: c[0].slot):
            group = groups[-1] if groups else None
            if group is not None and self._joins(group, seq, chunk):
                group.append((seq, chunk))
            else:
                groups.append([(seq, chunk)])
        return groups

    def _joins(self, group: list[tuple[Sequence, list[int]]], seq: Sequence, chunk: list[int]) -> bool:
        members = group + [(seq, chunk)]
        if seq.slot != group[-1][0].slot + 1 or any(s.request.prompt_logprobs for s, _ in members):
            return False
        width = max(len(c) for _, c in members)
        if any(s.position + width > self.max_seq_len for s, _ in members):
            return False
        return width * len(members) <= PREFILL_PAD_RATIO * sum(len(c) for _, c in members)

    def _prefill_rows(self, group: list[tuple[Sequence, list[int]]]) -> Tensor:
        """One forward for the chunks of sequences in consecutive cache rows -> each one's last-position
        logits (N, V). A shorter chunk is padded at its end by repeating its last id; the padding's
        K/V land at positions past the chunk, which that sequence writes again before it reads them."""
        width = max(len(c) for _, c in group)
        tokens = torch.tensor([c + c[-1:] * (width - len(c)) for _, c in group], dtype=torch.int64, device=self.device)
        start = torch.tensor([s.position for s, _ in group], device=self.device).view(-1, 1)
        pos = start + torch.arange(width, device=self.device).view(1, -1)
        last = torch.tensor([len(c) - 1 for _, c in group], device=self.device)
        forward = self.steps.prefill_forward(last_only=True)
        return forward(tokens, pos, row=group[0][0].slot, last_index=last)[:, 0]

    def _prefill_one_by_one(self, seq: Sequence, chunk: list[int]) -> int:
        """A one-slot engine's sequential prefill: each prompt token through the plain decoder's fused
        step, the one the decode loop then runs (under --compile one graph for both, not two); the
        last step's token is the first generated one."""
        held = self.slot_ids[seq.slot]
        for t in chunk:
            nxt = self._plain.step(t, held, seq.request.sampling, 1, seq.generator).tokens[0]
            held.append(t)
            seq.position += 1
        self.prefilled_tokens += len(chunk)
        return nxt

    def _prefill_forward(self, tokens: Tensor, pos: Tensor, row: int, last_only: bool = False) -> Tensor:
        """tokens (1, S) at positions pos (S,) in cache row `row` -> logits (1, S, V), or (1, 1, V) for
        the last position where `last_only` and the runtime can skip the others."""
        if not self.parallel_prefill:  # one token per call (--sequential-prefill, some .pte programs)
            forward = self.steps.prefill_forward(last_only=False)
            return torch.cat([forward(tokens[:, i : i + 1], pos[i : i + 1], row=row) if row else
                              forward(tokens[:, i : i + 1], pos[i : i + 1]) for i in range(tokens.size(1))], dim=1)
        forward = self.steps.prefill_forward(last_only)
        return forward(tokens, pos, row=row) if row else forward(tokens, pos)

    def _prompt_logprobs(self, seq: Sequence, chunk: list[int], logits: Tensor) -> None:
        """logits: (S, V) for the chunk's positions: each row predicts the next prompt id."""
        lp = torch.log_softmax(logits.float(), dim=-1)
        n_top = seq.request.top_logprobs or 0
        if not seq.prompt_logprobs and seq.cached_tokens == 0:
            seq.prompt_logprobs.append(None)  # the first prompt id has no context to be predicted from
        preds = ([seq._last_logprobs] if seq._last_logprobs is not None else []) + list(lp[:-1])
        targets = chunk if seq._last_logprobs is not None else chunk[1:]
        for row, target in zip(preds, targets):
            seq.prompt_logprobs.append(_token_logprob(row, target, n_top))
        seq._last_logprobs = lp[-1]

    def _decode(self, seqs: list[Sequence]) -> list[TokenOut]:
        if self.max_batch == 1 and seqs[0].plain:
            s = seqs[0]
            room = s.budget - s.generated
            history = self.slot_ids[s.slot]
            if self.draft is not None:
                step = SpeculativeDecoder(self.runtime, self.draft).step(s.next_token, history, s.request.sampling,
                                                                         room, s.generator)
            else:
                step = self._plain.step(s.next_token, history, s.request.sampling, room, s.generator)
            return self._advance(s, step)
        top = max(s.slot for s in seqs) + 1
        bucket = 1
        while bucket < top:
            bucket *= 2
        bucket = min(bucket, self.max_batch)
        forward = self.steps.decode_forward()
        if bucket == 1:
            s = seqs[0]
            tokens = torch.tensor([[s.next_token]], dtype=torch.int64, device=self.device)
            logits = forward(tokens, torch.tensor([s.position], device=self.device))
        else:
            tok = [0] * bucket
            pos = [self.idle_position] * bucket
            for s in seqs:
                tok[s.slot], pos[s.slot] = s.next_token, s.position
            logits = forward(torch.tensor(tok, device=self.device).view(bucket, 1),
                             torch.tensor(pos, device=self.device).view(bucket, 1))
        for s in seqs:
            self.slot_ids[s.slot].append(s.next_token)
            s.position += 1
        rows = torch.tensor([s.slot for s in seqs], device=self.device)
        return self._sample(seqs, logits[:, -1].index_select(0, rows) if bucket > 1 else logits[:, -1])

    def _advance(self, s: Sequence, step: DecodeStep) -> list[TokenOut]:
        """Account for what a decoder produced for `s`: the fed token and every produced token but the
        last are now in the cache. A speculative step may produce tokens past a stop id or the budget;
        they are dropped, but the cache keeps them (they are the true ids at those positions, which is
        what prefix reuse compares against)."""
        held = self.slot_ids[s.slot]
        held.append(s.next_token)
        if len(step.tokens) > 1:
            held += step.tokens[:-1]
        s.draft_proposed += step.proposed
        s.draft_accepted += step.accepted
        out = []
        for t in step.tokens:
            s.position += 1
            out.append(self._emit(s, t))
            if s.done:
                break
        return out

    def _sample(self, seqs: list[Sequence], logits: Tensor) -> list[TokenOut]:
        """logits: (N, V) for `seqs` in order. One batched sampling step with per-row parameters."""
        logits = logits.float()
        if any(s.counts is not None or s.bias is not None or s.request.logits_processor for s in seqs):
            logits = logits.clone()
            for i, s in enumerate(seqs):
                row = _adjust(logits[i], s)
                if s.request.logits_processor is not None:
                    row = s.request.logits_processor(s.output, row)
                logits[i] = row
        tokens = sample_rows(logits, [s.request.sampling for s in seqs], [s.generator for s in seqs])
        want_lp = any(s.request.top_logprobs is not None for s in seqs)
        lps = torch.log_softmax(logits, dim=-1) if want_lp else None
        out = []
        for i, (s, t) in enumerate(zip(seqs, tokens.tolist())):
            lp = _token_logprob(lps[i], t, s.request.top_logprobs or 0) \
                if s.request.top_logprobs is not None else None
            out.append(self._emit(s, t, lp))
        return out

    def _emit(self, s: Sequence, t: int, lp: TokenLogprob | None = None) -> TokenOut:
        """`t` is `s`'s next token: count it, finish `s` at a stop id or its budget (leaving its slot)."""
        s.generated += 1
        s.output.append(t)
        if s.t_first is None:
            s.t_first = time.perf_counter()
        if s.counts is not None:
            s.counts[t] += 1
            s.seen[t] = True
        if t in s.request.stop_ids:
            s.finish_reason = "stop"
        elif s.generated >= s.budget:
            s.finish_reason = "length"
        s.next_token = t
        if s.done:
            self.release(s)
        return TokenOut(s, t, s.finish_reason, lp)


def _adjust(logits: Tensor, s: Sequence) -> Tensor:
    """One row's logits (V,) after its penalties and bias."""
    p = s.request.penalties
    if s.seen is not None and p.repetition != 1.0:
        scaled = torch.where(logits > 0, logits / p.repetition, logits * p.repetition)
        logits = torch.where(s.seen, scaled, logits)
    if s.counts is not None:
        logits = logits - p.frequency * s.counts - p.presence * (s.counts > 0).float()
    if s.bias is not None:
        logits = logits + s.bias
    return logits


def _token_logprob(row: Tensor, token: int, n_top: int) -> TokenLogprob:
    top: tuple[tuple[int, float], ...] = ()
    if n_top > 0:
        values, idx = torch.topk(row, min(n_top, row.size(-1)))
        # Tokens a logits processor ruled out (-inf: a grammar's mask) are no alternatives.
        top = tuple((i, v) for i, v in zip(idx.tolist(), values.tolist()) if v != float("-inf"))
    return TokenLogprob(float(row[token]), top)


def sample_rows(logits: Tensor, params: Seq[SamplingParams], generators: Seq[torch.Generator]) -> Tensor:
    """logits (N, V) -> ids (N,): row i sampled with params[i] (temperature, top-k, top-p) and its own
    generator, so a seeded request draws the same tokens whatever else shares the batch. Greedy rows
    take the argmax. Same distribution as torchchat.generation.sampling.sample, vectorized over rows
    with one Exp(1) noise draw per sampled row."""
    greedy = torch.argmax(logits, dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled_rows:
        return greedy
    V = logits.size(-1)
    idx = torch.tensor(sampled_rows, device=logits.device)
    sub = logits.index_select(0, idx)
    ps = [params[i] for i in sampled_rows]
    temps = torch.tensor([max(p.temperature, 1e-5) for p in ps], device=logits.device).view(-1, 1)
    sub = sub / temps
    ks = [p.top_k if p.top_k is not None and p.top_k < V else V for p in ps]
    if min(ks) < V:
        values = torch.topk(sub, max(ks), dim=-1).values
        kth = values.gather(1, torch.tensor(ks, device=logits.device).view(-1, 1) - 1)
        sub = sub.masked_fill(sub < kth, float("-inf"))
    probs = torch.softmax(sub, dim=-1)
    tops = [p.top_p if p.top_p is not None and p.top_p < 1.0 else 2.0 for p in ps]
    if min(tops) < 1.0:
        top_p = torch.tensor(tops, device=logits.device).view(-1, 1)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    noise = torch.empty_like(probs)
    for r, i in enumerate(sampled_rows):
        noise[r].exponential_(1, generator=generators[i])
    return greedy.index_copy(0, idx, torch.argmax(probs / noise, dim=-1))


def make_steps(runtime, options=None) -> Steps:
    """The prefill and decode functions over `runtime`, compiled per `options` (a CompileOptions): a
    CUDA graph for the fused CUDA model's decode step, the last-position forward for prompts."""
    from torchchat.generation.steps import CompileOptions
    from torchchat.model.layout import optimize_for_decode
    from torchchat.runtime.base import EagerRuntime

    if isinstance(runtime, EagerRuntime):
        optimize_for_decode(runtime.model)
    return Steps(runtime.forward, runtime.device, options or CompileOptions(), getattr(runtime, "graph_key", None),
                 getattr(runtime, "forward_last", None), precompiled=getattr(runtime, "precompiled", False))


def make_batch_engine(built, options=None, *, max_batch: int, max_seq_len: int | None = None,
                      parallel_prefill: bool = True) -> BatchEngine:
    """A BatchEngine over a BuiltModel with `max_batch` slots of `max_seq_len` positions (default: the
    model's own limit); forwards compiled per `options` (a CompileOptions). A compiled decode step
    sees one shape per batch bucket (1, 2, 4, ...): on CUDA each bucket gets its own CUDA graph."""
    runtime = built.runtime
    steps = make_steps(runtime, options)
    ctx = min(max_seq_len or runtime.max_seq_len, runtime.max_seq_len)
    return BatchEngine(runtime, max_batch, ctx, steps=steps, parallel_prefill=parallel_prefill)
