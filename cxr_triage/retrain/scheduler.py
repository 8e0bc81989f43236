"""The retraining schedule inside ``serve``: ``RetrainScheduler`` runs the job (``cxr_triage.retrain.retraining``)
on ``[retrain] schedule``. Every ``serve`` process competes for the ``retrain-scheduler`` lease
(``cxr_triage.core.schedlock``) and only its holder runs an APScheduler cron job, so exactly one scheduler runs
however many processes and hosts share the database; when its holder dies, another takes over once the lease has
expired (a fire time that passes during the hand-over is not made up: ``retrain --now``). The runs themselves take
the ``retrain`` lease, so a scheduled run and ``retrain --now`` never overlap.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import log_name
from cxr_triage.core import schedlock
from cxr_triage.core.settings import Settings
from cxr_triage.retrain.retraining import SCHEDULE, RetrainJob

logger = logging.getLogger(log_name("cxr_triage.retraining"))
"""The retraining's logger, as it was before the split (log filters hold)."""

SCHEDULER_LEASE = "retrain-scheduler"


class RetrainScheduler:
    """The retraining schedule inside ``serve`` (module docstring): leader election on the ``retrain-scheduler``
    lease, an APScheduler cron job in the leader."""

    JOB_ID = "retrain"

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.holder = schedlock.holder_id()
        self.lease = schedlock.Lease(sessions, SCHEDULER_LEASE, self.holder, settings.retrain.lock_seconds)
        self.job = RetrainJob(settings, sessions, self.holder)
        self._scheduler: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()
        self.runs = 0

    @property
    def leading(self) -> bool:
        return self._scheduler is not None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._lead, name="retrain-scheduler", daemon=True)
        self._thread.start()

    def _lead(self) -> None:
        interval = self.settings.retrain.lock_seconds / 3
        while True:
            try:
                held = self.lease.acquire()
            except Exception as exc:  # the database is away: keep what we have until the lease would expire
                logger.warning("retraining scheduler: cannot renew the scheduler lease (%s)", exc)
                held = self.leading
            with self._guard:
                if self._stop.is_set():
                    return
                if held and not self.leading:
                    self._start_cron()
                elif not held and self.leading:
                    logger.warning("retraining scheduler: another process leads now; this one stops scheduling")
                    self._stop_cron()
            if self._stop.wait(interval):
                return

    def _start_cron(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        scheduler = BackgroundScheduler(daemon=True, job_defaults={"coalesce": True, "max_instances": 1})
        scheduler.add_job(
            self._scheduled, self.settings.retrain.trigger(), id=self.JOB_ID, name="retraining",
            misfire_grace_time=3600,
        )  # fmt: skip
        scheduler.start()
        self._scheduler = scheduler
        logger.info(
            "retraining scheduler: this process (%s) leads; schedule %r, next run at %s",
            self.holder,
            self.settings.retrain.schedule,
            self.next_run_time(),
        )

    def _stop_cron(self) -> None:
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.shutdown(wait=False)

    def _scheduled(self) -> None:
        self.runs += 1
        try:
            outcome = self.job.run(SCHEDULE)
            logger.info("retraining scheduler: %s; next run at %s", outcome.describe(), self.next_run_time())
        except Exception:  # recorded by the job where it could be; the schedule goes on
            logger.exception("retraining scheduler: the run failed")

    def next_run_time(self) -> dt.datetime | None:
        scheduler = self._scheduler
        if scheduler is None:
            return None
        job = scheduler.get_job(self.JOB_ID)
        return job.next_run_time if job is not None else None

    def fire_now(self) -> bool:
        """Make the scheduled job run at once (if this process leads); whether it does."""
        with self._guard:
            scheduler = self._scheduler
            if scheduler is None:
                return False
            scheduler.modify_job(self.JOB_ID, next_run_time=dt.datetime.now(dt.UTC))
            scheduler.wakeup()
            return True

    def stop(self) -> None:
        """Stop scheduling, stop a run in progress (recorded as failed), give the scheduler lease back."""
        with self._guard:
            self._stop.set()
            scheduler, self._scheduler = self._scheduler, None
        self.job.abort("the server is stopping")
        if scheduler is not None:
            scheduler.shutdown(wait=True)
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.lease.release()
        except Exception:  # it expires by itself
            logger.exception("retraining scheduler: the lease could not be released")
