"""Prometheus metrics of one server (its own registry): jobs by outcome, queue depth, seconds per stage,
windows per second. Every name starts with `dtml_`."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from dtml_deploy.serve.batching import BatchStats
from dtml_deploy.serve.store import Job

STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _DeviceCollector:
    """Reads the device thread's counters when scraped."""

    def __init__(self, stats: Callable[[], BatchStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.stats()
        yield CounterMetricFamily("dtml_windows", "Sliding windows run through the networks", value=s.windows)
        yield CounterMetricFamily("dtml_forwards", "Batches run through the networks", value=s.forwards)
        yield CounterMetricFamily("dtml_device_seconds", "Seconds the device thread spent running batches",
                                  value=s.device_seconds)
        yield GaugeMetricFamily("dtml_windows_per_second", "Windows per second of device time so far",
                                value=s.windows / s.device_seconds if s.device_seconds else 0.0)


class Metrics:
    """The counters the routes and the job queue update, and their Prometheus text."""

    def __init__(self, queue_depth: Callable[[], int], running: Callable[[], int],
                 stats: Callable[[], BatchStats]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs = Counter("dtml_jobs", "Jobs by outcome (done, failed, rejected)", ["outcome"],
                            registry=self.registry)
        self.stages = Histogram("dtml_stage_seconds", "Seconds per job stage", ["stage"], buckets=STAGE_BUCKETS,
                                registry=self.registry)
        Gauge("dtml_queue_depth", "Jobs waiting in the queue", registry=self.registry).set_function(queue_depth)
        Gauge("dtml_jobs_running", "Jobs being segmented", registry=self.registry).set_function(running)
        self.registry.register(_DeviceCollector(stats))

    def finished(self, job: Job) -> None:
        self.jobs.labels(job.status).inc()
        for stage, seconds in job.stages.items():
            self.stages.labels(stage).observe(seconds)

    def rejected(self) -> None:
        self.jobs.labels("rejected").inc()

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
