"""Synthetic chest radiographs for the tests and benchmarks: no patient data, known right answers.

- ``phantom(rows, cols)``: a smooth frontal chest as displayed (dark lungs, bright mediastinum, spine, ribs and
  diaphragm), float in [0, 1] on 8-bit levels, so that every encoding can represent it exactly;
- ``new_dataset(stored, ...)``: a complete single-frame CR (or other) dataset around an array of stored values;
- ``chest_dataset(rows, cols, seed, **attributes)``: a small frontal chest CR, 12 bits stored, in memory;
- ``chest_file(path, ...)``: a CR, DX (for presentation or processing) or Secondary Capture file of any size;
- ``rescaled_dx(size)``: a 16-bit DX for presentation with rescale slope/intercept and a window (the
  preprocessing benchmark's input).

Patient attributes are made up (``Test^Phantom``), so a test can check that logs never show them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def phantom(rows: int = 192, cols: int = 160) -> np.ndarray:
    """A smooth frontal chest phantom as displayed (MONOCHROME2 sense), float64 in [0, 1] on 8-bit levels.

    Lungs are dark ellipses, the mediastinum and spine a bright central column, ribs faint bright arcs, the
    diaphragm bright at the bottom. Smooth on the scale of a few pixels so that resizing behaves like it does
    on radiographs.
    """
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    u, v = (x + 0.5) / cols, (y + 0.5) / rows
    img = 0.55 + 0.1 * v
    for cx in (0.3, 0.7):
        lung = ((u - cx) / 0.17) ** 2 + ((v - 0.45) / 0.3) ** 2
        img -= 0.35 * np.clip(1.0 - lung, 0.0, 1.0) ** 0.5
    img += 0.3 * np.exp(-(((u - 0.5) / 0.07) ** 2))
    img += 0.06 * np.clip(np.sin(v * 40.0 + 6.0 * np.abs(u - 0.5)), 0.0, 1.0) ** 3
    img += 0.25 * np.clip((v - 0.78) / 0.22, 0.0, 1.0)
    img = np.clip(img, 0.0, 1.0)
    return np.round(img * 255.0) / 255.0


def _container(stored: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """``stored`` in the (un)signed container of its itemsize, checked to fit ``bits_stored``."""
    container = stored.astype(f"{'i' if signed else 'u'}{stored.dtype.itemsize}")
    low, high = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2**bits_stored - 1)
    if container.min() < low or container.max() > high:
        raise ValueError(f"stored values {container.min()}..{container.max()} do not fit {bits_stored} bits")
    return container


def new_dataset(
    stored: np.ndarray,
    *,
    bits_stored: int | None = None,
    photometric: str = "MONOCHROME2",
    signed: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **attributes: Any,
) -> Dataset:
    """A single-frame frontal chest CR dataset holding ``stored`` (2-D integer array) as native pixel data.

    ``bits_stored`` defaults to 8 for uint8/int8 arrays, else 16; BitsAllocated follows the array's itemsize.
    Keyword ``attributes`` are set on the dataset afterwards (``None`` deletes the attribute), so a test can
    turn the image into a lateral view, a hand, a CT or a DX for processing with one argument.
    """
    stored = np.asarray(stored)
    if stored.ndim != 2 or stored.dtype.kind not in "iu":
        raise ValueError(f"expected a 2-D integer array, got {stored.dtype} {stored.shape}")
    bits_allocated = 8 * stored.dtype.itemsize
    if bits_allocated not in (8, 16):
        raise ValueError("stored values must be 8- or 16-bit")
    bits_stored = bits_stored or bits_allocated
    container = _container(stored, bits_stored, signed)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "TEST0001"
    ds.PatientName = "Test^Phantom"
    ds.StudyDate = "20260101"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = np.ascontiguousarray(container, dtype=container.dtype.newbyteorder("<")).tobytes()
    for keyword, value in attributes.items():
        if value is None:
            if keyword in ds:
                del ds[keyword]
        else:
            setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", CR_IMAGE_STORAGE)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def chest_dataset(rows: int = 64, cols: int = 64, seed: int = 0, **attributes: Any) -> Dataset:
    """A small frontal chest CR (12 bits stored, explicit VR LE); ``attributes`` override (None deletes)."""
    display = phantom(rows, cols)
    rng = np.random.default_rng(seed)
    stored = np.clip(np.round(display * 4095) + rng.integers(0, 3, display.shape), 0, 4095).astype(np.uint16)
    return new_dataset(stored, bits_stored=12, **attributes)


def chest_file(
    path: Path,
    *,
    rows: int = 512,
    columns: int = 512,
    study_uid: str | None = None,
    patient_id: str = "E2E-0001",
    seed: int = 0,
    modality: str = "CR",
    for_processing: bool = False,
) -> Path:
    """Write a synthetic frontal chest (16 bits allocated, 12 stored, explicit VR LE) to ``path``.

    ``modality`` "CR" (CR Image Storage), "DX" (DX for presentation, or for processing) or "OT" (Secondary
    Capture, a modality cxr-triage is not meant to receive).
    """
    sop_class = {
        "CR": CR_IMAGE_STORAGE,
        "DX": DX_FOR_PROCESSING if for_processing else DX_FOR_PRESENTATION,
        "OT": SECONDARY_CAPTURE,
    }[modality]
    extra: dict[str, Any] = {}
    if modality == "DX":
        extra = {
            "PresentationIntentType": "FOR PROCESSING" if for_processing else "FOR PRESENTATION",
            "ImageType": ["ORIGINAL", "PRIMARY"],
        }
    ds = chest_dataset(
        rows,
        columns,
        seed,
        SOPClassUID=sop_class,
        Modality=modality,
        PatientID=patient_id,
        AccessionNumber=f"E2E{seed:05d}",
        InstanceNumber=seed + 1,
        SeriesNumber=1,
        StudyTime="120000",
        StudyID="1",
        ReferringPhysicianName="",
        PatientBirthDate="",
        PatientSex="O",
        PatientOrientation=["L", "F"],
        Manufacturer="cxr-triage tests",
        **extra,
    )
    if study_uid:
        ds.StudyInstanceUID = study_uid
    ds.save_as(path, enforce_file_format=True)
    return path


def rescaled_dx(size: int) -> Dataset:
    """A size x size 16-bit DX for presentation: the phantom through a rescale (0.25, -1024) and a window."""
    display = phantom(size, size)
    slope, intercept, center, width = 0.25, -1024.0, 6000.0, 12000.0
    value = (display - 0.5) * (width - 1) + center - 0.5
    stored = np.round((value - intercept) / slope).astype(np.uint16)
    return new_dataset(
        stored,
        bits_stored=16,
        SOPClassUID=DX_FOR_PRESENTATION,
        Modality="DX",
        PresentationIntentType="FOR PRESENTATION",
        PresentationLUTShape="IDENTITY",
        RescaleSlope=slope,
        RescaleIntercept=intercept,
        RescaleType="US",
        WindowCenter=center,
        WindowWidth=width,
    )
