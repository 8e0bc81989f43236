"""``cxr-triage users add`` as a person or a script runs it (issue 30): a piped password works without a
traceback, with or without ``--password-stdin``; a name that exists is refused before any prompt; the README
shows ``--password-stdin``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import write_config
from sqlalchemy import select

from cxr_triage.core import db
from cxr_triage.web import auth

PASSWORD = "correct horse battery"
REPO = Path(__file__).resolve().parents[1]


def users(config: Path, *argv: str, stdin: int | None = None, text: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cxr_triage", "users", *argv, "--config", str(config)]
    if text is not None:
        return subprocess.run(command, input=text, capture_output=True, text=True, timeout=120)
    return subprocess.run(command, stdin=stdin, capture_output=True, text=True, timeout=120, start_new_session=True)


def test_a_piped_password_works_without_a_traceback(harness) -> None:
    config = write_config(harness.tmp / "cxr.toml", harness.config)
    piped = users(config, "add", "rad1", text=PASSWORD + "\n")  # no --password-stdin: stdin is a pipe
    assert piped.returncode == 0, piped.stderr
    assert "Traceback" not in piped.stderr and "GetPassWarning" not in piped.stderr, piped.stderr
    assert piped.stdout.strip() == "added rad1"
    flagged = users(config, "add", "rad2", "--password-stdin", text=PASSWORD + "\n")
    assert flagged.returncode == 0, flagged.stderr
    empty = users(config, "add", "rad3", text="")
    assert empty.returncode == 2 and "Traceback" not in empty.stderr, empty.stderr
    assert "--password-stdin" in empty.stderr and len(empty.stderr.strip().splitlines()) == 1, empty.stderr
    with harness.sessions() as session:
        assert auth.verify_password(session, "rad1", PASSWORD) and auth.verify_password(session, "rad2", PASSWORD)
        assert session.scalar(select(db.User).where(db.User.username == "rad3")) is None


def test_an_existing_name_is_refused_before_the_prompt(harness) -> None:
    config = write_config(harness.tmp / "cxr.toml", harness.config)
    assert users(config, "add", "rad1", text=PASSWORD + "\n").returncode == 0
    controller, terminal = os.openpty()  # a terminal on stdin: the command would prompt for a password
    try:
        again = users(config, "add", "rad1", stdin=terminal)
    finally:
        os.close(terminal)
        os.close(controller)
    assert again.returncode == 2, again.stderr
    assert "exists already" in again.stderr and "password for" not in again.stderr, again.stderr
    assert "Traceback" not in again.stderr


def test_the_readme_shows_password_stdin() -> None:
    readme = (REPO / "README.md").read_text()
    assert "users add" in readme and "--password-stdin" in readme
