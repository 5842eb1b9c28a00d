"""Multi-turn chat: time to first token of each turn when the KV cache of the earlier turns is reused
(Engine.chat prefills only the new tokens) versus prefilling the whole conversation again.

Random weights of a real shape (default stories42M, fp32, CPU) with the Llama 2 tokenizer and chat
template; the assistant's turns are fixed text. Prints medians of several runs per turn.

    python3 bench/chat_bench.py [--shape stories42M] [--turns 8] [--repeat 5]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from common import SHARED
from torchchat.build import BuildSpec, ModelSource, build_model
from torchchat.generation.chat_format import Llama2Format, Message
from torchchat.generation.engine import GenerationConfig, make_engine
from torchchat.generation.sampling import SamplingParams

USER = "Tell me more about the little village by the sea, the girl who lived there and her notebook of stories."
ASSISTANT = ("Lily lived in a white house near the harbour. Every morning she walked along the beach, picked up "
             "shells and wrote down what the fishermen told her about the storms, the fish and the far islands.")


def ttft(engine, messages, fmt, cfg, warm_ids) -> float:
    """Seconds to the first token of a reply to `messages`, with `warm_ids` in the cache beforehand
    (None: an empty cache, so the whole conversation is prefilled)."""
    engine.kv_ids = []
    if warm_ids:
        list(engine.tokens(warm_ids, cfg))
    out = list(engine.chat(messages, cfg, fmt))
    return out[-1].stats.time_to_first_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="stories42M", help="params table for the random weights")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    tokenizer = SHARED / "tokenizers" / "llama2" / "tokenizer.model"
    spec = BuildSpec(ModelSource(params_table=args.shape, dummy_weights=True, tokenizer_path=tokenizer),
                     device="cpu", dtype=torch.float32, max_seq_len=1024)
    built = build_model(spec)
    engine = make_engine(built, max_seq_len=1024)
    fmt = Llama2Format("<s>", "</s>")
    cfg = GenerationConfig(max_new_tokens=1, sampling=SamplingParams(temperature=0.0))
    tok = built.tokenizer
    print(f"{args.shape} random weights, fp32, cpu, {torch.get_num_threads()} threads; median of {args.repeat}")
    print(f"{'turn':>4} {'context':>8} {'new':>5} {'reuse ms':>9} {'full ms':>8} {'full/reuse':>10}")
    messages = [Message("system", "You are a storyteller.")]
    for turn in range(1, args.turns + 1):
        previous = fmt.encode(tok, messages, add_generation_prompt=False) if turn > 1 else None
        messages.append(Message("user", f"{USER} ({turn})"))
        context = len(fmt.encode(tok, messages))
        reuse = statistics.median(ttft(engine, messages, fmt, cfg, previous) for _ in range(args.repeat))
        new = engine.last_stats.prompt_tokens
        full = statistics.median(ttft(engine, messages, fmt, cfg, None) for _ in range(args.repeat))
        print(f"{turn:>4} {context:>8} {new:>5} {reuse * 1e3:>9.1f} {full * 1e3:>8.1f} {full / reuse:>10.2f}")
        messages.append(Message("assistant", ASSISTANT))


if __name__ == "__main__":
    main()
