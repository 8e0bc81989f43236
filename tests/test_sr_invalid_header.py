"""A received header with an invalid Study Date, Study Time, Patient's Birth Date or Patient's Sex still gets a valid
report (the bug: highdicom raised in ``srtemplate._header`` and no SR was made). The value is repaired where its
meaning is plain (``2020-11-05``, ``male``) and otherwise left empty with a warning that names the attribute, not
the value; the reports pass dciodvfy and Pixelmed without errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from test_sr import dciodvfy

from cxr_triage.outputs import sr
from cxr_triage.outputs.srtemplate import TriageSRBuilder
from cxr_triage.testing.peers import pixelmed_validate
from cxr_triage.testing.synthetic import chest_dataset

PROBABILITIES = {"covid": 0.1, "normal": 0.2, "pneumonia": 0.7}
SHA = "ab" * 32
CASES = [
    ("StudyDate", "2020-13-45", "", True),
    ("StudyDate", "20201345", "", True),
    ("StudyDate", "2020-11-05", "20201105", False),
    ("StudyTime", "25:99", "", True),
    ("StudyTime", "10:11:12", "101112", False),
    ("PatientBirthDate", "19xx", "", True),
    ("PatientSex", "X", "", True),
    ("PatientSex", "male", "M", False),
    ("PatientSex", "f", "F", False),
]


def _build(evidence, full: bool):
    if full:
        return sr.build_triage_sr(
            evidence, label="pneumonia", probabilities=PROBABILITIES, model_version="v1", model_sha256=SHA, flagged=True
        )
    return TriageSRBuilder().build(
        evidence, label="pneumonia", probabilities=PROBABILITIES, model_version="v1", model_sha256=SHA, flagged=True
    )


@pytest.mark.parametrize("full", [False, True], ids=["template", "highdicom"])
@pytest.mark.parametrize(("keyword", "value", "expected", "warned"), CASES)
def test_an_invalid_header_value_is_repaired_or_emptied_and_the_report_is_valid(
    keyword: str, value: str, expected: str, warned: bool, full: bool, tmp_path: Path, caplog
) -> None:
    evidence = chest_dataset(seed=1, **{keyword: value})
    with caplog.at_level(logging.WARNING, logger="cxr_triage"):
        report = _build(evidence, full)
    assert keyword in report, "a type 2 attribute stays present"
    assert str(report[keyword].value or "") == expected
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("cxr_triage")]
    named = "Patient's Sex" if keyword == "PatientSex" else keyword
    if warned:
        assert [m for m in ours if named in m and str(evidence.SOPInstanceUID) in m], ours
        assert not [m for m in ours if value in m], "the value itself (patient data) is never logged"
    else:
        assert not [m for m in ours if named in m]
    assert evidence[keyword].value == value, "the evidence itself is not modified"
    path = tmp_path / "report.dcm"
    path.write_bytes(sr.sr_to_bytes(report))
    assert dciodvfy(path)[0] == []


def test_reports_of_invalid_headers_pass_pixelmed(tmp_path: Path) -> None:
    paths = []
    for index, (keyword, value, _, _) in enumerate(CASES):
        path = tmp_path / f"{index}.dcm"
        path.write_bytes(sr.sr_to_bytes(_build(chest_dataset(seed=2, **{keyword: value}), full=index % 2 == 0)))
        paths.append(path)
    results = pixelmed_validate(paths)
    assert {name: errors for name, (errors, _) in results.items() if errors} == {}
    assert len(results) == len(CASES)
