"""Scheduled retraining: a challenger fine-tuned from the champion on radiologist-confirmed studies, promoted only
when it is better on a fixed held-out set.

One run (``RetrainJob.run``), each step logged and written to its ``retrain_runs`` row (``step``, shown by
``cxr-triage status`` and ``cxr-triage retrain``):

1. take the ``retrain`` lease (``cxr_triage.core.schedlock``; renewed while the run lives, so exactly one run at a time
   across processes and hosts, and a dead run's lease ends by itself). Earlier rows still ``running`` belong to
   runs whose process died: they are marked failed, and a candidate such a run registered but never decided on is
   rejected (one it had already promoted stays champion, and its run is recorded as promoted);
2. collect the feedback new since the last promoted or rejected run: the latest label of each study whose latest
   feedback is new, one row per classified image with its 224x224 model input (the worklist thumbnail) on disk.
   Fewer than ``[retrain] min_new_labels`` images: the run is ``skipped`` with the reason, and the labels wait for
   the next run;
3. train: ``python -m training retrain`` in a subprocess (the runtime never imports ``training``), niced, with
   the champion's file, the feedback manifest and ``[retrain] base_pack``; it replays a sample of the pack's
   training split, evaluates champion and challenger on the same fixed set (the pack's test split or
   ``eval_manifest``) and writes the challenger and ``retrain.json`` atomically. Its output goes to the run's log
   and this process's log. It is stopped after ``timeout``, when the lease is lost, or when the server stops, and
   it stops itself if this process dies;
4. register the challenger as a candidate (``registry.register_candidate``: its file copied into
   ``[model] models_dir``, with training data, config and metrics);
5. decide (``decide``): promoted when its macro AUC beats the champion's by ``margin`` and no class's sensitivity
   falls by more than ``sensitivity_tolerance``, else rejected; either with the figures as the reason. Workers
   pick a new champion up from the registry between batches;
6. record the outcome and give the lease back.

A run that dies at any point leaves the champion as it was: promotion is one registry transaction, after
everything else. ``RetrainScheduler`` runs the job on ``[retrain] schedule`` inside ``serve``: every ``serve``
process competes for the ``retrain-scheduler`` lease and only its holder runs an APScheduler cron job, so exactly
one scheduler runs however many processes and hosts share the database; when its holder dies, another takes over
once the lease has expired (a fire time that passes during the hand-over is not made up: ``retrain --now``).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import CLASS_NAMES, log_name
from cxr_triage.core import db, schedlock
from cxr_triage.core.settings import Settings
from cxr_triage.files import write_atomic
from cxr_triage.ml import registry

logger = logging.getLogger(log_name(__name__))

RUN_LEASE = "retrain"
SCHEDULER_LEASE = "retrain-scheduler"
SCHEDULE, MANUAL = "schedule", "manual"
STOP_GRACE_SECONDS = 30.0
"""After SIGTERM, seconds the training process gets to exit before it is killed."""
LOG_TAIL_LINES = 20
"""Lines of the training output kept for the reason of a failed run."""
EPOCH_LINE = re.compile(r"(retrain-\w+ epoch \d+/\d+).*?(val loss [0-9.]+)")
"""An epoch's line in the training output (``training.loop``): the run's step shows the latest."""


class RunAborted(RuntimeError):
    """The run was stopped from outside (the server stops, the lease was lost, SIGTERM to `retrain --now`)."""


@dataclass(frozen=True)
class Decision:
    """Whether the challenger replaces the champion, and why (the figures)."""

    promote: bool
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)


def decide(champion: dict[str, Any], challenger: dict[str, Any], margin: float, tolerance: float) -> Decision:
    """Promote when ``challenger``'s macro AUC >= ``champion``'s + ``margin`` (and is higher) and no class's
    sensitivity falls by more than ``tolerance``; both are ``training.retrain`` summaries of the SAME fixed set."""
    before, after = champion.get("macro_auc"), challenger.get("macro_auc")
    figures: dict[str, Any] = {"margin": margin, "sensitivity_tolerance": tolerance}
    if before is None or after is None:
        return Decision(False, "macro AUC is undefined on the evaluation set (a class has no image there)", figures)
    gain = after - before
    figures.update(champion_macro_auc=before, challenger_macro_auc=after, macro_auc_gain=gain, sensitivity={})
    problems = []
    auc_text = f"macro AUC {before:.4f} -> {after:.4f} ({gain:+.4f}"
    if gain < margin or gain <= 0:
        problems.append(f"{auc_text}, less than the margin {margin:g})")
    changes = []
    for name in CLASS_NAMES:
        was = champion["per_class"][name]["sensitivity"]
        now = challenger["per_class"][name]["sensitivity"]
        figures["sensitivity"][name] = {"champion": was, "challenger": now, "change": now - was}
        changes.append(f"{name} {was:.3f} -> {now:.3f}")
        if was - now > tolerance + 1e-12:
            problems.append(
                f"{name} sensitivity fell {was - now:.4f} ({was:.3f} -> {now:.3f}), more than {tolerance:g}"
            )
    if problems:
        return Decision(False, "; ".join(problems), figures)
    return Decision(
        True,
        f"{auc_text} >= margin {margin:g}); sensitivity {', '.join(changes)} (none fell more than {tolerance:g})",
        figures,
    )


@dataclass(frozen=True)
class Collected:
    """The new labelled images of a run."""

    rows: list[tuple[str, str, str]]  # (image path, label, study instance UID)
    feedback_ids: list[int]
    studies: int
    after_id: int
    to_id: int


def feedback_watermark(session: Session) -> int:
    """Feedback ids up to this were used by a promoted or rejected run (0: none yet)."""
    done = (db.RETRAIN_PROMOTED, db.RETRAIN_REJECTED)
    value = session.scalar(select(func.max(db.RetrainRun.feedback_to_id)).where(db.RetrainRun.state.in_(done)))
    return int(value or 0)


def collect_feedback(session: Session) -> Collected:
    """The latest label of every study whose latest feedback is newer than the watermark, one row per classified
    image whose model input (thumbnail) is on disk."""
    after = feedback_watermark(session)
    to_id = int(session.scalar(select(func.max(db.Feedback.id))) or 0)
    latest_ids = select(func.max(db.Feedback.id)).where(db.Feedback.id <= to_id).group_by(db.Feedback.study_id)
    latest = session.scalars(
        select(db.Feedback).where(db.Feedback.id.in_(latest_ids), db.Feedback.id > after).order_by(db.Feedback.id)
    ).all()
    by_study = {row.study_id: row for row in latest}
    rows: list[tuple[str, str, str]] = []
    if by_study:
        instances = session.execute(
            select(db.Instance.study_id, db.Instance.thumbnail_path, db.Instance.study_instance_uid)
            .where(db.Instance.study_id.in_(list(by_study)), db.Instance.thumbnail_path.is_not(None))
            .order_by(db.Instance.id)
        ).all()
        for study_id, path, study_uid in instances:
            if by_study[study_id].label_after in CLASS_NAMES and Path(path).is_file():
                rows.append((str(Path(path).resolve()), by_study[study_id].label_after, study_uid))
    return Collected(rows, [row.id for row in latest], len(by_study), after, to_id)


def write_manifest(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """The training module's manifest CSV (the format of the worklist's feedback export)."""
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "label", "group", "patient_id", "source"])
    for image, label, study_uid in rows:
        writer.writerow([image, label, f"study:{study_uid}", "", "feedback"])
    return write_atomic(path, out.getvalue().encode("utf-8"))


def challenger_version(parent: str, run_id: int) -> str:
    """``cae-lstm-w16-cpu-1`` (or ``...-r3``) trained by run 7 -> ``cae-lstm-w16-cpu-1-r7``."""
    base = re.sub(r"-r\d+$", "", parent)
    return f"{base}-r{run_id}"


@dataclass
class Outcome:
    """What one call of ``RetrainJob.run`` did: the run's id (None when another run held the lease), its state and
    reason, and the candidate's version id when one was registered."""

    run_id: int | None
    state: str
    reason: str
    candidate_id: int | None = None
    champion_metrics: dict[str, Any] | None = None
    challenger_metrics: dict[str, Any] | None = None

    def describe(self) -> str:
        if self.run_id is None:
            return f"no run: {self.reason}"
        text = f"retraining run {self.run_id}: {self.state}: {self.reason}"
        if self.candidate_id is not None:
            text += f" (challenger: model version {self.candidate_id})"
        return text


BUSY = "busy"
"""``Outcome.state`` when another run held the lease (no row is written)."""


class RetrainJob:
    """Runs of the retraining job for one installation (module docstring)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], holder: str | None = None) -> None:
        self.settings = settings
        self.retrain = settings.retrain
        self.sessions = sessions
        self.holder = holder or schedlock.holder_id()
        self._abort_reason = ""
        self._aborted = threading.Event()
        self._process: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    # --- outside control ---------------------------------------------------------------------------------------

    def abort(self, reason: str) -> None:
        """Stop a run in progress (its training process is terminated); the run is recorded as failed."""
        self._abort_reason = reason
        self._aborted.set()
        with self._lock:
            process = self._process
        if process is not None and process.poll() is None:
            process.terminate()

    def _check_aborted(self) -> None:
        if self._aborted.is_set():
            raise RunAborted(self._abort_reason or "stopped")

    # --- one run -----------------------------------------------------------------------------------------------

    def run(self, trigger: str = MANUAL) -> Outcome:
        """One run (module docstring); never raises for a failure of the run itself, which is recorded."""
        self._aborted.clear()
        self._abort_reason = ""
        lease = schedlock.Lease(self.sessions, RUN_LEASE, self.holder, self.retrain.lock_seconds)
        if not lease.acquire():
            state = lease.state()
            holder = state.holder if state is not None else "?"
            logger.info("retraining: another run is in progress (lease held by %s); not starting one", holder)
            return Outcome(None, BUSY, f"another retraining run is in progress (held by {holder})")
        keeper = schedlock.Keeper(lease, on_lost=lambda: self.abort("the retraining lease was lost")).start()
        try:
            self._settle_dead_runs()
            run_id = self._start_row(trigger)
            logger.info("retraining run %d started (%s, holder %s)", run_id, trigger, self.holder)
            return self._run(run_id, lease)
        finally:
            keeper.stop()
            try:
                lease.release()
            except Exception:  # the lease then simply expires
                logger.exception("retraining: the lease could not be released; it expires by itself")

    def _run(self, run_id: int, lease: schedlock.Lease) -> Outcome:
        candidate_id: int | None = None
        try:
            return self._steps(run_id, lease)
        except _Registered as registered:  # a failure after the challenger was registered
            candidate_id, exc = registered.candidate_id, registered.cause
        except Exception as exc_:
            exc = exc_
        reason = str(exc) if isinstance(exc, RunAborted | _RunError) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, RunAborted | _RunError):
            logger.exception("retraining run %d failed", run_id)
        else:
            logger.error("retraining run %d failed: %s", run_id, reason)
        if candidate_id is not None:
            self._reject_quietly(candidate_id, f"retraining run {run_id} failed before its decision: {reason}")
        self._finish(run_id, db.RETRAIN_FAILED, reason)
        return Outcome(run_id, db.RETRAIN_FAILED, reason, candidate_id)

    def _steps(self, run_id: int, lease: schedlock.Lease) -> Outcome:
        """Steps 2-6 of the module docstring for the run ``run_id``; a failure raises (``_run`` records it)."""
        # one function, read top to bottom as the docstring lists the steps; each step is a few calls
        self._step(run_id, "finding the champion")
        champion = registry.champion(self.sessions)
        if champion is None:
            return self._skip(run_id, "the model registry has no champion yet (start `serve` or `worker` once)")
        champion_file = registry.model_file(champion, self.settings.model.models_dir)
        if champion_file is None:
            raise _RunError(f"the champion, version {champion.id}, has no file with its sha256 ({champion.path})")
        self._update(run_id, champion_id=champion.id)

        self._step(run_id, "collecting feedback")
        with self.sessions() as session:
            db.read_only(session)
            collected = collect_feedback(session)
        self._update(
            run_id,
            feedback_after_id=collected.after_id,
            feedback_to_id=collected.to_id,
            new_studies=collected.studies,
            new_images=len(collected.rows),
        )
        logger.info(
            "retraining run %d: %d labelled image(s) of %d study(ies) with feedback after id %d",
            run_id,
            len(collected.rows),
            collected.studies,
            collected.after_id,
        )
        if len(collected.rows) < self.retrain.min_new_labels:
            return self._skip(
                run_id,
                f"{len(collected.rows)} new labelled image(s) from {collected.studies} study(ies) since feedback id "
                f"{collected.after_id}; at least {self.retrain.min_new_labels} needed ([retrain] min_new_labels)",
            )
        self._check_aborted()

        folder = (self.retrain.work_dir / f"run-{run_id}").resolve()
        result = self._train(run_id, champion, champion_file, collected, folder)
        self._check_aborted()

        self._step(run_id, "registering the challenger")
        challenger = result["challenger"]
        stored = registry.store_model_file(Path(challenger["path"]), self.settings.model.models_dir)
        candidate_id = registry.register_candidate(
            self.sessions,
            stored,
            parent_id=champion.id,
            training_data=self._training_data(run_id, collected, result),
            config={"retrain": _plain(self.retrain), "training": result.get("config", {})},
            metrics={**challenger["metrics"], "evaluation_set": result["data"]["evaluation"]},
        )
        try:
            self._update(
                run_id,
                candidate_id=candidate_id,
                replay_images=result["data"]["replay"],
                eval_images=result["data"]["evaluation"]["images"],
                champion_metrics=result["champion"]["metrics"],
                challenger_metrics=challenger["metrics"],
            )
            logger.info("retraining run %d: challenger %s registered as version %d", run_id,
                        challenger["model_version"], candidate_id)  # fmt: skip
            return self._decide(run_id, lease, champion, candidate_id, result)
        except Exception as exc:
            raise _Registered(candidate_id, exc) from exc

    def _decide(
        self,
        run_id: int,
        lease: schedlock.Lease,
        champion: registry.RegisteredModel,
        candidate_id: int,
        result: dict[str, Any],
    ) -> Outcome:
        self._step(run_id, "deciding")
        champion_metrics, challenger_metrics = result["champion"]["metrics"], result["challenger"]["metrics"]
        decision = decide(champion_metrics, challenger_metrics, self.retrain.margin, self.retrain.sensitivity_tolerance)
        self._check_aborted()
        if not lease.renew():
            raise RunAborted("the retraining lease was lost before the decision")
        current = registry.champion(self.sessions)
        if decision.promote and (current is None or current.id != champion.id):
            decision = Decision(
                False,
                f"the champion changed during the run (version {champion.id} -> "
                f"{current.id if current else 'none'}); the challenger was measured against the old one",
                decision.figures,
            )
        state = db.RETRAIN_PROMOTED if decision.promote else db.RETRAIN_REJECTED
        if decision.promote:
            registry.promote(self.sessions, candidate_id, f"retraining run {run_id}: {decision.reason}",
                             models_dir=self.settings.model.models_dir)  # fmt: skip
        else:
            registry.reject(self.sessions, candidate_id, f"retraining run {run_id}: {decision.reason}")
        self._finish(run_id, state, decision.reason, details={"decision": decision.figures})
        logger.info("retraining run %d: %s", run_id, decision.reason)
        return Outcome(run_id, state, decision.reason, candidate_id, champion_metrics, challenger_metrics)

    def _training_data(self, run_id: int, collected: Collected, result: dict[str, Any]) -> dict[str, Any]:
        data = result["data"]
        return {
            "retrain_run": run_id,
            "feedback_ids": collected.feedback_ids,
            "feedback_id_range": [collected.after_id + 1, collected.to_id],
            "studies": collected.studies,
            "confirmed_images": data["confirmed"],
            "confirmed_per_class": data["confirmed_per_class"],
            "replay_images": data["replay"],
            "base_pack": data["base_pack"],
            "validation_images": data["validation"],
            "evaluation": data["evaluation"],
            "parent_sha256": result["champion"]["sha256"],
        }

    # --- training subprocess -----------------------------------------------------------------------------------

    def command(self, champion: Path, manifest: Path, folder: Path, version: str, provenance: Path) -> list[str]:
        """The ``python -m training retrain`` command line of a run."""
        r = self.retrain
        argv = [r.python or sys.executable, "-m", "training", "retrain", "--champion", str(champion)]
        argv += ["--feedback", str(manifest), "--pack", str(Path(r.base_pack).resolve())]
        if r.eval_manifest:
            argv += ["--eval-manifest", str(Path(r.eval_manifest).resolve())]
        argv += ["--replay-ratio", repr(r.replay_ratio), "--val-images", str(r.validation_images)]
        argv += ["--head-epochs", str(r.head_epochs), "--head-lr", repr(r.head_learning_rate)]
        argv += ["--epochs", str(r.epochs), "--lr", repr(r.learning_rate)]
        argv += ["--batch-size", str(r.batch_size), "--device", r.device]
        argv += {"auto": [], "float32": ["--no-amp"], "bfloat16": ["--amp"]}[r.precision]
        argv += ["--model-version", version, "--provenance", str(provenance), "--out", str(folder / "out")]
        argv += ["--budget-seconds", repr(r.timeout), "--watch-parent", "--no-progress"]
        return argv

    def _train(
        self,
        run_id: int,
        champion: registry.RegisteredModel,
        champion_file: Path,
        collected: Collected,
        folder: Path,
    ) -> dict[str, Any]:
        """Run the training subprocess for ``run_id`` in ``folder``; its ``retrain.json``."""
        if not self.retrain.base_pack:
            raise _RunError("no base pack: set [retrain] base_pack (a pack of the base data, docs/TRAINING.md)")
        if not Path(self.retrain.base_pack).is_file():
            raise _RunError(f"the base pack {Path(self.retrain.base_pack).resolve()} does not exist")
        folder.mkdir(parents=True, exist_ok=True)
        manifest = write_manifest(folder / "feedback.csv", collected.rows)
        provenance = write_atomic(
            folder / "provenance.json",
            json.dumps(
                {
                    "retrain_run": run_id,
                    "feedback_ids": collected.feedback_ids,
                    "feedback_id_range": [collected.after_id + 1, collected.to_id],
                    "studies": collected.studies,
                    "parent_registry_id": champion.id,
                }
            ).encode("utf-8"),
        )
        version = challenger_version(champion.version, run_id)
        argv = self.command(champion_file, manifest, folder, version, provenance)
        log_path = folder / "train.log"
        self._update(run_id, details={"folder": str(folder), "log": str(log_path), "command": argv})
        self._step(run_id, f"training {version} from {champion.version}")
        logger.info("retraining run %d: %s", run_id, " ".join(argv))
        started = time.monotonic()
        tail = self._run_process(run_id, argv, log_path)
        seconds = time.monotonic() - started
        result_path = folder / "out" / "retrain.json"
        if not result_path.is_file():
            raise _RunError(f"training ended without a result ({tail[-1] if tail else 'no output'}); see {log_path}")
        result: dict[str, Any] = json.loads(result_path.read_text(encoding="utf-8"))
        result.setdefault("wall_seconds", {})["subprocess"] = round(seconds, 1)
        self._update(run_id, details={"folder": str(folder), "log": str(log_path), "command": argv,
                                      "wall_seconds": result["wall_seconds"], "device": result.get("device"),
                                      "precision": result.get("precision")})  # fmt: skip
        logger.info("retraining run %d: training took %.0f s", run_id, seconds)
        return result

    def _run_process(self, run_id: int, argv: list[str], log_path: Path) -> list[str]:
        """Run ``argv``, its output into ``log_path`` and this log; stopped on timeout or abort. The last lines."""
        tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._check_aborted()
        with open(log_path, "a", encoding="utf-8") as log:
            process = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
            )
            with self._lock:
                self._process = process
            if self.retrain.nice:
                try:
                    os.setpriority(os.PRIO_PROCESS, process.pid, self.retrain.nice)
                except OSError as exc:
                    logger.warning("retraining run %d: cannot renice the training process (%s)", run_id, exc)
            self._update(run_id, details_merge={"training_pid": process.pid})
            watchdog = threading.Thread(target=self._watch, args=(process,), name="retrain-watchdog", daemon=True)
            watchdog.start()
            try:
                assert process.stdout is not None
                for line in process.stdout:
                    line = line.rstrip("\n")
                    log.write(line + "\n")
                    log.flush()
                    tail.append(line)
                    logger.info("retraining run %d: %s", run_id, line)
                    epoch = EPOCH_LINE.search(line)
                    if epoch:
                        self._step(run_id, f"training: {epoch.group(1)}, {epoch.group(2)}")
                code = process.wait()
            finally:
                with self._lock:
                    self._process = None
                if process.poll() is None:
                    process.kill()
                    process.wait()
        self._check_aborted()
        if code != 0:
            why = "the time limit ([retrain] timeout) passed" if code in (-signal.SIGTERM, -signal.SIGKILL) else ""
            last = next((line for line in reversed(tail) if line.strip()), "no output")
            raise _RunError(f"training failed (exit status {code}{': ' + why if why else ''}): {last}; see {log_path}")
        return list(tail)

    def _watch(self, process: subprocess.Popen[str]) -> None:
        """Stop ``process`` once the time limit (with a grace for its own clean stop) has passed."""
        deadline = time.monotonic() + self.retrain.timeout + STOP_GRACE_SECONDS
        while process.poll() is None:
            if time.monotonic() > deadline:
                logger.error("retraining: training exceeded [retrain] timeout; stopping it")
                process.terminate()
                try:
                    process.wait(STOP_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    process.kill()
                return
            if self._aborted.is_set():
                process.terminate()
                try:
                    process.wait(STOP_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    process.kill()
                return
            time.sleep(0.5)

    # --- rows --------------------------------------------------------------------------------------------------

    def _settle_dead_runs(self) -> None:
        """Rows still ``running`` while we hold the lease belong to runs whose process died (module docstring)."""
        with self.sessions() as session:
            db.read_only(session)
            dead = session.scalars(
                select(db.RetrainRun).where(db.RetrainRun.state == db.RETRAIN_RUNNING).order_by(db.RetrainRun.id)
            ).all()
        for run in dead:
            why = (
                f"the process running it ({run.holder}) stopped without finishing, at step '{run.step}' (its lease "
                f"expired); found by the next run"
            )
            state = db.RETRAIN_FAILED
            if run.candidate_id is not None:
                with self.sessions() as session:
                    db.read_only(session)
                    row = session.get(db.ModelVersion, run.candidate_id)
                    promoted = row is not None and row.promoted_at is not None
                    candidate = row is not None and row.state == db.MODEL_CANDIDATE
                if promoted:
                    state, why = db.RETRAIN_PROMOTED, f"the challenger was promoted, then the process died; {why}"
                elif candidate:
                    self._reject_quietly(run.candidate_id, f"retraining run {run.id} died before its decision")
            logger.warning("retraining run %d is marked %s: %s", run.id, state, why)
            self._finish(run.id, state, why)

    def _start_row(self, trigger: str) -> int:
        now = db.utcnow()
        with self.sessions() as session, session.begin():
            row = db.RetrainRun(trigger=trigger, holder=self.holder, state=db.RETRAIN_RUNNING, step="starting",
                                started_at=now, updated_at=now, details={"pid": os.getpid()})  # fmt: skip
            session.add(row)
            session.flush()
            return row.id

    def _update(self, run_id: int, details_merge: dict[str, Any] | None = None, **values: Any) -> None:
        with self.sessions() as session, session.begin():
            if details_merge:
                current = session.scalar(select(db.RetrainRun.details).where(db.RetrainRun.id == run_id)) or {}
                values["details"] = {**current, **details_merge}
            elif "details" in values:
                current = session.scalar(select(db.RetrainRun.details).where(db.RetrainRun.id == run_id)) or {}
                values["details"] = {**current, **values["details"]}
            session.execute(
                update(db.RetrainRun).where(db.RetrainRun.id == run_id).values(updated_at=db.utcnow(), **values)
            )

    def _step(self, run_id: int, step: str) -> None:
        logger.info("retraining run %d: %s", run_id, step)
        self._update(run_id, step=step[:300])

    def _skip(self, run_id: int, reason: str) -> Outcome:
        logger.info("retraining run %d skipped: %s", run_id, reason)
        self._finish(run_id, db.RETRAIN_SKIPPED, reason)
        return Outcome(run_id, db.RETRAIN_SKIPPED, reason)

    def _finish(self, run_id: int, state: str, reason: str, details: dict[str, Any] | None = None) -> None:
        values: dict[str, Any] = {"state": state, "reason": reason, "finished_at": db.utcnow(), "step": "finished"}
        if details:
            values["details"] = details
        self._update(run_id, **values)

    def _reject_quietly(self, candidate_id: int, reason: str) -> None:
        try:
            registry.reject(self.sessions, candidate_id, reason)
        except Exception:  # the candidate stays a candidate, never champion: safe, and visible in `models list`
            logger.exception("retraining: candidate %d could not be rejected", candidate_id)


class _RunError(RuntimeError):
    """A failure of a run whose message is the whole reason (no traceback needed)."""


class _Registered(Exception):
    """A failure after the challenger was registered: ``cause``, with the candidate to reject."""

    def __init__(self, candidate_id: int, cause: Exception) -> None:
        super().__init__(str(cause))
        self.candidate_id, self.cause = candidate_id, cause


def _plain(value: Any) -> dict[str, Any]:
    """A settings dataclass as plain JSON values."""
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(value), default=str))


# --- the schedule ----------------------------------------------------------------------------------------------


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


# --- reading ---------------------------------------------------------------------------------------------------


def run_json(run: db.RetrainRun) -> dict[str, Any]:
    """A ``retrain_runs`` row as plain JSON values."""
    moments = ("started_at", "updated_at", "finished_at")
    out: dict[str, Any] = {}
    for column in db.RetrainRun.__table__.columns:
        value = getattr(run, column.name)
        out[column.name] = value.isoformat() if column.name in moments and value is not None else value
    return out


def recent_runs(session: Session, limit: int = 10) -> list[db.RetrainRun]:
    return list(session.scalars(select(db.RetrainRun).order_by(db.RetrainRun.id.desc()).limit(limit)))


def status(session: Session, settings: Settings, now: dt.datetime) -> dict[str, Any]:
    """Retraining for ``cxr-triage status``: the schedule, its leader, the last run and a run in progress."""
    r = settings.retrain
    next_run = r.trigger().get_next_fire_time(None, now) if r.enabled else None
    leader = schedlock.read(session, SCHEDULER_LEASE)
    running = schedlock.read(session, RUN_LEASE)
    runs = recent_runs(session, 1)
    return {
        "enabled": r.enabled,
        "schedule": r.schedule,
        "timezone": r.timezone or "local",
        "next_run": next_run.isoformat() if next_run is not None else None,
        "scheduler": leader.holder if leader is not None and leader.held(now) else None,
        "running": running.holder if running is not None and running.held(now) else None,
        "last_run": run_json(runs[0]) if runs else None,
    }


def status_problems(retraining: dict[str, Any]) -> list[str]:
    """The conditions of retraining that need someone's attention."""
    problems = []
    last = retraining.get("last_run")
    if last and last["state"] == db.RETRAIN_FAILED:
        log = (last.get("details") or {}).get("log")
        problems.append(
            f"retraining run {last['id']} failed: {last['reason']}"
            + (f" (log: {log})" if log else "")
            + "; the champion is unchanged"
        )
    if last and last["state"] == db.RETRAIN_RUNNING and not retraining.get("running"):
        problems.append(
            f"retraining run {last['id']} is marked running but no process holds its lease (it died); the next run "
            "records it as failed"
        )
    if retraining["enabled"] and not retraining.get("scheduler"):
        problems.append("[retrain] enabled but no `serve` process runs the retraining schedule")
    return problems
