"""Argument groups shared by the subcommands, and the conversions from the argparse Namespace to the
typed specs the library takes. The Namespace goes no further than this package."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from torchchat.build import (DTYPE_CHOICES, BuildSpec, ModelSource, check_exported_quantize, check_tensor_parallel,
                             default_model_directory)
from torchchat.errors import UserInputError
from torchchat.generation.engine import GenerationConfig
from torchchat.generation.sampling import SamplingParams
from torchchat.generation.steps import CompileOptions


class Notices:
    """The one channel for notes to the user: settings overridden, layers left unquantized, kernels not
    used, the context capped, a chat template guessed. Every command prints them through one of these:
    on stderr (stdout is the model's text), each line once however many builds repeat it."""

    def __init__(self, stream=None, streams_text: bool = False):
        """`streams_text`: the command streams the model's text to stdout (generate, chat), so a
        progress line may come in the middle of a line of it."""
        self.stream = stream
        self.streams_text = streams_text
        self._said: set[str] = set()

    def say(self, *notes: str) -> None:
        for note in notes:
            if note not in self._said:
                self._said.add(note)
                print(note, file=self.stream or sys.stderr, flush=True)

    def progress(self, line: str) -> None:
        """A line about work under way (compiling), said every time. Compiling starts after the first
        token is written: on a terminal that shows stdout too, the line starts on a line of its own."""
        stream = self.stream or sys.stderr
        if self.streams_text and _same_terminal(sys.stdout, stream):
            line = "\n" + line
        print(line, file=stream, flush=True)


def _same_terminal(a, b) -> bool:
    try:
        return a.isatty() and b.isatty() and os.path.samestat(os.fstat(a.fileno()), os.fstat(b.fileno()))
    except (AttributeError, OSError, ValueError):  # a stream without a file descriptor (captured output)
        return False


def build(spec: BuildSpec, notices: Notices):
    """torchchat.build.build_model(spec), its notes said through `notices`."""
    from torchchat.build import build_model

    built = build_model(spec)
    notices.say(*built.notes)
    return built


def add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="Show tracebacks and extra detail")


def add_model_source(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model source")
    g.add_argument("model", nargs="?", default=None, metavar="MODEL", help="A known model name or alias (see `list`)")
    g.add_argument("--checkpoint-path", type=Path, help="A .pt/.pth state dict, llama2.c .bin, or Hugging Face directory")
    # --load-gguf: the original torchchat's name for it, kept so its documented commands work.
    g.add_argument("--gguf-path", "--load-gguf", type=Path, help="A llama-architecture GGUF file")
    g.add_argument("--params-table", help="A shipped params table, e.g. stories15M, 7B, Meta-Llama-3.1-8B")
    g.add_argument("--params-path", type=Path, help="A params JSON file describing the architecture")
    g.add_argument("--tokenizer-path", type=Path, help="tokenizer.model (SentencePiece or tiktoken) or tokenizer.json")
    g.add_argument("--model-directory", type=Path, default=None,
                   help="Where downloaded models live (default $TORCHCHAT_MODELDIR or ~/.torchchat/model-cache)")
    g.add_argument("--dummy-weights", action="store_true", help="Random weights of the params' shape (for benchmarks)")
    e = p.add_argument_group("exported model (instead of a checkpoint; give --tokenizer-path too)")
    e.add_argument("--aoti-package-path", type=Path, help="An AOT Inductor package (.pt2) written by `export`; its library runs as code: trust its source")
    e.add_argument("--dso-path", type=Path, help="An AOT Inductor shared library (.so, with its .so.json) written by `export`; it runs as code: trust its source")
    e.add_argument("--pte-path", type=Path, help="An ExecuTorch program (.pte) written by `export`")


def add_build(p: argparse.ArgumentParser, default_dtype: str = "fast") -> None:
    """`default_dtype`: what `build_spec` is given as its default, for the help to say."""
    g = p.add_argument_group("precision, device and quantization")
    default_help = ("default: fast = bfloat16; fp32 on the CPU matches references" if default_dtype == "fast"
                    else f"default: {default_dtype}, unless the --quantize recipe names one")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help=f"Weights and activations dtype ({default_help})")
    g.add_argument("--device", choices=("fast", "cpu", "cuda", "mps"), default=None,
                   help="fast picks cuda, then mps, then cpu (default)")
    g.add_argument("--quantize", default=None, help="Quantization recipe: JSON text, a JSON file, or a shipped recipe name")
    g.add_argument("--max-seq-length", type=int, default=None, help="Context length (KV cache) to allocate")
    g.add_argument("--num-threads", type=int, default=None, metavar="N",
                   help="CPU threads for the model (default: physical cores minus those other processes keep busy, "
                        "from the load average; at least 1)")
    g.add_argument("--no-cpu-kernels", action="store_true",
                   help="On the CPU, dequantize GGUF weights and quantize recipes with torchao instead of running "
                        "torchchat's native kernels on packed blocks")
    g.add_argument("--no-cuda-kernels", action="store_true",
                   help="On CUDA, run the plain PyTorch modules instead of torchchat's fused Triton kernels")


def add_sampling(p: argparse.ArgumentParser, max_new_tokens: int = 200) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="Tokens to generate")
    g.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    g.add_argument("--top-k", type=int, default=200, help="Keep the k most likely tokens (0: no limit)")
    g.add_argument("--top-p", type=float, default=None, help="Nucleus sampling: keep the smallest set with mass >= p")
    g.add_argument("--seed", type=int, default=None, help="Seed for reproducible sampling")


def add_compile(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compilation")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    g.add_argument("--compile-prefill", action="store_true", help="torch.compile the prefill step (dynamic shapes)")
    g.add_argument("--max-autotune", action="store_true", help="Compile with mode max-autotune")
    g.add_argument("--sequential-prefill", action="store_true", help="Feed the prompt one token at a time")


def add_chat_template(p: argparse.ArgumentParser, generate: bool = False) -> None:
    from torchchat.generation.chat_format import TEMPLATE_CHOICES

    g = p.add_argument_group("chat template")
    if generate:
        help_text = ("Format --prompt as one user turn of this chat template (auto: the model's own); "
                     "default: the prompt is plain text to continue")
    else:
        help_text = ("Chat template (default auto: the registry's, else the tokenizer's chat_template, "
                     "else plain text turns)")
    g.add_argument("--chat-template", choices=(*TEMPLATE_CHOICES, "auto"), default=None, help=help_text)
    g.add_argument("--system-prompt", default=None,
                   help="System prompt" + (" (with --chat-template)" if generate
                                           else " (asked for when not given and stdin is a terminal)"))


def add_speculative(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--draft-model", metavar="MODEL", default=None,
                   help="A known model to draft tokens with (same tokenizer as the model)")
    g.add_argument("--draft-checkpoint-path", type=Path, default=None,
                   help="A draft model checkpoint (.bin, HF directory, or .pt with its config)")
    g.add_argument("--speculate-k", type=int, default=5, help="Draft tokens proposed per verification step")
    g.add_argument("--draft-quantize", default=None,
                   help="Quantization recipe for the draft, or 'quantize' for the same as --quantize (default: none)")


def add_tensor_parallel(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tensor parallelism")
    g.add_argument("--tp", type=int, default=1, metavar="N",
                   help="Split the model over N processes (gloo on cpu, NCCL on cuda: one GPU each); "
                        "starts them itself unless run under torchrun")


def tensor_parallel_size(args: argparse.Namespace) -> int:
    if args.tp < 1:
        raise UserInputError("--tp must be >= 1")
    if args.tp > 1:
        check_tensor_parallel(args.quantize)
    if args.tp > 1 and (args.draft_model or args.draft_checkpoint_path):
        raise UserInputError("speculative decoding (--draft-model / --draft-checkpoint-path) does not run with --tp yet")
    return args.tp


def model_source(args: argparse.Namespace) -> ModelSource:
    given = [x for x in (args.model, args.checkpoint_path, args.gguf_path) if x is not None]
    if len(given) > 1 and not (args.model and args.dummy_weights):
        raise UserInputError("give one model source: a MODEL name, --checkpoint-path, or --gguf-path")
    for flag, path in (("--checkpoint-path", args.checkpoint_path), ("--gguf-path", args.gguf_path),
                       ("--params-path", args.params_path), ("--tokenizer-path", args.tokenizer_path)):
        if path is not None and not path.exists():
            raise UserInputError(f"{flag}: {path} does not exist")
    if args.dummy_weights and not (args.params_table or args.params_path or args.model):
        raise UserInputError("--dummy-weights needs --params-table, --params-path or a MODEL name for the shapes")
    for flag, path in (("--aoti-package-path", args.aoti_package_path), ("--dso-path", args.dso_path),
                       ("--pte-path", args.pte_path)):
        if path is not None and not path.exists():
            raise UserInputError(f"{flag}: {path} does not exist")
    return ModelSource(
        name=args.model,
        checkpoint_path=args.checkpoint_path,
        gguf_path=args.gguf_path,
        params_table=args.params_table,
        params_path=args.params_path,
        tokenizer_path=args.tokenizer_path,
        model_directory=args.model_directory or default_model_directory(),
        dummy_weights=args.dummy_weights,
        aoti_package_path=args.aoti_package_path,
        dso_path=args.dso_path,
        pte_path=args.pte_path,
    )


def exported_flag(args: argparse.Namespace) -> str | None:
    """The exported-model flag given (--aoti-package-path, --dso-path, --pte-path), if any."""
    for flag in ("aoti_package_path", "dso_path", "pte_path"):
        if getattr(args, flag, None) is not None:
            return "--" + flag.replace("_", "-")
    return None


def build_spec(args: argparse.Namespace, notes: list[str] | None = None, default_dtype: str = "fast") -> BuildSpec:
    """BuildSpec from the shared groups. Override messages (quantize precision/executor vs
    --dtype/--device) are appended to `notes` for the command to print. `default_dtype` applies
    when neither --dtype nor the quantize recipe names one."""
    plan = None
    dtype_name, device_name = args.dtype, args.device
    exported = exported_flag(args)
    if exported:
        check_exported_quantize(exported, args.quantize)
    if args.quantize:
        from torchchat.quantize import parse_quantize

        plan = parse_quantize(args.quantize)
        dtype_name, device_name, override_notes = plan.resolve(args.dtype, args.device)
        if notes is not None:
            notes.extend(override_notes)
    # The artifact fixes its dtype; a --dtype given is only checked against it. BuildSpec resolves
    # the names (the device once, then the dtype for it).
    dtype = dtype_name if exported else dtype_name or default_dtype
    if args.max_seq_length is not None and args.max_seq_length <= 0:
        raise UserInputError("--max-seq-length must be positive")
    if args.num_threads is not None and args.num_threads < 1:
        raise UserInputError("--num-threads must be at least 1")
    return BuildSpec(source=model_source(args), device=device_name or "cpu", dtype=dtype, quant=plan,
                     max_seq_len=args.max_seq_length, cuda_kernels=not args.no_cuda_kernels,
                     cpu_kernels=not args.no_cpu_kernels, num_threads=args.num_threads)


def draft_spec(args: argparse.Namespace, target: BuildSpec) -> BuildSpec | None:
    """The draft model's BuildSpec (same device, dtype and context as the target), or None when no
    draft is given. The draft uses the target's --tokenizer-path when it has none of its own."""
    if args.draft_model is None and args.draft_checkpoint_path is None:
        if args.draft_quantize is not None:
            raise UserInputError("--draft-quantize needs a draft: --draft-model or --draft-checkpoint-path")
        return None
    if args.draft_model is not None and args.draft_checkpoint_path is not None:
        raise UserInputError("give one draft: --draft-model or --draft-checkpoint-path")
    if args.draft_checkpoint_path is not None and not args.draft_checkpoint_path.exists():
        raise UserInputError(f"--draft-checkpoint-path: {args.draft_checkpoint_path} does not exist")
    if args.speculate_k < 1:
        raise UserInputError("--speculate-k must be at least 1")
    plan = None
    recipe = args.quantize if args.draft_quantize == "quantize" else args.draft_quantize
    if recipe:
        from torchchat.quantize import parse_quantize

        plan = parse_quantize(recipe)
    source = ModelSource(
        name=args.draft_model,
        checkpoint_path=args.draft_checkpoint_path,
        tokenizer_path=target.source.tokenizer_path,
        model_directory=target.source.model_directory,
    )
    return BuildSpec(source=source, device=target.device, dtype=target.dtype, quant=plan,
                     max_seq_len=target.max_seq_len, num_threads=target.num_threads, cpu_kernels=target.cpu_kernels)


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    if args.temperature < 0:
        raise UserInputError("--temperature must be >= 0 (0 is greedy)")
    if args.top_k is not None and args.top_k < 0:
        raise UserInputError("--top-k must be >= 0 (0: no limit)")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise UserInputError("--top-p must be in (0, 1]")
    return SamplingParams(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p)


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    if args.max_new_tokens <= 0:
        raise UserInputError("--max-new-tokens must be positive")
    return GenerationConfig(max_new_tokens=args.max_new_tokens, sampling=sampling_params(args))


def compile_options(args: argparse.Namespace, notices: Notices | None = None) -> CompileOptions:
    """With `notices`, the first call of each compiled step says that it compiles, and how long it took."""
    exported = exported_flag(args)
    if exported and (args.compile or args.compile_prefill or args.max_autotune):
        raise UserInputError(f"{exported}: an exported model is compiled already; drop --compile / --compile-prefill")
    return CompileOptions(decode=args.compile, prefill=args.compile_prefill, max_autotune=args.max_autotune,
                          notify=notices.progress if notices is not None else None)
