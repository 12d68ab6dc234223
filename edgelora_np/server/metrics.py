"""GET /metrics: Prometheus text, through prometheus-client, one registry per server.

Counted as requests end (ServerMetrics.observe_*); read at scrape time from the engine and the
adapter pool (EngineCollector), so a scrape always shows the present state:

    edgelora_requests_total{endpoint, status}       requests by route and HTTP status
    edgelora_prompt_tokens_total, edgelora_generation_tokens_total
    edgelora_time_to_first_token_seconds            histogram, from arrival to the first token
    edgelora_e2e_request_latency_seconds            histogram, from arrival to the last token
    edgelora_time_per_output_token_seconds          histogram, per request: decode time / (n - 1)
    edgelora_num_requests_waiting / _running        gauges
    edgelora_kv_cache_pages_used / _free / _cached  gauges (pages of 32 positions; free counts
                                                    the idle cached pages, evicted on demand)
    edgelora_prefix_cache_hit_tokens_total          prompt tokens served from the prefix cache
    edgelora_prefix_cache_evictions_total           cached KV pages evicted for new content
    edgelora_kv_cache_usage_perc                    gauge: used / all pages, 0 to 1 (vLLM's form)
    edgelora_adapter_pool_{hits,misses,loads,evictions}_total, _bytes_resident, _bytes_pinned
    edgelora_lora_requests_info{running_lora_adapters, waiting_lora_adapters, max_lora}
        vLLM's `lora_requests_info` gauge under our prefix (value: the scrape's Unix time), the
        form the Kubernetes Gateway API inference extension reads for adapter affinity.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class EngineCollector:
    """Reads the engine's and the pool's state at scrape time."""

    def __init__(self, get_engine):
        self._get_engine = get_engine        # None while the model loads

    def collect(self):
        engine = self._get_engine()
        if engine is None:
            return
        s, p = engine.stats(), engine.adapter_stats()
        for name, value, doc in (
                ("num_requests_waiting", s.waiting, "Requests waiting to be admitted."),
                ("num_requests_running", s.running, "Requests in the running batch."),
                ("kv_cache_pages_used", s.kv_pages_used, "KV cache pages held by sequences."),
                ("kv_cache_pages_free", s.kv_pages_free,
                 "KV cache pages free (idle cached pages included: evicted on demand)."),
                ("kv_cache_pages_cached", s.kv_pages_cached,
                 "Idle KV cache pages kept for prefix-cache hits."),
                ("adapter_pool_bytes_resident", p.bytes_resident, "Adapter bytes in the pool."),
                ("adapter_pool_bytes_pinned", p.bytes_pinned,
                 "Adapter bytes pinned by requests (or added for good)."),
                ("adapter_pool_budget_bytes", p.budget_bytes, "The pool's byte budget.")):
            yield GaugeMetricFamily(f"edgelora_{name}", doc, value=value)
        pages = s.kv_pages_used + s.kv_pages_free
        yield GaugeMetricFamily("edgelora_kv_cache_usage_perc", "KV cache pages in use, 0 to 1 "
                                "(vLLM's kv_cache_usage_perc).",
                                value=s.kv_pages_used / pages if pages else 0.0)
        yield CounterMetricFamily("edgelora_prefix_cache_hit_tokens", "Prompt tokens served "
                                  "from the prefix cache.", value=s.prefix_hit_tokens)
        yield CounterMetricFamily("edgelora_prefix_cache_evictions", "Cached KV pages evicted "
                                  "for new content.", value=s.prefix_evictions)
        for name, value in (("hits", p.hits), ("misses", p.misses), ("loads", p.loads),
                            ("evictions", p.evictions), ("load_failures", p.load_failures)):
            yield CounterMetricFamily(f"edgelora_adapter_pool_{name}",
                                      f"Adapter pool {name.replace('_', ' ')}.", value=value)
        info = GaugeMetricFamily(
            "edgelora_lora_requests_info", "Running and waiting adapters (vLLM's form).",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric([",".join(s.running_adapters), ",".join(s.waiting_adapters),
                         str(s.max_adapters)], time.time())
        yield info


class ServerMetrics:
    def __init__(self, get_engine):
        self.registry = CollectorRegistry()
        self.requests = Counter("edgelora_requests", "HTTP requests by route and status.",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("edgelora_prompt_tokens", "Prompt tokens of finished "
                                     "requests.", registry=self.registry)
        self.generation_tokens = Counter("edgelora_generation_tokens", "Generated tokens.",
                                         registry=self.registry)
        self.ttft = Histogram("edgelora_time_to_first_token_seconds", "Arrival to first token.",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("edgelora_e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("edgelora_time_per_output_token_seconds",
                              "Decode time per output token after the first.",
                              buckets=TOKEN_BUCKETS, registry=self.registry)
        self.registry.register(EngineCollector(get_engine))

    def observe_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def observe_generation(self, gen) -> None:
        """A finished Generation's tokens and latencies."""
        self.prompt_tokens.inc(gen.prompt_tokens)
        self.generation_tokens.inc(len(gen.token_ids))
        if gen.first_token is not None:
            self.ttft.observe(gen.first_token - gen.submitted)
        if gen.finished is not None:
            self.e2e.observe(gen.finished - gen.submitted)
        if len(gen.token_ids) > 1:
            self.tpot.observe(gen.decode_seconds / (len(gen.token_ids) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
