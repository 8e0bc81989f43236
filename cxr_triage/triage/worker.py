"""Workers: claim queued instances, run them through the pipeline, hand the outcomes to the recorder.

The loop: ``jobqueue.claim`` a batch (``[worker] claim_batch``, leased for ``lease_seconds``), then classify it
chunk by chunk in three overlapping stages: a preprocessor thread prepares chunk n+1 (``pipeline.preprocess``)
while this thread runs the model on chunk n (``pipeline.classify``) and the recorder thread writes chunk n-1's
SRs and commits it (``recorder.Recorder``), so a result is committed only once its SR file is durable. torch,
numpy and file I/O release the GIL, so the stages fill each other's idle cores. On the CPU a chunk is
``CPU_CHUNK`` images so that the first results commit early (split evenly: 5 jobs are 3 + 2); on CUDA it is
the whole batch. Forwarding, study aggregation and spool retention are not the workers' job
(``cxr_triage.ops.housekeeping``, run by ``serve``).

Idle workers poll every ``[worker] poll_interval`` seconds; the worker processes that ``serve`` starts are also
woken by the listener as soon as it has queued an instance (``wake``). Workers on other hosts rely on polling.
On SIGTERM a worker finishes the chunk it is recording and releases the jobs it has not finished.

On the CPU a worker process lets OpenMP's idle threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``,
unless the environment sets it; see ``quiet_openmp_threads``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from cxr_triage import log_name
from cxr_triage.core import db
from cxr_triage.core.failurelog import FailureLog
from cxr_triage.core.settings import AUTO, Settings
from cxr_triage.ml.modelstore import ModelStore
from cxr_triage.queue import jobqueue
from cxr_triage.queue.jobqueue import ClaimedJob
from cxr_triage.triage import pipeline
from cxr_triage.triage.recorder import Recorder

if TYPE_CHECKING:
    from cxr_triage.ml.inference import Predictor

logger = logging.getLogger(log_name(__name__))
MAX_RETRY_INTERVAL = 30.0
"""Seconds: the longest wait between attempts while batches keep failing."""

MAX_AUTO_PROCESSES = 8
"""Most worker processes ``"auto"`` starts on the CPU (each holds its own copy of torch, a few hundred MB)."""
CPU_CHUNK = 4
"""Images classified and then recorded together on the CPU: small, so that the first results of a claimed batch
commit early (a CPU's images per second hardly depend on the forward batch size)."""
WARM_SR_CLASSES = ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1")
"""SOP classes whose SR templates a worker builds before taking jobs: CR, and DX for presentation."""
IDLE_SLICE = 0.25
"""Longest single wait of an idle worker: how soon it notices ``stop``."""


def quiet_openmp_threads() -> None:
    """Let OpenMP's idle threads sleep instead of spinning, unless ``OMP_WAIT_POLICY`` is already set.

    After each parallel region, OpenMP's worker threads busy-wait for the next one by default. Between batches
    (preprocessing, the recorder thread's SRs) and beside the listener the spinning threads burn cores that the
    rest of the pipeline needs: measured on the 2-core benchmark machine, the worker process used about a fifth
    less CPU per image with it (390 -> 307 ms in one run of ``bench/listener.py``). OpenMP reads the variable
    once, when torch loads it, so this must run before torch is imported in the process.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and ``taskset`` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def worker_layout(processes: int | str, threads: int | str, cores: int, cuda: bool) -> tuple[int, int]:
    """``[worker] processes`` and ``threads`` with ``"auto"`` resolved: (worker processes, model threads each).

    On a GPU one process feeds it (its batches are whole claims, and the model's time is the GPU's). On the CPU
    there is one process per core, up to ``MAX_AUTO_PROCESSES``, and the cores are shared among the processes'
    model threads. The Python work around the model (decoding glue, SRs, commits) runs on one core at a time
    per process, so processes scale it and threads do not: on the 2-core benchmark machine two processes of one
    thread gave 1.6x the throughput of one process of two threads (README).
    """
    if processes == AUTO:
        processes = 1 if cuda else min(cores, MAX_AUTO_PROCESSES)
    assert isinstance(processes, int)
    if threads == AUTO:
        threads = max(1, cores // max(1, processes))
    assert isinstance(threads, int)
    return processes, threads


def retry_interval(poll: float, failures: int) -> float:
    """Seconds to wait before the next attempt: ``poll``, doubled per failure in a row up to
    ``MAX_RETRY_INTERVAL`` (a database that is down is not hammered)."""
    if not failures:
        return poll
    return min(poll * 2 ** min(failures, 16), max(poll, MAX_RETRY_INTERVAL))


class Worker:
    """One worker: ``run_once`` claims and processes a batch; ``run`` loops until ``stop`` is set."""

    def __init__(self, settings: Settings, engine: Engine, worker_id: str | None = None, wake: Any = None) -> None:
        """``wake``: an event (``threading`` or ``multiprocessing``) set when new jobs were queued, so that an
        idle worker claims them at once instead of at its next poll."""
        self.settings = settings
        self.engine = engine
        self.sessions = db.session_factory(engine)
        self.worker_id = worker_id or jobqueue.new_worker_id()
        self.stop = threading.Event()
        self.wake = wake
        self.models = ModelStore(settings.model, self.sessions)
        from cxr_triage.ml.gate import gate_from_settings
        from cxr_triage.ml.inference import pick_device

        self.gate = gate_from_settings(settings.gate, pick_device(settings.model.device))
        self.recorder = Recorder(self.sessions, self.worker_id, settings)
        self._recording: ThreadPoolExecutor | None = None
        self._preparing: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None
        self._heatmap: tuple[Predictor, Any] | None = None  # the predictor and its GradCAMHeatmap (or None)

    @property
    def predictor(self) -> Predictor | None:
        return self.models.predictor

    def ensure_model(self) -> Predictor | None:
        """The model to classify with (loaded, registered and warmed up when it first appears), or None."""
        predictor, loaded = self.models.current()
        if predictor is not None and loaded:
            self._warm_up(predictor)
        return predictor

    def _warm_up(self, predictor: Predictor) -> None:
        """Pay the one-time costs now rather than on the first batch: the first forward pass (the heatmap's, when it
        classifies), and the SR templates of the usual image classes, referencing a heatmap object when one will be
        filed (highdicom's import and one full build each, about 1.5 s on a CPU)."""
        import torch

        from cxr_triage.ml.imaging import IMAGE_SIZE

        started = time.monotonic()
        try:
            heatmap = self.heatmap_for(predictor)  # with a heatmap, its pass is the one that classifies
            pipeline.predict_with_maps([torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE)], predictor, heatmap)
            referenced = heatmap is not None and self.settings.heatmap.pacs_object != "none"
            if self.settings.sr.enabled:
                for sop_class in WARM_SR_CLASSES:
                    for label in predictor.class_names:
                        for flagged in (False, True):
                            self.recorder.reports.template(
                                sop_class, label, flagged, predictor.model_version, predictor.loaded.sha256, referenced
                            )
        except Exception:  # a real batch reports the problem where it belongs
            logger.warning("warm-up failed", exc_info=True)
        logger.info(
            "ready: model %s warmed up in %.1f s; taking jobs from the queue",
            predictor.model_version,
            time.monotonic() - started,
        )

    # --- the loop ------------------------------------------------------------------------------------------

    def run_once(self) -> int:
        """Claim one batch and process it; the number of jobs processed (0 when idle or without a model)."""
        predictor = self.ensure_model()
        if predictor is None:
            return 0
        ws = self.settings.worker
        jobs = jobqueue.claim(self.sessions, self.worker_id, ws.claim_batch, ws.lease_seconds, ws.max_attempts)
        if any(job.interruptions for job in jobs):
            self.flush()  # alone means alone: were it to crash again, no other job's result may be in flight
        if jobs:
            self.process(jobs, predictor)
        return len(jobs)

    def run(self) -> None:
        """Loop until ``self.stop`` is set; then release jobs claimed but not finished."""
        logger.info("worker %s started", self.worker_id)
        failures = FailureLog(logger, f"worker {self.worker_id}: a batch")
        poll = self.settings.worker.poll_interval
        try:
            while not self.stop.is_set():
                try:
                    busy = self.run_once()
                    failures.succeeded()
                except Exception as exc:
                    busy = 0
                    failures.failed(exc)
                if not busy:
                    self.flush()
                    self.idle(retry_interval(poll, failures.failures))
        finally:
            self.close()
            jobqueue.release(self.sessions, self.worker_id)
            logger.info("worker %s stopped", self.worker_id)

    def idle(self, interval: float) -> None:
        """Wait up to ``interval`` seconds for new jobs (the wake event), in short slices so that ``stop`` (set by
        a signal handler, which must not touch the wake event's locks) ends the wait promptly."""
        deadline = time.monotonic() + interval
        while not self.stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self.wake is None:
                time.sleep(min(remaining, IDLE_SLICE))
            elif self.wake.wait(min(remaining, IDLE_SLICE)):
                self.wake.clear()  # then claim: jobs queued after this clear set it again, so none is missed
                return

    def run_until_idle(self, max_rounds: int = 1000) -> int:
        """Process until the queue is empty (tests and one-shot use); the number of jobs processed."""
        total = 0
        try:
            for _ in range(max_rounds):
                done = self.run_once()
                if not done and self.flush():
                    done = self.run_once()  # that last commit may have put a failed job back in the queue
                total += done
                if not done:
                    break
        finally:
            self.close()
        return total

    # --- the three stages ----------------------------------------------------------------------------------

    def process(self, jobs: Sequence[ClaimedJob], predictor: Predictor) -> None:
        """Classify the claimed jobs chunk by chunk, the stages overlapping (module docstring)."""
        limit = len(jobs) if predictor.device.type == "cuda" else CPU_CHUNK
        chunks: list[Sequence[ClaimedJob]] = []
        start = 0
        for size in pipeline.chunk_sizes(len(jobs), limit):
            chunks.append(jobs[start : start + size])
            start += size
        if not chunks:
            return
        if self._preparing is None:
            self._preparing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxr-preprocess")
        heatmap = self.heatmap_for(predictor)
        keep = heatmap is not None and self.settings.heatmap.pacs_object != "none" and self.settings.sr.enabled
        ahead = self._preparing.submit(pipeline.preprocess, chunks[0], self.stop, keep)
        for index in range(len(chunks)):
            outcomes, prepared = ahead.result()
            if self.stop.is_set():
                break  # what is not recorded stays claimed by us and is released when the loop ends
            if index + 1 < len(chunks):
                ahead = self._preparing.submit(pipeline.preprocess, chunks[index + 1], self.stop, keep)
            outcomes += pipeline.classify(prepared, predictor, self.settings.triage, self.gate, heatmap)
            if outcomes:
                self._hand_to_recorder(outcomes)

    def heatmap_for(self, predictor: Predictor) -> Any:
        """The ``GradCAMHeatmap`` of ``predictor``'s model (made once per model), or None when ``[heatmap]`` is off
        or it cannot be made (logged once per model: the images are classified without maps)."""
        if not self.settings.heatmap.enabled:
            return None
        if self._heatmap is None or self._heatmap[0] is not predictor:
            from cxr_triage.ml.heatmap import GradCAMHeatmap

            try:
                made = GradCAMHeatmap(predictor.loaded.model, predictor.device, self.settings.heatmap.method)
            except Exception:
                logger.exception("model %s: no heatmaps (its map cannot be computed)", predictor.model_version)
                made = None
            self._heatmap = (predictor, made)
        return self._heatmap[1]

    def _hand_to_recorder(self, outcomes: list[pipeline.Outcome]) -> None:
        self.flush()
        if self._recording is None:
            self._recording = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxr-recorder")
        self._pending = self._recording.submit(self.recorder.record, outcomes)

    def flush(self) -> bool:
        """Wait until the chunk handed to the recorder is recorded; whether there was one."""
        pending, self._pending = self._pending, None
        if pending is None:
            return False
        try:
            pending.result()
        except Exception:
            logger.exception("recording a batch failed")
        return True

    def close(self) -> None:
        """Record what is pending and stop the preprocessor and recorder threads."""
        self.flush()
        for pool in (self._preparing, self._recording):
            if pool is not None:
                pool.shutdown(wait=True)
        self._preparing = self._recording = None


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop``: the worker ends after the chunk it is recording."""

    def handler(signum: int, _frame: Any) -> None:
        logger.info("signal %d: stopping after the current batch", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def use_threads(threads: int) -> None:
    """Run the model's CPU operations on ``threads`` threads in this process."""
    import torch

    torch.set_num_threads(max(1, threads))


def worker_process_main(settings: Settings, log_level: str, wake: Any = None, threads: int | None = None) -> None:
    """Entry point of a worker process started by ``serve`` (multiprocessing, spawn); ``wake`` is set by the
    listener when it has queued an instance; ``threads``: the model's CPU threads (default: torch's)."""
    quiet_openmp_threads()
    from cxr_triage.core.bootstrap import configure_logging

    configure_logging(log_level)
    if threads is not None:
        use_threads(threads)
    engine = db.make_engine(settings.database.url, echo=settings.database.echo)
    worker = Worker(settings, engine, wake=wake)
    install_signal_handlers(worker.stop)
    try:
        worker.run()
    finally:
        engine.dispose()
