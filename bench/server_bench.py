"""Server throughput and latency: requests/s, time to first token and aggregate tokens/s for 1, 4, 8
and 16 concurrent clients (continuous batching: the server generates up to --max-concurrent at once).

Starts `torchchat.py server` on a free port (stories260K from ../shared by default; `--shape stories15M`:
random weights of that shape, fp32, the llama2 tokenizer), warms it up, then for each concurrency level
runs one untimed round (one request per client: first-use compiles of the batch sizes it reaches)
and then `--runs` rounds; in each round every client sends streaming greedy chat requests back to back
until the round's requests are done. Prints the median over rounds of: requests/s (requests / wall
time), median and p90 time to first token (send -> first text chunk, queueing included), generated
tokens/s summed over clients, per client, and as a multiple of one client's.

    python3 bench/server_bench.py
    python3 bench/server_bench.py --shape stories15M --concurrency 1 4 8 16 --requests 32 --max-tokens 64
    python3 bench/server_bench.py --distinct-prompts ...         # no request reuses another's cached prompt
    python3 bench/server_bench.py --url http://127.0.0.1:5000   # an already running server
    python3 bench/server_bench.py -- --checkpoint-path ... --max-concurrent 4   # server flags after --
"""
from __future__ import annotations

import argparse
import http.client
import json
import re
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from common import CLI, ROOT, SHARED

PROMPTS = [
    "Once upon a time",
    "Lily and Tom went to the park. They",
    "The cat",
    "One day, a little bird named Blue flew over the big green hill and saw",
    "Tim had a red ball.",
    "There was a dog who liked to",
    "Mom said,",
    "The sun was hot and the children wanted to swim in the lake, so they",
]


def start_server(extra: list[str], shape: str | None = None) -> tuple[subprocess.Popen, str]:
    folder = SHARED / "models" / "stories260K"
    if shape:
        source = ["--params-table", shape, "--dummy-weights", "--dtype", "fp32", "--device", "cpu",
                  "--tokenizer-path", str(SHARED / "tokenizers" / "llama2" / "tokenizer.model"), *extra]
    else:
        source = extra or ["--checkpoint-path", str(folder / "stories260K.bin"),
                           "--tokenizer-path", str(folder / "tok512.model"), "--dtype", "fp32"]
    log = Path(tempfile.mkstemp(prefix="torchchat-server-", suffix=".log")[1])
    cmd = [*CLI, "server", *source, "--port", "0"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    while True:
        m = re.search(r"API at (http://[^\s/]+)/v1", log.read_text(errors="replace"))
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"server failed to start:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)


def one_request(host: str, port: int, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to first text chunk, seconds to the end, completion tokens) of one streaming request."""
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection(host, port, timeout=600)
    t0 = time.perf_counter()
    first = None
    tokens = 0
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise SystemExit(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
    finally:
        conn.close()
    end = time.perf_counter() - t0
    return (first if first is not None else end), end, tokens


_serial = iter(range(1 << 62))


def prompt_for(i: int, distinct: bool) -> str:
    """Request i's prompt. `distinct`: a number never used before leads it, so no request's prompt
    starts with another's past the chat template and prefix reuse cannot skip its prefill."""
    text = PROMPTS[i % len(PROMPTS)]
    return f"Story {next(_serial)}. {text}" if distinct else text


def run_round(host: str, port: int, clients: int, requests: int, max_tokens: int, distinct: bool = False) -> dict:
    ttfts: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    next_index = [0]

    def client() -> None:
        while True:
            with lock:
                i = next_index[0]
                if i >= requests:
                    return
                next_index[0] += 1
            ttft, _, n = one_request(host, port, prompt_for(i, distinct), max_tokens)
            with lock:
                ttfts.append(ttft)
                tokens[0] += n

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts.sort()
    return {"rps": requests / wall, "ttft_median": statistics.median(ttfts),
            "ttft_p90": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))], "tok_s": tokens[0] / wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="Benchmark this running server instead of starting one")
    p.add_argument("--shape", help="Serve random weights of this params table (e.g. stories15M) instead of stories260K")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--requests", type=int, default=32, help="Requests per round (at least the concurrency)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3, help="Rounds per concurrency level (the median is printed)")
    p.add_argument("--distinct-prompts", action="store_true",
                   help="Start every prompt with a new number, so no request reuses another's cached prompt "
                        "(without it the same few prompts recur and later rounds prefill only their last token)")
    p.add_argument("server_args", nargs=argparse.REMAINDER,
                   help="After --: model flags for the server (default: stories260K fp32)")
    args = p.parse_args()
    extra = [a for a in args.server_args if a != "--"]
    proc = None
    if args.url:
        base = args.url.rstrip("/")
    else:
        proc, base = start_server(extra, args.shape)
    host, port = base.removeprefix("http://").rsplit(":", 1)
    try:
        for prompt in PROMPTS[:2]:  # warm-up: first-call allocations, caches
            one_request(host, int(port), prompt, args.max_tokens)
        print(f"server {base}; streaming greedy chat requests, {args.max_tokens} tokens each; "
              f"median of {args.runs} rounds; {'distinct' if args.distinct_prompts else 'recurring'} prompts")
        print(f"{'clients':>7} {'requests':>8} {'req/s':>7} {'TTFT med (s)':>12} {'TTFT p90 (s)':>12} {'tok/s':>7} "
              f"{'per client':>10} {'x 1 client':>10}")
        single = None
        for c in args.concurrency:
            n = max(args.requests, c)
            # One untimed round first: the batch buckets this level reaches are compiled (--compile) or
            # captured (CUDA graphs) the first time they run, seconds that would land in the first round.
            run_round(host, int(port), c, c, args.max_tokens, args.distinct_prompts)
            rounds = [run_round(host, int(port), c, n, args.max_tokens, args.distinct_prompts) for _ in range(args.runs)]
            med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
            if c == 1:
                single = med["tok_s"]
            ratio = f"{med['tok_s'] / single:>10.2f}" if single else f"{'':>10}"
            print(f"{c:>7} {n:>8} {med['rps']:>7.2f} {med['ttft_median']:>12.3f} {med['ttft_p90']:>12.3f} "
                  f"{med['tok_s']:>7.1f} {med['tok_s'] / c:>10.1f} {ratio}", flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
