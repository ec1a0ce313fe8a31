"""The Prometheus metrics of ``fleet serve`` (:mod:`fleet.serve.http`), by ``prometheus_client``.

Each app has a registry of its own (never the process-global one: two apps in one process count apart):
request counts and latencies by endpoint (recorded by :class:`fleet.serve.http_middleware.RequestMetrics`),
sequences and heads scored, the served model's gauges (read from the :class:`~fleet.serve.http_holder.ModelHolder`
at each scrape), and prometheus_client's process, platform and garbage-collector metrics. ``GET /metrics``
answers :meth:`HttpMetrics.render` as :data:`CONTENT_TYPE`.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fleet.serve.http_holder import ModelHolder

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: The media type of the exposition (Prometheus text format 0.0.4).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


_ENDPOINTS = {
    "/v1/predict": "/v1/predict",
    "/v1/predict/batch": "/v1/predict/batch",
    "/v1/score": "/v1/score",
    "/healthz": "/healthz",
    "/metrics": "/metrics",
    "/admin/reload": "/admin/reload",
}


def _endpoint_label(path: str) -> str:
    label = _ENDPOINTS.get(path)
    if label is not None:
        return label
    if path.startswith("/v1/campaigns/"):
        return "/v1/campaigns/{id}"  # never the id itself: labels must stay few
    return "other"


class HttpMetrics:
    """The app's Prometheus metrics (``prometheus_client``) in a registry of its own, never the global one (two
    apps in one process count apart): request counts and latencies by endpoint, sequences and heads scored, the
    served model's gauges (read from the :class:`ModelHolder` at each scrape), and prometheus_client's process,
    platform and garbage-collector metrics."""

    def __init__(self, holder: ModelHolder):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "fleet_http_requests",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "fleet_http_request_duration_seconds",
            "Time from request start to response end.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.sequences = Counter("fleet_predicted_sequences", "Sequences scored.", registry=self.registry)
        self.scored_campaigns = Counter(
            "fleet_scored_campaigns", "Campaign heads evaluated by /v1/score.", registry=self.registry
        )
        self.registry.register(_ModelCollector(holder))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def observe(self, path: str, status: int, seconds: float) -> None:
        """Count a request to ``path`` answered ``status`` after ``seconds``, labelled by its endpoint (the
        route template, never a campaign id)."""
        endpoint = _endpoint_label(path)
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.duration.labels(endpoint=endpoint).observe(seconds)

    def add_sequences(self, n: int) -> None:
        """Count ``n`` sequences scored."""
        self.sequences.inc(n)

    def add_scored(self, sequences: int, campaigns: int) -> None:
        """Count a ``/v1/score``: ``sequences`` scored by ``campaigns`` heads."""
        self.sequences.inc(sequences)
        self.scored_campaigns.inc(campaigns)

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of every metric."""
        return generate_latest(self.registry)


class _ModelCollector(Collector):
    """The served model's metrics, read from the holder when scraped: head cache, version, swaps, reload errors."""

    def __init__(self, holder: ModelHolder):
        self.holder = holder

    def collect(self):
        holder = self.holder
        model = holder.get()
        cache = holder.cache_totals()
        yield CounterMetricFamily("fleet_head_cache_hits", "Head lookups served from memory.", value=cache["hits"])
        yield CounterMetricFamily(
            "fleet_head_cache_misses", "Head lookups that read a row group.", value=cache["misses"]
        )
        yield GaugeMetricFamily("fleet_head_cache_size", "Heads held dequantized in memory.", value=cache["size"])
        yield GaugeMetricFamily("fleet_head_cache_capacity", "Bound of the head cache.", value=cache["capacity"])
        info = GaugeMetricFamily(
            "fleet_model_info", "The fleet version being served (value 1).", labels=["version", "fleet"]
        )
        info.add_metric([str(model.version_id), str(model.manifest.get("fleet") or "")], 1)
        yield info
        yield GaugeMetricFamily("fleet_model_campaigns", "Campaigns in the served version.", value=model.num_campaigns)
        yield CounterMetricFamily("fleet_model_swaps", "Model versions swapped in since start.", value=holder.swaps)
        yield CounterMetricFamily(
            "fleet_model_reload_errors", "Failed reloads (the old version kept serving).", value=holder.reload_errors
        )


__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "HttpMetrics"]
