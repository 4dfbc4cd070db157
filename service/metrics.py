"""Prometheus metrics (prefix ``postserve_``): HTTP traffic, the engine's counters, calibration.

Request counts and latencies are observed by :class:`RequestMetrics`, an ASGI middleware. Every
other series is read from the engine when Prometheus scrapes (:class:`EngineCollector`): the
engine keeps plain counters and each model its :class:`~service.calibration.CalibrationTracker`,
and nothing on the request path touches Prometheus for them.

Label cardinality stays bounded: series with a ``model`` label exist only for models created with
``"monitor": true``, and ``POSTSERVE_MAX_MONITORED_MODELS`` caps how many there are. ``route`` is
the route's template (``/v1/models/{name}/update``), never the raw path; ``reason`` is one of the
error codes of :mod:`service.errors`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.calibration import BINS, LEVELS
from service.hosting import Engine, EngineStats, ModelStats
from service.influence import BUCKETS

__all__ = ["EngineCollector", "RequestMetrics", "make_registry"]

disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series

#: Latency buckets (seconds): a small model's update takes about a millisecond.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class RequestMetrics:
    """Counts requests by method, route template and status, and times them."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry, routes: Sequence[BaseRoute]):
        self.app, self.routes = app, routes
        self.requests = Counter(
            "postserve_http_requests",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "postserve_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def _route(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None and hasattr(route, "path"):
            return str(route.path)
        for candidate in self.routes:  # refused before routing (auth, body limit)
            match, _ = candidate.matches(scope)
            if match == Match.FULL and hasattr(candidate, "path"):
                return str(candidate.path)
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route, method = self._route(scope), scope["method"]
            self.requests.labels(method, route, str(status)).inc()
            self.latency.labels(method, route).observe(time.perf_counter() - start)


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


class EngineCollector(Collector):
    """Reads ``engine.stats()`` at scrape time: totals for all models, series for monitored ones."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        yield from _totals(stats)
        monitored = stats.monitored
        yield from _model_series(monitored)
        yield from _calibration_series(monitored)


def _totals(stats: EngineStats) -> Iterator[Metric]:
    models = stats.models
    applied = CounterMetricFamily(
        "postserve_observations_applied", "Observations (rows) applied, all models."
    )
    applied.add_metric([], stats.applied)
    yield applied
    rejected = CounterMetricFamily(
        "postserve_updates_rejected",
        "Update requests refused by the engine, by error code; nothing of them was applied.",
        labels=["reason"],
    )
    for reason, n in sorted(stats.rejected.items()):
        rejected.add_metric([reason], n)
    yield rejected
    batched: tuple[tuple[str, str, int], ...] = (
        (
            "postserve_batched_steps",
            "Batched steps of one-row updates of several models (POSTSERVE_BATCH_STEPS).",
            stats.batched_steps,
        ),
        ("postserve_batched_rows", "Rows stepped in batched steps.", stats.batched_rows),
    )
    for counted, doc, n in batched:
        counter = CounterMetricFamily(counted, doc)
        counter.add_metric([], n)
        yield counter
    for name, doc, value in (
        ("postserve_models", "Models hosted.", len(models)),
        ("postserve_models_monitored", 'Models with "monitor": true.', len(stats.monitored)),
        (
            "postserve_state_bytes",
            "Bytes of all hosted posterior states.",
            sum(m.state_bytes for m in models),
        ),
        (
            "postserve_snapshot_age_max_seconds",
            "Oldest snapshot among models with observations not yet in one (0: none).",
            max((m.snapshot_age_s for m in models if m.unsnapshotted > 0), default=0.0),
        ),
        (
            "postserve_log_observations",
            "Observations in the logs after the latest snapshots (replayed at a restart).",
            sum(m.unsnapshotted for m in models),
        ),
        ("postserve_ready", "1 when every model is restored, else 0.", int(stats.ready)),
    ):
        g = _gauge(name, doc)
        g.add_metric([], value)
        yield g


def _model_series(monitored: list[ModelStats]) -> Iterator[Metric]:
    """Per-model counters and gauges of the monitored models."""
    info = _gauge(
        "postserve_model_info", "1 per monitored model.", ["model", "likelihood", "filter"]
    )
    version = _gauge("postserve_model_version", "Observations applied to the model.", ["model"])
    applied = CounterMetricFamily(
        "postserve_model_observations_applied",
        "Observations applied by this replica since it started.",
        labels=["model"],
    )
    rejected = CounterMetricFamily(
        "postserve_model_updates_rejected",
        "Update requests refused, by error code.",
        labels=["model", "reason"],
    )
    state = _gauge("postserve_model_state_bytes", "Bytes of the posterior state.", ["model"])
    age = _gauge(
        "postserve_model_snapshot_age_seconds", "Seconds since the last snapshot.", ["model"]
    )
    log_len = _gauge(
        "postserve_model_log_observations",
        "Observations in the log after the latest snapshot.",
        ["model"],
    )
    for m in monitored:
        info.add_metric([m.name, m.likelihood, m.filter], 1)
        version.add_metric([m.name], m.version)
        applied.add_metric([m.name], m.applied)
        for reason, n in sorted(m.rejected.items()):
            rejected.add_metric([m.name, reason], n)
        state.add_metric([m.name], m.state_bytes)
        age.add_metric([m.name], m.snapshot_age_s)
        log_len.add_metric([m.name], m.unsnapshotted)
    yield from (info, version, applied, rejected, state, age, log_len)
    yield _influence(monitored)


def _influence(monitored: list[ModelStats]) -> Metric:
    """The histogram of each monitored model's influence sizes (``service.influence``)."""
    family = HistogramMetricFamily(
        "postserve_model_influence",
        "How much each observation moved the model: the Mahalanobis size of its mean step.",
        labels=["model"],
    )
    for m in monitored:
        if m.influence is None:
            continue
        counts, total = m.influence
        bounds = [*(str(b) for b in BUCKETS), "+Inf"]
        cumulative = list(itertools.accumulate(counts))
        family.add_metric([m.name], list(zip(bounds, cumulative, strict=True)), total)
    return family


def _calibration_families() -> dict[str, GaugeMetricFamily]:
    return {
        "window": _gauge(
            "postserve_calibration_window_observations",
            "Observations in the calibration window.",
            ["model"],
        ),
        "nll": _gauge(
            "postserve_calibration_nll",
            "Mean negative log predictive density of the window's labels (nats), "
            "each under the prediction made before it was learned.",
            ["model"],
        ),
        "coverage": _gauge(
            "postserve_calibration_coverage_ratio",
            "Share of labels inside the central predictive interval of the given level "
            "(should equal the level).",
            ["model", "level"],
        ),
        "pit": _gauge(
            "postserve_calibration_pit_bin_ratio",
            "Share of PIT values in the bin with this upper edge (uniform: 0.1 each).",
            ["model", "bin"],
        ),
        "z_mean": _gauge(
            "postserve_calibration_standardized_residual_mean",
            "Mean of (y - mean) / sd over the window (gaussian; calibrated: 0).",
            ["model"],
        ),
        "z_var": _gauge(
            "postserve_calibration_standardized_residual_variance",
            "Variance of (y - mean) / sd over the window (gaussian; calibrated: 1).",
            ["model"],
        ),
        "brier": _gauge("postserve_calibration_brier_score", "Mean Brier score.", ["model"]),
        "log_loss": _gauge("postserve_calibration_log_loss", "Mean log loss (nats).", ["model"]),
        "ece": _gauge(
            "postserve_calibration_ece",
            "Expected calibration error over 10 equal-width bins.",
            ["model"],
        ),
        "rel_n": _gauge(
            "postserve_calibration_reliability_observations",
            "Observations per reliability bin (by the bin's upper edge).",
            ["model", "bin"],
        ),
        "rel_conf": _gauge(
            "postserve_calibration_reliability_confidence",
            "Mean predicted probability in the reliability bin.",
            ["model", "bin"],
        ),
        "rel_acc": _gauge(
            "postserve_calibration_reliability_accuracy",
            "Observed frequency in the reliability bin.",
            ["model", "bin"],
        ),
    }


def _calibration_series(monitored: list[ModelStats]) -> Iterator[Metric]:
    """The calibration window of each monitored model."""
    cal = _calibration_families()
    edges = [f"{(b + 1) / BINS:g}" for b in range(BINS)]
    for m in monitored:
        s = m.calibration
        if s is None:
            continue
        labels = [m.name]
        cal["window"].add_metric(labels, s.n)
        _maybe(cal["nll"], labels, s.nll)
        if (cov := s.coverage) is not None:
            for level in LEVELS:
                cal["coverage"].add_metric([m.name, f"{level:g}"], cov[level])
        if (pit := s.pit_histogram) is not None:
            for edge, share in zip(edges, pit, strict=True):
                cal["pit"].add_metric([m.name, edge], share)
        _maybe(cal["z_mean"], labels, s.residual_mean)
        _maybe(cal["z_var"], labels, s.residual_variance)
        _maybe(cal["brier"], labels, s.brier)
        _maybe(cal["log_loss"], labels, s.log_loss)
        _maybe(cal["ece"], labels, s.ece)
        if s.labels:
            for edge, b in zip(edges, s.reliability(), strict=True):
                cal["rel_n"].add_metric([m.name, edge], b["count"] or 0)
                _maybe(cal["rel_conf"], [m.name, edge], b["confidence"])
                _maybe(cal["rel_acc"], [m.name, edge], b["accuracy"])
    yield from cal.values()


def _maybe(family: GaugeMetricFamily, labels: list[str], value: float | None) -> None:
    if value is not None:
        family.add_metric(labels, float(value))


def make_registry(engine: Engine) -> CollectorRegistry:
    """A registry of its own per app (no process globals): the engine's series in it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine))
    return registry
