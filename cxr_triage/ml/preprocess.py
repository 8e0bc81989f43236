"""The pixel pipeline: from a DICOM file (or a PNG/JPEG) to the model's 3x224x224 input.

``prepare_path`` and ``prepare_dataset`` return either a ``PreparedImage`` or a ``Refusal`` whose reason names
the attribute and value that made the image unsuitable. Order of operations, which decides correctness:

1. acceptance checks on the header alone (modality, SOP class, presentation intent, body part, view,
   photometric interpretation, frames, dimensions, pixel data length, and for compressed data the size the
   codestream itself declares), before any pixel is decoded, so a decompression bomb never allocates;
2. decoding by pydicom and the pylibjpeg plugins;
3. modality LUT / rescale, 4. VOI LUT or the first window (none: the full range of the stored bits),
5. MONOCHROME1 inversion against the known output range, 6. scaling to [0, 1] from that range.

Steps 3-6 depend only on the stored value, so they are evaluated once over every possible stored value
(at most 65,536) and applied to the image as one table look-up (``cxr_triage.ml.greylut``). The modality LUT and
the window are pydicom's ``apply_modality_lut`` and ``apply_windowing``; the VOI LUT Sequence is applied here, because
pydicom's ``apply_voi`` indexes through uint16 (a rescaled value above 65,535 would wrap round to dark) and warns
on the float input a rescale produces. Step 7 (resize, three channels) is ``cxr_triage.ml.imaging.to_model_input``,
shared with training. Step 8, when no header tells the view (none, or ``VIEW_ASSUMED``): a model input whose
pixels look like a lateral view is refused (``cxr_triage.ml.symmetry``, code ``looks_lateral``).
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from cxr_triage import log_name
from cxr_triage.ml.greylut import VOIError, apply_table, grey_lut, transfer_syntax
from cxr_triage.ml.imaging import to_model_input, uint8_to_unit
from cxr_triage.ml.symmetry import REFUSAL_CODE as LATERAL_CODE
from cxr_triage.ml.symmetry import ViewVerdict, check_view
from cxr_triage.ml.view import Projection, projection_from_header

logger = logging.getLogger(log_name(__name__))

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ACCEPTED_SOP_CLASSES = frozenset({CR_IMAGE_STORAGE, DX_FOR_PRESENTATION, SECONDARY_CAPTURE})
ACCEPTED_MODALITIES = frozenset({"CR", "DX"})
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS"})
CHEST_REGION_CODES = frozenset({"51185008", "T-D3000", "43799004"})  # SCT chest, SRT chest, SCT thorax
FRONTAL_VIEWS = frozenset({"PA", "AP"})

VIEW_ASSUMED = "ViewPosition is absent: frontal view assumed"  # the note when no header attribute tells the view
MAX_SIDE = 8192
"""Largest accepted Rows or Columns; chest detectors are at most about 4,300 pixels a side."""
MAX_PIXELS = 40_000_000
"""Largest accepted Rows x Columns, checked before decoding so that a lying header cannot exhaust memory."""


@dataclass(frozen=True)
class Refusal:
    """Why an input is not classified. ``code`` is stable for scripts; ``reason`` is for people.

    ``attribute`` is the DICOM keyword at fault (None for non-DICOM inputs); ``sop_instance_uid`` is set when the
    refused input was a DICOM data set that had one.
    """

    code: str
    reason: str
    attribute: str | None = None
    sop_instance_uid: str | None = None

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class PreparedImage:
    """A model-ready (3, 224, 224) float32 tensor in [0, 1] and what was learnt on the way."""

    tensor: torch.Tensor
    sop_instance_uid: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    display: np.ndarray | None = None
    """The decoded radiograph at its own rows and columns, uint8 (0 black), when ``keep_display`` asked for it."""


def _attr(ds: Dataset, keyword: str) -> Any:
    value = ds.get(keyword)
    return value.strip() if isinstance(value, str) else value


def _tag(keyword: str) -> str:
    tag = pydicom.datadict.tag_for_keyword(keyword)
    return f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})" if tag is not None else keyword


def _refuse(code: str, keyword: str | None, message: str) -> Refusal:
    return Refusal(code=code, reason=f"{_tag(keyword)} {message}" if keyword else message, attribute=keyword)


class _NotAnInteger(ValueError):
    """A header attribute that must be one integer and is not (text, several values); refused as ``code``."""

    def __init__(self, code: str, keyword: str, value: Any) -> None:
        super().__init__(f"is {value!r}: expected one integer")
        self.code, self.keyword = code, keyword


def _integer(ds: Dataset, keyword: str, default: int, code: str) -> int:
    """The attribute's value as one integer, ``default`` when it is absent or empty; ``_NotAnInteger`` when a
    peer sent something else (a US of four bytes is two values, an IS may hold any text) or bytes pydicom cannot
    convert at all (a US of three bytes: ``BytesLengthException``)."""
    try:
        value = ds.get(keyword)
    except Exception as exc:  # pydicom converts the raw element on first access and raises for impossible lengths
        raise _NotAnInteger(code, keyword, f"unreadable: {type(exc).__name__}") from exc
    if value is None or value == "":
        return default
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            number = float(value)
            if number.is_integer():
                return int(number)
        except (ValueError, OverflowError):
            pass
    raise _NotAnInteger(code, keyword, value)


def check_header(ds: Dataset) -> tuple[Refusal | None, tuple[str, ...]]:
    """Step 1: decide from the header alone whether this is a frontal chest radiograph we can decode.

    Returns the refusal (or ``None``) and notes about attributes that were missing but tolerated.
    """
    refusal = _check_kind(ds)
    if refusal:
        return refusal, ()
    refusal, notes = _check_anatomy(ds)
    if refusal:
        return refusal, ()
    try:
        refusal = _check_pixels(ds)
    except _NotAnInteger as exc:
        return _refuse(exc.code, exc.keyword, str(exc)), ()
    return refusal, (() if refusal else notes)


def _check_kind(ds: Dataset) -> Refusal | None:
    """A CR, DX (for presentation) or Secondary Capture image, by Modality, SOP Class and presentation intent."""
    modality = _attr(ds, "Modality")
    if not modality:
        return _refuse("modality", "Modality", "is missing: only CR and DX radiographs are classified")
    if modality not in ACCEPTED_MODALITIES:
        return _refuse("modality", "Modality", f"is {modality!r}: only CR and DX radiographs are classified")
    sop_class = str(_attr(ds, "SOPClassUID") or "")
    if sop_class == DX_FOR_PROCESSING:
        return _refuse(
            "for_processing", "SOPClassUID", "is DX Image Storage - For Processing: raw detector data is not classified"
        )
    if sop_class and sop_class not in ACCEPTED_SOP_CLASSES:
        return _refuse("sop_class", "SOPClassUID", f"is {sop_class}: not a CR, DX or Secondary Capture image")
    intent = str(_attr(ds, "PresentationIntentType") or "").upper()
    if intent == "FOR PROCESSING":
        return _refuse("for_processing", "PresentationIntentType", "is 'FOR PROCESSING': raw data is not classified")
    return None


def _check_anatomy(ds: Dataset) -> tuple[Refusal | None, tuple[str, ...]]:
    """The chest (BodyPartExamined, else AnatomicRegionSequence) in a frontal view; notes for what is absent."""
    notes: list[str] = []
    body_part = str(_attr(ds, "BodyPartExamined") or "").upper()
    regions = ds.get("AnatomicRegionSequence") or []
    region_codes = {str(item.get("CodeValue", "")) for item in regions}
    if body_part:
        if body_part not in CHEST_BODY_PARTS:
            return _refuse(
                "not_chest", "BodyPartExamined", f"is {body_part!r}: only chest radiographs are classified"
            ), ()
    elif region_codes:
        if not region_codes & CHEST_REGION_CODES:
            codes = ", ".join(sorted(region_codes))
            return _refuse("not_chest", "AnatomicRegionSequence", f"codes {codes}: not the chest"), ()
    else:
        notes.append("BodyPartExamined and AnatomicRegionSequence are absent: chest assumed")

    view = str(_attr(ds, "ViewPosition") or "").upper()
    if view:
        if view not in FRONTAL_VIEWS:
            kind = "a lateral view" if view in {"LL", "RL", "LLD", "RLD", "LAT", "LATERAL"} else "not a frontal view"
            return _refuse("not_frontal", "ViewPosition", f"is {view!r}: {kind}; only PA and AP are classified"), ()
        return None, tuple(notes)
    evidence = projection_from_header(ds)
    if evidence is None:
        notes.append(VIEW_ASSUMED)
    elif evidence.projection is Projection.FRONTAL:
        notes.append(f"ViewPosition is absent: frontal view from {evidence.describe()}")
    else:
        message = (
            f"is {evidence.value!r}: {evidence.projection.value} (ViewPosition absent); only PA and AP are classified"
        )
        return _refuse("not_frontal", evidence.keyword, message), ()
    return None, tuple(notes)


def _check_pixels(ds: Dataset) -> Refusal | None:
    """Single-frame greyscale pixel data of a sane size and depth, complete, or a codestream that matches it."""
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        what = f"only {other[0]} is present" if other else "is absent"
        return _refuse("no_pixels", "PixelData", what)
    photometric = str(_attr(ds, "PhotometricInterpretation") or "")
    if photometric not in {"MONOCHROME1", "MONOCHROME2"}:
        return _refuse(
            "colour",
            "PhotometricInterpretation",
            f"is {photometric or 'missing'!r}: only greyscale images are classified",
        )
    samples = _integer(ds, "SamplesPerPixel", 1, "colour") or 1
    if samples != 1:
        return _refuse("colour", "SamplesPerPixel", f"is {samples}: only single-sample greyscale is classified")
    frames = _integer(ds, "NumberOfFrames", 1, "multiframe") or 1
    if frames != 1:
        return _refuse("multiframe", "NumberOfFrames", f"is {frames}: only single-frame images are classified")
    rows, cols = _integer(ds, "Rows", 0, "dimensions"), _integer(ds, "Columns", 0, "dimensions")
    if rows <= 0 or cols <= 0:
        return _refuse("dimensions", "Rows", f"x Columns is {rows}x{cols}: the image is empty")
    if rows > MAX_SIDE or cols > MAX_SIDE or rows * cols > MAX_PIXELS:
        return _refuse(
            "dimensions", "Rows", f"x Columns is {rows}x{cols}: larger than {MAX_SIDE} a side or {MAX_PIXELS:,} pixels"
        )
    bits_allocated = _integer(ds, "BitsAllocated", 0, "bit_depth")
    bits_stored = _integer(ds, "BitsStored", 0, "bit_depth") if "BitsStored" in ds else bits_allocated
    _integer(ds, "PixelRepresentation", 0, "bit_depth")  # read when the pixels are decoded
    if bits_allocated not in (8, 16) or not 1 <= bits_stored <= bits_allocated:
        return _refuse(
            "bit_depth", "BitsAllocated", f"is {bits_allocated} with BitsStored {bits_stored}: expected 8 or 16 bits"
        )
    syntax = transfer_syntax(ds)
    pixel_data = ds.PixelData or b""
    if syntax is None or not syntax.is_compressed:
        expected = rows * cols * bits_allocated // 8
        if len(pixel_data) < expected:
            return _refuse(
                "truncated",
                "PixelData",
                f"holds {len(pixel_data):,} bytes where {rows}x{cols}x{bits_allocated} bits need {expected:,}",
            )
        return None
    return _check_codestream(pixel_data, rows, cols)


def _first_fragment(pixel_data: bytes) -> bytes | None:
    """The first fragment after the Basic Offset Table of encapsulated pixel data; None if there is none."""
    fragments = generate_fragments(pixel_data)
    next(fragments, None)  # the Basic Offset Table item
    return next(fragments, None)


def codestream_size(fragment: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a JPEG 2000 SIZ segment or a JPEG / JPEG-LS SOF segment; None if not found."""
    soc = fragment.find(b"\xff\x4f\xff\x51", 0, 4096)  # SOC then SIZ, possibly inside a JP2 box
    if soc >= 0 and len(fragment) >= soc + 24:
        xsiz, ysiz, xosiz, yosiz = struct.unpack(">4I", fragment[soc + 8 : soc + 24])
        return ysiz - yosiz, xsiz - xosiz
    if not fragment.startswith(b"\xff\xd8"):
        return None
    offset = 2
    while offset + 9 <= len(fragment) and fragment[offset] == 0xFF:
        marker = fragment[offset + 1]
        if marker in _SOF_MARKERS:
            height, width = struct.unpack(">2H", fragment[offset + 5 : offset + 9])
            return (height, width) if height else None  # height 0: defined later by a DNL segment
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        (length,) = struct.unpack(">H", fragment[offset + 2 : offset + 4])
        offset += 2 + length
    return None


_SOF_MARKERS = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})
"""JPEG start-of-frame markers (SOF0-SOF15 less DHT, JPG and DAC) and JPEG-LS SOF55."""


def _check_codestream(pixel_data: bytes, rows: int, cols: int) -> Refusal | None:
    """Encapsulated data: a first fragment must exist, and a codestream that declares its own size must agree
    with Rows and Columns, so a small header cannot hide a huge image from the size check above."""
    try:
        fragment = _first_fragment(pixel_data)
    except (ValueError, struct.error) as exc:
        return _refuse("truncated", "PixelData", f"encapsulation cannot be read: {exc}")
    if not fragment:
        return _refuse("truncated", "PixelData", "is encapsulated but holds no compressed data")
    size = codestream_size(fragment)
    if size is not None and size != (rows, cols):
        return _refuse(
            "dimensions",
            "PixelData",
            f"codestream is {size[0]}x{size[1]} where Rows x Columns is {rows}x{cols}",
        )
    return None


_NATIVE_LITTLE_ENDIAN = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian})


def container_codes(ds: Dataset, code_dtype: np.dtype) -> np.ndarray:
    """Step 2: the decoded pixels as raw container codes (the table masks and sign-extends them).

    Native little-endian data are used in place (they already are the codes); everything else is decoded by
    pydicom and its plugins.
    """
    rows, cols = int(ds.Rows), int(ds.Columns)
    if transfer_syntax(ds) in _NATIVE_LITTLE_ENDIAN:
        return np.frombuffer(ds.PixelData, dtype=code_dtype.newbyteorder("<"), count=rows * cols).reshape(rows, cols)
    pixels = ds.pixel_array
    if pixels.shape != (rows, cols):
        raise ValueError(f"decoded shape {pixels.shape} does not match Rows x Columns {rows}x{cols}")
    return np.ascontiguousarray(pixels.astype(pixels.dtype.newbyteorder("="), copy=False)).view(code_dtype)


def decode_unit_image(ds: Dataset) -> np.ndarray:
    """Steps 2-6: decoded pixels as a (rows, cols) float32 array in [0, 1]. The header must have passed checks."""
    lut, code_dtype = grey_lut(ds)
    return apply_table(lut, container_codes(ds, code_dtype))


def prepare_dataset(ds: Dataset, keep_display: bool = False) -> PreparedImage | Refusal:
    """Steps 1-7 for a parsed DICOM dataset; ``keep_display``: keep the decoded pixels (``PreparedImage.display``)."""
    sop_instance_uid = str(ds.get("SOPInstanceUID") or "") or None
    refusal, notes = check_header(ds)
    if refusal is None:
        try:
            unit = decode_unit_image(ds)
        except VOIError as exc:
            refusal = _refuse("voi", exc.keyword, str(exc))
        except Exception as exc:  # pydicom and the pylibjpeg plugins raise many types for bad data
            logger.debug("decoding %s failed", sop_instance_uid, exc_info=True)
            refusal = _refuse("undecodable", "PixelData", f"cannot be decoded: {type(exc).__name__}: {exc}")
        except BaseException as exc:
            # pylibjpeg-rle (Rust) panics on some corrupt RLE data, and pyo3's PanicException is a BaseException:
            # uncaught, it killed the worker process at each retry of the same file and stopped the whole queue.
            if type(exc).__name__ != "PanicException":
                raise
            logger.debug("decoding %s made the decoder panic", sop_instance_uid, exc_info=True)
            refusal = _refuse("undecodable", "PixelData", f"cannot be decoded: the decoder failed: {exc}")
    if refusal is None:
        tensor = to_model_input(unit)
        refusal = _pixel_view_refusal(tensor, "PixelData") if VIEW_ASSUMED in notes else None
    if refusal is not None:
        return replace(refusal, sop_instance_uid=sop_instance_uid)
    return PreparedImage(
        tensor=tensor,
        sop_instance_uid=sop_instance_uid,
        notes=notes,
        display=_to_uint8(unit) if keep_display else None,
    )


def _pixel_view_refusal(tensor: torch.Tensor, attribute: str | None) -> Refusal | None:
    """Step 8 when no header told the view: refuse a model input whose pixels look like a lateral view."""
    check = check_view(tensor)
    if check.verdict is ViewVerdict.LATERAL:
        return Refusal(LATERAL_CODE, check.reason(), attribute)
    return None


def _to_uint8(unit: Any) -> np.ndarray:
    """A decoded image in [0, 1] (numpy or torch, (rows, columns)) as uint8."""
    values = unit.numpy() if isinstance(unit, torch.Tensor) else np.asarray(unit)
    return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


def read_dicom(path: str | os.PathLike[str]) -> Dataset | Refusal:
    """Read a DICOM file, including Part 10 files without a preamble or file meta header (ACR-NEMA style)."""
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        pass
    except Exception as exc:
        return _refuse("not_dicom", None, f"not a readable DICOM file: {type(exc).__name__}: {exc}")
    else:
        if len(ds) == 0:
            # pydicom returns an empty data set (with a warning) when a file ends inside encapsulated pixel data.
            return _refuse("truncated", None, "the file has a DICOM header but no readable data set: truncated?")
        return ds
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:
        return _refuse("not_dicom", None, f"not a DICOM file: {type(exc).__name__}: {exc}")
    if "SOPClassUID" not in ds and "PixelData" not in ds:
        return _refuse("not_dicom", None, "not a DICOM file: no DICOM preamble and no recognisable data elements")
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


def prepare_image_file(path: str | os.PathLike[str]) -> PreparedImage | Refusal:
    """PNG or JPEG: 8-bit pixels enter the pipeline at step 6, 16-bit PNG with its 0..65535 range."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS or max(im.size) > MAX_SIDE:
                return _refuse("dimensions", None, f"image is {im.width}x{im.height}: too large")
            if im.mode in ("I;16", "I;16B", "I"):
                tensor = to_model_input(np.clip(np.asarray(im, dtype=np.float32) / 65535.0, 0, 1))
                return _pixel_view_refusal(tensor, None) or PreparedImage(tensor=tensor)
            if im.mode not in ("L", "LA"):
                rgb = np.asarray(im.convert("RGB"))
                if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                    return _refuse("colour", None, f"image mode {im.mode} holds colour: only greyscale is classified")
                grey = rgb[..., 0]
            else:
                grey = np.array(im.convert("L"))
    except Image.DecompressionBombError as exc:
        return _refuse("dimensions", None, f"image is too large: {exc}")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        # Pillow reports a corrupt PNG chunk as SyntaxError and a truncated file as OSError or EOFError.
        return _refuse("undecodable", None, f"image cannot be decoded: {type(exc).__name__}: {exc}")
    tensor = to_model_input(uint8_to_unit(np.ascontiguousarray(grey)))
    return _pixel_view_refusal(tensor, None) or PreparedImage(tensor=tensor)


def _sniff(path: Path) -> str:
    with path.open("rb") as fh:
        head = fh.read(132)
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff"):
        return "image"
    return "dicom"


def prepare_path(path: str | os.PathLike[str]) -> PreparedImage | Refusal:
    """Steps 1-7 for a file: DICOM (with or without file meta) or PNG/JPEG, told apart by content."""
    p = Path(path)
    try:
        kind = _sniff(p)
    except OSError as exc:
        return _refuse("unreadable", None, f"cannot read file: {exc.strerror or exc}")
    if kind == "image":
        return prepare_image_file(p)
    ds = read_dicom(p)
    if isinstance(ds, Refusal):
        return ds
    return prepare_dataset(ds)
