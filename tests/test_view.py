"""Lateral views caught from the header when ViewPosition is absent (cxr_triage.ml.view), on real-shaped headers.

Each refusal names the attribute and the value it used; frontal evidence is recorded as a note; a header that
tells nothing keeps today's behaviour (frontal assumed, with a note). The five shared real chest DICOMs stay
accepted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from cxr_triage.ml.preprocess import PreparedImage, Refusal, check_header, prepare_dataset, prepare_path
from cxr_triage.ml.view import Projection, projection_from_header, words
from cxr_triage.testing.synthetic import new_dataset

SHARED_DICOM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"


def chest(**attributes: object) -> Dataset:
    """A 12-bit 32x32 chest CR without ViewPosition, changed by ``attributes``."""
    pixels = np.arange(1024, dtype=np.uint16).reshape(32, 32) % 256
    return new_dataset(pixels, bits_stored=12, **{"ViewPosition": None, **attributes})


def view_code(value: str, meaning: str) -> list[Dataset]:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", meaning
    return [item]


def orientation(rows: str, columns: str) -> list[str]:
    return [rows, columns]


@pytest.mark.parametrize(
    ("attributes", "keyword", "value", "kind"),
    [
        ({"ViewCodeSequence": view_code("399067008", "lateral projection")}, "ViewCodeSequence", "399067008",
         "a lateral view"),
        ({"ViewCodeSequence": view_code("399173006", "left lateral")}, "ViewCodeSequence", "left lateral",
         "a lateral view"),
        ({"ViewCodeSequence": view_code("399182000", "oblique")}, "ViewCodeSequence", "399182000", "an oblique view"),
        ({"PatientOrientation": orientation("A", "F")}, "PatientOrientation", "A\\\\F", "a lateral view"),
        ({"PatientOrientation": orientation("P", "FL")}, "PatientOrientation", None, None),  # mixed: not decided
        ({"PatientOrientation": orientation("F", "P")}, "PatientOrientation", "F\\\\P", "a lateral view"),
        ({"SeriesDescription": "CHEST LAT"}, "SeriesDescription", "CHEST LAT", "a lateral view"),
        ({"SeriesDescription": "Thorax seitlich"}, "SeriesDescription", "Thorax seitlich", "a lateral view"),
        ({"SeriesDescription": "Tórax perfil"}, "SeriesDescription", "Tórax perfil", "a lateral view"),
        ({"SeriesDescription": "Poumons de profil"}, "SeriesDescription", "Poumons de profil", "a lateral view"),
        ({"SeriesDescription": "Torace LL"}, "SeriesDescription", "Torace LL", "a lateral view"),
        ({"SeriesDescription": "Thorax latéral gauche"}, "SeriesDescription", "latéral", "a lateral view"),
        ({"ProtocolName": "LATERAL CHEST"}, "ProtocolName", "LATERAL CHEST", "a lateral view"),
        ({"AcquisitionDeviceProcessingDescription": "THORAX LAT."}, "AcquisitionDeviceProcessingDescription",
         "THORAX LAT.", "a lateral view"),
        ({"ImageLaterality": "L"}, "ImageLaterality", "'L'", "a lateral view"),
        ({"ImageLaterality": "R"}, "ImageLaterality", "'R'", "a lateral view"),
    ],
)  # fmt: skip
def test_a_lateral_header_without_view_position_is_refused_naming_its_attribute(
    attributes: dict[str, object], keyword: str, value: str | None, kind: str | None
) -> None:
    refusal, notes = check_header(chest(**attributes))
    if kind is None:  # the evidence is not decisive: today's behaviour, frontal assumed and noted
        assert refusal is None and notes == ("ViewPosition is absent: frontal view assumed",)
        return
    assert isinstance(refusal, Refusal), notes
    assert refusal.code == "not_frontal" and refusal.attribute == keyword
    assert value is not None and value in refusal.reason and kind in refusal.reason, refusal.reason
    assert "ViewPosition absent" in refusal.reason and "only PA and AP" in refusal.reason


@pytest.mark.parametrize(
    ("attributes", "evidence"),
    [
        ({"ViewCodeSequence": view_code("399348003", "antero-posterior")}, "ViewCodeSequence '399348003"),
        ({"PatientOrientation": orientation("L", "F")}, "PatientOrientation 'L\\\\F'"),
        ({"PatientOrientation": orientation("R", "FP")}, None),  # oblique directions: not decided
        ({"SeriesDescription": "Thorax p.a."}, "SeriesDescription 'Thorax p.a.'"),
        ({"SeriesDescription": "CHEST FRONTAL"}, "SeriesDescription 'CHEST FRONTAL'"),
        ({"SeriesDescription": "CHEST PA + LAT"}, None),  # names both views: decides nothing
        ({"ImageLaterality": "B"}, "ImageLaterality 'B'"),
        ({}, None),
    ],
)
def test_frontal_evidence_is_noted_and_an_undecided_header_keeps_the_old_note(
    attributes: dict[str, object], evidence: str | None
) -> None:
    prepared = prepare_dataset(chest(**attributes))
    assert isinstance(prepared, PreparedImage), prepared
    if evidence is None:
        assert prepared.notes == ("ViewPosition is absent: frontal view assumed",)
    else:
        assert len(prepared.notes) == 1 and prepared.notes[0].startswith("ViewPosition is absent: frontal view from ")
        assert evidence in prepared.notes[0], prepared.notes


def test_view_position_decides_when_present_and_the_code_sequence_before_the_rest() -> None:
    ds = chest(ViewPosition="PA", SeriesDescription="CHEST LAT", PatientOrientation=orientation("A", "F"))
    assert check_header(ds) == (None, ())
    ds = chest(ViewCodeSequence=view_code("272479007", "postero-anterior"), SeriesDescription="CHEST LAT")
    evidence = projection_from_header(ds)
    assert evidence is not None and evidence.projection is Projection.FRONTAL
    assert evidence.keyword == "ViewCodeSequence"


def test_words_drop_accents_and_abbreviation_dots() -> None:
    assert words("Thorax p.a. / LATÉRAL-gauche") == {"THORAX", "PA", "LATERAL", "GAUCHE"}


def test_the_shared_real_chest_dicoms_stay_accepted() -> None:
    files = sorted(SHARED_DICOM.glob("*.dcm"))
    assert len(files) == 5
    for path in files:
        assert isinstance(prepare_path(path), PreparedImage), path
