"""The training commands besides the two training phases: loading the data, evaluation, the Table 4 ablation and the
one-shot run that chains pretraining (``training.pretrain``), fine-tuning (``training.finetune``) and evaluation.

Each ``run_*`` function takes the parsed arguments (``training.__main__``), does its work on the runtime's
device, writes its files under ``args.out`` (rank 0 only) and returns a small result object, so that ``oneshot``
chains them and tests can look inside.

Files (all under ``--out``): evaluate: ``metrics.json``, ``report.md``, ``curves.png``, ``confusion.png``,
``roc.png``; ablation: ``ablation.json``, ``report.md``, ``ablation.png`` and one sub-folder per head; oneshot: the
files of docs/TRAINING.md, with its intermediate state under ``--work``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxr_triage.ml.checkpoint import load_classifier, save_classifier
from cxr_triage.ml.model import HEADS, CAEClassifier, keras_parameter_count
from training import data as data_mod
from training.engine import (
    Deadline,
    Runtime,
    evaluate,
    plain_args,
    unwrap,
)
from training.finetune import FinetuneResult, model_card, run_finetune
from training.metrics import classification_metrics, per_source_metrics
from training.pack import decode_pack, load_pack
from training.pretrain import PretrainResult, run_pretrain
from training.report import report_from_summary, write_json

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------- data


def load_data(args: argparse.Namespace, rt: Runtime) -> data_mod.ImageSet:
    """The image set named by ``--pack`` (decoded on the runtime's device) or ``--manifest`` (decoded on the CPU)."""
    t0 = time.perf_counter()
    if getattr(args, "pack", None):
        data = decode_pack(load_pack(args.pack), device=rt.device)
        where = f"pack {args.pack}"
    elif getattr(args, "manifest", None):
        manifest = data_mod.read_manifest(args.manifest, args.root)
        split = data_mod.split_records(manifest.records, seed=args.split_seed)
        data = data_mod.load_manifest_images(manifest, split, progress=rt.progress).to(rt.device)
        where = f"manifest {args.manifest}"
    else:
        raise SystemExit("no data: give --pack PACK or --manifest CSV|FOLDER (or set them in the config)")
    seconds = time.perf_counter() - t0
    data.meta["load_seconds"] = round(seconds, 2)
    if rt.is_main:
        logger.info("%d images from %s decoded on %s in %.1f s", len(data), where, rt.device, seconds)
        logger.info("class balance:\n%s", data.table())
    for s in data_mod.SPLITS:
        if len(data.indices(s)) == 0:
            raise SystemExit(f"the {s} split is empty: not enough images/components for a 73/13.5/13.5 split")
    return data


# ------------------------------------------------------------------------------------------------- evaluate


@dataclass
class EvaluateResult:
    metrics: dict[str, Any]
    labels: torch.Tensor
    probabilities: torch.Tensor
    seconds: float


def evaluate_classifier(
    model: nn.Module, data: data_mod.ImageSet, rt: Runtime, split: str = "test", batch_size: int = 256
) -> EvaluateResult:
    """Metrics of ``model`` on one split, computed on this process (the whole split)."""
    module = rt.prepare(unwrap(model)).eval()
    indices = data.indices(split)
    res = evaluate(module, data, indices, rt, batch_size, gather=False)
    metrics = classification_metrics(res.labels, res.probabilities, data.class_names)
    assert data.sources is not None
    metrics["per_source"] = per_source_metrics(
        res.labels, res.probabilities, data.sources[indices].cpu(), data.source_names, data.class_names
    )
    metrics["split"] = split
    metrics["loss"] = res.loss
    metrics["images_per_second"] = round(len(res.labels) / res.seconds, 1) if res.seconds else 0.0
    return EvaluateResult(metrics, res.labels, res.probabilities, res.seconds)


def run_evaluate(args: argparse.Namespace, rt: Runtime, data: data_mod.ImageSet) -> EvaluateResult:
    if not args.model:
        raise SystemExit("evaluate needs --model PATH (a classifier checkpoint, e.g. the finetune model.pt)")
    loaded = load_classifier(args.model)
    result = evaluate_classifier(loaded.model, data, rt, args.split, args.eval_batch_size)
    if rt.is_main:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        prov = loaded.card.provenance
        payload = {
            "title": f"cxr-triage evaluation: {Path(args.model).name}",
            "model": str(args.model),
            "model_sha256": loaded.sha256,
            "model_version": loaded.card.model_version,
            "spec": loaded.card.spec.to_dict(),
            "data": data.meta,
            "counts": data.counts(),
            "metrics": result.metrics,
            "facts": {"model sha256": loaded.sha256, "spec": loaded.card.spec.to_dict(), "split": args.split},
            "pretrain_history": prov.get("pretrain_history", []),
            "finetune_history": prov.get("history", []),
            "predictions": predictions_json(result),
        }
        write_json(out / "metrics.json", payload)
        report_from_summary(out, payload)
        _print_metrics(result.metrics)
    return result


def predictions_json(result: EvaluateResult) -> dict[str, Any]:
    """Labels and probabilities as plain lists, so plots can be redrawn from metrics.json alone."""
    return {
        "labels": result.labels.tolist(),
        "probabilities": [[round(p, 6) for p in row] for row in result.probabilities.tolist()],
    }


def _print_metrics(m: dict[str, Any]) -> None:
    print(
        f"{m['split']}: {m['images']} images, accuracy {100 * m['accuracy']:.2f} %, "
        f"macro AUC {100 * m['macro']['auc']:.2f} %, macro F1 {100 * m['macro']['f1']:.2f} %"
    )


# ------------------------------------------------------------------------------------------------- ablation


def run_ablation(
    args: argparse.Namespace,
    rt: Runtime,
    data: data_mod.ImageSet,
    deadline: Deadline | None = None,
    out: Path | None = None,
) -> list[dict[str, Any]]:
    """Fine-tune and test each Table 4 head from the same encoder, on the same split, epochs and time share."""
    out = Path(out or args.out)
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    unknown = set(heads) - set(HEADS)
    if unknown:
        raise SystemExit(f"unknown head(s) {sorted(unknown)}; expected some of {', '.join(HEADS)}")
    rows: list[dict[str, Any]] = []
    for i, head in enumerate(heads):
        head_deadline = deadline.sub(deadline.remaining() / (len(heads) - i)) if deadline is not None else None
        t0 = time.perf_counter()
        ft = run_finetune(
            args, rt, data, head_deadline, head=head, out=out / head, provenance={"command": "ablation", "head": head}
        )
        ev = evaluate_classifier(ft.model, data, rt, "test", args.eval_batch_size)
        m = ev.metrics
        rows.append(
            {
                "head": head,
                "accuracy": m["accuracy"],
                "precision": m["macro"]["precision"],
                "recall": m["macro"]["recall"],
                "specificity": m["macro"]["specificity"],
                "f1": m["macro"]["f1"],
                "auc": m["macro"]["auc"],
                "best_val_loss": ft.best_val_loss,
                "parameters": keras_parameter_count(ft.model),
                "epochs": ft.epochs,
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
        if rt.is_main:
            logger.info("ablation %s: test accuracy %.4f, macro AUC %.4f", head, m["accuracy"], m["macro"]["auc"])
        if Deadline.stop_requested:
            break
    if rt.is_main:
        write_json(out / "ablation.json", {"heads": rows, "counts": data.counts(), "args": plain_args(args)})
    return rows


# --------------------------------------------------------------------------------------------------- oneshot


def base_provenance(args: argparse.Namespace, rt: Runtime, data: data_mod.ImageSet) -> dict[str, Any]:
    """What every checkpoint records about how it was made."""
    return {
        "command": " ".join(["python -m training", *sys.argv[1:]]),
        "config": plain_args(args),
        "data": {k: v for k, v in data.meta.items() if k != "load_seconds"},
        "counts": data.counts(),
        "seed": args.seed,
        "device": rt.device_name,
        "world_size": rt.world_size,
        "torch": str(torch.__version__),
    }


class _FileLog:
    """Adds a log file handler on the root logger for the duration of a run."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def __enter__(self) -> _FileLog:
        root = logging.getLogger()
        self.level = root.level
        root.addHandler(self.handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        root.removeHandler(self.handler)
        root.setLevel(self.level)
        self.handler.close()


def run_oneshot(args: argparse.Namespace, rt: Runtime) -> dict[str, Any]:
    """Pretrain, fine-tune, evaluate (and ablate) within ``--budget-seconds``; everything lands in ``--out``.

    Budget: data loading first; then a reserve for evaluation and plots is set aside, and what is left is shared
    out as it is reached: pretraining ``pretrain_share``, the rest to fine-tuning (phase 1 takes ``phase1_share``
    of it), and with ``--ablation`` the four heads take ``ablation_share`` of the whole. A phase that finishes
    early leaves its time to the next. Every phase checkpoints, so a stop (budget or SIGTERM) loses nothing
    finished; ``--resume`` continues in the same folder.
    """
    started = float(getattr(args, "_startup_seconds", 0.0))
    wall0 = time.perf_counter() - started
    deadline = Deadline(args.budget_seconds, start=time.monotonic() - started)
    Deadline.install_signal_handlers()
    out = Path(args.out)
    work = Path(args.work) if getattr(args, "work", None) else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    with _FileLog(out / "train.log") if rt.is_main else contextlib.nullcontext():
        _log_oneshot_start(args, rt, started)
        data = load_data(args, rt)
        train_deadline, main_deadline = _oneshot_deadlines(args, deadline)
        times = _Times(wall={"load": data.meta["load_seconds"]}, ips={})
        provenance = base_provenance(args, rt, data)
        pre = _oneshot_pretrain(args, rt, data, work, main_deadline, times, provenance)
        if Deadline.stop_requested:
            logger.warning("stopped after pretraining; encoder kept in %s", pre.encoder_path)
            return {"stopped": "signal", "phase": "pretrain"}
        ft_args = argparse.Namespace(**{**vars(args), "encoder": str(pre.encoder_path), "out": str(work / "finetune")})
        ft = _oneshot_finetune(ft_args, rt, data, main_deadline, times, provenance)
        ev = _evaluate_as_shipped(ft.model, args, rt, data, times)
        rows: list[dict[str, Any]] = []
        if args.ablation and not Deadline.stop_requested:
            t0 = time.perf_counter()
            ab_args = argparse.Namespace(**{**vars(ft_args), "out": str(work / "ablation")})
            rows = run_ablation(ab_args, rt, data, train_deadline)
            times.wall["ablation"] = round(time.perf_counter() - t0, 2)
        times.wall["total"] = round(time.perf_counter() - wall0, 2)
        summary: dict[str, Any] = {}
        if rt.is_main:
            sha, size_mib = _save_oneshot_model(out / "model.pt", args, ft, ev, times, provenance)
            summary = _oneshot_summary(args, rt, data, _OneshotParts(pre, ft, ev, rows), times, sha, size_mib)
            write_json(out / "metrics.json", summary)
            report_from_summary(out, summary)
            logger.info(
                "oneshot done in %.1f s: test accuracy %.4f, macro AUC %.4f; outputs in %s",
                times.wall["total"],
                ev.metrics["accuracy"],
                ev.metrics["macro"]["auc"],
                out,
            )
            _print_metrics(ev.metrics)
        rt.barrier()
        return summary


@dataclass
class _Times:
    """Wall seconds and images per second of each step of a one-shot run, in the order the steps ran."""

    wall: dict[str, float]
    ips: dict[str, float]


@dataclass
class _OneshotParts:
    """What the steps of a one-shot run returned."""

    pre: PretrainResult
    ft: FinetuneResult
    ev: EvaluateResult
    ablation: list[dict[str, Any]]


def _log_oneshot_start(args: argparse.Namespace, rt: Runtime, started: float) -> None:
    logger.info("process started %.1f s ago (imports, CUDA set-up): counted in the budget", started)
    logger.info(
        "oneshot: budget %.0f s on %s (%d process(es)); command: %s",
        args.budget_seconds,
        rt.device_name,
        rt.world_size,
        " ".join(sys.argv),
    )


def _oneshot_deadlines(args: argparse.Namespace, deadline: Deadline) -> tuple[Deadline, Deadline]:
    """The training deadline (all but the reserve for evaluation and plots) and, within it, the main run's."""
    reserve = max(args.reserve_seconds, 0.05 * args.budget_seconds)
    train_deadline = deadline.sub(deadline.remaining() - reserve)
    if args.ablation:
        main_deadline = train_deadline.sub((1 - args.ablation_share) * train_deadline.remaining())
    else:
        main_deadline = train_deadline
    return train_deadline, main_deadline


def _oneshot_pretrain(
    args: argparse.Namespace,
    rt: Runtime,
    data: data_mod.ImageSet,
    work: Path,
    deadline: Deadline,
    times: _Times,
    provenance: dict[str, Any],
) -> PretrainResult:
    """Pretrain in ``work/pretrain`` on ``pretrain_share`` of what ``deadline`` leaves; time and history recorded."""
    pre_args = argparse.Namespace(**{**vars(args), "out": str(work / "pretrain")})
    pre = run_pretrain(pre_args, rt, data, deadline.sub(args.pretrain_share * deadline.remaining()))
    times.wall["pretrain"], times.ips["pretrain"] = round(pre.seconds, 2), round(pre.images_per_second, 1)
    provenance.update(
        {"pretrain_history": pre.history, "pretrain_epochs": pre.epochs, "pretrain_best_val_mse": pre.best_val_mse}
    )
    return pre


def _oneshot_finetune(
    ft_args: argparse.Namespace,
    rt: Runtime,
    data: data_mod.ImageSet,
    deadline: Deadline,
    times: _Times,
    provenance: dict[str, Any],
) -> FinetuneResult:
    """Fine-tune (``ft_args`` name the encoder and folder) within ``deadline``; time and speed per phase recorded."""
    # the checkpoints written during fine-tuning record the times so far (the same dicts, filled in as it runs)
    provenance.update({"wall_seconds": times.wall, "images_per_second": times.ips})
    t0 = time.perf_counter()
    ft = run_finetune(ft_args, rt, data, deadline, provenance=provenance)
    times.wall["finetune"] = round(time.perf_counter() - t0, 2)
    times.wall.update({f"finetune_{k}": v for k, v in ft.phase_seconds.items()})
    times.ips.update({f"finetune_{k}": v for k, v in ft.phase_images_per_second.items()})
    return ft


def _evaluate_as_shipped(
    model: CAEClassifier, args: argparse.Namespace, rt: Runtime, data: data_mod.ImageSet, times: _Times
) -> EvaluateResult:
    """Test metrics of the weights as shipped: model.pt stores them in fp16, so ``model`` is rounded in place."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    t0 = time.perf_counter()
    ev = evaluate_classifier(model, data, rt, "test", args.eval_batch_size)
    times.wall["evaluate"] = round(time.perf_counter() - t0, 2)
    times.ips["evaluate"] = ev.metrics["images_per_second"]
    return ev


def _save_oneshot_model(
    path: Path,
    args: argparse.Namespace,
    ft: FinetuneResult,
    ev: EvaluateResult,
    times: _Times,
    provenance: dict[str, Any],
) -> tuple[str, float]:
    """Write the fine-tuned model (fp16) with the whole run's provenance to ``path``; its sha256 and size in MiB."""
    provenance.update(
        {
            "history": ft.history,
            "best_val_loss": ft.best_val_loss,
            "phase2_frozen_blocks": args.phase2_frozen_blocks,
            "wall_seconds": times.wall,
            "images_per_second": times.ips,
            "test": {"accuracy": ev.metrics["accuracy"], "macro_auc": ev.metrics["macro"]["auc"]},
        }
    )
    card = model_card(ft.model.spec, provenance, args.model_version)
    sha = save_classifier(path, ft.model, card, dtype=torch.float16)
    return sha, path.stat().st_size / (1 << 20)


def _oneshot_summary(
    args: argparse.Namespace,
    rt: Runtime,
    data: data_mod.ImageSet,
    parts: _OneshotParts,
    times: _Times,
    sha: str,
    size_mib: float,
) -> dict[str, Any]:
    """The one-shot run's metrics.json payload (``report_from_summary`` draws report.md and the plots from it)."""
    return {
        "title": "cxr-triage one-shot training run",
        "model": "model.pt",
        "model_sha256": sha,
        "model_mib": round(size_mib, 2),
        "model_version": args.model_version,
        "spec": parts.ft.model.spec.to_dict(),
        "metrics": parts.ev.metrics,
        "ablation": parts.ablation,
        "wall_seconds": times.wall,
        "images_per_second": times.ips,
        "device": rt.device_name,
        "counts": data.counts(),
        "seed": args.seed,
        "budget_seconds": args.budget_seconds,
        "config": plain_args(args),
        "facts": {
            "device": rt.device_name,
            "budget seconds": args.budget_seconds,
            "wall seconds": times.wall,
            "images/s": times.ips,
            "model": f"model.pt ({size_mib:.2f} MiB, sha256 {sha[:16]}...)",
            "spec": parts.ft.model.spec.to_dict(),
            "seed": args.seed,
            "counts": data.counts(),
        },
        "notes": oneshot_notes(args, parts.pre),
        "pretrain_history": parts.pre.history,
        "finetune_history": parts.ft.history,
        "predictions": predictions_json(parts.ev),
    }


def oneshot_notes(args: argparse.Namespace, pre: PretrainResult) -> list[str]:
    notes = [
        f"Pretraining: Adam lr {args.pretrain_lr} (paper 0.01), batch {args.pretrain_batch_size}, "
        f"{pre.epochs} epoch(s){'' if pre.complete else ' (stopped by the time budget)'}.",
        f"Phase 1 (encoder frozen): Adam lr {args.phase1_lr}, batch {args.phase1_batch_size}, "
        f"up to {args.phase1_epochs} epochs, patience {args.phase1_patience}.",
        f"Phase 2 (all layers): Adam lr {args.phase2_lr} (paper 1e-3), batch {args.phase2_batch_size} (paper 16), "
        f"up to {args.phase2_epochs} epochs, patience {args.phase2_patience}.",
        "Convolutions He-initialised before pretraining (PyTorch's default starts in a flat region).",
        "Model kept: lowest validation loss over both phases. The test split was used only for this report.",
        "Metrics are those of the fp16-rounded weights that model.pt holds.",
    ]
    return notes
