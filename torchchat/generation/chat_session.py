"""A conversation with an engine: the messages so far, and a fresh context when the next turn would
not fit. Reusing the KV cache between turns is Engine.chat's job (it prefills only what the cache
does not already hold); this object decides what the conversation is."""
from __future__ import annotations

from typing import Iterator

from torchchat.errors import ContextLengthError
from torchchat.generation.chat_format import ChatFormat, Message
from torchchat.generation.engine import Engine, GenerationConfig, GenerationStats, Response


class ChatSession:
    """Usage: `session.add_user(text, cfg)` (True when earlier turns were dropped), then iterate
    `session.reply(cfg)` for the streamed reply, which joins the conversation when it ends."""

    def __init__(self, engine: Engine, chat_format: ChatFormat, system_prompt: str | None = None):
        self.engine = engine
        self.format = chat_format
        self.system_prompt = system_prompt or None
        self.messages: list[Message] = self._fresh()
        self.last_stats: GenerationStats | None = None
        self.last_finish: str | None = None
        # Render once now, so a template that refuses this setup (e.g. no system role) fails at the start.
        self.format.render(self._fresh() + [Message("user", "")])

    def _fresh(self) -> list[Message]:
        return [Message("system", self.system_prompt)] if self.system_prompt else []

    def prompt_tokens(self, messages: list[Message]) -> int:
        return len(self.format.encode(self.engine.tokenizer, messages))

    def add_user(self, text: str, cfg: GenerationConfig) -> bool:
        """Append a user message. When the conversation with it would leave less than
        min(max_new_tokens, context / 2) positions for the reply, earlier turns are dropped (a fresh
        context with the system prompt) and True is returned. A message that does not fit even in a
        fresh context raises ContextLengthError and leaves the conversation as it was."""
        if self.messages and self.messages[-1].role == "user":
            # The previous message never got a reply (interrupted before it began): this one replaces it.
            self.messages.pop()
        limit = self.engine.max_seq_len
        reserve = min(cfg.max_new_tokens, limit // 2)
        turn = [Message("user", text)]
        n = self.prompt_tokens(self.messages + turn)
        if n + reserve <= limit or (n < limit and len(self.messages) == len(self._fresh())):
            self.messages += turn
            return False
        fresh = self._fresh() + turn
        n_fresh = n if len(self.messages) == len(self._fresh()) else self.prompt_tokens(fresh)
        if n_fresh >= limit:
            raise ContextLengthError(
                f"that message takes {n_fresh} tokens with the chat template, and the context holds {limit}; "
                "shorten it (or raise --max-seq-length)"
            )
        self.messages = fresh
        return True

    def reply(self, cfg: GenerationConfig) -> Iterator[Response]:
        """Stream the assistant's reply (Response records as Engine.chat gives them). The reply joins the
        conversation when the stream ends, also when it is cut short (closed or interrupted)."""
        parts: list[str] = []
        self.last_finish = None
        try:
            for r in self.engine.chat(self.messages, cfg, self.format):
                parts.append(r.text)
                if r.finish_reason is not None:
                    self.last_stats, self.last_finish = r.stats, r.finish_reason
                yield r
        finally:
            self.messages.append(Message("assistant", "".join(parts)))
