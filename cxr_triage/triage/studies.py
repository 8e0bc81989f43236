"""Studies: an instance's worklist flag, and a study's aggregate once it has been quiet long enough.

A study can arrive over several associations, so each instance is classified on its own and the study is
aggregated after ``[worker] study_quiet_seconds`` without new instances, like Orthanc's StableAge or dcmtk's
``--eostudy-timeout``: counts, the worst label, the highest probability of each class and the flag. A study that
gets another instance later is opened again (``cxr_triage.queue.jobqueue.enqueue``) and aggregated again.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import log_name
from cxr_triage.core import db
from cxr_triage.core.settings import TriageSettings
from cxr_triage.core.states import StudyState
from cxr_triage.triage import flags

logger = logging.getLogger(log_name(__name__))

AGGREGATE_BATCH = 500
"""Studies aggregated per round."""


def study_summary(session: Session, instances: Sequence[db.Instance]) -> dict[str, Any]:
    """Counts, the worst label, the highest probability of each class and the flag over a study's instances."""
    counts = {status: 0 for status in db.TERMINAL_STATES}
    newest = db.newest(session, db.PredictionRecord, [i.id for i in instances])
    reasons = []
    for instance in instances:
        counts[instance.status] = counts.get(instance.status, 0) + 1
        if instance.id in newest and instance.flagged and instance.flag_reason:
            reasons.append(f"{instance.sop_instance_uid}: {instance.flag_reason}")
    worst, max_probs = flags.worst_and_highest(newest[i.id] for i in instances if i.id in newest)
    label = worst.label if worst is not None else None
    return {
        "instances": len(instances),
        "classified": counts.get(db.DONE, 0),
        "refused": counts.get(db.REFUSED, 0),
        "failed": counts.get(db.FAILED, 0),
        "label": label,
        "max_probabilities": max_probs if label is not None else None,
        "flagged": bool(reasons),
        "flag_reason": "; ".join(reasons) or None,
    }


def _instance_flag(session: Session, instance: db.Instance, triage: TriageSettings) -> flags.Flag | None:
    if instance.status == db.DONE:
        prediction = db.newest(session, db.PredictionRecord, [instance.id]).get(instance.id)
        if prediction is not None:
            return flags.instance_flag(prediction.probabilities, triage, prediction.model_version)
    if instance.status == db.REFUSED:
        refusal = db.newest(session, db.RefusalRecord, [instance.id]).get(instance.id)
        return flags.refused_flag(refusal.reason if refusal else "not a frontal chest radiograph", triage)
    if instance.status == db.FAILED:
        return flags.failed_flag(instance.error or "processing failed", triage)
    return None


def refresh_priority(
    session: Session, study: db.Study, triage: TriageSettings, final: bool, now: dt.datetime | None = None
) -> flags.Flag | None:
    """Re-evaluate ``study``'s priority from its instances' latest outcomes (``cxr_triage.triage.flags``) and store it
    with its rule, thresholds and model version; ``final`` once the study has been aggregated."""
    instances = session.scalars(select(db.Instance).where(db.Instance.study_id == study.id)).all()
    flag = flags.most_urgent(f for i in instances if (f := _instance_flag(session, i, triage)) is not None)
    if flag is None:
        return None
    study.priority = flag.priority
    study.priority_rule = flag.rule
    study.priority_reason = flag.reason
    study.priority_thresholds = dict(flag.thresholds)
    study.priority_model_version = flag.model_version
    study.priority_final = final
    study.priority_updated_at = now or db.utcnow()
    return flag


def refresh_priorities(session: Session, study_uids: Sequence[str], triage: TriageSettings) -> None:
    """Provisional priorities for the studies of a just-recorded chunk (inside the recorder's transaction)."""
    for study in session.scalars(select(db.Study).where(db.Study.study_instance_uid.in_(sorted(set(study_uids))))):
        refresh_priority(session, study, triage, final=study.status == StudyState.COMPLETE)


def aggregate_studies(
    sessions: sessionmaker[Session],
    quiet_seconds: float,
    now: dt.datetime | None = None,
    triage: TriageSettings | None = None,
    on_complete: Callable[[Session, db.Study, dt.datetime], object] | None = None,
) -> list[str]:
    """Complete open studies quiet for ``quiet_seconds`` whose instances are all finished; their UIDs. Their
    priority becomes final; ``on_complete`` is called for each in the same transaction (the housekeeping queues
    the results that go out per study: HL7, Orthanc metadata)."""
    now = now or db.utcnow()
    cutoff = now - dt.timedelta(seconds=quiet_seconds)
    completed: list[str] = []
    with sessions() as session, session.begin():
        studies = session.scalars(
            select(db.Study)
            .where(db.Study.status == StudyState.OPEN, db.Study.last_received_at <= cutoff)
            .order_by(db.Study.id)
            .limit(AGGREGATE_BATCH)
            .with_for_update(skip_locked=True)
        ).all()
        for study in studies:
            instances = session.scalars(select(db.Instance).where(db.Instance.study_id == study.id)).all()
            if any(i.status not in db.TERMINAL_STATES for i in instances):
                continue
            summary = study_summary(session, instances)
            study.summary = summary
            study.label = summary["label"]
            study.flagged = summary["flagged"]
            study.flag_reason = summary["flag_reason"]
            study.status = StudyState.COMPLETE
            study.completed_at = now
            refresh_priority(session, study, triage or TriageSettings(), final=True, now=now)
            if on_complete is not None:
                on_complete(session, study, now)
            completed.append(study.study_instance_uid)
    for uid in completed:
        logger.info("study %s complete", uid)
    return completed
