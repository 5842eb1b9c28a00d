"""`export`: write a model as an AOT Inductor package (.pt2), AOT Inductor library (.so) or
ExecuTorch program (.pte), each carrying its own metadata (docs/export.md)."""
from __future__ import annotations

import argparse
from dataclasses import replace
import sys
from pathlib import Path

from torchchat.cli import args as cli_args


def register(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    cli_args.add_model_source(p)
    cli_args.add_build(p, default_dtype="fp32")
    g = p.add_argument_group("outputs (one or more)")
    g.add_argument("--output-aoti-package-path", type=Path, metavar="X.pt2",
                   help="AOT Inductor package: run with --aoti-package-path, or the C++ runner")
    g.add_argument("--output-dso-path", type=Path, metavar="X.so",
                   help="AOT Inductor shared library (deprecated form; metadata goes to X.so.json beside it)")
    g.add_argument("--output-pte-path", type=Path, metavar="X.pte",
                   help="ExecuTorch program with the XNNPACK delegate: run with --pte-path, or the C++ runner")
    g.add_argument("--dynamic-shapes", action=argparse.BooleanOptionalAction, default=True,
                   help="Accept any number of tokens per call, for parallel prefill (default); "
                        "--no-dynamic-shapes exports one token per call")
    cli_args.add_verbose(p)
    return p


def run(args: argparse.Namespace) -> int:
    from torchchat.errors import UserInputError
    from torchchat.export.exporter import ExportTargets, check_export, export_model, quantize_recipe
    from torchchat.export.progress import StepTimer

    if cli_args.exported_flag(args):
        raise UserInputError(f"export reads a checkpoint, not an exported model: drop {cli_args.exported_flag(args)}")
    targets = ExportTargets(
        aoti_package_path=args.output_aoti_package_path,
        dso_path=args.output_dso_path,
        pte_path=args.output_pte_path,
        dynamic_shapes=args.dynamic_shapes,
        max_seq_len=args.max_seq_length,
    )
    notes: list[str] = []
    # fp32 unless asked: it is what ExecuTorch's XNNPACK delegate runs, and matches eager references.
    spec = cli_args.build_spec(args, notes, default_dtype="fp32")
    if targets.pte_path or targets.dso_path:
        # XNNPACK cannot run torchchat's native CPU ops, and a bare .so cannot either (AOT Inductor calls
        # ops outside torch through a JSON description that only a .pt2 package carries): GGUF weights
        # are dequantized and --quantize goes to torchao, whose quantized linears both run (docs/gguf.md).
        spec = replace(spec, cpu_kernels=False)
    quantize, schemes = quantize_recipe(spec.quant)
    check_export(targets, spec.dtype, spec.device, schemes, spec.cpu_kernels)
    notices = cli_args.Notices()
    notices.say(*notes)
    timer = StepTimer(sys.stderr)
    with timer.step("Loading the model"):
        built = cli_args.build(spec, notices)
    def show_delegation(summary) -> None:
        # The original torchchat's delegation report: counts always, the per-operator table with -v.
        print(summary.line())
        if args.verbose:
            print(summary.table())

    written = export_model(built, targets, quantize=quantize, schemes=schemes, timer=timer,
                           on_delegation=show_delegation)
    for path in written:
        print(f"Wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    total = sum(timer.times.values())
    print(f"Export took {total:.1f} s: " + ", ".join(f"{name.split(' ->')[0].split(' (')[0]} {t:.1f} s"
                                                     for name, t in timer.times.items()), file=sys.stderr)
    return 0
