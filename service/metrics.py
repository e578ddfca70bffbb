"""Prometheus metrics, registered in a registry owned by one app (no process-global state)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ace_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("ace_request_seconds", "HTTP request latency by route",
                                 ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("ace_queue_depth", "images waiting for the inference worker",
                                 registry=self.registry)
        self.batch_size = Histogram("ace_batch_size", "images per forward pass",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.rejected = Counter("ace_rejected_images", "images refused because the queue was full",
                                registry=self.registry)
        self.index_images = Gauge("ace_index_images", "images in the served index",
                                  registry=self.registry)
        self.index_patches = Gauge("ace_index_patches", "patches in the served index",
                                   registry=self.registry)
        self.index_swaps = Counter("ace_index_reloads", "index reload attempts by outcome",
                                   ["status"], registry=self.registry)
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, memory, open fds

    def track_worker_cpu(self, read_seconds: Callable[[], float]) -> None:
        """ace_worker_cpu_seconds_total: the inference worker thread's CPU time. With the
        process's CPU it splits a request's CPU into the model's and the request path's."""
        self.registry.register(_WorkerCpu(read_seconds))

    def observe_batch(self, size: int, depth_after: int) -> None:
        self.batch_size.observe(size)
        self.queue_depth.set(depth_after)


class _WorkerCpu(Collector):
    def __init__(self, read_seconds: Callable[[], float]) -> None:
        self.read_seconds = read_seconds

    def collect(self) -> Iterator[CounterMetricFamily]:
        help_text = "CPU seconds of the inference worker thread (forward passes, batching) at its last batch"
        yield CounterMetricFamily("ace_worker_cpu_seconds", help_text, value=self.read_seconds())


class RequestMetricsMiddleware:
    """Counts every HTTP request by its route template (not the raw path, to bound cardinality).

    FastAPI routes name themselves in the scope; plain Starlette routes and mounts (/openapi.json,
    the docs' static assets) are looked up in the app's routes; a path no route takes is `unmatched`.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # stays 500 if the app raises before it starts a response
        started = time.perf_counter()
        request = {"type": "http", "path": scope["path"], "root_path": scope.get("root_path", ""),
                   "method": scope.get("method", ""), "headers": scope.get("headers", [])}
        # (the scope as it came in: routing rewrites root_path for mounts)

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            self._record(scope, request, status, time.perf_counter() - started)

    def _record(self, scope: Scope, request: Scope, status: int, seconds: float) -> None:
        route = route_label(scope, request)
        method = str(scope.get("method", ""))
        self.metrics.requests.labels(method, route, str(status)).inc()
        self.metrics.latency.labels(method, route).observe(seconds)


def route_label(scope: Scope, request: Scope) -> str:
    """The template of the route that took the request: FastAPI's, else the app's route or mount
    whose pattern matches `request` (the scope as it came in), else `unmatched`."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    routes: list[BaseRoute] = getattr(scope.get("app"), "routes", [])
    for wanted in (Match.FULL, Match.PARTIAL):  # PARTIAL: the path matches, the method does not (405)
        for route in routes:
            template = getattr(route, "path_format", None)
            if isinstance(template, str) and route.matches(request)[0] is wanted:
                return template
    return "unmatched"
