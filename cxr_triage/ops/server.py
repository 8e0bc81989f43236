"""``cxr-triage serve``: the DICOM listener, ``[worker] processes`` worker processes and the housekeeping.

Start-up order: settings (a bad value stops here, its key named); database (an empty one gets the schema; one behind
the code's revision is refused with the ``db upgrade`` command to run); spool recovery (incomplete temporaries
removed, spool files without a row enqueued, jobs held by dead local workers released) and SR recovery (the SR files
a crash left between write and rename settled, ``cxr_triage.outputs.srfiles``); then the listener (with ``[dicomweb]
stow_enabled`` its STOW-RS twin, ``cxr_triage.dicom.stow``), the workers (multiprocessing, spawn), the housekeeping
scheduler (``cxr_triage.ops.housekeeping``: forwarding, study aggregation, spool retention, in this process only),
with ``[retrain] enabled`` the retraining schedule (``cxr_triage.retrain.scheduler``: one process leads it among all
that share the database) and, once, in a background thread, the sweep of SR files without a row
(``srfiles.sweep_orphans``). A worker process that dies is restarted. SIGTERM or SIGINT: stop accepting STOW-RS
requests (those in progress are answered) and associations, let associations in progress finish, ask the workers to
stop (each finishes or releases its claimed jobs), stop the retraining (a run in progress is recorded as failed) and
the housekeeping, and exit.

Research use only; not a medical device.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from multiprocessing.process import BaseProcess

from sqlalchemy import Engine

from cxr_triage import log_name
from cxr_triage.core import db
from cxr_triage.core.settings import AUTO, Settings
from cxr_triage.dicom import listener, stow
from cxr_triage.ops.housekeeping import Housekeeping
from cxr_triage.outputs import srfiles
from cxr_triage.queue import jobqueue, spool
from cxr_triage.retrain.scheduler import RetrainScheduler

logger = logging.getLogger(log_name(__name__))

WORKER_STOP_TIMEOUT = 60.0
"""Seconds a worker process gets to finish its batch after SIGTERM before it is killed."""
WATCH_INTERVAL = 0.5
"""Seconds between checks of the worker processes (and of the stop flag)."""


def recover(settings: Settings, engine: Engine) -> None:
    """Spool and queue recovery after a crash (safe to run on every start)."""
    sessions = db.session_factory(engine)
    spool.remove_stale_temporaries(settings.storage.spool_dir)
    recovered = jobqueue.enqueue_orphans(settings.storage.spool_dir, sessions)
    released = jobqueue.release_dead_local_workers(sessions, settings.worker.max_attempts, jobqueue.EARLIER_RUN_DIED)
    if recovered or released:
        logger.warning("recovery: %d spool file(s) enqueued, %d job(s) of dead workers released", recovered, released)
    srfiles.settle_pending(settings.storage.sr_dir, sessions)


def warn_if_no_model(settings: Settings) -> None:
    from cxr_triage.ml.checkpoint import CheckpointError, resolve_model_path

    try:
        resolve_model_path(settings.model.path or None, how="pass it with --model PATH or set [model] path")
    except CheckpointError as exc:
        logger.warning("*" * 78)
        logger.warning("NO MODEL: instances will be received and queued, but not classified. %s", exc)
        logger.warning("*" * 78)


def exit_description(exitcode: int | None) -> str:
    """A process's exit as words: ``killed by SIGSEGV`` for a negative (signal) code, else ``exit code N``."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class Server:
    """Listener + worker processes + housekeeping; ``serve_forever`` returns after ``stop`` is set."""

    def __init__(self, settings: Settings, engine: Engine, log_level: str = "INFO") -> None:
        self.settings = settings
        self.engine = engine
        self.log_level = log_level
        self.stop = threading.Event()
        self._mp = multiprocessing.get_context("spawn")
        self.wake = self._mp.Event()
        """Set by the listener when it has queued an instance; wakes idle worker processes."""
        receiver = listener.make_receiver(settings.storage, engine, on_queued=self.wake.set)
        self.listener = listener.Listener(settings.listener, receiver)
        self.stow: stow.StowServer | None = None
        if settings.dicomweb.stow_enabled:  # STOW-RS in, on the listener's spool and database (dicom.stow)
            self.stow = stow.StowServer(settings.dicomweb, receiver, log_level)
        self.housekeeping = Housekeeping(settings, db.session_factory(engine))
        self.retraining: RetrainScheduler | None = None
        if settings.retrain.enabled:  # the retraining schedule ([retrain], cxr_triage.retrain.scheduler)
            self.retraining = RetrainScheduler(settings, db.session_factory(engine))
        self.processes: list[BaseProcess] = []
        self.threads: int | None = None

    def _start_worker(self, index: int) -> BaseProcess:
        from cxr_triage.triage.worker import worker_process_main

        process = self._mp.Process(
            target=worker_process_main,
            args=(self.settings, self.log_level, self.wake, self.threads),
            name=f"cxr-worker-{index}",
            daemon=False,
        )
        process.start()
        logger.info("worker process %s started (pid %s)", process.name, process.pid)
        return process

    def start(self) -> None:
        self.listener.start()
        if self.stow is not None:
            self.stow.start()
        count, self.threads = self._layout()
        for index in range(count):
            self.processes.append(self._start_worker(index))
        if not self.processes:
            logger.info("[worker] processes = 0: no workers here; run `cxr-triage worker` to classify")
        self.housekeeping.start()
        if self.retraining is not None:
            self.retraining.start()
        threading.Thread(target=self._sweep_sr_files, name="cxr-sr-sweep", daemon=True).start()

    def _sweep_sr_files(self) -> None:
        try:
            srfiles.sweep_orphans(self.settings.storage.sr_dir, db.session_factory(self.engine))
        except Exception:  # tried again at the next start
            logger.exception("the sweep of SR files without a database row failed")

    def _layout(self) -> tuple[int, int]:
        """Worker processes and model threads each, from ``[worker]`` and this machine's cores."""
        from cxr_triage.triage.worker import available_cores, worker_layout

        ws, device = self.settings.worker, self.settings.model.device
        cuda = device.startswith("cuda")
        if device == "auto" and AUTO in (ws.processes, ws.threads):
            import torch

            cuda = torch.cuda.is_available()
        count, threads = worker_layout(ws.processes, ws.threads, available_cores(), cuda)
        if count:
            kind = "CUDA" if cuda else "CPU"
            logger.info("%d worker process(es), %d model thread(s) each (%s)", count, threads, kind)
        return count, threads

    def _watch_workers(self) -> None:
        for index, process in enumerate(self.processes):
            if process.is_alive() or self.stop.is_set():
                continue
            logger.error(
                "worker process %s (pid %s) exited with %s; restarting", process.name, process.pid, process.exitcode
            )
            sessions = db.session_factory(self.engine)
            cause = f"worker process {process.name} died ({exit_description(process.exitcode)})"
            jobqueue.release_dead_local_workers(sessions, self.settings.worker.max_attempts, cause)
            try:
                srfiles.settle_pending(self.settings.storage.sr_dir, sessions)
            except Exception:  # left for the next start
                logger.exception("the SR files of worker process %s could not be settled", process.name)
            self.processes[index] = self._start_worker(index)

    def serve_forever(self) -> None:
        while not self.stop.is_set():
            self._watch_workers()
            # Not stop.wait(): the signal handler sets stop, and Event.set() from a handler deadlocks if the
            # handler interrupts this thread while it holds the event's lock inside wait().
            time.sleep(WATCH_INTERVAL)

    def shutdown(self) -> None:
        """Stop accepting associations, then stop the workers (they finish or release their jobs)."""
        logger.info("shutting down: no new associations")
        if self.stow is not None:
            self.stow.stop()
        self.listener.stop()
        for process in self.processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: the worker stops after its current batch
        deadline = time.monotonic() + WORKER_STOP_TIMEOUT
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                logger.error("worker process %s did not stop in time; killing it", process.name)
                process.kill()
                process.join(5)
        if self.retraining is not None:
            self.retraining.stop()
        self.housekeeping.stop()
        jobqueue.release_dead_local_workers(db.session_factory(self.engine))
        logger.info("stopped")
