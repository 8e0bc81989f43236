"""`cxr-triage results`: one line or JSON object per instance with the GUIDE §5 keys, filtered by study and time."""

from __future__ import annotations

import datetime as dt
import json

import pydicom
from conftest import chest_dataset, write_config

from cxr_triage.cli import main

KEYS = {
    "path",
    "sop_instance_uid",
    "status",
    "label",
    "probabilities",
    "reason",
    "model_version",
    "study_instance_uid",
    "received_at",
    "completed_at",
    "sr_sop_instance_uid",
    "flagged",
}


def test_results_json_text_and_filters(harness, capsys) -> None:
    study = pydicom.uid.generate_uid()
    ok = chest_dataset(seed=1, StudyInstanceUID=study)
    lateral = chest_dataset(seed=2, ViewPosition="LL")
    harness.send([ok, lateral])
    harness.work()
    config = write_config(harness.tmp / "cxr.toml", harness.config)

    assert main(["results", "--json", "--config", str(config)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [set(line) for line in lines] == [KEYS, KEYS]
    first, second = lines
    assert first["sop_instance_uid"] == ok.SOPInstanceUID and first["status"] == "ok"
    assert first["study_instance_uid"] == study
    assert set(first["probabilities"]) == {"covid", "normal", "pneumonia"}
    assert first["label"] == max(first["probabilities"], key=first["probabilities"].get)
    assert first["model_version"] == "tiny-test" and first["sr_sop_instance_uid"]
    assert dt.datetime.fromisoformat(first["completed_at"]) >= dt.datetime.fromisoformat(first["received_at"])
    assert second["status"] == "rejected" and "ViewPosition" in second["reason"]
    assert second["probabilities"] is None and second["sr_sop_instance_uid"] is None

    assert main(["results", "--json", "--study", study, "--config", str(config)]) == 0
    assert [json.loads(x)["sop_instance_uid"] for x in capsys.readouterr().out.splitlines()] == [ok.SOPInstanceUID]
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    assert main(["results", "--since", future, "--config", str(config)]) == 0
    assert capsys.readouterr().out == ""
    assert main(["results", "--since", first["received_at"], "--config", str(config)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert len(text) == 2
    assert text[0].split("\t")[1:3] == [ok.SOPInstanceUID, "ok"]
    assert text[1].split("\t")[2] == "rejected" and "ViewPosition" in text[1]

    assert main(["results", "--since", "yesterday", "--config", str(config)]) == 2
    assert "yesterday" in capsys.readouterr().err


def test_pending_instances_are_listed_as_queued(make_harness, capsys) -> None:
    harness = make_harness(model=None)
    harness.send([chest_dataset()])
    config = write_config(harness.tmp / "cxr.toml", harness.config)
    assert main(["results", "--json", "--config", str(config)]) == 0
    (row,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert row["status"] == "queued" and row["completed_at"] is None and row["label"] is None
