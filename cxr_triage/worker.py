"""Workers: claim queued instances from the database, classify them in batches, record the outcome.

A claim sets ``status='processing'``, counts the attempt and takes a lease of ``[worker] lease_seconds``; a job
whose worker vanished is claimed again once its lease has expired, and after ``max_attempts`` it is marked
failed with its last error. On PostgreSQL the claim is ``SELECT ... FOR UPDATE SKIP LOCKED`` followed by an
UPDATE in the same transaction, so workers on several hosts never take the same instance; on SQLite the same
statements run inside ``BEGIN IMMEDIATE`` (see ``cxr_triage.db``), which makes the claim atomic across processes.

Each classified instance gets a prediction row, a worklist flag and, when ``[sr] enabled``, one Structured
Report (written atomically to ``[storage] sr_dir``) queued for forwarding. A claimed batch is classified in
chunks (``CPU_CHUNK`` images on the CPU) in a three-stage pipeline: a preprocessor thread prepares the next chunk
while the model runs on the current one, and a recorder thread writes the previous chunk's SRs, fsyncs their
folders and records the chunk in one transaction, so a result is committed only once its SR file is durable. The
worker loop also forwards due SRs (``cxr_triage.forward``) and aggregates studies that have been quiet for
``[worker] study_quiet_seconds``.

Idle workers poll the queue every ``[worker] poll_interval`` seconds; the worker processes that ``serve`` starts
are also woken by the listener as soon as it has recorded an instance (``wake``), so a lone image does not wait
for the next poll. Workers on other hosts rely on polling.

On the CPU, a worker process asks OpenMP (torch's intra-op thread pool) to let its idle threads sleep rather than
spin (``OMP_WAIT_POLICY=PASSIVE``, unless the environment already sets it; see :func:`quiet_openmp_threads`):
preprocessing, the SRs and the listener share the cores with the model, and spinning threads took their time.

Without a model the worker claims nothing: acknowledged instances stay queued until a model is configured.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import CLASS_NAMES, db

logger = logging.getLogger(__name__)

MODEL_WARNING_INTERVAL = 300.0
"""Seconds between repeats of the loud no-model warning."""
CPU_CHUNK = 4
"""Images classified and then recorded together on the CPU: small, so that the first results of a claimed batch
commit early (a CPU's images per second hardly depend on the forward batch size)."""
SPOOL_PURGE_INTERVAL = 300.0
"""Seconds between a worker's spool retention rounds."""
SPOOL_PURGE_BATCH = 500
"""Spool files deleted per transaction."""
SPOOL_PURGE_MAX_BATCHES = 10
"""Transactions per retention round: a large backlog is worked off over several rounds, between batches."""
IDLE_SLICE = 0.25
"""Longest single wait of an idle worker: how soon it notices ``stop``."""
LABEL_SEVERITY = {"covid": 2, "pneumonia": 1, "normal": 0}
"""Order used to pick a study's worst label."""


def quiet_openmp_threads() -> None:
    """Let OpenMP's idle threads sleep instead of spinning, unless ``OMP_WAIT_POLICY`` is already set.

    After each parallel region, OpenMP's worker threads busy-wait for the next one by default. In a worker that
    is fine while the model runs back to back, but between batches (preprocessing, the recorder thread's SRs)
    and beside the listener the spinning threads burn cores that the rest of the pipeline needs: measured on
    the 2-core benchmark machine, the worker process used about a fifth less CPU per image with it (390 -> 307
    ms in one run of ``bench/listener.py``). OpenMP reads the variable once, when torch loads it, so this must
    run before torch is imported in the process: the worker entry points call it first.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def chunk_sizes(count: int, limit: int) -> list[int]:
    """Split ``count`` jobs into the fewest chunks of at most ``limit``, as even as possible (5, 4 -> 3, 2)."""
    if count <= 0:
        return []
    chunks = -(-count // max(1, limit))
    return [count // chunks + (1 if i < count % chunks else 0) for i in range(chunks)]


def new_worker_id() -> str:
    """``host:pid:random``: unique per worker, and tells which host and process holds a lease."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    sop_instance_uid: str
    study_instance_uid: str
    spool_path: str
    attempts: int


def claim_jobs(
    sessions: sessionmaker[Session],
    worker_id: str,
    limit: int,
    lease_seconds: float,
    max_attempts: int,
    now: dt.datetime | None = None,
) -> list[ClaimedJob]:
    """Claim up to ``limit`` jobs: queued ones, and processing ones whose lease expired.

    An expired job that has already had ``max_attempts`` attempts is marked failed instead of being claimed.
    """
    now = now or db.utcnow()
    with sessions() as session, session.begin():
        abandoned = session.execute(
            update(db.Instance)
            .where(
                db.Instance.status == db.PROCESSING,
                db.Instance.lease_until < now,
                db.Instance.attempts >= max_attempts,
            )
            .values(
                status=db.FAILED,
                completed_at=now,
                lease_until=None,
                claimed_by=None,
                error=func.coalesce(
                    db.Instance.error, "abandoned: the lease expired on the last attempt (worker died?)"
                ),
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        if abandoned:
            logger.error("%d job(s) failed: lease expired on attempt %d of %d", abandoned, max_attempts, max_attempts)
        candidates = session.execute(
            select(db.Instance.id, db.Instance.status, db.Instance.attempts)
            .where(
                or_(
                    db.Instance.status == db.QUEUED,
                    (db.Instance.status == db.PROCESSING) & (db.Instance.lease_until < now),
                )
            )
            .order_by(db.Instance.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        ids = [row.id for row in candidates]
        if not ids:
            return []
        session.execute(
            update(db.Instance)
            .where(db.Instance.id.in_(ids))
            .values(
                status=db.PROCESSING,
                attempts=db.Instance.attempts + 1,
                lease_until=now + dt.timedelta(seconds=lease_seconds),
                claimed_by=worker_id,
            )
            .execution_options(synchronize_session=False)
        )
        rows = session.execute(
            select(
                db.Instance.id,
                db.Instance.sop_instance_uid,
                db.Instance.study_instance_uid,
                db.Instance.spool_path,
                db.Instance.attempts,
            )
            .where(db.Instance.id.in_(ids))
            .order_by(db.Instance.id)
        ).all()
    return [ClaimedJob(r.id, r.sop_instance_uid, r.study_instance_uid, r.spool_path, r.attempts) for r in rows]


def release_jobs(sessions: sessionmaker[Session], claimed_by: str | Sequence[str]) -> int:
    """Put the jobs a worker holds back in the queue, not counting the interrupted attempt."""
    owners = [claimed_by] if isinstance(claimed_by, str) else list(claimed_by)
    if not owners:
        return 0
    with sessions() as session, session.begin():
        result = session.execute(
            update(db.Instance)
            .where(db.Instance.status == db.PROCESSING, db.Instance.claimed_by.in_(owners))
            .values(
                status=db.QUEUED,
                attempts=db.Instance.attempts - 1,
                lease_until=None,
                claimed_by=None,
            )
            .execution_options(synchronize_session=False)
        )
    count = int(result.rowcount or 0)
    if count:
        logger.info("released %d claimed job(s) of %s back to the queue", count, ", ".join(owners))
    return count


def release_dead_local_workers(sessions: sessionmaker[Session]) -> int:
    """Release jobs claimed by worker processes of this host that no longer exist (killed, crashed)."""
    prefix = f"{socket.gethostname()}:"
    with sessions() as session, session.begin():
        owners = set(
            session.scalars(
                select(db.Instance.claimed_by).where(
                    db.Instance.status == db.PROCESSING, db.Instance.claimed_by.like(f"{prefix}%")
                )
            ).all()
        )
    dead = []
    for owner in owners:
        try:
            pid = int(owner.split(":")[-2])
        except (ValueError, IndexError):
            continue
        if pid == os.getpid() or not _pid_alive(pid):
            dead.append(owner)
    return release_jobs(sessions, dead) if dead else 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def flag_for(probabilities: Mapping[str, float], triage: Mapping[str, Any]) -> tuple[bool, str | None]:
    """The worklist flag: P(covid) or P(pneumonia) at or above its configured threshold."""
    reasons = []
    for name in ("covid", "pneumonia"):
        threshold = float(triage[f"{name}_threshold"])
        p = float(probabilities.get(name, 0.0))
        if p >= threshold:
            reasons.append(f"P({name})={p:.3f} >= {threshold:.3f}")
    return bool(reasons), "; ".join(reasons) or None


def aggregate_studies(
    sessions: sessionmaker[Session], quiet_seconds: float, now: dt.datetime | None = None
) -> list[str]:
    """Complete open studies quiet for ``quiet_seconds`` whose instances are all finished; their UIDs."""
    now = now or db.utcnow()
    cutoff = now - dt.timedelta(seconds=quiet_seconds)
    completed: list[str] = []
    with sessions() as session, session.begin():
        studies = session.scalars(
            select(db.Study)
            .where(db.Study.status == "open", db.Study.last_received_at <= cutoff)
            .order_by(db.Study.id)
            .limit(500)
            .with_for_update(skip_locked=True)
        ).all()
        for study in studies:
            instances = session.scalars(select(db.Instance).where(db.Instance.study_id == study.id)).all()
            if any(i.status not in db.TERMINAL_STATES for i in instances):
                continue
            summary = study_summary(session, instances)
            study.summary = summary
            study.label = summary["label"]
            study.flagged = summary["flagged"]
            study.flag_reason = summary["flag_reason"]
            study.status = "complete"
            study.completed_at = now
            completed.append(study.study_instance_uid)
    for uid in completed:
        logger.info("study %s complete", uid)
    return completed


def purge_spool(sessions: sessionmaker[Session], retention_days: float, now: dt.datetime | None = None) -> int:
    """Delete the spool files of instances finished more than ``retention_days`` ago; the number deleted.

    Only finished instances (classified, refused or failed) lose their file: one still queued or processing
    keeps it, whatever its age. Each file is unlinked, then its row gets ``spool_removed_at`` in the same
    transaction (a crash in between leaves a row whose file is already gone: the next round marks it). A file
    that cannot be deleted is logged and left for the next round. Rows are taken with SKIP LOCKED, so workers
    on several hosts sharing the spool do not collide. ``retention_days <= 0`` keeps every file.
    """
    if retention_days <= 0:
        return 0
    now = now or db.utcnow()
    cutoff = now - dt.timedelta(days=retention_days)
    removed = 0
    for _ in range(SPOOL_PURGE_MAX_BATCHES):
        with sessions() as session, session.begin():
            rows = session.scalars(
                select(db.Instance)
                .where(
                    db.Instance.spool_removed_at.is_(None),
                    db.Instance.completed_at < cutoff,
                    db.Instance.status.in_(db.TERMINAL_STATES),
                )
                .order_by(db.Instance.completed_at)
                .limit(SPOOL_PURGE_BATCH)
                .with_for_update(skip_locked=True)
            ).all()
            marked = 0
            for row in rows:
                try:
                    Path(row.spool_path).unlink(missing_ok=True)
                except OSError:
                    logger.exception("spool file %s could not be deleted; retrying next round", row.spool_path)
                    continue
                row.spool_removed_at = now
                marked += 1
        removed += marked
        if len(rows) < SPOOL_PURGE_BATCH or not marked:
            break
    if removed:
        logger.info("spool retention: deleted %d file(s) finished before %s", removed, cutoff.isoformat())
    return removed


def study_summary(session: Session, instances: Sequence[db.Instance]) -> dict[str, Any]:
    """Counts, the worst label, the highest probability of each class and the flag over a study's instances."""
    counts = {status: 0 for status in db.TERMINAL_STATES}
    max_probs = {name: 0.0 for name in CLASS_NAMES}
    label: str | None = None
    reasons = []
    for instance in instances:
        counts[instance.status] = counts.get(instance.status, 0) + 1
        prediction = session.scalars(
            select(db.Prediction).where(db.Prediction.instance_id == instance.id).order_by(db.Prediction.id.desc())
        ).first()
        if prediction is None:
            continue
        for name, p in prediction.probabilities.items():
            max_probs[name] = max(max_probs.get(name, 0.0), float(p))
        if label is None or LABEL_SEVERITY.get(prediction.label, 0) > LABEL_SEVERITY.get(label, 0):
            label = prediction.label
        if instance.flagged and instance.flag_reason:
            reasons.append(f"{instance.sop_instance_uid}: {instance.flag_reason}")
    return {
        "instances": len(instances),
        "classified": counts.get(db.DONE, 0),
        "refused": counts.get(db.REFUSED, 0),
        "failed": counts.get(db.FAILED, 0),
        "label": label,
        "max_probabilities": max_probs if label is not None else None,
        "flagged": bool(reasons),
        "flag_reason": "; ".join(reasons) or None,
    }


class Worker:
    """One worker: ``run_once`` claims and processes a batch; ``run`` loops until ``stop`` is set."""

    def __init__(
        self,
        config: Mapping[str, Mapping[str, Any]],
        engine: Engine,
        worker_id: str | None = None,
        wake: Any = None,
    ) -> None:
        """``wake``: an event (``threading`` or ``multiprocessing``) set when new jobs were queued, so that an
        idle worker claims them at once instead of at its next poll."""
        self.config = config
        self.engine = engine
        self.sessions = db.session_factory(engine)
        self.worker_id = worker_id or new_worker_id()
        self.stop = threading.Event()
        self.wake = wake
        self.predictor: Any = None
        self._model_key: tuple[str, float] | None = None
        self._last_model_warning = 0.0
        self._next_purge = 0.0
        self._recorder: ThreadPoolExecutor | None = None
        self._preprocessor: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    # --- model ---------------------------------------------------------------------------------------------

    def ensure_model(self) -> bool:
        """Load the configured model if needed; warn loudly (not more than every few minutes) when there is none."""
        from cxr_triage.checkpoint import CheckpointError, load_classifier, resolve_model_path

        configured = str(self.config["model"]["path"] or "")
        try:
            path = resolve_model_path(configured or None)
            key = (str(path), path.stat().st_mtime)
            if self.predictor is not None and key == self._model_key:
                return True
            loaded = load_classifier(path)
        except (CheckpointError, OSError) as exc:
            if self.predictor is not None:
                logger.error("model %s became unusable (%s); keeping the loaded one", configured, exc)
                return True
            if time.monotonic() - self._last_model_warning > MODEL_WARNING_INTERVAL or not self._last_model_warning:
                self._last_model_warning = time.monotonic()
                logger.warning(
                    "NO MODEL - received instances stay queued and nothing is classified until a model is "
                    "configured. %s",
                    exc,
                )
            return False
        from cxr_triage.inference import Predictor
        from cxr_triage.registry import register_model

        try:
            register_model(self.sessions, loaded)
        except SQLAlchemyError as exc:  # the database is unreachable or broken: classify nothing until it is back
            logger.error("cannot register model %s in the database (%s); retrying", loaded.sha256[:12], exc)
            return False
        model_cfg = self.config["model"]
        self.predictor = Predictor(
            loaded,
            device=model_cfg["device"],
            batch_size=int(model_cfg["batch_size"]),
            precision=str(model_cfg["precision"]),
        )
        self._model_key = key
        self._warm_up()
        logger.info(
            "model %s (sha256 %s) loaded from %s on %s in %s",
            loaded.card.model_version,
            loaded.sha256[:12],
            path,
            self.predictor.device,
            self.predictor.precision,
        )
        return True

    def _warm_up(self) -> None:
        """Pay the one-time costs now rather than on the first batch: the first forward pass, and highdicom's
        import and standard tables (about 1.5 s on a CPU) by building one throw-away SR."""
        import torch
        from pydicom.dataset import Dataset
        from pydicom.uid import generate_uid

        try:
            self.predictor.probabilities(torch.zeros(1, 3, 224, 224))
            if self.config["sr"]["enabled"]:
                from cxr_triage import sr as sr_module

                evidence = Dataset()
                evidence.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
                evidence.SOPInstanceUID = generate_uid()
                evidence.StudyInstanceUID = generate_uid()
                evidence.SeriesInstanceUID = generate_uid()
                evidence.Modality = "CR"
                evidence.Rows = evidence.Columns = 1
                names = self.predictor.class_names
                sr_module.sr_to_bytes(
                    sr_module.build_triage_sr(
                        evidence,
                        label=names[0],
                        probabilities={name: 1.0 if i == 0 else 0.0 for i, name in enumerate(names)},
                        model_version=self.predictor.model_version,
                        model_sha256=self.predictor.loaded.sha256,
                        flagged=False,
                    )
                )
        except Exception:  # a real batch reports the problem where it belongs
            logger.warning("warm-up failed", exc_info=True)

    # --- the loop ------------------------------------------------------------------------------------------

    def run_once(self) -> int:
        """Claim one batch and process it; the number of jobs processed (0 when idle or without a model)."""
        if not self.ensure_model():
            return 0
        wcfg = self.config["worker"]
        jobs = claim_jobs(
            self.sessions,
            self.worker_id,
            int(wcfg["claim_batch"]),
            float(wcfg["lease_seconds"]),
            int(wcfg["max_attempts"]),
        )
        if jobs:
            self.process(jobs)
        return len(jobs)

    def housekeeping(self) -> None:
        """Forward due SRs, aggregate quiet studies and, every few minutes, apply the spool retention (all safe
        to run in several processes at once)."""
        from cxr_triage import forward

        try:
            forward.process_due(self.sessions, self.config)
        except Exception:
            logger.exception("forwarding round failed")
        try:
            aggregate_studies(self.sessions, float(self.config["worker"]["study_quiet_seconds"]))
        except Exception:
            logger.exception("study aggregation failed")
        if time.monotonic() >= self._next_purge:
            self._next_purge = time.monotonic() + SPOOL_PURGE_INTERVAL
            try:
                purge_spool(self.sessions, float(self.config["storage"]["spool_retention_days"]))
            except Exception:
                logger.exception("spool retention round failed")

    def run(self) -> None:
        """Loop until ``self.stop`` is set; then release jobs claimed but not finished."""
        interval = float(self.config["worker"]["poll_interval"])
        logger.info("worker %s started", self.worker_id)
        try:
            while not self.stop.is_set():
                try:
                    busy = self.run_once()
                except Exception:
                    logger.exception("worker %s: batch failed", self.worker_id)
                    busy = 0
                self.housekeeping()
                if not busy:
                    self.idle(interval)
        finally:
            self.close()
            release_jobs(self.sessions, self.worker_id)
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
                if not done:
                    self.flush()
                self.housekeeping()
                total += done
                if not done:
                    break
        finally:
            self.close()
        return total

    # --- processing ----------------------------------------------------------------------------------------

    def process(self, jobs: Sequence[ClaimedJob]) -> None:
        """Classify the claimed jobs chunk by chunk: three threads, each on its own stage of a different chunk.

        A preprocessor thread reads and prepares the next chunk while this thread runs the model on the current
        one, and the recorder thread writes the previous chunk's SRs (durable before the commit) and records it
        in one transaction (torch, numpy and file I/O release the GIL, so the stages fill each other's idle
        cores). Chunks are recorded one at a time, in order. Each spool file is read once: the dataset that was
        classified, its pixel data dropped, is the SR's evidence. On the CPU a chunk is ``CPU_CHUNK`` images, so
        that results commit sooner (split evenly: 5 jobs are 3 + 2, not 4 + 1); on CUDA it is the whole batch.
        """
        limit = len(jobs) if self.predictor.device.type == "cuda" else CPU_CHUNK
        chunks: list[Sequence[ClaimedJob]] = []
        start = 0
        for size in chunk_sizes(len(jobs), limit):
            chunks.append(jobs[start : start + size])
            start += size
        if not chunks:
            return
        if self._preprocessor is None:
            self._preprocessor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxr-preprocess")
        ahead = self._preprocessor.submit(self._preprocess, chunks[0])
        for index in range(len(chunks)):
            outcomes, prepared = ahead.result()
            if self.stop.is_set():
                break  # what is not recorded stays claimed by us and is released when the loop ends
            if index + 1 < len(chunks):
                ahead = self._preprocessor.submit(self._preprocess, chunks[index + 1])
            self._classify_chunk(outcomes, prepared)

    def _classify_chunk(self, outcomes: list[_Outcome], prepared: list[_Prepared]) -> None:
        if prepared:
            outcomes += self._classify(prepared)
        if not outcomes:
            return
        self.flush()
        if self._recorder is None:
            self._recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxr-recorder")
        self._pending = self._recorder.submit(self._record, outcomes)

    def flush(self) -> None:
        """Wait until the batch handed to the recorder is recorded."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except Exception:
                logger.exception("recording a batch failed")

    def close(self) -> None:
        """Record what is pending and stop the preprocessor and recorder threads."""
        self.flush()
        for pool in (self._preprocessor, self._recorder):
            if pool is not None:
                pool.shutdown(wait=True)
        self._preprocessor = self._recorder = None

    def _record(self, outcomes: list[_Outcome]) -> None:
        """Write the SRs and record ``outcomes`` in one transaction; one by one should that transaction fail."""
        started = time.perf_counter()
        predicted = [o for o in outcomes if o.prediction is not None]
        if predicted and self.config["sr"]["enabled"]:
            self._write_srs(predicted)
        written = time.perf_counter()
        try:
            self._commit(outcomes)
        except Exception:
            logger.exception("recording the batch of %d job(s) failed; recording them one by one", len(outcomes))
            for outcome in outcomes:
                try:
                    self._commit([outcome])
                except Exception as exc:
                    logger.exception(
                        "job %s (SOP instance %s): recording failed", outcome.job.id, outcome.job.sop_instance_uid
                    )
                    if outcome.sr is not None:
                        outcome.sr.path.unlink(missing_ok=True)
                    try:
                        self._commit([_Outcome(outcome.job, error=exc)])
                    except Exception:
                        logger.exception("job %s: the error could not be recorded either", outcome.job.id)
        n = len(outcomes)
        classify_ms = sum(o.preprocess_ms + o.inference_ms for o in outcomes)
        logger.info(
            "chunk of %d recorded; per image: preprocess + inference %.0f ms, SR %.0f ms, commit %.0f ms",
            n,
            classify_ms / n,
            (written - started) * 1000.0 / n,
            (time.perf_counter() - written) * 1000.0 / n,
        )

    def _preprocess(self, jobs: Sequence[ClaimedJob]) -> tuple[list[_Outcome], list[_Prepared]]:
        from cxr_triage.preprocess import Refusal, prepare_dataset, read_dicom

        outcomes: list[_Outcome] = []
        prepared: list[_Prepared] = []
        for job in jobs:
            if self.stop.is_set():
                break  # the rest stay claimed by us and are released when the loop ends
            started = time.perf_counter()
            try:
                if not Path(job.spool_path).is_file():
                    raise FileNotFoundError(f"spool file {job.spool_path} is missing")
                ds = read_dicom(job.spool_path)
                outcome = ds if isinstance(ds, Refusal) else prepare_dataset(ds)
            except Exception as exc:
                logger.exception("job %s (SOP instance %s): preprocessing failed", job.id, job.sop_instance_uid)
                outcomes.append(_Outcome(job, error=exc))
                continue
            elapsed = (time.perf_counter() - started) * 1000.0
            if isinstance(outcome, Refusal):
                outcomes.append(_Outcome(job, refusal=outcome))
                continue
            if "PixelData" in ds:
                del ds.PixelData  # the header stays as the SR's evidence; the pixels are in the tensor now
            prepared.append(_Prepared(job, outcome, ds, elapsed))
        return outcomes, prepared

    def _classify(self, prepared: Sequence[_Prepared]) -> list[_Outcome]:
        predictor = self.predictor  # the recorder names this model even if a new one is loaded meanwhile
        try:
            started = time.perf_counter()
            predictions = predictor.predict([p.image.tensor for p in prepared])
            inference_ms = (time.perf_counter() - started) * 1000.0 / len(prepared)
        except Exception as exc:
            logger.exception("inference failed for jobs %s", [p.job.id for p in prepared])
            return [_Outcome(p.job, error=exc) for p in prepared]
        outcomes = []
        for item, prediction in zip(prepared, predictions, strict=True):
            flagged, flag_reason = flag_for(prediction.probabilities, self.config["triage"])
            outcomes.append(
                _Outcome(
                    item.job,
                    prediction=prediction,
                    evidence=item.evidence,
                    preprocess_ms=item.preprocess_ms,
                    inference_ms=inference_ms,
                    flagged=flagged,
                    flag_reason=flag_reason,
                    model=predictor,
                )
            )
        return outcomes

    # --- Structured Reports --------------------------------------------------------------------------------

    def _sr_context(self, outcomes: Sequence[_Outcome]) -> tuple[dict[str, tuple[int, str]], dict[str, str]]:
        """One read for the batch: the latest SR (id, path) of each SOP instance, and the SR series of each study
        for this model version (one SR series per study and model version)."""
        sop_uids = sorted({o.job.sop_instance_uid for o in outcomes})
        study_uids = sorted({o.job.study_instance_uid for o in outcomes})
        previous: dict[str, tuple[int, str]] = {}
        series: dict[str, str] = {}
        with self.sessions() as session:
            db.read_only(session)
            rows = session.execute(
                select(db.Instance.sop_instance_uid, db.SRDocument.id, db.SRDocument.path)
                .join(db.Instance, db.SRDocument.instance_id == db.Instance.id)
                .where(db.Instance.sop_instance_uid.in_(sop_uids))
                .order_by(db.SRDocument.id)
            ).all()
            for uid, sr_id, path in rows:
                previous[uid] = (sr_id, path)  # ascending ids: the last one wins
            rows = session.execute(
                select(db.Instance.study_instance_uid, db.SRDocument.series_instance_uid)
                .join(db.Instance, db.SRDocument.instance_id == db.Instance.id)
                .where(
                    db.Instance.study_instance_uid.in_(study_uids),
                    db.SRDocument.model_version == outcomes[0].model.model_version,
                )
                .order_by(db.SRDocument.id)
            ).all()
            for study_uid, series_uid in rows:
                series.setdefault(study_uid, series_uid)
            session.rollback()
        return previous, series

    def _write_srs(self, outcomes: Sequence[_Outcome]) -> None:
        """Build and write the SR of each classified instance; a failure is recorded on its outcome.

        One SR per instance, not per study: each classification is an image-level finding (TID 1501 group with
        the image as its source), and a study can grow over several associations after its SRs were sent. The
        study-level aggregate lives in the database (``studies.summary``). Each file is written and fsynced
        under a temporary name and renamed; the folders are fsynced once per batch, before the commit.
        """
        import pydicom

        from cxr_triage import spool
        from cxr_triage import sr as sr_module

        try:
            previous, series = self._sr_context(outcomes)
        except Exception as exc:
            logger.exception("the SRs of jobs %s could not be prepared", [o.job.id for o in outcomes])
            for outcome in outcomes:
                outcome.sr_error = f"Structured Report not written: {type(exc).__name__}: {exc}"[:4000]
            return
        sr_cfg = self.config["sr"]
        sr_root = Path(self.config["storage"]["sr_dir"]).resolve()
        in_batch: dict[str, _WrittenSR] = {}
        folders: set[Path] = set()
        for outcome in outcomes:
            job = outcome.job
            try:
                earlier = in_batch.get(job.sop_instance_uid)
                previous_ds = earlier.document if earlier is not None else None
                previous_id = None
                if earlier is None and job.sop_instance_uid in previous:
                    previous_id, previous_path = previous[job.sop_instance_uid]
                    if Path(previous_path).is_file():
                        previous_ds = pydicom.dcmread(previous_path, stop_before_pixels=True)
                    else:
                        previous_id = None
                document = sr_module.build_triage_sr(
                    outcome.evidence,
                    label=outcome.prediction.label,
                    probabilities=outcome.prediction.probabilities,
                    model_version=outcome.model.model_version,
                    model_sha256=outcome.model.loaded.sha256,
                    flagged=outcome.flagged,
                    previous_sr=previous_ds,
                    series_instance_uid=series.get(job.study_instance_uid),
                    institution_name=str(sr_cfg["institution_name"]),
                    manufacturer=str(sr_cfg["manufacturer"]),
                    series_description=str(sr_cfg["series_description"]),
                )
                folder = sr_root / spool.safe_uid(job.study_instance_uid)
                path = spool.write_atomic(
                    folder / f"{document.SOPInstanceUID}.dcm", sr_module.sr_to_bytes(document), sync_dir=False
                )
                folders.add(folder)
            except Exception as exc:  # the classification stands; the missing SR is recorded as the error
                logger.exception("SOP instance %s: the Structured Report could not be written", job.sop_instance_uid)
                outcome.sr_error = f"Structured Report not written: {type(exc).__name__}: {exc}"[:4000]
                continue
            outcome.sr = _WrittenSR(path, document, previous_id, earlier)
            in_batch[job.sop_instance_uid] = outcome.sr
            series.setdefault(job.study_instance_uid, str(document.SeriesInstanceUID))
        try:
            for folder in sorted(folders):
                spool.fsync_dir(folder)
        except OSError as exc:
            logger.exception("the SR folders could not be synced")
            for outcome in outcomes:
                if outcome.sr is not None:
                    outcome.sr.path.unlink(missing_ok=True)
                    outcome.sr = None
                    outcome.sr_error = f"Structured Report not written: {type(exc).__name__}: {exc}"[:4000]

    # --- recording -----------------------------------------------------------------------------------------

    def _owned(self, session: Session, jobs: Sequence[ClaimedJob]) -> dict[int, db.Instance]:
        """The instance rows this worker still holds the lease of (one may have expired and been re-claimed)."""
        rows = session.scalars(
            select(db.Instance).where(db.Instance.id.in_([job.id for job in jobs])).with_for_update()
        ).all()
        owned = {r.id: r for r in rows if r.status == db.PROCESSING and r.claimed_by == self.worker_id}
        for job in jobs:
            if job.id not in owned:
                logger.warning("job %s is no longer held by %s; result discarded", job.id, self.worker_id)
        return owned

    def _finish(self, instance: db.Instance, status: str, now: dt.datetime) -> None:
        instance.status = status
        instance.completed_at = now
        instance.lease_until = None
        instance.claimed_by = None

    def _commit(self, outcomes: Sequence[_Outcome]) -> None:
        """Record ``outcomes`` in one transaction; log them once it has committed."""
        from cxr_triage import forward

        max_attempts = int(self.config["worker"]["max_attempts"])
        now = db.utcnow()
        recorded: list[_Outcome] = []
        discarded: list[_Outcome] = []
        for outcome in outcomes:
            if outcome.sr is not None:
                outcome.sr.record = None  # from an earlier try that rolled back
        with self.sessions() as session, session.begin():
            owned = self._owned(session, [o.job for o in outcomes])
            for outcome in outcomes:
                job = outcome.job
                instance = owned.get(job.id)
                if instance is None:
                    discarded.append(outcome)
                    continue
                recorded.append(outcome)
                if outcome.error is not None:
                    instance.error = f"{type(outcome.error).__name__}: {outcome.error}"[:4000]
                    if instance.attempts >= max_attempts:
                        self._finish(instance, db.FAILED, now)
                    else:
                        instance.status = db.QUEUED
                        instance.lease_until = None
                        instance.claimed_by = None
                    outcome.final_attempt = instance.attempts >= max_attempts
                elif outcome.refusal is not None:
                    refusal = outcome.refusal
                    session.add(
                        db.Refusal(
                            instance_id=job.id,
                            code=refusal.code,
                            reason=refusal.reason,
                            attribute=refusal.attribute,
                            created_at=now,
                        )
                    )
                    instance.error = None
                    self._finish(instance, db.REFUSED, now)
                else:
                    self._add_prediction(session, instance, outcome, now)
                    if outcome.sr is not None:
                        forward.enqueue(session, self._add_sr(session, outcome, now), self.config, now)
                    self._finish(instance, db.DONE, now)
        for outcome in discarded:
            if outcome.sr is not None:
                outcome.sr.path.unlink(missing_ok=True)
        for outcome in recorded:
            self._log(outcome)

    def _add_prediction(self, session: Session, instance: db.Instance, outcome: _Outcome, now: dt.datetime) -> None:
        predictor = outcome.model
        prediction = outcome.prediction
        session.add(
            db.Prediction(
                instance_id=instance.id,
                label=prediction.label,
                probabilities={k: float(v) for k, v in prediction.probabilities.items()},
                model_version=predictor.model_version,
                model_sha256=predictor.loaded.sha256,
                preprocess_ms=outcome.preprocess_ms,
                inference_ms=outcome.inference_ms,
                total_ms=outcome.preprocess_ms + outcome.inference_ms,
                device=str(predictor.device),
                precision=predictor.precision,
                created_at=now,
            )
        )
        instance.flagged = outcome.flagged
        instance.flag_reason = outcome.flag_reason
        instance.error = outcome.sr_error

    def _add_sr(self, session: Session, outcome: _Outcome, now: dt.datetime) -> db.SRDocument:
        written = outcome.sr
        assert written is not None
        previous_id = written.previous_id
        earlier = written.previous_in_batch
        if earlier is not None:  # it supersedes an SR written earlier in this batch
            previous_id = earlier.record.id if earlier.record is not None else None
        written.record = db.SRDocument(
            instance_id=outcome.job.id,
            sop_instance_uid=str(written.document.SOPInstanceUID),
            series_instance_uid=str(written.document.SeriesInstanceUID),
            path=str(written.path),
            model_version=outcome.model.model_version,
            previous_sr_id=previous_id,
            created_at=now,
        )
        session.add(written.record)
        session.flush()
        return written.record

    def _log(self, outcome: _Outcome) -> None:
        job = outcome.job
        if outcome.error is not None:
            if outcome.final_attempt:
                logger.error("job %s failed after its last attempt: %s", job.id, outcome.error)
        elif outcome.refusal is not None:
            logger.info("SOP instance %s refused: %s", job.sop_instance_uid, outcome.refusal.code)
        else:
            logger.info(
                "SOP instance %s: %s (model %s)%s",
                job.sop_instance_uid,
                outcome.prediction.label,
                outcome.model.model_version,
                " FLAGGED" if outcome.flagged else "",
            )


@dataclass
class _Prepared:
    job: ClaimedJob
    image: Any  # preprocess.PreparedImage
    evidence: Any  # the classified dataset without its pixel data
    preprocess_ms: float


@dataclass
class _WrittenSR:
    path: Path
    document: Any
    previous_id: int | None
    previous_in_batch: _WrittenSR | None = None
    record: Any = None  # the db.SRDocument once added


@dataclass
class _Outcome:
    """What became of one job in a batch: an error, a refusal or a prediction (with its SR, or why not)."""

    job: ClaimedJob
    error: BaseException | None = None
    refusal: Any = None
    prediction: Any = None
    evidence: Any = None
    preprocess_ms: float = 0.0
    inference_ms: float = 0.0
    flagged: bool = False
    flag_reason: str | None = None
    sr: _WrittenSR | None = None
    sr_error: str | None = None
    final_attempt: bool = False
    model: Any = None  # the inference.Predictor that classified it


def _install_signal_handlers(stop: threading.Event) -> None:
    def handler(signum: int, _frame: Any) -> None:
        logger.info("signal %d: stopping after the current batch", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def worker_process_main(config: Mapping[str, Mapping[str, Any]], log_level: str, wake: Any = None) -> None:
    """Entry point of a worker process started by ``serve`` (multiprocessing, spawn); ``wake`` is set by the
    listener when it has queued an instance."""
    quiet_openmp_threads()
    import logging as _logging

    from cxr_triage.server import apply_log_level

    _logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
    )
    apply_log_level(log_level)
    engine = db.make_engine(config["database"]["url"], echo=bool(config["database"]["echo"]))
    worker = Worker(config, engine, wake=wake)
    _install_signal_handlers(worker.stop)
    try:
        worker.run()
    finally:
        engine.dispose()


# --- ``cxr-triage worker`` -----------------------------------------------------------------------------------


def add_arguments(parser: Any) -> None:
    parser.add_argument("--config", default=None, help="configuration file (TOML)")
    parser.add_argument("--once", action="store_true", help="process until the queue is empty, then exit")


def run(args: Any) -> int:
    """Run one worker in this process until SIGTERM/SIGINT (or, with ``--once``, until the queue is empty)."""
    import sys

    quiet_openmp_threads()
    from cxr_triage.config import ConfigError, load_config
    from cxr_triage.server import StartupError, apply_log_level, open_database

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"cxr-triage worker: {exc}", file=sys.stderr)
        return 2
    apply_log_level(getattr(args, "log_level", None) or config["logging"]["level"])
    try:
        engine = open_database(config.values, args.config)
    except StartupError as exc:
        print(f"cxr-triage worker: {exc}", file=sys.stderr)
        return 2
    try:
        release_dead_local_workers(db.session_factory(engine))
        runner = Worker({k: dict(v) for k, v in config.values.items()}, engine)
        if args.once:
            runner.run_until_idle()
            release_jobs(runner.sessions, runner.worker_id)
            return 0
        _install_signal_handlers(runner.stop)
        runner.run()
        return 0
    finally:
        engine.dispose()
