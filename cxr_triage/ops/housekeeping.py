"""Housekeeping: SR forwarding, study aggregation, study results out (HL7, Orthanc metadata) and spool retention,
on one schedule, in one process.

``serve`` runs it in its main process (an APScheduler background scheduler: each job at most once at a time, a
late run coalesced, never two copies in parallel); its worker processes and ``cxr-triage worker`` on other hosts
only classify. Every job is also safe where several processes share the database (rows are taken with SKIP
LOCKED), so a second ``serve`` on another host does no harm. ``run_once`` runs them all now, in the order of
``jobs`` (``results``-style one-shot use and tests).

Intervals: forwarding every ``FORWARD_INTERVAL`` seconds (a report reaches the PACS about that long after its
result was committed, retries follow ``[forward] backoff_seconds``), aggregation every ``AGGREGATE_INTERVAL``
(a completed study's HL7 messages and Orthanc metadata are queued in its transaction, ``study_complete``), their
sending every ``FORWARD_INTERVAL`` (each output its own job, so a slow RIS does not hold up the SRs), retention every
``RETENTION_INTERVAL``. The outputs come from ``cxr_triage.outputs.registry``: a new one gets its job here without
a line changed.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import log_name
from cxr_triage.core import db
from cxr_triage.core.failurelog import FailureLog
from cxr_triage.core.settings import Settings
from cxr_triage.ops import retention
from cxr_triage.outputs.registry import Needs, Output, needing
from cxr_triage.triage import studies

logger = logging.getLogger(log_name(__name__))

FORWARD_INTERVAL = 1.0
AGGREGATE_INTERVAL = 5.0
RETENTION_INTERVAL = 300.0


class Housekeeping:
    """The periodic jobs of one installation (module docstring)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self._scheduler: object | None = None

    def aggregate(self) -> None:
        quiet = self.settings.worker.study_quiet_seconds
        studies.aggregate_studies(self.sessions, quiet, triage=self.settings.triage, on_complete=self.study_complete)

    def study_complete(self, session: Session, study: db.Study, now: dt.datetime) -> None:
        """Queue what goes out for a just-aggregated study (the outputs that need a study), in the aggregation's
        transaction."""
        for output in needing(Needs.STUDY):
            output.enqueue(session, study, self.settings, now)

    def send_due(self, output: Output) -> Callable[[], None]:
        """One round of sending ``output``'s due rows."""
        return lambda: output.send_due(self.sessions, self.settings, False, ())

    def purge(self) -> None:
        retention.purge_spool(self.sessions, self.settings.storage.spool_retention_days)

    def jobs(self) -> list[tuple[str, Callable[[], None], float]]:
        """The outputs made from instances, the study aggregate, the outputs made from studies, retention."""
        return [
            *((o.job, self.send_due(o), FORWARD_INTERVAL) for o in needing(Needs.INSTANCE)),
            ("aggregate studies", self.aggregate, AGGREGATE_INTERVAL),
            *((o.job, self.send_due(o), FORWARD_INTERVAL) for o in needing(Needs.STUDY)),
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
