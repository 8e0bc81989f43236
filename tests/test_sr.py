"""Tests of the triage Structured Report: content, validity (dciodvfy, dsrdump), round trips and input checks."""

from __future__ import annotations

import logging
import math
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import write_sr
from highdicom.valuerep import check_person_name
from pydicom.dataset import Dataset

from cxr_triage import CLASS_NAMES, codes
from cxr_triage.sr import (
    ALGORITHM_NAME,
    build_triage_sr,
    device_observer_uid,
    sr_to_bytes,
    summarize_triage_sr,
)
from cxr_triage.testing.peers import dcmtk_tool

SHARED_DICOM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
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
    (finding,) = group.get_qualitative_evaluations(name=codes.FINDING)
    assert finding.value == codes.FINDING_CODES["covid"]
    (priority,) = group.get_qualitative_evaluations(name=codes.PRIORITY)
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
