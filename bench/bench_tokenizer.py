"""Tokenizer figures: load time per kind, encode throughput, and streaming-decode cost per token
(StreamDecoder vs re-decoding the whole history each token). Prints medians of several runs.

    python3 bench/bench_tokenizer.py [--shared ../shared] [--tokens 2000] [--repeat 5]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import median_seconds
from torchchat.tokenizer.load import load_tokenizer
from torchchat.tokenizer.stream import StreamDecoder

TEXT = (
    "Once upon a time, in a village by the sea, there lived a girl named Lily. "
    "She loved to collect shells 🐚 and to write stories in her notebook: café, naïve, 我想在这里工作. "
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--tokens", type=int, default=2000, help="length of the streamed sequence")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    files = {
        "sentencepiece (llama2)": args.shared / "tokenizers/llama2/tokenizer.model",
        "tiktoken (llama3)": args.shared / "tokenizers/llama3/tokenizer.model",
        "gguf (llama2 vocab)": args.shared / "tokenizers/llama.cpp-vocab-tests/ggml-vocab-llama-spm.gguf",
    }
    print(f"{'tokenizer':24} {'load s':>8} {'encode MB/s':>12} {'stream us/tok':>14} {'full re-decode us/tok':>22}")
    for name, path in files.items():
        load_s = median_seconds(lambda: load_tokenizer(path), 1 if "gguf" in name else args.repeat)
        tok = load_tokenizer(path)
        text = TEXT * 200
        enc_s = median_seconds(lambda: tok.encode(text), args.repeat)
        ids = (tok.encode(TEXT) * (args.tokens // len(tok.encode(TEXT)) + 1))[: args.tokens]

        def stream() -> None:
            decoder = StreamDecoder(tok)
            for i in ids:
                decoder.add(i)
            decoder.flush()

        def naive() -> None:  # what StreamDecoder avoids: decode everything so far at every token
            previous = ""
            for n in range(1, len(ids) + 1):
                text_so_far = tok.decode(ids[:n])
                text_so_far[len(previous) :]
                previous = text_so_far

        stream_s = median_seconds(stream, args.repeat)
        naive_s = median_seconds(naive, max(1, args.repeat // 2))
        print(
            f"{name:24} {load_s:8.2f} {len(text.encode()) / enc_s / 1e6:12.2f} "
            f"{stream_s / len(ids) * 1e6:14.1f} {naive_s / len(ids) * 1e6:22.1f}"
        )


if __name__ == "__main__":
    main()
