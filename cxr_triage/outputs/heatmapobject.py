"""The heatmap filed in the PACS (issue 31, point 2): a Secondary Capture of the radiograph with the Grad-CAM map
blended in and "NOT FOR DIAGNOSIS - AI heatmap, model <version>" burned into the pixels, built with highdicom's
``sc`` module (docs/SR.md says why a Secondary Capture and not a Parametric Map).

:class:`HeatmapSecondaryCapture` builds one object from the classified image's header (the SR's evidence), the
decoded radiograph at its own rows and columns (``PreparedImage.display``, uint8) and the worker's coarse map
(``GradCAMHeatmap.coarse``, stretched back over the radiograph's geometry, which undoes the squash to 224x224). The
object is in the radiograph's study, in a series of its own (one per study and model version, as the SRs), with
new UIDs from ``pydicom.uid.generate_uid``; Burned In Annotation is YES and the Source Image Sequence names the
radiograph. The triage SR references it (``cxr_triage.outputs.sr``), the recorder writes it durably beside the SR
(``cxr_triage.outputs.srfiles``, same pending-then-rename protocol) and it goes to the PACS in the same association
as its SR (``cxr_triage.outputs.forward``). Nothing here changes state: it builds datasets.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cxr_triage import log_name
from cxr_triage.outputs import sr

logger = logging.getLogger(log_name(__name__))

DEFAULT_SERIES_NUMBER = 991
"""Series Number of the heatmap series: after the SR series (990)."""
NOTICE = "NOT FOR DIAGNOSIS - AI heatmap, model {version}"
"""Burned into every heatmap's pixels (ASCII: the fallback font has no dash beyond it)."""
_PERSON_NAMES = ("PatientName", "ReferringPhysicianName")


def colourise(values: np.ndarray) -> np.ndarray:
    """A map in [0, 1] as float32 colours (one more axis of 3), blue (low) to red (high)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)  # red, green, blue
    return np.clip(1.5 - np.abs(4.0 * (v - centres)), 0.0, 1.0).astype(np.float32)


def blend_table(opacity: float) -> np.ndarray:
    """(256 * 256, 3) uint8: the colour of grey level g under map level m at row ``g * 256 + m``. The grey is
    weighted by 1 - opacity * m / 255 and the map's colour by opacity * m / 255 (where the map is 0 the radiograph
    shows unchanged). A table lookup per pixel instead of float arithmetic over millions of pixels."""
    grey = np.arange(256, dtype=np.float32)[:, None, None] / 255.0
    level = np.arange(256, dtype=np.float32) / 255.0
    weight = (opacity * level)[None, :, None]
    mixed = grey * (1.0 - weight) + colourise(level)[None, :, :] * weight
    return np.rint(mixed * 255.0).astype(np.uint8).reshape(256 * 256, 3)


def map_levels(coarse: Any, rows: int, columns: int) -> np.ndarray:
    """The coarse map scaled to [0, 1] by its maximum, resized bilinearly to ``rows`` x ``columns`` (which undoes
    the squash to 224x224: each cell covers the same share of the radiograph as of the model's input), as uint8
    levels 0-255. Pillow's bilinear resize, the same interpolation as ``ml.heatmap.upsample`` at a fraction of its
    cost on a full-size radiograph."""
    from PIL import Image

    values = np.clip(np.asarray(coarse, dtype=np.float32), 0.0, None)
    peak = float(values.max()) if values.size else 0.0
    values = values * (255.0 / peak) if peak > 0 else np.zeros_like(values)
    resized = Image.fromarray(values, mode="F").resize((columns, rows), Image.Resampling.BILINEAR)
    return np.asarray(resized.convert("L"))


def blend(display: np.ndarray, levels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The grey radiograph (uint8) with the map's levels (uint8, same shape) blended by ``table``
    (``blend_table``): (rows, columns, 3) uint8."""
    index = display.astype(np.intp) * 256 + levels
    return np.take(table, index, axis=0)


def burn_notice(rgb: np.ndarray, text: str) -> np.ndarray:
    """``text`` in white on a black band across the top of the image, sized to its width (a new array)."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(rgb)
    size = max(12, min(image.width // 45, image.height // 12))
    try:
        font: Any = ImageFont.load_default(size=size)
    except (OSError, TypeError, ValueError):  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    margin = max(2, size // 3)
    draw.rectangle((0, 0, image.width, bottom - top + 2 * margin), fill=(0, 0, 0))
    draw.text((margin - left, margin - top), text, fill=(255, 255, 255), font=font)
    return np.asarray(image)


class HeatmapSecondaryCapture:
    """Builds the heatmap Secondary Capture of classified images (module docstring)."""

    def __init__(
        self,
        *,
        manufacturer: str = "cxr-triage project",
        series_description: str = "cxr-triage AI heatmap NOT FOR DIAGNOSIS",
        opacity: float = 0.4,
        series_number: int = DEFAULT_SERIES_NUMBER,
    ) -> None:
        if not 0.0 < opacity <= 1.0:
            raise ValueError(f"opacity {opacity} must be in (0, 1]")
        self.manufacturer = manufacturer
        self.series_description = series_description
        self.opacity = opacity
        self.series_number = series_number
        self._table = blend_table(opacity)

    def pixels(self, display: np.ndarray, coarse: Any, model_version: str) -> np.ndarray:
        """The object's RGB pixels: ``coarse`` stretched over ``display``'s rows and columns, blended, the notice
        burned in."""
        if display.ndim != 2 or display.dtype != np.uint8:
            raise ValueError(f"expected a (rows, columns) uint8 radiograph, got {display.dtype} {display.shape}")
        levels = map_levels(coarse, *display.shape)
        return burn_notice(blend(display, levels, self._table), NOTICE.format(version=model_version))

    def build(
        self,
        evidence: Dataset,
        display: np.ndarray,
        coarse: Any,
        *,
        model_version: str,
        series_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> hd.sc.SCImage:
        """The Secondary Capture of ``evidence``'s radiograph (``display``, its decoded pixels) with ``coarse``,
        the map of the predicted class, blended in. ValueError: evidence without the UIDs, a model version that is
        empty, pixels that are not the evidence's rows and columns."""
        if not model_version:
            raise ValueError("model_version must not be empty")
        header = sr.validate_evidence(evidence)  # a copy, with the values highdicom refuses repaired or emptied
        rows, columns = int(header.get("Rows") or 0), int(header.get("Columns") or 0)
        if (rows, columns) != tuple(display.shape):
            raise ValueError(f"pixels {display.shape} are not the image's {rows}x{columns}")
        for keyword in _PERSON_NAMES:  # highdicom warns about (and quotes) one-component names: set after
            setattr(header, keyword, None)
        orientation = header.get("PatientOrientation")
        image = hd.sc.SCImage(
            pixel_array=self.pixels(display, coarse, model_version),
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            study_instance_uid=header.StudyInstanceUID,
            series_instance_uid=series_instance_uid or generate_uid(),
            series_number=self.series_number,
            sop_instance_uid=sop_instance_uid or generate_uid(),
            instance_number=1,
            manufacturer=self.manufacturer,
            patient_id=header.PatientID,
            patient_birth_date=header.PatientBirthDate,
            patient_sex=header.PatientSex,
            accession_number=header.AccessionNumber,
            study_id=header.StudyID,
            study_date=header.StudyDate,
            study_time=header.StudyTime,
            patient_orientation=("L", "F"),  # replaced below by the radiograph's own (highdicom takes no empty one)
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=self.series_description,
        )
        image.copy_patient_and_study_information(header)
        # The pixels are the radiograph's, so is their orientation: copied as it is, or empty (type 2) when unknown.
        image.PatientOrientation = copy.deepcopy(orientation) if orientation else None
        self._describe(image, evidence, model_version)
        if image.SeriesInstanceUID == evidence.SeriesInstanceUID or image.SOPInstanceUID == evidence.SOPInstanceUID:
            raise ValueError("the heatmap must not reuse the series or instance UID of the evidence")
        logger.debug("built heatmap %s for instance %s", image.SOPInstanceUID, evidence.SOPInstanceUID)
        return image

    def _describe(self, image: hd.sc.SCImage, evidence: Dataset, model_version: str) -> None:
        """What a viewer and a reader need: burned-in text, the source image, the derivation, the names."""
        for keyword in _PERSON_NAMES:
            setattr(image, keyword, copy.deepcopy(evidence.get(keyword)))
        image.BurnedInAnnotation = "YES"
        # Laterality (type 2C) is for paired body parts: absent for the chest the image names, else empty
        if evidence.get("BodyPartExamined"):
            image.BodyPartExamined = evidence.BodyPartExamined
        side = evidence.get("ImageLaterality")
        if side in ("L", "R"):
            image.Laterality = side
        elif not evidence.get("BodyPartExamined"):
            image.Laterality = None
        elif "Laterality" in image:
            del image.Laterality
        image.RecognizableVisualFeatures = "YES"  # it is the radiograph
        image.ImageType = ["DERIVED", "SECONDARY"]
        image.DerivationDescription = (
            f"Grad-CAM of the predicted class, model {model_version}, blended; research use only, not for diagnosis"
        )[:1024]
        source = Dataset()
        source.ReferencedSOPClassUID = evidence.SOPClassUID
        source.ReferencedSOPInstanceUID = evidence.SOPInstanceUID
        image.SourceImageSequence = [source]
        image.ImageComments = NOTICE.format(version=model_version)[:10240]
        if image.SOPClassUID != SecondaryCaptureImageStorage:
            raise ValueError(f"unexpected SOP class {image.SOPClassUID}")
