"""What a retraining run learns from: the radiologists' labels new since the last decided run (``collect_feedback``)
and the manifest the training subprocess reads (``write_manifest``). Reads only; the job
(``cxr_triage.retrain.retraining``) records on its run which feedback it used (``feedback_to_id``), which moves the
watermark once the run is promoted or rejected.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cxr_triage import CLASS_NAMES
from cxr_triage.core import db
from cxr_triage.files import write_atomic


@dataclass(frozen=True)
class Collected:
    """The new labelled images of a run."""

    rows: list[tuple[str, str, str]]  # (image path, label, study instance UID)
    feedback_ids: list[int]
    studies: int
    after_id: int
    to_id: int


def feedback_watermark(session: Session) -> int:
    """Feedback ids up to this were used by a promoted or rejected run (0: none yet)."""
    done = (db.RETRAIN_PROMOTED, db.RETRAIN_REJECTED)
    value = session.scalar(select(func.max(db.RetrainRun.feedback_to_id)).where(db.RetrainRun.state.in_(done)))
    return int(value or 0)


def collect_feedback(session: Session) -> Collected:
    """The latest label of every study whose latest feedback is newer than the watermark, one row per classified
    image whose model input (thumbnail) is on disk."""
    after = feedback_watermark(session)
    to_id = int(session.scalar(select(func.max(db.Feedback.id))) or 0)
    latest_ids = select(func.max(db.Feedback.id)).where(db.Feedback.id <= to_id).group_by(db.Feedback.study_id)
    latest = session.scalars(
        select(db.Feedback).where(db.Feedback.id.in_(latest_ids), db.Feedback.id > after).order_by(db.Feedback.id)
    ).all()
    by_study = {row.study_id: row for row in latest}
    rows: list[tuple[str, str, str]] = []
    if by_study:
        instances = session.execute(
            select(db.Instance.study_id, db.Instance.thumbnail_path, db.Instance.study_instance_uid)
            .where(db.Instance.study_id.in_(list(by_study)), db.Instance.thumbnail_path.is_not(None))
            .order_by(db.Instance.id)
        ).all()
        for study_id, path, study_uid in instances:
            if by_study[study_id].label_after in CLASS_NAMES and Path(path).is_file():
                rows.append((str(Path(path).resolve()), by_study[study_id].label_after, study_uid))
    return Collected(rows, [row.id for row in latest], len(by_study), after, to_id)


def write_manifest(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """The training module's manifest CSV (the format of the worklist's feedback export)."""
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "label", "group", "patient_id", "source"])
    for image, label, study_uid in rows:
        writer.writerow([image, label, f"study:{study_uid}", "", "feedback"])
    return write_atomic(path, out.getvalue().encode("utf-8"))
