"""The database: SQLAlchemy 2 models, engine and session helpers, and the schema-revision check.

SQLite (the default) runs in WAL mode with a busy timeout and foreign keys on, and every transaction opens with
``BEGIN IMMEDIATE``: a transaction that reads and later writes can otherwise fail with SQLITE_BUSY without
waiting, and the queue claim must be atomic across processes. PostgreSQL (``postgresql+psycopg://``) claims
jobs with ``SELECT ... FOR UPDATE SKIP LOCKED`` so that workers on several hosts never take the same instance.

The schema is owned by the Alembic migrations in ``cxr_triage/migrations``; ``schema_state`` says whether a
database is empty, current or behind, and ``upgrade`` applies the migrations programmatically (no alembic.ini).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    Boolean,
    ColumnElement,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
    type_coerce,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.hybrid import hybrid_property
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker
from sqlalchemy.sql import Select

from cxr_triage import log_name
from cxr_triage.core.states import DeliveryState, InstanceState, ModelState, RetrainState, StudyState

logger = logging.getLogger(log_name(__name__))

MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long an SQLite connection waits for another writer before failing."""

# The states (``cxr_triage.core.states``) under the names the code reads them by: ``db.DONE`` is InstanceState.DONE.
QUEUED, PROCESSING, DONE, REFUSED, FAILED = InstanceState
FORWARD_PENDING, FORWARD_SENT, FORWARD_DEAD, FORWARD_SUPERSEDED = DeliveryState
MODEL_CANDIDATE, MODEL_CHAMPION, MODEL_RETIRED = MODEL_STATES = tuple(ModelState)
RETRAIN_RUNNING, RETRAIN_SKIPPED, RETRAIN_FAILED, RETRAIN_REJECTED, RETRAIN_PROMOTED = RetrainState
TERMINAL_STATES = (DONE, REFUSED, FAILED)
"""The states an instance ends in."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone: stored naive UTC, read back aware)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use timezone-aware UTC")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: UTCDateTime, dict[str, Any]: JSON}


class Study(Base):
    """One study, aggregated after ``[worker] study_quiet_seconds`` without new instances."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16), default=StudyState.OPEN)  # open | complete
    first_received_at: Mapped[dt.datetime]
    last_received_at: Mapped[dt.datetime]
    completed_at: Mapped[dt.datetime | None]
    label: Mapped[str | None] = mapped_column(String(32))
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    flag_reason: Mapped[str | None] = mapped_column(Text)
    summary: Mapped[dict[str, Any] | None]
    accession_number: Mapped[str | None] = mapped_column(String(64))
    priority: Mapped[str | None] = mapped_column(String(16))
    """The worklist priority (``cxr_triage.triage.flags``): urgent, priority, review or routine; null until a result."""
    priority_rule: Mapped[str | None] = mapped_column(String(32))
    priority_reason: Mapped[str | None] = mapped_column(Text)
    priority_thresholds: Mapped[dict[str, Any] | None]
    priority_model_version: Mapped[str | None] = mapped_column(String(128))
    priority_final: Mapped[bool] = mapped_column(Boolean, default=False)
    """True once the study was aggregated after its quiet period; a new instance makes it provisional again."""
    priority_updated_at: Mapped[dt.datetime | None]

    instances: Mapped[list[Instance]] = relationship(back_populates="study")
    feedback: Mapped[list[Feedback]] = relationship(back_populates="study", order_by="Feedback.id")


class Instance(Base):
    """A received SOP instance and its job state (the queue is this table)."""

    __tablename__ = "instances"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "sha256", name="uq_instances_sop_sha256"),
        Index("ix_instances_status_id", "status", "id"),
        Index("ix_instances_received_at", "received_at"),
        Index("ix_instances_spool_purge", "spool_removed_at", "completed_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    spool_path: Mapped[str] = mapped_column(String(1024), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[dt.datetime]
    status: Mapped[str] = mapped_column(String(16), default=QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    interruptions: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Attempts during which the worker process holding the job died; such a job is processed alone."""
    lease_until: Mapped[dt.datetime | None]
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    error: Mapped[str | None] = mapped_column(Text)
    completed_at: Mapped[dt.datetime | None]
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    flag_reason: Mapped[str | None] = mapped_column(Text)
    spool_removed_at: Mapped[dt.datetime | None]
    """When the retention policy deleted the spool file (``[storage] spool_retention_days``); null while kept."""
    thumbnail_path: Mapped[str | None] = mapped_column(String(1024))
    """A 224x224 PNG of the classified pixels (the model's input), for the worklist; null without one."""
    heatmap_path: Mapped[str | None] = mapped_column(String(1024))
    """The Grad-CAM map of the predicted class at the encoder's grid (``cxr_triage.ml.heatmap.save_coarse``), for
    the study page and the heatmap object; null when none was built."""
    identifiers: Mapped[dict[str, Any] | None]
    """The patient and order identifiers read from the header when the instance was processed, for the outputs
    that name the patient (``outputs.hl7report.recorded_identifiers``); null when the header could not be read."""

    study: Mapped[Study] = relationship(back_populates="instances")
    predictions: Mapped[list[PredictionRecord]] = relationship(
        back_populates="instance", order_by="PredictionRecord.id"
    )
    refusals: Mapped[list[RefusalRecord]] = relationship(back_populates="instance", order_by="RefusalRecord.id")
    sr_documents: Mapped[list[SRDocument]] = relationship(back_populates="instance", order_by="SRDocument.id")


class PredictionRecord(Base):
    """One classification of an instance: the label, the probabilities and the model that made them."""

    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    label: Mapped[str] = mapped_column(String(32))
    probabilities: Mapped[dict[str, Any]]
    model_version: Mapped[str] = mapped_column(String(128))
    model_sha256: Mapped[str] = mapped_column(String(64))
    preprocess_ms: Mapped[float] = mapped_column(Float)
    inference_ms: Mapped[float] = mapped_column(Float)
    total_ms: Mapped[float] = mapped_column(Float)
    device: Mapped[str] = mapped_column(String(32))
    precision: Mapped[str | None] = mapped_column(String(16))
    """``float32`` or ``bfloat16`` (``cxr_triage.ml.precision``); null for predictions made before it was recorded."""
    typicality: Mapped[float | None] = mapped_column(Float)
    """The typicality gate's score (``cxr_triage.ml.gate``); null when no gate ran."""
    created_at: Mapped[dt.datetime]

    instance: Mapped[Instance] = relationship(back_populates="predictions")


class RefusalRecord(Base):
    """Why an instance was not classified (a ``cxr_triage.ml.preprocess.Refusal``, as stored)."""

    __tablename__ = "refusals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    code: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text)
    attribute: Mapped[str | None] = mapped_column(String(64))
    typicality: Mapped[float | None] = mapped_column(Float)
    """The typicality gate's score when the gate refused the image (code ``atypical``)."""
    created_at: Mapped[dt.datetime]

    instance: Mapped[Instance] = relationship(back_populates="refusals")


class SRDocument(Base):
    """A Structured Report written for one classified instance."""

    __tablename__ = "sr_documents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024))
    model_version: Mapped[str] = mapped_column(String(128))
    previous_sr_id: Mapped[int | None] = mapped_column(ForeignKey("sr_documents.id"))
    created_at: Mapped[dt.datetime]
    heatmap_sop_instance_uid: Mapped[str | None] = mapped_column(String(64), unique=True)
    """The heatmap object the SR references (``outputs.heatmapobject``), filed beside it in ``sr_dir`` and sent in
    the SR's forwards, before it; null without one. Its series and path follow."""
    heatmap_series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    heatmap_path: Mapped[str | None] = mapped_column(String(1024))

    instance: Mapped[Instance] = relationship(back_populates="sr_documents")
    forwards: Mapped[list[Forward]] = relationship(back_populates="sr", order_by="Forward.id")


class Forward(Base):
    """Forwarding of one SR to one destination: attempts so far, state and when to try next."""

    __tablename__ = "forwards"
    __table_args__ = (Index("ix_forwards_state_next", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sr_id: Mapped[int] = mapped_column(ForeignKey("sr_documents.id"), index=True)
    destination: Mapped[str] = mapped_column(String(300))  # AE@host:port
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default=FORWARD_PENDING)
    status: Mapped[int | None] = mapped_column(Integer)  # last DIMSE status, None when no answer came
    next_attempt_at: Mapped[dt.datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]

    sr: Mapped[SRDocument] = relationship(back_populates="forwards")


class DicomwebStore(Base):
    """STOW-RS of one SR to one ``[dicomweb] destinations`` entry (``cxr_triage.outputs.dicomweb``), named by its
    ``name``: attempts so far, state (pending, sent, dead) and when to try next, like ``Forward``."""

    __tablename__ = "dicomweb_stores"
    __table_args__ = (Index("ix_dicomweb_stores_state_next", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sr_id: Mapped[int] = mapped_column(ForeignKey("sr_documents.id"), index=True)
    destination: Mapped[str] = mapped_column(String(300))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default=FORWARD_PENDING)
    status: Mapped[int | None] = mapped_column(Integer)  # last HTTP status, None when no answer came
    next_attempt_at: Mapped[dt.datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]


class _StudyDelivery:
    """Columns of a study's result on its way to one destination (``cxr_triage.outputs.delivery``): attempts so
    far, state (pending, sent, dead, superseded) and when to try next."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    destination: Mapped[str] = mapped_column(String(300))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default=FORWARD_PENDING)
    next_attempt_at: Mapped[dt.datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]


class HL7Message(_StudyDelivery, Base):
    """An HL7 v2.5.1 ORU^R01 with a finished study's result for one ``[hl7] destinations`` entry
    (``cxr_triage.outputs.hl7``). ``message`` is the encoded message, sent as it is on every attempt (it holds the
    patient's identifiers and name); null when it could not be built (the row is dead then, ``last_error`` says why)."""

    __tablename__ = "hl7_messages"
    __table_args__ = (Index("ix_hl7_messages_state_next", "state", "next_attempt_at"),)

    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    control_id: Mapped[str] = mapped_column(String(20), unique=True)  # MSH-10, echoed in the ACK's MSA-2
    result_status: Mapped[str] = mapped_column(String(1))  # OBR-25: F (final) or C (corrected)
    message: Mapped[str | None] = mapped_column(Text)
    ack_code: Mapped[str | None] = mapped_column(String(2))  # MSA-1 of the last answer; None when none came


class OrthancMetadata(_StudyDelivery, Base):
    """A finished study's priority as Orthanc user metadata, for one ``[forward] destinations`` entry that has an
    ``orthanc_url`` (``cxr_triage.outputs.orthanc``); ``destination`` names that entry (``AE@host:port``)."""

    __tablename__ = "orthanc_metadata"
    __table_args__ = (Index("ix_orthanc_metadata_state_next", "state", "next_attempt_at"),)

    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    values: Mapped[dict[str, Any]]  # metadata name -> value


class FHIRReport(_StudyDelivery, Base):
    """A finished study's FHIR R4 transaction Bundle (DiagnosticReport, Observations, Device) for one ``[fhir]
    destinations`` entry (``cxr_triage.outputs.fhir``); ``destination`` is its base URL. ``bundle`` is the JSON sent
    as it is on every attempt; null when it could not be built (the row is dead then, ``last_error`` says why)."""

    __tablename__ = "fhir_reports"
    __table_args__ = (Index("ix_fhir_reports_state_next", "state", "next_attempt_at"),)

    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    bundle: Mapped[str | None] = mapped_column(Text)
    http_status: Mapped[int | None] = mapped_column(Integer)  # of the last answer; None when none came


class ModelVersion(Base):
    """One classifier file (by sha256) in the model registry (``cxr_triage.ml.registry``): where it came from, how it
    scored on the fixed evaluation set, and its state (candidate, champion, retired; one champion at most)."""

    __tablename__ = "model_versions"
    __table_args__ = (
        Index(
            "uq_model_versions_one_champion",
            "state",
            unique=True,
            sqlite_where=text("state = 'champion'"),
            postgresql_where=text("state = 'champion'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[str] = mapped_column(String(128))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(String(1024))
    registered_at: Mapped[dt.datetime]
    metrics: Mapped[dict[str, Any] | None]
    """Metrics on the fixed evaluation set (for the shipped model: its training run's test split)."""
    state: Mapped[str] = mapped_column(String(16), default=MODEL_CANDIDATE)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    """The version this one was trained from (fine-tuned), if any."""
    previous_champion_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    """The champion this one replaced when it was last promoted: where ``models rollback`` goes back to."""
    training_data: Mapped[dict[str, Any] | None]
    """What it was trained on, e.g. ``{"feedback_ids": [...], "study_uids": [...], "base_data": ..., "replay": n}``."""
    config: Mapped[dict[str, Any] | None]
    promoted_at: Mapped[dt.datetime | None]
    retired_at: Mapped[dt.datetime | None]
    state_reason: Mapped[str | None] = mapped_column(Text)
    """Why it is in its state (the promotion's, rollback's or rejection's reason)."""

    @hybrid_property
    def active(self) -> bool:
        """Whether this is the champion (the name before the registry had states)."""
        return self.state == MODEL_CHAMPION

    @active.inplace.setter
    def _active_setter(self, value: bool) -> None:
        self.state = MODEL_CHAMPION if value else MODEL_RETIRED

    @active.inplace.expression
    @classmethod
    def _active_expression(cls) -> ColumnElement[bool]:
        return type_coerce(cls.state == MODEL_CHAMPION, Boolean)


class Feedback(Base):
    """A radiologist's confirmation or correction of a study's label (what retraining learns from)."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    username: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime]
    label_before: Mapped[str | None] = mapped_column(String(32))
    label_after: Mapped[str] = mapped_column(String(32))
    model_version: Mapped[str | None] = mapped_column(String(128))
    comment: Mapped[str | None] = mapped_column(Text)

    study: Mapped[Study] = relationship(back_populates="feedback")


class User(Base):
    """A worklist user; the password is stored as an argon2 hash only."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[dt.datetime]


class WebSession(Base):
    """A logged-in browser: the sha256 of its cookie token, its CSRF token and when it expires."""

    __tablename__ = "web_sessions"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    username: Mapped[str] = mapped_column(String(64), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]


class AuditEntry(Base):
    """One write through the worklist (log in and out, feedback), with who, when and from where."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime]
    username: Mapped[str | None] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str | None] = mapped_column(String(128))
    detail: Mapped[dict[str, Any] | None]
    remote_addr: Mapped[str | None] = mapped_column(String(64))


class Conflict(Base):
    """The same SOP Instance UID arrived again with different bytes; both instances are kept."""

    __tablename__ = "conflicts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    existing_instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"))
    new_instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"))
    existing_sha256: Mapped[str] = mapped_column(String(64))
    new_sha256: Mapped[str] = mapped_column(String(64))
    detected_at: Mapped[dt.datetime]


class Lease(Base):
    """A named lock held by one process until ``expires_at`` (``cxr_triage.core.schedlock``): its holder renews it while
    it lives, so the lock of a holder that died ends by itself once it expires."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(200))
    acquired_at: Mapped[dt.datetime | None]
    expires_at: Mapped[dt.datetime | None]


class RetrainRun(Base):
    """One run of the retraining job: what it trained on, both models' metrics on the fixed evaluation set, and
    its outcome (running -> skipped | failed | rejected | promoted) with the reason."""

    __tablename__ = "retrain_runs"
    __table_args__ = (Index("ix_retrain_runs_state", "state"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trigger: Mapped[str] = mapped_column(String(16))  # schedule | manual
    holder: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16), default=RETRAIN_RUNNING)
    step: Mapped[str | None] = mapped_column(String(300))
    """What the run is doing (or did last): collecting feedback, training epoch 2/3, deciding, ..."""
    reason: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]
    finished_at: Mapped[dt.datetime | None]
    feedback_after_id: Mapped[int | None] = mapped_column(Integer)
    """Feedback rows with a larger id were new to this run (the last promoted or rejected run's ``feedback_to_id``)."""
    feedback_to_id: Mapped[int | None] = mapped_column(Integer)
    new_studies: Mapped[int | None] = mapped_column(Integer)
    new_images: Mapped[int | None] = mapped_column(Integer)
    replay_images: Mapped[int | None] = mapped_column(Integer)
    eval_images: Mapped[int | None] = mapped_column(Integer)
    champion_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    candidate_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    champion_metrics: Mapped[dict[str, Any] | None]
    challenger_metrics: Mapped[dict[str, Any] | None]
    details: Mapped[dict[str, Any] | None]
    """The decision's figures, wall seconds, the run's folder and log, the training command."""


# --- engine and sessions -------------------------------------------------------------------------------------


_R = TypeVar("_R", PredictionRecord, RefusalRecord, SRDocument)


def newest_ids(record: type[_R], instance_ids: Collection[int] | None = None) -> Select[tuple[int, int]]:
    """``(instance_id, id)`` of each instance's newest ``record`` row (prediction, refusal, SR), of the instances in
    ``instance_ids`` when given: an instance's latest record is its row with the highest id (another attempt or a
    re-classification adds a row and changes none)."""
    query = select(record.instance_id.label("instance_id"), func.max(record.id).label("id"))
    if instance_ids is not None:
        query = query.where(record.instance_id.in_(list(instance_ids)))
    return query.group_by(record.instance_id)


def newest(session: Session, record: type[_R], instance_ids: Collection[int]) -> dict[int, _R]:
    """Instance id -> its newest ``record`` row (``newest_ids``) for those of ``instance_ids`` that have one."""
    if not instance_ids:
        return {}
    ids = newest_ids(record, instance_ids).subquery()
    return {row.instance_id: row for row in session.scalars(select(record).join(ids, record.id == ids.c.id))}


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def make_engine(url: str, echo: bool = False, create_dirs: bool = True) -> Engine:
    """An engine for ``url``; for SQLite files, WAL + busy timeout + foreign keys and BEGIN IMMEDIATE."""
    sqlite_file = _sqlite_file(url)
    if sqlite_file is not None and create_dirs:
        sqlite_file.parent.mkdir(parents=True, exist_ok=True)
    is_sqlite = make_url(url).get_backend_name() == "sqlite"
    kwargs: dict[str, Any] = {"echo": echo}
    if not is_sqlite:
        kwargs["pool_pre_ping"] = True
    engine = create_engine(url, **kwargs)
    if is_sqlite:

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
            conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def read_only(session: Session) -> Session:
    """Mark a fresh session's transaction as a read: on SQLite a deferred BEGIN, which takes no write lock."""
    session.connection(execution_options={"sqlite_begin": "DEFERRED"})
    return session


@contextmanager
def read_session(engine: Engine) -> Iterator[Session]:
    """A session for reading only: on SQLite a deferred transaction, so readers never hold the write lock."""
    with engine.connect() as conn:
        conn = conn.execution_options(sqlite_begin="DEFERRED")
        with Session(bind=conn) as session:
            yield session


# --- schema revision -----------------------------------------------------------------------------------------


def alembic_config(engine: Engine) -> Any:
    import sys

    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig(stdout=sys.stdout)  # the current stdout, not the one at import time
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def head_revision(engine: Engine) -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(engine)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def missing_sqlite_file(engine: Engine) -> Path | None:
    """The SQLite file of ``engine`` when it does not exist (connecting would fail or create an empty one)."""
    sqlite_file = _sqlite_file(engine.url.render_as_string(hide_password=False))
    return sqlite_file if sqlite_file is not None and not sqlite_file.exists() else None


def schema_state(engine: Engine) -> str:
    """``"missing"`` (an SQLite file that does not exist), ``"empty"`` (no tables at all), ``"current"``,
    ``"behind"`` or ``"ahead"`` (unknown revision)."""
    if missing_sqlite_file(engine) is not None:
        return "missing"
    with engine.connect() as conn:
        tables = inspect(conn).get_table_names()
    if not tables:
        return "empty"
    current, head = current_revision(engine), head_revision(engine)
    if current == head:
        return "current"
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    script = ScriptDirectory.from_config(alembic_config(engine))
    try:
        known = current is None or script.get_revision(current) is not None
    except CommandError:  # "Can't locate revision": written by a newer release
        known = False
    return "behind" if known else "ahead"


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the migrations up to ``revision`` (on PostgreSQL under an advisory lock, so two starters can't race)."""
    from alembic import command

    cfg = alembic_config(engine)
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(72431)"))
            conn.commit()
        try:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            conn.commit()
        finally:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_unlock(72431)"))
                conn.commit()


def describe_url(engine: Engine) -> str:
    """The URL without its password, for logs and messages."""
    return engine.url.render_as_string(hide_password=True)
