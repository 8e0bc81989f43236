"""What the worklist shows, as plain values: the page and the JSON API serve the same records.

Studies are sorted by priority (urgent, priority, review, routine; studies without a result yet last); within
urgent and priority the most probable first (the probability of the rule that raised it), then by arrival, oldest
first. Each record says why in words (``reason_text``) with the one probability that matters (``key_probability``,
read from the same image as the reason), whether a radiologist has read it (``read``: confirmed or corrected) and,
with ``[web] viewer_url``, a link to open the study in the PACS viewer. Each record holds its priority with the
rule, reason, thresholds and model version that raised it (``final`` once the study has been quiet for
``[worker] study_quiet_seconds``), the worst label and the
highest probability of each class, the status (queued, processing, done or refused with the reasons), and the
patient fields ``[web] patient_fields`` allows: the accession number is stored at receipt; the others are read
from the received file's header while the spool keeps it.

Feedback (a radiologist confirming or correcting a study's label) is stored with who, when, the label before and
after and the model version; ``feedback_manifest`` exports it as the CSV the training module reads (``path,label,
group,patient_id,source``), pointing at the worklist's 224x224 PNGs of the classified pixels.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from sqlalchemy import select
from sqlalchemy.orm import Session

from cxr_triage import CLASS_NAMES
from cxr_triage.core import db
from cxr_triage.core.settings import WebSettings
from cxr_triage.triage.flags import PRIORITIES, RANK, worst_and_highest

MAX_ROWS = 500
"""Most studies one worklist request returns."""
STATUS_NAMES = {db.DONE: "done", db.REFUSED: "refused", db.FAILED: "failed"}


class FeedbackError(ValueError):
    """Feedback that cannot be stored (unknown study or label)."""


_R = TypeVar("_R", db.PredictionRecord, db.RefusalRecord)


CLASS_WORDS = {"covid": "COVID-19", "pneumonia": "pneumonia", "normal": "normal"}
STATUSES = ("queued", "processing", "done", "refused", "failed")
READ_STATES = ("unread", "read")
_PROBABILITY = re.compile(r"P\((\w+)\)=([0-9.]+)")


def key_probability(reason: str | None) -> dict[str, Any] | None:
    """The probability behind a priority: the first ``P(class)=value`` of its reason (the image that raised it)."""
    found = _PROBABILITY.search(reason or "")
    return {"class": found.group(1), "value": float(found.group(2))} if found else None


def reason_text(rule: str | None, reason: str | None, thresholds: dict[str, float] | None) -> str:
    """A priority's reason in words, for a radiologist rather than an engineer."""
    key, limits = key_probability(reason), thresholds or {}
    if not rule:
        return "no result yet"
    if rule in ("covid", "pneumonia") and key:
        limit = limits.get(f"{rule}_threshold")
        over = f" (threshold {limit:.2f})" if limit is not None else ""
        return f"{CLASS_WORDS[rule]} suspected: probability {key['value']:.2f}{over}"
    if rule == "low-confidence" and key:
        return f"model unsure: best guess {CLASS_WORDS.get(key['class'], key['class'])} at {key['value']:.2f}"
    if rule == "refused":
        return "image not analysed: " + (reason or "").removeprefix("refused: ")
    if rule == "failed":
        return "analysis failed: " + (reason or "").removeprefix("failed: ")
    if key:
        return f"no finding over threshold: most likely {CLASS_WORDS.get(key['class'], key['class'])}"
    return reason or rule


def viewer_link(template: str, uid: str) -> str | None:
    """``[web] viewer_url`` for this study (``{StudyInstanceUID}`` replaced), None when not configured."""
    return template.replace("{StudyInstanceUID}", quote(uid, safe="")) if template else None


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def patient_fields(study: db.Study, instances: Sequence[db.Instance], web: WebSettings) -> dict[str, str]:
    """The allowed patient fields of a study (``[web] patient_fields``), nothing else."""
    shown: dict[str, str] = {}
    wanted = [f for f in web.patient_fields if f != "AccessionNumber"]
    if "AccessionNumber" in web.patient_fields:
        shown["AccessionNumber"] = study.accession_number or ""
    if wanted:
        header = _first_header(instances)
        for keyword in wanted:
            value = header.get(keyword) if header is not None else None
            shown[keyword] = str(value) if value is not None else ""
    return shown


def _first_header(instances: Sequence[db.Instance]) -> Any:
    import pydicom

    for instance in instances:
        path = Path(instance.spool_path)
        if instance.spool_removed_at is None and path.is_file():
            try:
                return pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:  # an unreadable header shows empty fields, never an error page
                continue
    return None


def _status(instances: Sequence[db.Instance], refusals: dict[int, db.RefusalRecord]) -> tuple[str, list[str]]:
    states = Counter(i.status for i in instances)
    reasons = [refusals[i.id].reason for i in instances if i.status == db.REFUSED and i.id in refusals]
    reasons += [i.error for i in instances if i.status == db.FAILED and i.error]
    if states[db.QUEUED]:
        return "queued", reasons
    if states[db.PROCESSING]:
        return "processing", reasons
    if states[db.DONE]:
        return "done", reasons
    if states[db.REFUSED]:
        return "refused", reasons
    return "failed", reasons


def _summary(instances: Sequence[db.Instance], predictions: dict[int, db.PredictionRecord]) -> dict[str, Any]:
    worst, probabilities = worst_and_highest(predictions[i.id] for i in instances if i.id in predictions)
    return {
        "label": worst.label if worst else None,
        "probabilities": {k: round(v, 4) for k, v in probabilities.items()} if worst else None,
        "model_version": worst.model_version if worst else None,
    }


def study_record(
    session: Session,
    study: db.Study,
    instances: Sequence[db.Instance],
    predictions: dict[int, db.PredictionRecord],
    refusals: dict[int, db.RefusalRecord],
    web: WebSettings,
) -> dict[str, Any]:
    status, reasons = _status(instances, refusals)
    latest = study.feedback[-1] if study.feedback else None
    return {
        "study_instance_uid": study.study_instance_uid,
        "patient": patient_fields(study, instances, web),
        "priority": study.priority,
        "priority_rule": study.priority_rule,
        "priority_reason": study.priority_reason,
        "priority_thresholds": study.priority_thresholds,
        "priority_model_version": study.priority_model_version,
        "priority_final": bool(study.priority_final),
        "status": status,
        "reasons": reasons,
        "instances": len(instances),
        **_summary(instances, predictions),
        "received_at": _iso(study.first_received_at),
        "last_received_at": _iso(study.last_received_at),
        "feedback_label": latest.label_after if latest else None,
        "read": latest is not None,
        "reason_text": reason_text(study.priority_rule, study.priority_reason, study.priority_thresholds),
        "key_probability": key_probability(study.priority_reason),
        "viewer_url": viewer_link(web.viewer_url, study.study_instance_uid),
    }


def _sort_key(record: dict[str, Any]) -> tuple[int, float, str]:
    rank = RANK.get(record["priority"], len(PRIORITIES)) if record["priority"] else len(PRIORITIES)
    key = record["key_probability"]
    most_probable = -key["value"] if key and record["priority"] in ("urgent", "priority") else 0.0
    return rank, most_probable, record["received_at"] or ""


def worklist(
    session: Session,
    web: WebSettings,
    priority: str | None = None,
    since: dt.date | None = None,
    until: dt.date | None = None,
    status: str | None = None,
    read: str | None = None,
) -> list[dict[str, Any]]:
    """Studies in the module docstring's order, filtered by priority, arrival date (UTC), status and read state."""
    query = select(db.Study)
    if priority == "pending":
        query = query.where(db.Study.priority.is_(None))
    elif priority:
        query = query.where(db.Study.priority == priority)
    if since:
        query = query.where(db.Study.first_received_at >= dt.datetime.combine(since, dt.time(), dt.UTC))
    if until:
        end = dt.datetime.combine(until + dt.timedelta(days=1), dt.time(), dt.UTC)
        query = query.where(db.Study.first_received_at < end)
    studies = session.scalars(query.order_by(db.Study.first_received_at.desc()).limit(MAX_ROWS)).all()
    instances = session.scalars(
        select(db.Instance).where(db.Instance.study_id.in_([s.id for s in studies])).order_by(db.Instance.id)
    ).all()
    by_study: dict[int, list[db.Instance]] = {}
    for instance in instances:
        by_study.setdefault(instance.study_id, []).append(instance)
    ids = [i.id for i in instances]
    predictions, refusals = db.newest(session, db.PredictionRecord, ids), db.newest(session, db.RefusalRecord, ids)
    records = [study_record(session, s, by_study.get(s.id, []), predictions, refusals, web) for s in studies]
    records = [r for r in records if (not status or r["status"] == status) and (not read or _is(read, r["read"]))]
    return sorted(records, key=_sort_key)


def _is(read: str, done: bool) -> bool:
    return done if read == "read" else not done


def study_detail(session: Session, uid: str, web: WebSettings) -> dict[str, Any] | None:
    """One study with its instances (status, label, probabilities, reason, SR UIDs, whether its thumbnail, its
    received file and its heatmap are there) and feedback."""
    study = session.scalar(select(db.Study).where(db.Study.study_instance_uid == uid))
    if study is None:
        return None
    instances = session.scalars(
        select(db.Instance).where(db.Instance.study_id == study.id).order_by(db.Instance.id)
    ).all()
    ids = [i.id for i in instances]
    predictions, refusals = db.newest(session, db.PredictionRecord, ids), db.newest(session, db.RefusalRecord, ids)
    record = study_record(session, study, instances, predictions, refusals, web)
    srs: dict[int, list[str]] = {}
    for instance_id, sr_uid in session.execute(
        select(db.SRDocument.instance_id, db.SRDocument.sop_instance_uid)
        .where(db.SRDocument.instance_id.in_(ids))
        .order_by(db.SRDocument.id)
    ):
        srs.setdefault(instance_id, []).append(sr_uid)
    record["instance_list"] = [
        {
            "id": i.id,
            "sop_instance_uid": i.sop_instance_uid,
            "series_instance_uid": i.series_instance_uid,
            "status": STATUS_NAMES.get(i.status, i.status),
            "label": predictions[i.id].label if i.id in predictions else None,
            "probabilities": predictions[i.id].probabilities if i.id in predictions else None,
            "model_version": predictions[i.id].model_version if i.id in predictions else None,
            "typicality": _typicality(predictions.get(i.id), refusals.get(i.id)),
            "reason": refusals[i.id].reason if i.id in refusals else i.error,
            "sr_sop_instance_uids": srs.get(i.id, []),
            "thumbnail": i.thumbnail_path is not None and Path(i.thumbnail_path).is_file(),
            "radiograph": i.spool_removed_at is None and Path(i.spool_path).is_file(),
            "heatmap": bool(i.heatmap_path) and Path(str(i.heatmap_path)).is_file(),
            "received_at": _iso(i.received_at),
        }
        for i in instances
    ]
    record["feedback"] = [feedback_record(f, uid) for f in study.feedback]
    return record


def _typicality(prediction: db.PredictionRecord | None, refusal: db.RefusalRecord | None) -> float | None:
    """The typicality gate's score of an instance: from its prediction, else from the gate's refusal."""
    if prediction is not None:
        return prediction.typicality
    return refusal.typicality if refusal is not None else None


def thumbnail_path(session: Session, instance_id: int) -> Path | None:
    path = session.scalar(select(db.Instance.thumbnail_path).where(db.Instance.id == instance_id))
    return Path(path) if path and Path(path).is_file() else None


def feedback_record(row: db.Feedback, study_uid: str) -> dict[str, Any]:
    return {
        "id": row.id,
        "study_instance_uid": study_uid,
        "username": row.username,
        "created_at": _iso(row.created_at),
        "label_before": row.label_before,
        "label_after": row.label_after,
        "confirmed": row.label_before == row.label_after,
        "model_version": row.model_version,
        "comment": row.comment,
    }


def record_feedback(session: Session, uid: str, username: str, label: str, comment: str | None) -> dict[str, Any]:
    """Store a radiologist's label for a study: before (the model's worst label) and after, with the model."""
    if label not in CLASS_NAMES:
        raise FeedbackError(f"label must be one of {', '.join(CLASS_NAMES)}, not {label!r}")
    study = session.scalar(select(db.Study).where(db.Study.study_instance_uid == uid))
    if study is None:
        raise FeedbackError(f"no study {uid!r}")
    instances = session.scalars(select(db.Instance).where(db.Instance.study_id == study.id)).all()
    summary = _summary(instances, db.newest(session, db.PredictionRecord, [i.id for i in instances]))
    row = db.Feedback(
        study_id=study.id,
        username=username,
        created_at=db.utcnow(),
        label_before=summary["label"],
        label_after=label,
        model_version=summary["model_version"],
        comment=(comment or "").strip()[:2000] or None,
    )
    session.add(row)
    session.flush()
    return feedback_record(row, uid)


def feedback_list(session: Session) -> list[dict[str, Any]]:
    rows = session.execute(
        select(db.Feedback, db.Study.study_instance_uid)
        .join(db.Study, db.Feedback.study_id == db.Study.id)
        .order_by(db.Feedback.id)
    ).all()
    return [feedback_record(f, uid) for f, uid in rows]


def feedback_manifest(session: Session) -> str:
    """The latest label of every study with feedback, one row per classified image with a thumbnail, as the
    training module's manifest CSV (``python -m training pack --manifest FILE --root /``)."""
    latest: dict[int, db.Feedback] = {}
    for row in session.scalars(select(db.Feedback).order_by(db.Feedback.id)):
        latest[row.study_id] = row
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "label", "group", "patient_id", "source"])
    if latest:
        instances = session.execute(
            select(db.Instance.study_id, db.Instance.thumbnail_path, db.Instance.study_instance_uid)
            .where(db.Instance.study_id.in_(list(latest)), db.Instance.thumbnail_path.is_not(None))
            .order_by(db.Instance.id)
        ).all()
        for study_id, path, study_uid in instances:
            if Path(path).is_file():
                writer.writerow([path, latest[study_id].label_after, f"study:{study_uid}", "", "feedback"])
    return out.getvalue()
