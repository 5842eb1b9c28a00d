"""Start `--tp N` runs as N local processes through torchrun's elastic agent (the machinery behind
`torchrun --nproc-per-node N`), unless the command already runs inside a torchrun job."""
from __future__ import annotations

import logging
import os
import sys
import uuid
from pathlib import Path

# NVLink multicast (NVLS / symmetric-memory multicast) stays off: it is unavailable or unreliable on the
# machines this runs on, and NCCL falls back to its ring/tree algorithms without it.
SAFE_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}

_PACKAGE_PARENT = Path(__file__).resolve().parents[2]
_SHIM = "import sys; from torchchat.cli import main; raise SystemExit(main())"


def inside_torchrun() -> bool:
    """True in a process started by torchrun (it sets these for every worker)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def apply_safe_env() -> None:
    """Keep NVLink multicast off for this process and everything it starts (user settings win)."""
    for key, value in SAFE_NCCL_ENV.items():
        os.environ.setdefault(key, value)


def relaunch(argv: list[str], nproc: int, verbose: bool = False) -> int:
    """Run `torchchat <argv>` as `nproc` processes on this host and wait for them.

    Returns the exit code of the first failed rank (0 when all succeed). The workers inherit this
    process's stdout/stderr, so rank 0's text streams straight through. Unless `verbose`, the agent's
    own failure report is silenced: rank 0 has already printed the one-line error."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    apply_safe_env()
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(_PACKAGE_PARENT) + (os.pathsep + path if path else "")
    if not verbose:
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        elastic_launch(config, sys.executable)("-c", _SHIM, *argv)
    except ChildFailedError as e:
        codes = [f.exitcode for _, f in sorted(e.failures.items())]
        return next((c for c in codes if c > 0), 1)
    return 0
