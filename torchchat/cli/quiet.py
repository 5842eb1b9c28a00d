"""Keep the libraries' own chatter out of a command's output unless -v: what a user reads is the
model's text, our figures and our notes (docs/generate.md, "Output").

Each entry below was seen on every run of a common command and tells the user nothing they can act on.
The noise is hidden at its source (a logger's level, a warnings filter, inductor's print switch), so
whatever else those libraries log at error level still shows."""
from __future__ import annotations

import logging
import os
import warnings

# logger -> what it prints that we hide
NOISY_LOGGERS = {
    # "Failed to load .../_C_mxfp8...so", "..._C_cutlass_90a.abi3.so": CUDA-only kernels, on every import.
    "torchao": "torchao's CUDA extension libraries failing to load on a CPU machine",
    # "<enum 'KernelPreference'> is an Enum subclass ... register_constant() ... deprecated": torchao's
    # registration, on every import of torchao.quantization.
    "torch.utils._pytree": "torchao's deprecated pytree registration",
    # Inductor's warnings while compiling (--compile, --max-autotune, AOT Inductor export).
    "torch._inductor": "inductor's compile-time warnings",
    # "[cpuinfo_utils.cpp:71] Reading file ...": ExecuTorch's threadpool start-up, which
    # torchchat.runtime.executorch passes from fd 2 to this logger.
    "torchchat.runtime.executorch": "ExecuTorch's CPU probing lines",
}


# Python warnings raised from these modules (a regular expression on the module that the warning points
# at): e.g. "TypedStorage is deprecated" from inductor's autotuning (select_algorithm.py) on --max-autotune.
NOISY_WARNING_MODULES = (r"torch\._inductor\.",)


def hide_library_noise(max_autotune: bool = False) -> None:
    """Raise the noisy loggers to ERROR, ignore FutureWarnings (export's, torchao's) and inductor's
    warnings, and with `max_autotune` turn off inductor's AUTOTUNE tables. Called once by
    `torchchat.cli.main` before a model command runs, unless -v or TORCHCHAT_VERBOSE=1."""
    # torch configures its own loggers when imported (TORCH_LOGS): set our levels after that, and leave
    # them alone when the user asked torch for logs.
    import torch  # noqa: F401

    for name in NOISY_LOGGERS:
        if name.startswith("torch.") and os.environ.get("TORCH_LOGS"):
            continue
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for module in NOISY_WARNING_MODULES:
        warnings.filterwarnings("ignore", module=module)
    if max_autotune:
        # The tables ("AUTOTUNE mm(...)", "Autotune Choices Stats:") are written to sys.stderr directly,
        # not logged; these are inductor's own switches for them.
        from torch._inductor import config, select_algorithm

        select_algorithm.PRINT_AUTOTUNE = False
        config.max_autotune_report_choices_stats = False
