"""Synthetic DICOM images for tests: one displayed picture, written in many real encodings.

The idea: a test chooses what the radiologist should *see* (a "display" image, float in [0, 1], 0 black,
1 white), and the helpers here compute the stored values that make a correct viewer show exactly that picture
through the modality LUT, the VOI window or LUT and the MONOCHROME1 inversion. Every encoding the pipeline
accepts then has a known right answer, and a pipeline that gets one step wrong (forgets to invert, scales by the
data max, ignores the rescale) is caught because its output stops matching the other encodings.

Public helpers (other test modules may import them):

- ``SHARED_DICOM``: the folder of real chest DICOM files (``../shared/data/dicom`` next to the repo).
- ``phantom`` and ``new_dataset``: from ``cxr_triage.testing.synthetic`` (the one synthetic-image factory).
- ``encode(display, variant, tmp_dir)``: the display image in one of ``VARIANTS`` (real encoders: pydicom,
  pylibjpeg-openjpeg, and the dcmtk command-line tools), returned as the path of the written file.
- ``mono2_12bit``, ``rescale_16bit``, ``mono1_window``, ... (one function per native variant): the display image
  as an in-memory dataset, for tests that change attributes before writing.
- ``save(ds, path, file_meta=True)``: write a dataset (``file_meta=False``: bare implicit VR, no preamble).
- ``lung_and_mediastinum(image)``: mean of the lung fields and of the central column of a frontal chest.
- ``window_input(display, center, width)``: the stored values that a LINEAR window maps onto ``display``.
- ``run_tool(*argv)``: run a dcmtk/dicom3tools command, failing the test with its output if it fails.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

SHARED_DICOM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
"""The five real chest DICOM files (read-only; see catalog.csv there)."""

from cxr_triage.testing.synthetic import CR_IMAGE_STORAGE as CR_IMAGE_STORAGE  # noqa: E402 (re-exported)
from cxr_triage.testing.synthetic import CT_IMAGE_STORAGE as CT_IMAGE_STORAGE  # noqa: E402
from cxr_triage.testing.synthetic import DX_FOR_PRESENTATION as DX_FOR_PRESENTATION  # noqa: E402
from cxr_triage.testing.synthetic import DX_FOR_PROCESSING as DX_FOR_PROCESSING  # noqa: E402
from cxr_triage.testing.synthetic import new_dataset as new_dataset  # noqa: E402
from cxr_triage.testing.synthetic import phantom as phantom  # noqa: E402


def lung_and_mediastinum(image: np.ndarray) -> tuple[float, float]:
    """Mean of the central lung fields and of the mediastinum/spine column of a frontal chest image.

    Works on any (H, W) grey image in display orientation (e.g. channel 0 of a model tensor): lungs occupy
    roughly 18-38 % and 62-82 % of the width, the mediastinum 45-55 %, in the upper-middle rows.
    """
    h, w = image.shape
    rows = slice(int(0.3 * h), int(0.65 * h))
    left = image[rows, int(0.18 * w) : int(0.38 * w)]
    right = image[rows, int(0.62 * w) : int(0.82 * w)]
    middle = image[int(0.27 * h) : int(0.8 * h), int(0.45 * w) : int(0.55 * w)]
    return float(np.concatenate([left.ravel(), right.ravel()]).mean()), float(middle.mean())


def window_input(display: np.ndarray, center: float, width: float) -> np.ndarray:
    """Values that PS3.3 C.11.2.1.2.1's LINEAR window (center, width) maps onto ``display`` (not rounded)."""
    return (display - 0.5) * (width - 1.0) + center - 0.5


def save(ds: Dataset, path: Path, *, file_meta: bool = True) -> Path:
    """Write ``ds`` to ``path``; ``file_meta=False`` writes a bare implicit-VR data set (no preamble/header)."""
    if file_meta:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.file_meta = FileMetaDataset()
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    return path


def run_tool(*argv: str | Path) -> str:
    """Run a real DICOM tool (dcmtk, dicom3tools); raises AssertionError with its output when it fails."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"{argv[0]} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc.stdout + proc.stderr


def _unsigned(display: np.ndarray, bits: int, **kw: Any) -> Dataset:
    top = 2**bits - 1
    dtype = np.uint8 if bits <= 8 else np.uint16
    return new_dataset(np.round(display * top).astype(dtype), bits_stored=bits, **kw)


def mono2_12bit(display: np.ndarray) -> Dataset:
    """12-bit MONOCHROME2, no window: the full range of the stored bits."""
    return _unsigned(display, 12)


def rescale_16bit(display: np.ndarray) -> Dataset:
    """16 bits stored, RescaleSlope 0.25 / RescaleIntercept -1024, window in rescaled units."""
    slope, intercept, center, width = 0.25, -1024.0, 6000.0, 12000.0
    value = window_input(display, center, width)
    stored = np.round((value - intercept) / slope).astype(np.uint16)
    return new_dataset(
        stored,
        bits_stored=16,
        Modality="DX",
        SOPClassUID=DX_FOR_PRESENTATION,
        PresentationIntentType="FOR PRESENTATION",
        PresentationLUTShape="IDENTITY",
        RescaleSlope=slope,
        RescaleIntercept=intercept,
        RescaleType="US",
        WindowCenter=center,
        WindowWidth=width,
    )


def mono1_window(display: np.ndarray) -> Dataset:
    """14-bit MONOCHROME1 (high stored value = dark) with a window, like most CR plates."""
    center, width = 8000.0, 12000.0
    stored = np.round(window_input(1.0 - display, center, width)).astype(np.uint16)
    return new_dataset(stored, bits_stored=14, photometric="MONOCHROME1", WindowCenter=center, WindowWidth=width)


def mono1_no_window(display: np.ndarray) -> Dataset:
    """12-bit MONOCHROME1 without any VOI attribute: inverted against the full stored range."""
    return _unsigned(1.0 - display, 12, photometric="MONOCHROME1")


def implicit_8bit(display: np.ndarray) -> Dataset:
    """8-bit MONOCHROME2 in Implicit VR Little Endian (like secondary-capture exports)."""
    return _unsigned(display, 8, transfer_syntax=ImplicitVRLittleEndian)


def signed_12bit(display: np.ndarray) -> Dataset:
    """12-bit two's complement (PixelRepresentation 1), no window: -2048..2047 is the full range."""
    stored = (np.round(display * 4095.0) - 2048).astype(np.int16)
    return new_dataset(stored, bits_stored=12, signed=True)


def voi_lut_12bit(display: np.ndarray) -> Dataset:
    """12-bit MONOCHROME2 whose only VOI is a non-linear (gamma 2) VOI LUT Sequence starting at stored 512.

    A pipeline that ignores the LUT (and scales the stored bits instead) gets a visibly different picture.
    """
    first, entries = 512, 2048
    t = np.arange(entries) / (entries - 1)
    item = Dataset()
    item.LUTDescriptor = [entries, first, 16]
    item.add_new("LUTData", "US", [int(v) for v in np.round(65535.0 * t**2)])
    item.LUTExplanation = "gamma 2 test LUT"
    stored = (first + np.round(np.sqrt(display) * (entries - 1))).astype(np.uint16)
    return new_dataset(stored, bits_stored=12, VOILUTSequence=Sequence([item]))


def _pydicom_compressed(make: Callable[[np.ndarray], Dataset], syntax: str) -> Callable[[np.ndarray], Dataset]:
    def build(display: np.ndarray) -> Dataset:
        ds = make(display)
        ds.compress(UID(syntax))
        return ds

    return build


_NATIVE: dict[str, Callable[[np.ndarray], Dataset]] = {
    "mono2_12bit": mono2_12bit,
    "rescale_16bit": rescale_16bit,
    "mono1_window": mono1_window,
    "mono1_no_window": mono1_no_window,
    "implicit_8bit": implicit_8bit,
    "signed_12bit": signed_12bit,
    "voi_lut_12bit": voi_lut_12bit,
    "j2k_lossless_pydicom": _pydicom_compressed(mono1_window, JPEG2000Lossless),
    "rle_pydicom": _pydicom_compressed(mono1_window, RLELossless),
}

_DCMTK: dict[str, tuple[Callable[[np.ndarray], Dataset], tuple[str, ...]]] = {
    "jpegls_dcmcjpls": (mono2_12bit, ("dcmcjpls",)),
    "jpegls_dcmcjpls_rescale": (rescale_16bit, ("dcmcjpls",)),
    "rle_dcmcrle": (rescale_16bit, ("dcmcrle",)),
    "jpeg_lossless_dcmcjpeg": (mono1_window, ("dcmcjpeg", "+e1")),
    "deflate_dcmconv": (mono2_12bit, ("dcmconv", "+td")),
    "big_endian_dcmconv": (signed_12bit, ("dcmconv", "+tb")),
}

VARIANTS: tuple[str, ...] = (*_NATIVE, *_DCMTK, "no_file_meta")
"""Every encoding ``encode`` can produce; all of them display the same picture."""


def encode(display: np.ndarray, variant: str, tmp_dir: Path) -> Path:
    """Write ``display`` as ``variant`` (see ``VARIANTS``) into ``tmp_dir``; returns the file's path."""
    path = Path(tmp_dir) / f"{variant}.dcm"
    if variant in _NATIVE:
        return save(_NATIVE[variant](display), path)
    if variant == "no_file_meta":
        return save(mono1_window(display), path, file_meta=False)
    make, tool = _DCMTK[variant]
    source = save(make(display), Path(tmp_dir) / f"{variant}.source.dcm")
    run_tool(*tool, source, path)
    return path
