"""Prometheus metrics of the whole pipeline, read from the shared database at each scrape (``/metrics``).

The listener, the workers (separate processes, possibly on other hosts) and the housekeeping all record what they
do in the database, so counters kept in the memory of one process would count only that process's share.
``PipelineCollector`` instead runs a few aggregate queries when Prometheus scrapes and turns their results into
metric families: counters are counts of rows that are only ever added (instances, predictions, refusals), gauges
are counts by current state. Every query is one aggregate over a table (``COUNT``, ``SUM(CASE ...)`` for the
histogram buckets), so a scrape costs a few scans and no row reaches Python; the metrics carry no patient, study
or instance identifiers, only counts, durations, states, refusal codes, labels and model versions.

The outboxes are counted for every output of the registry (``cxr_triage.outputs.registry``): each has a series
named after its table (``cxr_triage_forwards``, ``cxr_triage_hl7_messages``, ``cxr_triage_orthanc_metadata``) by
state, and ``..._retrying``, its pending rows that failed at least once; a new output is counted without a change
here.

When the database cannot be read (gone, hung past ``health.DATABASE_TIMEOUT``), the scrape still answers, with
``cxr_triage_database_up 0`` and the metrics that need no database (spool space, build), so that an alert can
name the cause rather than a failed scrape.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import Engine, case, column, func, inspect, select, table
from sqlalchemy.orm import Session

from cxr_triage import __version__, log_name
from cxr_triage.core import db
from cxr_triage.core.failurelog import FailureLog
from cxr_triage.core.settings import Settings
from cxr_triage.ops import status
from cxr_triage.ops.health import DATABASE_ERRORS, TimedReader, ensure_database_file
from cxr_triage.outputs.registry import OUTPUTS, Needs, Output
from cxr_triage.queue import spool

logger = logging.getLogger(log_name(__name__))

LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Upper bounds (seconds) of the duration histograms' buckets; ``+Inf`` is added."""
OUTBOX_TABLES: dict[str, str] = {output.kind: output.table.__tablename__ for output in OUTPUTS}
"""The table read for each output of the registry, by its kind; a table that does not exist is not counted."""
OUTBOX_STATE_COLUMNS: tuple[str, ...] = ("state", "status")
"""The first of these columns that an outbox table has is the one its rows are counted by."""
MIB = 1024 * 1024


@dataclass(frozen=True)
class Histogram:
    """A duration histogram: cumulative counts at each of ``LATENCY_BUCKETS``, the count and the sum (seconds)."""

    cumulative: tuple[int, ...]
    count: int
    sum_seconds: float

    def buckets(self) -> list[tuple[str, float]]:
        return [(str(bound), float(n)) for bound, n in zip(LATENCY_BUCKETS, self.cumulative, strict=True)] + [
            ("+Inf", float(self.count))
        ]


@dataclass(frozen=True)
class Outbox:
    """One output's outbox rows, as a scrape read them."""

    output: Output
    states: dict[str, int]
    retrying: int | None
    """Pending rows that failed at least once; None where the table has no ``attempts``."""


@dataclass(frozen=True)
class Snapshot:
    """What one scrape read from the database."""

    by_state: dict[str, int]
    oldest_queued_seconds: float | None
    expired_leases: int
    classifications: list[tuple[str, str, int]]
    """(label, model version, predictions) for each pair."""
    refusals: dict[str, int]
    """Refusals by their code (``cxr_triage.ml.preprocess``)."""
    inference: Histogram
    classification: Histogram
    outboxes: tuple[Outbox, ...]
    """The rows of each output's outbox, in the registry's order (outputs without a table left out)."""
    models: list[tuple[str, str, bool, bool]]
    """(version, sha256, active, latest) of each registered model."""


def _histograms(session: Session) -> tuple[Histogram, Histogram]:
    """The inference and preprocess-plus-inference histograms of every prediction, in one aggregate query."""
    p = db.PredictionRecord
    columns: list[Any] = [func.count()]
    for value in (p.inference_ms, p.total_ms):
        columns += [func.sum(case((value <= bound * 1000.0, 1), else_=0)) for bound in LATENCY_BUCKETS]
        columns.append(func.sum(value))
    row = session.execute(select(*columns)).one()
    count, width = int(row[0]), len(LATENCY_BUCKETS) + 1

    def histogram(offset: int) -> Histogram:
        values = row[offset : offset + width]
        return Histogram(tuple(int(v or 0) for v in values[:-1]), count, float(values[-1] or 0.0) / 1000.0)

    return histogram(1), histogram(1 + width)


def _outbox(session: Session, output: Output) -> Outbox | None:
    """An output's rows by state where its table exists (checked on every scrape: a migration may add it)."""
    name = OUTBOX_TABLES.get(output.kind, output.table.__tablename__)
    inspector = inspect(session.connection())
    if not inspector.has_table(name):
        return None
    names = {c["name"] for c in inspector.get_columns(name)}
    state = next((column_name for column_name in OUTBOX_STATE_COLUMNS if column_name in names), None)
    if state is None:
        logger.debug("table %s has none of the columns %s; not counted", name, OUTBOX_STATE_COLUMNS)
        return None
    rows = session.execute(select(column(state), func.count()).select_from(table(name)).group_by(column(state)))
    states = {"" if value is None else str(value): int(n) for value, n in rows}
    retrying = None
    if "attempts" in names:
        retrying = session.scalar(
            select(func.count())
            .select_from(table(name))
            .where(column(state) == db.FORWARD_PENDING.value, column("attempts") > 0)
        )
    return Outbox(output, states, None if retrying is None else int(retrying))


def read_snapshot(engine: Engine, now: dt.datetime | None = None) -> Snapshot:
    """Every metric's value that comes from the database (``status``'s counts and a few aggregates more)."""
    now = now or db.utcnow()
    ensure_database_file(engine)
    counts = status.read_counts(engine, now)
    p, r, m = db.PredictionRecord, db.RefusalRecord, db.ModelVersion
    with db.read_session(engine) as session:
        classifications = [
            (str(label), str(version), int(n))
            for label, version, n in session.execute(
                select(p.label, p.model_version, func.count()).group_by(p.label, p.model_version)
            )
        ]
        refusals = {str(code): int(n) for code, n in session.execute(select(r.code, func.count()).group_by(r.code))}
        inference, classification = _histograms(session)
        models = session.execute(select(m.version, m.sha256, m.active).order_by(m.registered_at, m.id)).all()
        outboxes = tuple(outbox for output in OUTPUTS if (outbox := _outbox(session, output)) is not None)
    oldest = counts.oldest_queued
    return Snapshot(
        by_state={str(k): int(v) for k, v in counts.by_state.items()},
        oldest_queued_seconds=max(0.0, (now - oldest).total_seconds()) if oldest is not None else None,
        expired_leases=int(counts.expired or 0),
        classifications=classifications,
        refusals=refusals,
        inference=inference,
        classification=classification,
        outboxes=outboxes,
        models=[
            (str(version), str(sha256), bool(active), index == len(models) - 1)
            for index, (version, sha256, active) in enumerate(models)
        ],
    )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"cxr_triage_{name}", documentation, value=value)


def _by_label(
    kind: type[GaugeMetricFamily] | type[CounterMetricFamily],
    name: str,
    documentation: str,
    labels: Sequence[str],
    values: Iterable[tuple[Sequence[str], float]],
) -> Metric:
    family = kind(f"cxr_triage_{name}", documentation, labels=list(labels))
    for label_values, value in values:
        family.add_metric(list(label_values), value)
    return family


def _instance_families(snapshot: Snapshot) -> Iterator[Metric]:
    by_state = snapshot.by_state
    yield CounterMetricFamily(
        "cxr_triage_instances_received", "SOP instances received and queued", value=sum(by_state.values())
    )
    yield CounterMetricFamily(
        "cxr_triage_instances_failed", "instances that failed after every attempt", value=by_state.get(db.FAILED, 0)
    )
    yield _by_label(
        GaugeMetricFamily,
        "queue_jobs",
        "jobs in the queue: waiting (queued) and claimed by a worker (processing)",
        ["state"],
        [((state,), by_state.get(state, 0)) for state in (db.QUEUED, db.PROCESSING)],
    )
    yield _gauge(
        "queue_oldest_age_seconds",
        "how long the oldest queued instance has waited (0 when nothing is queued)",
        snapshot.oldest_queued_seconds or 0.0,
    )
    yield _gauge(
        "queue_lease_expired_jobs",
        "jobs whose worker's lease expired (the worker died?); they are retried",
        snapshot.expired_leases,
    )
    yield _by_label(
        CounterMetricFamily,
        "classifications",
        "classifications recorded (one per prediction), by label and model version",
        ["label", "model_version"],
        [((label, version), n) for label, version, n in snapshot.classifications],
    )
    yield _by_label(
        CounterMetricFamily,
        "refusals",
        "instances not classified, by the refusal's reason code",
        ["reason"],
        sorted(((code,), n) for code, n in snapshot.refusals.items()),
    )


def _result_families(snapshot: Snapshot) -> Iterator[Metric]:
    for name, documentation, histogram in (
        ("inference_duration_seconds", "model time per classified image", snapshot.inference),
        ("classification_duration_seconds", "preprocessing plus model time per image", snapshot.classification),
    ):
        yield HistogramMetricFamily(
            f"cxr_triage_{name}", documentation, buckets=histogram.buckets(), sum_value=histogram.sum_seconds
        )
    for outbox in snapshot.outboxes:
        yield from _outbox_families(outbox)
    model = InfoMetricFamily("cxr_triage_model", "models a worker has loaded (latest: the last one registered)")
    for version, sha256, active, latest in snapshot.models:
        model.add_metric(
            [], {"version": version, "sha256": sha256, "active": str(active).lower(), "latest": str(latest).lower()}
        )
    yield model


def _outbox_families(outbox: Outbox) -> Iterator[Metric]:
    """An output's series: its rows by state (the states it declares always, 0 when none), its retrying rows."""
    output = outbox.output
    name = output.table.__tablename__
    shown = [((state,), outbox.states.get(state, 0)) for state in output.states]
    shown += sorted(((state,), n) for state, n in outbox.states.items() if state not in output.states)
    yield _by_label(
        GaugeMetricFamily,
        name,
        f"{output.noun} by state (pending, sent, dead: gave up after its max_attempts"
        f"{'' if output.needs is Needs.INSTANCE else '; superseded: a newer result of the study replaced it'})",
        ["state"],
        shown,
    )
    if outbox.retrying is not None:
        yield _gauge(f"{name}_retrying", f"pending {output.noun} that failed at least once (retried)", outbox.retrying)


class PipelineCollector(Collector):
    """The pipeline's metrics, read from ``engine``'s database at each ``collect`` (module docstring)."""

    def __init__(self, settings: Settings, engine: Engine, reader: TimedReader | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.reader = reader or TimedReader()
        self.failures = FailureLog(logger, "reading the metrics from the database")

    def describe(self) -> list[Metric]:
        return []  # registering must not query the database

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        try:
            snapshot: Snapshot | None = self.reader(lambda: read_snapshot(self.engine))
            self.failures.succeeded()
        except DATABASE_ERRORS as exc:
            self.failures.failed(exc)
            snapshot = None
        yield _gauge("database_up", "1 when this scrape could read the database, else 0", 1 if snapshot else 0)
        build = InfoMetricFamily("cxr_triage_build", "the cxr-triage release serving these metrics")
        build.add_metric([], {"version": __version__})
        yield build
        yield from self._spool_families()
        if snapshot is not None:
            yield from _instance_families(snapshot)
            yield from _result_families(snapshot)
        yield _gauge(
            "scrape_duration_seconds", "time this scrape took to read its values", time.perf_counter() - started
        )

    def _spool_families(self) -> Iterator[Metric]:
        storage = self.settings.storage
        try:
            free = spool.free_mb(storage.spool_dir) * MIB
        except OSError:
            logger.warning("cannot read the spool's free space", exc_info=True)
        else:
            yield _gauge("spool_free_bytes", "free space on the spool's file system", free)
        yield _gauge(
            "spool_reserve_bytes",
            "[storage] min_free_mb: below this free space the listener answers 0xA700",
            storage.min_free_mb * MIB,
        )


def make_registry(settings: Settings, engine: Engine, reader: TimedReader | None = None) -> CollectorRegistry:
    """A registry of its own (not the process-wide default) holding only the pipeline's collector."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(PipelineCollector(settings, engine, reader))
    return registry
