"""The longer fuzz run behind the counts in docs/security.md: every parser of untrusted input, many
seeds, each target in its own child process (a crash is counted, not fatal).

    python3 bench/fuzz_parsers.py                      # default counts, about 10 minutes on 2 cores
    python3 bench/fuzz_parsers.py --scale 0.1          # a quick look

Prints one row per target: cases, valid outputs, one-line errors, findings (tracebacks, multi-line
errors, hangs, crashes), seconds; then the findings themselves. Exit status 1 if there are any."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {"gguf_model": 2000, "gguf_vocab": 150, "llama2c": 1500, "params_json": 3000, "hf_config": 2000, "quantize_json": 2000,
         "sentencepiece": 2000, "tiktoken": 2000, "artifact_metadata": 2000, "aoti_package": 1500, "pte_header": 1500}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=1.0, help="multiply every target's case count")
    p.add_argument("--seed", type=int, default=1, help="the suite uses seed 0; a different one finds new cases")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    rows, findings = [], []
    for target, n in CASES.items():
        n = max(1, int(n * args.scale))
        proc = subprocess.run([sys.executable, "-m", "tests.fuzzing", "--target", target, "--cases", str(n),
                               "--seed", str(args.seed)], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            rows.append({"target": target, "cases": n, "outcomes": {"finding": 1}, "seconds": 0,
                         "findings": [f"process died ({proc.returncode}) at {last}"]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        findings += [f"{target}: {f}" for f in r["findings"]]
        o = r["outcomes"]
        print(f"{target:18} {r['cases']:6} cases  {o.get('ok', 0):6} ok  {o.get('error', 0):6} one-line errors  "
              f"{o.get('finding', 0):4} findings  {r['seconds']:7.1f} s", flush=True)
    total = sum(r["cases"] for r in rows)
    print(f"{'total':18} {total:6} cases  {sum(r['outcomes'].get('finding', 0) for r in rows)} findings")
    for f in findings:
        print(f)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
