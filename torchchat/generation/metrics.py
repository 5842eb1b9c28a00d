"""Throughput, memory-bandwidth and memory figures, as the original torchchat printed them."""
from __future__ import annotations

import json
import resource
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import torch

from torchchat.generation.engine import GenerationStats


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device)
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@dataclass
class SampleReport:
    sample: int
    prompt_tokens: int
    generated_tokens: int
    time_total_s: float
    time_to_first_token_s: float
    total_tokens_per_s: float
    first_token_per_s: float
    next_tokens_per_s: float
    bandwidth_gb_s: float
    parallel_prefill: bool
    compile_sample: bool
    acceptance_rate: float | None = None  # speculative decoding: accepted / proposed draft tokens


def sample_report(i: int, stats: GenerationStats, model_bytes: int, compile_sample: bool) -> SampleReport:
    return SampleReport(
        sample=i,
        prompt_tokens=stats.prompt_tokens,
        generated_tokens=stats.generated_tokens,
        time_total_s=stats.total_time,
        time_to_first_token_s=stats.time_to_first_token,
        total_tokens_per_s=stats.total_tokens_per_s,
        first_token_per_s=stats.first_token_per_s,
        next_tokens_per_s=stats.next_tokens_per_s,
        bandwidth_gb_s=model_bytes * stats.next_tokens_per_s / 1e9,
        parallel_prefill=stats.prefill_parallel,
        compile_sample=compile_sample,
        acceptance_rate=stats.acceptance_rate if stats.draft_proposed else None,
    )


def print_sample(r: SampleReport, out: TextIO) -> None:
    prefill = "parallel" if r.parallel_prefill else "sequential"
    tag = " (compile / warm-up sample, not averaged)" if r.compile_sample else ""
    print(f"Time for inference {r.sample}: {r.time_total_s:.2f} sec total{tag}", file=out)
    print(f"Time to first token: {r.time_to_first_token_s:.4f} sec with {prefill} prefill.", file=out)
    print(f"      Total throughput: {r.total_tokens_per_s:.2f} tokens/sec, {1 / max(r.total_tokens_per_s, 1e-9):.4f} s/token", file=out)
    print(f"First token throughput: {r.first_token_per_s:.2f} tokens/sec, {r.time_to_first_token_s:.4f} s/token", file=out)
    print(f" Next token throughput: {r.next_tokens_per_s:.2f} tokens/sec, {1 / max(r.next_tokens_per_s, 1e-9):.4f} s/token", file=out)
    print(f"Bandwidth achieved: {r.bandwidth_gb_s:.2f} GB/s", file=out)


@dataclass
class Summary:
    samples: list[SampleReport]
    model_bytes_per_token: int
    peak_memory_bytes: int
    device: str
    dtype: str

    def averaged(self) -> list[SampleReport]:
        kept = [s for s in self.samples if not s.compile_sample]
        return kept or self.samples

    def medians(self) -> dict[str, float]:
        kept = self.averaged()
        keys = ("total_tokens_per_s", "first_token_per_s", "next_tokens_per_s", "bandwidth_gb_s", "time_to_first_token_s")
        return {k: statistics.median(getattr(s, k) for s in kept) for k in keys}

    def means(self) -> dict[str, float]:
        kept = self.averaged()
        keys = ("total_tokens_per_s", "first_token_per_s", "next_tokens_per_s", "bandwidth_gb_s")
        return {k: statistics.fmean(getattr(s, k) for s in kept) for k in keys}

    def print(self, out: TextIO) -> None:
        mean = self.means()
        print("=" * 40, file=out)
        print(f"Average tokens/sec (total): {mean['total_tokens_per_s']:.2f}", file=out)
        print(f"Average tokens/sec (first token): {mean['first_token_per_s']:.2f}", file=out)
        print(f"Average tokens/sec (next tokens): {mean['next_tokens_per_s']:.2f}", file=out)
        print(f"Average bandwidth: {mean['bandwidth_gb_s']:.2f} GB/s (model reads {self.model_bytes_per_token / 1e6:.2f} MB per token)", file=out)
        print(f"Memory used: {self.peak_memory_bytes / 1e9:.2f} GB", file=out)

    def write_json(self, path: Path) -> None:
        data = {
            "device": self.device,
            "dtype": self.dtype,
            "model_bytes_per_token": self.model_bytes_per_token,
            "peak_memory_bytes": self.peak_memory_bytes,
            "samples": [asdict(s) for s in self.samples],
            "mean": self.means(),
            "median": self.medians(),
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)
