"""Triage SRs at the recorder's rate: highdicom builds one report per model, finding, priority and image class,
and each instance's report is that template filled in.

Building a report with highdicom costs about 60 ms of CPU (its content-item classes validate and copy the tree,
then collect the evidence from it) and encoding it about 20 ms more: more than the model's forward pass on a CPU.
Only a few parts of the report depend on the instance: the patient and study attributes, the equipment that
acquired the image, the evidence references, the three probabilities, and new UIDs and times. Everything else
(the observer context, the algorithm identification, the coded finding and priority, the document flags)
depends only on the model, the finding, the flag and the SR settings.

So :class:`TriageSRTemplate` builds the report once with :func:`cxr_triage.outputs.sr.build_triage_sr` for a placeholder
image with sentinel UIDs, and :meth:`TriageSRTemplate.fill` produces an instance's report from it:

* the header comes from highdicom as for any report: a :class:`highdicom.SOPClass` made with the arguments that
  highdicom's SR constructor passes, ``copy_patient_and_study_information`` from the image, and the contributing
  equipment (the image's acquisition equipment, then highdicom);
* the rest of the template's top-level attributes are parsed back from its encoding, with the sentinel UIDs
  replaced wherever they occur (evidence sequences, the image reference in the content tree, the tracking UID);
* each probability's measured value is a fresh :class:`highdicom.sr.NumContentItem`'s.

``tests/test_srtemplate.py`` checks that a filled report equals the report highdicom builds for the same image,
attribute for attribute, for images with different header contents. A report that supersedes an earlier one
(``previous_sr``) is rare (a re-run) and is built by highdicom in full (:class:`TriageSRBuilder`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cxr_triage import CLASS_NAMES, log_name
from cxr_triage.outputs import codes as cxr_codes
from cxr_triage.outputs import sr

logger = logging.getLogger(log_name(__name__))

MAX_TEMPLATES = 256
"""Templates one builder keeps (least recently used dropped): models x 3 findings x 2 priorities x image classes."""

_CONTENT_SEQUENCE = 0x0040A730
_TRACKING_UID = "112040"  # DCM "Tracking Unique Identifier"
_SENTINEL = "2.25.1"  # UIDs of the placeholder image and the template report: 2.25.1<n>, unique to the template
ElementPath = tuple[Any, ...]
"""Where an element is in a dataset: its top-level tag, then (item index, tag) pairs down the sequences."""
_PROBABILITY_CONCEPTS = {cxr_codes.PROBABILITY_CODES[name].value: name for name in CLASS_NAMES}


class TriageSRTemplate:
    """The triage report of one model, finding, priority and image SOP class, ready to be filled per instance.

    Parameters
    ----------
    sop_class_uid:
        SOP Class UID of the images the reports are about (the header's modules depend on it).
    label, flagged, model_version, model_sha256:
        As for :func:`cxr_triage.outputs.sr.build_triage_sr`; validated here.
    institution_name, manufacturer, series_description, series_number:
        The ``[sr]`` settings, as for :func:`cxr_triage.outputs.sr.build_triage_sr`.
    """

    def __init__(
        self,
        sop_class_uid: str,
        *,
        label: str,
        flagged: bool,
        model_version: str,
        model_sha256: str,
        institution_name: str = "",
        manufacturer: str = "cxr-triage project",
        series_description: str = "cxr-triage AI triage (research use only)",
        series_number: int = sr.DEFAULT_SERIES_NUMBER,
        heatmap: bool = False,
    ) -> None:
        # Over 60 lines by its fourteen parameters and the one report build they go into; the steps are in order.
        self.sop_class_uid = str(sop_class_uid)
        self.heatmap = heatmap
        self.label = label
        self.flagged = sr.validate_model(model_version, model_sha256, flagged)
        self.model_version = model_version
        self.model_sha256 = model_sha256
        self.manufacturer = manufacturer
        self.series_description = series_description
        self.series_number = series_number
        placeholder = sr.placeholder_evidence()
        placeholder.SOPClassUID = self.sop_class_uid
        uids = [f"{_SENTINEL}{n}" for n in range(7)]
        placeholder.StudyInstanceUID, placeholder.SeriesInstanceUID, placeholder.SOPInstanceUID = uids[:3]
        self._report_series, self._report_instance = uids[3:5]
        self._heatmap_series, self._heatmap_instance = uids[5:]
        self._placeholder = placeholder
        report = sr.build_triage_sr(
            placeholder,
            label=label,
            probabilities={name: 1.0 if name == label else 0.0 for name in CLASS_NAMES},
            model_version=model_version,
            model_sha256=model_sha256,
            flagged=self.flagged,
            series_instance_uid=self._report_series,
            sop_instance_uid=self._report_instance,
            institution_name=institution_name,
            manufacturer=manufacturer,
            series_description=series_description,
            series_number=series_number,
            template=True,
            heatmap=_heatmap_placeholder(placeholder.StudyInstanceUID, *uids[5:]) if heatmap else None,
        )
        self._tracking_uid = _tracking_uid(report)
        own = self._header(sr.validate_evidence(placeholder), self._report_series, self._report_instance)
        self._header_tags = frozenset(own.keys())
        self._encoded = sr.sr_to_bytes(report)
        parsed = pydicom.dcmread(io.BytesIO(self._encoded))
        sentinels = {*uids, self._tracking_uid}
        self._uid_paths: list[ElementPath] = []
        self._probability_paths: list[tuple[ElementPath, str]] = []
        for path in _paths(parsed):
            element = _at(parsed, path)
            if element.VR == "UI" and str(element.value) in sentinels and path[0] not in own:
                self._uid_paths.append(path)
            elif element.tag == _CONTENT_SEQUENCE:
                for index, item in enumerate(element.value):
                    if (name := _probability_of(item)) is not None:
                        self._probability_paths.append(((*path, index), name))

    def fill(
        self,
        evidence: Dataset,
        probabilities: Mapping[str, float],
        *,
        series_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
        heatmap: Dataset | None = None,
    ) -> Dataset:
        """The report on ``evidence`` (the classified image's header) with these ``probabilities``, referencing
        ``heatmap`` (the heatmap object) when the template was made for one.

        Raises ``ValueError`` as :func:`cxr_triage.outputs.sr.build_triage_sr` does, and when ``evidence`` is of another
        SOP class than the template's, or ``heatmap`` is given to a template without one or the reverse.
        """
        self._check_heatmap(heatmap, evidence)
        values = sr.validate_probabilities(self.label, probabilities)
        header = sr.validate_evidence(evidence)
        if str(header.SOPClassUID) != self.sop_class_uid:
            raise ValueError(f"evidence of SOP class {header.SOPClassUID} given to a template of {self.sop_class_uid}")
        series_instance_uid = series_instance_uid or generate_uid()
        sop_instance_uid = sop_instance_uid or generate_uid()
        if series_instance_uid == header.SeriesInstanceUID or sop_instance_uid == header.SOPInstanceUID:
            raise ValueError("the report must not reuse the series or instance UID of the evidence")
        header_part = self._header(header, series_instance_uid, sop_instance_uid)
        # The template parsed from its encoding: what is not touched below stays raw and is written as it is.
        report = pydicom.dcmread(io.BytesIO(self._encoded))
        for tag in self._header_tags.difference(header_part.keys()):
            del report[tag]
        report.file_meta = header_part.file_meta
        for element in header_part:
            report[element.tag] = element
        replacements = {
            self._placeholder.StudyInstanceUID: header.StudyInstanceUID,
            self._placeholder.SeriesInstanceUID: header.SeriesInstanceUID,
            self._placeholder.SOPInstanceUID: header.SOPInstanceUID,
            self._report_series: series_instance_uid,
            self._report_instance: sop_instance_uid,
            self._tracking_uid: generate_uid(),
        }
        if heatmap is not None:
            replacements[self._heatmap_series] = str(heatmap.SeriesInstanceUID)
            replacements[self._heatmap_instance] = str(heatmap.SOPInstanceUID)
        for path in self._uid_paths:
            element = _at(report, path)
            element.value = replacements[str(element.value)]
        for path, name in self._probability_paths:
            _at(report, path).MeasuredValueSequence = _measured_value(name, values[name])
        for keyword in ("PatientName", "ReferringPhysicianName"):  # see cxr_triage.outputs.sr: blanked for highdicom
            setattr(report, keyword, copy.deepcopy(evidence.get(keyword)))
        logger.info(
            "built triage SR %s for instance %s (label %s, flagged %s, model %s)",
            sop_instance_uid,
            evidence.SOPInstanceUID,
            self.label,
            self.flagged,
            self.model_version,
        )
        return report

    def _check_heatmap(self, heatmap: Dataset | None, evidence: Dataset) -> None:
        if (heatmap is not None) != self.heatmap:
            raise ValueError("a heatmap object must be given exactly when the template references one")
        if heatmap is not None and heatmap.StudyInstanceUID != evidence.StudyInstanceUID:
            raise ValueError("the heatmap object belongs to another study than the image")

    def _header(self, header: Dataset, series_instance_uid: str, sop_instance_uid: str) -> hd.SOPClass:
        """The modules highdicom's SR constructor fills from the evidence, made the way it makes them."""
        names = {keyword: header.get(keyword) for keyword in ("PatientName", "ReferringPhysicianName")}
        for keyword in names:
            setattr(header, keyword, None)
        report = hd.SOPClass(
            study_instance_uid=header.StudyInstanceUID,
            series_instance_uid=series_instance_uid,
            series_number=self.series_number,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=ComprehensiveSRStorage,
            instance_number=1,
            manufacturer=self.manufacturer,
            modality="SR",
            transfer_syntax_uid=ExplicitVRLittleEndian,
            patient_id=header.PatientID,
            patient_name=header.PatientName,
            patient_birth_date=header.PatientBirthDate,
            patient_sex=header.PatientSex,
            accession_number=header.AccessionNumber,
            study_id=header.StudyID,
            study_date=header.StudyDate,
            study_time=header.StudyTime,
            referring_physician_name=header.get("ReferringPhysicianName"),
            specific_character_set=header.get("SpecificCharacterSet"),
            series_description=self.series_description,
        )
        report.copy_patient_and_study_information(header)
        equipment = [hd.ContributingEquipment.for_highdicom()]
        with contextlib.suppress(Exception):  # highdicom leaves the acquisition equipment out in the same cases
            equipment.insert(0, hd.ContributingEquipment.for_image_acquisition(header))
        report.ContributingEquipmentSequence = equipment
        for keyword, value in names.items():
            if value is not None:
                setattr(header, keyword, value)
        return report


class TriageSRBuilder:
    """Builds the recorder's reports: from a template per model, finding, priority and image class, or by
    highdicom in full for a report that supersedes an earlier one. Not thread-safe (one per recorder)."""

    def __init__(
        self,
        *,
        institution_name: str = "",
        manufacturer: str = "cxr-triage project",
        series_description: str = "cxr-triage AI triage (research use only)",
        series_number: int = sr.DEFAULT_SERIES_NUMBER,
        max_templates: int = MAX_TEMPLATES,
    ) -> None:
        if max_templates < 1:
            raise ValueError("max_templates must be at least 1")
        self.settings: dict[str, Any] = {
            "institution_name": institution_name,
            "manufacturer": manufacturer,
            "series_description": series_description,
            "series_number": series_number,
        }
        self.max_templates = max_templates
        self._templates: OrderedDict[tuple[str, str, bool, str, str, bool], TriageSRTemplate] = OrderedDict()

    def template(
        self,
        sop_class_uid: str,
        label: str,
        flagged: bool,
        model_version: str,
        model_sha256: str,
        heatmap: bool = False,
    ) -> TriageSRTemplate:
        """The template for these (``heatmap``: one that references a heatmap object), built on first use."""
        key = (str(sop_class_uid), label, bool(flagged), model_version, model_sha256, bool(heatmap))
        found = self._templates.get(key)
        if found is None:
            found = TriageSRTemplate(
                key[0], label=label, flagged=flagged, model_version=model_version, model_sha256=model_sha256,
                heatmap=key[5], **self.settings,
            )  # fmt: skip
            self._templates[key] = found
            while len(self._templates) > self.max_templates:
                self._templates.popitem(last=False)
        else:
            self._templates.move_to_end(key)
        return found

    def build(
        self,
        evidence: Dataset,
        *,
        label: str,
        probabilities: Mapping[str, float],
        model_version: str,
        model_sha256: str,
        flagged: bool,
        previous_sr: Dataset | None = None,
        series_instance_uid: str | None = None,
        heatmap: Dataset | None = None,
    ) -> Dataset:
        """The report :func:`cxr_triage.outputs.sr.build_triage_sr` would build with the builder's settings."""
        if previous_sr is not None or not evidence.get("SOPClassUID"):
            return sr.build_triage_sr(
                evidence,
                label=label,
                probabilities=probabilities,
                model_version=model_version,
                model_sha256=model_sha256,
                flagged=flagged,
                previous_sr=previous_sr,
                series_instance_uid=series_instance_uid,
                heatmap=heatmap,
                **self.settings,
            )
        sr.validate_probabilities(label, probabilities)  # the label is part of the key: check it first
        template = self.template(
            evidence.SOPClassUID, label, flagged, model_version, model_sha256, heatmap=heatmap is not None
        )
        return template.fill(evidence, probabilities, series_instance_uid=series_instance_uid, heatmap=heatmap)


def _heatmap_placeholder(study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str) -> Dataset:
    """The reference a template makes to a heatmap object: a Secondary Capture with sentinel UIDs."""
    found = Dataset()
    found.SOPClassUID = SecondaryCaptureImageStorage
    found.StudyInstanceUID = study_instance_uid
    found.SeriesInstanceUID, found.SOPInstanceUID = series_instance_uid, sop_instance_uid
    return found


def _content_items(dataset: Dataset) -> Iterator[Dataset]:
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def _tracking_uid(report: Dataset) -> str:
    for item in _content_items(report):
        names = item.get("ConceptNameCodeSequence") or []
        if names and names[0].CodeValue == _TRACKING_UID and item.get("ValueType") == "UIDREF":
            return str(item.UID)
    raise ValueError("the report has no tracking UID")


def _probability_of(item: Dataset) -> str | None:
    if item.get("ValueType") != "NUM":
        return None
    names = item.get("ConceptNameCodeSequence") or []
    return _PROBABILITY_CONCEPTS.get(names[0].CodeValue) if names else None


def _measured_value(name: str, probability: float) -> Any:
    item = hd.sr.NumContentItem(
        name=cxr_codes.PROBABILITY_CODES[name],
        value=sr.probability_percent(probability),
        unit=cxr_codes.PERCENT,
    )
    return item.MeasuredValueSequence


def _paths(dataset: Dataset, prefix: ElementPath = ()) -> Iterator[ElementPath]:
    """Every element's path, depth first."""
    for element in dataset:
        path = (*prefix, element.tag)
        yield path
        if element.VR == "SQ":
            for index, item in enumerate(element.value):
                yield from _paths(item, (*path, index))


def _at(dataset: Dataset, path: ElementPath) -> Any:
    """The element at ``path`` (or the sequence item, for a path that ends with an item index)."""
    node: Any = dataset
    for step in path:
        node = node[step] if isinstance(node, Dataset) else node.value[step]
    return node
