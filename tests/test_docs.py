"""The repository stands alone: no references to material outside it, and the help texts are written for users."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cxr_triage import cli

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("GUIDE §", "GUIDE.md", "$OUT", "`run` tool")
"""Strings that point outside the repository or describe the development machinery instead of the product."""


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    paths = [REPO / line for line in listed.splitlines()]
    return [p for p in paths if p.suffix in {".py", ".md", ".toml", ".sh", ".service", ".lua", ".json", ".txt", ""}]


def test_no_file_points_outside_the_repository() -> None:
    offenders = []
    for path in tracked_text_files():
        if path == Path(__file__) or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        offenders += [f"{path.relative_to(REPO)}: {word}" for word in FORBIDDEN if word in text]
    assert offenders == []


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_has_help_written_for_users(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert cli.DESCRIPTIONS[command].splitlines()[0] in text
    for internal in ("``", ":func:", ":class:", "OMP_WAIT_POLICY", "GUIDE", "docstring"):
        assert internal not in text, (command, internal)
