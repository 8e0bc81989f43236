"""A received radiograph's pixels for the study page's viewer, and its heatmap, as plain values.

Nothing here changes state: the pixels are read from the instance's spool file (``instances.spool_path``, kept
``[storage] spool_retention_days``) and the map from ``instances.heatmap_path``, which the worker writes
(``cxr_triage.ml.heatmap.save_coarse``); a small in-process cache keeps the last few decoded images so the
viewer's two requests (the description, then the pixels) decode a file once.

The pixels are decoded by the product's own pipeline (``cxr_triage.ml.preprocess``: ``read_dicom``, the header
checks, ``container_codes`` and the modality LUT or rescale of ``modality_table``), and served as the **modality
values** (what a DICOM window is expressed in) coded as unsigned 16-bit integers: ``modality = value * slope +
intercept``. Integer modality values that span at most 65,536 are exact (``slope`` 1); others are quantised
linearly over their range (65,536 levels). The window, the VOI LUT function and the MONOCHROME1 inversion are the
browser's (it redraws as a radiologist windows): the header's first WindowCenter / WindowWidth, else (no window,
or only a VOI LUT Sequence, which the viewer does not apply) the image's own pixel range.

**The cap**: an image of more than ``MAX_PIXELS`` (4096 x 4096, 32 MiB of 16-bit values) is served reduced by the
smallest whole factor that brings it under, each served pixel the mean of a factor x factor block (edges
repeated); ``step`` says by how much. Chest detectors reach about 4,300 pixels a side, so only the largest are
reduced, by 2. The header check caps what is decoded at all (``preprocess.MAX_SIDE``, ``MAX_PIXELS``).

Pixels whose header says they carry burned-in annotation (``BurnedInAnnotation`` YES) are not served, as the
worklist keeps no thumbnail of them: the text may be patient data beyond ``[web] patient_fields``.

The first radiograph a ``cxr-triage web`` process serves imports the pixel pipeline (torch with it): that request
takes a few seconds longer; the worklist itself never needs it.

The heatmap is the coarse map (14 x 14 today, values in [0, 1]) over the squashed 224 x 224 model input:
stretched over the radiograph's rows and columns, it is registered (docs/HEATMAP.md).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.multival import MultiValue

MAX_PIXELS = 4096 * 4096
"""Most pixels served for one radiograph; larger ones are reduced by a whole factor (module docstring)."""
CACHE_IMAGES = 3
"""Decoded radiographs kept in memory (at most 32 MiB each)."""
UINT16_LEVELS = 65535


class Unavailable(LookupError):
    """The radiograph cannot be shown; the message says why in words for the page."""


@dataclass(frozen=True)
class Window:
    """A VOI window in modality units, with the DICOM VOI LUT function and where it came from."""

    center: float
    width: float
    function: str
    source: str


@dataclass(frozen=True)
class Radiograph:
    """Modality values as ``uint16`` (``modality = value * slope + intercept``) and how to present them."""

    values: np.ndarray
    source_rows: int
    source_columns: int
    step: int
    slope: float
    intercept: float
    window: Window
    photometric: str
    invert: bool

    def describe(self) -> dict[str, Any]:
        """The description the browser needs besides the pixels (JSON-ready)."""
        rows, columns = self.values.shape
        return {
            "rows": rows,
            "columns": columns,
            "source_rows": self.source_rows,
            "source_columns": self.source_columns,
            "step": self.step,
            "slope": self.slope,
            "intercept": self.intercept,
            "max_value": int(self.values.max()) if self.values.size else 0,
            "window": {
                "center": self.window.center,
                "width": self.window.width,
                "function": self.window.function,
                "source": self.window.source,
            },
            "photometric": self.photometric,
            "invert": self.invert,
            "pixel_format": "uint16 little-endian, row-major",
        }

    def pixel_bytes(self) -> bytes:
        return self.values.astype("<u2", copy=False).tobytes()


def _first(value: Any) -> float | None:
    """The first of a DICOM value's values (WindowCenter may hold several), None when absent or not a number."""
    if value is None or value == "":
        return None
    try:
        number = float(value[0] if isinstance(value, MultiValue | list | tuple) else value)
    except (TypeError, ValueError, IndexError):
        return None
    return number if math.isfinite(number) else None


def window_of(ds: Any, lo: float, hi: float) -> Window:
    """The header's first window, else one over the image's own range of modality values (``lo`` to ``hi``)."""
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper() or "LINEAR"
    if center is not None and width is not None and width >= 1:
        return Window(center, width, function if function in ("LINEAR", "LINEAR_EXACT", "SIGMOID") else "LINEAR",
                      "the DICOM header (WindowCenter / WindowWidth)")  # fmt: skip
    why = "a VOI LUT Sequence the viewer does not apply" if ds.get("VOILUTSequence") else "no window in the header"
    return Window((lo + hi + 1) / 2, float(max(hi - lo + 1, 1.0)), "LINEAR", f"the image's pixel range ({why})")


def _coding(modality_table: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) that code the table's modality values as uint16: exact for integers of a small span."""
    lo, hi = float(modality_table.min()), float(modality_table.max())
    integers = bool(np.all(modality_table == np.round(modality_table)))
    if integers and hi - lo <= UINT16_LEVELS:
        return 1.0, lo
    return (hi - lo) / UINT16_LEVELS if hi > lo else 1.0, lo


def reduce(values: np.ndarray, limit: int | None = None) -> tuple[np.ndarray, int]:
    """``values`` reduced by the smallest whole factor that fits ``limit`` (``MAX_PIXELS``) pixels (block means),
    and the factor."""
    limit = limit or MAX_PIXELS
    rows, columns = values.shape
    step = 1
    while math.ceil(rows / step) * math.ceil(columns / step) > limit:
        step += 1
    if step == 1:
        return values, 1
    padded = np.pad(values, ((0, -rows % step), (0, -columns % step)), mode="edge").astype(np.float32)
    blocks = padded.reshape(padded.shape[0] // step, step, padded.shape[1] // step, step).mean(axis=(1, 3))
    return np.rint(blocks).astype(np.uint16), step


def decode(path: Path) -> Radiograph:
    """The spool file's radiograph; ``Unavailable`` (saying why) when it cannot be shown."""
    from cxr_triage.ml import greylut, preprocess

    ds = preprocess.read_dicom(path)
    if isinstance(ds, preprocess.Refusal):
        raise Unavailable(f"the received file cannot be read: {ds.reason}")
    refusal, _ = preprocess.check_header(ds)
    if refusal is not None:
        raise Unavailable(f"not shown: {refusal.reason}")
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":  # as the worklist's thumbnails
        raise Unavailable("not shown: BurnedInAnnotation (0028,0301) is YES: the pixels may carry patient data")
    try:
        _, table, code_dtype = greylut.modality_table(ds)
        codes = preprocess.container_codes(ds, code_dtype)
    except Exception as exc:  # pydicom and its plugins raise many types for bad data
        raise Unavailable(f"the pixels cannot be decoded: {type(exc).__name__}: {exc}") from exc
    except BaseException as exc:  # pylibjpeg-rle's PanicException (see preprocess.prepare_dataset)
        if type(exc).__name__ != "PanicException":
            raise
        raise Unavailable(f"the pixels cannot be decoded: the decoder failed: {exc}") from exc
    slope, intercept = _coding(table)
    coded = np.clip(np.rint((table - intercept) / slope), 0, UINT16_LEVELS).astype(np.uint16)
    values = greylut.apply_table(coded, codes)
    window = window_of(ds, float(values.min()) * slope + intercept, float(values.max()) * slope + intercept)
    reduced, step = reduce(values)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    inverse = str(ds.get("PresentationLUTShape", "") or "").strip().upper() == "INVERSE"
    return Radiograph(
        values=reduced, source_rows=int(ds.Rows), source_columns=int(ds.Columns), step=step, slope=slope,
        intercept=intercept, window=window, photometric=photometric, invert=photometric == "MONOCHROME1" or inverse,
    )  # fmt: skip


class Cache:
    """The last ``size`` decoded radiographs, by file and its modification time (thread-safe)."""

    def __init__(self, size: int = CACHE_IMAGES) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, int, int], Radiograph] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> Radiograph:
        try:
            stat = path.stat()
        except OSError as exc:
            raise Unavailable("the received file is no longer kept (spool retention)") from exc
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        radiograph = decode(path)
        with self._lock:
            self._items[key] = radiograph
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return radiograph


def heatmap(path: str | None) -> dict[str, Any] | None:
    """The stored coarse map as JSON-ready values (row-major, 4 decimals), None when there is none."""
    if not path or not Path(path).is_file():
        return None
    from cxr_triage.ml.heatmap import load_coarse

    try:
        values = np.clip(load_coarse(path), 0.0, 1.0)
    except (OSError, ValueError):
        return None
    return {
        "rows": int(values.shape[0]),
        "columns": int(values.shape[1]),
        "values": [round(float(v), 4) for v in values.reshape(-1)],
        "meaning": "relative attention of the model (Grad-CAM of the predicted class, 0 = none, 1 = the most in "
        "this image); where the model looked, not a diagnosis and not a lesion's outline",
        "registration": "the map covers the whole radiograph: stretch it over its rows and columns",
    }
