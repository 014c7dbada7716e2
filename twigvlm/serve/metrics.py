"""The server's Prometheus metrics (`GET /metrics`), in a registry of their own (never the global one), so
that several apps in one process (tests) do not collide. Names follow vLLM's where one exists."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..generation.stats import GenerationStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BYTE_BUCKETS = tuple(float(2**k) for k in range(16, 34, 2))  # 64 KiB .. 8 GiB
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Histograms of time to first token, inter-token latency, end-to-end and queue time, and of the keys and
    values each request held at its end; running and waiting gauges, and the bytes of keys and values running
    requests hold and the batch reserves; prompt, generation, drafted, accepted and kept-visual-token counters;
    requests by outcome."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        p = "twigvlm_"

        def seconds(name: str, doc: str) -> Histogram:
            return Histogram(p + name, doc, buckets=LATENCY_BUCKETS, registry=r)

        self.ttft = seconds("time_to_first_token_seconds", "Request arrival to its first text")
        self.itl = seconds("inter_token_latency_seconds", "Time between streamed text pieces")
        self.e2e = seconds("e2e_request_latency_seconds", "Request arrival to its end")
        self.queue = seconds("request_queue_time_seconds", "Time waiting for the inference thread")
        self.running = Gauge(p + "num_requests_running", "Requests being generated", registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests admitted and waiting", registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens, visual tokens included", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Generated tokens", registry=r)
        self.drafted = Counter(p + "spec_decode_draft_tokens", "Tokens the twig drafted", registry=r)
        self.accepted = Counter(p + "spec_decode_accepted_tokens", "Drafted tokens the full model accepted", registry=r)
        self.visual = Counter(p + "visual_tokens", "Visual tokens of the prompts", registry=r)
        self.kept = Counter(p + "kept_visual_tokens", "Visual tokens kept (pruned requests)", registry=r)
        self.requests = Counter(p + "requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.kv_request = Histogram(
            p + "request_kv_cache_bytes", "Keys and values a request held at its end", buckets=BYTE_BUCKETS, registry=r
        )
        self.kv_held = Gauge(p + "kv_cache_bytes", "Keys and values the running requests hold", registry=r)
        self.kv_reserved = Gauge(p + "kv_cache_reserved_bytes", "Key and value buffers the batch reserves", registry=r)

    def record_result(self, stats: GenerationStats, prompt_tokens: int) -> None:
        """Count one finished generation's tokens."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(stats.new_tokens)
        self.visual.inc(stats.visual_tokens)
        self.kv_request.observe(stats.kv_bytes)
        if stats.kept is not None:
            self.kept.inc(stats.kept)
        if stats.drafted is not None:
            self.drafted.inc(stats.drafted)
            self.accepted.inc(stats.accepted or 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
