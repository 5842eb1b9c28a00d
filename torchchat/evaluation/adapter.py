"""The lm-eval model: its three request types answered by one of our runtimes and the engine.

This module imports lm_eval at the top, so import it only after `torchchat.evaluation.tasks.require_lm_eval()`.
It touches the model only through the Runtime protocol (setup + forward) and the Engine, so eager,
AOT Inductor and ExecuTorch models all run unchanged; it never loads a model of its own.
"""
from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from torchchat.errors import ContextLengthError, UserInputError
from torchchat.evaluation.scoring import ForwardTimer, score_continuations
from torchchat.generation.engine import Engine, GenerationConfig
from torchchat.generation.sampling import SamplingParams
from torchchat.generation.steps import Steps, compile_forward

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default when a task names no limit
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


class TorchchatLM(TemplateLM):
    """lm-eval's LM over a Runtime and a Tokenizer (torchchat.tokenizer protocol).

    `max_length`: the most positions one forward sees (longer texts are scored in windows).
    `batch_size`: rows per forward when scoring log-likelihoods; generation runs one request at a
    time through the Engine. Every forward goes through `timer`, which records its wall time.
    `compile`: torch.compile the forward (dynamic shapes) for scoring and generation alike."""

    def __init__(self, runtime, tokenizer, *, max_length: int, batch_size: int = 1, compile: bool = False):
        super().__init__()
        if max_length < 2:
            raise UserInputError("--max-seq-length must be at least 2 to score anything")
        if batch_size < 1:
            raise UserInputError("--batch-size must be at least 1")
        if not runtime.supports_parallel_prefill and batch_size != 1:
            raise UserInputError("this runtime takes one token per call; use --batch-size 1")
        self.runtime = runtime
        self.tok = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        # The timer wraps the compiled forward (not the other way round): perf_counter cannot be traced.
        self.timer = ForwardTimer(compile_forward(runtime.forward) if compile else runtime.forward, runtime.device)
        self._device = runtime.device

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and the first rolling window) is conditioned on: BOS, else EOS."""
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Text -> ids, BOS first (as prompts are fed to Llama models) unless add_special_tokens is False."""
        bos = add_special_tokens is not False and self.tok.bos_id is not None
        return self.tok.encode(string, bos=bos)

    def _score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool) -> list[tuple[float, bool]]:
        self.runtime.setup(self.batch_size, self.max_length)
        with torch.no_grad(), tqdm(total=len(pairs), disable=disable_tqdm, desc="Scoring") as bar:
            scores = score_continuations(
                self.timer, pairs, max_len=self.max_length, batch_size=self.batch_size, device=self._device,
                parallel=self.runtime.supports_parallel_prefill, pad_id=self.prefix_token_id, progress=bar.update,
            )
        return [(s.logprob, s.greedy) for s in scores]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids), as TemplateLM makes them."""
        return self._score([(ctx, cont) for _, ctx, cont in requests], disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts (perplexity): each text, conditioned on the prefix token, is cut
        into windows of at most `max_length` predicted tokens as lm-eval defines them; all windows of all
        texts are scored together and summed per text."""
        pairs: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for i, req in enumerate(requests):
            (text,) = req.args
            ids = self.tok_encode(text, add_special_tokens=False)
            for window in get_rolling_token_windows(ids, self.prefix_token_id, self.max_length, 1):
                pairs.append(make_disjoint_window(window))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._score(pairs, disable_tqdm)):
            totals[i] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or the task's sampling) continuation of each context through the Engine, decoded alone
        (no leading space from the join with the context) and cut at the first of the task's stop strings;
        generation also ends at the tokenizer's stop ids."""
        engine = Engine(self.runtime, self.tok, Steps(self.timer, self._device), self.max_length)
        out = []
        with torch.no_grad():
            for req in tqdm(requests, disable=disable_tqdm, desc="Generating"):
                context, gen_kwargs = req.args
                out.append(self._generate_one(engine, context, gen_kwargs))
        return out

    def _generate_one(self, engine: Engine, context: str, gen_kwargs: dict[str, Any]) -> str:
        kwargs = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS)
        unknown = sorted(set(kwargs) - _GEN_KEYS)
        if unknown:
            raise UserInputError(
                f"the task asks for generation options {', '.join(unknown)}, which torchchat's engine does not "
                f"support; supported: {', '.join(sorted(_GEN_KEYS))}"
            )
        until = [s for s in kwargs["until"] if s]
        max_gen = int(kwargs["max_gen_toks"])
        if max_gen >= self.max_length:
            raise ContextLengthError(
                f"the task generates up to {max_gen} tokens but the context holds {self.max_length}; "
                "raise --max-seq-length"
            )
        if kwargs.get("do_sample"):
            sampling = SamplingParams(
                temperature=float(kwargs.get("temperature", 1.0)), top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p")
            )
        else:
            sampling = SamplingParams(temperature=0.0, top_k=None)
        prompt = self.tok_encode(context)[-(self.max_length - max_gen):]
        # The answer is the generated tokens decoded on their own, as lm-eval's `hf` backend does
        # (`tok_decode(cont_toks[len(context):])`): decoded after the prompt, a SentencePiece answer would
        # start with the space that joins it to the context, and a task that does not strip scores 0.
        text = ""
        cfg = GenerationConfig(max_new_tokens=max_gen, sampling=sampling)
        for response in engine.stream(prompt, cfg, text_prefix=()):
            text += response.text
            cut = min((i for i in (text.find(s) for s in until) if i >= 0), default=-1)
            if cut >= 0:
                return text[:cut]
        return text
