"""The worker's heatmap (issue 31, point 1): the coarse Grad-CAM map comes from the pass that classified the image,
is stored with ``save_coarse`` under ``[heatmap] dir`` and named by ``instances.heatmap_path`` in the transaction
that records the result; a failing map never loses the classification.

Real listener, worker and SQLite database (``conftest.harness``), the tiny random model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import chest_dataset
from sqlalchemy import select

from cxr_triage.core import db
from cxr_triage.ml.heatmap import GradCAMHeatmap, load_coarse
from cxr_triage.ml.preprocess import PreparedImage, prepare_dataset


def _recorded(harness) -> tuple[db.Instance, db.PredictionRecord]:
    with harness.sessions() as session:
        instance = session.scalars(select(db.Instance)).one()
        prediction = session.scalars(select(db.PredictionRecord)).one()
        session.expunge_all()
    return instance, prediction


def test_the_map_comes_from_the_pass_that_classified_and_is_recorded_with_the_result(make_harness) -> None:
    harness = make_harness(heatmap={"dir": ""})
    ds = chest_dataset(rows=80, cols=60, seed=3)
    harness.send([ds])
    harness.work()
    instance, prediction = _recorded(harness)
    assert instance.heatmap_path is not None
    path = Path(instance.heatmap_path)
    assert path.is_relative_to(Path(harness.config["storage"]["thumbnail_dir"]).parent / "heatmaps")
    coarse = load_coarse(path)
    assert coarse.shape == (14, 14) and coarse.min() >= 0.0 and coarse.max() <= 1.0
    # What is recorded is what produced the label: the float32 map pass, whatever [model] precision resolves to.
    assert prediction.precision == "float32"
    predictor = harness.worker.predictor
    image = prepare_dataset(ds)
    assert isinstance(image, PreparedImage)
    again = GradCAMHeatmap(predictor.loaded.model).coarse(image.tensor[None])
    probabilities = torch.softmax(again.logits / predictor.temperature, dim=1)[0]
    expected = dict(zip(predictor.class_names, probabilities.tolist(), strict=True))
    assert prediction.label == max(expected, key=lambda name: expected[name])
    assert prediction.probabilities == pytest.approx(expected, abs=1e-5)
    peak = again.maps[0].max()
    scaled = (again.maps[0] / peak).numpy() if peak > 0 else again.maps[0].numpy()
    assert coarse == pytest.approx(scaled, abs=2e-3)  # float16 storage


def test_a_configured_folder_is_used(make_harness, tmp_path: Path) -> None:
    folder = tmp_path / "maps-here"
    harness = make_harness(heatmap={"dir": str(folder)})
    harness.send([chest_dataset(seed=4)])
    harness.work()
    instance, _ = _recorded(harness)
    assert instance.heatmap_path is not None and Path(instance.heatmap_path).is_relative_to(folder)
    assert Path(instance.heatmap_path).is_file()


def test_heatmap_off_records_no_map_and_the_predictors_precision(make_harness) -> None:
    harness = make_harness(heatmap={"enabled": False})
    harness.send([chest_dataset(seed=5)])
    harness.work()
    instance, prediction = _recorded(harness)
    assert instance.heatmap_path is None
    assert prediction.precision == harness.worker.predictor.precision and prediction.label
    assert not (Path(harness.config["storage"]["thumbnail_dir"]).parent / "heatmaps").exists()


def test_a_failing_map_pass_keeps_the_classification_and_is_logged_once(make_harness, monkeypatch, caplog) -> None:
    from cxr_triage.triage import pipeline

    def broken(self: GradCAMHeatmap, images: torch.Tensor, classes: object = None) -> None:
        raise RuntimeError("no gradients today")

    monkeypatch.setattr(GradCAMHeatmap, "coarse", broken)
    monkeypatch.setattr(pipeline, "_heatmap_failures", 0)
    harness = make_harness()
    harness.send([chest_dataset(seed=6), chest_dataset(seed=7)])
    with caplog.at_level(logging.INFO):
        harness.work()
    rows = harness.rows()
    assert len(rows) == 2 and all(row["status"] == "ok" and row["label"] for row in rows)
    with harness.sessions() as session:
        assert session.scalars(select(db.Instance.heatmap_path)).all() == [None, None]
        precisions = session.scalars(select(db.PredictionRecord.precision)).all()
    assert precisions == [harness.worker.predictor.precision] * 2
    tracebacks = [r for r in caplog.records if r.exc_info and "no gradients today" in str(r.exc_info[1])]
    assert len(tracebacks) == 1, "the first failure with its traceback, later ones in one line"


def test_a_map_that_cannot_be_stored_keeps_the_classification(make_harness, monkeypatch, caplog) -> None:
    from cxr_triage.ml import heatmap

    def full(path: object, coarse: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(heatmap, "save_coarse", full)
    harness = make_harness()
    harness.send([chest_dataset(seed=8)])
    with caplog.at_level(logging.ERROR):
        harness.work()
    instance, prediction = _recorded(harness)
    assert instance.heatmap_path is None and instance.status == db.DONE and prediction.label
    assert [r for r in caplog.records if "could not be stored" in r.getMessage()]


def test_the_heatmap_settings_are_checked_and_the_folder_defaults_beside_the_thumbnails(tmp_path: Path) -> None:
    from cxr_triage.core.config import ConfigError
    from cxr_triage.core.settings import load_settings

    settings = load_settings(None, environ={})
    assert settings.heatmap.pacs_object == "secondary-capture" and settings.heatmap.opacity == 0.4
    assert settings.heatmap.folder(settings.storage) == settings.storage.thumbnail_dir.parent / "heatmaps"
    for text, message in (
        ('pacs_object = "parametric-map"', "pacs_object"),
        ("opacity = 0", "opacity"),
        ("opacity = 1.5", "opacity"),
    ):
        site = tmp_path / "site.toml"
        site.write_text(f"[heatmap]\n{text}\n")
        with pytest.raises(ConfigError, match=rf"\[heatmap\].*{message}"):
            load_settings(site, environ={})
    site.write_text('[heatmap]\npacs_object = "none"\ndir = "/srv/maps"\n')
    chosen = load_settings(site, environ={}).heatmap
    assert chosen.pacs_object == "none" and chosen.folder(settings.storage) == Path("/srv/maps")
