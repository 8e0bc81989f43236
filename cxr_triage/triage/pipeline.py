"""The processing stages of a claimed job, and what can become of it: ``Classified``, ``Refused`` or ``Failed``.

``preprocess`` reads a spool file and prepares the model input (``cxr_triage.ml.preprocess``): a refusal (a lateral
view, not a chest) or an error ends the job there; otherwise the prepared image goes on with the dataset, its
pixel data dropped, kept as the SR's evidence. Every outcome of a readable header carries the identifiers the
recorder stores for the outputs that name the patient (``identifiers``: ``outputs.hl7report.recorded_identifiers``),
so that no output reads the spool file again. ``classify`` runs the model on prepared images and sets each
one's worklist flag; with a heatmap (``cxr_triage.ml.heatmap``, ``[heatmap] enabled``) the prediction and the
coarse Grad-CAM map come from one float32 pass, and a failure of that pass falls back to the predictor without maps
(the classification is never lost for a map). Outcomes are frozen: the recorder (``cxr_triage.triage.recorder``)
turns them into rows, SRs, heatmap files and forwards in one transaction.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr_triage import log_name
from cxr_triage.core import dicomwarnings
from cxr_triage.core.settings import TriageSettings
from cxr_triage.outputs.hl7report import recorded_identifiers
from cxr_triage.queue.jobqueue import ClaimedJob
from cxr_triage.triage.flags import flag_for

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from cxr_triage.ml.gate import TypicalityGate
    from cxr_triage.ml.heatmap import GradCAMHeatmap
    from cxr_triage.ml.inference import Prediction, Predictor
    from cxr_triage.ml.preprocess import PreparedImage, Refusal

logger = logging.getLogger(log_name(__name__))


@dataclass(frozen=True)
class Prepared:
    """A job whose image is ready for the model."""

    job: ClaimedJob
    image: PreparedImage
    evidence: Dataset  # the classified dataset without its pixel data
    preprocess_ms: float
    thumbnail: bytes | None = None  # PNG of the model's input; None when the image may carry burned-in text
    identifiers: dict[str, Any] | None = None  # what instances.identifiers records; None: header not read
    display: Any = None  # the radiograph at its own geometry, uint8 (``keep_display``); None: not kept


@dataclass(frozen=True)
class Classified:
    """The model's finding for one instance, with the flag it raised."""

    job: ClaimedJob
    prediction: Prediction
    evidence: Dataset
    preprocess_ms: float
    inference_ms: float
    flagged: bool
    flag_reason: str | None
    model: Predictor  # the predictor that ran, even if a new model was loaded meanwhile
    thumbnail: bytes | None = None
    typicality: float | None = None  # the gate's score; None when no gate ran
    identifiers: dict[str, Any] | None = None
    heatmap: Any = None  # the coarse (h, w) Grad-CAM map of the predicted class (a CPU tensor); None without one
    precision: str | None = None  # the precision that produced the label; None: the predictor's own
    display: Any = None  # the radiograph at its own geometry (uint8), for the heatmap object; None: not kept


@dataclass(frozen=True)
class Refused:
    """Not a frontal chest radiograph (or not decodable as one): the reason names the attribute."""

    job: ClaimedJob
    refusal: Refusal
    typicality: float | None = None  # set when the typicality gate refused the image
    identifiers: dict[str, Any] | None = None


@dataclass(frozen=True)
class Failed:
    """An attempt that raised; the job is retried until ``[worker] max_attempts``."""

    job: ClaimedJob
    error: str
    identifiers: dict[str, Any] | None = None

    @classmethod
    def of(cls, job: ClaimedJob, exc: BaseException, identifiers: dict[str, Any] | None = None) -> Failed:
        return cls(job, f"{type(exc).__name__}: {exc}"[:4000], identifiers)


Outcome = Classified | Refused | Failed


def preprocess(
    jobs: Sequence[ClaimedJob], stop: threading.Event, keep_display: bool = False
) -> tuple[list[Outcome], list[Prepared]]:
    """Read and prepare each job's spool file; jobs left when ``stop`` is set stay claimed (released later).
    ``keep_display``: keep each radiograph's pixels at its own geometry (for the heatmap object)."""
    from cxr_triage.ml.preprocess import Refusal, prepare_dataset, read_dicom

    outcomes: list[Outcome] = []
    prepared: list[Prepared] = []
    for job in jobs:
        if stop.is_set():
            break
        started = time.perf_counter()
        identifiers = None
        try:
            if not Path(job.spool_path).is_file():
                raise FileNotFoundError(f"spool file {job.spool_path} is missing")
            with dicomwarnings.collected() as complaints:
                ds = read_dicom(job.spool_path)
                if not isinstance(ds, Refusal):
                    for _ in ds.iterall():  # every value parsed (and complained about) now, not in the SR's build
                        pass
                    identifiers = recorded_identifiers(ds)
                result: Any = ds if isinstance(ds, Refusal) else prepare_dataset(ds, keep_display=keep_display)
            if complaints:  # one record per dataset, however many times pydicom warned
                logger.warning(
                    "job %s (SOP instance %s): %s", job.id, job.sop_instance_uid, dicomwarnings.summary(complaints)
                )
        except Exception as exc:
            logger.exception("job %s (SOP instance %s): preprocessing failed", job.id, job.sop_instance_uid)
            outcomes.append(Failed.of(job, exc, identifiers))
            continue
        elapsed = (time.perf_counter() - started) * 1000.0
        if isinstance(result, Refusal):
            outcomes.append(Refused(job, result, identifiers=identifiers))
            continue
        if "PixelData" in ds:
            del ds.PixelData  # the header stays as the SR's evidence; the pixels are in the tensor now
        display, result = result.display, dataclasses.replace(result, display=None)
        prepared.append(Prepared(job, result, ds, elapsed, thumbnail_png(result.tensor, ds), identifiers, display))
    return outcomes, prepared


def screen(prepared: Sequence[Prepared], gate: TypicalityGate) -> tuple[list[Outcome], list[tuple[Prepared, float]]]:
    """The typicality gate's verdict on ``prepared``: refusals, and the images that go on with their scores."""
    from cxr_triage.ml.gate import REFUSAL_CODE
    from cxr_triage.ml.preprocess import Refusal

    outcomes: list[Outcome] = []
    passed: list[tuple[Prepared, float]] = []
    for item, score in zip(prepared, gate.scores([p.image.tensor for p in prepared]), strict=True):
        if gate.refuses(score):
            refusal = Refusal(REFUSAL_CODE, gate.reason(score), None, item.image.sop_instance_uid)
            outcomes.append(Refused(item.job, refusal, score, item.identifiers))
        else:
            passed.append((item, score))
    return outcomes, passed


def classify(
    prepared: Sequence[Prepared],
    predictor: Predictor,
    triage: TriageSettings,
    gate: TypicalityGate | None = None,
    heatmap: GradCAMHeatmap | None = None,
) -> list[Outcome]:
    """Screen ``prepared`` with the gate, then run the model on the rest in one call (with ``heatmap``: the one
    pass that yields the prediction and the map); an error in either fails every job of the call."""
    if not prepared:
        return []
    outcomes: list[Outcome] = []
    try:
        started = time.perf_counter()
        if gate is None:
            passed: list[tuple[Prepared, float | None]] = [(p, None) for p in prepared]
        else:
            outcomes, screened = screen(prepared, gate)
            passed = list(screened)
        tensors = [p.image.tensor for p, _ in passed]
        predictions, maps, precision = predict_with_maps(tensors, predictor, heatmap) if passed else ([], [], None)
        inference_ms = (time.perf_counter() - started) * 1000.0 / len(prepared)
    except Exception as exc:
        logger.exception("inference failed for jobs %s", [p.job.id for p in prepared])
        return [Failed.of(p.job, exc, p.identifiers) for p in prepared]
    for (item, typicality), prediction, coarse in zip(passed, predictions, maps, strict=True):
        flagged, reason = flag_for(prediction.probabilities, triage)
        outcomes.append(
            Classified(
                item.job,
                prediction,
                item.evidence,
                item.preprocess_ms,
                inference_ms,
                flagged,
                reason,
                predictor,
                item.thumbnail,
                typicality,
                item.identifiers,
                heatmap=coarse,
                precision=precision,
                display=item.display if coarse is not None else None,
            )
        )
    return outcomes


_heatmap_failures = 0
"""Heatmap passes that failed in this process: the first is logged with its traceback, the others in one line."""


def predict_with_maps(
    tensors: Sequence[Any], predictor: Predictor, heatmap: GradCAMHeatmap | None
) -> tuple[list[Prediction], list[Any], str]:
    """The predictions of ``tensors``, a coarse map for each (None without ``heatmap``), and the precision that
    produced the labels. With ``heatmap`` one float32 pass yields both: its logits, divided by the checkpoint's
    temperature as the predictor does, give the probabilities, so the label is the one the map explains. Should that
    pass fail, the predictor classifies without maps (the map is never worth a classification)."""
    global _heatmap_failures
    if heatmap is not None:
        try:
            import torch

            from cxr_triage.ml.inference import Prediction

            coarse = heatmap.coarse(torch.stack(list(tensors)))
            probabilities = torch.softmax(coarse.logits.float() / predictor.temperature, dim=1)
            names = predictor.class_names
            predictions = [
                Prediction(names[int(row.argmax())], {n: float(p) for n, p in zip(names, row, strict=True)})
                for row in probabilities
            ]
            return predictions, list(coarse.maps), "float32"
        except Exception:
            _heatmap_failures += 1
            if _heatmap_failures == 1:
                logger.exception("the heatmap pass failed; these images are classified without a map")
            else:
                logger.error("the heatmap pass failed again (%d times); classified without a map", _heatmap_failures)
    return predictor.predict(tensors), [None] * len(tensors), predictor.precision


def thumbnail_png(tensor: Any, header: Dataset) -> bytes | None:
    """The model's input (the preprocessed 224x224 pixels, first channel) as an 8-bit grey PNG, for the worklist.

    None when the header says the pixels carry burned-in annotation (``BurnedInAnnotation`` YES), which may be
    patient data: the worklist then shows no picture.
    """
    if str(header.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        return None
    import io

    import numpy as np
    from PIL import Image

    # numpy, not torch: torch spreads these small operations over its threads, which costs more than they do
    grey = np.rint(np.clip(tensor[0].numpy(), 0.0, 1.0) * 255.0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, "PNG")
    return buffer.getvalue()


def chunk_sizes(count: int, limit: int) -> list[int]:
    """Split ``count`` jobs into the fewest chunks of at most ``limit``, as even as possible (5, 4 -> 3, 2)."""
    if count <= 0:
        return []
    chunks = -(-count // max(1, limit))
    return [count // chunks + (1 if i < count % chunks else 0) for i in range(chunks)]
