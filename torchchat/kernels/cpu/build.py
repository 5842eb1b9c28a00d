"""Prebuild the CPU kernels into the cache: `python3 -m torchchat.kernels.cpu.build`.

install/install_requirements.sh runs this so that the first `generate` does not pay for the compile.
Exit status 0 when the kernels load (prints the path and the instruction set chosen), 1 otherwise
(prints why; torchchat then runs without them)."""
from __future__ import annotations

import sys

from torchchat.kernels import cpu


def main() -> int:
    if not cpu.available():
        print(f"torchchat CPU kernels unavailable: {cpu.unavailable_reason()}", file=sys.stderr)
        return 1
    print(f"torchchat CPU kernels ready: {cpu.library_path()} (isa {cpu.isa()}; supported {', '.join(cpu.supported_isas())})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
