"""``cxr-triage models``: the model registry (``cxr_triage.ml.registry``): list the versions, promote one to champion,
roll back to the champion before. Running workers (``serve``, ``worker``) take up a new champion within
``[model] reload_interval`` seconds, between batches.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from cxr_triage.core import db
from cxr_triage.core.bootstrap import CURRENT, CommandError, Context, run_command
from cxr_triage.ml import registry

KEY_METRICS = ("accuracy", "macro_auc", "macro_f1", "balanced_accuracy")
"""The evaluation figures ``list`` shows first, when a version has them (other top-level numbers follow)."""
SHOWN_METRICS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=("list", "promote", "rollback"),
        help="list: every version; promote ID: make it the champion; rollback: back to the champion before",
    )
    parser.add_argument("id", nargs="?", type=int, help="promote: the version id (the first column of `list`)")
    parser.add_argument("--config", default=None, help="configuration file (TOML)")
    parser.add_argument("--reason", default=None, help="promote, rollback: why, kept with the version's state")
    parser.add_argument("--json", action="store_true", help="list: one JSON object per version and line")


def key_metrics(metrics: dict[str, Any] | None) -> str:
    """A few evaluation figures, ``accuracy=0.885 macro_auc=0.975``; ``-`` when there are none."""
    if not metrics:
        return "-"
    numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    macro = metrics.get("macro")
    if isinstance(macro, dict):  # training.metrics' layout: per-class averages under "macro"
        for name in ("auc", "f1"):
            if isinstance(macro.get(name), int | float):
                numbers.setdefault(f"macro_{name}", macro[name])
    chosen = [k for k in KEY_METRICS if k in numbers] + sorted(k for k in numbers if k not in KEY_METRICS)
    return " ".join(f"{k}={numbers[k]:.3f}" for k in chosen[:SHOWN_METRICS]) or "-"


def _line(entry: registry.RegisteredModel) -> str:
    promoted = entry.promoted_at.strftime("%Y-%m-%d %H:%M:%S") if entry.promoted_at else "-"
    parent = str(entry.parent_id) if entry.parent_id is not None else "-"
    return "\t".join(
        [
            str(entry.id),
            entry.version,
            entry.sha256[:12],
            entry.state,
            parent,
            promoted,
            key_metrics(entry.metrics),
        ]
    )


HEADER = "\t".join(["id", "version", "sha256", "state", "parent", "promoted_at (UTC)", "metrics"])


def _describe(entry: registry.RegisteredModel | None) -> str:
    if entry is None:
        return "none"
    return f"version {entry.id} ({entry.version}, sha256 {entry.sha256[:12]})"


def _models(args: argparse.Namespace, context: Context) -> int:
    sessions = db.session_factory(context.db)
    models_dir = context.settings.model.models_dir
    if args.action == "list":
        versions = registry.list_versions(sessions)
        if args.json:
            for entry in versions:
                print(json.dumps(entry.to_json()))
        else:
            print(HEADER)
            for entry in versions:
                print(_line(entry))
        return 0
    before = registry.champion(sessions)
    try:
        if args.action == "promote":
            if args.id is None:
                raise CommandError("promote needs a version id (the first column of `cxr-triage models list`)")
            registry.promote(sessions, args.id, args.reason or "promoted with cxr-triage models", models_dir=models_dir)
        else:
            if args.id is not None:
                raise CommandError("rollback takes no version id: it returns to the champion before the current one")
            registry.rollback(sessions, args.reason or "rolled back with cxr-triage models", models_dir=models_dir)
    except registry.RegistryError as exc:
        raise CommandError(str(exc)) from exc
    after = registry.champion(sessions)
    was = f"{_describe(before)}, now retired" if before is not None else "there was none"
    print(f"champion: {_describe(after)} (was {was})")
    print(f"running workers switch to it within [model] reload_interval ({context.settings.model.reload_interval:g} s)")
    return 0


def run(args: argparse.Namespace) -> int:
    return run_command(args, "models", lambda context: _models(args, context), database=CURRENT)
