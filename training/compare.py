"""``python -m training compare``: would the challenger replace the champion? The product's shipping rule, offline.

Two ways in:

- two classifier checkpoints (``--champion``, ``--challenger``) and data (``--pack`` or ``--manifest``): each is
  evaluated on ``--split`` exactly as ``python -m training evaluate`` evaluates one
  (``training.commands.run_evaluate``), its ``metrics.json``, report and plots written under ``OUT/champion`` and
  ``OUT/challenger``;
- two ``metrics.json`` files that ``evaluate`` wrote earlier (``--champion-metrics``, ``--challenger-metrics``),
  read as they are (nothing is recomputed).

Either way the decision is made from the two ``metrics.json`` files, so the same figures give the same decision:
each is summarised as the retraining job's evaluations are (``training.retrain.summarise``) and the runtime's rule
decides (``cxr_triage.ml.decision.decide``: a higher macro AUC by at least ``--margin``, no class's sensitivity
lower by more than ``--sensitivity-tolerance``). Both files must be of the same images (split, count and labels).
The command prints a side-by-side table and the decision with its reason, writes ``OUT/compare.json`` (format
``cxr-triage-compare/1``) and exits 0 whatever the decision.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr_triage import CLASS_NAMES
from cxr_triage.ml.decision import Decision, decide

if TYPE_CHECKING:
    from training.data import ImageSet
    from training.engine import Runtime

FORMAT = "cxr-triage-compare/1"
ROLES = ("champion", "challenger")
USAGE = (
    "compare needs --champion A.pt --challenger B.pt (with --pack or --manifest), "
    "or --champion-metrics F.json --challenger-metrics G.json"
)


def compare_mode(args: argparse.Namespace) -> str:
    """``checkpoints`` or ``metrics``: which pair the arguments name (exactly one complete pair, or a usage error)."""
    checkpoints = [getattr(args, role) for role in ROLES]
    metrics = [getattr(args, f"{role}_metrics") for role in ROLES]
    if all(checkpoints) and not any(metrics):
        return "checkpoints"
    if all(metrics) and not any(checkpoints):
        return "metrics"
    raise SystemExit(USAGE)


def compare_checkpoints(args: argparse.Namespace, rt: Runtime, data: ImageSet) -> dict[str, Any]:
    """Evaluate both checkpoints as ``evaluate`` does, then compare their metrics.json files (rank 0)."""
    from training.commands import run_evaluate

    out = Path(args.out)
    for role in ROLES:
        one = argparse.Namespace(**{**vars(args), "model": getattr(args, role), "out": str(out / role)})
        run_evaluate(one, rt, data)
    if not rt.is_main:
        return {}
    return compare_files(args, out / "champion" / "metrics.json", out / "challenger" / "metrics.json")


def compare_metrics_files(args: argparse.Namespace) -> int:
    """``--champion-metrics`` and ``--challenger-metrics``: compare the two files as they are; exit status 0."""
    compare_files(args, Path(args.champion_metrics), Path(args.challenger_metrics))
    return 0


def compare_files(args: argparse.Namespace, champion_file: Path, challenger_file: Path) -> dict[str, Any]:
    """Decide from two evaluate metrics.json files, print the table and the decision, write OUT/compare.json."""
    from training.report import write_json
    from training.retrain import summarise

    files = {"champion": champion_file, "challenger": challenger_file}
    payloads = {role: read_metrics(path) for role, path in files.items()}
    metrics = same_set(payloads["champion"], payloads["challenger"], champion_file, challenger_file)
    summaries = {role: summarise(payloads[role]["metrics"]) for role in ROLES}
    decision = decide(summaries["champion"], summaries["challenger"], args.margin, args.sensitivity_tolerance)
    rows = table_rows(summaries["champion"], summaries["challenger"])
    result = {
        "format": FORMAT,
        "split": metrics.get("split"),
        "images": metrics["images"],
        "margin": args.margin,
        "sensitivity_tolerance": args.sensitivity_tolerance,
        **{role: _model_facts(files[role], payloads[role], summaries[role]) for role in ROLES},
        "table": rows,
        "decision": {"promote": decision.promote, "verdict": verdict(decision), "reason": decision.reason,
                     "figures": decision.figures},
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare.json", result)
    print(format_table(rows, result))
    print(f"decision: {verdict(decision)}\nreason: {decision.reason}\n{out / 'compare.json'}")
    return result


def read_metrics(path: Path) -> dict[str, Any]:
    """A metrics.json written by ``evaluate`` (or ``oneshot``), checked to hold what the rule reads."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"), parse_constant=lambda _: None)  # NaN: undefined
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{path}: cannot read it as JSON: {exc}") from exc
    metrics = payload.get("metrics") if isinstance(payload, dict) else None
    wanted = ("images", "accuracy", "macro", "per_class", "confusion_matrix")
    if not isinstance(metrics, dict) or any(key not in metrics for key in wanted):
        raise SystemExit(f"{path}: not a metrics.json written by `python -m training evaluate`")
    missing = [name for name in CLASS_NAMES if name not in metrics["per_class"]]
    if missing:
        raise SystemExit(f"{path}: no figures for the class(es) {', '.join(missing)}")
    return payload


def same_set(
    champion: dict[str, Any], challenger: dict[str, Any], champion_file: Path, challenger_file: Path
) -> dict[str, Any]:
    """The champion's metrics, once both files are known to be of the same images (the rule compares on one set)."""
    a, b = champion["metrics"], challenger["metrics"]
    if (a.get("split"), a["images"]) != (b.get("split"), b["images"]):
        raise SystemExit(
            f"{champion_file} is of the {a.get('split')} split ({a['images']} images), {challenger_file} of the "
            f"{b.get('split')} split ({b['images']} images): the shipping rule compares two models on the same images"
        )
    labels = [p.get("predictions", {}).get("labels") for p in (champion, challenger)]
    if None not in labels and labels[0] != labels[1]:
        raise SystemExit(
            f"{champion_file} and {challenger_file} are of different images (their true labels differ): the "
            "shipping rule compares two models on the same images"
        )
    return a


def _model_facts(path: Path, payload: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    return {"metrics_file": str(path), "model": payload.get("model"), "model_version": payload.get("model_version"),
            "model_sha256": payload.get("model_sha256"), "metrics": summary}  # fmt: skip


def table_rows(champion: dict[str, Any], challenger: dict[str, Any]) -> list[dict[str, Any]]:
    """The figures side by side: accuracy, macro AUC, then each class's sensitivity and AUC."""
    rows = [("accuracy", ("accuracy",)), ("macro AUC", ("macro_auc",))]
    rows += [(f"sensitivity {name}", ("per_class", name, "sensitivity")) for name in CLASS_NAMES]
    rows += [(f"AUC {name}", ("per_class", name, "auc")) for name in CLASS_NAMES]
    return [{"figure": label, "champion": _get(champion, keys), "challenger": _get(challenger, keys)}
            for label, keys in rows]  # fmt: skip


def _get(summary: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    value: Any = summary
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return None if value is None else float(value)


def format_table(rows: list[dict[str, Any]], result: dict[str, Any]) -> str:
    """The table as printed: one line per figure, the champion's, the challenger's and the change (4 decimals)."""
    lines = []
    for role in ROLES:
        facts = result[role]
        lines.append(f"{role}: {facts['model'] or facts['metrics_file']} ({facts['model_version'] or 'no version'})")
    head = f"{result['split']} split, {result['images']} images"
    lines.append(f"{head:<24} {'champion':>10} {'challenger':>10} {'change':>10}")
    for row in rows:
        before, after = row["champion"], row["challenger"]
        change = f"{after - before:+.4f}" if before is not None and after is not None else "n/a"
        lines.append(f"{row['figure']:<24} {_cell(before):>10} {_cell(after):>10} {change:>10}")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def verdict(decision: Decision) -> str:
    return "the challenger replaces the champion" if decision.promote else "the champion stays"
