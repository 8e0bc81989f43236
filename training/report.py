"""What a person reads after a run: metrics JSON, a Markdown report and PNG plots (matplotlib, Agg backend).

Plots: ``curves.png`` (autoencoder MSE; classifier loss and accuracy per epoch, phases marked),
``confusion.png`` (counts and row percentages), ``roc.png`` (one-vs-rest ROC per class with its AUC),
``ablation.png`` (Table 4 heads side by side) when an ablation ran.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cxr_triage.files import write_atomic
from training.metrics import roc_curve

logger = logging.getLogger(__name__)

DATA_CAVEATS = (
    "Known data biases (data/README.md): nearly all pneumonia images are paediatric (Kermany) and COVID images are "
    "adult, so a model can learn age or source instead of disease; the small 3-class source has label noise. "
    "Research use only, not for clinical use."
)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_json(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(_json_safe(payload), indent=2) + "\n").encode("utf-8"))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def plot_curves(
    path: str | os.PathLike[str], pretrain_history: Sequence[dict], finetune_history: Sequence[dict]
) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    if pretrain_history:
        ep = [h["epoch"] for h in pretrain_history]
        ax.plot(ep, [h["train_loss"] for h in pretrain_history], "o-", label="train")
        ax.plot(ep, [h["val_mse"] for h in pretrain_history], "s-", label="validation")
        ax.set_yscale("log")
        ax.set_xlim(min(ep) - 0.5, max(ep) + 0.5)
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no pretraining history", ha="center", va="center", transform=ax.transAxes)
    ax.set(title="Autoencoder reconstruction (MSE)", xlabel="epoch", ylabel="MSE")
    steps = list(range(1, len(finetune_history) + 1))
    for ax, key, title in ((axes[1], "loss", "Classifier loss (cross-entropy)"), (axes[2], "accuracy", "Accuracy")):
        if finetune_history:
            ax.plot(steps, [h[f"train_{key}"] for h in finetune_history], "o-", label="train")
            ax.plot(steps, [h[f"val_{key}"] for h in finetune_history], "s-", label="validation")
            boundaries = [
                i + 0.5
                for i in range(1, len(finetune_history))
                if finetune_history[i]["phase"] == 2 and finetune_history[i - 1]["phase"] == 1
            ]
            for b in boundaries:
                ax.axvline(b, color="grey", ls="--", lw=1)
                ax.text(b, ax.get_ylim()[1], " phase 2: all layers", va="top", fontsize=8, color="grey")
            best = min(range(len(finetune_history)), key=lambda i: finetune_history[i]["val_loss"])
            ax.plot(steps[best], finetune_history[best][f"val_{key}"], "*", ms=14, color="gold", label="kept")
            ax.set_xlim(0.5, len(steps) + 0.5)
            ax.legend()
        ax.set(title=title, xlabel="epoch (phase 1 then phase 2)")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(
    path: str | os.PathLike[str], cm: Sequence[Sequence[int]], class_names: Sequence[str], split: str = "test"
) -> None:
    plt = _pyplot()
    m = torch.tensor(cm, dtype=torch.float64)
    rows = m.sum(1, keepdim=True).clamp_min(1)
    frac = (m / rows).numpy()
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            ax.text(
                j,
                i,
                f"{int(m[i, j])}\n{100 * frac[i, j]:.1f}%",
                ha="center",
                va="center",
                color="white" if frac[i, j] > 0.5 else "black",
                fontsize=10,
            )
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set(xlabel="predicted", ylabel="true", title=f"Confusion matrix ({split} split; row %)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(
    path: str | os.PathLike[str], labels: torch.Tensor, probabilities: torch.Tensor, metrics: dict[str, Any]
) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, zoom in zip(axes, (False, True), strict=True):
        for k, name in enumerate(metrics["class_names"]):
            fpr, tpr = roc_curve(probabilities[:, k], labels == k)
            auc = metrics["per_class"][name]["auc"]
            ax.plot(fpr, tpr, lw=2, label=f"{name} (AUC {100 * auc:.2f}%)" if auc == auc else name)
        ax.plot([0, 1], [0, 1], ":", color="grey")
        if zoom:
            ax.set(xlim=(0, 0.2), ylim=(0.8, 1.0), title="ROC, top-left corner")
        else:
            ax.set(
                xlim=(0, 1), ylim=(0, 1.01), title=f"ROC one-vs-rest (macro AUC {100 * metrics['macro']['auc']:.2f}%)"
            )
        ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)")
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ablation(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> None:
    plt = _pyplot()
    keys = ("accuracy", "precision", "recall", "f1", "auc")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        vals = [100 * (row[k] if row[k] is not None else 0.0) for k in keys]
        bars = ax.bar([j + i * width for j in range(len(keys))], vals, width, label=row["head"])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(keys))], keys)
    low = min((100 * (r[k] or 0.0) for r in rows for k in keys), default=0.0)
    ax.set(ylim=(max(0.0, low - 5), 100.5), ylabel="% (test split, macro)", title="Table 4 heads: same split, budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fact(value: Any) -> str:
    """A table cell: strings as they are, flat dicts as ``key value, ...``, anything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and all(isinstance(v, str | int | float) for v in value.values()):
        return ", ".join(f"{k} {v:,}" if isinstance(v, int | float) else f"{k} {v}" for k, v in value.items())
    return json.dumps(_json_safe(value))


def _pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.2f}"


def metrics_markdown(metrics: dict[str, Any]) -> str:
    names = metrics["class_names"]
    lines = [
        f"Images: {metrics['images']:,}. **Accuracy {_pct(metrics['accuracy'])} %**, "
        f"**macro AUC {_pct(metrics['macro']['auc'])} %**.",
        "",
        "| class | support | precision | recall (sensitivity) | specificity | F1 | AUC |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n in names:
        c = metrics["per_class"][n]
        lines.append(
            f"| {n} | {c['support']} | {_pct(c['precision'])} | {_pct(c['recall'])} | {_pct(c['specificity'])} "
            f"| {_pct(c['f1'])} | {_pct(c['auc'])} |"
        )
    m = metrics["macro"]
    lines.append(
        f"| **macro** | {metrics['images']} | {_pct(m['precision'])} | {_pct(m['recall'])} | "
        f"{_pct(m['specificity'])} | {_pct(m['f1'])} | {_pct(m['auc'])} |"
    )
    lines += [
        "",
        "Confusion matrix (rows true, columns predicted):",
        "",
        "| true \\ predicted | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for n, row in zip(names, metrics["confusion_matrix"], strict=True):
        lines.append(f"| {n} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


def ablation_markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| head | accuracy | precision | recall | F1 | AUC | parameters (Keras count) | epochs | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['head']} | {_pct(r['accuracy'])} | {_pct(r['precision'])} | {_pct(r['recall'])} | {_pct(r['f1'])} "
            f"| {_pct(r['auc'])} | {r['parameters']:,} | {r['epochs']} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def report_from_summary(out_dir: str | os.PathLike[str], summary: dict[str, Any]) -> list[Path]:
    """Write report.md and plots from a metrics.json payload (``python -m training report`` redraws them)."""
    pred = summary.get("predictions") or {}
    labels = torch.tensor(pred["labels"], dtype=torch.int64) if pred else None
    probs = torch.tensor(pred["probabilities"], dtype=torch.float32) if pred else None
    return write_report(
        out_dir,
        title=summary.get("title", "cxr-triage training report"),
        metrics=summary.get("metrics"),
        labels=labels,
        probabilities=probs,
        pretrain_history=summary.get("pretrain_history") or (),
        finetune_history=summary.get("finetune_history") or (),
        ablation=summary.get("ablation") or summary.get("heads") or (),
        facts=summary.get("facts"),
        notes=summary.get("notes") or (),
    )


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_report(
    out_dir: str | os.PathLike[str],
    *,
    title: str,
    metrics: dict[str, Any] | None,
    labels: torch.Tensor | None = None,
    probabilities: torch.Tensor | None = None,
    pretrain_history: Sequence[dict] = (),
    finetune_history: Sequence[dict] = (),
    ablation: Sequence[dict[str, Any]] = (),
    facts: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> list[Path]:
    """Write report.md and the plots that the available results allow; return the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = _write_plots(out, metrics, labels, probabilities, pretrain_history, finetune_history, ablation)
    md = report_markdown(title, metrics, pretrain_history, finetune_history, ablation, facts, notes)
    (out / "report.md").write_text(md, encoding="utf-8")
    written.append(out / "report.md")
    return written


def _write_plots(
    out: Path,
    metrics: dict[str, Any] | None,
    labels: torch.Tensor | None,
    probabilities: torch.Tensor | None,
    pretrain_history: Sequence[dict],
    finetune_history: Sequence[dict],
    ablation: Sequence[dict[str, Any]],
) -> list[Path]:
    """The PNG plots that the available results allow (none, with a warning, without matplotlib); the files."""
    written: list[Path] = []
    if not have_matplotlib():
        logger.warning(
            "matplotlib is not installed: no PNG plots. metrics.json holds what they need; redraw them where "
            "matplotlib is installed with `python -m training report --run %s`",
            out,
        )
        return written
    if pretrain_history or finetune_history:
        plot_curves(out / "curves.png", pretrain_history, finetune_history)
        written.append(out / "curves.png")
    if metrics is not None:
        plot_confusion(
            out / "confusion.png", metrics["confusion_matrix"], metrics["class_names"], metrics.get("split", "test")
        )
        written.append(out / "confusion.png")
        if labels is not None and probabilities is not None:
            plot_roc(out / "roc.png", labels, probabilities, metrics)
            written.append(out / "roc.png")
    if ablation:
        plot_ablation(out / "ablation.png", ablation)
        written.append(out / "ablation.png")
    return written


def report_markdown(
    title: str,
    metrics: dict[str, Any] | None,
    pretrain_history: Sequence[dict] = (),
    finetune_history: Sequence[dict] = (),
    ablation: Sequence[dict[str, Any]] = (),
    facts: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> str:
    """The text of report.md: caveats, test metrics, training curves and table, ablation, run facts, notes."""
    md = [f"# {title}", "", DATA_CAVEATS, ""]
    if metrics is not None:
        md += [f"## {metrics.get('split', 'test').capitalize()} split", "", metrics_markdown(metrics), ""]
        md += ["![confusion matrix](confusion.png) ![ROC curves](roc.png)", ""]
    if pretrain_history or finetune_history:
        md += ["## Training", "", "![training curves](curves.png)", ""]
        if finetune_history:
            md += [*history_markdown(finetune_history), ""]
    if ablation:
        md += ["## Ablation (Table 4 heads)", "", ablation_markdown(ablation), "", "![ablation](ablation.png)", ""]
    if facts:
        md += ["## Run", "", "| | |", "|---|---|"]
        md += [f"| {k} | {_fact(v)} |" for k, v in facts.items()]
        md.append("")
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(md)


def history_markdown(finetune_history: Sequence[dict]) -> list[str]:
    """The fine-tuning history as the lines of a Markdown table, one row per epoch."""
    lines = [
        "| phase | epoch | train loss | train acc | val loss | val acc | s | images/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for h in finetune_history:
        lines.append(
            f"| {h['phase']} | {h['epoch']} | {h['train_loss']:.4f} | {_pct(h['train_accuracy'])} | "
            f"{h['val_loss']:.4f} | {_pct(h['val_accuracy'])} | {h['seconds']:.1f} | "
            f"{h['images_per_second']:,.0f} |"
        )
    return lines
