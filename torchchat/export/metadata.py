"""What an exported artifact says about itself (docs/export-metadata.md): one JSON object, written at
export time and read back by the Python runtimes and the C++ runners, so nothing is guessed from a
file name or taken from the original checkpoint."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from torchchat.errors import ConfigError, ExportError, TokenizerError
from torchchat.model.config import ModelConfig
from torchchat.model.params_check import validate_params

FORMAT_VERSION = 1

# torch dtypes -> the names artifact metadata stores.
METADATA_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}


@dataclass(frozen=True)
class TokenizerInfo:
    kind: str  # "sentencepiece" | "tiktoken" | "hf" | "gguf"
    bos_id: int | None
    eos_id: int | None
    stop_ids: tuple[int, ...]

    @classmethod
    def of(cls, tokenizer) -> "TokenizerInfo":
        return cls(tokenizer.kind, tokenizer.bos_id, tokenizer.eos_id, tuple(sorted(tokenizer.stop_ids)))


@dataclass(frozen=True)
class ArtifactMetadata:
    model_name: str
    config: ModelConfig  # the architecture; its own max_seq_len is the model's, not the artifact's
    tokenizer: TokenizerInfo
    max_seq_len: int  # positions the exported KV cache holds
    dtype: str  # "float32" | "bfloat16" | "float16"
    backend: str  # "aoti" | "executorch"
    device: str  # device the program was compiled for: "cpu" | "cuda"
    dynamic_shapes: bool  # True: forward takes S in [1, max_seq_len] tokens; False: S == 1 only
    weight_bytes: int  # weight bytes one decode step reads (bandwidth figures)
    quantize: dict[str, Any] | None = None  # the --quantize recipe, as JSON
    chat_template: str | None = None  # "llama2" | "llama3" | "hf" (the tokenizer's own) | None (base model)
    # The turn format the C++ runners write (chat_format.RUNNER_FORMATS: "chatml", "gemma", "phi3", ...), for
    # a model whose chat template they cannot render themselves; None: chat_template, or none known.
    runner_chat_format: str | None = None
    # Operator libraries the program calls besides torch's, loaded before it: "torchchat_cpu" for packed
    # GGUF / CPU-recipe weights (torchchat.kernels.cpu).
    native_ops: tuple[str, ...] = ()
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # keys this version does not know

    @property
    def torch_dtype(self) -> torch.dtype:
        return next(d for d, name in METADATA_DTYPE_NAMES.items() if name == self.dtype)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "model_name": self.model_name,
            "config": self.config.to_dict(),
            "tokenizer": {
                "kind": self.tokenizer.kind,
                "bos_id": self.tokenizer.bos_id,
                "eos_id": self.tokenizer.eos_id,
                "stop_ids": list(self.tokenizer.stop_ids),
            },
            "max_seq_len": self.max_seq_len,
            "dtype": self.dtype,
            "quantize": self.quantize,
            "dynamic_shapes": self.dynamic_shapes,
            "chat_template": self.chat_template,
            "backend": self.backend,
            "device": self.device,
            "weight_bytes": self.weight_bytes,
            **({"native_ops": list(self.native_ops)} if self.native_ops else {}),
            **({"runner_chat_format": self.runner_chat_format} if self.runner_chat_format else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> "ArtifactMetadata":
        """Parse and check metadata; `source` names the artifact in error messages."""
        hint = "re-export it with `torchchat.py export`"
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ExportError(f"{source}: its torchchat metadata is not valid JSON ({e}); {hint}") from e
        if not isinstance(data, dict):
            raise ExportError(f"{source}: its torchchat metadata is not a JSON object; {hint}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ExportError(
                f"{source}: metadata format_version {version!r}, this torchchat reads {FORMAT_VERSION}; "
                f"{hint}, or use the torchchat version that wrote it"
            )
        try:
            tok = data["tokenizer"]
            known = {
                "format_version", "model_name", "config", "tokenizer", "max_seq_len", "dtype", "quantize",
                "dynamic_shapes", "chat_template", "backend", "device", "weight_bytes", "native_ops",
                "runner_chat_format",
            }
            if not isinstance(data["config"], dict) or not isinstance(tok, dict):
                raise TypeError("config and tokenizer must be objects")
            validate_params(data["config"], f"{source}: metadata config")
            metadata = cls(
                model_name=str(data["model_name"]),
                config=ModelConfig.from_dict(data["config"]),
                tokenizer=TokenizerInfo(
                    kind=str(tok["kind"]), bos_id=tok.get("bos_id"), eos_id=tok.get("eos_id"),
                    stop_ids=tuple(int(i) for i in tok.get("stop_ids", ())),
                ),
                max_seq_len=int(data["max_seq_len"]),
                dtype=str(data["dtype"]),
                backend=str(data["backend"]),
                device=str(data.get("device", "cpu")),
                dynamic_shapes=bool(data["dynamic_shapes"]),
                weight_bytes=int(data["weight_bytes"]),
                quantize=data.get("quantize"),
                chat_template=data.get("chat_template"),
                runner_chat_format=data.get("runner_chat_format"),
                native_ops=tuple(str(x) for x in data.get("native_ops", ())),
                extra={k: v for k, v in data.items() if k not in known},
            )
        except ConfigError as e:
            raise ExportError(f"{e}; {hint}") from e
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise ExportError(f"{source}: its torchchat metadata is incomplete or malformed ({e!r}); {hint}") from e
        if metadata.dtype not in METADATA_DTYPE_NAMES.values():
            raise ExportError(f"{source}: metadata dtype {metadata.dtype!r} is not one of {', '.join(METADATA_DTYPE_NAMES.values())}")
        if not 0 < metadata.max_seq_len:
            raise ExportError(f"{source}: metadata max_seq_len {metadata.max_seq_len} is not positive; {hint}")
        return metadata

    def check_tokenizer(self, tokenizer, source: str) -> None:
        """The tokenizer must be the kind and size the model was exported with."""
        from torchchat.tokenizer.load import check_vocab

        if tokenizer.kind != self.tokenizer.kind:
            raise TokenizerError(
                f"{source} was exported with a {self.tokenizer.kind} tokenizer, but --tokenizer-path is a "
                f"{tokenizer.kind} tokenizer; pass the tokenizer of {self.model_name}"
            )
        check_vocab(tokenizer, self.config.vocab_size)

    def check_config(self, expected: ModelConfig, what: str, source: str) -> None:
        """The artifact must hold the architecture `what` names (a model name or params table)."""
        mine = self.config.with_max_seq_len(expected.max_seq_len).to_dict()
        theirs = expected.to_dict()
        diff = [k for k in theirs if mine.get(k) != theirs[k]]
        if diff:
            shown = ", ".join(f"{k} {mine.get(k)} vs {theirs[k]}" for k in diff[:4])
            raise ExportError(
                f"{source} holds model '{self.model_name}', whose architecture differs from {what} ({shown}); "
                "pass the artifact exported from that model, or drop the model name"
            )

