"""``cxr-triage status``: the pipeline's health (``cxr_triage.ops.status``) as text or JSON; exit status 1 when
something needs attention.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cxr_triage.ops.status import collect

if TYPE_CHECKING:
    from cxr_triage.core.bootstrap import Context


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="configuration file (TOML)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    parser.add_argument(
        "--max-queue-age",
        type=float,
        default=300.0,
        help="seconds an instance may wait in the queue before that is a problem (default 300)",
    )


def format_text(status: Mapping[str, Any]) -> str:
    counts = status["instances"]
    oldest = status["oldest_queued_seconds"]
    forwards = status["forwards"]
    spool_info = status["spool"]
    model = status["model"]
    champion = model["champion"]
    lines = [
        f"instances: {counts['queued']} queued"
        + (f" (oldest {oldest:.0f} s)" if oldest is not None else "")
        + f", {counts['processing']} processing, {counts['done']} classified, {counts['refused']} refused, "
        f"{counts['failed']} failed ({status['failed_last_24h']} in the last 24 h)",
        f"forwards: {forwards['pending']} pending, {forwards['sent']} sent, {forwards['dead']} dead",
        *_outbox_lines(status.get("outboxes", {})),
        f"spool: {spool_info['path']}, {spool_info['free_mb']} MiB free (reserve {spool_info['reserve_mb']:g} MiB)",
        f"model: {model['path']}"
        + ("" if model["present"] else " (missing)")
        + (
            f"; the workers run the champion {champion['version']} (sha256 {champion['sha256'][:12]}, registered "
            f"{champion['registered_at']})"
            if champion
            else "; no champion yet (no worker has loaded a model)"
        ),
        f"precision: {model['precision']['configured']} configured"
        + (f", last prediction in {model['precision']['last_used']}" if model["precision"]["last_used"] else ""),
    ]
    lines += _retraining_lines(status.get("retraining"))
    problems = status["problems"]
    lines.append("problems: none" if not problems else "problems:")
    lines += [f"  - {problem}" for problem in problems]
    return "\n".join(lines)


def _outbox_lines(outboxes: Mapping[str, Mapping[str, int]]) -> list[str]:
    """The STOW-RS outbox (``[dicomweb] destinations``), when it has rows; the SR forwards have their own line."""
    stow = outboxes.get("dicomweb", {})
    if not stow:
        return []
    return [f"STOW-RS: {stow.get('pending', 0)} pending, {stow.get('sent', 0)} sent, {stow.get('dead', 0)} dead"]


def _retraining_lines(retrain: Mapping[str, Any] | None) -> list[str]:
    """The schedule and the last retraining run (``cxr_triage.retrain.retraining``)."""
    if retrain is None:
        return []
    from cxr_triage.commands.retrain import format_run, format_schedule

    last = retrain["last_run"]
    return [format_schedule(retrain), "last retraining " + (format_run(last) if last else "run: none yet")]


def run(args: argparse.Namespace) -> int:
    from cxr_triage.core.bootstrap import CURRENT, run_command

    def body(context: Context) -> int:
        status = collect(context.db, context.settings, float(args.max_queue_age))
        print(json.dumps(status) if args.json else format_text(status))
        return 1 if status["problems"] else 0

    return run_command(args, "status", body, database=CURRENT)
