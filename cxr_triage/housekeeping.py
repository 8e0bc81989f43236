"""Housekeeping: SR forwarding, study aggregation and spool retention, on one schedule, in one process.

``serve`` runs it in its main process (an APScheduler background scheduler: each job at most once at a time, a
late run coalesced, never two copies in parallel); its worker processes and ``cxr-triage worker`` on other hosts
only classify. Every job is also safe where several processes share the database (rows are taken with SKIP
LOCKED), so a second ``serve`` on another host does no harm. ``run_once`` runs all three now (``results``-style
one-shot use and tests).

Intervals: forwarding every ``FORWARD_INTERVAL`` seconds (a report reaches the PACS about that long after its
result was committed, retries follow ``[forward] backoff_seconds``), aggregation every ``AGGREGATE_INTERVAL``,
retention every ``RETENTION_INTERVAL``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import forward, retention, studies
from cxr_triage.failurelog import FailureLog
from cxr_triage.settings import Settings

logger = logging.getLogger(__name__)

FORWARD_INTERVAL = 1.0
AGGREGATE_INTERVAL = 5.0
RETENTION_INTERVAL = 300.0


class Housekeeping:
    """The periodic jobs of one installation (module docstring)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self._scheduler: object | None = None

    def forward_due(self) -> None:
        forward.process_due(self.sessions, self.settings.forward)

    def aggregate(self) -> None:
        studies.aggregate_studies(self.sessions, self.settings.worker.study_quiet_seconds, triage=self.settings.triage)

    def purge(self) -> None:
        retention.purge_spool(self.sessions, self.settings.storage.spool_retention_days)

    def jobs(self) -> list[tuple[str, Callable[[], None], float]]:
        return [
            ("forward SRs", self.forward_due, FORWARD_INTERVAL),
            ("aggregate studies", self.aggregate, AGGREGATE_INTERVAL),
            ("spool retention", self.purge, RETENTION_INTERVAL),
        ]

    def run_once(self) -> None:
        """Every job now, each failure logged (one failing job does not stop the others)."""
        for name, job, _ in self.jobs():
            _guarded(name, job)()

    def start(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        # APScheduler logs two INFO lines per run of every job: once a second is noise in the server's log.
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        scheduler = BackgroundScheduler(daemon=True, job_defaults={"coalesce": True, "max_instances": 1})
        for name, job, seconds in self.jobs():
            scheduler.add_job(_guarded(name, job), "interval", seconds=seconds, id=name, name=name)
        scheduler.start()
        self._scheduler = scheduler
        logger.info("housekeeping scheduled: %s", ", ".join(f"{n} every {s:g} s" for n, _, s in self.jobs()))

    def stop(self) -> None:
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.shutdown(wait=True)  # type: ignore[attr-defined]


def _guarded(name: str, job: Callable[[], None]) -> Callable[[], None]:
    failures = FailureLog(logger, f"housekeeping: {name}")

    def run() -> None:
        try:
            job()
        except Exception as exc:
            failures.failed(exc)
        else:
            failures.succeeded()

    return run
