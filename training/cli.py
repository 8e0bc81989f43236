"""``python -m training COMMAND``: pack, pretrain, finetune, evaluate, compare, ablation, oneshot, retrain.

Every option is a flag with help text and may also be set in a TOML file (``--config``, default
``config/train.toml``): config values become the parser's defaults and flags override them (timm's pattern).
In the TOML file, keys of the ``[pretrain]``, ``[phase1]`` and ``[phase2]`` tables are prefixed with the table's
name (``[phase2] lr`` is ``--phase2-lr``); keys of every other table are the flag names with ``_`` for ``-``.
An unknown key is an error. Under ``torchrun`` the same commands run DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cxr_triage.ml.imaging import INPUT_NORMS
from cxr_triage.ml.model import DEFAULT_HEAD, HEADS
from training.pack import DEFAULT_MAX_MIB

logger = logging.getLogger(__name__)

DEFAULT_TRAIN_CONFIG = Path(__file__).resolve().parents[1] / "config" / "train.toml"
PREFIXED_TABLES = ("pretrain", "phase1", "phase2")
BOOL = argparse.BooleanOptionalAction


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--config", default=None, help=f"TOML config (default {DEFAULT_TRAIN_CONFIG} when it exists)")
    g.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    g.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling and augmentation")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    g.add_argument(
        "--amp",
        action=BOOL,
        default="auto",
        help="bf16 autocast (--no-amp: float32); default: bf16 on CUDA and on a CPU with bf16 in hardware "
        "(AMX-BF16 or AVX512-BF16), float32 elsewhere, where emulated bf16 is slower",
    )
    g.add_argument("--channels-last", action=BOOL, default=True, help="channels_last memory format (CPU and CUDA)")
    g.add_argument("--compile", action=BOOL, default=False, help="torch.compile the model (pays a warm-up)")
    g.add_argument("--progress", action=BOOL, default=True, help="tqdm progress bars (rank 0)")


def _data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--pack", default=None, help="pack file from `python -m training pack` (split stored in it)")
    g.add_argument("--manifest", default=None, help="CSV (path,label[,group,patient_id]) or folder of class folders")
    g.add_argument("--root", default=None, help="folder the manifest's paths are relative to (default: its folder)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the group-aware 73/13.5/13.5 split")


def _model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--width", type=int, default=64, help="filters of the first convolution (paper 64)")
    g.add_argument("--dense-units", type=int, default=64, help="units of the hidden Dense layer(s) (paper 64)")
    g.add_argument("--head", default=DEFAULT_HEAD, choices=HEADS, help=f"Table 4 head (paper: {DEFAULT_HEAD})")
    g.add_argument(
        "--input-norm",
        default="equalise",
        choices=INPUT_NORMS,
        help="per-image intensity normalisation the encoder applies first: equalise (histogram equalisation, the "
        "same input whatever window, gamma or bit depth the radiograph was rendered with) or none (the paper)",
    )
    g.add_argument("--model-version", default="cae-lstm-dev", help="model_version written into the checkpoint")


def _pretrain(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pretraining (convolutional autoencoder)")
    g.add_argument("--pretrain-epochs", type=int, default=15, help="maximum epochs (paper: not stated)")
    g.add_argument("--pretrain-lr", type=float, default=1e-3, help="Adam learning rate (paper 0.01)")
    g.add_argument("--pretrain-batch-size", type=int, default=64, help="batch size")
    g.add_argument(
        "--pretrain-patience",
        type=int,
        default=0,
        help="stop after this many epochs without a lower validation MSE (0: never; the authors used 20)",
    )
    g.add_argument(
        "--pretrain-size",
        type=int,
        default=224,
        help="side the autoencoder trains at (a multiple of 32; validation is always at 224): lower is cheaper",
    )
    g.add_argument(
        "--init-autoencoder",
        default=None,
        help="committed autoencoder (encoder + decoder, fp16) to continue from, with fresh Adam moments",
    )
    g.add_argument(
        "--export-autoencoder",
        default=None,
        help="write the autoencoder with its whole history here whenever this run beats --init-autoencoder",
    )


def _finetune(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning (gradual unfreezing)")
    g.add_argument(
        "--encoder",
        default=None,
        help="encoder.pt from pretrain or the committed autoencoder artefact (omit: random encoder)",
    )
    g.add_argument(
        "--init-classifier",
        default=None,
        help="committed classifier to continue (same model flags), with fresh Adam moments; --encoder is then "
        "ignored; add --phase1-epochs 0 to continue in phase 2",
    )
    g.add_argument(
        "--export-classifier",
        default=None,
        help="write the classifier with its whole history here whenever this run beats --init-classifier",
    )
    for phase, epochs, lr, bs in ((1, 10, 1e-3, 16), (2, 20, 1e-4, 32)):
        what = "encoder frozen, head trained" if phase == 1 else "all layers trained"
        g.add_argument(f"--phase{phase}-epochs", type=int, default=epochs, help=f"phase {phase} ({what}) max epochs")
        g.add_argument(f"--phase{phase}-lr", type=float, default=lr, help=f"phase {phase} Adam lr (paper 1e-3)")
        g.add_argument(f"--phase{phase}-batch-size", type=int, default=bs, help=f"phase {phase} batch (paper 16)")
        g.add_argument(
            f"--phase{phase}-patience",
            type=int,
            default=5,
            help=f"phase {phase} early-stopping patience on validation loss (paper 5)",
        )
    g.add_argument(
        "--phase2-frozen-blocks",
        type=int,
        default=0,
        choices=range(6),
        metavar="N",
        help="phase 2 keeps the encoder's first N of 5 convolution blocks frozen (0, the paper: every layer trains; "
        "1 skips the backward pass of the two 224x224 convolutions, 38 %% of the encoder's operations)",
    )
    g.add_argument(
        "--phase1-features",
        action=BOOL,
        default=True,
        help="phase 1 computes the frozen encoder's features once and trains the head on them (no augmentation "
        "in phase 1); --no-phase1-features runs the encoder on augmented images every epoch",
    )
    g.add_argument(
        "--balance-sources",
        action=BOOL,
        default=True,
        help="draw fine-tuning epochs with weights that make the label say less about the image's source data set",
    )
    g.add_argument(
        "--phase1-share",
        type=float,
        default=0.4,
        help="with a time budget: share of the fine-tuning time phase 1 may use",
    )


def _shared(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("batches")
    g.add_argument("--augment", action=BOOL, default=True, help="mild augmentation of training batches")
    g.add_argument(
        "--source-cues",
        action=BOOL,
        default=True,
        help="with --augment: also blur what tells the data sets apart (borders, contrast, resolution, markers)",
    )
    g.add_argument("--eval-batch-size", type=int, default=256, help="batch size for validation and test")
    g.add_argument(
        "--checkpoint-seconds",
        type=float,
        default=30.0,
        help="resumable state is written at most this often (and at the end of every phase)",
    )


def _out(p: argparse.ArgumentParser, resume: bool = True) -> None:
    p.add_argument("--out", required=True, help="output folder")
    if resume:
        p.add_argument("--resume", action=BOOL, default=False, help="continue from the state files in --out")


def _pack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="CSV (path,label[,group,patient_id]) or folder of class folders")
    p.add_argument("--root", default=None, help="folder the manifest's paths are relative to (default: its folder)")
    p.add_argument("--out", required=True, help="pack file to write (e.g. packs/cxr.pack; packs/ is git-ignored)")
    p.add_argument("--max-mib", type=float, default=DEFAULT_MAX_MIB, help="maximum pack size in MiB")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the group-aware 73/13.5/13.5 split")
    p.add_argument("--max-quality", type=int, default=95, help="highest JPEG quality tried")
    p.add_argument("--min-quality", type=int, default=70, help="lowest JPEG quality before images are dropped")


def _heads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heads", default=",".join(HEADS), help="comma-separated Table 4 heads")


def _budget(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--budget-seconds",
        type=float,
        required=required,
        default=None,
        help="wall-clock budget; epochs are planned to fit and runs stop cleanly",
    )


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="output folder holding metrics.json (or ablation.json)")


def _compare(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the two models")
    g.add_argument("--champion", default=None, help="the model in service: a classifier checkpoint")
    g.add_argument("--challenger", default=None, help="the model that would replace it: a classifier checkpoint")
    g.add_argument(
        "--champion-metrics",
        default=None,
        help="instead of --champion and the data: the champion's metrics.json, written by `python -m training "
        "evaluate` (nothing is recomputed)",
    )
    g.add_argument(
        "--challenger-metrics",
        default=None,
        help="instead of --challenger and the data: the challenger's metrics.json, written by `python -m training "
        "evaluate` on the same images",
    )
    g.add_argument(
        "--split",
        default="val",
        choices=("val", "test"),
        help="split both checkpoints are evaluated on (default val, so that the test split stays unseen until the "
        "final report)",
    )
    g.add_argument("--eval-batch-size", type=int, default=256, help="batch size of the evaluation")
    g = p.add_argument_group("the shipping rule (as the runtime's retraining applies it)")
    g.add_argument(
        "--margin",
        type=float,
        default=0.0,
        help="the challenger's macro AUC must exceed the champion's by at least this, and be higher (default 0: "
        "any gain; the runtime's [retrain] margin defaults to 0.005)",
    )
    g.add_argument(
        "--sensitivity-tolerance",
        type=float,
        default=0.02,
        help="no class's sensitivity may fall by more than this (absolute, default 0.02)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder: compare.json, and with checkpoints each one's evaluation (metrics.json, report, plots) "
        "under champion/ and challenger/",
    )


def _retrain(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("retraining")
    g.add_argument("--champion", required=True, help="the current model (checkpoint) the challenger starts from")
    g.add_argument("--feedback", required=True, help="manifest CSV of the confirmed images (path,label,...)")
    g.add_argument(
        "--feedback-root", default=None, help="folder the feedback paths are relative to (default: the manifest's)"
    )
    g.add_argument("--pack", required=True, help="base pack: replay from its training split, evaluation on its test")
    g.add_argument(
        "--eval-manifest",
        default=None,
        help="a fixed evaluation manifest CSV instead of the pack's test split (same set for both models)",
    )
    g.add_argument("--eval-root", default=None, help="folder the evaluation manifest's paths are relative to")
    g.add_argument(
        "--replay-ratio",
        type=float,
        default=2.0,
        help="base training images replayed per confirmed image (capped by the pack's training split)",
    )
    g.add_argument("--val-images", type=int, default=512, help="validation images (pack's val split) to pick with")
    g.add_argument("--head-epochs", type=int, default=1, help="epochs with the encoder frozen (head only)")
    g.add_argument("--head-lr", type=float, default=1e-4, help="Adam learning rate of the head-only epochs")
    g.add_argument("--epochs", type=int, default=2, help="epochs with every layer trained")
    g.add_argument("--lr", type=float, default=3e-5, help="Adam learning rate when every layer trains (low)")
    g.add_argument("--batch-size", type=int, default=16, help="training batch size")
    g.add_argument("--model-version", default=None, help="the challenger's model_version (default PARENT-r1)")
    g.add_argument(
        "--provenance",
        default=None,
        help="JSON file whose object is stored in the challenger's provenance under 'feedback' (feedback ids...)",
    )
    g.add_argument(
        "--watch-parent",
        action=BOOL,
        default=False,
        help="exit at once if the process that started this one dies (set by the runtime's retraining job)",
    )
    p.add_argument("--out", required=True, help="output folder for challenger.pt and retrain.json")


COMMAND_ARGS: dict[str, tuple[str, list[Callable[[argparse.ArgumentParser], None]]]] = {
    "pack": ("build a compact, GPU-decodable pack file from a manifest", [_pack_args]),
    "report": ("redraw report.md and the PNG plots of a run from its metrics.json", [_report_args]),
    "pretrain": ("train the convolutional autoencoder; saves the encoder", [_data, _model, _pretrain, _shared, _out]),
    "finetune": (
        "train the classifier from the encoder: phase 1 head only, phase 2 all",
        [_data, _model, _finetune, _shared, _out],
    ),
    "evaluate": ("test-split metrics, report and plots for a classifier checkpoint", [_data, _shared]),
    "compare": (
        "evaluate two classifier checkpoints on one split (or read two evaluate metrics.json files) and apply the "
        "shipping rule: would the challenger replace the champion?",
        [_data, _compare],
    ),
    "ablation": (
        "the four Table 4 heads on the same split and budget",
        [_data, _model, _finetune, _shared, _heads, _out],
    ),
    "sources": (
        "leave-one-source-out heads on the frozen pretrained encoder: the data-set shortcut, measured",
        [_data, _model, _finetune, _shared, _out],
    ),
    "oneshot": (
        "pretrain + finetune + evaluate (+ ablation) within a time budget",
        [_data, _model, _pretrain, _finetune, _shared, _heads, _out],
    ),
    "retrain": (
        "fine-tune a challenger from the champion on confirmed images plus replay; evaluate both on a fixed set",
        [_retrain, _shared],
    ),
}


def build_parser(config: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    known: set[str] = set()
    for name, (help_text, adders) in COMMAND_ARGS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common(p)
        for add in adders:
            add(p)
        if name == "evaluate":
            p.add_argument("--model", required=True, help="classifier checkpoint (model.pt)")
            p.add_argument("--split", default="test", choices=("val", "test"), help="split to evaluate")
            p.add_argument("--out", required=True, help="output folder for metrics.json, report.md, plots")
        if name in ("ablation", "retrain"):
            _budget(p, required=False)
        if name == "sources":
            p.add_argument(
                "--min-held-out",
                type=int,
                default=20,
                help="hold out only sources with at least this many validation + test images",
            )
        if name == "oneshot":
            _budget(p, required=True)
            p.add_argument("--ablation", action=BOOL, default=False, help="also run the Table 4 ablation")
            p.add_argument(
                "--work",
                default=None,
                help="folder for intermediate state (default OUT/work); outside OUT keeps OUT small",
            )
            p.add_argument(
                "--pretrain-share", type=float, default=0.3, help="share of the training time pretraining may use"
            )
            p.add_argument(
                "--ablation-share",
                type=float,
                default=0.5,
                help="with --ablation: share of the training time given to the four heads",
            )
            p.add_argument(
                "--reserve-seconds",
                type=float,
                default=10.0,
                help="time kept back for evaluation, plots and saving (at least 5 %% of the budget)",
            )
        dests = {a.dest for a in p._actions}
        known |= dests
        if config:
            p.set_defaults(**{k: v for k, v in config.items() if k in dests})
            for action in p._actions:  # a value in the config satisfies a required flag
                if action.dest in config:
                    action.required = False
    if config:
        unknown = sorted(set(config) - known)
        if unknown:
            raise SystemExit(f"unknown key(s) in the training config: {', '.join(unknown)}")
    return parser


def load_train_config(path: str | Path) -> dict[str, Any]:
    """Flatten a training TOML file into parser destinations (see the module docstring)."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SystemExit(f"cannot read training config {path}: {exc}") from exc
    flat: dict[str, Any] = {}
    for table, values in raw.items():
        if not isinstance(values, dict):
            raise SystemExit(f"{path}: top-level key {table!r} must be a [table]")
        for key, value in values.items():
            dest = f"{table}_{key}" if table in PREFIXED_TABLES else key
            flat[dest.replace("-", "_")] = value
    return flat


def _config_path(argv: Sequence[str]) -> Path | None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        return Path(known.config)
    return DEFAULT_TRAIN_CONFIG if DEFAULT_TRAIN_CONFIG.is_file() else None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    path = _config_path(argv)
    args = build_parser(load_train_config(path) if path else None).parse_args(argv)
    args.config = str(path) if path else None
    return args


COUNT_PROCESS_STARTUP = False
"""Set by ``python -m training``: a time budget then counts the interpreter's and torch's start-up as well."""


def main(argv: Sequence[str] | None = None) -> int:
    from training.engine import seconds_since_process_start

    startup = seconds_since_process_start() if COUNT_PROCESS_STARTUP else 0.0
    args = parse_args(argv)
    args._startup_seconds = startup
    from training.engine import setup_runtime

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=(args.log_level if rank == 0 else "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    done = _without_runtime(args)
    if done is not None:
        return done
    from training import commands, finetune, pretrain

    rt = setup_runtime(args.device, args.amp, args.channels_last, args.compile, args.progress)
    try:
        if rt.is_main:
            logger.info("%s on %s, world size %d, config %s", args.command, rt.device_name, rt.world_size, args.config)
        if args.command == "oneshot":
            commands.run_oneshot(args, rt)
            return 0
        if args.command == "retrain":
            return _run_retrain(args, rt)
        data = commands.load_data(args, rt)
        if args.command == "pretrain":
            pretrain.run_pretrain(args, rt, data, _deadline(args))
        elif args.command == "finetune":
            finetune.run_finetune(args, rt, data, _deadline(args), provenance=commands.base_provenance(args, rt, data))
        elif args.command == "evaluate":
            commands.run_evaluate(args, rt, data)
        elif args.command == "compare":
            from training.compare import compare_checkpoints

            compare_checkpoints(args, rt, data)
        elif args.command == "sources":
            from training.sources import run_sources

            if not args.encoder:
                raise SystemExit("sources needs --encoder ENCODER.pt (written by pretrain, or oneshot's work folder)")
            run_sources(args, rt, data)
        elif args.command == "ablation":
            _run_ablation(args, rt, data)
        return 0
    finally:
        from training.engine import teardown_runtime

        teardown_runtime(rt)


def _without_runtime(args: argparse.Namespace) -> int | None:
    """The commands that need no device (pack, report, compare of two metrics files): their exit status; None for
    the others."""
    if args.command == "pack":
        return run_pack(args)
    if args.command == "report":
        return run_report(args)
    if args.command == "compare":
        from training.compare import compare_metrics_files, compare_mode

        if compare_mode(args) == "metrics":
            return compare_metrics_files(args)
    return None


def _run_ablation(args: argparse.Namespace, rt: Any, data: Any) -> None:
    from training import commands
    from training.report import write_report

    rows = commands.run_ablation(args, rt, data, _deadline(args))
    if rt.is_main:
        write_report(
            args.out,
            title="cxr-triage ablation: Table 4 heads",
            metrics=None,
            ablation=rows,
            facts={"device": rt.device_name, "counts": data.counts(), "encoder": args.encoder},
        )


def _run_retrain(args: argparse.Namespace, rt: Any) -> int:
    from training.retrain import run_retrain

    run_retrain(args, rt, _deadline(args))
    return 0


def _deadline(args: argparse.Namespace) -> Any:
    from training.engine import Deadline

    Deadline.install_signal_handlers()
    if not getattr(args, "budget_seconds", None):
        return None
    return Deadline(args.budget_seconds, start=time.monotonic() - getattr(args, "_startup_seconds", 0.0))


def run_pack(args: argparse.Namespace) -> int:
    from training.data import read_manifest
    from training.pack import build_pack, describe_pack

    manifest = read_manifest(args.manifest, args.root)
    pack = build_pack(
        manifest,
        args.out,
        max_mib=args.max_mib,
        seed=args.split_seed,
        max_quality=args.max_quality,
        min_quality=args.min_quality,
        progress=args.progress,
    )
    print(describe_pack(pack, args.out))
    return 0


def run_report(args: argparse.Namespace) -> int:
    import json

    from training.report import report_from_summary

    run = Path(args.run)
    source = next((run / n for n in ("metrics.json", "ablation.json") if (run / n).is_file()), None)
    if source is None:
        raise SystemExit(f"{run}: no metrics.json or ablation.json to draw from")
    written = report_from_summary(run, json.loads(source.read_text(encoding="utf-8")))
    print("\n".join(str(p) for p in written))
    return 0
