"""The server's numbers in Prometheus' text format (version 0.0.4), written out by hand: a few counters,
gauges and histograms need no client library. Each worker process counts its own requests."""

from __future__ import annotations

import bisect
import collections
import time

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)  # texts per merged batch
RATE_WINDOW = 10.0  # seconds of batches behind the tokens/s gauge


class Histogram:
    def __init__(self, buckets: tuple):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out, total = [], 0
        for bound, count in zip(self.buckets, self.counts):
            total += count
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {total}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        tail = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{tail} {self.sum}", f"{name}_count{tail} {self.count}"]


class Metrics:
    def __init__(self):
        self.requests = collections.Counter()  # (route, status) -> requests answered
        self.latency = collections.defaultdict(lambda: Histogram(LATENCY_BUCKETS))  # route -> seconds
        self.batch_texts = Histogram(BATCH_BUCKETS)
        self.tokens = 0  # tokens the model embedded
        self.texts = 0
        self.model_seconds = 0.0
        self.recent = collections.deque()  # (finished at, tokens) of the batches in the last RATE_WINDOW

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests[route, status] += 1
        self.latency[route].observe(seconds)

    def batch(self, texts: int, tokens: int, seconds: float) -> None:
        self.batch_texts.observe(texts)
        self.texts += texts
        self.tokens += tokens
        self.model_seconds += seconds
        now = time.monotonic()
        self.recent.append((now, tokens))
        while self.recent and self.recent[0][0] < now - RATE_WINDOW:
            self.recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        return sum(t for at, t in self.recent if at >= now - RATE_WINDOW) / RATE_WINDOW

    def render(self, queued: int, queued_tokens: int) -> str:
        lines = ["# HELP minisbert_requests_total Requests answered, by route and HTTP status.",
                 "# TYPE minisbert_requests_total counter"]
        lines += [f'minisbert_requests_total{{route="{r}",status="{s}"}} {n}'
                  for (r, s), n in sorted(self.requests.items())]
        errors = collections.Counter()
        for (r, s), n in self.requests.items():
            if s >= 400:
                errors[r] += n
        lines += ["# HELP minisbert_errors_total Requests answered with a 4xx or 5xx status, by route.",
                  "# TYPE minisbert_errors_total counter"]
        lines += [f'minisbert_errors_total{{route="{r}"}} {n}' for r, n in sorted(errors.items())]
        lines += ["# HELP minisbert_request_seconds Time from a request's arrival to its answer.",
                  "# TYPE minisbert_request_seconds histogram"]
        for route, histogram in sorted(self.latency.items()):
            lines += histogram.lines("minisbert_request_seconds", f'route="{route}"')
        lines += ["# HELP minisbert_queue_requests Requests waiting for the model.",
                  "# TYPE minisbert_queue_requests gauge", f"minisbert_queue_requests {queued}",
                  "# HELP minisbert_queue_tokens Tokens waiting for the model.",
                  "# TYPE minisbert_queue_tokens gauge", f"minisbert_queue_tokens {queued_tokens}",
                  "# HELP minisbert_batch_texts Texts per merged batch.", "# TYPE minisbert_batch_texts histogram"]
        lines += self.batch_texts.lines("minisbert_batch_texts")
        lines += ["# HELP minisbert_embedded_tokens_total Tokens embedded.",
                  "# TYPE minisbert_embedded_tokens_total counter", f"minisbert_embedded_tokens_total {self.tokens}",
                  "# HELP minisbert_embedded_texts_total Texts embedded.",
                  "# TYPE minisbert_embedded_texts_total counter", f"minisbert_embedded_texts_total {self.texts}",
                  "# HELP minisbert_model_seconds_total Seconds the model ran.",
                  "# TYPE minisbert_model_seconds_total counter", f"minisbert_model_seconds_total {self.model_seconds}",
                  f"# HELP minisbert_tokens_per_second Tokens embedded per second over the last {RATE_WINDOW:g} s.",
                  "# TYPE minisbert_tokens_per_second gauge", f"minisbert_tokens_per_second {self.tokens_per_second()}"]
        return "\n".join(lines) + "\n"
