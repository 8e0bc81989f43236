"""Tests of the triage Structured Report: content, validity (dciodvfy, dsrdump, Pixelmed), round trips, input checks."""

from __future__ import annotations

import logging
import math
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from unittest import mock

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import write_sr
from highdicom.valuerep import check_person_name
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from cxr_triage import CLASS_NAMES
from cxr_triage.outputs import codes
from cxr_triage.outputs.sr import (
    ALGORITHM_NAME,
    build_triage_sr,
    device_observer_uid,
    sr_to_bytes,
    summarize_triage_sr,
)
from cxr_triage.testing import peers
from cxr_triage.testing.peers import dcmtk_tool, pixelmed_validate

pytestmark = pytest.mark.xdist_group("sr")  # one worker: one Pixelmed run for the module

REPO = Path(__file__).resolve().parents[1]
SHARED_DICOM = REPO.parent / "shared" / "data" / "dicom"
EVIDENCE_FILES = (
    "pydicom-data_RG1_UNCR.dcm",
    "nih-cxr14-dx-no-finding.dcm",
    "fo-dicom_CR-MONO1-10-chest.dcm",
)
SHA_A = "0123456789abcdef" * 4
SHA_B = "fedcba9876543210" * 4
PROBABILITIES = {"covid": 0.125, "normal": 0.25, "pneumonia": 0.625}
PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
LABELS_AND_FLAGS = [(label, flagged) for label in CLASS_NAMES for flagged in (True, False)]
JUSTIFIED_PIXELMED_WARNINGS = {
    '/CONTAINER (126000,DCM,"Imaging Measurement Report")/CONTAINER (126010,DCM,"Imaging Measurements")'
    '/CONTAINER (125007,DCM,"Measurement Group")/CODE (260870009,SCT,"Priority"): Content Item not in template',
}
"""Pixelmed's warnings on our reports, without the content item position; docs/SR.md justifies each."""


def read_evidence(name: str) -> Dataset:
    # The fo-dicom file has no file meta information (ACR-NEMA style), hence force.
    return pydicom.dcmread(SHARED_DICOM / name, stop_before_pixels=True, force=True)


def build(evidence: Dataset, **overrides: object) -> hd.sr.ComprehensiveSR:
    arguments: dict[str, object] = {
        "label": "pneumonia",
        "probabilities": PROBABILITIES,
        "model_version": "cae-lstm-test-1",
        "model_sha256": SHA_A,
        "flagged": True,
    }
    arguments.update(overrides)
    return build_triage_sr(evidence, **arguments)  # type: ignore[arg-type]


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """Run dicom3tools' dciodvfy; returns (error lines, warning lines)."""
    tool = shutil.which("dciodvfy")
    assert tool is not None, "dicom3tools' dciodvfy is not installed"
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings_ = [line for line in lines if line.startswith("Warning")]
    return errors, warnings_


def dsrdump(path: Path) -> str:
    proc = subprocess.run([dcmtk_tool("dsrdump"), str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("name", EVIDENCE_FILES)
def test_sr_is_valid_and_round_trips(name: str, tmp_path: Path) -> None:
    evidence = read_evidence(name)
    sr = build(evidence)
    path = write_sr(sr, tmp_path / "sr.dcm")

    errors, _ = dciodvfy(path)
    assert errors == []

    dump = dsrdump(path)
    assert "Pneumonia" in dump
    assert "233604007" in dump
    assert "Probability of COVID-19" in dump
    assert "High priority" in dump
    assert 'CODE:(,,"Procedure reported")=(363679005,SCT,"Imaging procedure")' in dump
    numbers = dict(re.findall(r'NUM:\(,,"([^"]+)"\)="([^"]+)" \(%,UCUM,', dump))
    assert {name: float(value) for name, value in numbers.items()} == {
        codes.PROBABILITY_CODES[cls].meaning: PROBABILITIES[cls] * 100 for cls in CLASS_NAMES
    }
    assert "research use only" in dump.lower()

    back = pydicom.dcmread(path)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    assert back.Modality == "SR"
    assert back.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    for keyword in PATIENT_STUDY_KEYWORDS:
        assert str(back.get(keyword) or "") == str(evidence.get(keyword) or ""), keyword
    assert back.SeriesInstanceUID != evidence.SeriesInstanceUID
    assert back.SOPInstanceUID != evidence.SOPInstanceUID
    assert not back.SOPInstanceUID.startswith(evidence.SOPInstanceUID)
    assert not back.SeriesInstanceUID.startswith(evidence.SeriesInstanceUID)
    assert "research use only" in back.SeriesDescription
    assert back.CompletionFlag == "COMPLETE"
    assert back.VerificationFlag == "UNVERIFIED"
    assert back.PreliminaryFlag == "PRELIMINARY"
    assert "PredecessorDocumentsSequence" not in back
    evidence_refs = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence_refs.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == evidence.SOPInstanceUID
    schemes = {item.CodingSchemeDesignator for item in back.CodingSchemeIdentificationSequence}
    assert codes.PRIVATE_SCHEME_DESIGNATOR in schemes

    summary = summarize_triage_sr(back)
    assert summary.label == "pneumonia"
    assert summary.flagged is True
    assert summary.referenced_sop_instance_uid == evidence.SOPInstanceUID
    assert summary.model_version == "cae-lstm-test-1"
    assert summary.model_sha256 == SHA_A
    for cls in CLASS_NAMES:
        assert math.isclose(summary.probabilities[cls], PROBABILITIES[cls], abs_tol=1e-6)


def test_sr_content_through_highdicom(tmp_path: Path) -> None:
    evidence = read_evidence("pydicom-data_RG1_UNCR.dcm")
    sr = build(evidence, label="covid", probabilities={"covid": 0.6, "normal": 0.1, "pneumonia": 0.3}, flagged=False)
    back = hd.sr.srread(write_sr(sr, tmp_path / "sr.dcm"))
    assert isinstance(back, hd.sr.ComprehensiveSR)
    report = back.content
    assert isinstance(report, hd.sr.MeasurementReport)

    (group,) = report.get_image_measurement_groups()
    assert group.finding_type == codes.FINDING_CODES["covid"]
    (priority,) = group.get_qualitative_evaluations()
    assert priority.name == codes.PRIORITY
    assert priority.value == codes.NORMAL_PRIORITY
    (measurement,) = group.get_measurements(name=codes.PROBABILITY_CODES["covid"])
    assert measurement.unit == codes.PERCENT
    assert math.isclose(measurement.value, 60.0)
    (source,) = group.source_images
    assert source.referenced_sop_instance_uid == evidence.SOPInstanceUID
    assert source.referenced_sop_class_uid == evidence.SOPClassUID

    (observer,) = report.get_observer_contexts(observer_type=pydicom.sr.codedict.codes.DCM.Device)
    attributes = observer.observer_identifying_attributes
    assert attributes.uid == device_observer_uid(SHA_A)
    assert attributes.model_name == "CAE-LSTM"
    assert attributes.manufacturer_name == "cxr-triage project"
    texts = {
        (item.name.meaning, str(item.value))
        for item in group[0].ContentSequence
        if item.value_type == hd.sr.ValueTypeValues.TEXT
    }
    assert ("Algorithm Name", ALGORITHM_NAME) in texts
    assert ("Algorithm Version", "cae-lstm-test-1") in texts
    assert ("Algorithm Parameters", f"model_sha256={SHA_A}") in texts


@pytest.fixture(scope="module")
def pixelmed_checked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[str], list[str]]]:
    """Reports checked in one Pixelmed run: one per label and flag (the evidence files in turn, the second report
    on each file superseding the first), and one with a procedure code outside CID 100 that Pixelmed must reject."""
    folder = tmp_path_factory.mktemp("pixelmed")
    paths: dict[str, Path] = {}
    first_reports: dict[str, Dataset] = {}
    for index, (label, flagged) in enumerate(LABELS_AND_FLAGS):
        name = EVIDENCE_FILES[index % len(EVIDENCE_FILES)]
        report = build(read_evidence(name), label=label, flagged=flagged, previous_sr=first_reports.get(name))
        first_reports.setdefault(name, report)
        paths[f"{label}-{flagged}"] = write_sr(report, folder / f"{label}-{flagged}.dcm")
    with mock.patch.object(codes, "PROCEDURE_REPORTED", Code("399208008", "SCT", "Plain chest X-ray")):
        outside = build(read_evidence(EVIDENCE_FILES[0]))
    paths["outside-cid-100"] = write_sr(outside, folder / "outside-cid-100.dcm")
    results = pixelmed_validate(list(paths.values()))
    return {key: (path, *results[str(path)]) for key, path in paths.items()}


def pixelmed_warning_kinds(lines: list[str]) -> set[str]:
    """Pixelmed's warnings without the position of the content item (it moves with the items before it)."""
    return {re.sub(r"^Warning: [\d.]+: ", "", line) for line in lines}


@pytest.mark.slow
@pytest.mark.peers
@pytest.mark.parametrize(("label", "flagged"), LABELS_AND_FLAGS)
def test_sr_passes_pixelmed_and_dciodvfy(
    label: str, flagged: bool, pixelmed_checked: dict[str, tuple[Path, list[str], list[str]]]
) -> None:
    path, errors, warnings_ = pixelmed_checked[f"{label}-{flagged}"]
    assert errors == []
    assert pixelmed_warning_kinds(warnings_) == JUSTIFIED_PIXELMED_WARNINGS
    assert dciodvfy(path)[0] == []
    summary = summarize_triage_sr(pydicom.dcmread(path))
    assert (summary.label, summary.flagged) == (label, flagged)


@pytest.mark.peers
def test_pixelmed_rejects_a_procedure_outside_cid_100(
    pixelmed_checked: dict[str, tuple[Path, list[str], list[str]]],
) -> None:
    _, errors, _ = pixelmed_checked["outside-cid-100"]
    assert len(errors) == 1, errors
    assert '(399208008,SCT,"Plain chest X-ray") not found in context group 100' in errors[0]


def test_pixelmed_missing_is_an_error_not_a_skip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(peers, "PIXELMED_JAR", tmp_path / "absent.jar")
    with pytest.raises(peers.PeerError, match="libpixelmed-java"):
        pixelmed_validate([tmp_path / "report.dcm"])
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(peers.PeerError, match="default-jre-headless"):
        pixelmed_validate([tmp_path / "report.dcm"])


def test_every_accepted_pixelmed_warning_is_justified_in_the_docs() -> None:
    text = (REPO / "docs" / "SR.md").read_text(encoding="utf-8")
    for warning in JUSTIFIED_PIXELMED_WARNINGS:
        assert warning in text


def test_previous_sr_is_referenced_as_predecessor(tmp_path: Path) -> None:
    evidence = read_evidence("nih-cxr14-dx-no-finding.dcm")
    first_path = write_sr(build(evidence, model_version="v1"), tmp_path / "first.dcm")
    first = pydicom.dcmread(first_path)

    second = build(evidence, model_version="v2", model_sha256=SHA_B, previous_sr=first, label="normal")
    second_path = write_sr(second, tmp_path / "second.dcm")
    errors, _ = dciodvfy(second_path)
    assert errors == []
    back = pydicom.dcmread(second_path)

    (study_item,) = back.PredecessorDocumentsSequence
    assert study_item.StudyInstanceUID == evidence.StudyInstanceUID
    (series_item,) = study_item.ReferencedSeriesSequence
    assert series_item.SeriesInstanceUID == first.SeriesInstanceUID
    (instance_item,) = series_item.ReferencedSOPSequence
    assert instance_item.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert instance_item.ReferencedSOPClassUID == first.SOPClassUID
    assert back.SOPInstanceUID != first.SOPInstanceUID
    assert summarize_triage_sr(back).predecessor_sop_instance_uids == (first.SOPInstanceUID,)
    assert summarize_triage_sr(back).label == "normal"


def test_series_uid_and_institution_are_used() -> None:
    evidence = read_evidence("pydicom-data_RG1_UNCR.dcm")
    series_uid = pydicom.uid.generate_uid()
    sr = build(evidence, series_instance_uid=series_uid, institution_name="Test Hospital")
    assert sr.SeriesInstanceUID == series_uid
    assert sr.InstitutionName == "Test Hospital"
    other = build(evidence)
    assert other.SOPInstanceUID != sr.SOPInstanceUID
    assert other.SeriesInstanceUID != sr.SeriesInstanceUID


def test_device_observer_uid_is_stable_per_model() -> None:
    assert device_observer_uid(SHA_A) == device_observer_uid(SHA_A)
    assert device_observer_uid(SHA_A) != device_observer_uid(SHA_B)
    assert device_observer_uid(SHA_A).is_valid


def test_invalid_patient_age_is_repaired_not_copied() -> None:
    evidence = read_evidence("nih-cxr14-dx-no-finding.dcm")
    assert evidence.PatientAge == "81"  # the NIH export stores a bare number, invalid for VR AS
    assert build(evidence).PatientAge == "081Y"
    with pytest.warns(UserWarning, match="Invalid value for VR AS"):
        evidence.PatientAge = "about eighty"
    assert "PatientAge" not in build(evidence)
    assert evidence.PatientAge == "about eighty"  # the evidence itself is left alone


def test_patient_name_stays_out_of_logs_and_warnings(caplog: pytest.LogCaptureFixture) -> None:
    evidence = read_evidence("nih-cxr14-dx-no-finding.dcm")
    evidence.PatientName = "Unmistakable"  # single component: highdicom would warn quoting it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_person_name(evidence.PatientName)
    assert any("Unmistakable" in str(w.message) for w in caught)  # the hazard: highdicom quotes the name

    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        build(evidence)
    assert not any("Unmistakable" in str(w.message) for w in caught)
    assert "Unmistakable" not in caplog.text
    assert evidence.SOPInstanceUID in caplog.text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"label": "tuberculosis"}, "unknown label"),
        ({"probabilities": {"covid": 0.5, "normal": 0.5}}, "missing"),
        ({"probabilities": {**PROBABILITIES, "tuberculosis": 0.0}}, "extra"),
        ({"probabilities": {"covid": 0.5, "normal": 0.5, "pneumonia": 0.5}}, "sum to 1"),
        ({"probabilities": {"covid": 1.2, "normal": -0.1, "pneumonia": -0.1}}, "within"),
        ({"probabilities": {"covid": math.nan, "normal": 0.5, "pneumonia": 0.5}}, "within"),
        ({"probabilities": {"covid": "x", "normal": 0.5, "pneumonia": 0.5}}, "not a number"),
        ({"model_sha256": "abc"}, "model_sha256"),
        ({"model_sha256": SHA_A.upper()}, "model_sha256"),
        ({"model_version": " "}, "model_version"),
    ],
)
def test_invalid_input_raises_value_error(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(read_evidence("pydicom-data_RG1_UNCR.dcm"), **overrides)


def test_flagged_accepts_numpy_bool_only() -> None:
    evidence = read_evidence("pydicom-data_RG1_UNCR.dcm")
    assert summarize_triage_sr(build(evidence, flagged=np.bool_(False))).flagged is False
    with pytest.raises(TypeError, match="flagged"):
        build(evidence, flagged="yes")


def test_invalid_evidence_and_previous_sr_raise_value_error() -> None:
    evidence = read_evidence("pydicom-data_RG1_UNCR.dcm")
    without_study = read_evidence("pydicom-data_RG1_UNCR.dcm")
    del without_study.StudyInstanceUID
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        build(without_study)

    other_study = build(read_evidence("nih-cxr14-dx-no-finding.dcm"))
    with pytest.raises(ValueError, match="another study"):
        build(evidence, previous_sr=other_study)
    with pytest.raises(ValueError, match="not a Structured Report"):
        build(evidence, previous_sr=evidence)


def test_summarize_rejects_other_documents() -> None:
    with pytest.raises(ValueError):
        summarize_triage_sr(read_evidence("pydicom-data_RG1_UNCR.dcm"))


def test_write_sr_is_atomic_and_replaces(tmp_path: Path) -> None:
    evidence = read_evidence("pydicom-data_RG1_UNCR.dcm")
    target = tmp_path / "report.dcm"
    target.write_bytes(b"old content")
    sr = build(evidence)
    assert write_sr(sr, target) == target
    assert target.read_bytes() == sr_to_bytes(sr)
    assert [p.name for p in tmp_path.iterdir()] == ["report.dcm"]
    assert sr_to_bytes(sr)[128:132] == b"DICM"
    nested = write_sr(sr, tmp_path / "new-folder" / "report.dcm")
    assert nested.read_bytes() == sr_to_bytes(sr)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "new-folder",
        "new-folder/report.dcm",
        "report.dcm",
    ]
