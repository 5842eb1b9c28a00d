"""Token logprobs in OpenAI's two response shapes: chat's `logprobs.content` (a record per token with
its text, bytes and top alternatives) and completions' legacy `logprobs` (parallel lists `tokens`,
`token_logprobs`, `top_logprobs` as {text: logprob} dicts, `text_offset`), which lm-eval's
`local-completions` backend reads to score prompts (echo + logprobs).

A token's text is what it adds after the token before it: SentencePiece renders "▁world" as "world"
alone but " world" after another piece, so each token is decoded behind its predecessor. Logprobs are
natural logs of the model's distribution after penalties and logit bias, before temperature, top-k
and top-p (as vLLM reports them by default)."""
from __future__ import annotations

from typing import Any, Sequence

from torchchat.generation.batch import TokenLogprob
from torchchat.server.worker import TokenInfo


class TokenTexts:
    """Token id -> its text after a given previous id, with a small cache (top alternatives repeat)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._cache: dict[tuple[int | None, int], str] = {}

    def text(self, prev: int | None, token: int) -> str:
        key = (prev, token)
        if key not in self._cache:
            if prev is None:
                self._cache[key] = self.tok.decode([token])
            else:
                self._cache[key] = self.tok.decode([prev, token])[len(self.tok.decode([prev])):]
            if len(self._cache) > 100_000:
                self._cache.clear()
        return self._cache[key]


def chat_content(texts: TokenTexts, infos: Sequence[TokenInfo], prev: int | None) -> list[dict[str, Any]]:
    """Chat's `logprobs.content` records for `infos`, the first following token `prev`."""
    out = []
    for info in infos:
        lp = info.logprob or TokenLogprob(0.0)
        text = texts.text(prev, info.token)
        out.append({
            "token": text, "logprob": lp.logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": (t := texts.text(prev, i)), "logprob": v, "bytes": list(t.encode())}
                             for i, v in lp.top],
        })
        prev = info.token
    return out


class CompletionLogprobs:
    """Completions' legacy `logprobs` object, built token by token (the prompt's first, with echo)."""

    def __init__(self, texts: TokenTexts, prev: int | None = None, offset: int = 0):
        self.texts, self.prev, self.offset = texts, prev, offset

    def add(self, tokens: Sequence[int], lps: Sequence[TokenLogprob | None]) -> dict[str, list]:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, lp in zip(tokens, lps):
            text = self.texts.text(self.prev, token)
            out["tokens"].append(text)
            out["token_logprobs"].append(None if lp is None else lp.logprob)
            out["top_logprobs"].append(None if lp is None else
                                       {self.texts.text(self.prev, i): v for i, v in lp.top})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            self.prev = token
        return out


def merge(a: dict[str, list] | None, b: dict[str, list]) -> dict[str, list]:
    if a is None:
        return b
    return {k: a[k] + b[k] for k in a}
