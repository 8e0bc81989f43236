"""DICOM Structured Report of one triage result, built with highdicom.

:func:`build_triage_sr` turns the classifier's output for one image into a Comprehensive SR holding a TID 1500
Measurement Report with one image-level TID 1501 measurement group: the predicted class as the group's Finding, the
worklist priority as a qualitative evaluation, one probability measurement (UCUM "%") per class, the algorithm
identification (name, model version, model sha256) and a device observer context. Patient and study attributes come
from the classified image, so the report files into the same study; series and instance UIDs are new. A re-run after
retraining passes the earlier report as ``previous_sr`` and the new one lists it in the Predecessor Documents Sequence.

The report is research output and says so (series description, algorithm parameters, device name): it is not for
clinical use. docs/SR.md describes the content and the codes.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, generate_uid

from cxr_triage import CLASS_NAMES, __version__, log_name
from cxr_triage.outputs import codes as cxr_codes

logger = logging.getLogger(log_name(__name__))

ALGORITHM_NAME = "cxr-triage CAE-LSTM"
"""Algorithm Name in the report's Algorithm Identification (TID 4019)."""

DEVICE_NAME = "cxr-triage (research use only)"
"""Device Observer Name: the software that made the observations."""

DEVICE_MODEL_NAME = "CAE-LSTM"
"""Device Observer Model Name."""

RESEARCH_USE_NOTICE = "Research use only. Not for clinical use. Not a medical device."
"""Stated in the algorithm parameters of every report."""

DEFAULT_SERIES_NUMBER = 990
"""Series Number of the report series; a high number sorts it after the acquired series in viewers."""

PROBABILITY_SUM_TOLERANCE = 0.01
"""How far the class probabilities may sum away from 1 (fp16 softmax outputs and rounding)."""

_SHA_PARAM = "model_sha256="
_PIXEL_DATA_GROUP = 0x7FE0
_DEVICE_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cxr-triage:device-observer")
_ALGORITHM_VERSION = codes.DCM.AlgorithmVersion
_ALGORITHM_PARAMETERS = codes.DCM.AlgorithmParameters
_SHA256 = re.compile(r"[0-9a-f]{64}")
_AGE_STRING = re.compile(r"\d{3}[DWMY]")
_SR_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
        "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
        "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
        "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    }
)
# Type 2 attributes highdicom reads from the evidence by attribute access; absent ones are copied as empty.
_TYPE2_HEADER_KEYWORDS = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
# highdicom warns about single-component person names (common in anonymised data) and quotes the name in the
# warning, but logs never carry patient names: these are blanked for highdicom and set on the report afterwards
# (no warnings filter, as filters are process-wide state and not thread-safe).
_PERSON_NAME_KEYWORDS = ("PatientName", "ReferringPhysicianName")
_REQUIRED_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def validate_probabilities(label: str, probabilities: Mapping[str, float]) -> dict[str, float]:
    known = set(CLASS_NAMES)
    if label not in known:
        raise ValueError(f"unknown label {label!r}; expected one of {sorted(known)}")
    keys = set(probabilities)
    if keys != known:
        missing = sorted(known - keys)
        extra = sorted(keys - known)
        raise ValueError(f"probabilities must have exactly the keys {sorted(known)} (missing {missing}, extra {extra})")
    values: dict[str, float] = {}
    for name in CLASS_NAMES:
        try:
            value = float(probabilities[name])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"probability of {name!r} is not a number: {probabilities[name]!r}") from exc
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"probability of {name!r} must be within [0, 1], got {value!r}")
        values[name] = value
    total = sum(values.values())
    if abs(total - 1.0) > PROBABILITY_SUM_TOLERANCE:
        raise ValueError(f"probabilities must sum to 1 (within {PROBABILITY_SUM_TOLERANCE}), got {total:.6f}")
    return values


def validate_evidence(evidence: Dataset) -> Dataset:
    """Return a copy of ``evidence`` (no pixel data) with absent type 2 patient/study attributes present and empty."""
    if not isinstance(evidence, Dataset):
        raise TypeError(f"evidence must be a pydicom Dataset, got {type(evidence).__name__}")
    missing = [kw for kw in _REQUIRED_UID_KEYWORDS if not evidence.get(kw)]
    if missing:
        raise ValueError(f"evidence lacks required attributes: {', '.join(missing)}")
    # A deep copy of everything but the pixel data: the evidence itself is never modified.
    header = Dataset()
    for element in evidence:
        if element.tag.group != _PIXEL_DATA_GROUP:
            header.add(copy.deepcopy(element))
    for keyword in _TYPE2_HEADER_KEYWORDS:
        if keyword not in header:
            setattr(header, keyword, None)
    _normalise_header_values(header, str(evidence.SOPInstanceUID))
    age = header.get("PatientAge")
    if age not in (None, "") and not _AGE_STRING.fullmatch(str(age)):
        if re.fullmatch(r"\d{1,3}", str(age).strip()):
            # A bare number of years (common in exported research data) is repaired into the AS form "nnnY".
            header.PatientAge = f"{int(str(age).strip()):03d}Y"
        else:
            logger.warning("dropping invalid Patient's Age from the report of instance %s", evidence.SOPInstanceUID)
            del header.PatientAge
    return header


_SEX_VALUES = {"M": "M", "F": "F", "O": "O", "MALE": "M", "FEMALE": "F", "OTHER": "O"}
_DATE_KEYWORDS = ("StudyDate", "PatientBirthDate")
_TIME_KEYWORDS = ("StudyTime",)


def _normalise_header_values(header: Dataset, sop_instance_uid: str) -> None:
    """Repair or empty the patient and study values highdicom refuses (it raises, and no report would be made): a
    Patient's Sex other than M, F, O (``male``/``female``/``other`` are mapped), a Study Date or Patient's Birth
    Date that is not a DA (``YYYY-MM-DD`` is repaired), a Study Time that is not a TM. An emptied value stays present
    and empty (type 2), with a warning naming the attribute and the instance, never the value (patient data)."""
    from pydicom.valuerep import DA, TM

    sex = header.get("PatientSex")
    if sex not in (None, ""):
        fixed = _SEX_VALUES.get(str(sex).strip().upper())
        if fixed is None:
            logger.warning("instance %s: invalid Patient's Sex left empty in the report", sop_instance_uid)
        header.PatientSex = fixed
    for keywords, vr in ((_DATE_KEYWORDS, DA), (_TIME_KEYWORDS, TM)):
        for keyword in keywords:
            value = header.get(keyword)
            if value in (None, "") or isinstance(value, vr):
                continue
            text = str(value).strip()
            candidates = [text, text.replace("-", "")] if vr is DA else [text, text.replace(":", "")]
            for candidate in candidates:
                try:
                    setattr(header, keyword, vr(candidate))
                    break
                except (TypeError, ValueError):
                    continue
            else:
                logger.warning("instance %s: invalid %s left empty in the report", sop_instance_uid, keyword)
                setattr(header, keyword, None)


def _heatmap_header(heatmap: Dataset | None, header: Dataset) -> Dataset | None:
    """The UIDs of ``heatmap`` that the report's evidence needs; ValueError for an object of another study."""
    if heatmap is None:
        return None
    if heatmap.StudyInstanceUID != header.StudyInstanceUID:
        raise ValueError("the heatmap object belongs to another study than the image")
    found = Dataset()
    for keyword in _REQUIRED_UID_KEYWORDS:
        setattr(found, keyword, heatmap[keyword].value)
    return found


def _validate_previous_sr(previous_sr: Dataset, evidence: Dataset) -> None:
    missing = [kw for kw in _REQUIRED_UID_KEYWORDS if not previous_sr.get(kw)]
    if missing:
        raise ValueError(f"previous_sr lacks required attributes: {', '.join(missing)}")
    if previous_sr.SOPClassUID not in _SR_SOP_CLASSES:
        raise ValueError(f"previous_sr is not a Structured Report (SOP Class {previous_sr.SOPClassUID})")
    if previous_sr.StudyInstanceUID != evidence.StudyInstanceUID:
        raise ValueError("previous_sr belongs to another study than the evidence")
    if previous_sr.SOPInstanceUID == evidence.SOPInstanceUID:
        raise ValueError("previous_sr has the SOP Instance UID of the evidence")


def probability_percent(probability: float) -> float:
    """A probability in [0, 1] as the report's measured value: percent, rounded to 4 decimals."""
    return round(float(probability) * 100.0, 4)


def device_observer_uid(model_sha256: str) -> UID:
    """Stable Device Observer UID of one model: the same weights always give the same UID.

    A name-based (version 5) UUID of the checkpoint's sha256, written as a 2.25 UID (PS3.5 B.2).
    """
    return UID(f"2.25.{uuid.uuid5(_DEVICE_UUID_NAMESPACE, model_sha256).int}")


def validate_model(model_version: str, model_sha256: str, flagged: object) -> bool:
    """Check the model's identification and the flag; the flag as a plain ``bool``."""
    if not isinstance(model_version, str) or not model_version.strip():
        raise ValueError("model_version must be a non-empty string")
    if not isinstance(model_sha256, str) or not _SHA256.fullmatch(model_sha256):
        raise ValueError("model_sha256 must be 64 lowercase hexadecimal characters")
    if not isinstance(flagged, bool | np.bool_):
        raise TypeError(f"flagged must be a bool, got {type(flagged).__name__}")
    return bool(flagged)


def _measurement_group(
    header: Dataset,
    label: str,
    values: Mapping[str, float],
    flagged: bool,
    model_version: str,
    model_sha256: str,
    heatmap: Dataset | None = None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501: the finding (row 3b), the priority, one probability per class, the algorithm and the source image;
    with ``heatmap``, an IMAGE item "Illustration of ROI" (DCM 121200) referencing it (docs/SR.md)."""
    algorithm = hd.sr.AlgorithmIdentification(
        name=ALGORITHM_NAME,
        version=model_version,
        parameters=[
            f"{_SHA_PARAM}{model_sha256}",
            f"cxr_triage_version={__version__}",
            RESEARCH_USE_NOTICE,
        ],
    )
    priority = hd.sr.QualitativeEvaluation(
        name=cxr_codes.PRIORITY,
        value=cxr_codes.HIGH_PRIORITY if flagged else cxr_codes.NORMAL_PRIORITY,
    )
    measurements = [
        hd.sr.Measurement(
            name=cxr_codes.PROBABILITY_CODES[name],
            value=probability_percent(values[name]),
            unit=cxr_codes.PERCENT,
        )
        for name in CLASS_NAMES
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="cxr-triage image triage"),
        finding_type=cxr_codes.FINDING_CODES[label],
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[priority],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(header)],
    )
    if heatmap is not None:
        group[0].ContentSequence.append(
            hd.sr.ImageContentItem(
                name=codes.DCM.IllustrationOfROI,
                referenced_sop_class_uid=heatmap.SOPClassUID,
                referenced_sop_instance_uid=heatmap.SOPInstanceUID,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    return group


def build_triage_sr(
    evidence: Dataset,
    *,
    label: str,
    probabilities: Mapping[str, float],
    model_version: str,
    model_sha256: str,
    flagged: bool,
    previous_sr: Dataset | None = None,
    series_instance_uid: str | None = None,
    institution_name: str = "",
    manufacturer: str = "cxr-triage project",
    series_description: str = "cxr-triage AI triage (research use only)",
    series_number: int = DEFAULT_SERIES_NUMBER,
    sop_instance_uid: str | None = None,
    template: bool = False,
    heatmap: Dataset | None = None,
) -> hd.sr.ComprehensiveSR:
    """Build the Comprehensive SR reporting the triage of one classified image.

    Parameters
    ----------
    evidence:
        Dataset of the classified image (may have been read with ``stop_before_pixels=True``); the report copies
        its patient and study attributes and references it as the measurement group's source image.
    label:
        Predicted class, one of :data:`cxr_triage.CLASS_NAMES`.
    probabilities:
        Probability in [0, 1] of every class of :data:`cxr_triage.CLASS_NAMES` (exactly those keys, summing to 1).
    model_version, model_sha256:
        Identify the model (Algorithm Version; the sha256 of the checkpoint goes into the algorithm parameters and
        determines the Device Observer UID).
    flagged:
        Whether the triage put the study on the worklist (reported as Priority: High / Normal priority).
    previous_sr:
        An earlier report on the same image that this one supersedes (Predecessor Documents Sequence).
    series_instance_uid, sop_instance_uid:
        UIDs of the report; new ones are generated when not given.
    heatmap:
        The heatmap object of this image (``cxr_triage.outputs.heatmapobject``; its header is enough): referenced
        by the measurement group and listed in the evidence. It must be of the image's study.
    template:
        The build of a template for placeholder evidence (``cxr_triage.outputs.srtemplate``): logged at DEBUG, not
        as a result.

    Raises
    ------
    ValueError
        Unknown label, wrong probability keys or values, malformed model identification, evidence without the
        UIDs a report needs, or a previous report from another study.
    """
    # Over 60 lines only by its parameter documentation (highdicom's style): the body is under 60.
    values = validate_probabilities(label, probabilities)
    flagged = validate_model(model_version, model_sha256, flagged)
    header = validate_evidence(evidence)
    if previous_sr is not None:
        _validate_previous_sr(previous_sr, header)
    for keyword in _PERSON_NAME_KEYWORDS:
        setattr(header, keyword, None)

    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(codes.DCM.Device),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(model_sha256),
            name=DEVICE_NAME,
            manufacturer_name=manufacturer or None,
            model_name=DEVICE_MODEL_NAME,
        ),
    )
    heatmap_header = _heatmap_header(heatmap, header)
    group = _measurement_group(header, label, values, flagged, model_version, model_sha256, heatmap_header)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=cxr_codes.PROCEDURE_REPORTED,
        imaging_measurements=[group],
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[header] if heatmap_header is None else [header, heatmap_header],
        content=report[0],
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution_name or None,
        previous_versions=[previous_sr] if previous_sr is not None else None,
        series_description=series_description,
    )
    for keyword in _PERSON_NAME_KEYWORDS:
        setattr(sr, keyword, copy.deepcopy(evidence.get(keyword)))
    sr.CodingSchemeIdentificationSequence = [cxr_codes.private_coding_scheme_identification()]
    if sr.SeriesInstanceUID == evidence.SeriesInstanceUID or sr.SOPInstanceUID == evidence.SOPInstanceUID:
        raise ValueError("the report must not reuse the series or instance UID of the evidence")
    logger.log(
        logging.DEBUG if template else logging.INFO,  # a template's build reports no result
        "built triage SR %s for instance %s (label %s, flagged %s, model %s)",
        sr.SOPInstanceUID,
        evidence.SOPInstanceUID,
        label,
        flagged,
        model_version,
    )
    return sr


@dataclass(frozen=True)
class TriageSummary:
    """What a triage report says, read back from its content tree (see :func:`summarize_triage_sr`)."""

    sop_instance_uid: str
    referenced_sop_instance_uid: str
    label: str
    probabilities: dict[str, float]
    flagged: bool
    model_version: str
    model_sha256: str
    predecessor_sop_instance_uids: tuple[str, ...]


def summarize_triage_sr(dataset: Dataset) -> TriageSummary:
    """Read a report made by :func:`build_triage_sr` back into plain values (ValueError if it is not one)."""
    try:
        content = hd.sr.ComprehensiveSR.from_dataset(dataset).content
        if not isinstance(content, hd.sr.MeasurementReport):
            raise ValueError("the root container is not a TID 1500 Measurement Report")
        groups = content.get_image_measurement_groups()
    except (AttributeError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise ValueError(f"not a TID 1500 measurement report: {exc}") from exc
    if len(groups) != 1:
        raise ValueError(f"expected one image measurement group, found {len(groups)}")
    group = groups[0]
    labels = {code: name for name, code in cxr_codes.FINDING_CODES.items()}
    finding = group.finding_type
    priorities = group.get_qualitative_evaluations(name=cxr_codes.PRIORITY)
    if finding is None or len(priorities) != 1:
        raise ValueError("the report lacks its finding or priority evaluation")
    label = next((name for code, name in labels.items() if finding == code), None)
    if label is None:
        raise ValueError(f"unknown finding code {finding.value}")
    probabilities: dict[str, float] = {}
    for name, code in cxr_codes.PROBABILITY_CODES.items():
        measurements = group.get_measurements(name=code)
        if len(measurements) != 1:
            raise ValueError(f"the report lacks the probability of {name!r}")
        probabilities[name] = float(measurements[0].value) / 100.0
    texts: dict[str, list[str]] = {}
    for item in group[0].ContentSequence:
        if item.value_type == hd.sr.ValueTypeValues.TEXT:
            texts.setdefault(item.name.value, []).append(str(item.value))
    version = texts.get(_ALGORITHM_VERSION.value, [""])[0]
    sha = next((p.split("=", 1)[1] for p in texts.get(_ALGORITHM_PARAMETERS.value, []) if p.startswith(_SHA_PARAM)), "")
    sources = group.source_images
    predecessors = tuple(
        str(instance.ReferencedSOPInstanceUID)
        for study in dataset.get("PredecessorDocumentsSequence", [])
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    )
    return TriageSummary(
        sop_instance_uid=str(dataset.SOPInstanceUID),
        referenced_sop_instance_uid=str(sources[0].referenced_sop_instance_uid) if sources else "",
        label=label,
        probabilities=probabilities,
        flagged=priorities[0].value == cxr_codes.HIGH_PRIORITY,
        model_version=version,
        model_sha256=sha,
        predecessor_sop_instance_uids=predecessors,
    )


def sr_to_bytes(sr: Dataset) -> bytes:
    """Encode a report as a DICOM Part 10 file (with file meta information)."""
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def placeholder_evidence() -> Dataset:
    """A header-only CR dataset with fresh UIDs and no patient data: builds a throw-away report (warm-up)."""
    from pydicom.uid import generate_uid

    evidence = Dataset()
    evidence.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    evidence.SOPInstanceUID = generate_uid()
    evidence.StudyInstanceUID = generate_uid()
    evidence.SeriesInstanceUID = generate_uid()
    evidence.Modality = "CR"
    evidence.Rows = evidence.Columns = 1
    return evidence
