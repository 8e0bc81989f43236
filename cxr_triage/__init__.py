"""cxr-triage: a DICOM listener that triages frontal chest radiographs with the CAE-LSTM classifier.

Research use only. This is not a medical device.

The package root imports nothing heavy: ``cxr_triage.ml.model`` and ``cxr_triage.ml.imaging`` are shared with the
``training`` package (which must run on hosts without pydicom), while the DICOM-facing modules import pydicom
themselves.
"""

from pathlib import Path

__version__ = "0.1.0"

BUNDLED_MODEL = Path(__file__).resolve().parent / "models" / "cae_lstm.pt"
"""Where the shipped model lives (research use only); used when ``[model] path`` is empty."""

CLASS_NAMES: tuple[str, ...] = ("covid", "normal", "pneumonia")
"""Class names in the order of the classifier's outputs."""

PRECISIONS: tuple[str, ...] = ("auto", "float32", "bfloat16")
"""Accepted values of ``[model] precision`` and ``[retrain] precision`` (``cxr_triage.ml.precision`` resolves them)."""


def log_name(module: str) -> str:
    """A module's logger: ``cxr_triage.<its own name>``, whichever room it stands in (``cxr_triage.dicom.listener``
    logs as ``cxr_triage.listener``), so that the names in the logs, and the filters operators keep on them, did not
    change when the modules moved into rooms."""
    return f"cxr_triage.{module.rsplit('.', 1)[-1]}"
