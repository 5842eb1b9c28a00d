"""What the server knows of its models: the loaded one (ServedModel) and the downloaded others it
lists on /v1/models (ListedModel), as OpenAI model cards."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torchchat.server import protocol


@dataclass(frozen=True)
class ListedModel:
    id: str
    created: int  # Unix seconds
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServedModel:
    """What the routes need to know about the loaded model."""

    id: str
    tokenizer: object  # torchchat.tokenizer.Tokenizer
    chat_format: object  # torchchat.generation.chat_format.ChatFormat: messages -> prompt ids
    chat_stop_ids: frozenset[int]  # the format's end-of-turn ids plus the tokenizer's own
    context: int  # positions in the KV cache: prompt + completion must fit
    fingerprint: str
    aliases: tuple[str, ...] = ()
    created: int = field(default_factory=protocol.now)


def model_card(m: ListedModel) -> dict:
    return {"id": m.id, "object": "model", "created": m.created, "owned_by": "torchchat"}


def downloaded_models(model_directory: Path) -> list[ListedModel]:
    """Registry models whose folder exists under `model_directory`, newest first."""
    from torchchat.model.registry import known_models

    found = []
    for entry in known_models():
        folder = entry.local_dir(model_directory)
        if folder.is_dir():
            found.append(ListedModel(entry.name, int(folder.stat().st_mtime), entry.aliases))
    return sorted(found, key=lambda m: -m.created)
