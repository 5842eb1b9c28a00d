"""Completion requests -> prompt token ids. (Chat requests are rendered by the model's chat format,
`torchchat.generation.chat_format`, the same code the `chat` command uses.)"""
from __future__ import annotations


def completion_prompt_ids(tokenizer, prompt: str | list[int]) -> list[int]:
    """A text prompt is encoded after BOS (as `generate` does); token ids are taken as given."""
    if isinstance(prompt, list):
        return list(prompt)
    return tokenizer.encode(prompt, bos=tokenizer.bos_id is not None)
