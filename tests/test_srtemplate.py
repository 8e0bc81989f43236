"""The SR template: a filled report equals, attribute for attribute, the report highdicom builds for the same image."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from test_sr import EVIDENCE_FILES, SHA_A, SHA_B, dciodvfy, read_evidence

from cxr_triage import CLASS_NAMES
from cxr_triage.outputs.sr import build_triage_sr, sr_to_bytes, summarize_triage_sr
from cxr_triage.outputs.srtemplate import TriageSRBuilder, TriageSRTemplate
from cxr_triage.testing import synthetic

SHARED_DICOM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
PROBABILITIES = {"covid": 0.0625, "normal": 0.1875, "pneumonia": 0.75}
SETTINGS = {"institution_name": "General Hospital", "manufacturer": "Test Maker", "series_description": "AI triage"}
TIME_KEYWORDS = ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime")


def synthetic_headers() -> dict[str, Dataset]:
    """Headers that differ in what highdicom copies: character set, optional patient and study attributes,
    acquisition equipment present or not, an age to repair, a DX image."""
    accented = synthetic.chest_dataset(8, 8, PatientName="Müller^Jürgen", SpecificCharacterSet="ISO_IR 100")
    rich = synthetic.chest_dataset(
        8,
        8,
        PatientAge="57",
        PatientWeight="70",
        IssuerOfPatientID="HOSP",
        StudyDescription="Chest PA",
        Manufacturer="ACME",
        ManufacturerModelName="X-1",
        DeviceSerialNumber="42",
        SoftwareVersions="3.1",
        InstitutionName="Imaging Centre",
        AccessionNumber="ACC123",
        StudyID="7",
        PatientBirthDate="19690203",
        PatientSex="F",
        ReferringPhysicianName="Doe^Jane",
    )
    bare = synthetic.chest_dataset(8, 8)
    for keyword in ("PatientName", "PatientID"):
        if keyword in bare:
            delattr(bare, keyword)
    dx = synthetic.chest_dataset(8, 8, SOPClassUID="1.2.840.10008.5.1.4.1.1.1.1", Modality="DX", Manufacturer="B")
    return {"accented": accented, "rich": rich, "bare": bare, "dx": dx}


def headers() -> dict[str, Dataset]:
    found = {name: read_evidence(name) for name in EVIDENCE_FILES}
    found.update(synthetic_headers())
    for name, header in found.items():
        if "PixelData" in header:
            del header.PixelData
        found[name] = header
    return found


def comparable(report: Dataset) -> bytes:
    """The encoded report with what differs between any two builds (times, the tracking UID) blanked."""
    copy = pydicom.dcmread(io.BytesIO(sr_to_bytes(report)))
    for keyword in TIME_KEYWORDS:
        if keyword in copy:
            setattr(copy, keyword, "")
    for item in copy.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = ""

    def walk(dataset: Dataset) -> None:
        for item in dataset.get("ContentSequence", []):
            names = item.get("ConceptNameCodeSequence") or []
            if names and names[0].CodeValue == "112040":
                item.UID = "1.2.3"
            walk(item)

    walk(copy)
    return sr_to_bytes(copy)


HEADERS = headers()


@pytest.mark.parametrize("name", sorted(HEADERS))
@pytest.mark.parametrize(("label", "flagged"), [("pneumonia", True), ("normal", False), ("covid", True)])
def test_a_filled_report_equals_highdicoms(name: str, label: str, flagged: bool) -> None:
    evidence = HEADERS[name]
    series, instance = generate_uid(), generate_uid()
    common = {"model_version": "cae-lstm-test-1", "model_sha256": SHA_A, "flagged": flagged}
    built = build_triage_sr(
        evidence,
        label=label,
        probabilities=PROBABILITIES,
        series_instance_uid=series,
        sop_instance_uid=instance,
        **common,
        **SETTINGS,
    )
    template = TriageSRTemplate(evidence.SOPClassUID, label=label, **common, **SETTINGS)
    filled = template.fill(evidence, PROBABILITIES, series_instance_uid=series, sop_instance_uid=instance)
    assert comparable(filled) == comparable(built)
    assert str(filled.get("PatientName") or "") == str(evidence.get("PatientName") or "")


def test_one_template_serves_many_instances_with_their_own_uids_and_values(tmp_path: Path) -> None:
    builder = TriageSRBuilder(**SETTINGS)
    reports = []
    for seed, header in enumerate(synthetic_headers().values()):
        if header.SOPClassUID != HEADERS["rich"].SOPClassUID:
            continue
        probabilities = {"covid": 0.01 * seed, "normal": 0.2, "pneumonia": 0.8 - 0.01 * seed}
        report = builder.build(
            header,
            label="pneumonia",
            probabilities=probabilities,
            model_version="cae-lstm-test-1",
            model_sha256=SHA_A,
            flagged=True,
        )
        summary = summarize_triage_sr(report)
        assert summary.label == "pneumonia"
        assert summary.probabilities == pytest.approx(probabilities)
        assert report.StudyInstanceUID == header.StudyInstanceUID
        reports.append(report)
    assert len(builder._templates) == 1
    assert len({r.SOPInstanceUID for r in reports}) == len(reports) == 3
    path = tmp_path / "filled.dcm"
    path.write_bytes(sr_to_bytes(reports[-1]))
    errors, _ = dciodvfy(path)
    assert errors == []


def test_a_report_that_supersedes_another_is_built_by_highdicom_in_full() -> None:
    builder = TriageSRBuilder()
    evidence = HEADERS["rich"]
    arguments = {"label": "normal", "model_sha256": SHA_A, "flagged": False, "probabilities": PROBABILITIES}
    first = builder.build(evidence, model_version="m-1", **arguments)  # type: ignore[arg-type]
    second = builder.build(evidence, model_version="m-2", previous_sr=first, **arguments)  # type: ignore[arg-type]
    predecessors = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert predecessors[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert len(builder._templates) == 1  # only the first came from a template


def test_templates_are_kept_per_model_finding_priority_and_class_up_to_the_limit() -> None:
    builder = TriageSRBuilder(max_templates=2)
    cr = HEADERS["rich"].SOPClassUID
    a = builder.template(cr, "normal", False, "m-1", SHA_A)
    assert builder.template(cr, "normal", False, "m-1", SHA_A) is a
    b = builder.template(cr, "normal", True, "m-1", SHA_A)
    assert b is not a
    builder.template(cr, "normal", False, "m-1", SHA_B)  # a third: the least recently used (a) goes
    assert builder.template(cr, "normal", True, "m-1", SHA_A) is b
    assert builder.template(cr, "normal", False, "m-1", SHA_A) is not a


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"probabilities": {"covid": 0.5, "normal": 0.6, "pneumonia": 0.1}}, "sum to 1"),
        ({"probabilities": {"covid": 1.0}}, "exactly the keys"),
        ({"sop_class": "1.2.840.10008.5.1.4.1.1.7"}, "SOP class"),
        ({"series_instance_uid": "evidence"}, "must not reuse"),
    ],
)
def test_fill_checks_its_input_like_build_triage_sr(change: dict[str, object], message: str) -> None:
    evidence = HEADERS["rich"].copy()
    template = TriageSRTemplate(
        evidence.SOPClassUID, label="normal", flagged=False, model_version="m", model_sha256=SHA_A
    )
    if "sop_class" in change:
        evidence.SOPClassUID = change["sop_class"]
    series = evidence.SeriesInstanceUID if change.get("series_instance_uid") == "evidence" else None
    probabilities = change.get("probabilities", PROBABILITIES)
    with pytest.raises(ValueError, match=message):
        template.fill(evidence, probabilities, series_instance_uid=series)  # type: ignore[arg-type]


def test_a_template_checks_the_model_and_label() -> None:
    with pytest.raises(ValueError, match="64 lowercase"):
        TriageSRTemplate(
            "1.2.840.10008.5.1.4.1.1.1", label="normal", flagged=False, model_version="m", model_sha256="x"
        )
    with pytest.raises(ValueError, match="unknown label"):
        TriageSRBuilder().build(
            HEADERS["rich"],
            label="cat",
            probabilities=dict.fromkeys(CLASS_NAMES, 1 / 3),
            model_version="m",
            model_sha256=SHA_A,
            flagged=False,
        )
