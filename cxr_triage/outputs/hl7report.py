"""What a finished study's HL7 result says, as data: ``StudyReport``, built by ``read_report`` from the study's
aggregate and the identifiers its first processed instance recorded (``instances.identifiers``), checked for what
HL7 can carry. The worker records them when it processes an instance (``recorded_identifiers``, which reads them
from its DICOM header with ``report_from_header``: Patient ID and its issuer, name, birth date, sex, accession and
order numbers, procedure code, study date and time), so the report never needs the spool file, which retention
may have deleted. ``cxr_triage.outputs.hl7`` turns it into the ORU^R01.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cxr_triage import CLASS_NAMES, log_name
from cxr_triage.core import db

logger = logging.getLogger(log_name("hl7"))
"""The HL7 output's logger: what the header cannot give the RIS is the HL7 output's to say."""

MAX_PN_GROUP = 64
"""DICOM PN: at most 64 characters in each component group (alphabetic, ideographic, phonetic)."""


class ReportError(ValueError):
    """A study's ORU^R01 cannot be built (no readable header, no Patient ID, a value HL7 cannot carry)."""


@dataclass(frozen=True)
class StudyReport:
    """What an ORU^R01 says about one finished study: identifiers from its DICOM header, and its results."""

    study_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str = ""
    patient_name: tuple[str, str, str, str, str] = ("", "", "", "", "")
    """XPN order: family, given, middle, suffix, prefix."""
    birth_date: str = ""
    sex: str = ""
    accession_number: str = ""
    placer_order_number: str = ""
    filler_order_number: str = ""
    procedure_code: tuple[str, str, str] | None = None
    """(code, text, system) from the images' Procedure Code Sequence; None: ``[hl7] procedure_code``."""
    observed_at: str = ""
    """HL7 DTM of the exam (Study Date and Time), or of its arrival."""
    label: str | None = None
    probabilities: Mapping[str, float] | None = None
    priority: str = "review"
    priority_rule: str = ""
    priority_reason: str = ""
    model_version: str = ""
    corrected: bool = False


def hl7_datetime(moment: dt.datetime) -> str:
    """An aware datetime as HL7 DTM in UTC: ``YYYYMMDDHHMMSS+0000``."""
    return moment.astimezone(dt.UTC).strftime("%Y%m%d%H%M%S+0000")


def _dicom_datetime(date: object, time: object) -> str:
    """Study Date and Time as HL7 DTM (local time, as DICOM gives it); empty when the date is not YYYYMMDD."""
    date_text, time_text = str(date or ""), str(time or "").split(".")[0]
    if not re.fullmatch(r"\d{8}", date_text):
        return ""
    return date_text + (time_text if re.fullmatch(r"\d{2}|\d{4}|\d{6}", time_text) else "")


def _first(dataset: Any, keyword: str) -> str:
    """``keyword`` at the top level, else in the first Request Attributes Sequence item."""
    value = dataset.get(keyword)
    if not value:
        requests = dataset.get("RequestAttributesSequence") or []
        value = requests[0].get(keyword) if requests else None
    return str(value or "").strip()


def _procedure_code(dataset: Any) -> tuple[str, str, str] | None:
    items = dataset.get("ProcedureCodeSequence") or []
    if not items:
        requests = dataset.get("RequestAttributesSequence") or []
        items = (requests[0].get("RequestedProcedureCodeSequence") or []) if requests else []
    if not items or not items[0].get("CodeValue") or not items[0].get("CodingSchemeDesignator"):
        return None
    item = items[0]
    return str(item.CodeValue), str(item.get("CodeMeaning", "")), str(item.CodingSchemeDesignator)


def _patient_name(dataset: Any, study_uid: str) -> tuple[str, str, str, str, str]:
    """PID-5's components from Patient Name; all empty (PID-5 is then sent as HL7's null) when the header's value
    is not a Person Name a RIS could use (wrong VR, bytes, a component group over DICOM's 64 characters), so that
    the result is still sent."""
    from pydicom import config
    from pydicom.valuerep import PersonName

    element = dataset.get((0x0010, 0x0010))
    empty = ("", "", "", "", "")
    if element is None or element.value in (None, "", b""):
        return empty
    value = element.value
    if isinstance(value, str) and not isinstance(value, PersonName):
        value = PersonName(value, validation_mode=config.IGNORE)
    if not isinstance(value, PersonName) or any(len(group) > MAX_PN_GROUP for group in value.components):
        # Only the VR and the size are logged: the value is patient data.
        length = len(str(value)) if isinstance(value, PersonName) else len(value) if hasattr(value, "__len__") else 1
        logger.warning(
            "study %s: Patient Name (VR %s, length %d) is not a usable Person Name; PID-5 is sent as HL7's null",
            study_uid,
            element.VR,
            length,
        )
        return empty
    return (value.family_name, value.given_name, value.middle_name, value.name_suffix, value.name_prefix)


def report_from_header(dataset: Any) -> dict[str, Any]:
    """The identifiers of a study from one of its instances' DICOM header (``StudyReport`` keyword arguments)."""
    patient_id = str(dataset.get("PatientID") or "").strip()
    if not patient_id:
        raise ReportError("the study's images have no Patient ID: the RIS could not match the result to a patient")
    study_uid = str(dataset.get("StudyInstanceUID") or "")
    if not re.fullmatch(r"[0-9.]{1,64}", study_uid):
        raise ReportError(f"the Study Instance UID {study_uid!r} is not a UID")
    parts = _patient_name(dataset, study_uid)
    sex = str(dataset.get("PatientSex") or "").strip().upper()
    birth = str(dataset.get("PatientBirthDate") or "")
    return {
        "study_instance_uid": study_uid,
        "patient_id": patient_id,
        "issuer_of_patient_id": str(dataset.get("IssuerOfPatientID") or "").strip(),
        "patient_name": tuple(str(p or "").strip() for p in parts),
        "birth_date": birth if re.fullmatch(r"\d{8}", birth) else "",
        "sex": sex if sex in ("M", "F", "O") else "",
        "accession_number": str(dataset.get("AccessionNumber") or "").strip(),
        "placer_order_number": _first(dataset, "PlacerOrderNumberImagingServiceRequest"),
        "filler_order_number": _first(dataset, "FillerOrderNumberImagingServiceRequest"),
        "procedure_code": _procedure_code(dataset),
        "observed_at": _dicom_datetime(dataset.get("StudyDate"), dataset.get("StudyTime")),
    }


def recorded_identifiers(dataset: Any) -> dict[str, Any]:
    """What ``instances.identifiers`` records of an instance's header when it is processed (JSON): the
    ``report_from_header`` fields, or ``{"error": why}`` when no report can be built from this header (so that
    ``read_report`` refuses the study as it would have when reading the file). Never raises."""
    try:
        return report_from_header(dataset)
    except ReportError as exc:
        return {"error": str(exc)}
    except Exception as exc:  # an unexpected header must not stop the instance's classification
        # The type only: the text may quote header values, which are patient data.
        logger.warning("SOP instance %s: reading its identifiers failed (%s)", _uid(dataset), type(exc).__name__)
        return {"error": f"{type(exc).__name__}: {exc}"}


def _uid(dataset: Any) -> str:
    try:
        return str(dataset.get("SOPInstanceUID") or "?")
    except Exception:
        return "?"


def _header_from_record(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """``StudyReport`` keyword arguments from what ``recorded_identifiers`` stored (JSON lists back to tuples)."""
    if "error" in recorded:
        raise ReportError(str(recorded["error"]))
    header = dict(recorded)
    header["patient_name"] = tuple(header.get("patient_name") or ("", "", "", "", ""))
    code = header.get("procedure_code")
    header["procedure_code"] = tuple(code) if code else None
    return header


def read_report(session: Session, study: db.Study, corrected: bool = False) -> StudyReport:
    """The report of an aggregated study: its results, and the identifiers recorded by the first of its instances
    that has them (``instances.identifiers``; its spool file is not read, it may be gone)."""
    recorded = session.scalars(
        select(db.Instance.identifiers)
        .where(db.Instance.study_id == study.id, db.Instance.identifiers.is_not(None))
        .order_by(db.Instance.id)
        .limit(1)
    ).first()
    if recorded is None:
        raise ReportError(f"no instance of study {study.study_instance_uid} has its identifiers recorded")
    header = _header_from_record(recorded)
    summary = study.summary or {}
    reason = study.priority_reason or ""
    if study.priority_rule == "failed":
        reason = "failed: processing failed (cxr-triage results has the error)"  # error texts stay out of the RIS
    return StudyReport(
        **{**header, "observed_at": header["observed_at"] or hl7_datetime(study.first_received_at)},
        label=summary.get("label"),
        probabilities=summary.get("max_probabilities"),
        priority=study.priority or "review",
        priority_rule=study.priority_rule or "",
        priority_reason=reason,
        model_version=study.priority_model_version or "",
        corrected=corrected,
    )


def sample_report() -> StudyReport:
    """A report with every field set, to check a configuration's codes against hl7apy's rules at start-up."""
    return StudyReport(
        study_instance_uid="1.2.3",
        patient_id="P",
        patient_name=("F", "G", "", "", ""),
        accession_number="A",
        observed_at="20260101120000",
        label=CLASS_NAMES[0],
        probabilities={name: 1.0 / len(CLASS_NAMES) for name in CLASS_NAMES},
        priority="urgent",
        model_version="m",
    )
