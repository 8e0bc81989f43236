"""What a finished study's FHIR R4 result says: a transaction ``Bundle`` of conditional updates, built with the
``fhir.resources`` models (R4B, whose DiagnosticReport, Observation, Device and Bundle are R4's; docs/FHIR.md) from
the same ``StudyReport`` the HL7 ORU^R01 is built from (``cxr_triage.outputs.hl7report``), with the SR's codes
(``cxr_triage.outputs.codes``), so that the SR, HL7 and FHIR say the same thing in the same codes.

The Bundle holds, each as ``PUT <Type>?identifier=<system>|<value>`` (a conditional update: created the first time,
updated by every later aggregation of the study, never duplicated):

- a ``Device`` naming the model version (identifier: the version), when a model classified the study;
- one ``Observation`` per class probability (UCUM ``%``) and one for the finding (the study's worst label in SNOMED
  CT, its interpretation and the worklist priority as a component), each ``preliminary``, pointing at the Device;
- the ``DiagnosticReport`` (``preliminary``; identifiers: ours and the accession number; the imaging study by its
  Study Instance UID; a conclusion in words and the coded conclusion in SNOMED CT; ``result``: the Observations).

The resources refer to each other by their entries' ``urn:uuid:`` full URLs, derived from their identifiers (so
one study's Bundle is the same whenever it is built), which the server replaces by its own ids. Pure functions:
nothing here changes state.
"""

from __future__ import annotations

import datetime as dt
import re
import urllib.parse
import uuid
from typing import TYPE_CHECKING, Any

from cxr_triage import CLASS_NAMES
from cxr_triage.outputs.codes import (
    CHEST_XRAY,
    FINDING,
    FINDING_CODES,
    HIGH_PRIORITY,
    NORMAL_PRIORITY,
    PERCENT,
    PRIORITY,
    PRIVATE_SCHEME_DESIGNATOR,
    PROBABILITY_CODES,
)
from cxr_triage.outputs.hl7report import StudyReport

if TYPE_CHECKING:
    from pydicom.sr.coding import Code

    from cxr_triage.core.fhirsettings import FHIRSettings

SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    PRIVATE_SCHEME_DESIGNATOR: "urn:cxr-triage:codes:99CXRT",
}
"""The FHIR code system (a URI) of each DICOM coding scheme designator the SR uses (the private ``99CXRT`` as a
URN of the project's)."""
DICOM_UID_SYSTEM = "urn:dicom:uid"
"""The identifier system of a DICOM UID (FHIR ImagingStudy), whose value is ``urn:oid:<UID>``."""
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
MANUFACTURER = "cxr-triage project"
RESEARCH_NOTE = "cxr-triage AI triage suggestion, research use only, not a diagnosis"
HIGH_PRIORITIES = ("urgent", "priority")
"""The worklist priorities shown as the SR's "High priority" (the others are "Normal priority")."""


def coding(code: Code) -> dict[str, str]:
    """A DICOM/SR code as a FHIR Coding."""
    return {"system": SYSTEMS[code.scheme_designator], "code": code.value, "display": code.meaning}


def concept(code: Code) -> dict[str, Any]:
    """A DICOM/SR code as a FHIR CodeableConcept (its meaning as the text)."""
    return {"coding": [coding(code)], "text": code.meaning}


def _identifier(system: str, value: str) -> dict[str, str]:
    return {"system": system, "value": value}


def _full_url(resource_type: str, system: str, value: str) -> str:
    return "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"{resource_type}?identifier={system}|{value}"))


def conditional_url(resource_type: str, system: str, value: str) -> str:
    """``<Type>?identifier=<system>|<value>``, URL-encoded: the conditional update of the resource so identified."""
    return f"{resource_type}?identifier=" + urllib.parse.quote(f"{system}|{value}", safe=":/")


def fhir_date_time(observed_at: str) -> str:
    """The exam's HL7 DTM as a FHIR dateTime: with the time where its offset is known (``+0000``: the arrival),
    else the date alone (DICOM's Study Time is local, without an offset, and FHIR wants one with a time)."""
    match = re.fullmatch(r"(\d{4})(\d{2})(\d{2})(?:(\d{2})(\d{2})(\d{2}))?(\+0000)?", observed_at)
    if not match:
        raise ValueError(f"the study's date {observed_at!r} is not a date")
    year, month, day, hour, minute, second, utc = match.groups()
    if hour and utc:
        return f"{year}-{month}-{day}T{hour}:{minute}:{second}Z"
    return f"{year}-{month}-{day}"


def identifier_values(study_uid: str) -> dict[str, str]:
    """The identifier value of each resource of a study (under ``[fhir] identifier_system``): the report is the
    Study Instance UID, each Observation that UID and its class (or ``finding``)."""
    return {"report": study_uid, "finding": f"{study_uid}-finding"} | {
        name: f"{study_uid}-probability-{name}" for name in CLASS_NAMES
    }


def _subject(report: StudyReport, settings: FHIRSettings) -> dict[str, Any]:
    """The patient, by a logical reference (the DICOM Patient ID; its issuer as the assigner)."""
    identifier: dict[str, Any] = {"value": report.patient_id}
    if settings.patient_identifier_system:
        identifier["system"] = settings.patient_identifier_system
    if report.issuer_of_patient_id:
        identifier["assigner"] = {"display": report.issuer_of_patient_id}
    return {"type": "Patient", "identifier": identifier}


def _device(report: StudyReport, system: str) -> Any:
    from fhir.resources.R4B.device import Device

    from cxr_triage.outputs.sr import ALGORITHM_NAME, RESEARCH_USE_NOTICE  # here: highdicom is slow to import

    return Device(
        identifier=[_identifier(system, report.model_version)],
        status="active",
        manufacturer=MANUFACTURER,
        deviceName=[
            {"name": ALGORITHM_NAME, "type": "user-friendly-name"},
            {"name": report.model_version, "type": "model-name"},
        ],
        version=[{"value": report.model_version}],
        note=[{"text": RESEARCH_USE_NOTICE}],
    )


def _observation(common: dict[str, Any], identifier: dict[str, str], **values: Any) -> Any:
    from fhir.resources.R4B.observation import Observation

    return Observation(
        identifier=[identifier],
        status="preliminary",
        category=[{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}],
        **common,
        **values,
    )


def _probability_values(name: str, probability: float) -> dict[str, Any]:
    """A probability Observation's code and value: the SR's concept of the class, the probability in % (UCUM)."""
    quantity = {
        "value": round(100 * float(probability), 2),
        "unit": "%",
        "system": SYSTEMS["UCUM"],
        "code": PERCENT.value,
    }
    return {"code": concept(PROBABILITY_CODES[name]), "valueQuantity": quantity}


def _finding_values(report: StudyReport) -> dict[str, Any]:
    """The finding Observation's value: the worst label in SNOMED CT, normal or abnormal, and the priority."""
    high = report.priority in HIGH_PRIORITIES
    priority = {"code": concept(PRIORITY), "valueCodeableConcept": concept(HIGH_PRIORITY if high else NORMAL_PRIORITY)}
    reason = f" ({report.priority_reason})" if report.priority_reason else ""
    values: dict[str, Any] = {
        "code": concept(FINDING),
        "component": [priority],
        "note": [{"text": f"{RESEARCH_NOTE}: priority {report.priority}{reason}"}],
    }
    if report.label is None:
        values["dataAbsentReason"] = {"coding": [{"system": DATA_ABSENT, "code": "not-performed"}]}
        return values
    values["valueCodeableConcept"] = concept(FINDING_CODES[report.label])
    abnormal = report.label != "normal"
    values["interpretation"] = [
        {"coding": [{"system": INTERPRETATION, "code": "A" if abnormal else "N"}], "text": report.priority}
    ]
    return values


def conclusion(report: StudyReport) -> str:
    """The report's conclusion in words: the finding with its probability, the priority and why."""
    reason = f" ({report.priority_reason})" if report.priority_reason else ""
    if report.label is None:
        return f"{RESEARCH_NOTE}: no image of this study was classified; priority {report.priority}{reason}."
    probability = (report.probabilities or {}).get(report.label)
    said = f" (probability {100 * float(probability):.1f} %)" if probability is not None else ""
    meaning = FINDING_CODES[report.label].meaning
    return f"{RESEARCH_NOTE}: {meaning}{said}; priority {report.priority}{reason}."


def _accession(report: StudyReport) -> dict[str, Any]:
    """The accession number as an Identifier of type ``ACSN`` (HL7 table 0203)."""
    kind = {"coding": [{"system": V2_0203, "code": "ACSN", "display": "Accession ID"}]}
    return {"type": kind, "value": report.accession_number}


def build_bundle(report: StudyReport, settings: FHIRSettings, issued: dt.datetime) -> Any:
    """The transaction Bundle of ``report`` (a ``fhir.resources`` model, validated as it is built). A value FHIR
    cannot carry raises ValueError (pydantic's ValidationError is one)."""
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    system = settings.identifier_system
    ids = identifier_values(report.study_instance_uid)
    study = {
        "type": "ImagingStudy",
        "identifier": _identifier(DICOM_UID_SYSTEM, f"urn:oid:{report.study_instance_uid}"),
        "display": f"DICOM study {report.study_instance_uid}",
    }
    common: dict[str, Any] = {
        "subject": _subject(report, settings),
        "effectiveDateTime": fhir_date_time(report.observed_at),
        "issued": issued.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "derivedFrom": [study],
    }
    entries: list[tuple[str, str, Any]] = []
    if report.model_version:
        entries.append(("Device", report.model_version, _device(report, system)))
        common["device"] = {"reference": _full_url("Device", system, report.model_version)}
    for name in CLASS_NAMES if report.probabilities else ():
        values = _probability_values(name, report.probabilities[name])  # type: ignore[index]
        entries.append(("Observation", ids[name], _observation(common, _identifier(system, ids[name]), **values)))
    finding = _observation(common, _identifier(system, ids["finding"]), **_finding_values(report))
    entries.append(("Observation", ids["finding"], finding))
    results = [{"reference": _full_url(kind, system, value)} for kind, value, _ in entries if kind == "Observation"]
    diagnostic = DiagnosticReport(
        identifier=[{**_identifier(system, ids["report"]), "use": "official"}]
        + ([_accession(report)] if report.accession_number else []),
        basedOn=[{"type": "ServiceRequest", "identifier": _accession(report)}] if report.accession_number else None,
        status="preliminary",
        category=[{"coding": [{"system": V2_0074, "code": "RAD", "display": "Radiology"}]}],
        code=concept(CHEST_XRAY),
        subject=common["subject"],
        effectiveDateTime=common["effectiveDateTime"],
        issued=common["issued"],
        imagingStudy=[study],
        result=results,
        conclusion=conclusion(report),
        conclusionCode=[concept(FINDING_CODES[report.label])] if report.label else None,
    )
    entries.append(("DiagnosticReport", ids["report"], diagnostic))
    return Bundle(
        type="transaction",
        entry=[
            {
                "fullUrl": _full_url(kind, system, value),
                "resource": resource,
                "request": {"method": "PUT", "url": conditional_url(kind, system, value)},
            }
            for kind, value, resource in entries
        ],
    )


def bundle_json(report: StudyReport, settings: FHIRSettings, issued: dt.datetime) -> str:
    """``build_bundle`` serialised by ``fhir.resources`` (JSON, empty elements left out)."""
    return str(build_bundle(report, settings, issued).model_dump_json(exclude_none=True))
