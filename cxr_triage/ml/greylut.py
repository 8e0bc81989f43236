"""Steps 3-6 of the pixel pipeline (``cxr_triage.ml.preprocess``): stored values to grey levels in [0, 1].

Modality LUT / rescale, then the VOI LUT Sequence or the first window (none: the full range of the stored bits),
then MONOCHROME1 inversion against the known output range, then scaling to [0, 1] from that range. These depend
only on the stored value, so they are evaluated once over every possible stored value (at most 65,536) and applied
to the image as one table look-up (``grey_lut``, cached per header; ``apply_table``). The modality LUT and the
window are pydicom's ``apply_modality_lut`` and ``apply_windowing``; the VOI LUT Sequence is applied here, because
pydicom's ``apply_voi`` indexes through uint16 (a rescaled value above 65,535 would wrap round to dark) and warns on
the float input a rescale produces. ``modality_table`` is shared with the study page's viewer
(``cxr_triage.web.radiograph``). Pure functions of the header; the only state is ``grey_lut``'s small cache.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_windowing
from pydicom.uid import ExplicitVRBigEndian


def _value_domain(ds: Dataset) -> tuple[np.ndarray, np.dtype]:
    """Every container code (0..2**BitsAllocated-1) mapped to the stored value it means.

    Bits above BitsStored are ignored (PS3.5 8.1.1) and signed values are sign-extended from BitsStored, so the
    table is right whether or not a decoder masked or sign-extended them already.
    """
    bits_allocated = int(ds.BitsAllocated)
    bits_stored = int(ds.get("BitsStored", bits_allocated))
    signed = int(ds.get("PixelRepresentation") or 0) == 1  # an integer: check_header refused others
    values = np.arange(2**bits_allocated, dtype=np.int64) & (2**bits_stored - 1)
    if signed:
        values = np.where(values >= 2 ** (bits_stored - 1), values - 2**bits_stored, values)
    return values, np.dtype(f"uint{bits_allocated}")


class VOIError(ValueError):
    """A VOI or modality LUT attribute that cannot be applied; ``keyword`` names it."""

    def __init__(self, keyword: str, message: str) -> None:
        super().__init__(message)
        self.keyword = keyword


def _modality_output_range(ds: Dataset, stored: np.ndarray) -> tuple[float, float]:
    """The range a window maps onto, as pydicom's ``apply_windowing`` computes it (PS3.3 C.11.2.1.2): the
    modality LUT's output range or the stored range, through the rescale. Not sorted: a negative slope
    reverses it, and scaling by the unsorted pair keeps values below the window black."""
    modality_luts = ds.get("ModalityLUTSequence") or []
    if modality_luts:
        lo, hi = 0.0, float(2 ** int(modality_luts[0].LUTDescriptor[2]) - 1)
    else:
        lo, hi = float(stored.min()), float(stored.max())
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        return lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return lo, hi


def _lut_data(ds: Dataset, item: Dataset, entries: int) -> np.ndarray:
    data = item.get("LUTData")
    if data is None:
        raise VOIError("VOILUTSequence", "item has no LUTData")
    if isinstance(data, bytes | bytearray):  # VR OW: 16-bit words in the data set's byte order
        big = transfer_syntax(ds) == ExplicitVRBigEndian
        table = np.frombuffer(data, dtype=">u2" if big else "<u2")
    else:
        table = np.atleast_1d(np.asarray(data))
    if table.size < entries:
        raise VOIError("VOILUTSequence", f"LUTData holds {table.size} entries where LUTDescriptor says {entries}")
    return table[:entries].astype(np.float64)


def _apply_voi_lut_sequence(ds: Dataset, values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The first VOI LUT (PS3.3 C.11.2.1.1): values below the first mapped one take the first entry, above the
    last the last entry. Indexing is done in int64, so 16-bit inputs far outside the table cannot wrap."""
    item = ds.VOILUTSequence[0]
    descriptor = item.get("LUTDescriptor")
    if descriptor is None or len(descriptor) != 3:
        raise VOIError("VOILUTSequence", f"LUTDescriptor is {descriptor!r}: expected three values")
    entries, first, bits = (int(v) for v in descriptor)
    entries = entries or 65536
    if first >= 2**15 and ds.get("PixelRepresentation", 0) == 1:
        first -= 2**16  # first mapped value is SS when the pixel data are signed (PS3.3 C.11.2.1.1)
    if not 1 <= bits <= 16:
        raise VOIError("VOILUTSequence", f"LUTDescriptor bit depth is {bits}: expected 1 to 16")
    table = _lut_data(ds, item, entries)
    index = np.clip(np.floor(values) - first, 0, entries - 1).astype(np.int64)
    return table[index], 0.0, float(2**bits - 1)


def transfer_syntax(ds: Dataset) -> pydicom.uid.UID | None:
    file_meta = getattr(ds, "file_meta", None)
    return file_meta.get("TransferSyntaxUID") if file_meta is not None else None


def _has_window(ds: Dataset) -> bool:
    return ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None


_LUT_KEYWORDS = (
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "PhotometricInterpretation",
    "PresentationLUTShape",
    "RescaleSlope",
    "RescaleIntercept",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
)
"""Everything ``grey_lut`` reads from a header without LUT sequences: the key of its cache."""
_LUT_CACHE: dict[tuple[str, ...], tuple[np.ndarray, np.dtype]] = {}
_LUT_CACHE_SIZE = 32


def grey_lut(ds: Dataset) -> tuple[np.ndarray, np.dtype]:
    """Steps 3-6 as a table: container code -> presentation value in [0, 1] (0 black, 1 white).

    The table is read-only and cached per header (images from one device share it). Raises ``ValueError``
    (naming the attribute) when a LUT or window in the header cannot be applied.
    """
    if ds.get("ModalityLUTSequence") or ds.get("VOILUTSequence"):
        return build_grey_lut(ds)
    key = tuple(str(ds.get(keyword, "")) for keyword in _LUT_KEYWORDS)
    cached = _LUT_CACHE.get(key)
    if cached is None:
        cached = build_grey_lut(ds)
        if len(_LUT_CACHE) >= _LUT_CACHE_SIZE:
            _LUT_CACHE.clear()
        _LUT_CACHE[key] = cached
    return cached


def modality_table(ds: Dataset) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    """Step 3 as a table: (stored value of every container code, its modality value (float64), the codes' dtype).

    Shared by ``build_grey_lut`` and the study page's viewer (``cxr_triage.web.radiograph``), which serves the
    modality values and leaves the window to the browser."""
    stored, code_dtype = _value_domain(ds)
    try:
        modality_values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    except Exception as exc:
        raise VOIError("ModalityLUTSequence", f"cannot be applied: {exc}") from exc
    return stored, modality_values, code_dtype


def build_grey_lut(ds: Dataset) -> tuple[np.ndarray, np.dtype]:
    """Steps 3-6 as one table over every stored value of ``ds``'s header: modality LUT or rescale, VOI LUT or
    window, MONOCHROME1 inversion, scaling to [0, 1]; with the dtype of the codes that index it."""
    stored, modality_values, code_dtype = modality_table(ds)
    if ds.get("VOILUTSequence"):
        voi_values, lo, hi = _apply_voi_lut_sequence(ds, modality_values)
    elif _has_window(ds):
        try:
            voi_values = np.asarray(apply_windowing(modality_values.copy(), ds, index=0), dtype=np.float64)
        except (ValueError, TypeError, IndexError) as exc:
            raise VOIError("WindowWidth", f"cannot be applied: {exc}") from exc
        lo, hi = _modality_output_range(ds, stored)
    else:
        # No VOI: the full range of the stored bits through the modality LUT.
        voi_values = modality_values
        lo, hi = float(modality_values.min()), float(modality_values.max())
    if hi == lo:
        keyword = "ModalityLUTSequence" if ds.get("ModalityLUTSequence") else "RescaleSlope"
        raise VOIError(keyword, f"maps every stored value to one value ({lo:g}): the image would be blank")
    scaled = np.clip((voi_values - lo) / (hi - lo), 0.0, 1.0)
    # MONOCHROME1 inverts after VOI, against the known output range. pydicom's presentation LUT step would look
    # only at PresentationLUTShape; DX requires INVERSE with MONOCHROME1, which means the same single inversion.
    inverse_shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper() == "INVERSE"
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1" or inverse_shape:
        scaled = 1.0 - scaled
    table = scaled.astype(np.float32)
    table.flags.writeable = False
    return table, code_dtype


_GATHER_CHUNK = 1 << 15
"""Pixels per table look-up: small enough that numpy's index conversion stays in cache (about 2x faster)."""


def apply_table(table: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Look every pixel's code up in ``table`` (in chunks, so that no large index array is made)."""
    flat_codes = codes.reshape(-1)
    out = np.empty(flat_codes.shape, dtype=table.dtype)
    for start in range(0, flat_codes.size, _GATHER_CHUNK):
        np.take(table, flat_codes[start : start + _GATHER_CHUNK], out=out[start : start + _GATHER_CHUNK])
    return out.reshape(codes.shape)
