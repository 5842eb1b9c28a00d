"""BuildSpec -> a ready model, in two steps. Resolving (`resolve_spec`): the registry entry,
the checkpoint (downloaded if named), its config and mapped weights, the tokenizer file, checked
against the quantize plan and the memory there is -> one `ResolvedModel`. Materializing
(`materialize`): that weight source (or random weights) -> one model, meta-device init then tensor-parallel,
fused CUDA or plain modules. An exported artifact skips both (`build_exported`).

Library callers make a BuildSpec themselves; the CLI makes one in `torchchat/cli/args.py`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchchat.checkpoint.loaded import LoadedCheckpoint
from torchchat.errors import CheckpointError, DeviceError, QuantizationError, TokenizerError, UserInputError
from torchchat.inventory.store import default_model_directory
from torchchat.model.config import ModelConfig
from torchchat.model.dummy_weights import dummy_tensor, init_dummy_weights
from torchchat.model.registry import ModelEntry, params_table, resolve_model


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. Exactly one of: a registry name, a checkpoint, a GGUF file, an
    exported artifact, or (with dummy_weights) only a params table/JSON."""

    name: str | None = None
    checkpoint_path: Path | None = None
    gguf_path: Path | None = None
    params_table: str | None = None
    params_path: Path | None = None
    tokenizer_path: Path | None = None
    model_directory: Path = field(default_factory=default_model_directory)
    dummy_weights: bool = False
    aoti_package_path: Path | None = None
    dso_path: Path | None = None
    pte_path: Path | None = None


@dataclass(frozen=True)
class BuildSpec:
    """What to build. The device, and a dtype given by name, are resolved once, when the spec is made
    (`resolve_device`, `resolve_dtype`): whoever reads a spec sees a real device and a torch dtype."""

    source: ModelSource
    device: str = "cpu"  # fast | cpu | cuda[:N] | mps; "fast" becomes the best device there is
    dtype: torch.dtype | str | None = torch.float32  # or a --dtype name; None: an exported artifact's own
    quant: Any = None  # torchchat.quantize.QuantPlan, or None
    max_seq_len: int | None = None  # cap on the context (KV cache) length
    seed: int = 1234  # for --dummy-weights
    tp: Any = None  # torchchat.distributed.tensor_parallel.TPContext: shard the model over its ranks
    cuda_kernels: bool = True  # on CUDA, torchchat's fused Triton kernels (torchchat.kernels); False: PyTorch modules
    num_threads: int | None = None  # CPU threads; None: torchchat.runtime.threads.default_threads() (load-aware)
    # On the CPU, GGUF block-quantized weights and the linear recipes run on torchchat's native kernels
    # (torchchat.model.packed); False: as before (dequantized / torchao), e.g. for an ExecuTorch export.
    cpu_kernels: bool = True

    def __post_init__(self):
        device = resolve_device(self.device)
        object.__setattr__(self, "device", device)
        if isinstance(self.dtype, str):
            object.__setattr__(self, "dtype", resolve_dtype(self.dtype, device))


@dataclass
class BuiltModel:
    runtime: Any  # torchchat.runtime.Runtime
    tokenizer: Any  # torchchat.tokenizer.Tokenizer
    config: ModelConfig
    entry: ModelEntry | None = None
    model: torch.nn.Module | None = None  # the eager module, when there is one
    chat_template: str | None = None  # "llama2" | "llama3" | None (unknown / base)
    is_chat: bool | None = None  # None: nothing says either way
    name: str = "model"
    notes: list[str] = field(default_factory=list)
    dtype: torch.dtype | None = None  # the weights' dtype (an exported artifact's, from its metadata)


def resolve_device(name: str) -> str:
    """'fast' -> cuda, then mps, then cpu. An explicit device must exist."""
    if name == "fast":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    base = name.split(":")[0]
    if base == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: CUDA is not available on this machine; use --device cpu (or fast)")
    if base == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("--device mps: MPS is not available on this machine; use --device cpu (or fast)")
    if base not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unknown device '{name}'; use one of fast, cpu, cuda, mps")
    return name


# --dtype names -> torch dtypes; with the two names resolved per device, what --dtype accepts.
DTYPE_BY_NAME = {
    "fp32": torch.float32, "float": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "half": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
DTYPE_CHOICES = (*DTYPE_BY_NAME, "fast", "fast16")


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """'fast'/'fast16': bfloat16, except float16 on MPS without bfloat16 support (as the original)."""
    if name in ("fast", "fast16"):
        if device.startswith("mps") and not torch.backends.mps.is_macos_or_newer(14, 0):
            return torch.float16
        return torch.bfloat16
    try:
        return DTYPE_BY_NAME[name]
    except KeyError:
        raise UserInputError(f"unknown dtype '{name}'; use one of {', '.join(DTYPE_CHOICES)}") from None


def _find_in_dir(folder: Path, entry: ModelEntry | None) -> tuple[Path, Path | None]:
    """(checkpoint, tokenizer) inside a downloaded model folder."""
    if entry is not None and entry.checkpoint_file and (folder / entry.checkpoint_file).exists():
        checkpoint = folder / entry.checkpoint_file
    elif (folder / "config.json").is_file():
        checkpoint = folder
    else:
        candidates = [folder / "model.pth", *sorted(folder.glob("*.gguf")), *sorted(folder.glob("original/consolidated.*.pth"))]
        checkpoint = next((c for c in candidates if c.exists()), None)
        if checkpoint is None:
            raise CheckpointError(f"{folder}: no checkpoint found (model.pth, config.json + safetensors, *.gguf)")
    tokenizer = None
    names = [entry.tokenizer_file] if entry is not None else []
    names += ["tokenizer.json", "tokenizer.model", "original/tokenizer.model"]
    for name in names:
        if (folder / name).is_file():
            tokenizer = folder / name
            break
    return checkpoint, tokenizer


def _tokenizer_beside(checkpoint: Path) -> Path | None:
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    for name in ("tokenizer.json", "tokenizer.model", "original/tokenizer.model"):
        if (folder / name).is_file():
            return folder / name
    return None


def check_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Check a state dict's names and shapes against an (unsharded) model; a tied output is dropped."""
    from torchchat.checkpoint.state_dict import check_fits

    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        expected.pop("output.weight")
        state_dict.pop("output.weight", None)
    check_fits(state_dict, expected, source)


def load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Assign a (memory-mapped) state dict onto a meta-initialised model, checking names and shapes."""
    config: ModelConfig = model.config
    check_weights(model, state_dict, source)
    model.load_state_dict(state_dict, assign=True, strict=not config.tie_embeddings)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight


def _exported_artifact(src: ModelSource) -> tuple[str, Path] | None:
    """(flag, path) of the exported artifact a source names, if any."""
    given = [(flag, path) for flag, path in (("--aoti-package-path", src.aoti_package_path),
                                             ("--dso-path", src.dso_path), ("--pte-path", src.pte_path))
             if path is not None]
    if len(given) > 1:
        raise UserInputError(f"give one exported artifact, not {' and '.join(flag for flag, _ in given)}")
    return given[0] if given else None


def build_exported(spec: BuildSpec, flag: str, path: Path) -> BuiltModel:
    """A BuiltModel over an exported artifact: runtime from the artifact, config and tokenizer kind
    from its metadata, tokenizer from --tokenizer-path (or the named model's download). No checkpoint."""
    from torchchat.tokenizer.load import load_tokenizer

    src = spec.source
    if src.checkpoint_path or src.gguf_path or src.dummy_weights:
        raise UserInputError(f"{flag} runs an exported model: drop --checkpoint-path / --gguf-path / --dummy-weights")
    check_exported_quantize(flag, spec.quant)
    if flag == "--pte-path":
        from torchchat.runtime.executorch import ExecuTorchRuntime

        runtime = ExecuTorchRuntime.load(path)
    else:
        from torchchat.runtime.aoti import AOTIRuntime

        runtime = AOTIRuntime.load_package(path) if flag == "--aoti-package-path" else AOTIRuntime.load_shared_library(path)
    metadata = runtime.metadata
    if spec.dtype is not None and spec.dtype != metadata.torch_dtype:
        raise UserInputError(f"--dtype: {path} was exported in {metadata.dtype}; drop --dtype or re-export with the one you want")
    entry = resolve_model(src.name) if src.name else None
    if src.params_path is not None:
        metadata.check_config(ModelConfig.from_json_file(src.params_path), f"--params-path {src.params_path}", str(path))
    elif src.params_table is not None:
        metadata.check_config(params_table(src.params_table), f"--params-table {src.params_table}", str(path))
    elif entry is not None:
        metadata.check_config(params_table(entry.params), f"model '{entry.name}'", str(path))
    tokenizer_path = src.tokenizer_path
    if tokenizer_path is None and entry is not None:
        candidate = entry.local_dir(src.model_directory) / entry.tokenizer_file
        tokenizer_path = candidate if candidate.is_file() else None
    if tokenizer_path is None:
        raise TokenizerError(f"{flag} needs the model's tokenizer: pass --tokenizer-path")
    tokenizer = load_tokenizer(Path(tokenizer_path))
    metadata.check_tokenizer(tokenizer, str(path))
    notes = _capped_context(spec.max_seq_len, runtime.max_seq_len, f"the positions {path.name} was exported with")
    return BuiltModel(
        runtime=runtime, tokenizer=tokenizer, config=runtime.config, entry=entry, model=None,
        chat_template=metadata.chat_template, is_chat=True if metadata.chat_template else (entry.is_chat if entry else None),
        name=metadata.model_name, dtype=metadata.torch_dtype, notes=notes,
    )


def _capped_context(asked: int | None, limit: int, what: str) -> list[str]:
    """The note for a --max-seq-length above what the model holds (it is capped, not refused)."""
    if asked is None or asked <= limit:
        return []
    return [f"--max-seq-length {asked} is more than {what} ({limit}): using {limit}"]


# -- resolving: what model, what config, what weights, what device --------------------------------------

@dataclass
class ResolvedModel:
    """What a checkpoint (or --dummy-weights) build materializes, settled before any weight is copied."""

    device: str  # resolved: cpu, cuda[:n] or mps
    config: ModelConfig  # the context cap applied
    entry: ModelEntry | None
    weights: LoadedCheckpoint | None  # the checkpoint, mapped and normalized; None: random weights from the seed
    checkpoint: Path | None  # where the weights come from (for messages)
    tokenizer_path: Path | None  # None: the one the checkpoint carries (GGUF)
    name: str
    notes: list[str] = field(default_factory=list)


def check_tensor_parallel(quant) -> None:
    """What --tp cannot be combined with yet (the CLI asks before it starts the ranks). `quant`: a
    QuantPlan, or the recipe text, or None."""
    if quant:
        raise QuantizationError("--quantize does not run with --tp yet; drop one of them")


def check_exported_quantize(flag: str, quant) -> None:
    """An exported model's quantization was fixed at export (the CLI asks before parsing the recipe).
    `quant`: a QuantPlan, or the recipe text, or None."""
    if quant:
        raise UserInputError(f"{flag}: quantization is fixed when a model is exported; drop --quantize")


def _locate(src: ModelSource, entry: ModelEntry | None) -> tuple[Path | None, Path | None]:
    """(checkpoint, tokenizer file) as given, or found in the named model's download (fetched if missing)."""
    checkpoint = src.checkpoint_path or src.gguf_path
    tokenizer_path = src.tokenizer_path
    if entry is not None and checkpoint is None and not src.dummy_weights:
        from torchchat.inventory.download import DownloadOptions, download_model

        folder = download_model(entry, DownloadOptions(model_directory=src.model_directory))
        checkpoint, found_tok = _find_in_dir(folder, entry)
        tokenizer_path = tokenizer_path or found_tok
    return checkpoint, tokenizer_path


def _given_config(src: ModelSource, entry: ModelEntry | None, checkpoint: Path | None) -> ModelConfig | None:
    """The architecture a params file, table or registry entry names (which wins over a checkpoint's)."""
    if src.params_path is not None:
        return ModelConfig.from_json_file(src.params_path)
    if src.params_table is not None:
        return params_table(src.params_table)
    if entry is not None and (src.dummy_weights or checkpoint is None):
        return params_table(entry.params)
    return None


def _map_checkpoint(spec: BuildSpec, device: str, checkpoint: Path, build_tokenizer: bool) -> LoadedCheckpoint:
    from torchchat.checkpoint import LoadOptions, load_checkpoint

    # GGUF block-quantized weights stay packed for the native CPU kernels, or as blocks for the fused
    # CUDA path to transcode where it will run (else Q4_0 stays 4-bit where a torchao int4 kernel runs),
    # unless --quantize asks for its own scheme.
    kind = torch.device(device).type
    keep_blocks = None
    if spec.cuda_kernels and kind == "cuda" and spec.tp is None:
        keep_blocks = lambda config: _fused_unsupported(spec, config) is None  # noqa: E731
    options = LoadOptions(
        device=device, dtype=spec.dtype, keep_quantized=spec.quant is None, tokenizer=build_tokenizer,
        packed=spec.cpu_kernels and kind == "cpu" and spec.tp is None, keep_blocks=keep_blocks,
    )
    return load_checkpoint(checkpoint, options)


def resolve_spec(spec: BuildSpec) -> ResolvedModel:
    """Which model, config, weights and tokenizer a (non-exported) spec names on its device: downloads
    a named model if needed and maps its checkpoint; checks the quantize plan against the config and
    that the model can fit, before anything is materialized."""
    device = spec.device
    if spec.dtype is None:
        raise UserInputError("a dtype is needed to build a model from a checkpoint")
    src = spec.source
    entry = resolve_model(src.name) if src.name else None
    checkpoint, tokenizer_path = _locate(src, entry)
    config = _given_config(src, entry, checkpoint)
    notes: list[str] = []
    weights = None
    if checkpoint is not None and not src.dummy_weights:
        from torchchat.checkpoint.state_dict import normalize

        weights = _map_checkpoint(spec, device, Path(checkpoint), build_tokenizer=tokenizer_path is None)
        notes.extend(weights.notes)
        config = config or weights.config
        if config is None:
            raise CheckpointError(
                f"{checkpoint}: the checkpoint does not say its architecture; pass --params-table or --params-path"
            )
        weights.state_dict = normalize(weights.state_dict, config)
        if weights.tokenizer is None:  # a tokenizer carried by the checkpoint (GGUF) beats a file beside it
            tokenizer_path = tokenizer_path or _tokenizer_beside(Path(checkpoint))
    elif config is None:
        raise UserInputError(
            "no model given: name a model, or pass --checkpoint-path / --gguf-path, or --dummy-weights with "
            "--params-table / --params-path"
        )
    if spec.max_seq_len is not None:
        notes.extend(_capped_context(spec.max_seq_len, config.max_seq_len, "the model's context"))
        config = config.with_max_seq_len(min(spec.max_seq_len, config.max_seq_len))
    if spec.quant is not None:
        # Shapes and device checked before any weight is read (the checkpoint is only mapped so far).
        notes.extend(spec.quant.validate(config, device, spec.dtype, spec.cpu_kernels))
    _check_model_fits(config, spec, device, checkpoint, blocks=weights is not None and bool(weights.packed))
    name = entry.name if entry is not None else Path(checkpoint or src.params_table or "model").name
    return ResolvedModel(device=device, config=config, entry=entry, weights=weights,
                         checkpoint=Path(checkpoint) if checkpoint is not None else None,
                         tokenizer_path=Path(tokenizer_path) if tokenizer_path is not None else None,
                         name=name, notes=notes)


def _check_model_fits(config: ModelConfig, spec: BuildSpec, device: str, checkpoint, blocks: bool = False) -> None:
    """Refuse a model that can never fit before building it (a params file can ask for anything).
    `blocks`: the weights stay GGUF blocks (CPU kernels) or their fused transcoding (CUDA), at most 10
    bits a weight with 16-bit scales, 12 with float32 ones (int8 with a scale and a minimum per 16
    values: a Q4_K q|k beside a Q6_K v), not the dtype's 16 or 32."""
    from torchchat.model.params_check import check_model_fits

    per_param = 0.5 if spec.quant is not None else torch.empty((), dtype=spec.dtype).element_size()
    if blocks and spec.quant is None:
        per_param = min(per_param, 1.25 if per_param <= 2 else 1.5)
    check_model_fits(config, per_param, device, str(checkpoint or _source_name(spec)))


def _source_name(spec: BuildSpec) -> str:
    src = spec.source
    return str(src.params_path or src.params_table or src.name or "model")


# -- materializing: one weight source in, one model out ---------------------------------------------------

def materialize(resolved: ResolvedModel, spec: BuildSpec) -> torch.nn.Module:
    """The Transformer, initialised on the meta device, given the resolved weights (real or random) on
    the resolved device by one of three paths: sharded over the tensor-parallel ranks, fused CUDA
    kernels, or the plain PyTorch modules (then quantized per the plan). Notes go to `resolved.notes`."""
    from torchchat.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(resolved.config)
    if spec.tp is not None:
        _materialize_sharded(model, resolved, spec)
    else:
        fused = _use_cuda_kernels(spec, resolved.device, resolved.config, resolved.weights, resolved.notes)
        if resolved.weights is not None:
            if not fused and torch.device(resolved.device).type != "cpu":
                _dequantize_blocks(resolved.weights, spec.dtype)
            _assign(model, resolved.weights, str(resolved.checkpoint))
        if fused:
            _materialize_fused(model, resolved, spec)
        else:
            _materialize_plain(model, resolved, spec)
    model.eval()
    model.requires_grad_(False)
    return model


def _materialize_sharded(model: torch.nn.Module, resolved: ResolvedModel, spec: BuildSpec) -> None:
    from torchchat.distributed.tensor_parallel import materialize as materialize_shards, parallelize

    check_tensor_parallel(spec.quant)
    state_dict = resolved.weights.state_dict if resolved.weights is not None else None
    if state_dict is not None:
        check_weights(model, state_dict, str(resolved.checkpoint))
    parallelize(model, spec.tp.mesh)
    materialize_shards(model, state_dict, spec.tp, spec.dtype, spec.seed)


def _assign(model: torch.nn.Module, weights: LoadedCheckpoint, source: str) -> None:
    """The mapped checkpoint's tensors become the meta-device model's parameters (packed blocks as they are)."""
    if weights.packed:
        from torchchat.model.packed import install_packed

        install_packed(model, weights.packed)
    load_weights(model, weights.state_dict, source)


def _fused_unsupported(spec: BuildSpec, config: ModelConfig) -> str | None:
    """Why the fused CUDA path cannot build this config as the spec asks, or None."""
    from torchchat.kernels import unsupported_reason

    return unsupported_reason(config, spec.dtype, spec.quant)


def _dequantize_blocks(weights: LoadedCheckpoint, dtype: torch.dtype) -> None:
    """GGUF blocks kept for the fused path, which is not taken after all (a --params-path changed the
    architecture), become float weights as every other path off the CPU loads them."""
    if not weights.packed:
        return
    from torchchat.kernels.gguf_transcode import GGMLBlocks, dense

    for name, qtype in weights.packed.items():
        weights.state_dict[name] = dense(GGMLBlocks(weights.state_dict[name], qtype), dtype, "cpu")
    weights.packed = {}


def _use_cuda_kernels(spec: BuildSpec, device: str, config: ModelConfig, loaded, notes: list[str]) -> bool:
    """Whether to build the fused CUDA model (torchchat.kernels); says why not in `notes` on CUDA."""
    if not spec.cuda_kernels or torch.device(device).type != "cuda":
        return False
    reason = _fused_unsupported(spec, config)
    if reason is None and loaded is not None and any(
        type(t) not in (torch.Tensor, torch.nn.Parameter) for t in loaded.state_dict.values()
    ):
        reason = "the checkpoint's weights stay in its own quantized format"
    if reason is not None:
        notes.append(f"fused CUDA kernels not used ({reason}); running the PyTorch modules")
    return reason is None


def _real_tensor(model: torch.nn.Module, device: str, dtype: torch.dtype):
    """name -> the assigned checkpoint tensor, copied to `device` in `dtype`."""
    return lambda name: model.get_parameter(name).detach().to(device=device, dtype=dtype)


def _random_tensor(model: torch.nn.Module, device: str, dtype: torch.dtype, seed: int):
    """name -> the random tensor --dummy-weights draws for that parameter."""
    return lambda name: dummy_tensor(name, model.get_parameter(name).shape, device, dtype, seed)


def _materialize_fused(model: torch.nn.Module, resolved: ResolvedModel, spec: BuildSpec) -> None:
    """Materialize the weights one matrix at a time straight into the fused (and, per the plan,
    quantized) model on the GPU; what the fused kernels do not quantize (embeddings) goes to torchao."""
    from torchchat.kernels import linear_quant
    from torchchat.kernels.transform import fuse_model

    device = resolved.device
    quant, rest = linear_quant(spec.quant)
    source = (_real_tensor(model, device, spec.dtype) if resolved.weights is not None
              else _random_tensor(model, device, spec.dtype, spec.seed))
    blocks = None
    if resolved.weights is not None and resolved.weights.packed:
        source, blocks = _block_sources(model, resolved.weights.packed, source, device, spec.dtype)
    with torch.no_grad():
        resolved.notes.extend(fuse_model(model, source, quant, device, spec.dtype, blocks))
    if rest is not None:
        from torchchat.quantize import apply_quantization

        apply_quantization(model, rest, device)


def _block_sources(model: torch.nn.Module, packed: dict[str, int], source, device: str, dtype: torch.dtype):
    """(float source, block source) over a model holding GGUF blocks (uint8, on the CPU) for the names in
    `packed`: the fused builder transcodes those blocks, or asks for them as float where it keeps a float
    weight (the embedding, a stack mixing them with float matrices)."""
    from torchchat.kernels.gguf_transcode import GGMLBlocks, dense

    def blocks(name: str):
        qtype = packed.get(name)
        return None if qtype is None else GGMLBlocks(model.get_parameter(name).detach(), qtype)

    def weight(name: str):
        found = blocks(name)
        return source(name) if found is None else dense(found, dtype, device)

    return weight, blocks


def _materialize_plain(model: torch.nn.Module, resolved: ResolvedModel, spec: BuildSpec) -> None:
    """The PyTorch modules on the device: the assigned weights moved and cast, or random ones drawn;
    then the quantize plan applied."""
    if resolved.weights is not None:
        model.to(device=resolved.device, dtype=spec.dtype)
        if resolved.config.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight
    else:
        init_dummy_weights(model, resolved.device, spec.dtype, spec.seed)
    if spec.quant is not None:
        from torchchat.quantize import apply_quantization

        apply_quantization(model, spec.quant, resolved.device, spec.cpu_kernels)


def _tokenizer(resolved: ResolvedModel):
    from torchchat.tokenizer.load import check_vocab, load_tokenizer

    weights = resolved.weights
    if weights is not None and weights.tokenizer is not None and resolved.tokenizer_path is None:
        tokenizer = weights.tokenizer
    elif resolved.tokenizer_path is not None:
        tokenizer = load_tokenizer(resolved.tokenizer_path)
    else:
        raise TokenizerError("no tokenizer found beside the checkpoint; pass --tokenizer-path")
    check_vocab(tokenizer, resolved.config.vocab_size)
    return tokenizer


def build_model(spec: BuildSpec) -> BuiltModel:
    """Build the runtime and tokenizer a BuildSpec names: resolve (model, config, weights, on the
    spec's device), then materialize."""
    if torch.device(spec.device).type == "cpu":
        from torchchat.runtime.threads import set_threads

        set_threads(spec.num_threads)
    artifact = _exported_artifact(spec.source)
    if artifact is not None:
        return build_exported(spec, *artifact)
    from torchchat.runtime.base import EagerRuntime

    resolved = resolve_spec(spec)
    model = materialize(resolved, spec)
    tokenizer = _tokenizer(resolved)
    entry = resolved.entry
    return BuiltModel(
        runtime=EagerRuntime(model), tokenizer=tokenizer, config=resolved.config, entry=entry, model=model,
        chat_template=entry.chat_template if entry is not None else None,
        is_chat=entry.is_chat if entry is not None else None,
        name=resolved.name, notes=resolved.notes, dtype=spec.dtype,
    )
