"""The README's quick start, run as written: the install script, ``serve``, ``send`` of the five shared files, and
``results``. The commands are read from the README itself, so the test follows any change to them.

The install is run for real into a throwaway venv that reuses this environment's packages
(``--system-site-packages``: a second copy of PyTorch would take minutes and gigabytes); which PyTorch build the
script picks with and without an NVIDIA GPU is checked with ``--dry-run`` (the CPU wheel index is not reachable from
the test machines).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from cxr_triage.testing import peers

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def quickstart_commands() -> list[str]:
    """The shell commands of the README's "Quick start" section, one per ```sh block."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S)]


def _install_script_line() -> tuple[list[str], str]:
    install, serve = (part.strip() for part in quickstart_commands()[0].split("&&"))
    return shlex.split(install), serve


def test_the_quick_start_is_three_commands() -> None:
    commands = quickstart_commands()
    assert commands[0] == "sh deploy/install.sh && .venv/bin/cxr-triage serve"
    assert commands[1].startswith(".venv/bin/cxr-triage send ../shared/data/dicom && .venv/bin/cxr-triage results")
    assert commands[2] == "bash .ci/run"
    assert "python -m pytest" in (REPO / ".ci" / "run").read_text()


def test_install_script_picks_the_cpu_build_without_a_gpu(tmp_path: Path) -> None:
    argv, _ = _install_script_line()
    bare = tmp_path / "bin"
    bare.mkdir()
    env = {**os.environ, "PATH": f"{bare}:/usr/bin:/bin"}
    done = subprocess.run([*argv, "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"--index-url {CPU_INDEX} " in done.stdout and "torch torchvision" in done.stdout  # torch only
    assert f"pip install -e {REPO}\n" in done.stdout  # the rest from the usual index
    (bare / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (bare / "nvidia-smi").chmod(0o755)
    done = subprocess.run([*argv, "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert CPU_INDEX not in done.stdout and f"pip install -e {REPO}" in done.stdout


def _copy_of_the_repository(folder: Path) -> Path:
    """The files the install script needs, copied: its editable install writes cxr_triage.egg-info into the tree it
    installs, and the tests write nothing into the repository (another test may be reading it at the same time)."""
    folder.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, folder / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "weights")
    for name in ("cxr_triage", "training", "deploy"):
        shutil.copytree(REPO / name, folder / name, ignore=ignore)
    return folder


def test_install_script_installs_a_working_command(tmp_path: Path) -> None:
    argv, _ = _install_script_line()
    venv = tmp_path / "venv"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        [*argv, "--cuda", "--system-site-packages", "--venv", str(venv)],
        cwd=_copy_of_the_repository(tmp_path / "clone"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    version = subprocess.run([str(venv / "bin" / "cxr-triage"), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("cxr-triage "), version


def test_serve_send_and_results_as_written(tmp_path: Path) -> None:
    """The README's commands in a folder laid out like a clone: ``.venv/bin/cxr-triage`` and ``../shared``."""
    clone = tmp_path / "clone"
    (clone / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / "shared").symlink_to(SHARED)
    command = clone / ".venv" / "bin" / "cxr-triage"
    command.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m cxr_triage "$@"\n')
    command.chmod(0o755)
    port = peers.free_port()
    env = {**os.environ, "CXR_TRIAGE_LISTENER_PORT": str(port)}  # the README's commands stay as written
    _, serve = _install_script_line()
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(shlex.split(serve), cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip
    try:
        peers.wait_until(lambda: peers.dicom_ready(port, "CXR_TRIAGE"), 120, "the README's serve to answer")
        done = subprocess.run(quickstart_commands()[1], shell=True, cwd=clone, env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
    finally:
        peers.terminate(server, timeout=30, group=True)
        log.close()
    assert done.returncode == 0, done.stdout + done.stderr + peers.tail(tmp_path / "serve.log")
    lines = done.stdout.splitlines()
    sent = [line for line in lines if line.endswith("stored (0x0000)")]
    assert len(sent) == 5, done.stdout
    results = [line for line in lines if "\tok\t" in line or "\trejected\t" in line]
    assert len(results) == 5, done.stdout
    assert all("\tok\t" in line for line in results), done.stdout  # all five are frontal chest radiographs
