"""Coded concepts used in the cxr-triage Structured Report.

Standard codes (DCM, SCT, UCUM) are used wherever one fits; the per-class probabilities have no standard concept,
so they use the private coding scheme ``99CXRT`` declared in :data:`PRIVATE_CODING_SCHEME` (DICOM PS3.3 C.12.1.1.2.1:
private schemes begin with "99" and are identified in the Coding Scheme Identification Sequence). Where each code was
checked is written down in docs/SR.md.
"""

from __future__ import annotations

import logging
from types import MappingProxyType

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from cxr_triage import log_name

logger = logging.getLogger(log_name(__name__))

PRIVATE_SCHEME_DESIGNATOR = "99CXRT"
"""Coding Scheme Designator of the project's private codes."""

PRIVATE_SCHEME_NAME = "cxr-triage private codes"
PRIVATE_SCHEME_RESPONSIBLE_ORGANIZATION = "cxr-triage project (research use only)"

# Classifier output -> coded finding (value of the measurement group's "Finding", TID 1501 row 3b).
FINDING_CODES: MappingProxyType[str, Code] = MappingProxyType(
    {
        "covid": Code("840539006", "SCT", "COVID-19"),
        "normal": Code("17621005", "SCT", "Normal"),
        "pneumonia": Code("233604007", "SCT", "Pneumonia"),
    }
)
"""SNOMED CT concept for each class name in :data:`cxr_triage.CLASS_NAMES`."""

# Classifier output -> concept name of its probability measurement (private scheme).
PROBABILITY_CODES: MappingProxyType[str, Code] = MappingProxyType(
    {
        "covid": Code("CXRT-P-COVID", PRIVATE_SCHEME_DESIGNATOR, "Probability of COVID-19"),
        "normal": Code("CXRT-P-NORMAL", PRIVATE_SCHEME_DESIGNATOR, "Probability of normal"),
        "pneumonia": Code("CXRT-P-PNEUMONIA", PRIVATE_SCHEME_DESIGNATOR, "Probability of pneumonia"),
    }
)
"""Concept name of the probability measurement for each class name (UCUM "%", 0-100)."""

FINDING = Code("121071", "DCM", "Finding")
"""Concept name of the item that carries the predicted class: TID 1501 row 3b, the measurement group's Finding.

highdicom writes it for ``MeasurementsAndQualitativeEvaluations(finding_type=...)`` and reads it back as
``finding_type``; the value is one of :data:`FINDING_CODES`.
"""

PRIORITY = Code("260870009", "SCT", "Priority")
"""Concept name of the worklist-flag qualitative evaluation (TID 1501, CONTAINS CODE qualitative evaluation)."""

HIGH_PRIORITY = Code("394849002", "SCT", "High priority")
"""Value of :data:`PRIORITY` when the study was flagged for the worklist."""

NORMAL_PRIORITY = Code("394848005", "SCT", "Normal priority")
"""Value of :data:`PRIORITY` when the study was not flagged."""

PERCENT = Code("%", "UCUM", "Percent")
"""Unit of the probability measurements."""

PROCEDURE_REPORTED = Code("363679005", "SCT", "Imaging procedure")
"""Procedure reported (TID 1500 row 4, DCID 100 "Quantitative Diagnostic Imaging Procedures").

The member of CID 100 that is true of a chest radiograph both in the current standard and in the release Debian's
Pixelmed validates against; docs/SR.md says why not a more specific code.
"""


CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
"""What the FHIR DiagnosticReport reports on (its ``code``); also ``[hl7] procedure_code``'s default."""


def private_coding_scheme_identification() -> Dataset:
    """Return the Coding Scheme Identification Sequence item that declares the private ``99CXRT`` scheme."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME_DESIGNATOR
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = PRIVATE_SCHEME_RESPONSIBLE_ORGANIZATION
    return item
