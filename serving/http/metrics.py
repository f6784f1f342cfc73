"""The server's Prometheus metrics (GET /metrics), one registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from runtime.pipeline import Answer

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self, queue_depth, busy) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "corematching_requests", "Chat completion requests answered, by HTTP status", ["status"], registry=r
        )
        self.errors = Counter("corematching_errors", "Requests refused or failed, by kind", ["kind"], registry=r)
        self.queue = Gauge("corematching_queue_depth", "Requests waiting for the pipeline", registry=r)
        self.queue.set_function(queue_depth)
        self.running = Gauge("corematching_requests_running", "Requests being generated (0 or 1)", registry=r)
        self.running.set_function(lambda: 1.0 if busy() else 0.0)
        self.ttft = Histogram(
            "corematching_time_to_first_token_seconds",
            "From arrival to the first token (queueing included)",
            buckets=_LATENCY,
            registry=r,
        )
        self.latency = Histogram(
            "corematching_request_seconds", "From arrival to the last token", buckets=_LATENCY, registry=r
        )
        self.decode_rate = Histogram(
            "corematching_decode_tokens_per_second",
            "Decode steps per second of each answer",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=r,
        )
        self.kept = Histogram(
            "corematching_kept_image_tokens",
            "Image tokens kept by the selection per request",
            buckets=(16, 32, 64, 128, 192, 256, 384, 576, 1024, 2304),
            registry=r,
        )
        self.completion_tokens = Counter("corematching_completion_tokens", "Tokens generated in answers", registry=r)

    def answered(self, answer: Answer, seconds: float) -> None:
        self.latency.observe(seconds)
        self.completion_tokens.inc(len(answer.token_ids))
        decode = answer.timings.decode
        if decode:
            self.decode_rate.observe(len(decode) / sum(decode))
        kept = answer.num_image_tokens if answer.kept_image_tokens is None else len(answer.kept_image_tokens)
        self.kept.observe(kept)

    def render(self) -> bytes:
        return generate_latest(self.registry)
