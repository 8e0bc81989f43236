"""The deployment files stay in step with the code: the example configurations load, the systemd unit's commands
are valid ``cxr-triage`` invocations, and the container entry point migrates before serving."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from cxr_triage import cli
from cxr_triage.core.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
EXAMPLES = [REPO / "config" / "sqlite.toml", REPO / "config" / "postgresql.toml", DEPLOY / "container.toml"]
UNIT_CONFIG = "/etc/cxr-triage/cxr-triage.toml"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configuration_loads(path: Path) -> None:
    config = load_config(path, environ={})

    assert config.source == path
    assert config["storage"]["spool_dir"].startswith("/var/lib/cxr-triage/")
    assert config["listener"]["allowed_calling_aes"], "examples restrict who may send"


def unit_commands() -> dict[str, list[str]]:
    commands = {}
    for line in (DEPLOY / "cxr-triage.service").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("ExecStartPre", "ExecStart"):
            commands[key] = shlex.split(value)
    return commands


def test_systemd_unit_migrates_then_serves_with_valid_commands(tmp_path: Path) -> None:
    commands = unit_commands()
    assert commands["ExecStartPre"][1:] == ["db", "upgrade", "--config", UNIT_CONFIG]
    assert commands["ExecStart"][1:] == ["serve", "--config", UNIT_CONFIG]
    assert {Path(argv[0]).name for argv in commands.values()} == {"cxr-triage"}
    # Run the migration exactly as the unit does, on a scratch database.
    config = tmp_path / "cxr-triage.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "db.sqlite"}"\n')
    argv = [str(config) if a == UNIT_CONFIG else a for a in commands["ExecStartPre"][1:]]
    assert cli.main(argv) == 0
    assert (tmp_path / "db.sqlite").stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["serve", "--config", UNIT_CONFIG], [f"db upgrade --config {UNIT_CONFIG}", f"serve --config {UNIT_CONFIG}"]),
        (["worker", "--config", UNIT_CONFIG], [f"db upgrade --config {UNIT_CONFIG}", f"worker --config {UNIT_CONFIG}"]),
        (["classify", "--json", "x.dcm"], ["classify --json x.dcm"]),
    ],
)
def test_container_entrypoint_migrates_before_serving(tmp_path: Path, args: list[str], expected: list[str]) -> None:
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "cxr-triage"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}

    done = subprocess.run(
        ["sh", str(DEPLOY / "container-entrypoint.sh"), *args], env=env, capture_output=True, text=True, timeout=30
    )

    assert done.returncode == 0, done.stderr
    assert calls.read_text().splitlines() == expected
