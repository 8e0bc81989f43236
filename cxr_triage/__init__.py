"""cxr-triage: a DICOM listener that triages frontal chest radiographs with the CAE-LSTM classifier.

Research use only. This is not a medical device.

The package root imports nothing heavy: ``cxr_triage.model`` and ``cxr_triage.imaging`` are shared with the
``training`` package (which must run on hosts without pydicom), while the DICOM-facing modules import pydicom
themselves.
"""

from pathlib import Path

__version__ = "0.1.0"

BUNDLED_MODEL = Path(__file__).resolve().parent / "models" / "cae_lstm.pt"
"""Where the shipped model lives (research use only); used when ``[model] path`` is empty."""

CLASS_NAMES: tuple[str, ...] = ("covid", "normal", "pneumonia")
"""Class names in the order of the classifier's outputs."""
