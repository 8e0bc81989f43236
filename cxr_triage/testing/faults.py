"""A PostgreSQL outage under a sending PACS: a real ``cxr-triage serve`` (a throwaway PostgreSQL cluster, a tiny
random model, one worker process) receives from dcmtk's ``storescu``; the database server is stopped (fast
shutdown: its connections are cut) for ``down_seconds`` while ``storescu`` keeps sending new instances, then
started again. Files not answered success are sent again, as a PACS retries, until each is; then the checks:

- every C-STORE answered during the outage got a status, and which statuses (``0xA701``, refused: out of
  resources, the instance could not be recorded) are counted;
- nothing answered success is lost: every acknowledged instance ends ``done`` with one prediction and one SR row;
- the spool holds no file without a row, and the worker process was not restarted (it waited, with back-off);
- how long after the restart the first retry was accepted and the last result committed.

``tests/test_faults.py`` runs it with a 10-second outage; ``python -m cxr_triage.testing.faults`` runs the 30-second
outage whose figures are in docs/RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cxr_triage.testing import peers, synthetic

SETTLE_TIMEOUT = 180.0
"""Seconds after the restart within which every retry must be accepted and every result committed."""
_STATUS = re.compile(r"^I: Received Store Response \((?P<text>[^)]*)\)")
_SENDING = "I: Sending file: "
_WORKER_READY = "taking jobs from the queue"


@dataclass
class OutageReport:
    """What the outage did and what was found; ``problems`` is empty when every check held."""

    down_seconds: float
    sent: int = 0
    during: Counter[str] = field(default_factory=Counter)
    """storescu's text of each response during the outage (e.g. ``Refused: OutOfResources``): count."""
    during_codes: Counter[str] = field(default_factory=Counter)
    """The listener's DIMSE statuses of its refusals from the outage until every file was accepted again, from its
    log: count (the first retries after the restart may be refused too: ``refused_after_restart``)."""
    refused_after_restart: int = 0
    unanswered: int = 0
    """C-STOREs during the outage that got no response at all."""
    resent: int = 0
    first_accept_s: float | None = None
    """Seconds from the restart to the start of the first retry that was accepted."""
    caught_up_s: float | None = None
    acknowledged: int = 0
    done: int = 0
    lost: int = 0
    orphan_spool_files: int = 0
    worker_restarts: int = 0
    error_lines: int = 0
    listener_error_lines: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        during = ", ".join(f"{n} x {text}" for text, n in sorted(self.during.items())) or "none"
        return (
            f"PostgreSQL down {self.down_seconds:.0f} s: {self.sent} instances sent; answered during the outage: "
            f"{during} (listener statuses {dict(sorted(self.during_codes.items()))}), {self.unanswered} without a "
            f"response; {self.resent} sent again after the restart (the first retry accepted was sent "
            f"{self.first_accept_s or 0:.1f} s after it), every result committed {self.caught_up_s or 0:.1f} s "
            f"after it; {self.acknowledged} acknowledged, {self.done} done with one prediction and one SR, lost "
            f"{self.lost}; spool files without a row {self.orphan_spool_files}; worker restarts "
            f"{self.worker_restarts}; ERROR records in serve's log {self.error_lines}, the "
            f"listener's {self.listener_error_lines}"
        )


def _config(workdir: Path, model: Path, url: str) -> tuple[Path, int]:
    port = peers.free_port()
    sections = {
        "listener": {"ae_title": "CXR_TRIAGE", "host": "127.0.0.1", "port": port},
        "storage": {
            "spool_dir": str(workdir / "spool"),
            "sr_dir": str(workdir / "sr"),
            "thumbnail_dir": str(workdir / "thumbnails"),
            "min_free_mb": 1,
        },
        "database": {"url": url},
        "model": {"path": str(model), "device": "cpu", "batch_size": 8},
        "worker": {"processes": 1, "threads": 1, "poll_interval": 0.2, "claim_batch": 8, "study_quiet_seconds": 1},
    }
    return peers.write_config(workdir / "cxr.toml", peers.gate_off(sections)), port


class Inputs:
    """New synthetic instances on demand (two per study), each in its own file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.uids: dict[Path, str] = {}
        self._study = ""

    def new(self, count: int) -> list[Path]:
        from pydicom.uid import generate_uid

        made = []
        for _ in range(count):
            index = len(self.uids)
            if index % 2 == 0:
                self._study = generate_uid()
            ds = synthetic.chest_dataset(seed=index, StudyInstanceUID=self._study, InstanceNumber=index + 1)
            path = self.folder / f"{index:05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            self.uids[path] = str(ds.SOPInstanceUID)
            made.append(path)
        return made


def responses(log_text: str) -> dict[Path, str]:
    """``storescu -v``'s log: each file sent -> the text of its response (absent: no response came)."""
    current: Path | None = None
    found: dict[Path, str] = {}
    for line in log_text.splitlines():
        if line.startswith(_SENDING):
            current = Path(line[len(_SENDING) :].strip())
        elif (match := _STATUS.match(line)) and current is not None:
            found[current] = match["text"]
            current = None
    return found


def store(port: int, paths: Sequence[Path], log: Path) -> dict[Path, str]:
    """Send ``paths`` in one association (``-nh``: go on after a failure); each file's response."""
    argv = [peers.dcmtk_tool("storescu"), "-v", "-nh", "-aet", "PACS", "-aec", "CXR_TRIAGE", "-to", "20"]
    argv += ["-ta", "20", "-td", "20", "127.0.0.1", str(port), *map(str, paths)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    log.write_text(done.stdout + done.stderr)
    return responses(done.stdout + done.stderr)


_RECORDING_BACK = re.compile(
    r"recording received instances in the database \(answered 0xA701\) works again after (\d+)"
)


def _listener_codes(log_text: str) -> Counter[str]:
    """The listener's failure statuses, from its log: each refusal of a full spool has its line; refusals for want
    of the database are counted in the one line that says it works again."""
    codes: Counter[str] = Counter()
    codes["0xA701"] = sum(int(match) for match in _RECORDING_BACK.findall(log_text))
    codes["0xA700"] = log_text.count("cannot write SOP instance")
    return +codes


def _database_state(url: str) -> tuple[dict[str, tuple[str, int, int]], set[str]]:
    """SOP Instance UID -> (status, predictions, SR rows), and every spool path the database knows."""
    from sqlalchemy import func, select

    from cxr_triage.core import db

    engine = db.make_engine(url)
    try:
        with db.read_session(engine) as session:
            predictions = dict(
                session.execute(
                    select(db.PredictionRecord.instance_id, func.count()).group_by(db.PredictionRecord.instance_id)
                ).all()
            )
            srs = dict(
                session.execute(
                    select(db.SRDocument.instance_id, func.count()).group_by(db.SRDocument.instance_id)
                ).all()
            )
            rows = session.execute(
                select(db.Instance.id, db.Instance.sop_instance_uid, db.Instance.status, db.Instance.spool_path)
            ).all()
    finally:
        engine.dispose()
    state = {uid: (status, int(predictions.get(i, 0)), int(srs.get(i, 0))) for i, uid, status, _ in rows}
    return state, {str(Path(path).resolve()) for *_, path in rows}


def run_outage(workdir: Path, down_seconds: float, before: int = 6, per_send: int = 2) -> OutageReport:
    """The scenario of the module docstring; ``before`` instances are sent and classified before the outage,
    ``per_send`` new ones per association during it."""
    # One scenario read top to bottom (start, send, outage, restart, retries, checks): split, it would read worse.
    from cxr_triage.core import db

    report = OutageReport(down_seconds=down_seconds)
    workdir.mkdir(parents=True, exist_ok=True)
    model = peers.make_tiny_checkpoint(workdir / "tiny.pt")
    inputs = Inputs(workdir / "in")
    acked: set[Path] = set()
    logs = workdir / "storescu"
    logs.mkdir(exist_ok=True)
    with peers.PostgresCluster() as cluster:
        config, port = _config(workdir, model, cluster.url)
        peers.cli("db", "upgrade", config=config)
        with peers.Server(config, port, log=workdir / "serve.log") as server:
            peers.wait_until(lambda: _WORKER_READY in server.log.read_text(errors="replace"), 120, "the worker")
            first = inputs.new(before)
            answered = store(port, first, logs / "before.log")
            acked |= {p for p, text in answered.items() if text == "Success"}
            peers.wait_until(lambda: _all_done(cluster.url, inputs, acked), 120, "the first results", 0.2)

            mark = len(server.log.read_bytes())
            cluster.stop_server()
            stopped = time.monotonic()
            round_ = 0
            while time.monotonic() - stopped < down_seconds:
                paths = inputs.new(per_send)
                answered = store(port, paths, logs / f"during-{round_}.log")
                round_ += 1
                report.during.update(answered.values())
                report.unanswered += len(paths) - len(answered)
                acked |= {p for p, text in answered.items() if text == "Success"}
                time.sleep(0.5)
            cluster.start_server()
            restarted = time.monotonic()

            attempt = 0
            while len(acked) < len(inputs.uids) and time.monotonic() - restarted < SETTLE_TIMEOUT:
                waiting = [p for p in inputs.uids if p not in acked]
                report.resent += len(waiting)
                sent_at = time.monotonic() - restarted
                answered = store(port, waiting, logs / f"retry-{attempt}.log")
                attempt += 1
                newly = {p for p, text in answered.items() if text == "Success"}
                report.refused_after_restart += len(answered) - len(newly)
                if newly and report.first_accept_s is None:
                    report.first_accept_s = sent_at
                acked |= newly
                if len(acked) < len(inputs.uids):
                    time.sleep(1.0)  # a PACS waits before it retries
            report.during_codes = _listener_codes(server.log.read_bytes()[mark:].decode(errors="replace"))
            try:
                peers.wait_until(lambda: _all_done(cluster.url, inputs, acked), SETTLE_TIMEOUT, "every result", 0.2)
                report.caught_up_s = time.monotonic() - restarted
            except TimeoutError as exc:
                report.problems.append(str(exc))
        log_text = server.log.read_text(errors="replace")
        state, spooled = _database_state(cluster.url)
    report.sent = len(inputs.uids)
    report.acknowledged = len(acked)
    report.worker_restarts = log_text.count("; restarting")
    report.error_lines = sum(1 for line in log_text.splitlines() if " ERROR " in line)
    report.listener_error_lines = sum(1 for line in log_text.splitlines() if " ERROR " in line and ".listener" in line)
    for path in sorted(acked):
        found = state.get(inputs.uids[path])
        if found == (db.DONE, 1, 1):
            report.done += 1
        else:
            report.lost += 1
            report.problems.append(f"acknowledged {path.name} ({inputs.uids[path]}): {found}")
    if len(acked) < len(inputs.uids):
        report.problems.append(f"{len(inputs.uids) - len(acked)} instance(s) never accepted after the restart")
    spool_files = {str(p.resolve()) for p in (workdir / "spool").rglob("*.dcm")}
    report.orphan_spool_files = len(spool_files - spooled)
    if report.orphan_spool_files:
        report.problems.append(f"{report.orphan_spool_files} spool file(s) without a row")
    if report.unanswered:
        report.problems.append(f"{report.unanswered} C-STORE(s) during the outage got no response")
    if report.worker_restarts:
        report.problems.append(f"the worker process was restarted {report.worker_restarts} time(s)")
    if server.returncode != 0:
        report.problems.append(f"serve exited with {server.returncode}")
    return report


def _all_done(url: str, inputs: Inputs, acked: set[Path]) -> bool:
    from sqlalchemy.exc import OperationalError

    from cxr_triage.core import db

    try:
        state, _ = _database_state(url)
    except OperationalError:  # the database is still starting
        return False
    return all(state.get(inputs.uids[p], ("",))[0] == db.DONE for p in acked)


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cxr_triage.testing.faults",
        description="Stop the PostgreSQL server under a running cxr-triage serve while a PACS sends, start it "
        "again, and check that the listener answered a status the PACS retries and that everything catches up.",
    )
    parser.add_argument("--down", type=float, default=30.0, help="seconds the database is down (default: 30)")
    parser.add_argument("--workdir", default=None, help="folder to work in (default: a temporary one, removed)")
    options = parser.parse_args(args)
    with contextlib.ExitStack() as stack:
        workdir = options.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="cxr-faults-"))
        started = time.monotonic()
        report = run_outage(Path(workdir), options.down)
    print(f"{report.summary()} ({time.monotonic() - started:.0f} s in all)")
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
