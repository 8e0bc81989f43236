"""The database: migrations match the models, `db upgrade` creates SQLite files and folders, SQLite runs in WAL
mode with foreign keys, timestamps come back as aware UTC, and the server refuses a database behind the code."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from alembic import command
from conftest import config_values, write_config
from sqlalchemy import inspect, text
from sqlalchemy.exc import StatementError

from cxr_triage.cli import main
from cxr_triage.core import db
from cxr_triage.core.bootstrap import SERVICE, CommandError, open_database
from cxr_triage.core.settings import Settings


def _config(tmp_path: Path) -> tuple[dict, Path]:
    values = config_values(tmp_path, None, database={"url": f"sqlite:///{tmp_path / 'deep' / 'dir' / 'x.sqlite'}"})
    return values, write_config(tmp_path / "cxr.toml", values)


def test_db_upgrade_creates_the_file_and_folders_and_reports_current(tmp_path: Path, capsys) -> None:
    values, path = _config(tmp_path)
    assert main(["db", "upgrade", "--config", str(path)]) == 0
    assert (tmp_path / "deep" / "dir" / "x.sqlite").is_file()
    head = db.head_revision(db.make_engine("sqlite://"))
    assert f"empty -> {head}" in capsys.readouterr().out, "every migration applied, the last being the head"
    assert main(["db", "current", "--config", str(path)]) == 0
    assert "current" in capsys.readouterr().out
    engine = db.make_engine(values["database"]["url"])
    tables = set(inspect(engine).get_table_names())
    assert {"studies", "instances", "predictions", "refusals", "sr_documents", "forwards", "model_versions"} <= tables
    assert "conflicts" in tables
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == db.SQLITE_BUSY_TIMEOUT_MS
    engine.dispose()


def test_migrations_match_the_models(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'm.sqlite'}")
    db.upgrade(engine)
    command.check(db.alembic_config(engine))  # raises when the models need a migration the code lacks
    engine.dispose()


def test_empty_database_is_created_on_start_and_old_revision_is_refused(tmp_path: Path, capsys) -> None:
    values, path = _config(tmp_path)
    engine = open_database(Settings.from_values(values), SERVICE, str(path))
    assert db.schema_state(engine) == "current"
    command.stamp(db.alembic_config(engine), "base")  # tables present, revision behind the code's
    assert db.schema_state(engine) == "behind"
    engine.dispose()
    with pytest.raises(CommandError, match=f"cxr-triage db upgrade --config {path}"):
        open_database(Settings.from_values(values), SERVICE, str(path))
    assert main(["serve", "--config", str(path)]) == 2
    assert f"cxr-triage db upgrade --config {path}" in capsys.readouterr().err
    assert main(["results", "--config", str(path)]) == 2


def test_unknown_revision_is_refused(tmp_path: Path) -> None:
    values, path = _config(tmp_path)
    engine = open_database(Settings.from_values(values), SERVICE, str(path))
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
    engine.dispose()
    with pytest.raises(CommandError, match="newer cxr-triage"):
        open_database(Settings.from_values(values), SERVICE, str(path))


def test_timestamps_are_aware_utc(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 't.sqlite'}")
    db.upgrade(engine)
    moment = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    with db.session_factory(engine)() as session, session.begin():
        session.add(db.ModelVersion(version="v", sha256="a" * 64, path="p", registered_at=moment, active=True))
    with db.read_session(engine) as session:
        stored = session.query(db.ModelVersion).one().registered_at
    assert stored == moment and stored.tzinfo == dt.UTC
    with db.session_factory(engine)() as session, pytest.raises(StatementError, match="naive"):
        session.add(db.ModelVersion(version="w", sha256="b" * 64, path="p", registered_at=dt.datetime(2026, 1, 1)))
        session.commit()
    engine.dispose()


def test_upgrade_from_the_first_revision_keeps_the_rows(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'old.sqlite'}")
    db.upgrade(engine, "0001")
    now = "2026-01-01 00:00:00.000000"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO studies (id, study_instance_uid, status, first_received_at, last_received_at, flagged) "
                "VALUES (1, '1.2.3', 'open', :now, :now, 0)"
            ),
            {"now": now},
        )
        conn.execute(
            text(
                "INSERT INTO instances (id, study_id, sop_instance_uid, sop_class_uid, study_instance_uid, "
                "transfer_syntax_uid, spool_path, sha256, size_bytes, received_at, status, attempts, flagged) "
                "VALUES (1, 1, '1.2.3.4', '1.2.840.10008.5.1.4.1.1.1', '1.2.3', '1.2.840.10008.1.2.1', '/s/x.dcm', "
                "'ab', 10, :now, 'queued', 0, 0)"
            ),
            {"now": now},
        )
    assert db.schema_state(engine) == "behind"
    db.upgrade(engine)
    assert db.schema_state(engine) == "current"
    with db.read_session(engine) as session:
        instance = session.get(db.Instance, 1)
        assert instance is not None and instance.sop_instance_uid == "1.2.3.4" and instance.spool_removed_at is None
    engine.dispose()


def test_the_instance_identifiers_migration_goes_down_and_up(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'ids.sqlite'}")
    db.upgrade(engine)
    assert "identifiers" in {c["name"] for c in inspect(engine).get_columns("instances")}
    command.downgrade(db.alembic_config(engine), "0009")
    assert "identifiers" not in {c["name"] for c in inspect(engine).get_columns("instances")}
    db.upgrade(engine)
    assert db.schema_state(engine) == "current"
    engine.dispose()
