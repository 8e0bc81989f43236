"""The recorder: a chunk of outcomes becomes Structured Reports, database rows and forwards, in one transaction.

With a heatmap (``[heatmap]``, ``triage.pipeline.predict_with_maps``) each classified instance's coarse map is
stored first (``ml.heatmap.save_coarse`` under ``[heatmap] dir``; ``instances.heatmap_path`` is set in the
transaction) and its heatmap object (``outputs.heatmapobject``) is written under its pending name before its SR,
which references it; the object's UID and path go into the SR's row and it is renamed into place with the SR. A
map or object that fails is logged and the result recorded without it.

For each ``Classified`` outcome an SR is built (from a template per model, finding and priority:
``cxr_triage.outputs.srtemplate``) and written under its pending name in ``[storage] sr_dir``
(``cxr_triage.outputs.srfiles``); the pending folder is fsynced once per chunk, before the commit, so a committed
result always has its SR on disk.
Then one transaction: the jobs still leased to this worker (``jobqueue.held``) get their prediction (with the SR's
row, which holds the final path, and one pending forward per destination), refusal or error, and the identifiers
read from their header (``instances.identifiers``, from which the HL7 result is built later), and leave the queue
(``jobqueue.finish`` / ``retry_or_fail``). Once it has committed, the SRs are renamed to their final paths; so a
crash at any point leaves no SR file without its row (``srfiles`` settles what it leaves at the next start). If
that transaction fails the outcomes are recorded one by one, and one that still cannot be recorded is recorded as a
failed attempt; the SR files of outcomes not recorded are deleted.

One SR per instance, not per study: each classification is an image-level finding (a TID 1501 group with the
image as its source), and a study can grow over several associations after its SRs were sent. A re-run (a new
model, a resend after a conflict) references the instance's previous SR. SRs of one study and model version
share one series.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import files, log_name
from cxr_triage.core import db
from cxr_triage.core.settings import Settings
from cxr_triage.outputs import srfiles
from cxr_triage.outputs.registry import Needs, needing
from cxr_triage.queue import jobqueue, spool
from cxr_triage.triage import studies
from cxr_triage.triage.pipeline import Classified, Failed, Outcome, Refused

if TYPE_CHECKING:
    from cxr_triage.outputs.srtemplate import TriageSRBuilder

logger = logging.getLogger(log_name(__name__))


@dataclass(frozen=True)
class WrittenSR:
    """An SR file written for one outcome: ``path`` is its final path (its row's), ``pending`` where it is until
    its row has committed (None: already at ``path``); ``previous_id`` is the SR row it supersedes (None: the
    first), or ``previous_job`` the job of this chunk whose SR it supersedes."""

    path: Path
    document: Any
    previous_id: int | None
    previous_job: int | None = None
    pending: Path | None = None
    heatmap: Any = None  # the heatmap object the SR references (outputs.heatmapobject); None without one
    heatmap_path: Path | None = None  # its final path, beside the SR
    heatmap_pending: Path | None = None  # where it is until the row has committed

    def moves(self) -> list[tuple[Path, Path]]:
        """(pending, final) of its files still pending: the heatmap object's, then the SR's."""
        pairs = [(self.heatmap_pending, self.heatmap_path), (self.pending, self.path)]
        return [(pending, final) for pending, final in pairs if pending is not None and final is not None]

    def unlink(self) -> None:
        """Delete its files (a report not recorded)."""
        for path in (self.heatmap_pending or self.heatmap_path, self.pending or self.path):
            if path is not None:
                path.unlink(missing_ok=True)


SRResult = WrittenSR | str
"""What became of one outcome's SR: the file, or why it was not written."""


class Recorder:
    """Records the outcomes of one worker (module docstring)."""

    def __init__(self, sessions: sessionmaker[Session], worker_id: str, settings: Settings) -> None:
        self.sessions = sessions
        self.worker_id = worker_id
        self.settings = settings
        self.sr = settings.sr
        self.sr_dir = Path(settings.storage.sr_dir).resolve()
        self.max_attempts = settings.worker.max_attempts
        self.triage = settings.triage
        thumbnails = settings.storage.thumbnail_dir
        self.thumbnail_dir = Path(thumbnails).resolve() if thumbnails is not None else None
        self.heatmap_dir = settings.heatmap.folder(settings.storage).resolve()
        self._reports: TriageSRBuilder | None = None
        self._heatmaps: Any = None  # outputs.heatmapobject.HeatmapSecondaryCapture, made on first use
        self._heatmap_failures = 0
        self._undecided: list[Path] = []
        """Pending SR files of outcomes not recorded whose fate the database could not tell yet."""

    @property
    def reports(self) -> TriageSRBuilder:
        """The SR builder (templates per model, finding, priority and image class), made on first use: importing
        highdicom takes a while and a recorder without SRs never needs it."""
        if self._reports is None:
            from cxr_triage.outputs.srtemplate import TriageSRBuilder

            self._reports = TriageSRBuilder(
                institution_name=self.sr.institution_name,
                manufacturer=self.sr.manufacturer,
                series_description=self.sr.series_description,
            )
        return self._reports

    def record(self, outcomes: Sequence[Outcome]) -> None:
        """Write the SRs and record ``outcomes`` in one transaction; one by one should that transaction fail."""
        if self._undecided:
            self._drop_unrecorded([])
        started = time.perf_counter()
        classified = [o for o in outcomes if isinstance(o, Classified)]
        srs = self.write_srs(classified) if classified and self.sr.enabled else {}
        thumbnails = self.write_thumbnails(classified)
        heatmaps = self.write_heatmaps(classified)
        written = time.perf_counter()
        try:
            self.commit(outcomes, srs, thumbnails, heatmaps)
        except Exception:
            logger.exception("recording the batch of %d job(s) failed; recording them one by one", len(outcomes))
            for outcome in outcomes:
                self._record_alone(outcome, srs, thumbnails, heatmaps)
        n = max(1, len(outcomes))
        classify_ms = sum(o.preprocess_ms + o.inference_ms for o in classified)
        logger.info(
            "chunk of %d recorded; per image: preprocess + inference %.0f ms, SR %.0f ms, commit %.0f ms",
            len(outcomes),
            classify_ms / n,
            (written - started) * 1000.0 / n,
            (time.perf_counter() - written) * 1000.0 / n,
        )

    def _record_alone(
        self, outcome: Outcome, srs: dict[int, SRResult], thumbnails: dict[int, Path], heatmaps: dict[int, Path]
    ) -> None:
        own = {outcome.job.id: srs[outcome.job.id]} if outcome.job.id in srs else {}
        written = own.get(outcome.job.id)
        if isinstance(written, WrittenSR) and written.previous_job is not None:  # its predecessor may be gone
            own[outcome.job.id] = dataclasses.replace(written, previous_job=None)
        try:
            self.commit([outcome], own, thumbnails, heatmaps)
        except Exception as exc:
            logger.exception("job %s (SOP instance %s): recording failed", outcome.job.id, outcome.job.sop_instance_uid)
            if isinstance(written, WrittenSR):
                self._drop_unrecorded([written])
            try:
                self.commit([Failed.of(outcome.job, exc)], {})
            except Exception:
                logger.exception("job %s: the error could not be recorded either", outcome.job.id)

    # --- Structured Reports ----------------------------------------------------------------------------------

    def _sr_context(
        self, outcomes: Sequence[Classified]
    ) -> tuple[dict[str, tuple[int, str]], dict[str, str], dict[str, str]]:
        """One read for the chunk: the latest SR (id, path) of each SOP instance, and the SR series and the
        heatmap series of each study for this model version."""
        sop_uids = sorted({o.job.sop_instance_uid for o in outcomes})
        study_uids = sorted({o.job.study_instance_uid for o in outcomes})
        previous: dict[str, tuple[int, str]] = {}
        series: dict[str, str] = {}
        heatmap_series: dict[str, str] = {}
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
                select(
                    db.Instance.study_instance_uid,
                    db.SRDocument.series_instance_uid,
                    db.SRDocument.heatmap_series_instance_uid,
                )
                .join(db.Instance, db.SRDocument.instance_id == db.Instance.id)
                .where(
                    db.Instance.study_instance_uid.in_(study_uids),
                    db.SRDocument.model_version == outcomes[0].model.model_version,
                )
                .order_by(db.SRDocument.id)
            ).all()
            for study_uid, series_uid, heatmap_series_uid in rows:
                series.setdefault(study_uid, series_uid)
                if heatmap_series_uid is not None:
                    heatmap_series.setdefault(study_uid, heatmap_series_uid)
            session.rollback()
        return previous, series, heatmap_series

    def write_srs(self, outcomes: Sequence[Classified]) -> dict[int, SRResult]:
        """Build and write the SR of each classified instance under its pending name, by job id (``commit`` renames
        the recorded ones into place); a failure is the error's text."""
        try:
            previous, series, heatmap_series = self._sr_context(outcomes)
        except Exception as exc:
            logger.exception("the SRs of jobs %s could not be prepared", [o.job.id for o in outcomes])
            return {o.job.id: _not_written(exc) for o in outcomes}
        results: dict[int, SRResult] = {}
        latest: dict[str, tuple[int, Any]] = {}  # SOP instance -> (job, document) written earlier in this chunk
        folders: set[Path] = set()
        for outcome in outcomes:
            job = outcome.job
            try:
                written = self._write_one(outcome, previous, series, latest.get(job.sop_instance_uid), heatmap_series)
            except Exception as exc:  # the classification stands; the missing SR is recorded as the error
                logger.exception("SOP instance %s: the Structured Report could not be written", job.sop_instance_uid)
                results[job.id] = _not_written(exc)
                continue
            results[job.id] = written
            folders.add((written.pending or written.path).parent)
            latest[job.sop_instance_uid] = (job.id, written.document)
            series.setdefault(job.study_instance_uid, str(written.document.SeriesInstanceUID))
            if written.heatmap is not None:
                heatmap_series.setdefault(job.study_instance_uid, str(written.heatmap.SeriesInstanceUID))
        try:
            for folder in sorted(folders):
                files.fsync_dir(folder)
        except OSError as exc:
            logger.exception("the SR folders could not be synced")
            for job_id, written in list(results.items()):
                if isinstance(written, WrittenSR):
                    written.unlink()
                    results[job_id] = _not_written(exc)
        return results

    def _write_one(
        self,
        outcome: Classified,
        previous: dict[str, tuple[int, str]],
        series: dict[str, str],
        earlier: tuple[int, Any] | None,
        heatmap_series: dict[str, str] | None = None,
    ) -> WrittenSR:
        import pydicom

        from cxr_triage.outputs import sr as sr_module

        job = outcome.job
        previous_ds, previous_id = (earlier[1], None) if earlier is not None else (None, None)
        if earlier is None and job.sop_instance_uid in previous:
            previous_id, previous_path = previous[job.sop_instance_uid]
            if srfiles.ensure_final(previous_path):
                previous_ds = pydicom.dcmread(previous_path, stop_before_pixels=True)
            else:
                previous_id = None
        heatmap, heatmap_final, heatmap_pending = self._write_heatmap(outcome, (heatmap_series or {}))
        try:
            document = self.reports.build(
                outcome.evidence,
                heatmap=heatmap,
                label=outcome.prediction.label,
                probabilities=outcome.prediction.probabilities,
                model_version=outcome.model.model_version,
                model_sha256=outcome.model.loaded.sha256,
                flagged=outcome.flagged,
                previous_sr=previous_ds,
                series_instance_uid=series.get(job.study_instance_uid),
            )
            final = srfiles.final_path(self.sr_dir, job.study_instance_uid, str(document.SOPInstanceUID))
            pending = srfiles.write_pending(final, sr_module.sr_to_bytes(document), self.worker_id)
        except Exception:  # no report: its heatmap object goes too (it would be a file without a row)
            if heatmap_pending is not None:
                heatmap_pending.unlink(missing_ok=True)
            raise
        return WrittenSR(
            final,
            document,
            previous_id,
            earlier[0] if earlier is not None else None,
            pending,
            heatmap,
            heatmap_final,
            heatmap_pending,
        )

    def _write_heatmap(self, outcome: Classified, series: dict[str, str]) -> tuple[Any, Path | None, Path | None]:
        """The heatmap object of ``outcome`` written under its pending name: (dataset, final path, pending path),
        or Nones when there is none to make or it failed (logged with its traceback the first time, then in one
        line: the SR is made without it)."""
        if outcome.heatmap is None or outcome.display is None or self.settings.heatmap.pacs_object == "none":
            return None, None, None
        job = outcome.job
        try:
            if self._heatmaps is None:
                from cxr_triage.outputs.heatmapobject import HeatmapSecondaryCapture

                self._heatmaps = HeatmapSecondaryCapture(
                    manufacturer=self.sr.manufacturer,
                    series_description=self.settings.heatmap.series_description,
                    opacity=self.settings.heatmap.opacity,
                )
            heatmap = self._heatmaps.build(
                outcome.evidence,
                outcome.display,
                outcome.heatmap,
                model_version=outcome.model.model_version,
                series_instance_uid=series.get(job.study_instance_uid),
            )
            final = srfiles.final_path(self.sr_dir, job.study_instance_uid, str(heatmap.SOPInstanceUID))
            from cxr_triage.outputs import sr as sr_module

            return heatmap, final, srfiles.write_pending(final, sr_module.sr_to_bytes(heatmap), self.worker_id)
        except Exception:
            self._heatmap_failures += 1
            if self._heatmap_failures == 1:
                logger.exception("SOP instance %s: the heatmap object could not be made", job.sop_instance_uid)
            else:
                logger.error("SOP instance %s: the heatmap object could not be made either", job.sop_instance_uid)
            return None, None, None

    def write_thumbnails(self, outcomes: Sequence[Classified]) -> dict[int, Path]:
        """The worklist's PNG of each classified instance that has one, by job id (a failure only logs)."""
        written: dict[int, Path] = {}
        if self.thumbnail_dir is None:
            return written
        for outcome in outcomes:
            if outcome.thumbnail is None:
                continue
            job = outcome.job
            path = self.thumbnail_dir / spool.safe_uid(job.study_instance_uid) / f"{job.id}.png"
            try:
                written[job.id] = files.write_atomic(path, outcome.thumbnail, sync_dir=False)
            except OSError:
                logger.exception("SOP instance %s: the worklist thumbnail could not be written", job.sop_instance_uid)
        return written

    def write_heatmaps(self, outcomes: Sequence[Classified]) -> dict[int, Path]:
        """The coarse map of each classified instance that has one (``heatmap.save_coarse``), by job id; a failure
        is logged once per chunk and the results are recorded without their maps."""
        written: dict[int, Path] = {}
        failed: list[str] = []
        for outcome in outcomes:
            if outcome.heatmap is None:
                continue
            from cxr_triage.ml.heatmap import save_coarse

            job = outcome.job
            path = self.heatmap_dir / spool.safe_uid(job.study_instance_uid) / f"{job.id}.npy"
            try:
                written[job.id] = save_coarse(path, outcome.heatmap)
            except Exception:
                if not failed:
                    logger.exception("the heatmap of SOP instance %s could not be stored", job.sop_instance_uid)
                failed.append(job.sop_instance_uid)
        if len(failed) > 1:
            logger.error("%d heatmaps of this chunk could not be stored: recorded without them", len(failed))
        return written

    # --- the transaction -------------------------------------------------------------------------------------

    def commit(
        self,
        outcomes: Sequence[Outcome],
        srs: dict[int, SRResult],
        thumbnails: dict[int, Path] | None = None,
        heatmaps: dict[int, Path] | None = None,
    ) -> None:
        """Record ``outcomes`` in one transaction (with their studies' provisional priorities); once it has
        committed, rename their SRs into place (those of outcomes no longer ours are deleted) and log them."""
        now = db.utcnow()
        recorded: list[tuple[Outcome, bool]] = []
        discarded: list[Outcome] = []
        sr_rows: dict[int, db.SRDocument] = {}
        with self.sessions() as session, session.begin():
            owned = jobqueue.held(session, [o.job for o in outcomes], self.worker_id)
            for outcome in outcomes:
                instance = owned.get(outcome.job.id)
                if instance is None:
                    discarded.append(outcome)
                    continue
                final = False
                if outcome.identifiers is not None:  # for the outputs that name the patient (hl7report)
                    instance.identifiers = outcome.identifiers
                if isinstance(outcome, Failed):
                    final = jobqueue.retry_or_fail(instance, outcome.error, self.max_attempts, now)
                elif isinstance(outcome, Refused):
                    self._add_refusal(session, instance, outcome, now)
                else:
                    self._add_prediction(session, instance, outcome, srs.get(outcome.job.id), sr_rows, now)
                    thumbnail = (thumbnails or {}).get(outcome.job.id)
                    instance.thumbnail_path = str(thumbnail) if thumbnail is not None else None
                    heatmap = (heatmaps or {}).get(outcome.job.id)
                    instance.heatmap_path = str(heatmap) if heatmap is not None else None
                recorded.append((outcome, final))
            studies.refresh_priorities(session, [o.job.study_instance_uid for o, _ in recorded], self.triage)
        srfiles.publish(
            move
            for outcome, _ in recorded
            if isinstance(written := srs.get(outcome.job.id), WrittenSR)
            for move in written.moves()
        )
        dropped = [written for o in discarded if isinstance(written := srs.get(o.job.id), WrittenSR)]
        if dropped:
            self._drop_unrecorded(dropped)
        for outcome, final in recorded:
            _log(outcome, final)

    def _drop_unrecorded(self, written: Sequence[WrittenSR]) -> None:
        """Delete the pending SR files of outcomes not recorded, with those still undecided from earlier chunks.
        Their rows are looked up first: a commit that raised may have committed all the same (a connection lost
        during COMMIT), and then the file is renamed into place instead. A database that cannot be read leaves them
        for the next chunk (and ``srfiles.settle_pending`` at the next start)."""
        for already_final in (w for w in written if w.pending is None):  # written by a caller of commit
            already_final.unlink()
        pending = [move[0] for w in written for move in w.moves()] + self._undecided
        try:
            srfiles.settle(self.sessions, pending)
        except Exception:
            logger.exception("%d unrecorded SR file(s) could not be settled yet; retrying later", len(pending))
            self._undecided = pending
        else:
            self._undecided = []

    def _add_refusal(self, session: Session, instance: db.Instance, outcome: Refused, now: dt.datetime) -> None:
        refusal = outcome.refusal
        session.add(
            db.RefusalRecord(
                instance_id=instance.id,
                code=refusal.code,
                reason=refusal.reason,
                attribute=refusal.attribute,
                typicality=outcome.typicality,
                created_at=now,
            )
        )
        instance.error = None
        jobqueue.finish(instance, db.REFUSED, now)

    def _add_prediction(
        self,
        session: Session,
        instance: db.Instance,
        outcome: Classified,
        written: SRResult | None,
        sr_rows: dict[int, db.SRDocument],
        now: dt.datetime,
    ) -> None:
        predictor, prediction = outcome.model, outcome.prediction
        session.add(
            db.PredictionRecord(
                instance_id=instance.id,
                label=prediction.label,
                probabilities={k: float(v) for k, v in prediction.probabilities.items()},
                model_version=predictor.model_version,
                model_sha256=predictor.loaded.sha256,
                preprocess_ms=outcome.preprocess_ms,
                inference_ms=outcome.inference_ms,
                total_ms=outcome.preprocess_ms + outcome.inference_ms,
                device=str(predictor.device),
                precision=outcome.precision or predictor.precision,  # what produced the label
                typicality=outcome.typicality,
                created_at=now,
            )
        )
        instance.flagged = outcome.flagged
        instance.flag_reason = outcome.flag_reason
        instance.error = written if isinstance(written, str) else None
        if isinstance(written, WrittenSR):
            row = self._add_sr(session, outcome, written, sr_rows, now)
            for output in needing(Needs.INSTANCE):  # the SR's forwards, in this transaction
                output.enqueue(session, row, self.settings, now)
        jobqueue.finish(instance, db.DONE, now)

    def _add_sr(
        self, session: Session, outcome: Classified, written: WrittenSR, sr_rows: dict[int, db.SRDocument], now: Any
    ) -> db.SRDocument:
        previous_id = written.previous_id
        if written.previous_job is not None:  # it supersedes an SR written earlier in this chunk
            earlier = sr_rows.get(written.previous_job)
            previous_id = earlier.id if earlier is not None else None
        row = db.SRDocument(
            instance_id=outcome.job.id,
            sop_instance_uid=str(written.document.SOPInstanceUID),
            series_instance_uid=str(written.document.SeriesInstanceUID),
            path=str(written.path),
            model_version=outcome.model.model_version,
            previous_sr_id=previous_id,
            created_at=now,
            heatmap_sop_instance_uid=str(written.heatmap.SOPInstanceUID) if written.heatmap is not None else None,
            heatmap_series_instance_uid=(
                str(written.heatmap.SeriesInstanceUID) if written.heatmap is not None else None
            ),
            heatmap_path=str(written.heatmap_path) if written.heatmap_path is not None else None,
        )
        session.add(row)
        session.flush()
        sr_rows[outcome.job.id] = row
        return row


def _not_written(exc: BaseException) -> str:
    return f"Structured Report not written: {type(exc).__name__}: {exc}"[:4000]


def _log(outcome: Outcome, final_attempt: bool) -> None:
    job = outcome.job
    if isinstance(outcome, Failed):
        if final_attempt:
            logger.error("job %s failed after its last attempt: %s", job.id, outcome.error)
    elif isinstance(outcome, Refused):
        logger.info("SOP instance %s refused: %s", job.sop_instance_uid, outcome.refusal.code)
    else:
        logger.info(
            "SOP instance %s: %s (model %s)%s",
            job.sop_instance_uid,
            outcome.prediction.label,
            outcome.model.model_version,
            " FLAGGED" if outcome.flagged else "",
        )
