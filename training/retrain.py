"""``python -m training retrain``: a challenger fine-tuned from the champion on radiologist-confirmed images.

The runtime's retraining job (``cxr_triage.retrain.retraining``) runs this command as a subprocess and reads the JSON it
writes; nothing of the runtime is imported here beyond the model, checkpoint and pixel modules.

Data, all on the training device as one ``ImageSet``:

- **confirmed**: the images of ``--feedback`` (the worklist's feedback manifest: ``path,label,...``), training;
- **replay**: a seeded sample of the base pack's training split, ``--replay-ratio`` times the confirmed count
  (capped by what the split holds; images that are also in the feedback are left out), training, so that the
  model does not forget the base data while it learns the new;
- **validation**: a seeded sample of at most ``--val-images`` of the pack's validation split; it picks the epoch
  to keep (lowest validation loss), never the test split;
- **evaluation**: the FIXED held-out set: the pack's test split, or ``--eval-manifest`` when given. Champion and
  challenger are both evaluated on it, in this process, with the same code.

Training: the champion's weights; ``--head-epochs`` with the encoder frozen (the head on the encoder's features,
computed once), then ``--epochs`` with every layer at the low ``--lr`` on augmented images; the epoch with the
lowest validation loss is the challenger (stored in fp16 and evaluated as stored). Precision follows
``cxr_triage.ml.precision`` (``--amp`` auto: bf16 only where the hardware computes it).

Outputs (under ``--out``, each written atomically, the JSON last, so its presence means a finished run):
``challenger.pt`` (a ``cxr_triage.ml.checkpoint`` classifier whose provenance names the parent's sha256, the
feedback, the base pack and this command's configuration) and ``retrain.json`` (both models' metrics, data
counts, history, wall seconds). With ``--watch-parent`` the process exits at once when the process that started
it dies, so a killed retraining job leaves no training behind it and no half-written file.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from cxr_triage import CLASS_NAMES
from cxr_triage.files import file_sha256
from cxr_triage.ml.checkpoint import load_classifier, save_classifier
from cxr_triage.ml.imaging import IMAGE_SIZE
from cxr_triage.ml.model import CAEClassifier
from training import data as data_mod
from training.commands import evaluate_classifier
from training.engine import (
    Deadline,
    EpochStats,
    Runtime,
    Within,
    cpu_state_dict,
    evaluate,
    image_inputs,
    plain_args,
    train_one_epoch,
    unwrap,
)
from training.features import FeatureBank
from training.finetune import model_card
from training.loop import FitState, Phase, Validation, fit
from training.pack import decode_pack, load_pack
from training.report import write_json

logger = logging.getLogger(__name__)

FORMAT = "cxr-triage-retrain/1"
CHALLENGER_FILE = "challenger.pt"
RESULT_FILE = "retrain.json"
PARENT_CHECK_SECONDS = 1.0
EXIT_PARENT_GONE = 3


def default_version(parent: str) -> str:
    """``cae-lstm-1`` -> ``cae-lstm-1-r1``; ``cae-lstm-1-r4`` -> ``cae-lstm-1-r5``."""
    match = re.fullmatch(r"(.*)-r(\d+)", parent)
    return f"{match.group(1)}-r{int(match.group(2)) + 1}" if match else f"{parent}-r1"


def watch_parent() -> None:
    """Exit (status 3) as soon as this process's parent is gone: an orphaned retraining must not go on."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(PARENT_CHECK_SECONDS)
            if os.getppid() != parent:
                logger.error("retrain: the process that started this run (pid %d) is gone; stopping", parent)
                logging.shutdown()
                os._exit(EXIT_PARENT_GONE)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


# ----------------------------------------------------------------------------------------------------- data


def _subset_pack(pack: dict, indices: list[int]) -> dict:
    """The pack restricted to ``indices`` (so only those JPEGs are decoded)."""
    offsets = pack["offsets"].tolist()
    blobs = [pack["jpeg"][offsets[i] : offsets[i + 1]] for i in indices]
    new_offsets = torch.zeros(len(blobs) + 1, dtype=torch.int64)
    if blobs:
        new_offsets[1:] = torch.cumsum(torch.tensor([len(b) for b in blobs], dtype=torch.int64), 0)
    pick = torch.tensor(indices, dtype=torch.int64)
    sources = pack.get("sources")
    return {
        **pack,
        "jpeg": torch.cat(blobs) if blobs else torch.zeros(0, dtype=torch.uint8),
        "offsets": new_offsets,
        "labels": pack["labels"][pick],
        "split": pack["split"][pick],
        "sources": sources[pick] if sources is not None else None,
        "meta": {k: v for k, v in pack["meta"].items() if k != "paths"},
    }


def _sample(candidates: list[int], count: int, seed: int) -> list[int]:
    if count >= len(candidates):
        return list(candidates)
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return sorted(candidates[k] for k in order)


def _manifest_set(path: str, root: str | None, split: int) -> data_mod.ImageSet:
    manifest = data_mod.read_manifest(path, root)
    return data_mod.load_manifest_images(manifest, [split] * len(manifest))


def _concat(parts: list[data_mod.ImageSet], meta: dict[str, Any]) -> data_mod.ImageSet:
    """One ImageSet of ``parts`` (each already carrying its split), their source names merged."""
    names = sorted({n for part in parts for n in part.source_names})
    sources = []
    for part in parts:
        assert part.sources is not None
        remap = torch.tensor([names.index(n) for n in part.source_names], dtype=torch.int64)
        sources.append(remap[part.sources.cpu()])
    return data_mod.ImageSet(
        images=torch.cat([p.images.cpu() for p in parts]),
        labels=torch.cat([p.labels.cpu() for p in parts]),
        split=torch.cat([p.split.cpu() for p in parts]),
        class_names=CLASS_NAMES,
        meta=meta,
        sources=torch.cat(sources),
        source_names=tuple(names),
    )


def load_retrain_data(args: argparse.Namespace) -> tuple[data_mod.ImageSet, dict[str, Any]]:
    """The confirmed, replay, validation and evaluation images as one set (module docstring), and what it holds."""
    feedback = data_mod.read_manifest(args.feedback, args.feedback_root)
    confirmed = data_mod.load_manifest_images(feedback, [0] * len(feedback))
    feedback_paths = {str(r.path.resolve()) for r in feedback.records}
    pack = load_pack(args.pack)
    paths = [str(Path(p).resolve()) for p in pack["meta"].get("paths", [])]
    split = pack["split"].tolist()
    train = [i for i, s in enumerate(split) if s == 0 and (not paths or paths[i] not in feedback_paths)]
    replay = _sample(train, round(args.replay_ratio * len(confirmed)), args.seed)
    val = _sample([i for i, s in enumerate(split) if s == 1], args.val_images, args.seed + 1)
    parts = [confirmed, decode_pack(_subset_pack(pack, replay)), decode_pack(_subset_pack(pack, val))]
    if args.eval_manifest:
        parts.append(_manifest_set(args.eval_manifest, args.eval_root, 2))
        evaluation = {"kind": "manifest", "path": str(args.eval_manifest), "sha256": file_sha256(args.eval_manifest)}
    else:
        parts.append(decode_pack(_subset_pack(pack, [i for i, s in enumerate(split) if s == 2])))
        evaluation = {"kind": "pack test split", "path": str(args.pack)}
    if len(parts[3]) == 0:
        raise SystemExit("the evaluation set is empty: the pack has no test split and no --eval-manifest was given")
    facts = {
        "confirmed": len(confirmed),
        "confirmed_per_class": {n: int((confirmed.labels == c).sum()) for c, n in enumerate(CLASS_NAMES)},
        "replay": len(replay),
        "replay_available": len(train),
        "validation": len(val),
        "evaluation": {**evaluation, "images": len(parts[3])},
        "base_pack": {"path": str(args.pack), "sha256": file_sha256(args.pack), "seed": pack["meta"].get("seed")},
        "feedback_manifest": {"path": str(args.feedback), "sha256": file_sha256(args.feedback)},
    }
    data = _concat(parts, {"retrain": True})
    assert data.images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE)
    return data, facts


# ------------------------------------------------------------------------------------------------- training


def summarise(metrics: dict[str, Any]) -> dict[str, Any]:
    """What the promotion rule and the registry need of ``classification_metrics``' output (plain JSON)."""
    return {
        "images": metrics["images"],
        "accuracy": metrics["accuracy"],
        "macro_auc": metrics["macro"]["auc"],
        "macro_sensitivity": metrics["macro"]["sensitivity"],
        "per_class": {
            name: {k: values[k] for k in ("support", "sensitivity", "specificity", "auc")}
            for name, values in metrics["per_class"].items()
        },
        "confusion_matrix": metrics["confusion_matrix"],
        "loss": metrics.get("loss"),
    }


def _round_to_fp16(model: CAEClassifier) -> CAEClassifier:
    """The weights as the checkpoint stores them (fp16), so the challenger is evaluated as it will run."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    return model


def _temperature(
    model: CAEClassifier, parent_temperature: float, data: data_mod.ImageSet, rt: Runtime
) -> tuple[float, dict[str, Any]]:
    """A calibrated champion's challenger is calibrated again (temperature scaling on the validation images, as
    ``training.calibrate`` does): its own temperature and what the checkpoint records of it; 1.0 otherwise."""
    if parent_temperature == 1.0:
        return 1.0, {}
    from training.calibrate import fit_temperature, logits_of

    val = data.indices("val")
    module = unwrap(model).to("cpu").eval()
    logits = logits_of(module, data.images[val].cpu())
    fitted = float(min(20.0, max(0.05, fit_temperature(logits, data.labels[val].cpu()))))
    logger.info("retrain: temperature %.3f refitted on %d validation images (parent's %.3f)", fitted, len(val),
                parent_temperature)  # fmt: skip
    method = "temperature scaling on the retraining's validation images (NLL, LBFGS)"
    return fitted, {"method": method, "temperature": fitted, "parent_temperature": parent_temperature,
                    "validation_images": int(len(val))}  # fmt: skip


def fine_tune(
    model: CAEClassifier, args: argparse.Namespace, rt: Runtime, data: data_mod.ImageSet, deadline: Deadline | None
) -> tuple[CAEClassifier, FitState]:
    """Head-only epochs on cached encoder features, then every layer at the low rate; the best by validation loss."""
    net = rt.prepare(model)
    train_idx, val_idx = data.indices("train"), data.indices("val")
    progress = FitState()
    phases = [("retrain-head", args.head_epochs, args.head_lr, False), ("retrain-all", args.epochs, args.lr, True)]
    for number, (name, epochs, lr, encoder_trainable) in enumerate(phases, start=1):
        if epochs <= 0 or Deadline.stop_requested:
            continue
        if progress.best is not None:  # each phase starts from the best weights so far
            unwrap(net).load_state_dict(progress.best)
        unwrap(net).set_encoder_trainable(encoder_trainable)
        if encoder_trainable:
            trained, train_inputs, val_inputs = net, image_inputs(data, rt, args.augment, args.source_cues), None
        else:
            bank = FeatureBank(unwrap(net).encoder, data, torch.cat([train_idx, val_idx]), rt, args.eval_batch_size)
            trained, train_inputs, val_inputs = unwrap(net).head, bank.inputs, bank.inputs
        module = rt.wrap(trained)
        optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)

        def train_epoch(epoch: int, until: Deadline | None, within: Within, module=module, optimizer=optimizer,
                        inputs=train_inputs, number=number) -> EpochStats:  # fmt: skip
            return train_one_epoch(
                module, optimizer, inputs, train_idx, rt, batch_size=args.batch_size,
                seed=args.seed + 1000 * number, epoch=epoch, deadline=until, within=within,
            )  # fmt: skip

        def validate(module=module, inputs=val_inputs) -> Validation:
            val = evaluate(unwrap(module), data, val_idx, rt, args.eval_batch_size, inputs=inputs)
            return Validation(val.loss, {"val_loss": val.loss, "val_accuracy": val.accuracy})

        progress = FitState(best_score=progress.best_score, best=progress.best, history=progress.history)
        phase = Phase(name, epochs, tags={"phase": name})
        progress = fit(phase, rt, train_epoch, validate, lambda: cpu_state_dict(net), lambda _s: None, deadline,
                       progress).state  # fmt: skip
    unwrap(net).set_encoder_trainable(True)
    best = CAEClassifier(model.spec)
    best.load_state_dict(progress.best if progress.best is not None else cpu_state_dict(net))
    return best, progress


def run_retrain(args: argparse.Namespace, rt: Runtime, deadline: Deadline | None = None) -> dict[str, Any]:
    """Fine-tune, evaluate both models on the fixed set, write challenger.pt and retrain.json; the JSON payload."""
    # the whole command in order (load, evaluate the champion, train, evaluate the challenger, write): long because
    # its provenance and result records are spelled out here, where a reader of the files looks for them
    import json

    t0 = time.perf_counter()
    if args.watch_parent:
        watch_parent()
    out = Path(args.out)
    champion_file = load_classifier(args.champion)
    parent = champion_file.card
    version = args.model_version or default_version(parent.model_version)
    extra = json.loads(Path(args.provenance).read_text(encoding="utf-8")) if args.provenance else {}
    logger.info("retrain: champion %s (sha256 %s) -> challenger %s on %s in %s", parent.model_version,
                champion_file.sha256[:12], version, rt.device_name, rt.precision)  # fmt: skip
    data, facts = load_retrain_data(args)
    seconds = {"load": round(time.perf_counter() - t0, 2)}
    logger.info("retrain: %d confirmed + %d replay images to train, %d to validate, %d to evaluate (%s)",
                facts["confirmed"], facts["replay"], facts["validation"], facts["evaluation"]["images"],
                facts["evaluation"]["kind"])  # fmt: skip
    data = data.to(rt.device)

    t1 = time.perf_counter()
    champion_metrics = evaluate_classifier(champion_file.model, data, rt, "test", args.eval_batch_size).metrics
    logger.info("retrain: champion on the evaluation set: accuracy %.4f, macro AUC %.4f",
                champion_metrics["accuracy"], champion_metrics["macro"]["auc"])  # fmt: skip
    seconds["evaluate_champion"] = round(time.perf_counter() - t1, 2)

    t2 = time.perf_counter()
    start = load_classifier(args.champion).model  # a fresh copy: evaluation moved the first one
    challenger, progress = fine_tune(start, args, rt, data, deadline)
    seconds["train"] = round(time.perf_counter() - t2, 2)
    if not progress.history:
        raise SystemExit("retrain: no epoch ran (no epochs configured, or the time budget was spent on loading)")

    t3 = time.perf_counter()
    challenger = _round_to_fp16(challenger)
    challenger_metrics = evaluate_classifier(challenger, data, rt, "test", args.eval_batch_size).metrics
    seconds["evaluate_challenger"] = round(time.perf_counter() - t3, 2)
    logger.info("retrain: challenger on the evaluation set: accuracy %.4f, macro AUC %.4f",
                challenger_metrics["accuracy"], challenger_metrics["macro"]["auc"])  # fmt: skip

    temperature, calibration = _temperature(challenger, parent.temperature, data, rt)
    champion_summary, challenger_summary = summarise(champion_metrics), summarise(challenger_metrics)
    provenance = {
        "command": " ".join(["python -m training", *sys.argv[1:]]) if sys.argv[1:2] == ["retrain"] else "retrain",
        "kind": "retrain",
        "parent": {"sha256": champion_file.sha256, "model_version": parent.model_version, "path": str(args.champion)},
        "feedback": extra,
        "data": facts,
        "config": plain_args(args),
        "seed": args.seed,
        "device": rt.device_name,
        "precision": rt.precision,
        "torch": str(torch.__version__),
        "history": progress.history,
        "best_val_loss": progress.best_score,
        "metrics": {"accuracy": challenger_summary["accuracy"], "macro_auc": challenger_summary["macro_auc"]},
        "champion_metrics": {"accuracy": champion_summary["accuracy"], "macro_auc": champion_summary["macro_auc"]},
        **({"calibration": calibration} if calibration else {}),
    }
    out.mkdir(parents=True, exist_ok=True)
    card = dataclasses.replace(model_card(challenger.spec, provenance, version), temperature=temperature)
    sha = save_classifier(out / CHALLENGER_FILE, challenger, card)
    seconds["total"] = round(time.perf_counter() - t0 + getattr(args, "_startup_seconds", 0.0), 2)
    payload = {
        "format": FORMAT,
        "champion": {"path": str(args.champion), "sha256": champion_file.sha256,
                     "model_version": parent.model_version, "metrics": champion_summary},
        "challenger": {"path": str(out / CHALLENGER_FILE), "sha256": sha, "model_version": version,
                       "metrics": challenger_summary},
        "data": facts,
        "history": progress.history,
        "best_val_loss": progress.best_score,
        "wall_seconds": seconds,
        "device": rt.device_name,
        "precision": rt.precision,
        "config": plain_args(args),
    }  # fmt: skip
    write_json(out / RESULT_FILE, payload)
    print(
        f"challenger {version}: accuracy {100 * challenger_summary['accuracy']:.2f} % "
        f"(champion {100 * champion_summary['accuracy']:.2f} %), macro AUC "
        f"{100 * challenger_summary['macro_auc']:.2f} % (champion {100 * champion_summary['macro_auc']:.2f} %), "
        f"{facts['evaluation']['images']} evaluation images; {out / RESULT_FILE}"
    )
    return payload
