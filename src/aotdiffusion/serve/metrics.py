"""Prometheus metrics of one server (its own registry, so several apps in one process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

# The *_created series double every counter's lines and no dashboard here reads them.
disable_created_metrics()

# Request latencies span tiny test models (milliseconds) to full-size CPU images (minutes).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600)
FILL_BUCKETS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        export = ["model", "size"]
        self.queue_depth = Gauge(
            "aotdiffusion_queue_depth", "Requests waiting for a pipeline call", export, registry=self.registry
        )
        self.queued_images = Gauge(
            "aotdiffusion_queued_images", "Image slots waiting for a pipeline call", export, registry=self.registry
        )
        self.busy_replicas = Gauge(
            "aotdiffusion_busy_replicas", "Replicas running a pipeline call now", export, registry=self.registry
        )
        self.batches = Counter("aotdiffusion_batches", "Pipeline calls run", export, registry=self.registry)
        self.batch_failures = Counter(
            "aotdiffusion_batch_failures", "Pipeline calls that raised an error", export, registry=self.registry
        )
        self.fill_ratio = Histogram(
            "aotdiffusion_batch_fill_ratio",
            "Requested images / image slots of each pipeline call",
            export,
            buckets=FILL_BUCKETS,
            registry=self.registry,
        )
        self.padded_slots = Counter(
            "aotdiffusion_padded_slots",
            "Image slots computed only to fill the compiled batch (their images are discarded)",
            export,
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "aotdiffusion_batch_seconds", "Duration of one pipeline call", export, buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "aotdiffusion_request_seconds",
            "Time from a request's arrival to its response (successful image requests)",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.images_served = Counter(
            "aotdiffusion_images_served", "Images returned to clients", ["model"], registry=self.registry
        )
        self.responses = Counter(
            "aotdiffusion_responses", "Responses by endpoint and HTTP status", ["endpoint", "status"],
            registry=self.registry,
        )  # fmt: skip

    def for_export(self, model: str, size: str) -> ExportObserver:
        return ExportObserver(self, model, size)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ExportObserver:
    """What a :class:`~aotdiffusion.serve.batcher.Batcher` reports, as the metrics of one served export."""

    def __init__(self, metrics: Metrics, model: str, size: str):
        self.m, self.labels = metrics, {"model": model, "size": size}

    def queue(self, batcher) -> None:
        self.m.queue_depth.labels(**self.labels).set(batcher.queued_requests)
        self.m.queued_images.labels(**self.labels).set(batcher.queued_images)
        self.m.busy_replicas.labels(**self.labels).set(batcher.busy_replicas)

    def call(self, seconds: float, wanted: int, slots: int, error: Exception | None) -> None:
        self.m.batches.labels(**self.labels).inc()
        self.m.batch_seconds.labels(**self.labels).observe(seconds)
        self.m.fill_ratio.labels(**self.labels).observe(wanted / slots)
        self.m.padded_slots.labels(**self.labels).inc(slots - wanted)
        if error is not None:
            self.m.batch_failures.labels(**self.labels).inc()
