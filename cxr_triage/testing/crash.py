"""SIGKILL at random points of a burst: a real ``cxr-triage serve`` (SQLite, a tiny random model, one worker
process) receives bursts from dcmtk's ``storescu`` and is killed with SIGKILL after a random delay, then
restarted, ``runs`` times; then it finishes the queue and stops cleanly, and the database and ``sr_dir`` are
checked:

- every instance in the database (each one acknowledged, and those received but not yet answered when the server
  died) is classified, with exactly one prediction and exactly one SR row, whose file is at the row's path, parses,
  and holds the row's SOP Instance UID;
- every instance ``storescu`` was answered success for is in the database (``storescu -v``'s log, file by file);
- no file in ``sr_dir`` without a row (pending or final), and, at every kill, no final SR file without its row.

Every other run also kills the worker process alone first (``serve`` restarts it and settles its files). Files a
PACS was not answered success for are sent again in the next burst, as a PACS retries. The delays come from
``random.Random(seed)``, so a failure reproduces with its seed, which is printed.

``tests/test_crash.py`` runs it three times; ``python -m cxr_triage.testing.crash --runs 20`` is the longer run
whose figures are in docs/RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cxr_triage.testing import peers, synthetic

KILL_WINDOW = 2.0
"""Seconds after a burst starts within which the kill falls: receiving 16 small instances and classifying them as
they come (chunks of 1 to 4 on the CPU) takes about 1.5 s on a loaded 2-core machine, so the kill lands anywhere
from the listener's first write to the recorder's last rename, or just after."""
SETTLE_TIMEOUT = 180.0
"""Seconds the last start gets to classify everything."""
_WORKER_READY = "taking jobs from the queue"
_WORKER_PID = re.compile(r"worker process cxr-worker-0 started \(pid (\d+)\)")
_SETTLED = re.compile(r"SR files left by a crash: (\d+) committed renamed into place, (\d+) never committed deleted")


@dataclass
class CrashReport:
    """What the runs did and found; ``problems`` is empty when every check held."""

    seed: int
    runs: int
    kills: int = 0
    worker_kills: int = 0
    sent: int = 0
    resent: int = 0
    acknowledged: int = 0
    instances: int = 0
    classified: int = 0
    pending_uncommitted: int = 0
    pending_committed: int = 0
    settled_renamed: int = 0
    settled_deleted: int = 0
    orphan_files: int = 0
    lost: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.runs} run(s), seed {self.seed}, {self.seconds:.0f} s: {self.kills} SIGKILLs of serve's process "
            f"group and {self.worker_kills} of its worker process alone; {self.sent} instances sent ({self.resent} "
            f"sent again after a kill cut their association), {self.acknowledged} acknowledged, {self.instances} in "
            f"the database, {self.classified} with exactly one prediction and one SR file; acknowledged but lost: "
            f"{self.lost}; orphan files (without a row) after recovery: {self.orphan_files}; left by the kills of the "
            f"group: {self.pending_uncommitted} SR file(s) written but not committed, {self.pending_committed} "
            "committed but not yet renamed; settled by recovery (start-ups and worker restarts): "
            f"{self.settled_deleted} deleted, {self.settled_renamed} renamed into place"
        )


def _config(workdir: Path, model: Path) -> tuple[Path, int]:
    from cxr_triage.core.config import load_config

    port = peers.free_port()
    values = {k: dict(v) for k, v in load_config(None, environ={}).values.items()}
    overrides = {
        "listener": {"ae_title": "CXR_TRIAGE", "host": "127.0.0.1", "port": port, "acse_timeout": 10},
        "storage": {
            "spool_dir": str(workdir / "spool"),
            "sr_dir": str(workdir / "sr"),
            "thumbnail_dir": str(workdir / "thumbnails"),
            "min_free_mb": 1,
        },
        "database": {"url": f"sqlite:///{workdir / 'db' / 'cxr.sqlite'}"},
        "model": {"path": str(model), "device": "cpu", "batch_size": 8},
        # max_attempts above the kills a run can land on one job (each run kills the group once and maybe a
        # worker): a start-up counts an earlier run's dead worker as an attempt (jobqueue.EARLIER_RUN_DIED), so with
        # the default 3 the harness's own kills could fail a job that is never at fault. The rule that fails a file
        # which crashes its worker on every attempt is tested in tests/test_recovery.py.
        "worker": {
            "processes": 1,
            "threads": 1,
            "poll_interval": 0.1,
            "claim_batch": 8,
            "study_quiet_seconds": 3600,
            "max_attempts": 10,
        },
    }
    for section, table in overrides.items():
        values.setdefault(section, {}).update(table)
    return peers.write_config(workdir / "cxr.toml", peers.gate_off(values)), port


def _burst(folder: Path, start: int, count: int) -> dict[Path, str]:
    """``count`` new instances (four per study) written to ``folder``: path -> SOP Instance UID."""
    from pydicom.uid import generate_uid

    made: dict[Path, str] = {}
    study = generate_uid()
    for index in range(start, start + count):
        if index % 4 == 0:
            study = generate_uid()
        ds = synthetic.chest_dataset(seed=index, StudyInstanceUID=study, InstanceNumber=index + 1)
        path = folder / f"{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        made[path] = str(ds.SOPInstanceUID)
    return made


def _storescu(port: int, paths: Sequence[Path], log: Path) -> subprocess.Popen[bytes]:
    argv = [peers.dcmtk_tool("storescu"), "-v", "-aet", "PACS", "-aec", "CXR_TRIAGE", "-to", "20", "-ta", "20"]
    argv += ["-td", "20", "127.0.0.1", str(port), *map(str, paths)]
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


def acknowledged_files(log_text: str) -> set[Path]:
    """The files ``storescu -v`` was answered success for."""
    current: Path | None = None
    acknowledged: set[Path] = set()
    for line in log_text.splitlines():
        if line.startswith("I: Sending file: "):
            current = Path(line[len("I: Sending file: ") :].strip())
        elif line.startswith("I: Received Store Response (Success)") and current is not None:
            acknowledged.add(current)
            current = None
    return acknowledged


def _log_text(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def _wait_for_worker(server: peers.Server, times: int) -> None:
    def ready() -> bool:
        if not server.alive():
            raise peers.PeerError(f"cxr-triage serve died:\n{peers.tail(server.log)}")
        return _log_text(server.log).count(_WORKER_READY) >= times

    peers.wait_until(ready, 120, "the worker process to take jobs", 0.1)


def _kill_group(server: peers.Server) -> None:
    assert server.proc is not None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(30)
    # serve's workers are in its process group; wait until none is left, so the restart finds them all dead
    peers.wait_until(lambda: not _group_alive(server.proc.pid), 30, "serve's process group to die", 0.05)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_worker(server: peers.Server, rng: random.Random) -> None:
    """SIGKILL the worker process alone, at a random point; serve restarts it."""
    found = _WORKER_PID.findall(_log_text(server.log))
    time.sleep(rng.uniform(0.0, KILL_WINDOW / 2))
    os.kill(int(found[-1]), signal.SIGKILL)
    _wait_for_worker(server, 2)


def _sr_state(sr_dir: Path, url: str) -> tuple[set[Path], set[Path], dict[str, str]]:
    """(final files, pending files, SR rows as SOP Instance UID -> path, with their heatmap objects) as they are
    now."""
    from sqlalchemy import select

    from cxr_triage.core import db
    from cxr_triage.outputs import srfiles

    every = {p for p in sr_dir.rglob("*") if p.is_file()} if sr_dir.exists() else set()
    pending = {p for p in every if p.parent.name == srfiles.PENDING_DIR}
    engine = db.make_engine(url)
    try:
        with db.read_session(engine) as session:
            query = select(db.SRDocument.sop_instance_uid, db.SRDocument.path)
            rows = {uid: path for uid, path in session.execute(query)}
            heatmaps = select(db.SRDocument.heatmap_sop_instance_uid, db.SRDocument.heatmap_path)
            rows.update({uid: path for uid, path in session.execute(heatmaps) if uid is not None})
    finally:
        engine.dispose()
    return every - pending, pending, rows


def _after_kill(report: CrashReport, sr_dir: Path, url: str, run: int) -> None:
    """What the kill left: no final file without its row; pending files counted (committed or not)."""
    finals, pending, rows = _sr_state(sr_dir, url)
    paths = {Path(p) for p in rows.values()}
    for path in sorted(finals - paths):
        report.problems.append(f"run {run}: SR file {path} without a row right after the kill")
    for path in pending:
        uid = path.name.partition("+")[0].removesuffix(".dcm")
        if uid in rows:
            report.pending_committed += 1
        else:
            report.pending_uncommitted += 1


def _drained(url: str) -> bool:
    from sqlalchemy import func, select

    from cxr_triage.core import db

    engine = db.make_engine(url)
    try:
        with db.read_session(engine) as session:
            busy = session.scalar(
                select(func.count()).select_from(db.Instance).where(db.Instance.status.in_([db.QUEUED, db.PROCESSING]))
            )
    finally:
        engine.dispose()
    return busy == 0


def _final_checks(report: CrashReport, sr_dir: Path, url: str, sent: dict[Path, str], acked: set[Path]) -> None:
    # One pass over the database and sr_dir, each finding a line of its own in ``problems``.
    import pydicom
    from sqlalchemy import select

    from cxr_triage.core import db

    engine = db.make_engine(url)
    try:
        with db.read_session(engine) as session:
            instances = session.execute(select(db.Instance.id, db.Instance.sop_instance_uid, db.Instance.status)).all()
            predictions = Counter(session.scalars(select(db.PredictionRecord.instance_id)).all())
            srs = session.execute(
                select(db.SRDocument.instance_id, db.SRDocument.sop_instance_uid, db.SRDocument.path)
            ).all()
    finally:
        engine.dispose()
    report.instances = len(instances)
    in_database = {uid for _, uid, _ in instances}
    for path in sorted(acked):
        if sent[path] not in in_database:
            report.problems.append(f"acknowledged but not in the database: {sent[path]} ({path.name})")
    per_instance = Counter(instance_id for instance_id, _, _ in srs)
    for instance_id, uid, status in instances:
        found = (status, predictions[instance_id], per_instance[instance_id])
        if found != (db.DONE, 1, 1):
            report.problems.append(f"instance {uid}: status {status}, {found[1]} prediction(s), {found[2]} SR row(s)")
    finals, pending, files_of_rows = _sr_state(sr_dir, url)  # the reports and their heatmap objects
    paths = {Path(path) for _, _, path in srs} | {Path(path) for path in files_of_rows.values()}
    orphans = sorted((finals | pending) - paths)
    report.orphan_files = len(orphans)
    report.problems += [f"file without a row: {path}" for path in orphans]
    good: set[int] = set()
    for instance_id, sr_uid, path in srs:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            report.problems.append(f"SR {sr_uid}: {path} unreadable: {type(exc).__name__}: {exc}")
            continue
        if str(ds.SOPInstanceUID) != sr_uid:
            report.problems.append(f"SR {sr_uid}: {path} holds {ds.SOPInstanceUID}")
        elif per_instance[instance_id] == 1 and predictions[instance_id] == 1:
            good.add(instance_id)
    report.classified = len(good)
    classified_uids = {uid for instance_id, uid, _ in instances if instance_id in good}
    report.lost = sum(1 for path in acked if sent[path] not in classified_uids)


def run_crashes(workdir: Path, runs: int, seed: int, burst: int = 16) -> CrashReport:
    """``runs`` bursts, each cut by a SIGKILL at a random point, then the last start and the checks (module
    docstring)."""
    # The whole scenario in one place: start, burst, kill (worker alone on odd runs, then serve), inspect; repeat.
    started = time.monotonic()
    rng = random.Random(seed)
    report = CrashReport(seed=seed, runs=runs)
    workdir.mkdir(parents=True, exist_ok=True)
    model = peers.make_tiny_checkpoint(workdir / "tiny.pt")
    config, port = _config(workdir, model)
    sr_dir, url = workdir / "sr", f"sqlite:///{workdir / 'db' / 'cxr.sqlite'}"
    inputs = workdir / "in"
    inputs.mkdir(exist_ok=True)
    sent: dict[Path, str] = {}
    acked: set[Path] = set()
    resend: list[Path] = []
    for run in range(runs):
        fresh = _burst(inputs, len(sent), burst)
        sent.update(fresh)
        paths = resend + list(fresh)
        report.sent += len(fresh)
        server = peers.Server(config, port, log=workdir / f"serve-{run}.log")
        server.__enter__()
        sender: subprocess.Popen[bytes] | None = None
        try:
            _wait_for_worker(server, 1)
            sender = _storescu(port, paths, workdir / f"storescu-{run}.log")
            if run % 2 == 1:
                _kill_worker(server, rng)
                report.worker_kills += 1
            time.sleep(rng.uniform(0.0, KILL_WINDOW))
            _kill_group(server)
            report.kills += 1
        finally:
            server.__exit__(None, None, None)
            if sender is not None:
                try:
                    sender.wait(60)
                except subprocess.TimeoutExpired:
                    sender.kill()
                    sender.wait(10)
        answered = acknowledged_files(_log_text(workdir / f"storescu-{run}.log"))
        acked |= answered
        resend = [path for path in paths if path not in acked]
        report.resent += len(resend)
        _after_kill(report, sr_dir, url, run)
    with peers.Server(config, port, log=workdir / "serve-last.log") as server:
        if resend:
            done = peers.storescu(port, resend)
            if done.returncode != 0:
                report.problems.append(f"the last resend failed ({done.returncode}): {done.stderr[-2000:]}")
            else:
                acked |= set(resend)
        peers.wait_until(lambda: _drained(url), SETTLE_TIMEOUT, "the queue to drain after the last start", 0.5)
    if server.returncode != 0:
        report.problems.append(f"the last serve exited with {server.returncode}: {peers.tail(server.log)}")
    report.acknowledged = len(acked)
    for log in workdir.glob("serve-*.log"):
        for renamed, deleted in _SETTLED.findall(_log_text(log)):
            report.settled_renamed += int(renamed)
            report.settled_deleted += int(deleted)
    _final_checks(report, sr_dir, url, sent, acked)
    report.seconds = time.monotonic() - started
    return report


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cxr_triage.testing.crash",
        description="Kill cxr-triage serve with SIGKILL at random points of bursts and check that nothing "
        "acknowledged is lost and no SR file is left without its database row.",
    )
    parser.add_argument("--runs", type=int, default=20, help="bursts, each cut by a SIGKILL (default: 20)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random delays (default: a new one)")
    parser.add_argument("--burst", type=int, default=16, help="new instances per burst (default: 16)")
    parser.add_argument("--workdir", default=None, help="folder to work in (default: a temporary one, removed)")
    options = parser.parse_args(args)
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"seed {seed}", flush=True)
    with contextlib.ExitStack() as stack:
        workdir = options.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="cxr-crash-"))
        report = run_crashes(Path(workdir), options.runs, seed, options.burst)
    print(report.summary())
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
