"""`download`, `list`, `where`, `remove`: the models in the model directory."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class InventoryRequest:
    command: str  # "download" | "list" | "where" | "remove"
    model: str | None
    model_directory: Path
    hf_token: str | None


def register(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    if name != "list":
        p.add_argument("model", metavar="MODEL", help="A known model name or alias (see `list`)")
    p.add_argument("--model-directory", type=Path, default=None,
                   help="Where downloaded models live (default $TORCHCHAT_MODELDIR or ~/.torchchat/model-cache)")
    if name == "download":
        p.add_argument("--hf-token", default=None,
                       help="Hugging Face token for gated models (default: $HF_TOKEN, else the `hf auth login` token)")
    p.add_argument("-v", "--verbose", action="store_true", help="Show tracebacks and extra detail")
    return p


def request(args: argparse.Namespace) -> InventoryRequest:
    from torchchat.inventory.store import default_model_directory

    return InventoryRequest(
        command=args.command,
        model=getattr(args, "model", None),
        model_directory=(args.model_directory or default_model_directory()).expanduser(),
        hf_token=getattr(args, "hf_token", None),
    )


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def list_table(model_directory: Path) -> str:
    from torchchat.inventory.store import list_models

    rows = [("MODEL", "ALIASES", "DOWNLOADED")]
    for s in list_models(model_directory):
        state = "yes" if s.downloaded else ("partial" if s.partial else "")
        rows.append((s.entry.name, ", ".join(s.entry.aliases), state))
    return _table(rows)


def run(args: argparse.Namespace) -> int:
    req = request(args)
    if req.command == "list":
        print(list_table(req.model_directory))
        print(f"\nModel directory: {req.model_directory}")
        return 0

    from torchchat.errors import UserInputError
    from torchchat.inventory import store
    from torchchat.model.registry import resolve_model

    entry = resolve_model(req.model)
    if req.command == "download":
        from torchchat.inventory.download import DownloadOptions, download_model

        already = store.status(entry, req.model_directory).downloaded
        folder = download_model(entry, DownloadOptions(req.model_directory, req.hf_token))
        print(f"{entry.name} {'is already downloaded' if already else 'downloaded'}: {folder}", file=sys.stderr)
        return 0
    if req.command == "where":
        status = store.status(entry, req.model_directory)
        if not status.downloaded:
            raise UserInputError(
                f"{entry.name} is not downloaded to {req.model_directory}; run: python3 torchchat.py download {req.model}"
            )
        print(status.path)
        return 0
    removed = store.remove(entry, req.model_directory)
    if removed:
        for path in removed:
            print(f"Removed {path}", file=sys.stderr)
    else:
        print(f"{entry.name} is not downloaded to {req.model_directory}; nothing to remove", file=sys.stderr)
    return 0
