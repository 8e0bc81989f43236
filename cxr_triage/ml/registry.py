"""The model registry: every classifier file (by sha256) in ``model_versions``, with its lineage, training data,
config, metrics on the fixed evaluation set and state: candidate, champion or retired. The workers run the one
champion (``cxr_triage.ml.modelstore``); ``cxr-triage models`` lists, promotes and rolls back
(``cxr_triage.commands.models``); the retraining job registers candidates, promotes or rejects them through this module.

State changes:

- ``register_candidate``: a new file, state candidate (idempotent by sha256);
- ``promote``: in one transaction the champion becomes retired and the given version champion; the old champion
  is remembered as the new one's ``previous_champion_id``;
- ``rollback``: the champion is retired and its ``previous_champion_id`` is champion again (repeated rollbacks go
  further back, as a stack);
- ``reject``: a candidate is retired with the reason;
- ``deploy_configured``: the ``[model] path`` (or bundled) file a worker finds, when the registry does not know it
  yet, is registered and promoted with the reason "configured" (an operator deploying a model by configuration);
  the very first model registered becomes the champion.

Every change happens under one lock, so that processes on several hosts sharing PostgreSQL cannot interleave: a
transaction-scoped advisory lock there (a ``SELECT ... FOR UPDATE`` of the champion row would not do: the second
promoter, woken after the first commits, finds that row no longer champion and would see no champion at all),
SQLite's ``BEGIN IMMEDIATE`` write lock here. A partial unique index allows one champion at most in any case.
Each promotion, rollback and rejection is also written to the ``audit`` table.

Reads (``champion``, ``list_versions``, ``find``) return ``RegisteredModel``: a frozen snapshot of a row, usable
after its session has closed.

Files: ``store_model_file`` copies a checkpoint into ``[model] models_dir`` as ``<sha256>.pt``, so that a version's
file never changes under its row and a rollback finds it. ``model_file`` finds a version's file: its recorded
path, else ``<models_dir>/<sha256>.pt`` (workers on several hosts: a shared ``models_dir``), checked by sha256.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import log_name
from cxr_triage.core import db
from cxr_triage.files import write_atomic

if TYPE_CHECKING:
    from cxr_triage.ml.checkpoint import LoadedModel

logger = logging.getLogger(log_name(__name__))

CANDIDATE, CHAMPION, RETIRED = db.MODEL_CANDIDATE, db.MODEL_CHAMPION, db.MODEL_RETIRED
REGISTRY_LOCK = 72432
"""PostgreSQL advisory lock key of registry changes (``db.upgrade`` uses 72431)."""
CONFIGURED = "configured"
"""The reason recorded when a worker promotes a new ``[model] path`` file."""


class RegistryError(ValueError):
    """A registry change that cannot be made (unknown version, missing file, no earlier champion, ...)."""


@dataclass(frozen=True)
class RegisteredModel:
    """A ``model_versions`` row as it was read."""

    id: int
    version: str
    sha256: str
    path: str
    state: str
    registered_at: dt.datetime
    promoted_at: dt.datetime | None
    retired_at: dt.datetime | None
    state_reason: str | None
    parent_id: int | None
    previous_champion_id: int | None
    metrics: dict[str, Any] | None
    training_data: dict[str, Any] | None
    config: dict[str, Any] | None

    @classmethod
    def of(cls, row: db.ModelVersion) -> RegisteredModel:
        return cls(
            id=row.id,
            version=row.version,
            sha256=row.sha256,
            path=row.path,
            state=row.state,
            registered_at=row.registered_at,
            promoted_at=row.promoted_at,
            retired_at=row.retired_at,
            state_reason=row.state_reason,
            parent_id=row.parent_id,
            previous_champion_id=row.previous_champion_id,
            metrics=row.metrics,
            training_data=row.training_data,
            config=row.config,
        )

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (timestamps as ISO 8601)."""
        values = dict(self.__dict__)
        for name in ("registered_at", "promoted_at", "retired_at"):
            moment = values[name]
            values[name] = moment.isoformat() if moment is not None else None
        return values


# --- files ---------------------------------------------------------------------------------------------------


def store_model_file(source: Path, models_dir: Path) -> Path:
    """Copy the checkpoint ``source`` into ``models_dir`` as ``<sha256>.pt`` (atomically; kept as it is when an
    identical copy is there already) and return that path."""
    data = Path(source).read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    target = Path(models_dir) / f"{sha256}.pt"
    if target.is_file() and _sha256_of(target) == sha256:
        return target
    return write_atomic(target, data)


def _sha256_of(path: Path) -> str | None:
    from cxr_triage.files import file_sha256

    try:
        return file_sha256(path)
    except OSError:
        return None


def model_file(entry: RegisteredModel | db.ModelVersion, models_dir: Path | None = None) -> Path | None:
    """The file holding ``entry``'s exact bytes: its recorded path, else ``<models_dir>/<sha256>.pt``; None if
    neither is there with the right sha256."""
    places = [Path(entry.path)]
    if models_dir is not None:
        places.append(Path(models_dir) / f"{entry.sha256}.pt")
    for place in places:
        if place.is_file() and _sha256_of(place) == entry.sha256:
            return place
    return None


# --- reads ---------------------------------------------------------------------------------------------------


def champion(sessions: sessionmaker[Session]) -> RegisteredModel | None:
    """The champion (the model the workers run), None when the registry has none yet."""
    with sessions() as session:
        db.read_only(session)
        row = session.scalars(select(db.ModelVersion).where(db.ModelVersion.state == CHAMPION)).first()
        return RegisteredModel.of(row) if row is not None else None


def find(sessions: sessionmaker[Session], sha256: str) -> RegisteredModel | None:
    """The version of the file with this sha256, None when it is not registered."""
    with sessions() as session:
        db.read_only(session)
        row = session.scalars(select(db.ModelVersion).where(db.ModelVersion.sha256 == sha256)).first()
        return RegisteredModel.of(row) if row is not None else None


def list_versions(sessions: sessionmaker[Session]) -> list[RegisteredModel]:
    """Every registered version, oldest first."""
    with sessions() as session:
        db.read_only(session)
        rows = session.scalars(select(db.ModelVersion).order_by(db.ModelVersion.id)).all()
        return [RegisteredModel.of(row) for row in rows]


# --- changes -------------------------------------------------------------------------------------------------


def _lock(session: Session) -> None:
    """Serialize registry changes across processes and hosts (module docstring)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": REGISTRY_LOCK})


def _insert_ignoring_duplicates(session: Session, values: dict[str, Any]) -> None:
    dialect = session.get_bind().dialect.name
    table = db.ModelVersion.__table__
    if dialect == "postgresql":
        session.execute(postgresql.insert(table).values(values).on_conflict_do_nothing(index_elements=["sha256"]))
    elif dialect == "sqlite":
        session.execute(sqlite.insert(table).values(values).on_conflict_do_nothing(index_elements=["sha256"]))
    else:  # other backends: a savepoint, so that a duplicate leaves the transaction usable
        try:
            with session.begin_nested():
                session.execute(insert(table).values(values))
        except IntegrityError:
            pass


def _row_of(session: Session, sha256: str) -> db.ModelVersion | None:
    return session.scalars(
        select(db.ModelVersion).where(db.ModelVersion.sha256 == sha256).execution_options(populate_existing=True)
    ).first()


def _current_champion(session: Session) -> db.ModelVersion | None:
    return session.scalars(
        select(db.ModelVersion).where(db.ModelVersion.state == CHAMPION).execution_options(populate_existing=True)
    ).first()


def _get(session: Session, version_id: int) -> db.ModelVersion:
    row = session.get(db.ModelVersion, version_id, populate_existing=True)
    if row is None:
        raise RegistryError(f"no model version {version_id} (`cxr-triage models list` shows the registered ones)")
    return row


def _describe(row: db.ModelVersion | RegisteredModel) -> str:
    return f"version {row.id} ({row.version}, sha256 {row.sha256[:12]})"


def _audit(session: Session, action: str, row: db.ModelVersion, detail: dict[str, Any]) -> None:
    session.add(db.AuditEntry(at=db.utcnow(), username=None, action=action, target=f"model {row.id}", detail=detail))


def _retire(session: Session, row: db.ModelVersion, reason: str, now: dt.datetime) -> None:
    row.state, row.retired_at, row.state_reason = RETIRED, now, reason
    session.flush()  # before another row becomes champion: one champion at a time (the partial unique index)


def _crown(row: db.ModelVersion, reason: str, now: dt.datetime) -> None:
    row.state, row.promoted_at, row.retired_at, row.state_reason = CHAMPION, now, None, reason


def _make_champion(session: Session, row: db.ModelVersion, reason: str) -> db.ModelVersion | None:
    """``row`` becomes the champion, the current one (returned) retired; the caller holds the lock."""
    now = db.utcnow()
    current = _current_champion(session)
    if current is not None:
        _retire(session, current, f"replaced by version {row.id}: {reason}", now)
    _crown(row, reason, now)
    row.previous_champion_id = current.id if current is not None else None
    _audit(
        session,
        "model-promoted",
        row,
        {"from": current.id if current is not None else None, "to": row.id, "reason": reason},
    )
    return current


def _checkpoint_values(loaded: LoadedModel, path: Path, reason: str) -> dict[str, Any]:
    """A new row's values for a checkpoint that brings only its own card (the shipped or a configured model)."""
    provenance = loaded.card.provenance
    metrics = provenance.get("metrics") or provenance.get("test")  # the training run's test-split figures
    data = {k: provenance[k] for k in ("command", "data") if k in provenance}
    return {
        "version": loaded.card.model_version,
        "sha256": loaded.sha256,
        "path": str(path),
        "registered_at": db.utcnow(),
        "metrics": dict(metrics) if isinstance(metrics, dict) else None,
        "training_data": {"from_checkpoint_provenance": data} if data else None,
        "config": dict(provenance["config"]) if isinstance(provenance.get("config"), dict) else None,
        "state": CANDIDATE,
        "state_reason": reason,
    }


def register_candidate(
    sessions: sessionmaker[Session],
    path: Path,
    *,
    parent_id: int | None,
    training_data: dict[str, Any],
    config: dict[str, Any],
    metrics: dict[str, Any],
) -> int:
    """Register the checkpoint at ``path`` (loaded and checked first: ``CheckpointError`` if it is not a usable
    classifier) as a candidate; its version id. A file already registered keeps its row, state included."""
    from cxr_triage.ml.checkpoint import load_classifier

    path = Path(path).resolve()
    loaded = load_classifier(path)
    values = {
        "version": loaded.card.model_version,
        "sha256": loaded.sha256,
        "path": str(path),
        "registered_at": db.utcnow(),
        "metrics": metrics,
        "training_data": training_data,
        "config": config,
        "parent_id": parent_id,
        "state": CANDIDATE,
        "state_reason": "registered as a candidate",
    }
    with sessions() as session, session.begin():
        _lock(session)
        if parent_id is not None:
            _get(session, parent_id)
        _insert_ignoring_duplicates(session, values)
        row = _row_of(session, loaded.sha256)
        assert row is not None
        return row.id


def register_model(sessions: sessionmaker[Session], loaded: LoadedModel) -> int:
    """The id of ``loaded``'s row, inserting it (a candidate) if it is not registered yet; it becomes the champion
    when the registry has none (the first model ever registered)."""
    with sessions() as session, session.begin():
        _lock(session)
        _insert_ignoring_duplicates(session, _checkpoint_values(loaded, Path(str(loaded.path)), "registered"))
        row = _row_of(session, loaded.sha256)
        assert row is not None
        if row.state != CHAMPION and _current_champion(session) is None:
            _make_champion(session, row, "the first model registered")
        return row.id


def deploy_configured(sessions: sessionmaker[Session], loaded: LoadedModel, path: Path) -> tuple[int, bool]:
    """A worker found the configured (or bundled) checkpoint ``loaded``, stored at ``path``: register it and make it
    the champion (reason "configured") unless the registry knows the file already, which leaves every state as it
    is (a promotion or rollback outlives a worker's restart) unless there is no champion. (id, whether promoted)."""
    with sessions() as session, session.begin():
        _lock(session)
        row = _row_of(session, loaded.sha256)
        if row is None:
            _insert_ignoring_duplicates(session, _checkpoint_values(loaded, path, CONFIGURED))
            row = _row_of(session, loaded.sha256)
            assert row is not None
            first = _current_champion(session) is None
            _make_champion(session, row, "the first model registered (configured)" if first else CONFIGURED)
            return row.id, True
        if row.state != CHAMPION and _current_champion(session) is None:
            _make_champion(session, row, "no champion: the configured model")
            return row.id, True
        return row.id, False


def promote(sessions: sessionmaker[Session], version_id: int, reason: str, *, models_dir: Path | None = None) -> None:
    """Make ``version_id`` the champion and retire the current one, in one transaction; ``RegistryError`` for an
    unknown version, the champion itself, or one whose file is missing or changed (``model_file``)."""
    with sessions() as session, session.begin():
        _lock(session)
        row = _get(session, version_id)
        if row.state == CHAMPION:
            raise RegistryError(f"{_describe(row)} is already the champion")
        if model_file(row, models_dir) is None:
            raise RegistryError(
                f"cannot promote {_describe(row)}: its file {row.path} is missing or no longer has that sha256"
            )
        _make_champion(session, row, reason)


def rollback(sessions: sessionmaker[Session], reason: str, *, models_dir: Path | None = None) -> int:
    """Retire the champion and make the champion before it (``previous_champion_id``) champion again; its id.
    ``RegistryError`` when there is no champion, no earlier one, or the earlier one's file is gone."""
    with sessions() as session, session.begin():
        _lock(session)
        current = _current_champion(session)
        if current is None:
            raise RegistryError("there is no champion to roll back")
        if current.previous_champion_id is None:
            raise RegistryError(f"the champion {_describe(current)} has no earlier champion to roll back to")
        earlier = _get(session, current.previous_champion_id)
        if model_file(earlier, models_dir) is None:
            raise RegistryError(
                f"cannot roll back to {_describe(earlier)}: its file {earlier.path} is missing or no longer has "
                "that sha256"
            )
        now = db.utcnow()
        _retire(session, current, f"rolled back to version {earlier.id}: {reason}", now)
        _crown(earlier, f"rollback from version {current.id}: {reason}", now)  # its own previous champion stays
        _audit(session, "model-rollback", earlier, {"from": current.id, "to": earlier.id, "reason": reason})
        return earlier.id


def reject(sessions: sessionmaker[Session], version_id: int, reason: str) -> None:
    """Retire the candidate ``version_id`` with ``reason`` (a challenger that lost); ``RegistryError`` if it is not
    a candidate."""
    with sessions() as session, session.begin():
        _lock(session)
        row = _get(session, version_id)
        if row.state != CANDIDATE:
            raise RegistryError(f"{_describe(row)} is {row.state}, not a candidate")
        _retire(session, row, reason, db.utcnow())
        _audit(session, "model-rejected", row, {"version": row.id, "reason": reason})
