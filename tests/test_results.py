"""`cxr-triage results`: one line or JSON object per instance with the documented keys, filtered by study and time."""

from __future__ import annotations

import datetime as dt
import json

import pydicom
from conftest import chest_dataset, write_config

from cxr_triage.cli import main

KEYS = {
    "path",
    "typicality",
    "sop_instance_uid",
    "status",
    "label",
    "probabilities",
    "reason",
    "model_version",
    "precision",
    "study_instance_uid",
    "received_at",
    "completed_at",
    "sr_sop_instance_uid",
    "flagged",
    "spool_removed_at",
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


def test_records_are_the_newest_prediction_refusal_and_sr_of_each_instance(harness) -> None:
    from sqlalchemy import select, update

    from cxr_triage.commands.results import STATUS_NAMES
    from cxr_triage.core import db

    rerun = chest_dataset(seed=3)
    harness.send([rerun, chest_dataset(seed=4, ViewPosition="LL"), chest_dataset(seed=5)])
    harness.work()
    with harness.sessions() as session, session.begin():  # classify one instance a second time
        session.execute(
            update(db.Instance).where(db.Instance.sop_instance_uid == rerun.SOPInstanceUID).values(status=db.QUEUED)
        )
    harness.work()
    rows = harness.rows()
    with harness.sessions() as session:
        instances = session.scalars(select(db.Instance).order_by(db.Instance.received_at, db.Instance.id)).all()
        assert len(instances[0].predictions) == 2 and len(instances[0].sr_documents) == 2
        expected = []
        for instance in instances:
            prediction = instance.predictions[-1] if instance.predictions else None
            refusal = instance.refusals[-1] if instance.refusals else None
            sr = instance.sr_documents[-1] if instance.sr_documents else None
            expected.append(
                {
                    "sop_instance_uid": instance.sop_instance_uid,
                    "status": STATUS_NAMES.get(instance.status, instance.status),
                    "label": prediction.label if prediction else None,
                    "probabilities": {k: round(v, 6) for k, v in prediction.probabilities.items()}
                    if prediction
                    else None,
                    "reason": refusal.reason if refusal else (instance.error or instance.flag_reason),
                    "model_version": prediction.model_version if prediction else None,
                    "sr_sop_instance_uid": sr.sop_instance_uid if sr else None,
                }
            )
    assert [{k: row[k] for k in expected[0]} for row in rows] == expected


def test_results_and_forward_on_a_database_that_does_not_exist(tmp_path, capsys) -> None:
    from conftest import config_values

    values = config_values(tmp_path, None)
    missing = tmp_path / "nowhere" / "cxr.sqlite"
    values["database"]["url"] = f"sqlite:///{missing}"
    config = write_config(tmp_path / "cxr.toml", values)
    assert main(["results", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert str(missing) in err and "does not exist" in err and f"cxr-triage db upgrade --config {config}" in err
    assert main(["forward", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cxr-triage db upgrade" in err
    assert not missing.exists() and not missing.parent.exists(), "nothing was created"


def test_results_from_another_folder_names_the_resolved_path_and_the_likely_cause(
    harness, tmp_path, capsys, monkeypatch
) -> None:
    """The default database path is relative: run from elsewhere, the message says so instead of advising a new
    empty database."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["results"]) == 2
    err = capsys.readouterr().err
    assert str(elsewhere / "var" / "cxr-triage.sqlite") in err
    assert "relative" in err and "the folder `cxr-triage serve` runs in" in err
    assert not (elsewhere / "var").exists(), "nothing was created"
    assert main(["status"]) == 2
    assert "relative" in capsys.readouterr().err


def test_forward_says_when_there_is_nothing_to_list_or_send(harness, capsys) -> None:
    config = write_config(harness.tmp / "cxr.toml", harness.config)
    assert main(["forward", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "no SR forwards recorded ([forward] destinations is empty)" in err
    assert main(["forward", "--retry", "--config", str(config)]) == 0
    assert "nothing to send" in capsys.readouterr().err


def test_results_piped_into_head_ends_without_a_traceback(harness) -> None:
    import subprocess
    import sys

    from cxr_triage.core import db

    # Far more output than a pipe holds, so that the writer is still writing when head leaves.
    now = db.utcnow()
    with harness.sessions() as session, session.begin():
        study = db.Study(study_instance_uid="1.2.3", first_received_at=now, last_received_at=now)
        session.add(study)
        session.flush()
        session.add_all(
            db.Instance(
                study_id=study.id,
                sop_instance_uid=f"1.2.3.{i}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                study_instance_uid="1.2.3",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                spool_path=f"/spool/{i}.dcm",
                sha256="0" * 64,
                size_bytes=1,
                received_at=now,
            )  # fmt: skip
            for i in range(3000)
        )
    config = write_config(harness.tmp / "cxr.toml", harness.config)
    err = harness.tmp / "err"
    command = f'"{sys.executable}" -m cxr_triage results --json --config "{config}" 2>"{err}" | head -n 1'
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and json.loads(done.stdout)["sop_instance_uid"] == "1.2.3.0"
    assert err.read_text() == "", "no BrokenPipeError traceback when the reader leaves"
