"""Training data: manifests, the group/patient-aware split, packs, augmentation, metrics, config, no DICOM imports."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torchvision.io import encode_jpeg, encode_png, write_file

from cxr_triage import CLASS_NAMES
from training import cli
from training.data import (
    ManifestError,
    Record,
    augment_batch,
    balance_table,
    components,
    epoch_batches,
    quiet_torchvision_io,
    read_manifest,
    resize_to_uint8,
    split_records,
)
from training.metrics import binary_auc, classification_metrics, confusion_matrix, roc_curve
from training.pack import build_pack, decode_pack, load_pack, sample_to_fit

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cxr"


def _write_images(folder: Path, per_class: int, sizes: tuple[tuple[int, int], ...] = ((224, 224), (256, 200))) -> None:
    gen = torch.Generator().manual_seed(0)
    for c, name in enumerate(CLASS_NAMES):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            img = (torch.rand(1, h, w, generator=gen) * 60 + 80 * c).to(torch.uint8)
            with quiet_torchvision_io():
                if i % 2:
                    write_file(str(folder / name / f"{i}.png"), encode_png(img))
                else:
                    write_file(str(folder / name / f"{i}.jpg"), encode_jpeg(img, quality=95))


def test_class_folder_manifest_and_csv_errors(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", per_class=3)
    manifest = read_manifest(tmp_path / "imgs")
    assert len(manifest) == 9
    assert sorted(manifest.labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nimgs/covid/0.jpg,influenza\n")
    with pytest.raises(ManifestError, match="unknown label"):
        read_manifest(bad)
    missing = tmp_path / "missing.csv"
    missing.write_text("path,label\nimgs/covid/nope.jpg,covid\n")
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(missing)
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("file,label\nx.jpg,covid\n")
    with pytest.raises(ManifestError, match="missing column"):
        read_manifest(nocol)


def test_split_never_puts_a_group_or_patient_on_two_sides() -> None:
    # chains: image i shares a group with i+1 (even i) and a patient with i+2 (i % 3 == 0)
    records = []
    for i in range(600):
        records.append(
            Record(
                path=Path(f"{i}.jpg"),
                label=i % 3,
                group=f"g{i // 2}" if i % 5 else "",
                patient_id=f"p{i // 3}" if i % 7 else "",
            )
        )
    split = split_records(records, seed=3)
    assert split == split_records(records, seed=3)
    assert split != split_records(records, seed=4)
    for attr in ("group", "patient_id"):
        sides: dict[str, set[int]] = defaultdict(set)
        for r, s in zip(records, split, strict=True):
            if getattr(r, attr):
                sides[getattr(r, attr)].add(s)
        assert all(len(v) == 1 for v in sides.values())
    shares = [split.count(s) / len(split) for s in range(3)]
    assert shares == pytest.approx([0.73, 0.135, 0.135], abs=0.03)
    comp = components(records)
    assert len(set(comp)) < len(records)


def test_split_of_the_shared_labels_is_leak_free_and_stratified() -> None:
    manifest = read_manifest(SHARED / "labels.csv", check_files=False)
    split = split_records(manifest.records, seed=0)
    for attr in ("group", "patient_id"):
        sides: dict[str, set[int]] = defaultdict(set)
        for r, s in zip(manifest.records, split, strict=True):
            if getattr(r, attr):
                sides[getattr(r, attr)].add(s)
        assert all(len(v) == 1 for v in sides.values())
    for c in range(3):
        in_class = [s for s, lab in zip(split, manifest.labels, strict=True) if lab == c]
        assert in_class.count(2) / len(in_class) == pytest.approx(0.135, abs=0.01)
    table = balance_table(manifest.labels, split)
    assert "pneumonia" in table and f"{len(manifest):,}" in table


def test_epoch_batches_shard_equally_across_ranks() -> None:
    idx = torch.arange(23)
    per_rank = [epoch_batches(idx, 4, shuffle=True, seed=1, epoch=2, rank=r, world_size=2) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    flat = [torch.cat(b) for b in per_rank]
    assert len(flat[0]) == len(flat[1]) == 8  # 11 per rank, last partial batch dropped
    evaluation = epoch_batches(idx, 4, shuffle=False, rank=1, world_size=2)
    assert torch.cat(evaluation).tolist() == list(range(1, 23, 2))  # evaluation keeps every sample
    assert not set(flat[0].tolist()) & set(flat[1].tolist())
    again = epoch_batches(idx, 4, shuffle=True, seed=1, epoch=2, rank=0, world_size=2)
    assert all(torch.equal(a, b) for a, b in zip(again, per_rank[0], strict=True))


def test_augmentation_is_mild_seeded_and_in_range() -> None:
    x = torch.rand(6, 1, 224, 224)
    a = augment_batch(x, torch.Generator().manual_seed(5))
    b = augment_batch(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    smooth = torch.linspace(0, 1, 224).expand(1, 1, 224, 224).repeat(4, 1, 1, 1)
    moved = augment_batch(smooth, torch.Generator().manual_seed(1))
    assert 0 < (moved - smooth).abs().mean() < 0.15


def test_resize_matches_the_inference_pipeline() -> None:
    from cxr_triage.ml.imaging import to_model_input, uint8_to_unit

    img = torch.randint(0, 256, (1, 300, 250), dtype=torch.uint8)
    ours = resize_to_uint8(img).float() / 255
    reference = to_model_input(uint8_to_unit(img[0]))[0]
    assert (ours - reference).abs().max() <= 0.5 / 255 + 1e-6
    same = torch.randint(0, 256, (1, 224, 224), dtype=torch.uint8)
    assert torch.equal(resize_to_uint8(same), same[0])


def test_pack_round_trip_and_sampling(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", per_class=8)
    manifest = read_manifest(tmp_path / "imgs")
    full = build_pack(manifest, tmp_path / "full.pack", max_mib=4, seed=2)
    loaded = load_pack(tmp_path / "full.pack")
    data = decode_pack(loaded)
    assert len(data) == 24 and full["meta"]["images_kept"] == 24
    assert data.labels.tolist() == manifest.labels
    assert data.split.tolist() == split_records(manifest.records, seed=2)
    from training.data import read_gray

    for i in (0, 1, 5):
        original = resize_to_uint8(read_gray(manifest.records[i].path)).float()
        assert (data.images[i].float() - original).abs().mean() < 4  # JPEG at the chosen quality
    # a limit that cannot hold everything: fewer images, the split of each kept image unchanged
    one_size = full["offsets"][1:] - full["offsets"][:-1]
    limit = (int(one_size.sum()) * 0.5 + 64 * 1024 + 64 * 24) / (1 << 20)
    small = build_pack(manifest, tmp_path / "small.pack", max_mib=limit, seed=2, min_quality=95)
    assert 0 < small["meta"]["images_kept"] < 24
    assert (tmp_path / "small.pack").stat().st_size <= limit * (1 << 20)
    full_split = dict(zip(loaded["meta"]["paths"], loaded["split"].tolist(), strict=True))
    assert all(full_split[p] == s for p, s in zip(small["meta"]["paths"], small["split"].tolist(), strict=True))
    (tmp_path / "junk.pack").write_bytes(b"not a pack")
    from training.pack import PackError

    with pytest.raises(PackError):
        load_pack(tmp_path / "junk.pack")


def test_sampling_is_balanced_and_keeps_components_whole() -> None:
    labels = [0] * 100 + [1] * 300 + [2] * 200
    split = [i % 10 // 8 + (i % 10 == 9) for i in range(600)]  # 0 x8, 1, 2 per ten
    comp = [i // 2 for i in range(600)]  # pairs
    split = [split[2 * (i // 2)] for i in range(600)]
    keep = sample_to_fit([100] * 600, labels, split, comp, budget_bytes=300 * 100, seed=0)
    kept_labels = [labels[i] for i in keep]
    counts = [kept_labels.count(c) for c in range(3)]
    assert sum(counts) <= 300
    assert counts[0] == 100  # the smallest class is kept whole; the larger ones are cut towards it
    assert abs(counts[1] - counts[2]) <= 4
    kept = set(keep)
    assert all((2 * p in kept) == (2 * p + 1 in kept) for p in range(300))


def test_metrics_on_a_hand_made_example() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    probs = torch.tensor(
        [[0.8, 0.1, 0.1], [0.4, 0.5, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.1, 0.2, 0.7]]
    )
    cm = confusion_matrix(labels, probs.argmax(1), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 2]]
    m = classification_metrics(labels, probs, CLASS_NAMES)
    assert m["accuracy"] == pytest.approx(5 / 6)
    normal = m["per_class"]["normal"]  # TP 2, FP 1, FN 0, TN 3
    assert normal["precision"] == pytest.approx(2 / 3)
    assert normal["recall"] == pytest.approx(1.0)
    assert normal["specificity"] == pytest.approx(3 / 4)
    assert normal["f1"] == pytest.approx(0.8)
    assert m["per_class"]["covid"]["recall"] == pytest.approx(0.5)
    assert m["per_class"]["covid"]["specificity"] == pytest.approx(1.0)
    # covid scores: positives 0.8, 0.4; negatives 0.2, 0.1, 0.3, 0.1 -> every positive above every negative
    assert m["per_class"]["covid"]["auc"] == pytest.approx(1.0)
    # normal scores: positives 0.7, 0.8; negatives 0.1, 0.5, 0.3, 0.2 -> 1.0
    # pneumonia: positives 0.4, 0.7; negatives 0.1 x4 -> 1.0
    assert m["macro"]["auc"] == pytest.approx(1.0)
    # ties count one half: positives {0.5, 0.2}, negatives {0.5, 0.1}: pairs (0.5>0.1)=1, (0.5=0.5)=.5,
    # (0.2<0.5)=0, (0.2>0.1)=1 -> 2.5 / 4
    auc = binary_auc(torch.tensor([0.5, 0.2, 0.5, 0.1]), torch.tensor([True, True, False, False]))
    assert auc == pytest.approx(0.625)
    assert math.isnan(binary_auc(torch.tensor([0.1, 0.2]), torch.tensor([True, True])))
    fpr, tpr = roc_curve(torch.tensor([0.5, 0.2, 0.5, 0.1]), torch.tensor([True, True, False, False]))
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    area = sum((fpr[i + 1] - fpr[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(fpr) - 1))
    assert area == pytest.approx(auc)


def test_config_values_become_defaults_and_flags_override(tmp_path: Path) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text('[phase2]\nlr = 0.0005\n[model]\nwidth = 8\n[runtime]\ndevice = "cpu"\n')
    args = cli.parse_args(["finetune", "--config", str(cfg), "--out", str(tmp_path), "--width", "4"])
    assert args.phase2_lr == 0.0005 and args.width == 4 and args.device == "cpu"
    repo = cli.parse_args(["oneshot", "--out", str(tmp_path), "--budget-seconds", "60"])
    assert repo.config and repo.phase1_batch_size == 16
    cfg.write_text("[phase2]\nlearning_rate = 0.1\n")
    with pytest.raises(SystemExit, match="unknown key"):
        cli.parse_args(["finetune", "--config", str(cfg), "--out", str(tmp_path)])


def test_training_imports_no_dicom_library() -> None:
    code = (
        "import sys, training.cli, training.commands, training.pack, training.report, training.engine\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('pydicom', 'highdicom', 'pynetdicom', "
        "'cxr_triage.ml.preprocess')]\n"
        "bad += [m for m in sys.modules if m == 'cxr_triage.ml.preprocess']\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _tiny_csv(path: Path, per_class: int) -> Path:
    with open(SHARED / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    picked = []
    for name in CLASS_NAMES:
        in_class = [r for r in rows if r["label"] == name]
        picked += in_class[:: len(in_class) // per_class][:per_class]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "group", "patient_id"])
        w.writeheader()
        for r in picked:
            w.writerow({k: r[k] for k in ("path", "label", "group", "patient_id")})
    return path


def test_pack_command_on_shared_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = _tiny_csv(tmp_path / "labels.csv", per_class=3)
    rc = cli.main(
        [
            "pack",
            "--manifest",
            str(manifest),
            "--root",
            str(SHARED),
            "--max-mib",
            "1",
            "--out",
            str(tmp_path / "t.pack"),
            "--no-progress",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "9 of 9 images" in out and "train" in out
    assert decode_pack(load_pack(tmp_path / "t.pack")).images.shape == (9, 224, 224)


def test_the_training_config_mirrors_the_flag_defaults() -> None:
    """config/train.toml holds the real run's values; each is the default of its flag, so the two cannot drift."""
    parser = cli.build_parser(None)
    defaults: dict[str, object] = {}
    for action in parser._subparsers._group_actions[0].choices.values():  # type: ignore[union-attr]
        for a in action._actions:
            defaults.setdefault(a.dest, a.default)
    configured = cli.load_train_config(cli.DEFAULT_TRAIN_CONFIG)
    differing = {k: (v, defaults.get(k, "no such flag")) for k, v in configured.items() if defaults.get(k) != v}
    assert differing == {}
