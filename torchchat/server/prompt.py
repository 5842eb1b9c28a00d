"""Requests -> prompt token ids: the one place the server turns chat messages into a prompt.

Chat models (the registry's `chat_template`) get their Meta prompt format; a base model (no template,
e.g. stories260K or a bare checkpoint) gets the messages' text joined by newlines after BOS, so a user
message is simply continued."""
from __future__ import annotations

from typing import Sequence

from torchchat.errors import UserInputError

Message = tuple[str, str]  # (role, text); role is system | developer | user | assistant | tool


def chat_prompt_ids(tokenizer, template: str | None, messages: Sequence[Message]) -> list[int]:
    """Token ids of a conversation ending where the assistant's reply begins."""
    if template == "llama3":
        return _llama3(tokenizer, messages)
    if template == "llama2":
        return _llama2(tokenizer, messages)
    if template is None:
        return _plain(tokenizer, messages)
    raise UserInputError(f"unknown chat template '{template}'; known: llama2, llama3")


def completion_prompt_ids(tokenizer, prompt: str | list[int]) -> list[int]:
    """A text prompt is encoded after BOS (as `generate` does); token ids are taken as given."""
    if isinstance(prompt, list):
        return list(prompt)
    return tokenizer.encode(prompt, bos=tokenizer.bos_id is not None)


def _plain(tok, messages: Sequence[Message]) -> list[int]:
    text = "\n".join(t for _, t in messages if t)
    return tok.encode(text, bos=tok.bos_id is not None)


def _llama3(tok, messages: Sequence[Message]) -> list[int]:
    # <|begin_of_text|> then, per message, <|start_header_id|>ROLE<|end_header_id|>\n\nTEXT<|eot_id|>,
    # then an open assistant header. Only the template's own markers are special tokens: a message
    # that contains "<|eot_id|>" is encoded as that plain text.
    roles = {"developer": "system", "tool": "ipython"}

    def special(text: str) -> list[int]:
        return tok.encode(text, allow_special=True)

    ids = special("<|begin_of_text|>")
    for role, text in messages:
        ids += special(f"<|start_header_id|>{roles.get(role, role)}<|end_header_id|>\n\n")
        ids += tok.encode(text.strip()) + special("<|eot_id|>")
    return ids + special("<|start_header_id|>assistant<|end_header_id|>\n\n")


def _llama2(tok, messages: Sequence[Message]) -> list[int]:
    # BOS [INST] <<SYS>>\nSYSTEM\n<</SYS>>\n\nUSER [/INST] ANSWER EOS, one BOS..EOS per exchange;
    # the system prompt goes inside the first user turn.
    system = "\n".join(t.strip() for r, t in messages if r in ("system", "developer"))
    turns = [(r, t.strip()) for r, t in messages if r not in ("system", "developer")]
    ids: list[int] = []
    pending_user: str | None = None
    for role, text in turns:
        if role == "assistant":
            user = pending_user or ""
            ids += tok.encode(f"[INST] {user} [/INST] {text} ", bos=True, eos=True)
            pending_user = None
        else:
            if system:
                text, system = f"<<SYS>>\n{system}\n<</SYS>>\n\n{text}", ""
            pending_user = text if pending_user is None else f"{pending_user}\n{text}"
    return ids + tok.encode(f"[INST] {pending_user or ''} [/INST]", bos=True)
