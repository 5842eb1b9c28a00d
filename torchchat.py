"""Entry point: `python3 torchchat.py <command>`; the same as the `torchchat` console script."""
from torchchat.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
