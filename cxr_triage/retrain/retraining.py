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
everything else. The rest of the room: what a run learns from (``cxr_triage.retrain.feedback``), its verdict
(``cxr_triage.ml.decision``), the schedule inside ``serve`` (``cxr_triage.retrain.scheduler``) and what the runs
did, for ``status`` and ``retrain`` (``cxr_triage.retrain.runs``).
"""

from __future__ import annotations

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import log_name
from cxr_triage.core import db, schedlock
from cxr_triage.core.settings import Settings
from cxr_triage.files import write_atomic
from cxr_triage.ml import registry
from cxr_triage.ml.decision import Decision, decide
from cxr_triage.retrain.feedback import Collected, collect_feedback, write_manifest

logger = logging.getLogger(log_name(__name__))

RUN_LEASE = "retrain"
SCHEDULE, MANUAL = "schedule", "manual"
STOP_GRACE_SECONDS = 30.0
"""After SIGTERM, seconds the training process gets to exit before it is killed."""
LOG_TAIL_LINES = 20
"""Lines of the training output kept for the reason of a failed run."""
EPOCH_LINE = re.compile(r"(retrain-\w+ epoch \d+/\d+).*?(val loss [0-9.]+)")
"""An epoch's line in the training output (``training.loop``): the run's step shows the latest."""


class RunAborted(RuntimeError):
    """The run was stopped from outside (the server stops, the lease was lost, SIGTERM to `retrain --now`)."""


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
