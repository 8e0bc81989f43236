"""Side-by-side throughput of DICOM receivers: dcmtk and Orthanc as anchors, then cxr-triage, in one run.

Usage: ``python bench/peers.py [--images 48] [--senders 4] [--size 2048] [--single 8] [--studies 8]
[--model FILE] [--workers auto|N] [--device auto|cpu|cuda] [--timeout 1800] [--keep]``.

Orthanc and dcmtk's ``storescp`` bind every interface, so the bench re-runs itself in a private network
namespace holding only a loopback interface (``cxr_triage.testing.peers.netns_command``, as the Orthanc tests
do); all traffic is on that namespace's 127.0.0.1.

``--images`` synthetic frontal chest CRs (``--size`` x ``--size``, 16 bits allocated, 12 stored, Explicit VR
Little Endian, spread over ``--studies`` studies) are generated once, then sent by ``--senders`` concurrent dcmtk
``storescu`` processes to each receiver in turn, each started fresh with an empty store:

- ``storescp --fork`` (dcmtk): one child process per association, each file written to a folder (store only);
- Orthanc (store + index, its default SQLite index, no compression, no plugins);
- ``cxr-triage serve`` with ``[worker] processes = 0`` (ingest only: receive, spool, queue row; nothing
  classified);
- ``cxr-triage serve`` with ``[worker] processes = --workers`` (default ``auto``, as the product's default: from
  the cores; the table says how many processes and model threads the server chose) and the model (default: the
  shipped model), measured until every result and its Structured Report are committed (SRs forwarded nowhere).

For each: instances per second (the store-only receivers and the ingest-only server: instances over the
senders' wall clock, first association to last acknowledgement; the whole pipeline: instances over the time
from the senders' start to the last ``completed_at`` in the database), CPU milliseconds per image (user + system
time of the receiver's whole process tree, its reaped children included, from ``/proc``, over the burst: the
listener, the worker processes and storescp's forked children), and the rate as a percentage of Orthanc's in the
same run. What each receiver recorded is checked (files written, Orthanc's ``/statistics``, the database's rows
and SRs): storescu can exit 0 after failed stores.

Then ``--single`` further images are sent one at a time to the idle whole-pipeline server: acknowledgement to
committed result (the database's ``received_at`` to ``completed_at``), p50, p95 and max.

Then cxr-triage's CPU per image by stage, measured in this process on the same images, one stage after the other
(``time.process_time``: every thread of this process), by calling the product's own functions in the order the
server runs them, after a warm-up image: receive (the product's ``Listener``, fed by the same senders, with its
``Receiver.store`` answering success at once: pynetdicom and the listener's event handlers, less the C-STORE
handler's own time, which is the next row: its parse of the dataset and its sha256, timed on the association's
thread); spool write (``files.write_atomic``, as called by ``Receiver.store``); the listener's database insert
(the rest of ``Receiver.store``: the duplicate check and ``jobqueue.enqueue``); the worker's queue claim;
preprocessing (``pipeline.preprocess``: read, checks, the model's input, the worklist thumbnail's PNG); model
(``pipeline.classify``: ``Predictor`` at the server's ``[model] batch_size`` on as many threads as each of the
server's workers had, chunks as the worker makes them); then the worker's recorder (``Recorder.record``), split
into SR build (``Recorder.write_srs`` less its file writes: building and encoding the reports), SR write (its
``files.write_atomic`` and folder fsyncs), thumbnail write, database commit (``Recorder.commit``: predictions,
SR rows, forwards, study priorities) and the rest of ``record``; and forward (``forward.process_due``: reading
the SR files and sending them with ``scu.send_datasets`` to a dcmtk ``storescp``, then recording the results).
Wall-clock milliseconds are printed beside the CPU (they include fsync waits). The sums of the stages are printed
beside the serve runs' CPU.

Targets, printed beside the figures with met / not met (never asserted): ingest-only CPU per image <= Orthanc's
in the same run; the whole pipeline with the shipped model >= 15 instances/s, i.e. >= 45 % of Orthanc's
store-only rate in the same run; a lone image on the idle server, acknowledgement to committed result p95 <=
250 ms. Also printed: the machine (CPU model, logical CPUs, load averages before and after). Prints figures;
asserts nothing; exits 1 only when a receiver did not record every instance.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import io
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from cxr_triage.testing import peers  # the standard library only: cheap before the re-run

if __name__ == "__main__" and not peers.in_private_netns():
    # storescp and Orthanc bind every interface: run again in a network of our own, before the heavy imports.
    command = peers.netns_command([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]])
    sys.exit(subprocess.run(command, check=False).returncode)

# As the server's worker processes do (cxr_triage.worker.quiet_openmp_threads), before torch is loaded: idle
# OpenMP threads would otherwise spin and bill the stages after the model for the model's threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import listener as server_bench  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402
from sqlalchemy import select  # noqa: E402

from cxr_triage import BUNDLED_MODEL, files  # noqa: E402
from cxr_triage.core import db  # noqa: E402
from cxr_triage.core.settings import Settings, load_settings  # noqa: E402
from cxr_triage.dicom.listener import STATUS_SUCCESS, Listener, make_receiver  # noqa: E402
from cxr_triage.ml.checkpoint import load_classifier, resolve_model_path  # noqa: E402
from cxr_triage.ml.inference import pick_device  # noqa: E402
from cxr_triage.ml.precision import resolve_precision  # noqa: E402
from cxr_triage.outputs import forward  # noqa: E402
from cxr_triage.queue import jobqueue, spool  # noqa: E402
from cxr_triage.testing import synthetic  # noqa: E402
from cxr_triage.triage import pipeline, worker  # noqa: E402

TARGET_RATE = 15.0
"""Instances per second the whole pipeline should reach with the shipped model."""
TARGET_SHARE_OF_ORTHANC = 0.45
"""The same target relative to Orthanc's store-only rate in the same run."""
TARGET_LONE_P95_MS = 250.0
"""Acknowledgement to committed result, p95, of a lone image on an idle server."""

RECEIVE = "receive"
PARSE = "C-STORE handler (parse, sha256)"
SPOOL = "spool write"
INSERT = "database insert (listener)"
CLAIM = "queue claim"
PREPROCESS = "preprocessing"
MODEL = "model"
SR_BUILD = "SR build"
SR_WRITE = "SR write"
THUMBNAIL = "thumbnail write"
COMMIT = "database commit"
RECORDER_REST = "recorder, rest of record()"
FORWARD = "forward"
STAGES = (RECEIVE, PARSE, SPOOL, INSERT, CLAIM, PREPROCESS, MODEL, SR_BUILD, SR_WRITE, THUMBNAIL, COMMIT)
STAGES += (RECORDER_REST, FORWARD)
INGEST_STAGES = (RECEIVE, PARSE, SPOOL, INSERT)
FILE_WRITES_OF = {INSERT: SPOOL, SR_BUILD: SR_WRITE}
"""Stages whose ``files.write_atomic`` and ``files.fsync_dir`` calls are a stage of their own."""


# --------------------------------------------------------------------------------------------- measuring


def tree_cpu(root: int) -> float:
    """CPU seconds of process ``root`` and all its live descendants: user + system, each one's own and its reaped
    children's (``/proc/PID/stat`` utime, stime, cutime, cstime)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    seconds: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        seconds[pid] = sum(int(f) for f in fields[11:15]) / tick
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, parent in parents.items():
        children[parent].append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += seconds.get(pid, 0.0)
        todo += children.get(pid, [])
    return total


def settle(pid: int, timeout: float = 15.0) -> None:
    """Wait (at most ``timeout`` seconds) until ``pid``'s process tree is idle, its start-up work done: under
    20 ms of CPU in half a second."""
    deadline, last = time.monotonic() + timeout, tree_cpu(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = tree_cpu(pid)
        if now - last < 0.02:
            return
        last = now


class StageClock:
    """CPU (``time.process_time``) and wall seconds per named stage; a stage entered inside another is taken out
    of the outer one's time."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = collections.defaultdict(float)
        self.wall: dict[str, float] = collections.defaultdict(float)
        self.stack: list[str] = []

    def reset(self) -> None:
        self.cpu.clear()
        self.wall.clear()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        cpu, wall = time.process_time(), time.perf_counter()
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()
            spent_cpu, spent_wall = time.process_time() - cpu, time.perf_counter() - wall
            self.cpu[name] += spent_cpu
            self.wall[name] += spent_wall
            if self.stack:
                self.cpu[self.stack[-1]] -= spent_cpu
                self.wall[self.stack[-1]] -= spent_wall

    def timed(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """``function`` run as stage ``name``."""

        def run(*args: Any, **kwargs: Any) -> Any:
            with self.stage(name):
                return function(*args, **kwargs)

        return run

    @contextlib.contextmanager
    def file_writes(self) -> Iterator[None]:
        """While active, ``files.write_atomic``, ``write_synced`` and ``fsync_dir`` called inside a stage of
        ``FILE_WRITES_OF`` count as that stage's file-write stage (the product calls them as ``files.NAME``)."""
        originals = {name: getattr(files, name) for name in ("write_atomic", "write_synced", "fsync_dir")}

        def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
            def run(*args: Any, **kwargs: Any) -> Any:
                inner = FILE_WRITES_OF.get(self.stack[-1]) if self.stack else None
                if inner is None:
                    return original(*args, **kwargs)
                with self.stage(inner):
                    return original(*args, **kwargs)

            return run

        for name, original in originals.items():
            setattr(files, name, wrap(original))
        try:
            yield
        finally:
            for name, original in originals.items():
                setattr(files, name, original)


# --------------------------------------------------------------------------------------------- receivers


@dataclasses.dataclass
class ReceiverRun:
    """One receiver's burst: seconds (see the module docstring), CPU seconds of its process tree, and how many of
    the instances it recorded."""

    name: str
    seconds: float
    cpu_s: float
    recorded: int
    expected: int
    codes: list[int]
    detail: str = ""

    @property
    def rate(self) -> float:
        return self.expected / self.seconds if self.seconds > 0 else float("nan")

    @property
    def cpu_ms(self) -> float:
        return self.cpu_s * 1000.0 / self.expected


class ForkingStorescp:
    """dcmtk's ``storescp --fork`` writing every instance to ``directory`` (binds every interface: run in a private
    network namespace only)."""

    def __init__(self, directory: Path, port: int, ae_title: str = "STORESCP") -> None:
        self.directory = directory
        self.port = port
        self.ae_title = ae_title
        self.log = directory.parent / "storescp-fork.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ForkingStorescp:
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [peers.dcmtk_tool("storescp"), "--fork", "-aet", self.ae_title, "-od", str(self.directory)]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([*argv, str(self.port)], stdout=log, stderr=subprocess.STDOUT)
        try:
            peers.wait_for_port(self.port, 30, "storescp --fork", self.proc)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            peers.terminate(self.proc, timeout=5)

    def received(self) -> int:
        return sum(1 for p in self.directory.iterdir() if p.is_file())


def burst(
    name: str, pid: int, port: int, ae_title: str, files_: list[Path], senders: int, recorded: Callable[[], int]
) -> ReceiverRun:
    """Send the burst to a receiver that is done with an instance once it has acknowledged it."""
    settle(pid)
    before = tree_cpu(pid)
    seconds, codes = server_bench.send(files_, senders, port, ae_title)
    with contextlib.suppress(TimeoutError):  # a shortfall is reported, not raised
        peers.wait_until(lambda: recorded() >= len(files_), 30, f"{name} to record the burst", 0.05)
    cpu = tree_cpu(pid) - before
    return ReceiverRun(name, seconds, cpu, recorded(), len(files_), codes)


def run_storescp(workdir: Path, files_: list[Path], senders: int) -> ReceiverRun:
    with ForkingStorescp(workdir / "storescp" / "files", peers.free_port()) as scp:
        assert scp.proc is not None
        return burst("storescp", scp.proc.pid, scp.port, scp.ae_title, files_, senders, scp.received)


def run_orthanc(workdir: Path, files_: list[Path], senders: int) -> ReceiverRun:
    dicom_port, http_port = peers.free_ports(2)
    with peers.Orthanc(workdir / "orthanc", dicom_port, http_port) as orthanc:
        assert orthanc.proc is not None

        def recorded() -> int:
            return int(orthanc.get("/statistics")["CountInstances"])

        return burst("Orthanc", orthanc.proc.pid, dicom_port, orthanc.ae_title, files_, senders, recorded)


@dataclasses.dataclass(frozen=True)
class ServeSetup:
    """The configuration of one ``cxr-triage serve`` run, in its own folder."""

    config: Path
    port: int
    url: str
    settings: Settings


def serve_setup(
    folder: Path, model_path: Path, device: str, workers: int | str, forward_to: tuple[str, int] | None = None
) -> ServeSetup:
    folder.mkdir(parents=True)
    port = peers.free_port()
    url = f"sqlite:///{folder / 'cxr.sqlite'}"
    sections: dict[str, dict[str, Any]] = {
        "listener": {"host": "127.0.0.1", "port": port},
        "storage": {
            "spool_dir": str(folder / "spool"),
            "sr_dir": str(folder / "sr"),
            "thumbnail_dir": str(folder / "thumbnails"),
            "min_free_mb": 1,
        },
        "database": {"url": url},
        "model": {"path": str(model_path), "device": device},
        "worker": {"processes": workers},
    }
    if forward_to is not None:
        sections["forward"] = {
            "destinations": [{"ae_title": forward_to[0], "host": "127.0.0.1", "port": forward_to[1]}]
        }
    config = peers.write_config(folder / "cxr-triage.toml", peers.gate_off(sections))
    return ServeSetup(config, port, url, load_settings(config, environ={}))


def database_state(url: str) -> tuple[collections.Counter[str], int, list[float]]:
    """Instances by status, the number of SRs, and the completion times (epoch seconds) recorded."""
    engine = db.make_engine(url, create_dirs=False)
    try:
        with db.read_session(engine) as session:
            rows = session.execute(select(db.Instance.status, db.Instance.completed_at)).all()
            srs = len(session.scalars(select(db.SRDocument.id)).all())
    finally:
        engine.dispose()
    statuses = collections.Counter(r.status for r in rows)
    return statuses, srs, [r.completed_at.timestamp() for r in rows if r.completed_at is not None]


def run_ingest_only(setup: ServeSetup, files_: list[Path], senders: int) -> ReceiverRun:
    ae_title = setup.settings.listener.ae_title
    with peers.Server(setup.config, setup.port, log=setup.config.parent / "serve.log", ready_timeout=120) as server:
        assert server.proc is not None
        run = burst(
            "cxr-triage ingest",
            server.proc.pid,
            setup.port,
            ae_title,
            files_,
            senders,
            lambda: sum(database_state(setup.url)[0].values()),
        )
    run.detail = f"database: {dict(database_state(setup.url)[0])}"
    return run


LAYOUT_LINE = re.compile(r"(\d+) worker process\(es\), (\d+) model thread\(s\) each")
"""How ``serve`` logs the worker processes and model threads it resolved from ``[worker]``."""


def workers_ready(log: Path, workers: int | str) -> tuple[int, int | None] | None:
    """(worker processes, model threads each or None if not logged) once every worker of ``serve`` has loaded
    and warmed up its model, else None."""
    text = log.read_text(errors="replace")
    layout = LAYOUT_LINE.search(text)
    if layout is None and not isinstance(workers, int):
        return None  # "auto": the count is in that line
    count = int(layout[1]) if layout is not None else int(workers)
    if text.count(" cxr_triage.worker: ready: model ") < count:
        return None
    return count, int(layout[2]) if layout is not None else None


def run_pipeline(
    setup: ServeSetup, files_: list[Path], singles: list[Path], args: argparse.Namespace
) -> tuple[ReceiverRun, list[float], tuple[int, int | None]]:
    """The burst until every result and SR is committed, then the lone images; (the burst, their latencies, the
    worker processes and their model threads)."""
    ae_title, n = setup.settings.listener.ae_title, len(files_)
    with peers.Server(setup.config, setup.port, log=setup.config.parent / "serve.log", ready_timeout=120) as server:
        assert server.proc is not None

        def ready() -> tuple[int, int | None] | None:
            if not server.alive():
                raise peers.PeerError(f"cxr-triage serve exited:\n{peers.tail(server.log)}")
            return workers_ready(server.log, args.workers)

        layout = peers.wait_until(ready, 300, "the workers to load the model")  # the steady state
        settle(server.proc.pid)
        before = tree_cpu(server.proc.pid)
        started = time.time()
        send_s, codes = server_bench.send(files_, args.senders, setup.port, ae_title)
        peers.wait_until(
            lambda: server_bench.terminal_count(setup.url) >= n or not server.alive(), args.timeout, "all results", 0.1
        )
        cpu = tree_cpu(server.proc.pid) - before
        statuses, srs, completed = database_state(setup.url)
        single = server_bench.one_at_a_time(singles, setup.port, ae_title, setup.url, args.timeout)
    seconds = (max(completed) - started) if completed else float("nan")
    recorded = min(statuses.get(db.DONE, 0), srs)
    detail = f"acknowledged in {send_s:.2f} s; database: {dict(statuses)}, {srs} SRs"
    return ReceiverRun("cxr-triage pipeline", seconds, cpu, recorded, n, codes, detail), single, layout


# --------------------------------------------------------------------------------------------- stages


def receive(files_: list[Path], warmup: Path, senders: int, setup: ServeSetup, engine: Any) -> tuple[float, float]:
    """CPU seconds per image of the product's listener receiving ``files_`` from the senders, its ``Receiver.store``
    (spool and database, measured apart) answering success at once: (pynetdicom with the listener's event
    handlers but the C-STORE handler's own time, the C-STORE handler's own time: parse, sha256)."""
    receiver = make_receiver(setup.settings.storage, engine)
    handler_cpu: list[float] = []
    handle_store = receiver.handle_store

    def timed_handle_store(event: Any) -> int:
        started = time.thread_time()  # the association's own thread: exact under concurrent associations
        try:
            return handle_store(event)
        finally:
            handler_cpu.append(time.thread_time() - started)

    receiver.handle_store = timed_handle_store  # type: ignore[method-assign]
    receiver.store = lambda item, data: STATUS_SUCCESS  # type: ignore[method-assign]
    running = Listener(setup.settings.listener, receiver)
    running.start()
    try:
        server_bench.send([warmup], 1, running.address[1], setup.settings.listener.ae_title)
        handler_cpu.clear()
        before = resource.getrusage(resource.RUSAGE_SELF)
        _, codes = server_bench.send(files_, senders, running.address[1], setup.settings.listener.ae_title)
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        running.stop()
    if set(codes) != {0} or len(handler_cpu) != len(files_):
        raise RuntimeError(f"the listener did not receive every file: storescu exit statuses {codes}")
    total = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return (total - sum(handler_cpu)) / len(files_), sum(handler_cpu) / len(files_)


def received_instance(data: bytes) -> jobqueue.ReceivedInstance:
    """What the C-STORE handler learns from a dataset (its cost is measured by ``receive``)."""
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    sha256 = spool.sha256_bytes(data)
    return jobqueue.ReceivedInstance(
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        calling_ae="BENCH",
        sha256=sha256,
        size_bytes=len(data),
        accession_number=str(ds.get("AccessionNumber") or "").strip() or None,
    )


def through_the_product(paths: Sequence[Path], setup: ServeSetup, runner: worker.Worker, clock: StageClock) -> int:
    """Ingest ``paths``, classify and record them, then forward their SRs, stage by stage; SRs forwarded."""
    receiver = make_receiver(setup.settings.storage, runner.engine)
    predictor = runner.ensure_model()
    if predictor is None:
        raise RuntimeError("the worker has no model")
    for path in paths:
        data = path.read_bytes()
        item = received_instance(data)
        with clock.stage(INSERT):
            status = receiver.store(item, data)
        if status != 0:
            raise RuntimeError(f"Receiver.store answered 0x{status:04X} for {path}")
    ws, stop = setup.settings.worker, threading.Event()
    while True:
        with clock.stage(CLAIM):
            jobs = jobqueue.claim(runner.sessions, runner.worker_id, ws.claim_batch, ws.lease_seconds, ws.max_attempts)
        if not jobs:
            break
        limit = len(jobs) if predictor.device.type == "cuda" else worker.CPU_CHUNK
        start = 0
        for size in pipeline.chunk_sizes(len(jobs), limit):
            with clock.stage(PREPROCESS):
                outcomes, prepared = pipeline.preprocess(jobs[start : start + size], stop)
            with clock.stage(MODEL):
                outcomes += pipeline.classify(prepared, predictor, setup.settings.triage)
            with clock.stage(RECORDER_REST):
                runner.recorder.record(outcomes)
            start += size
    sent = 0
    with clock.stage(FORWARD):
        while due := forward.process_due(runner.sessions, setup.settings.forward):
            sent += sum(1 for o in due if o.state == db.FORWARD_SENT)
    return sent


@dataclasses.dataclass
class StageFigures:
    """CPU and wall seconds per image of each stage; what was checked on the way."""

    cpu: dict[str, float]
    wall: dict[str, float]
    notes: list[str]


def measure_stages(
    workdir: Path, files_: list[Path], warmup: Path, model_path: Path, args: argparse.Namespace
) -> StageFigures:
    """Each stage's CPU per image in this process, after one warm-up image (module docstring)."""
    n, notes = len(files_), []
    with peers.Storescp(workdir / "forwarded", peers.free_port(), ae_title="FORWARD_SCP") as scp:
        setup = serve_setup(workdir / "stages", model_path, args.device, 1, (scp.ae_title, scp.port))
        engine = db.make_engine(setup.url)
        try:
            db.upgrade(engine)
            receive_cpu, handler_cpu = receive(files_, warmup, args.senders, setup, engine)
            runner = worker.Worker(setup.settings, engine)  # its recorder and model store, as the server's worker
            clock = StageClock()
            wrapped = {"write_srs": SR_BUILD, "write_thumbnails": THUMBNAIL, "commit": COMMIT}
            for method, stage in wrapped.items():
                if hasattr(runner.recorder, method):
                    setattr(runner.recorder, method, clock.timed(stage, getattr(runner.recorder, method)))
                else:
                    notes.append(f"Recorder.{method} no longer exists: its time is in {RECORDER_REST!r}")
            with clock.file_writes():
                through_the_product([warmup], setup, runner, clock)
                clock.reset()
                sent = through_the_product(files_, setup, runner, clock)
            runner.close()
        finally:
            engine.dispose()
        statuses, srs, _ = database_state(setup.url)
        notes.append(
            f"stage run: database {dict(statuses)}, {srs} SRs; {sent} of {n} SRs forwarded, "
            f"{len(scp.received())} files at the forward destination (warm-up included)"
        )
    cpu = {stage: clock.cpu.get(stage, 0.0) / n for stage in STAGES}
    wall = {stage: clock.wall.get(stage, 0.0) / n for stage in STAGES}
    cpu[RECEIVE], wall[RECEIVE] = receive_cpu, float("nan")
    cpu[PARSE], wall[PARSE] = handler_cpu, float("nan")
    if clock.cpu.get(SR_WRITE, 0.0) == 0.0:
        notes.append("the recorder's SR file writes could not be timed apart: SR build includes SR write")
    return StageFigures(cpu, wall, notes)


# --------------------------------------------------------------------------------------------- report


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report_receivers(runs: dict[str, ReceiverRun], pipeline_label: str) -> None:
    orthanc = runs["Orthanc"]
    labels = {
        "storescp": "dcmtk storescp --fork (store only)",
        "Orthanc": "Orthanc (store + index)",
        "cxr-triage ingest": "cxr-triage serve, workers off (ingest only)",
        "cxr-triage pipeline": pipeline_label,
    }
    width = max(len(v) for v in labels.values())
    print(f"\n{'receiver':<{width}} | instances/s | CPU ms/image | % of Orthanc's rate | recorded")
    for key, run in runs.items():
        share = run.rate / orthanc.rate * 100.0
        print(
            f"{labels[key]:<{width}} | {run.rate:11.2f} | {run.cpu_ms:12.0f} | {share:17.0f} % | "
            f"{run.recorded}/{run.expected}"
        )
    for run in runs.values():
        codes = sorted(set(run.codes))
        print(f"  {run.name}: storescu exit statuses {codes}{'; ' + run.detail if run.detail else ''}")


def report_stages(stages: StageFigures, runs: dict[str, ReceiverRun], batch_size: int) -> None:
    print(f"\n{'stage (cxr-triage, in this process)':<36} | CPU ms/image | wall ms/image")
    for stage in STAGES:
        wall = stages.wall[stage]
        wall_text = "-" if wall != wall else f"{wall * 1000:.1f}"  # NaN: not measured
        print(f"{stage:<36} | {stages.cpu[stage] * 1000:12.1f} | {wall_text:>13}")
    ingest = sum(stages.cpu[s] for s in INGEST_STAGES) * 1000
    whole = sum(stages.cpu[s] for s in STAGES if s != FORWARD) * 1000
    print(f"{'total':<36} | {sum(stages.cpu.values()) * 1000:12.1f} | {'':>13}")
    print(
        f"  ingest stages sum to {ingest:.0f} ms (serve, workers off, measured {runs['cxr-triage ingest'].cpu_ms:.0f} "
        f"ms); every stage but forward sums to {whole:.0f} ms (serve with the model, measured "
        f"{runs['cxr-triage pipeline'].cpu_ms:.0f} ms, SRs not forwarded); model batch size {batch_size}"
    )
    for note in stages.notes:
        print(f"  {note}")


def report_targets(runs: dict[str, ReceiverRun], single: list[float], shipped: bool) -> None:
    orthanc, ingest, whole = runs["Orthanc"], runs["cxr-triage ingest"], runs["cxr-triage pipeline"]
    caveat = "" if shipped else " (not the shipped model: indicative only)"
    print("\ntargets (printed, not asserted):")
    print(
        f"  ingest-only CPU per image <= Orthanc's: {ingest.cpu_ms:.0f} ms vs {orthanc.cpu_ms:.0f} ms: "
        f"{met(ingest.cpu_ms <= orthanc.cpu_ms)}"
    )
    print(
        f"  whole pipeline >= {TARGET_RATE:.0f} instances/s: {whole.rate:.2f}/s: {met(whole.rate >= TARGET_RATE)}"
        f"{caveat}"
    )
    share = whole.rate / orthanc.rate
    print(
        f"  whole pipeline >= {TARGET_SHARE_OF_ORTHANC * 100:.0f} % of Orthanc's rate ({orthanc.rate:.2f}/s, so >= "
        f"{orthanc.rate * TARGET_SHARE_OF_ORTHANC:.2f}/s): {share * 100:.0f} %: "
        f"{met(share >= TARGET_SHARE_OF_ORTHANC)}{caveat}"
    )
    if single:
        p95 = server_bench.percentile(single, 95) * 1000
        print(
            f"  lone image, acknowledgement -> committed result p95 <= {TARGET_LONE_P95_MS:.0f} ms: {p95:.0f} ms: "
            f"{met(p95 <= TARGET_LONE_P95_MS)}{caveat}"
        )
    else:
        print(f"  lone image p95 <= {TARGET_LONE_P95_MS:.0f} ms: not measured (--single 0)")


# --------------------------------------------------------------------------------------------- main


def progress(what: str, since: float) -> float:
    """Say that ``what`` is done and how long it took (start-up and shut-down included); the time now."""
    now = time.perf_counter()
    print(f"{what}: done in {now - since:.1f} s (load {server_bench.load_text()})", flush=True)
    return now


def run(args: argparse.Namespace, workdir: Path) -> int:
    model_path = resolve_model_path(args.model).resolve()
    shipped = model_path == BUNDLED_MODEL.resolve()
    loaded = load_classifier(model_path)
    device = str(pick_device(args.device))
    print(
        f"machine: {server_bench.cpu_name()}, {os.cpu_count()} logical CPUs, load average {server_bench.load_text()} "
        f"at start; torch {torch.__version__} ({torch.get_num_threads()} threads), model on {device}",
        flush=True,
    )
    print(f"model: {model_path} (version {loaded.card.model_version}{', the shipped model' if shipped else ''})")
    files_, singles = server_bench.make_inputs(args, workdir)
    warmup = synthetic.chest_file(
        workdir / "images" / "warmup.dcm", rows=args.size, columns=args.size, patient_id="BENCH-WARMUP", seed=99_999
    )
    print(f"senders: {args.senders} concurrent {peers.dcmtk_tool('storescu')}", flush=True)

    runs: dict[str, ReceiverRun] = {}
    started = time.perf_counter()
    runs["storescp"] = run_storescp(workdir, files_, args.senders)
    started = progress("storescp --fork", started)
    runs["Orthanc"] = run_orthanc(workdir, files_, args.senders)
    started = progress("Orthanc", started)
    ingest = serve_setup(workdir / "ingest", model_path, args.device, 0)
    runs["cxr-triage ingest"] = run_ingest_only(ingest, files_, args.senders)
    started = progress("cxr-triage serve, workers off", started)
    whole = serve_setup(workdir / "pipeline", model_path, args.device, args.workers)
    runs["cxr-triage pipeline"], single, (processes, threads) = run_pipeline(whole, files_, singles, args)
    started = progress("cxr-triage serve with the model, lone images included", started)
    precision = resolve_precision(whole.settings.model.precision, pick_device(whole.settings.model.device))
    pipeline_label = (
        f"cxr-triage serve, {processes} worker(s){f' x {threads} thread(s)' if threads else ''}, {precision} model, "
        "until every result and SR is committed"
    )
    report_receivers(runs, pipeline_label)  # before the stages: a failure there leaves these figures printed
    if single:
        print(
            f"\nlone image on the idle server, acknowledgement -> committed result ({len(single)} in turn): p50 "
            f"{server_bench.percentile(single, 50) * 1000:.0f} ms, p95 "
            f"{server_bench.percentile(single, 95) * 1000:.0f} ms, max {max(single) * 1000:.0f} ms\n",
            flush=True,
        )
    if threads is not None:
        torch.set_num_threads(threads)  # as in the server's worker processes (worker.use_threads)
    print(f"stages in this process, the model on {torch.get_num_threads()} thread(s)", flush=True)
    stages = measure_stages(workdir, files_, warmup, model_path, args)
    progress("the stages", started)
    report_stages(stages, runs, whole.settings.model.batch_size)
    report_targets(runs, single, shipped)
    print(f"\nload average at the end: {server_bench.load_text()}")
    short = [r.name for r in runs.values() if r.recorded < r.expected]
    if short:
        print(f"INCOMPLETE: {', '.join(short)} did not record every instance: their figures are not comparable")
        return 1
    return 0


def workers_value(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f'{text!r}: expected "auto" or a whole number >= 1')
    return int(text)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="instances in the burst (default 48)")
    parser.add_argument("--senders", type=int, default=4, help="concurrent storescu processes (default 4)")
    parser.add_argument("--size", type=int, default=2048, help="rows = columns of each image (default 2048)")
    parser.add_argument("--studies", type=int, default=8, help="studies the burst is spread over (default 8)")
    parser.add_argument(
        "--single", type=int, default=8, help="images then sent one at a time to the idle server (default 8)"
    )
    parser.add_argument(
        "--model", type=Path, help=f"classifier checkpoint (default: the shipped model, {BUNDLED_MODEL.name})"
    )
    parser.add_argument(
        "--workers",
        type=workers_value,
        default="auto",
        help='[worker] processes of the whole-pipeline run: a number >= 1, or "auto" (the default: from the cores)',
    )
    parser.add_argument("--device", default="auto", help="the model's device: auto (CUDA if present), cpu, cuda")
    parser.add_argument("--timeout", type=float, default=1800, help="deadline for all results, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, stores, databases)")
    args = parser.parse_args(argv)
    if args.images < 1 or args.senders < 1 or args.single < 0:
        parser.error("--images and --senders must be >= 1, --single >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not peers.in_private_netns():  # storescp and Orthanc bind every interface: run in a network of our own
        command = peers.netns_command([sys.executable, str(Path(__file__).resolve()), *argv])
        return subprocess.run(command, check=False).returncode
    peers.stop_on_sigterm()
    workdir = Path(tempfile.mkdtemp(prefix="cxr-bench-peers-"))
    try:
        return run(args, workdir)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
