"""Quantization recipes: `--quantize` JSON -> a checked `QuantPlan` -> thin torchao `quantize_` calls,
except on the CPU, where `linear:int8` (8-bit), `linear:int4` and `linear:a8w4dq` are stored as GGML
blocks and run by torchchat's native kernels (torchchat/quantize_packed.py; `packs_on_cpu`).

A recipe is a JSON object (given inline, as a file, or as the name of a recipe shipped in
`torchchat/quant_config/`). Its keys:

- `"embedding"`: `{"bitwidth": 8|4, "groupsize": 0|32|64|128|256}` (weight-only, `tok_embeddings`)
- `"linear:int8"`: `{"bitwidth": 8|4, "groupsize": 0|32|64|128|256}` (weight-only)
- `"linear:int4"`: `{"groupsize": 32|64|128|256}` (weight-only, asymmetric groupwise)
- `"linear:a8w4dq"`: `{"groupsize": 32|64|128|256}` (int8 dynamic activations, int4 symmetric weights)
- `"linear:a8wxdq"`: `{"bitwidth": 1..7, "groupsize": 0|32|64|128|256, "has_weight_zeros": false|true}`
  (int8 dynamic activations, 1-7-bit weights; torchao's fast kernels on ARM CPUs, a reference path elsewhere)
- `"embedding:wx"`: `{"bitwidth": 1..7, "groupsize": 0|32|64|128|256, "has_weight_zeros": true|false}`
  (1-7-bit weight-only `tok_embeddings`)
- `"linear:afpwx"`: `{"bitwidth": 1..7, "groupsize": 32|64|128|256}` (weight-only, Apple GPUs: --device mps only)
- `"precision": {"dtype": ...}` and `"executor": {"accelerator": ...}`: defaults for --dtype / --device

`groupsize` counts the consecutive input features (along a weight row) that share one scale; 0 means one
scale per output channel (per embedding row). Everything is checked when the recipe is parsed and when
it is validated against the model's config and device, before any weight is loaded. The order of calls
(see torchchat/build.py): `parse_quantize` -> `QuantPlan.resolve` -> `QuantPlan.validate` ->
load weights, set dtype and device -> `apply_quantization`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from torchchat.errors import MissingDependencyError, QuantizationError

if TYPE_CHECKING:
    from torchchat.model.config import ModelConfig

RECIPE_DIR = Path(__file__).resolve().parent / "quant_config"

# Recipe "precision" dtype names -> canonical name. "fast"/"fast16" are resolved by build.py with the device.
PRECISION_NAMES: Mapping[str, str] = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
    "fast": "fast", "fast16": "fast16",
}
DEVICE_NAMES = ("cpu", "cuda", "cuda:N", "mps", "fast")


@dataclass(frozen=True)
class SchemeSpec:
    """What one quantization key accepts, and where torchao 0.18 has a kernel for it."""

    key: str
    targets: type[nn.Module]  # the module type whose `weight` it quantizes
    valid: Mapping[str, tuple[int, ...]]  # option -> accepted values
    defaults: Mapping[str, int]
    devices: tuple[str, ...]  # device types torchao runs it on
    elsewhere: str = ""  # said after "it runs on: ..." when the device is not one of them


LOWBITS = (1, 2, 3, 4, 5, 6, 7)  # the bit widths torchao's low-bit schemes take

SCHEMES: Mapping[str, SchemeSpec] = {
    spec.key: spec
    for spec in (
        SchemeSpec("embedding", nn.Embedding, {"bitwidth": (8, 4), "groupsize": (0, 32, 64, 128, 256)},
                   {"bitwidth": 8, "groupsize": 0}, ("cpu", "cuda")),
        SchemeSpec("linear:int8", nn.Linear, {"bitwidth": (8, 4), "groupsize": (0, 32, 64, 128, 256)},
                   {"bitwidth": 8, "groupsize": 0}, ("cpu", "cuda")),
        SchemeSpec("linear:int4", nn.Linear, {"groupsize": (32, 64, 128, 256)},
                   {"groupsize": 128}, ("cpu", "cuda")),
        SchemeSpec("linear:a8w4dq", nn.Linear, {"groupsize": (32, 64, 128, 256)},
                   {"groupsize": 256}, ("cpu", "cuda")),
        # The original torchchat's low-bit schemes (torchao's "experimental" kernels, now in torchao proper).
        SchemeSpec("linear:a8wxdq", nn.Linear,
                   {"bitwidth": LOWBITS, "groupsize": (0, 32, 64, 128, 256), "has_weight_zeros": (False, True)},
                   {"bitwidth": 4, "groupsize": 256, "has_weight_zeros": False}, ("cpu",),
                   " (torchao's kernels for it are CPU kernels)"),
        # Zero points by default: symmetric 1-bit has only the levels -1 and 0.
        SchemeSpec("embedding:wx", nn.Embedding,
                   {"bitwidth": LOWBITS, "groupsize": (0, 32, 64, 128, 256), "has_weight_zeros": (False, True)},
                   {"bitwidth": 4, "groupsize": 32, "has_weight_zeros": True}, ("cpu", "cuda")),
        SchemeSpec("linear:afpwx", nn.Linear, {"bitwidth": LOWBITS, "groupsize": (32, 64, 128, 256)},
                   {"bitwidth": 4, "groupsize": 256}, ("mps",),
                   " (torchao's Metal kernels for Apple GPUs); on a CPU use linear:a8wxdq with the same bitwidth"),
    )
}
SETTINGS = {"precision": "dtype", "executor": "accelerator"}  # key -> its one option
VALID_KEYS = (*SCHEMES, *SETTINGS)
# torchao's CPU int4 kernel (Int4OpaqueTensor) packs groups of 32, 64 or 128 only.
INT4_CPU_GROUPSIZES = (32, 64, 128)


def _join(values) -> str:
    return ", ".join(json.dumps(v) if isinstance(v, bool) else str(v) for v in values)


@dataclass(frozen=True)
class Scheme:
    """One quantization key with its options filled in (defaults included)."""

    key: str
    bitwidth: int | None  # None for the fixed-width linear:int4 / linear:a8w4dq
    groupsize: int  # input features per scale; 0 = one scale per output channel
    has_weight_zeros: bool | None = None  # low-bit schemes only: asymmetric weights (a zero point per group)

    @property
    def spec(self) -> SchemeSpec:
        return SCHEMES[self.key]

    def to_json(self) -> dict[str, int]:
        out = {"groupsize": self.groupsize}
        if self.bitwidth is not None:
            out = {"bitwidth": self.bitwidth, **out}
        if self.has_weight_zeros is not None:
            out["has_weight_zeros"] = self.has_weight_zeros
        return out


@dataclass(frozen=True)
class QuantPlan:
    """A parsed, self-consistent recipe. The empty plan (no --quantize) is valid and applies nothing."""

    embedding: Scheme | None = None
    linear: Scheme | None = None
    dtype: str | None = None  # canonical name from "precision" (see PRECISION_NAMES)
    device: str | None = None  # from "executor"
    source: str = field(default="--quantize", compare=False)  # where it came from, for messages

    @property
    def schemes(self) -> tuple[Scheme, ...]:
        """Embedding first, then linear: the order they are applied in."""
        return tuple(s for s in (self.embedding, self.linear) if s is not None)

    @property
    def is_empty(self) -> bool:
        return not self.schemes and self.dtype is None and self.device is None

    @classmethod
    def from_dict(cls, data: Any, source: str = "--quantize") -> "QuantPlan":
        """Check a recipe object key by key; the first problem raises QuantizationError."""
        if not isinstance(data, Mapping):
            raise QuantizationError(f"{source}: a recipe is a JSON object, got {type(data).__name__}")
        embedding = linear = dtype = device = None
        for key, options in data.items():
            if key not in VALID_KEYS:
                raise QuantizationError(
                    f"{source}: unknown key {key!r}; valid keys: {_join(VALID_KEYS)}"
                )
            if key in SETTINGS:
                value = _setting(source, key, options)
                if key == "precision":
                    dtype = value
                else:
                    device = value
                continue
            scheme = _scheme(source, key, options)
            if scheme.spec.targets is nn.Embedding:
                if embedding is not None:
                    raise QuantizationError(
                        f"{source}: {embedding.key!r} and {key!r} both quantize the embedding; keep one"
                    )
                embedding = scheme
            elif linear is not None:
                raise QuantizationError(
                    f"{source}: {linear.key!r} and {key!r} both quantize the linear layers; keep one"
                )
            else:
                linear = scheme
        return cls(embedding, linear, dtype, device, source)

    def to_json(self) -> dict[str, Any]:
        """The normalized recipe (defaults filled in); `QuantPlan.from_dict` reads it back."""
        out: dict[str, Any] = {s.key: s.to_json() for s in self.schemes}
        if self.dtype is not None:
            out["precision"] = {"dtype": self.dtype}
        if self.device is not None:
            out["executor"] = {"accelerator": self.device}
        return out

    def resolve(self, cli_dtype: str | None, cli_device: str | None) -> tuple[str | None, str | None, list[str]]:
        """Pick dtype and device names. A flag given on the command line wins over the recipe's
        "precision"/"executor", which wins over the defaults (None here: the caller applies its own).
        Returns (dtype name, device name, notes saying what was overridden, for the caller to print)."""
        notes = []
        dtype, device = cli_dtype, cli_device
        if cli_dtype is None:
            dtype = self.dtype
        elif self.dtype is not None and PRECISION_NAMES.get(cli_dtype, cli_dtype) != self.dtype:
            notes.append(f"--dtype {cli_dtype} overrides the recipe's precision dtype {self.dtype}")
        if cli_device is None:
            device = self.device
        elif self.device is not None and cli_device != self.device:
            notes.append(f"--device {cli_device} overrides the recipe's executor accelerator {self.device}")
        return dtype, device, notes

    def validate(self, config: ModelConfig, device: str, dtype: torch.dtype, cpu_kernels: bool = True) -> list[str]:
        """Check every scheme against the model's layer shapes (from `config`, no weights needed),
        the device ("cpu", "cuda", "cuda:0", ...) and the model dtype. Raises QuantizationError with
        what is valid; returns notes (layers left unquantized) for the caller to print."""
        if not self.schemes:
            return []
        from torchchat.model.transformer import Transformer

        with torch.device("meta"):
            skeleton = Transformer(config)
        return check_plan(self, skeleton, device, dtype, cpu_kernels)


def _setting(source: str, key: str, options: Any) -> str:
    option = SETTINGS[key]
    if not isinstance(options, Mapping) or set(options) != {option}:
        raise QuantizationError(f'{source}: {key!r} takes exactly {{"{option}": ...}}, got {json.dumps(options)}')
    value = options[option]
    if key == "precision":
        if not isinstance(value, str) or value not in PRECISION_NAMES:  # a list or object is unhashable
            raise QuantizationError(
                f"{source}: precision dtype {value!r} is not valid; valid: {_join(dict.fromkeys(PRECISION_NAMES))}"
            )
        return PRECISION_NAMES[value]
    base, _, index = str(value).partition(":")
    known = base in ("cpu", "cuda", "mps", "fast") and (not index or (base == "cuda" and index.isdigit()))
    if not isinstance(value, str) or not known:
        raise QuantizationError(f"{source}: executor accelerator {value!r} is not valid; valid: {_join(DEVICE_NAMES)}")
    return value


def _scheme(source: str, key: str, options: Any) -> Scheme:
    spec = SCHEMES[key]
    if not isinstance(options, Mapping):
        raise QuantizationError(
            f"{source}: {key!r} takes an object of options ({_join(spec.valid)}), got {json.dumps(options)}"
        )
    values = dict(spec.defaults)
    for name, value in options.items():
        if name not in spec.valid:
            raise QuantizationError(f"{source}: {key!r} has no option {name!r}; valid options: {_join(spec.valid)}")
        # The type must match too: bool is an int in Python (`true` is never a bit width, 1 is not a flag).
        if type(value) is not type(spec.valid[name][0]) or value not in spec.valid[name]:
            raise QuantizationError(
                f"{source}: {key!r} {name} {json.dumps(value)} is not valid; valid: {_join(spec.valid[name])}"
                + (" (0 = per channel)" if 0 in spec.valid[name] else "")
            )
        values[name] = value
    return Scheme(key, values.get("bitwidth"), values["groupsize"], values.get("has_weight_zeros"))


def parse_quantize(text_or_path: str | None) -> QuantPlan:
    """--quantize value -> plan. Accepts inline JSON (starts with "{"), a JSON file path, or the name
    of a shipped recipe ("cuda.json" or "cuda"); an existing file wins over a shipped name."""
    if text_or_path is None or not text_or_path.strip():
        return QuantPlan()
    text = text_or_path.strip()
    source = "--quantize"
    if not text.startswith(("{", "[")):
        path = _recipe_path(text)
        source = f"--quantize {text}"
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise QuantizationError(f"{source}: cannot read {path}: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise QuantizationError(f"{source}: not valid JSON ({e})") from e
    return QuantPlan.from_dict(data, source)


def shipped_recipes() -> list[str]:
    """File names of the recipes in torchchat/quant_config/."""
    return sorted(p.name for p in RECIPE_DIR.glob("*.json"))


def _recipe_path(name: str) -> Path:
    path = Path(name).expanduser()
    if path.is_file():
        return path
    shipped = RECIPE_DIR / (path.name if path.suffix == ".json" else f"{path.name}.json")
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    raise QuantizationError(
        f"--quantize {name}: not inline JSON, not a file, and not a shipped recipe; "
        f"shipped recipes: {_join(shipped_recipes())}"
    )


def _skip_reason(scheme: Scheme, device_type: str, dtype: torch.dtype, weight_shape: tuple[int, ...]) -> str | None:
    """Why this weight (out_features, row length) cannot take the scheme, or None if it can."""
    rows, row = weight_shape[0], weight_shape[-1]
    if scheme.groupsize and row % scheme.groupsize:
        return f"row length {row} is not a multiple of groupsize {scheme.groupsize}"
    if (scheme.key == "linear:int8" and scheme.bitwidth == 8 and not scheme.groupsize and device_type == "cpu"
            and dtype != torch.float32 and row % 8):
        # --compile and AOT Inductor rewrite per-channel int8 on bf16/fp16 into aten's CPU
        # `_weight_int8pack_mm`, which in torch 2.13 returns garbage (or crashes) when the row length is
        # not a multiple of 8 (seen with stories260K's hidden size 172); eager would be right, but the
        # same model must give the same tokens however it runs.
        return f"row length {row} is not a multiple of 8 (torch's CPU int8 kernel)"
    if scheme.key == "linear:int4" and device_type == "cpu" and rows % 16:
        return f"{rows} output features are not a multiple of 16 (torchao's CPU int4 packing)"
    return None


def _targets(model: nn.Module, scheme: Scheme, device_type: str, dtype: torch.dtype,
             exclude: set[str] = frozenset()) -> tuple[list[str], dict[str, list[str]]]:
    """Names of the modules torchao quantizes for the scheme, and the names it must skip grouped by
    reason; `exclude`: modules taken by the native CPU kernels instead."""
    chosen, skipped = [], {}
    for name, module in model.named_modules():
        if type(module) is not scheme.spec.targets or name in exclude:
            continue
        reason = _skip_reason(scheme, device_type, dtype, tuple(module.weight.shape))
        if reason is None:
            chosen.append(name)
        else:
            skipped.setdefault(reason, []).append(name)
    return chosen, skipped


def packs_on_cpu(scheme: Scheme, device_type: str, cpu_kernels: bool = True) -> bool:
    """Whether `scheme` is stored in GGML blocks and run by torchchat's native CPU kernels
    (torchchat/quantize_packed.py) rather than by torchao: on the CPU, where the kernels run."""
    from torchchat.quantize_packed import RECIPE_TYPES

    if not cpu_kernels or device_type != "cpu" or scheme.key not in RECIPE_TYPES:
        return False
    if scheme.key == "linear:int8" and scheme.bitwidth != 8:
        return False
    from torchchat.model.packed import kernels_unavailable

    return kernels_unavailable() is None


def _packed_targets(model: nn.Module, scheme: Scheme) -> list[str]:
    """The nn.Linear modules a packed scheme stores in GGML blocks (rows of whole blocks and groups)."""
    from torchchat.quantize_packed import packs

    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and packs(scheme.key, scheme.bitwidth, scheme.groupsize, m.in_features)]


def check_plan(plan: QuantPlan, model: nn.Module, device: str, dtype: torch.dtype, cpu_kernels: bool = True) -> list[str]:
    """The checks behind `QuantPlan.validate`, on any module tree (real or on the meta device).
    cpu_kernels: whether the native CPU kernels may run the linear recipes (see `packs_on_cpu`)."""
    device_type = torch.device(device).type
    notes = []
    for scheme in plan.schemes:
        where = f"{plan.source}: {scheme.key!r}"
        if device_type not in scheme.spec.devices:
            raise QuantizationError(
                f"{where} cannot run on {device_type}; it runs on: {_join(scheme.spec.devices)}{scheme.spec.elsewhere}"
            )
        notes += _lowbit_notes(scheme, device_type)
        packed: set[str] = set()
        if packs_on_cpu(scheme, device_type, cpu_kernels):
            # GGML blocks on the native kernels: any groupsize and dtype; rows that are not whole blocks
            # (and groups) go to torchao under its own rules below.
            packed = set(_packed_targets(model, scheme))
        elif scheme.key == "linear:int4":
            if device_type == "cpu" and scheme.groupsize not in INT4_CPU_GROUPSIZES:
                raise QuantizationError(
                    f"{where} groupsize {scheme.groupsize} has no CPU kernel in torchao; "
                    f"on cpu valid groupsizes are {_join(INT4_CPU_GROUPSIZES)} (or use a recipe for cuda)"
                )
            if dtype != torch.bfloat16:
                # On cuda the tinygemm kernel takes bf16 only; on cpu other dtypes run, but several times
                # slower than the unquantized model (measured: docs/quantization.md).
                raise QuantizationError(
                    f"{where} needs a bf16 model (torchao's int4 kernels), got {_dtype_name(dtype)}; use --dtype bf16"
                )
        if (scheme.key == "linear:int8" and scheme.bitwidth == 8 and device_type == "cpu" and dtype == torch.float32
                and not packed):
            notes.append("linear:int8 on an fp32 CPU model runs slower than no quantization (torchao 0.18); "
                         "it pays off with --dtype bf16")
        chosen, skipped = _targets(model, scheme, device_type, dtype, exclude=packed)
        if not chosen and not packed:
            fits = [
                g for g in scheme.spec.valid["groupsize"]
                if _targets(model, Scheme(scheme.key, scheme.bitwidth, g), device_type, dtype)[0]
                and (scheme.key != "linear:int4" or device_type != "cpu" or g in INT4_CPU_GROUPSIZES)
            ]
            raise QuantizationError(
                f"{where} groupsize {scheme.groupsize} fits no layer of this model ({'; '.join(skipped)}), "
                f"so nothing would be quantized; groupsizes that fit: {_join(fits) or 'none'}"
            )
        for reason, names in skipped.items():
            notes.append(f"{scheme.key}: {len(names)} layer(s) left unquantized, {reason}: {_abbreviate(names)}")
    return notes


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def _abbreviate(names: list[str], limit: int = 4) -> str:
    shown = _join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _torchao_config(scheme: Scheme, device_type: str):
    """The torchao 0.18 config that runs `scheme` on `device_type`. set_inductor_config=False: the
    generation code owns inductor settings; quantizing must not change global state."""
    try:
        from torchao.quantization import (
            Int4WeightOnlyConfig,
            Int8DynamicActivationIntxWeightConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
            PerAxis,
            PerGroup,
            PerRow,
        )
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    except ImportError as e:
        raise MissingDependencyError(
            f"--quantize needs torchao ({e}); install it with: pip install torchao==0.18.0"
        ) from e

    if scheme.key in LOWBIT_SCHEMES:
        return _lowbit_config(scheme)
    per_row = scheme.groupsize == 0
    if scheme.key == "linear:int8" and scheme.bitwidth == 8:
        return Int8WeightOnlyConfig(
            granularity=PerRow() if per_row else PerGroup(scheme.groupsize), set_inductor_config=False
        )
    if scheme.key in ("linear:int8", "embedding"):
        return IntxWeightOnlyConfig(
            weight_dtype=torch.int8 if scheme.bitwidth == 8 else torch.int4,
            granularity=PerAxis(0) if per_row else PerGroup(scheme.groupsize),
        )
    if scheme.key == "linear:int4" and device_type == "cpu":
        return PrototypeInt4WeightOnlyConfig(group_size=scheme.groupsize, set_inductor_config=False)
    if scheme.key == "linear:int4":
        return Int4WeightOnlyConfig(
            group_size=scheme.groupsize, int4_packing_format="tile_packed_to_4d", set_inductor_config=False
        )
    return Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=PerGroup(scheme.groupsize)
    )


LOWBIT_SCHEMES = ("linear:a8wxdq", "embedding:wx", "linear:afpwx")


def _arm_kernels_loaded() -> bool:
    """Whether torchao's low-bit CPU kernels are here: torchao ships them (`torch.ops.torchao`, loaded
    when torchao is imported) only in its ARM builds (macOS arm64, Linux aarch64)."""
    import platform

    if platform.machine().lower() not in ("arm64", "aarch64"):
        return False
    import torchao  # noqa: F401  (loads the kernel library where the wheel has one)

    return hasattr(torch.ops.torchao, "_pack_8bit_act_4bit_weight")


def _lowbit_notes(scheme: Scheme, device_type: str) -> list[str]:
    """Where a low-bit scheme runs torchao's reference path rather than a fast kernel."""
    if scheme.key == "linear:a8wxdq" and device_type == "cpu" and not _arm_kernels_loaded():
        return [f"linear:a8wxdq: torchao's fast low-bit kernels are ARM CPU kernels; here (no ARM kernels) a "
                f"correct but slow reference path runs ({scheme.bitwidth}-bit weights stored as int8)"]
    if scheme.key == "embedding:wx":
        return [f"embedding:wx: {scheme.bitwidth}-bit values are stored one per byte and dequantized on lookup "
                "(the same numbers as packed storage; the memory saving of packing needs torchao's ARM kernels)"]
    return []


def _lowbit_config(scheme: Scheme):
    """The torchao 0.18 config of linear:a8wxdq, embedding:wx or linear:afpwx (the original torchchat's
    names for torchao's low-bit schemes)."""
    from torchao.quantization import (
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
        MappingType,
        PerAxis,
        PerGroup,
    )

    bits = getattr(torch, f"int{scheme.bitwidth}")
    granularity = PerAxis(0) if scheme.groupsize == 0 else PerGroup(scheme.groupsize)
    mapping = MappingType.ASYMMETRIC if scheme.has_weight_zeros else MappingType.SYMMETRIC
    if scheme.key == "embedding:wx":
        return IntxWeightOnlyConfig(weight_dtype=bits, granularity=granularity, mapping_type=mapping)
    if scheme.key == "linear:a8wxdq":
        from torchao.quantization.quantize_.workflows import IntxPackingFormat

        packing = IntxPackingFormat.OPAQUE_TORCHAO_AUTO if _arm_kernels_loaded() else IntxPackingFormat.UNPACKED_TO_INT8
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=bits, weight_granularity=granularity, weight_mapping_type=mapping, intx_packing_format=packing
        )
    try:
        from torchao.experimental.quant_api import UIntxWeightOnlyConfig
    except ImportError as e:
        raise MissingDependencyError(
            f"linear:afpwx needs torchao's MPS kernels ({e}); install torchao built with them on an Apple Silicon Mac"
        ) from e
    return UIntxWeightOnlyConfig(bitwidth=scheme.bitwidth, group_size=scheme.groupsize)


def apply_quantization(model: nn.Module, plan: QuantPlan, device: str, cpu_kernels: bool = True) -> None:
    """Quantize `model` in place (weights loaded, dtype set, already on `device`). Layers whose row
    length the groupsize does not divide stay unquantized (see `QuantPlan.validate`'s notes). On the CPU
    the linear recipes go to GGML blocks and the native kernels (`packs_on_cpu`; cpu_kernels=False:
    torchao, e.g. for an ExecuTorch export), the rest to torchao."""
    if not plan.schemes:
        return
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    check_plan(plan, model, device, dtype, cpu_kernels)
    from torchao.quantization import quantize_

    device_type = torch.device(device).type
    for scheme in plan.schemes:
        if packs_on_cpu(scheme, device_type, cpu_kernels):
            from torchchat.quantize_packed import pack_linears

            pack_linears(model, scheme.key, scheme.groupsize, set(_packed_targets(model, scheme)))
        chosen = set(_targets(model, scheme, device_type, dtype)[0])
        if chosen:
            quantize_(model, _torchao_config(scheme, device_type), filter_fn=lambda _m, fqn: fqn in chosen)

