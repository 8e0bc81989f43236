"""``cxr-triage results`` as a PACS team reads it (issue 30): a header line, the worklist's priority and the
accession number in the text output; every ``--help`` of ``results`` and ``classify`` lists every JSON key it
prints, and explains which way the typicality score points."""

from __future__ import annotations

import json

import pytest
from conftest import chest_dataset, write_config
from test_classify import KEYS as CLASSIFY_KEYS  # the keys classify --json prints, checked there

from cxr_triage import cli
from cxr_triage.cli import main
from cxr_triage.commands import results
from cxr_triage.core.settings import TriageSettings


def test_results_text_has_a_header_the_priority_and_the_accession_number(harness, capsys) -> None:
    ok = chest_dataset(seed=1, AccessionNumber="ACC123")
    lateral = chest_dataset(seed=2, ViewPosition="LL", AccessionNumber="ACC456")
    harness.send([ok, lateral])
    harness.work()
    config = write_config(harness.tmp / "cxr.toml", harness.config)

    assert main(["results", "--header", "--config", str(config)]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    columns = header.split("\t")
    assert columns == list(results.TEXT_COLUMNS)
    assert columns[:5] == ["received_at", "sop_instance_uid", "status", "priority", "accession_number"]
    first, second = (line.split("\t") for line in lines)
    assert first[1:3] == [ok.SOPInstanceUID, "ok"] and first[4] == "ACC123"
    assert first[3] in ("urgent", "priority", "review", "routine")
    assert second[2:5] == ["rejected", "review", "ACC456"] and "ViewPosition" in second[5]

    assert main(["results", "--json", "--config", str(config)]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    triage = TriageSettings(**harness.config["triage"]) if "triage" in harness.config else TriageSettings()
    assert results.priority(record, triage) == first[3], "the text's priority is the worklist's rule"

    assert main(["results", "--no-header", "--config", str(config)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2  # piped output: no header unless asked


def test_the_priority_follows_the_worklist_rules() -> None:
    triage = TriageSettings(covid_threshold=0.5, pneumonia_threshold=0.5, review_below=0.6)

    def record(status: str, probabilities: dict[str, float] | None = None) -> dict[str, object]:
        return {"status": status, "probabilities": probabilities, "model_version": "m"}

    assert results.priority(record("ok", {"covid": 0.6, "normal": 0.2, "pneumonia": 0.2}), triage) == "urgent"
    assert results.priority(record("ok", {"covid": 0.1, "normal": 0.3, "pneumonia": 0.6}), triage) == "priority"
    assert results.priority(record("ok", {"covid": 0.3, "normal": 0.4, "pneumonia": 0.3}), triage) == "review"
    assert results.priority(record("ok", {"covid": 0.1, "normal": 0.8, "pneumonia": 0.1}), triage) == "routine"
    assert results.priority(record("rejected"), triage) == "review"
    assert results.priority(record("error"), triage) == "review"
    assert results.priority(record("queued"), triage) is None


@pytest.mark.parametrize("command", ["results", "classify"])
def test_every_help_lists_every_json_key_and_explains_typicality(command: str, harness, capsys) -> None:
    if command == "results":
        harness.send([chest_dataset(seed=3)])
        harness.work()
        config = write_config(harness.tmp / "cxr.toml", harness.config)
        assert main(["results", "--json", "--config", str(config)]) == 0
        keys = list(json.loads(capsys.readouterr().out.splitlines()[0]))
    else:
        keys = CLASSIFY_KEYS
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    missing = [key for key in keys if key not in text]
    assert not missing, (command, missing)
    assert "higher = less like a chest radiograph" in text
