"""Log-likelihoods computed by hand with a runtime's forward: the references the evaluation tests
compare against."""
from __future__ import annotations

import torch


def token_logprobs(runtime, ids: list[int]) -> torch.Tensor:
    """log p(ids[j] | ids[:j]) for j >= 1, from one unpadded forward of ids[:-1] at positions 0.. ; (len(ids)-1,)."""
    runtime.setup(1, len(ids))
    with torch.no_grad():
        logits = runtime.forward(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1))[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return logprobs.gather(-1, torch.tensor(ids[1:]).view(-1, 1)).view(-1)


def continuation_logprob(runtime, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | BOS + context), the continuation's tokens taken from the joint encoding
    (as lm-eval splits a pair: encode the whole, drop the context's tokens)."""
    whole = tokenizer.encode(context + continuation, bos=True)
    n_ctx = len(tokenizer.encode(context, bos=True))
    return float(token_logprobs(runtime, whole)[n_ctx - 1 :].sum())
