"""Benchmark the whole server: concurrent dcmtk storescu senders against one `cxr-triage serve`, then the model alone.

Usage: ``python bench/listener.py [--images N] [--single 8] [--senders 4] [--size 2048] [--device auto|cpu|cuda]
[--model FILE | --random tiny|full]``.

N synthetic 2048x2048 16-bit chest CRs are generated in a temporary folder and sent by ``--senders`` concurrent
``storescu`` processes to one server (SQLite, the model on ``--device``: CUDA when present unless ``cpu`` is
asked for, the default worker settings, SRs written but forwarded nowhere). Printed, from the database's own timestamps:

- ingest rate (instances acknowledged per second, by the senders' wall clock);
- throughput (instances per second from the first ``received_at`` to the last ``completed_at``);
- latency from acknowledgement to committed result (``completed_at - received_at``): p50, p95, max;
- then the same latency for ``--single`` further images sent one at a time to the idle server (the case of a lone
  urgent image: no queue, the worker woken by the listener);
- the workers' own per-image preprocessing and inference times (predictions table).

The model alone runs in this process on the same images, preprocessed with ``prepare_path`` (``Predictor``, the
server's batch size), twice: before the server starts and after it has stopped (the machine's load can change
in between: both figures and the load averages are printed, and their mean is the reference). The pipeline's
overhead over the model is (pipeline seconds per image - model seconds per image) / model seconds per image,
and the workers' own per-chunk log lines break the pipeline's time down into its three overlapping stages:
preprocessing (the preprocessor thread), inference (the model's thread), SR building and writing and the database
commit (the recorder thread).
Target on the CPU: overhead < 15 % of the model's time (meaningful with the full-size model; a tiny model makes
the model's time small and the overhead ratio large).

The overhead cannot fall below what the pipeline's unavoidable work costs on the same cores, so the same run also
measures, on the same images: the listener library's own receive cost (a pynetdicom SCP with the server's
presentation contexts and a handler that only answers success, fed by the same senders), preprocessing alone, and
the Structured Report alone (built and encoded as the recorder does). Their CPU time plus the model's, spread over
every core, is a lower bound of the pipeline's time per image, printed as the lowest overhead this machine allows.

Without ``--model`` a checkpoint with random weights is made: ``--random tiny`` (width 4, the default) or
``--random full`` (the paper's width: the real model's compute cost). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from sqlalchemy import select  # noqa: E402

from cxr_triage import CLASS_NAMES  # noqa: E402
from cxr_triage.core import db  # noqa: E402
from cxr_triage.core.settings import ListenerSettings, load_settings  # noqa: E402
from cxr_triage.ml.checkpoint import ModelCard, load_classifier, save_classifier  # noqa: E402
from cxr_triage.ml.inference import Predictor, pick_device  # noqa: E402
from cxr_triage.ml.model import CAEClassifier, ModelSpec  # noqa: E402
from cxr_triage.ml.preprocess import PreparedImage, prepare_path  # noqa: E402
from cxr_triage.testing import peers, synthetic  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def make_model(workdir: Path, args: argparse.Namespace) -> tuple[Path, str]:
    if args.model:
        path = Path(args.model).resolve()  # the server resolves relative paths against its config's folder
        loaded = load_classifier(path)
        return path, f"{args.model} (version {loaded.card.model_version}, trained weights)"
    spec = ModelSpec(width=4, dense_units=8) if args.random == "tiny" else ModelSpec()
    model = CAEClassifier(spec)
    path = workdir / "model.pt"
    save_classifier(path, model, ModelCard(spec=spec, model_version=f"bench-random-{args.random}"))
    return path, f"{args.random} model with RANDOM weights (width {spec.width}, dense {spec.dense_units})"


def send(files: list[Path], senders: int, port: int, ae_title: str) -> tuple[float, list[int]]:
    """Send ``files`` split over ``senders`` concurrent storescu processes; (wall seconds, exit statuses)."""
    storescu = peers.dcmtk_tool("storescu")
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [storescu, "-aet", f"BENCH{n}", "-aec", ae_title, "127.0.0.1", str(port), *map(str, files[n::senders])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for n in range(senders)
        if files[n::senders]
    ]
    codes = [p.wait(timeout=3600) for p in procs]
    return time.perf_counter() - started, codes


def pipeline_figures(url: str) -> dict[str, Any]:
    engine = db.make_engine(url, create_dirs=False)
    try:
        with db.read_session(engine) as session:
            instances = session.execute(
                select(db.Instance.received_at, db.Instance.completed_at, db.Instance.status)
            ).all()
            predictions = session.execute(
                select(db.PredictionRecord.preprocess_ms, db.PredictionRecord.inference_ms)
            ).all()
    finally:
        engine.dispose()
    done = [(r.received_at, r.completed_at) for r in instances if r.completed_at is not None]
    latencies = [(c - r).total_seconds() for r, c in done]
    span = (max(c for _, c in done) - min(r for r, _ in done)).total_seconds() if done else float("nan")
    return {
        "statuses": sorted({r.status for r in instances}),
        "count": len(done),
        "span_s": span,
        "latencies": latencies,
        "preprocess_ms": [p.preprocess_ms for p in predictions],
        "inference_ms": [p.inference_ms for p in predictions],
    }


BATCH_LINE = re.compile(
    r"chunk of (\d+) recorded; per image: preprocess \+ inference (\d+) ms, SR (\d+) ms, commit (\d+) ms"
)


def worker_batches(log: Path) -> list[tuple[int, float, float, float]]:
    """(size, preprocess+inference ms, SR ms, commit ms per image) of each chunk, from the server's log."""
    return [
        (int(m[1]), float(m[2]), float(m[3]), float(m[4])) for m in BATCH_LINE.finditer(log.read_text(errors="replace"))
    ]


def model_alone(files: list[Path], model_path: Path, batch_size: int, device: str) -> tuple[float, float, float, float]:
    """Seconds per image in this process: (preprocessing wall, model wall, preprocessing CPU, model CPU)."""
    started, cpu = time.perf_counter(), time.process_time()
    prepared = [prepare_path(f) for f in files]
    preprocess_s = (time.perf_counter() - started) / len(files)
    preprocess_cpu = (time.process_time() - cpu) / len(files)
    tensors = [p.tensor for p in prepared if isinstance(p, PreparedImage)]
    predictor = Predictor(load_classifier(model_path), device=device, batch_size=batch_size)
    predictor.probabilities(tensors[:batch_size])  # warm-up
    started, cpu = time.perf_counter(), time.process_time()
    predictor.probabilities(tensors)
    n = len(tensors)
    return preprocess_s, (time.perf_counter() - started) / n, preprocess_cpu, (time.process_time() - cpu) / n


def sr_alone(files: list[Path], model_path: Path) -> float:
    """CPU seconds per image to build and encode the triage SR of each image as the recorder does (a template
    per model, finding and priority, filled per instance: ``cxr_triage.srtemplate``), in this process."""
    import pydicom

    from cxr_triage.outputs import sr
    from cxr_triage.outputs.srtemplate import TriageSRBuilder

    loaded = load_classifier(model_path)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    first, *others = CLASS_NAMES
    probabilities = {first: 1.0, **dict.fromkeys(others, 0.0)}
    builder = TriageSRBuilder()

    def one(header: Any) -> bytes:
        return sr.sr_to_bytes(
            builder.build(
                header,
                label=first,
                probabilities=probabilities,
                model_version=loaded.card.model_version,
                model_sha256=loaded.sha256,
                flagged=False,
            )
        )

    one(headers[0])  # highdicom's one-time import and tables, and the template
    started = time.process_time()
    for header in headers:
        one(header)
    return (time.process_time() - started) / len(headers)


def receive_alone(files: list[Path], senders: int, listener: Any) -> float:
    """CPU seconds per image of pynetdicom receiving ``files`` (server's contexts, a handler that only answers
    success) from the same storescu senders: the listener library's own cost, measured in this process."""
    from pynetdicom import evt

    from cxr_triage.dicom.listener import build_ae

    ae = build_ae(dataclasses.replace(listener, allowed_calling_aes=()))
    port = peers.free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0)])
    try:
        before = resource.getrusage(resource.RUSAGE_SELF)
        _, codes = send(files, senders, port, listener.ae_title)
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        server.shutdown()
    if set(codes) != {0}:
        raise RuntimeError(f"storescu failed against the bare SCP: exit statuses {codes}")
    return ((after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)) / len(files)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of the server process (listener) and of its worker processes (spawned children)."""
    workers = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid and "spawn_main" in (
                stat.parent / "cmdline"
            ).read_text(errors="replace"):
                workers += cpu_seconds(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return {"listener": cpu_seconds(pid), "workers": workers}


def load_text() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def one_at_a_time(files: list[Path], port: int, ae_title: str, url: str, timeout: float) -> list[float]:
    """Send each file alone to the idle server and wait for its result: acknowledgement-to-result seconds."""
    latencies = []
    for path in files:
        before = terminal_count(url)
        _, codes = send([path], 1, port, ae_title)
        if codes != [0]:
            raise RuntimeError(f"storescu failed on {path}: exit status {codes}")
        peers.wait_until(lambda before=before: terminal_count(url) > before, timeout, "the single result", 0.02)
        engine = db.make_engine(url, create_dirs=False)
        try:
            with db.read_session(engine) as session:
                row = session.execute(
                    select(db.Instance.received_at, db.Instance.completed_at).order_by(db.Instance.id.desc()).limit(1)
                ).one()
        finally:
            engine.dispose()
        latencies.append((row.completed_at - row.received_at).total_seconds())
    return latencies


def terminal_count(url: str) -> int:
    engine = db.make_engine(url, create_dirs=False)
    try:
        with db.read_session(engine) as session:
            rows = session.execute(select(db.Instance.status)).scalars().all()
    finally:
        engine.dispose()
    return sum(1 for status in rows if status in db.TERMINAL_STATES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="instances to send (default 32)")
    parser.add_argument("--senders", type=int, default=4, help="concurrent storescu processes (default 4)")
    parser.add_argument("--size", type=int, default=2048, help="rows = columns of each image (default 2048)")
    parser.add_argument("--studies", type=int, default=8, help="studies the images are spread over (default 8)")
    parser.add_argument(
        "--single", type=int, default=8, help="images then sent one at a time to the idle server (default 8)"
    )
    parser.add_argument("--workers", type=int, default=1, help="[worker] processes of the server (default 1)")
    parser.add_argument(
        "--device", default="auto", help="the model's device, server and model alone: auto (CUDA if present), cpu, cuda"
    )
    parser.add_argument("--model", type=Path, help="a trained checkpoint (default: a random one, see --random)")
    parser.add_argument("--random", choices=["tiny", "full"], default="tiny", help="random model size")
    parser.add_argument("--timeout", type=float, default=1800, help="deadline for all results, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
    try:
        return run(args, workdir)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def make_inputs(args: argparse.Namespace, workdir: Path) -> tuple[list[Path], list[Path]]:
    """The burst's images spread over ``--studies`` studies, and the images then sent one at a time."""
    started = time.perf_counter()
    studies = [generate_uid() for _ in range(max(1, args.studies))]
    images = workdir / "images"
    images.mkdir()
    files = [
        synthetic.chest_file(
            images / f"{i:04d}.dcm",
            rows=args.size,
            columns=args.size,
            study_uid=studies[i % len(studies)],
            patient_id=f"BENCH-{i % len(studies)}",
            seed=i,
        )
        for i in range(args.images)
    ]
    singles = [
        synthetic.chest_file(
            images / f"single-{i:04d}.dcm",
            rows=args.size,
            columns=args.size,
            study_uid=generate_uid(),
            patient_id=f"BENCH-SINGLE-{i}",
            seed=10_000 + i,
        )
        for i in range(args.single)
    ]
    size_mb = sum(f.stat().st_size for f in files) / 1e6
    print(
        f"inputs: {len(files)} CR {args.size}x{args.size} 16-bit (12 stored), explicit VR LE, "
        f"{size_mb:.0f} MB, {len(studies)} studies (generated in {time.perf_counter() - started:.1f} s)"
    )
    return files, singles


@dataclasses.dataclass
class ServerRun:
    """What one run of the server measured: the burst, then the single images."""

    send_s: float
    codes: list[int]
    cpu: dict[str, float]  # CPU seconds per image of the server's worker and listener processes
    senders_cpu: float  # CPU seconds of all senders together
    figures: dict[str, Any]
    single: list[float]
    log: Path


def measure_server(
    args: argparse.Namespace, config: Path, port: int, url: str, ae_title: str, files: list[Path], singles: list[Path]
) -> ServerRun:
    """Start ``serve``, wait for its models, send the burst, wait for every result, then send the singles."""
    peers.cli("db", "upgrade", config=config)
    with peers.Server(config, port, log=config.parent / "serve.log", ready_timeout=120) as server:
        # Measure the steady state: wait until every worker has its model loaded and warmed up.
        peers.wait_until(
            lambda: (
                server.log.read_text(errors="replace").count(" cxr_triage.worker: ready: model ") >= args.workers
                or not server.alive()
            ),
            300,
            "the workers to load the model",
        )
        assert server.proc is not None
        cpu_start = server_cpu(server.proc.pid)
        senders_start = resource.getrusage(resource.RUSAGE_CHILDREN)
        send_s, codes = send(files, args.senders, port, ae_title)
        senders_end = resource.getrusage(resource.RUSAGE_CHILDREN)
        peers.wait_until(
            lambda: terminal_count(url) >= len(files) or not server.alive(), args.timeout, "all results", 0.5
        )
        cpu_end = server_cpu(server.proc.pid)
        figures = pipeline_figures(url)
        single = one_at_a_time(singles, port, ae_title, url, args.timeout)
    senders_cpu = (senders_end.ru_utime + senders_end.ru_stime) - (senders_start.ru_utime + senders_start.ru_stime)
    cpu = {k: (cpu_end[k] - cpu_start[k]) / len(files) for k in cpu_start}
    return ServerRun(send_s, codes, cpu, senders_cpu, figures, single, server.log)


def report_server(run: ServerRun, n_files: int) -> float | None:
    """Print ingest, pipeline and latency figures; the pipeline's seconds per image (``None``: no results)."""
    figures, n = run.figures, run.figures["count"]
    print(
        f"ingest: {n_files} instances acknowledged in {run.send_s:.2f} s = {n_files / run.send_s:.2f} instances/s "
        f"(storescu exit statuses {sorted(set(run.codes))})"
    )
    if n == 0:
        print(f"no results: statuses {figures['statuses']}; see {run.log} (--keep)")
        return None
    pipeline_per_image = figures["span_s"] / n
    print(
        f"pipeline: {n} results (states {figures['statuses']}) in {figures['span_s']:.2f} s from first receipt to "
        f"last commit = {n / figures['span_s']:.2f} instances/s, {pipeline_per_image * 1000:.0f} ms per image"
    )
    lat = figures["latencies"]
    print(
        f"latency acknowledgement -> committed result: p50 {percentile(lat, 50):.2f} s, "
        f"p95 {percentile(lat, 95):.2f} s, max {max(lat):.2f} s (queueing included: all sent at once)"
    )
    if run.single:
        print(
            f"latency of one image sent alone to the idle server ({len(run.single)} in turn): p50 "
            f"{percentile(run.single, 50) * 1000:.0f} ms, p95 {percentile(run.single, 95) * 1000:.0f} ms, max "
            f"{max(run.single) * 1000:.0f} ms"
        )
    if figures["inference_ms"]:
        print(
            f"workers' own timings per image: preprocess median {statistics.median(figures['preprocess_ms']):.0f} ms,"
            f" inference median {statistics.median(figures['inference_ms']):.1f} ms"
        )
    return pipeline_per_image


def report_stages(run: ServerRun, model_per_image: float) -> None:
    """Print the workers' chunk sizes and their stages' times per image under load."""
    batches = worker_batches(run.log)
    if batches:
        total = sum(size for size, *_ in batches)
        classify_ms, sr_ms, commit_ms = (sum(size * b[i] for size, *b in batches) / total for i in range(3))
        print(
            f"workers' chunks: sizes {[size for size, *_ in batches]}; per image, in three overlapping stages: "
            f"preprocessing + inference {classify_ms:.0f} ms (preprocessor thread, then the model's), SR build + "
            f"write {sr_ms:.0f} ms and commit {commit_ms:.0f} ms (recorder thread)"
        )
    figures = run.figures
    if figures["inference_ms"]:
        print(
            f"stages under load, per image: preprocessing {statistics.mean(figures['preprocess_ms']):.0f} ms, "
            f"inference {statistics.mean(figures['inference_ms']):.0f} ms (the model alone: "
            f"{model_per_image * 1000:.0f} ms); they overlap, so they do not add up to the pipeline's time"
        )


def report_cpu(
    run: ServerRun,
    files: list[Path],
    model_path: Path,
    listener: ListenerSettings,
    alone: tuple[tuple[float, float, float, float], tuple[float, float, float, float]],
    sr_before: float,
    senders: int,
) -> None:
    """Print CPU time per image of every part, and the least overhead the cores allow."""
    before, after = alone
    cpu, n_files = run.cpu, len(files)
    senders_per_image = run.senders_cpu / n_files
    model_cpu = (before[3] + after[3]) / 2
    preprocess_cpu = (before[2] + after[2]) / 2
    print(
        f"CPU time per image (seconds of CPU, independent of other load): model alone {model_cpu * 1000:.0f} ms, "
        f"preprocessing alone {preprocess_cpu * 1000:.0f} ms; server's worker process {cpu['workers'] * 1000:.0f} ms "
        f"(model + preprocessing + SR + commits), its listener process {cpu['listener'] * 1000:.0f} ms (receive, "
        f"sha256, spool fsync, insert), the storescu senders {senders_per_image * 1000:.0f} ms; "
        f"CPU beyond the model: {(cpu['workers'] + cpu['listener'] - model_cpu) / model_cpu * 100:.0f} % of the "
        f"model's CPU (all of it shares the {os.cpu_count()} cores with the model)"
    )
    # A lower bound: the smaller of the two measurements of everything measured twice.
    sr_cpu = min(sr_before, sr_alone(files, model_path))
    receive_cpu = receive_alone(files, senders, listener)
    cores = os.cpu_count() or 1
    least_model_cpu, least_preprocess_cpu = min(before[3], after[3]), min(before[2], after[2])
    floor = (least_model_cpu + receive_cpu + least_preprocess_cpu + sr_cpu + senders_per_image) / cores
    model_per_image = (before[1] + after[1]) / 2
    print(
        f"the same work alone, CPU per image: pynetdicom receiving with a no-op handler {receive_cpu * 1000:.0f} ms, "
        f"preprocessing {least_preprocess_cpu * 1000:.0f} ms, SR build + encode {sr_cpu * 1000:.0f} ms, "
        f"the senders {senders_per_image * 1000:.0f} ms, the model {least_model_cpu * 1000:.0f} ms; spread over "
        f"{cores} cores that is at least {floor * 1000:.0f} ms per image, so the overhead cannot be below "
        f"{(floor - model_per_image) / model_per_image * 100:.0f} % on this machine with these libraries"
    )


def run(args: argparse.Namespace, workdir: Path) -> int:
    model_path, model_text = make_model(workdir, args)
    device = str(pick_device(args.device))
    gpu = f"model on {torch.cuda.get_device_name(0)}" if device.startswith("cuda") else "model on the CPU, no GPU used"
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, load average {load_text()} at start, "
        f"torch {torch.__version__}, {gpu}"
    )
    print(f"model: {model_text}")
    files, singles = make_inputs(args, workdir)

    port = peers.free_port()
    url = f"sqlite:///{workdir / 'bench.sqlite'}"
    sections = {
        "listener": {"host": "127.0.0.1", "port": port},
        "storage": {"spool_dir": str(workdir / "spool"), "sr_dir": str(workdir / "sr"), "min_free_mb": 1},
        "database": {"url": url},
        "model": {"path": str(model_path), "device": device},
        "worker": {"processes": args.workers},
    }
    config = peers.write_config(workdir / "bench.toml", peers.gate_off(sections))
    cfg = load_settings(config, environ={})
    batch_size = cfg.model.batch_size
    print(
        f"server: SQLite, {args.workers} worker process(es), claim_batch {cfg.worker.claim_batch}, "
        f"batch_size {batch_size}, poll_interval {cfg.worker.poll_interval} s, SR enabled, no forwarding; "
        f"{args.senders} concurrent storescu senders"
    )
    before = model_alone(files, model_path, batch_size, device)
    print(
        f"model alone, before the server (load {load_text()}): {before[1] * 1000:.1f} ms per image, "
        f"preprocessing {before[0] * 1000:.0f} ms per image"
    )
    sr_before = sr_alone(files, model_path)
    server = measure_server(args, config, port, url, cfg.listener.ae_title, files, singles)
    pipeline_per_image = report_server(server, len(files))
    if pipeline_per_image is None:
        return 1

    after = model_alone(files, model_path, batch_size, device)
    print(
        f"model alone, after the server (load {load_text()}): {after[1] * 1000:.1f} ms per image, "
        f"preprocessing {after[0] * 1000:.0f} ms per image ({torch.get_num_threads()} torch threads, "
        f"batch {batch_size})"
    )
    model_per_image = (before[1] + after[1]) / 2
    report_stages(server, model_per_image)
    report_cpu(server, files, model_path, cfg.listener, (before, after), sr_before, args.senders)
    cores = os.cpu_count() or 1
    busy_cpu = server.cpu["workers"] + server.cpu["listener"] + server.senders_cpu / len(files)
    busy = busy_cpu / (cores * pipeline_per_image)
    print(f"the {cores} cores were busy {busy * 100:.0f} % of the pipeline's time (server and senders)")
    overhead = (pipeline_per_image - model_per_image) / model_per_image
    caveat = "; not meaningful with the tiny model" if args.random == "tiny" and not args.model else ""
    print(
        f"overhead of the pipeline over the model alone: {overhead * 100:.0f} % of the model's time "
        f"(target < 15 % on the CPU{caveat}); load at the end {load_text()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
