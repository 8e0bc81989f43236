"""The projection of a radiograph read from its header when ``ViewPosition`` says nothing.

CR systems often leave ``ViewPosition`` empty, and a chest study's lateral view then arrives looking like any
other chest image. ``projection_from_header`` looks, in this order, at the attributes that can tell the projection
and stops at the first that does:

1. ``ViewCodeSequence``: the coded view (DICOM CID 4010, "DX View"), compared by code value with the concepts pydicom
   ships (``pydicom.sr.codedict.codes.SCT``), so no code is typed by hand here;
2. ``PatientOrientation``: the patient directions of the rows and the columns; a frontal projection has left/right
   in one of them, a lateral one anterior/posterior and head/foot and no left/right;
3. ``SeriesDescription``, ``ProtocolName``, ``AcquisitionDeviceProcessingDescription``: words for a lateral or a
   frontal view in the languages a PACS meets (a description naming both, "PA + LAT", decides nothing);
4. ``ImageLaterality``: ``L`` or ``R`` (one side only) is what a lateral projection records; ``B`` a frontal one.

Each answer names the attribute and the value it came from, so a refusal can say why. Only
``cxr_triage.ml.preprocess`` calls it (during the header checks, before any pixel is decoded).
"""

from __future__ import annotations

import enum
import re
import unicodedata
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes


class Projection(enum.Enum):
    """What the header says the beam went through."""

    FRONTAL = "a frontal view"
    LATERAL = "a lateral view"
    OBLIQUE = "an oblique view"


@dataclass(frozen=True)
class ViewEvidence:
    """The projection and the attribute (keyword) and value it was read from."""

    projection: Projection
    keyword: str
    value: str

    def describe(self) -> str:
        return f"{self.keyword} {self.value!r}"


def _code_values(*names: str) -> frozenset[str]:
    return frozenset(getattr(codes.SCT, name).value for name in names)


VIEW_CODES: dict[Projection, frozenset[str]] = {
    Projection.FRONTAL: _code_values("PosteroAnterior", "AnteroPosterior", "Frontal"),
    Projection.LATERAL: _code_values(
        "LeftLateral", "RightLateral", "LateralProjection", "LateralMedial", "MedioLateralProjection", "LateroMedial"
    ),
    Projection.OBLIQUE: _code_values(
        "ObliqueProjection",
        "LeftAnteriorOblique",
        "RightAnteriorOblique",
        "LeftPosteriorOblique",
        "RightPosteriorOblique",
        "PosteroAnteriorOblique",
        "AnteroPosteriorOblique",
        "LateralOblique",
        "LeftOblique",
        "RightOblique",
    ),  # fmt: skip
}
"""CID 4010 concepts by projection (SNOMED CT code values)."""

LATERAL_WORDS = frozenset(
    {
        "LAT", "LATERAL", "LATERALE", "LATERAUX", "LATERALIS", "LATERAAL", "LATERO", "LL", "RL", "LLAT", "RLAT",
        "SEITLICH", "SEITL", "PROFIL", "PERFIL", "BOCZNY", "BOCZNE", "SIDEBILLEDE", "SIDOBILD", "SIVUKUVA",
    }
)  # fmt: skip
"""Words for a lateral view (English, French, German, Italian, Spanish, Portuguese, Dutch, Polish, Nordic), upper
case without accents."""

FRONTAL_WORDS = frozenset({"PA", "AP", "FRONTAL", "FRONTALE", "FACE", "FRONT", "DV", "VD"})
"""Words for a frontal view; ``P.A.`` and ``a.p.`` count once their dots are dropped."""

DESCRIPTIONS = ("SeriesDescription", "ProtocolName", "AcquisitionDeviceProcessingDescription")


def _from_codes(ds: Dataset) -> ViewEvidence | None:
    for item in ds.get("ViewCodeSequence") or []:
        value = str(item.get("CodeValue", ""))
        for projection, known in VIEW_CODES.items():
            if value in known:
                meaning = str(item.get("CodeMeaning", "")) or value
                return ViewEvidence(projection, "ViewCodeSequence", f"{value} ({meaning})")
    return None


def _from_orientation(ds: Dataset) -> ViewEvidence | None:
    value = ds.get("PatientOrientation")
    if not value or isinstance(value, str) or len(value) != 2:
        return None
    rows, columns = (str(v).upper() for v in value)
    text = "\\".join((rows, columns))
    sides = [bool(set(d) & {"L", "R"}) for d in (rows, columns)]
    front_back = [bool(set(d) & {"A", "P"}) for d in (rows, columns)]
    head_foot = [bool(set(d) & {"H", "F"}) for d in (rows, columns)]
    if any(sides) and any(head_foot) and not any(front_back):
        return ViewEvidence(Projection.FRONTAL, "PatientOrientation", text)
    if any(front_back) and any(head_foot) and not any(sides):
        return ViewEvidence(Projection.LATERAL, "PatientOrientation", text)
    return None


def words(text: str) -> set[str]:
    """Upper-case words of a description, accents removed, dots inside abbreviations dropped (``p.a.`` -> PA)."""
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").upper()
    return set(re.split(r"[^A-Z0-9]+", plain.replace(".", ""))) - {""}


def _from_descriptions(ds: Dataset) -> ViewEvidence | None:
    for keyword in DESCRIPTIONS:
        text = str(ds.get(keyword) or "")
        found = words(text)
        lateral, frontal = bool(found & LATERAL_WORDS), bool(found & FRONTAL_WORDS)
        if lateral != frontal:
            return ViewEvidence(Projection.LATERAL if lateral else Projection.FRONTAL, keyword, text)
    return None


def _from_laterality(ds: Dataset) -> ViewEvidence | None:
    value = str(ds.get("ImageLaterality") or "").upper()
    if value in {"L", "R"}:
        return ViewEvidence(Projection.LATERAL, "ImageLaterality", value)
    if value == "B":
        return ViewEvidence(Projection.FRONTAL, "ImageLaterality", value)
    return None


def projection_from_header(ds: Dataset) -> ViewEvidence | None:
    """The first decisive evidence of the module docstring's list, or None when the header does not tell."""
    for read in (_from_codes, _from_orientation, _from_descriptions, _from_laterality):
        evidence = read(ds)
        if evidence is not None:
            return evidence
    return None
