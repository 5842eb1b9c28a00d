"""vLLM's tokenizer routes: POST /tokenize, POST /detokenize, GET /tokenizer_info. lm-eval's
`local-completions` backend with `tokenizer_backend=remote` tokenizes through them, so it can score
against this server with the served model's own tokenizer and no Hugging Face download."""
from __future__ import annotations

from typing import Callable

from pydantic import BaseModel, ConfigDict, Field


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    prompt: str
    add_special_tokens: bool = True  # vLLM's default: BOS first, where the tokenizer has one


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    tokens: list[int] = Field(max_length=1_000_000)


def add_routes(app, tokenizer, context: int, dependencies: list, bad_request: Callable[[str, str], Exception]) -> None:
    """Register the three routes on `app` behind `dependencies` (the API key check)."""

    def piece(token_id: int | None) -> str | None:
        return None if token_id is None else tokenizer.decode([token_id]) or None

    @app.post("/tokenize", dependencies=dependencies)
    async def tokenize(body: TokenizeRequest) -> dict:
        bos = body.add_special_tokens and tokenizer.bos_id is not None
        ids = tokenizer.encode(body.prompt, bos=bos)
        return {"tokens": ids, "count": len(ids), "max_model_len": context}

    @app.post("/detokenize", dependencies=dependencies)
    async def detokenize(body: DetokenizeRequest) -> dict:
        bad = [i for i in body.tokens if not 0 <= i < tokenizer.vocab_size]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary (0..{tokenizer.vocab_size - 1})", "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info", dependencies=dependencies)
    async def tokenizer_info() -> dict:
        # No token strings for BOS/EOS: a remote client would encode them back as text, which
        # SentencePiece does not map to the special ids; lm-eval then uses its own defaults.
        return {"tokenizer_class": type(tokenizer).__name__, "vocab_size": tokenizer.vocab_size,
                "max_model_len": context, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                "eos_token": None, "bos_token": None, "pad_token": None}
