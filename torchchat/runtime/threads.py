"""How many CPU threads the model's kernels use.

Batch-1 decoding splits every matrix-vector product over the threads and waits for the slowest at the
end of each one, hundreds of times per token. A thread that shares its core with another busy process
runs a fraction of the time, so all the others wait for it: on a 2-core machine with one core busy,
2 threads fell to 11 tok/s where 1 thread gave 146-214 (issue 15). Using a core too few on an idle
machine costs at most the parallel speed-up (under 2x here), using one too many on a busy one costs
10x or more, so the default leaves out the cores other processes keep busy, judged by the 1-minute
load average when the model is built, and never goes below one. `--num-threads` overrides it."""
from __future__ import annotations

import os

import torch


# torch's default intra-op thread count is the number of physical cores; read before anything sets it
# (reading a setting is no side effect).
_PHYSICAL = torch.get_num_threads()


def usable_cores() -> int:
    """Physical cores this process may run on (torch's default count, within the CPU affinity mask)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        allowed = os.cpu_count() or 1
    return max(1, min(allowed, _PHYSICAL))


def default_threads(load: float | None = None, cores: int | None = None) -> int:
    """cores - (cores other processes keep busy), at least 1. `load`: the 1-minute load average
    (read from the system if None), taken as the number of busy cores, rounded to the nearest."""
    cores = usable_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
    busy = int(load + 0.5)
    return max(1, min(cores, cores - busy))


def set_threads(requested: int | None) -> int:
    """Set torch's intra-op thread count (the native kernels use the same pool): `requested`, or
    `default_threads()` when None. Returns the number set."""
    n = default_threads() if requested is None else requested
    if n < 1:
        raise ValueError(f"thread count must be at least 1, got {n}")
    torch.set_num_threads(n)
    return n
