"""Known models and params tables, read from the package's data files. Names match exactly (a name or
one of its aliases); an unknown name answers with the close matches, never a fuzzy pick."""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from torchchat.errors import ConfigError, UnknownModelError
from torchchat.model.config import ModelConfig


@dataclass(frozen=True)
class ModelEntry:
    name: str  # canonical name, e.g. "meta-llama/Llama-3.2-1B-Instruct"; also its folder in the cache
    aliases: tuple[str, ...]
    params: str  # params-table key
    tokenizer_file: str  # path inside the model folder
    chat_template: str | None  # "llama2" | "llama3" | "hf" (the tokenizer's own chat_template) | None for base models
    hf_repo: str | None = None
    urls: tuple[str, ...] = ()
    checkpoint_file: str | None = None  # for direct-URL models

    @property
    def is_chat(self) -> bool:
        return self.chat_template is not None

    def local_dir(self, model_directory: Path) -> Path:
        return Path(model_directory) / self.name


@lru_cache(maxsize=1)
def _models() -> dict[str, ModelEntry]:
    raw: dict[str, Any] = json.loads(resources.files("torchchat.model_config").joinpath("models.json").read_text())
    entries = {}
    for name, e in raw.items():
        entries[name] = ModelEntry(
            name=name,
            aliases=tuple(e.get("aliases", ())),
            params=e["params"],
            tokenizer_file=e["tokenizer"]["file"],
            chat_template=e.get("chat_template"),
            hf_repo=e["source"].get("hf_repo"),
            urls=tuple(e["source"].get("urls", ())),
            checkpoint_file=e.get("checkpoint"),
        )
    return entries


def known_models() -> list[ModelEntry]:
    return list(_models().values())


def _names() -> dict[str, str]:
    """Every accepted name (canonical and alias) -> canonical name."""
    out = {}
    for entry in _models().values():
        out[entry.name] = entry.name
        for alias in entry.aliases:
            out[alias] = entry.name
    return out


def resolve_model(name: str) -> ModelEntry:
    names = _names()
    if name in names:
        return _models()[names[name]]
    close = difflib.get_close_matches(name, list(names), n=4, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"unknown model '{name}'.{hint} Run 'torchchat.py list' for known models, or pass --checkpoint-path."
    )


def params_table_names() -> list[str]:
    folder = resources.files("torchchat.model_params")
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def params_table(key: str) -> ModelConfig:
    """The ModelConfig of a shipped params table (exact key, e.g. "stories15M", "Meta-Llama-3.1-8B")."""
    folder = resources.files("torchchat.model_params")
    path = folder.joinpath(f"{key}.json")
    if not path.is_file():
        keys = params_table_names()
        close = difflib.get_close_matches(key, keys, n=4, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown params table '{key}'.{hint} Known tables: {', '.join(keys)}")
    return ModelConfig.from_params(json.loads(path.read_text()), source=f"params table {key}")
