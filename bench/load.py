"""Load and soak: many concurrent associations in mixed transfer syntaxes against one `cxr-triage serve`.

Usage: ``python bench/load.py [--senders 16] [--per-sender 50] [--size 512] [--database sqlite|postgresql]
[--soak-minutes 10] [--rss-interval 30]``.

``--senders`` dcmtk ``storescu`` processes start at once, each sending ``--per-sender`` synthetic chest CRs
(``--size`` pixels a side, 12 bits stored) over one association. Each association carries five transfer syntaxes
in turn, each file sent as it is stored: Explicit and Implicit VR Little Endian, JPEG Lossless SV1 (encoded by
dcmtk's ``dcmcjpeg``), RLE Lossless and JPEG 2000 Lossless (one presentation context each, from a storescu
association profile, so that no file is converted on the way). The server
runs a tiny model with random weights (width 4), so the figures are those of the pipeline around the model:
listener, spool, queue, preprocessing (decoding included), SR and database (a typicality gate, where the release
has one, is off: the synthetic images are not chest radiographs to it). Its listener takes one association per
sender from 127.0.0.1 (``max_associations`` and ``max_connections_per_peer`` raised to ``--senders``).

Printed, from the database (never from the senders' exit statuses): whether every instance sent ended with a
result (its row ``done``, ``refused`` or ``failed``, and which), the transfer syntaxes received, the throughput
(instances from the first receipt to the last committed result), and the latency from acknowledgement to
committed result (p50, p95, max). With ``--soak-minutes M`` the same load is sent again and again (new UIDs each
round, each round once the previous one is finished) for M minutes, and the resident memory (RSS) of ``serve``'s
process tree (the listener process and its worker processes) is sampled every ``--rss-interval`` seconds: its
first and last samples, its least and greatest, and each round's figures. Exit status 1 when an instance sent
has no result. Asserts nothing else.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)
from sqlalchemy import select  # noqa: E402

from cxr_triage.core import db  # noqa: E402
from cxr_triage.testing import peers, synthetic  # noqa: E402

SYNTAXES = {
    "explicit": (str(ExplicitVRLittleEndian), "LittleEndianExplicit", "Explicit VR LE"),
    "implicit": (str(ImplicitVRLittleEndian), "LittleEndianImplicit", "Implicit VR LE"),
    "jpeg": (str(JPEGLosslessSV1), "JPEGLossless:Non-hierarchical-1stOrderPrediction", "JPEG Lossless SV1"),
    "rle": (str(RLELossless), "RLELossless", "RLE Lossless"),
    "j2k": (str(JPEG2000Lossless), "JPEG2000LosslessOnly", "JPEG 2000 Lossless"),
}
"""Each sender's files take these in turn: name -> (UID, dcmtk's name, name printed)."""
SYNTAX_NAMES = {uid: printed for uid, _, printed in SYNTAXES.values()}
PER_STUDY = 4


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_text() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


# --- inputs --------------------------------------------------------------------------------------------------


def templates(size: int, workdir: Path) -> dict[str, list[pydicom.Dataset]]:
    """Three chest images per transfer syntax of ``SYNTAXES``, encoded once."""
    made: dict[str, list[pydicom.Dataset]] = {}
    folder = workdir / "templates"
    folder.mkdir()
    for seed in range(3):
        base = synthetic.chest_dataset(size, size, seed=seed)
        made.setdefault("explicit", []).append(base)
        implicit = synthetic.chest_dataset(size, size, seed=seed)
        implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        made.setdefault("implicit", []).append(implicit)
        for name in ("jpeg", "rle", "j2k"):
            syntax = SYNTAXES[name][0]
            made.setdefault(name, []).append(_encoded(base, syntax, folder / f"{seed}-{name}"))
    return made


def association_profile(path: Path) -> Path:
    """A storescu association profile (``-xf PATH Mixed``): one presentation context per syntax of ``SYNTAXES``."""
    lines = ["[[TransferSyntaxes]]"]
    for name, (_, dcmtk_name, _) in SYNTAXES.items():
        lines += [f"[{name}]", f"TransferSyntax1 = {dcmtk_name}"]
    lines += ["[[PresentationContexts]]", "[Mixed]"]
    for number, name in enumerate(SYNTAXES, start=1):
        lines.append(f"PresentationContext{number} = ComputedRadiographyImageStorage\\{name}")
    lines += ["[[Profiles]]", "[Mixed]", "PresentationContexts = Mixed", ""]
    path.write_text("\n".join(lines))
    return path


def _encoded(ds: pydicom.Dataset, syntax: str, stem: Path) -> pydicom.Dataset:
    if syntax == JPEGLosslessSV1:  # pydicom has no JPEG Lossless encoder: dcmtk's, as a modality would
        source, target = stem.with_suffix(".src.dcm"), stem.with_suffix(".dcm")
        ds.save_as(source, enforce_file_format=True)
        subprocess.run([peers.dcmtk_tool("dcmcjpeg"), "+e1", str(source), str(target)], check=True, timeout=120)
        return pydicom.dcmread(target)
    copy = pydicom.dcmread(_saved(ds, stem.with_suffix(".src.dcm")))
    copy.compress(syntax)
    return copy


def _saved(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


@dataclass
class Round:
    """One round's files, per sender; every file's SOP Instance UID and the transfer syntax it is stored in."""

    folder: Path
    senders: list[list[Path]] = field(default_factory=list)
    uids: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> the transfer syntax it was sent in


def make_round(index: int, made: dict[str, list[pydicom.Dataset]], args: argparse.Namespace, root: Path) -> Round:
    """New instances (new UIDs, ``PER_STUDY`` per study) from the templates, written as files."""
    folder = root / f"round-{index:04d}"
    folder.mkdir()
    found = Round(folder)
    study = ""
    for sender in range(args.senders):
        paths = []
        for i in range(args.per_sender):
            kinds = list(SYNTAXES)
            ds = made[kinds[(i + sender) % len(kinds)]][i % 3]  # given new UIDs, then saved: reused
            if i % PER_STUDY == 0:
                study = generate_uid()
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
            ds.PatientID = f"LOAD-{index}-{sender}-{i // PER_STUDY}"
            ds.InstanceNumber = i + 1
            path = folder / f"{sender:02d}-{i:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            found.uids[str(ds.SOPInstanceUID)] = str(ds.file_meta.TransferSyntaxUID)
            paths.append(path)
        found.senders.append(paths)
    return found


# --- the server ----------------------------------------------------------------------------------------------


def tree_rss_mb(pid: int) -> dict[str, float]:
    """Resident memory (MiB) of ``pid`` (the listener process) and of each of its descendants, by a name: the
    worker processes by their pid, multiprocessing's resource tracker (Linux /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent and child not in tree]
        tree.update(children)
        frontier += children
    found: dict[str, float] = {}
    for member in sorted(tree):
        try:
            command = Path(f"/proc/{member}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        name = "resource tracker" if "resource_tracker" in command else f"worker {member}"
        name = "listener" if member == pid else name
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                found[name] = int(line.split()[1]) / 1024
    return found


class RSSSampler(threading.Thread):
    """Samples ``tree_rss_mb(pid)`` every ``interval`` seconds until stopped: (seconds since start, MiB by
    process)."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.halt = threading.Event()
        self.started_at = time.monotonic()

    def sample(self) -> None:
        self.samples.append((time.monotonic() - self.started_at, tree_rss_mb(self.pid)))

    def run(self) -> None:
        self.sample()
        while not self.halt.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self.halt.set()
        self.join(10)
        self.sample()


def send_round(found: Round, port: int, ae_title: str, profile: Path) -> tuple[float, list[int]]:
    """Every sender's storescu at once, one association each; (wall seconds, exit statuses)."""
    storescu = peers.dcmtk_tool("storescu")
    started = time.perf_counter()
    procs = []
    for sender, paths in enumerate(found.senders):
        argv = [storescu, "-xf", str(profile), "Mixed", "-aet", f"LOAD{sender:02d}", "-aec", ae_title, "-to", "60"]
        argv += ["-ta", "60"]
        argv += ["-td", "120", "127.0.0.1", str(port), *map(str, paths)]
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    codes = [p.wait(timeout=3600) for p in procs]
    return time.perf_counter() - started, codes


def round_rows(url: str, uids: dict[str, str]) -> list[Any]:
    """The instance rows of ``uids`` (in chunks: a long IN list is slow on SQLite)."""
    engine = db.make_engine(url, create_dirs=False)
    wanted = list(uids)
    rows: list[Any] = []
    try:
        with db.read_session(engine) as session:
            for start in range(0, len(wanted), 500):
                rows += session.execute(
                    select(
                        db.Instance.sop_instance_uid,
                        db.Instance.status,
                        db.Instance.transfer_syntax_uid,
                        db.Instance.received_at,
                        db.Instance.completed_at,
                    ).where(db.Instance.sop_instance_uid.in_(wanted[start : start + 500]))
                ).all()
    finally:
        engine.dispose()
    return rows


@dataclass
class RoundResult:
    sent: int
    send_s: float
    codes: list[int]
    statuses: Counter[str]
    syntaxes: Counter[str]
    missing: int
    span_s: float
    latencies: list[float]
    wall_s: float  # from the first storescu's start to the last result

    @property
    def ended(self) -> int:
        return sum(n for status, n in self.statuses.items() if status in db.TERMINAL_STATES)


@dataclass(frozen=True)
class Target:
    """The server under load: where to send, with which association profile, and its database."""

    port: int
    url: str
    profile: Path
    timeout: float
    ae_title: str = "CXR_TRIAGE"


def run_round(found: Round, target: Target) -> RoundResult:
    """Send the round, then wait (up to ``target.timeout``) until each of its instances has ended; its figures."""
    started = time.perf_counter()
    send_s, codes = send_round(found, target.port, target.ae_title, target.profile)
    url, timeout = target.url, target.timeout

    def finished() -> list[Any] | None:
        rows = round_rows(url, found.uids)
        ended = [r for r in rows if r.status in db.TERMINAL_STATES]
        return rows if len(ended) >= len(found.uids) else None

    try:
        rows = peers.wait_until(finished, timeout, "every result of the round", 0.5)
    except TimeoutError:
        rows = round_rows(url, found.uids)
    wall_s = time.perf_counter() - started
    done = [r for r in rows if r.completed_at is not None]
    span = (max(r.completed_at for r in done) - min(r.received_at for r in done)).total_seconds() if done else 0.0
    return RoundResult(
        sent=len(found.uids),
        send_s=send_s,
        codes=codes,
        statuses=Counter(r.status for r in rows),
        syntaxes=Counter(SYNTAX_NAMES.get(r.transfer_syntax_uid, r.transfer_syntax_uid) for r in rows),
        missing=len(found.uids) - len(rows),
        span_s=span,
        latencies=[(r.completed_at - r.received_at).total_seconds() for r in done],
        wall_s=wall_s,
    )


def report_round(name: str, result: RoundResult) -> None:
    lat = result.latencies
    print(
        f"{name}: {result.ended} of {result.sent} instances ended with a result "
        f"({dict(sorted(result.statuses.items()))}, never received: {result.missing}); storescu exit statuses "
        f"{sorted(set(result.codes))}, all sent in {result.send_s:.1f} s"
    )
    if lat:
        print(
            f"{name}: throughput {len(lat) / result.span_s:.1f} instances/s from the first receipt to the last "
            f"committed result ({result.span_s:.1f} s); {result.sent / result.wall_s:.1f} instances/s by the wall "
            f"clock from the first sender's start; latency acknowledgement -> committed result p50 "
            f"{percentile(lat, 50):.2f} s, p95 {percentile(lat, 95):.2f} s, max {max(lat):.2f} s (all sent at once)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", type=int, default=16, help="concurrent associations (default 16)")
    parser.add_argument("--per-sender", type=int, default=50, help="instances per association (default 50)")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each image (default 512)")
    parser.add_argument("--workers", default="auto", help="[worker] processes of the server (default auto)")
    parser.add_argument(
        "--database", choices=["sqlite", "postgresql"], default="sqlite", help="SQLite file or a throwaway cluster"
    )
    parser.add_argument("--soak-minutes", type=float, default=0.0, help="send the load again and again this long")
    parser.add_argument("--rss-interval", type=float, default=30.0, help="seconds between RSS samples (default 30)")
    parser.add_argument("--timeout", type=float, default=1800, help="deadline for one round's results, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="cxr-load-"))
    try:
        if args.database == "postgresql":
            with peers.PostgresCluster() as cluster:
                return run(args, workdir, cluster.url)
        return run(args, workdir, f"sqlite:///{workdir / 'load.sqlite'}")
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, workdir: Path, url: str) -> int:
    # One run read top to bottom: inputs, server, first round, soak rounds, memory; split, it would read worse.
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, load average {load_text()} at start; "
        f"python {platform.python_version()}, numpy {np.__version__}, pydicom {pydicom.__version__}"
    )
    started = time.perf_counter()
    made = templates(args.size, workdir)
    rounds_dir = workdir / "rounds"
    rounds_dir.mkdir()
    first = make_round(0, made, args, rounds_dir)
    sizes = [p.stat().st_size for paths in first.senders for p in paths]
    print(
        f"load: {args.senders} concurrent associations x {args.per_sender} instances = {len(first.uids)} CR "
        f"{args.size}x{args.size} (12 bits stored), {sum(sizes) / 1e6:.0f} MB a round; each association sends "
        f"{', '.join(name for *_, name in SYNTAXES.values())} in turn, as stored (generated in "
        f"{time.perf_counter() - started:.1f} s)"
    )
    model = peers.make_tiny_checkpoint(workdir / "tiny.pt", version="load-tiny")
    port = peers.free_port()
    workers: int | str = int(args.workers) if str(args.workers).isdigit() else args.workers
    sections = {
        "listener": {
            "host": "127.0.0.1",
            "port": port,
            "max_associations": args.senders + 2,
            "max_connections_per_peer": args.senders + 2,
        },
        "storage": {"spool_dir": str(workdir / "spool"), "sr_dir": str(workdir / "sr"), "min_free_mb": 1},
        "database": {"url": url},
        "model": {"path": str(model), "device": "cpu"},
        "worker": {"processes": workers, "study_quiet_seconds": 5},
    }
    config = peers.write_config(workdir / "load.toml", peers.gate_off(sections))
    target = Target(port, url, association_profile(workdir / "storescu.cfg"), args.timeout)
    database = "SQLite (WAL)" if url.startswith("sqlite") else "PostgreSQL (throwaway cluster, fsync off)"
    print(f"server: {database}, [worker] processes {workers}, tiny model with random weights (width 4), SRs on")
    with peers.Server(config, port, log=workdir / "serve.log", ready_timeout=120) as server:
        assert server.proc is not None
        expected = _worker_count(server.log)
        peers.wait_until(
            lambda: (
                server.log.read_text(errors="replace").count("taking jobs from the queue") >= expected
                or not server.alive()
            ),
            300,
            "the workers to load the model",
        )
        sampler = RSSSampler(server.proc.pid, args.rss_interval)
        sampler.start()
        result = run_round(first, target)
        shutil.rmtree(first.folder, ignore_errors=True)
        print(f"syntaxes received: {dict(sorted(result.syntaxes.items()))}")
        report_round("round 1", result)
        results = [result]
        soak_end = time.monotonic() + args.soak_minutes * 60
        index = 1
        while time.monotonic() < soak_end and server.alive():
            found = make_round(index, made, args, rounds_dir)
            index += 1
            results.append(run_round(found, target))
            shutil.rmtree(found.folder, ignore_errors=True)
            report_round(f"round {index}", results[-1])
        sampler.stop()
        alive = server.alive()
    return _report_totals(args, results, sampler, alive, server.returncode)


def _worker_count(log: Path) -> int:
    """The number of worker processes ``serve`` says it starts (its layout line)."""

    def counted() -> tuple[int] | None:
        for line in log.read_text(errors="replace").splitlines():
            if " worker process(es), " in line:
                return (int(line.split(" worker process(es), ")[0].rsplit(" ", 1)[1]),)
            if "[worker] processes = 0" in line:
                return (0,)
        return None

    return peers.wait_until(counted, 60, "the worker layout line")[0]


def _report_totals(
    args: argparse.Namespace, results: list[RoundResult], sampler: RSSSampler, alive: bool, code: int | None
) -> int:
    sent = sum(r.sent for r in results)
    ended = sum(r.ended for r in results)
    statuses: Counter[str] = sum((r.statuses for r in results), Counter())
    if args.soak_minutes:
        lat = [x for r in results for x in r.latencies]
        span = sum(r.wall_s for r in results)
        print(
            f"soak: {len(results)} rounds in {span / 60:.1f} min, {ended} of {sent} instances ended with a result "
            f"({dict(sorted(statuses.items()))}); {sent / span:.1f} instances/s over the whole soak; latency p50 "
            f"{percentile(lat, 50):.2f} s, p95 {percentile(lat, 95):.2f} s; the server was "
            f"{'still running' if alive else 'DEAD'} at the end"
        )
    samples = sampler.samples
    if samples:
        (t0, first), (t1, last) = samples[0], samples[-1]
        totals = [sum(by_process.values()) for _, by_process in samples]
        every = ", ".join(f"{t / 60:.1f} min {total:.0f}" for (t, _), total in zip(samples, totals, strict=True))
        print(
            f"RSS of serve's process tree ({len(first)} processes): {totals[0]:.0f} MiB at the start (workers "
            f"ready, before the first round), {totals[-1]:.0f} MiB at the end ({(t1 - t0) / 60:.1f} min later, "
            f"{len(last)} processes); least {min(totals):.0f}, greatest {max(totals):.0f} MiB"
        )
        names = sorted(set(first) | set(last))
        print(
            "RSS by process, start -> end: "
            + ", ".join(f"{name} {first.get(name, 0):.0f} -> {last.get(name, 0):.0f} MiB" for name in names)
        )
        print(f"RSS samples (every {args.rss_interval:g} s): {every}")
    print(f"load average at the end: {load_text()}; serve exit status {code}")
    lost = sent - ended
    print(f"instances sent without a result: {lost}")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
