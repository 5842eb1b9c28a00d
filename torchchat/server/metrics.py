"""Server metrics in Prometheus' text exposition format (GET /metrics).

The worker thread records steps and first tokens; the route renders a snapshot. Counters only grow;
tokens/s is the rate over the last `window` seconds of steps, so it reads 0 once the server is idle."""
from __future__ import annotations

import bisect
import collections
import threading
import time

# Time-to-first-token histogram buckets, seconds (Prometheus' `le` labels).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    def __init__(self, window: float = 10.0):
        self.window = window
        self._lock = threading.Lock()
        self.generated_tokens = 0
        self.steps = 0
        self.queued = 0
        self.active = 0
        self.max_concurrent = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (perf_counter, tokens)
        self._ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self._ttft_sum = 0.0
        self._ttft_n = 0

    def step(self, tokens: int, queued: int, active: int, now: float) -> None:
        with self._lock:
            self.steps += 1
            self.generated_tokens += tokens
            self.queued, self.active = queued, active
            self._recent.append((now, tokens))
            while self._recent and self._recent[0][0] < now - self.window:
                self._recent.popleft()

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self._ttft_counts[bisect.bisect_left(TTFT_BUCKETS, seconds)] += 1
            self._ttft_sum += seconds
            self._ttft_n += 1

    def tokens_per_s(self, now: float | None = None) -> float:
        now = time.perf_counter() if now is None else now
        with self._lock:
            recent = [(t, n) for t, n in self._recent if t >= now - self.window]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span

    def render(self, queued: int, active: int, completed: int, cancelled: int) -> str:
        """The exposition text; queue and slot gauges come from the worker's live counts."""
        rate = self.tokens_per_s()
        with self._lock:
            lines = [
                "# HELP torchchat_queue_requests Requests waiting for a free slot.",
                "# TYPE torchchat_queue_requests gauge",
                f"torchchat_queue_requests {queued}",
                "# HELP torchchat_active_slots Sequences being generated (busy slots).",
                "# TYPE torchchat_active_slots gauge",
                f"torchchat_active_slots {active}",
                "# HELP torchchat_max_slots Sequence slots (--max-concurrent).",
                "# TYPE torchchat_max_slots gauge",
                f"torchchat_max_slots {self.max_concurrent}",
                "# HELP torchchat_requests_total Finished requests by outcome.",
                "# TYPE torchchat_requests_total counter",
                f'torchchat_requests_total{{outcome="completed"}} {completed}',
                f'torchchat_requests_total{{outcome="cancelled"}} {cancelled}',
                "# HELP torchchat_generated_tokens_total Tokens generated.",
                "# TYPE torchchat_generated_tokens_total counter",
                f"torchchat_generated_tokens_total {self.generated_tokens}",
                "# HELP torchchat_engine_steps_total Engine steps (one batched forward each).",
                "# TYPE torchchat_engine_steps_total counter",
                f"torchchat_engine_steps_total {self.steps}",
                f"# HELP torchchat_tokens_per_second Generated tokens per second over the last {self.window:g} s.",
                "# TYPE torchchat_tokens_per_second gauge",
                f"torchchat_tokens_per_second {rate:.3f}",
                "# HELP torchchat_time_to_first_token_seconds Time from a request's admission to its first token.",
                "# TYPE torchchat_time_to_first_token_seconds histogram",
            ]
            total = 0
            for le, n in zip((*TTFT_BUCKETS, float("inf")), self._ttft_counts):
                total += n
                label = "+Inf" if le == float("inf") else f"{le:g}"
                lines.append(f'torchchat_time_to_first_token_seconds_bucket{{le="{label}"}} {total}')
            lines.append(f"torchchat_time_to_first_token_seconds_sum {self._ttft_sum:.6f}")
            lines.append(f"torchchat_time_to_first_token_seconds_count {self._ttft_n}")
        return "\n".join(lines) + "\n"
