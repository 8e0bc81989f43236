"""The states a row goes through, one enum per column, as highdicom writes its coded values (``sr/enum.py``).

Each is a ``StrEnum``: a member is its string (``InstanceState.DONE == "done"``), so the database stores and
returns plain strings, JSON writes them as they are, and a value read back compares equal to its member. Who moves
a row from one state to the next is said in docs/ARCHITECTURE.md ("Where each state changes") and in the module
that does it (``cxr_triage.queue.jobqueue`` for instances, ``cxr_triage.outputs.delivery`` for outgoing rows).
"""

from __future__ import annotations

from enum import StrEnum


class InstanceState(StrEnum):
    """``instances.status``: queued -> processing -> done | refused | failed (a lease expiry puts processing back
    to queued)."""

    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    REFUSED = "refused"
    FAILED = "failed"


class StudyState(StrEnum):
    """``studies.status``: open while instances arrive or wait, complete once aggregated (open again when another
    instance arrives)."""

    OPEN = "open"
    COMPLETE = "complete"


class DeliveryState(StrEnum):
    """``state`` of every outgoing row (SR forwards, HL7 messages, Orthanc metadata updates)."""

    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"
    SUPERSEDED = "superseded"
    """An HL7 message or Orthanc update not sent because a newer one of the same study replaced it."""


class ModelState(StrEnum):
    """``model_versions.state`` (``cxr_triage.ml.registry``): the workers run the one champion."""

    CANDIDATE = "candidate"
    CHAMPION = "champion"
    RETIRED = "retired"


class RetrainState(StrEnum):
    """``retrain_runs.state`` (``cxr_triage.retrain.retraining``)."""

    RUNNING = "running"
    SKIPPED = "skipped"
    FAILED = "failed"
    REJECTED = "rejected"
    PROMOTED = "promoted"
