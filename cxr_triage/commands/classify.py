"""``cxr-triage classify``: classify DICOM, PNG or JPEG files (or folders of them) from the command line.

One line per input, in input order, JSON with ``--json`` (keys ``path``, ``sop_instance_uid``, ``status``,
``label``, ``probabilities``, ``reason``, ``model_version``, ``precision``, ``typicality``: the gate's score,
higher = less like a chest radiograph, None without the gate). Images the typicality
gate (``cxr_triage.ml.gate``, ``[gate]`` settings) finds unlike a chest radiograph are refused with code ``atypical``
(``--no-gate`` turns it off). Refusals and per-file errors are lines
too, so the exit status is 0 whenever every input got a line; it is non-zero only when the command itself
cannot run (no model, a path on the command line that does not exist).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from cxr_triage import log_name
from cxr_triage.core import dicomwarnings
from cxr_triage.core.bootstrap import CommandError, Context, run_command
from cxr_triage.ml.checkpoint import CheckpointError, load_classifier, resolve_model_path
from cxr_triage.ml.gate import REFUSAL_CODE, GateError, TypicalityGate, gate_from_settings
from cxr_triage.ml.inference import Predictor
from cxr_triage.ml.precision import PRECISIONS
from cxr_triage.ml.preprocess import PreparedImage, Refusal, prepare_path

logger = logging.getLogger(log_name(__name__))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, help="DICOM/PNG/JPEG files or folders (searched recursively)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument(
        "--config", default=None, help="configuration file whose [model] settings apply (the flags override them)"
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="classifier checkpoint (default: [model] path, else the bundled one)"
    )
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: [model] device, auto)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: 16)")
    parser.add_argument(
        "--precision",
        default=None,
        choices=PRECISIONS,
        help="auto (the default): bf16 on CUDA and on CPUs with bf16 in hardware, float32 elsewhere",
    )
    parser.add_argument(
        "--gate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="refuse images unlike a chest radiograph (default: [gate] enabled, on); its score is the typicality "
        "key: higher = less like a chest radiograph",
    )


def iter_inputs(paths: Iterable[Path]) -> Iterator[Path]:
    """Files as given, and every non-hidden file under each folder, sorted."""
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                rel = child.relative_to(path)
                if child.is_file() and not any(part.startswith(".") for part in rel.parts):
                    yield child
        else:
            yield path


def result_record(
    path: Path,
    outcome: PreparedImage | Refusal | Exception,
    prediction: Any,
    model_version: str,
    precision: str,
    typicality: float | None = None,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "path": str(path),
        "sop_instance_uid": None,
        "status": "error",
        "label": None,
        "probabilities": None,
        "reason": None,
        "model_version": model_version,
        "precision": None,
        "typicality": typicality,
    }
    if isinstance(outcome, PreparedImage):
        record["precision"] = precision
        record["sop_instance_uid"] = outcome.sop_instance_uid
        record["status"] = "ok"
        record["label"] = prediction.label
        record["probabilities"] = {k: round(v, 6) for k, v in prediction.probabilities.items()}
        record["reason"] = "; ".join(outcome.notes) or None
    elif isinstance(outcome, Refusal):
        record["sop_instance_uid"] = outcome.sop_instance_uid
        record["status"] = "rejected"
        record["reason"] = outcome.reason
    else:
        record["reason"] = f"{type(outcome).__name__}: {outcome}"
    return record


def format_result(record: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(record, sort_keys=False)
    if record["status"] == "ok":
        probs = " ".join(f"{k}={v:.3f}" for k, v in record["probabilities"].items())
        typicality = "" if record["typicality"] is None else f"\ttypicality={record['typicality']:.2f}"
        return f"{record['path']}\tok\t{record['label']}\t{probs}{typicality}"
    return f"{record['path']}\t{record['status']}\t{record['reason']}"


def _prepare(path: Path) -> PreparedImage | Refusal | Exception:
    try:
        with dicomwarnings.collected() as complaints:
            prepared = prepare_path(path)
        if complaints:  # one record per file, however many times pydicom warned
            logger.warning("%s: %s", path, dicomwarnings.summary(complaints))
        return prepared
    except Exception as exc:  # one bad file must not stop the others
        logger.exception("unexpected failure preparing %s", path)
        return exc


def screened(
    pending: list[tuple[Path, PreparedImage | Refusal | Exception]], gate: TypicalityGate | None
) -> list[tuple[Path, PreparedImage | Refusal | Exception, float | None]]:
    """``pending`` with the gate's score of each prepared image, and those it refuses turned into refusals."""
    ready = [o for _, o in pending if isinstance(o, PreparedImage)]
    scores = iter(gate.scores([o.tensor for o in ready]) if gate is not None and ready else [])
    out: list[tuple[Path, PreparedImage | Refusal | Exception, float | None]] = []
    for path, outcome in pending:
        score = next(scores) if gate is not None and isinstance(outcome, PreparedImage) else None
        if gate is not None and score is not None and gate.refuses(score):
            assert isinstance(outcome, PreparedImage)
            outcome = Refusal(REFUSAL_CODE, gate.reason(score), None, outcome.sop_instance_uid)
        out.append((path, outcome, score))
    return out


def classify_paths(
    paths: list[Path], predictor: Predictor, out: TextIO, as_json: bool, gate: TypicalityGate | None = None
) -> int:
    """Classify every input (screened by ``gate`` when given), writing a line each; returns the lines written."""
    written = 0
    pending: list[tuple[Path, PreparedImage | Refusal | Exception]] = []

    def flush() -> None:
        nonlocal written
        items = screened(pending, gate)
        ready = [o for _, o, _ in items if isinstance(o, PreparedImage)]
        predictions = iter(predictor.predict([o.tensor for o in ready]) if ready else [])
        for path, outcome, score in items:
            prediction = next(predictions) if isinstance(outcome, PreparedImage) else None
            record = result_record(path, outcome, prediction, predictor.model_version, predictor.precision, score)
            print(format_result(record, as_json), file=out)
            written += 1
        out.flush()
        pending.clear()

    for path in iter_inputs(paths):
        pending.append((path, _prepare(path)))
        if sum(isinstance(o, PreparedImage) for _, o in pending) >= predictor.batch_size:
            flush()
    flush()
    return written


def _classify(args: argparse.Namespace, context: Context) -> int:
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        raise CommandError(f"no such file or folder: {', '.join(missing)}")
    model = context.settings.model
    try:
        path = resolve_model_path(args.model or model.path or None, how="pass one with --model PATH")
        loaded = load_classifier(path)
    except CheckpointError as exc:
        raise CommandError(str(exc)) from exc
    predictor = Predictor(
        loaded,
        device=args.device or model.device,
        batch_size=args.batch_size or model.batch_size,
        precision=args.precision or model.precision,
    )
    gate_settings = context.settings.gate
    if args.gate is not None:
        gate_settings = replace(gate_settings, enabled=args.gate)
    try:
        gate = gate_from_settings(gate_settings, predictor.device)
    except GateError as exc:
        raise CommandError(f"{exc} (or run with --no-gate)") from exc
    classify_paths(list(args.paths), predictor, sys.stdout, args.json, gate)
    return 0


def run(args: argparse.Namespace) -> int:
    return run_command(args, "classify", lambda context: _classify(args, context))
