"""``deploy/install.sh``: PyTorch's CPU index only for torch and torchvision, with a short timeout and no retries;
an unreachable index costs one line that says what is installed instead; the end reports what was installed;
``--wheels DIR`` installs offline from a folder and says clearly when the folder lacks something.

Real runs reuse this environment's packages (``--system-site-packages``), so nothing big is downloaded; the CPU
index is pointed at a closed port on 127.0.0.1 (``CXR_TRIAGE_TORCH_INDEX``), which refuses at once.
"""

from __future__ import annotations

import functools
import http.server
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from cxr_triage.testing import peers

pytestmark = pytest.mark.xdist_group("install")  # one worker: the package's wheel built once

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy" / "install.sh"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
REPORT = re.compile(r"^install\.sh: installed torch (\S+) \((CUDA [\d.]+ build|CPU build)[^)]*\); \S+ takes (\S+)$")


def _closed_port() -> int:
    """A port nothing listens on: a connection is refused at once."""
    return peers.free_port()


def _install(tmp_path: Path, *args: str, gpu: bool = False, **env: str) -> subprocess.CompletedProcess[str]:
    bare = tmp_path / "bin"
    bare.mkdir(exist_ok=True)
    if gpu:
        (bare / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
        (bare / "nvidia-smi").chmod(0o755)
    environ = {**os.environ, "PATH": f"{bare}:/usr/bin:/bin", "PYTHON": sys.executable, **env}
    return subprocess.run(["sh", str(SCRIPT), *args], cwd=REPO, env=environ, capture_output=True, text=True,
                          timeout=900)  # fmt: skip


def _lines(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def test_the_script_is_valid_posix_sh_and_its_help_shows_the_offline_recipe() -> None:
    assert subprocess.run(["sh", "-n", str(SCRIPT)]).returncode == 0
    if shutil.which("shellcheck"):
        checked = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout
    helped = subprocess.run(["sh", str(SCRIPT), "-h"], capture_output=True, text=True)
    assert helped.returncode == 0
    for option in ("--cpu", "--cuda", "--venv", "--extras", "--dry-run", "--system-site-packages", "--wheels"):
        assert option in helped.stdout, option
    assert "pip download -d wheels --index-url https://download.pytorch.org/whl/cpu" in helped.stdout
    assert "pip wheel -w wheels --find-links wheels" in helped.stdout


def test_the_cpu_index_serves_torch_and_torchvision_only_with_a_short_timeout_and_no_retries(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    done = _install(tmp_path, "--dry-run", "--venv", str(venv), "--extras", "postgres")
    assert done.returncode == 0, done.stderr
    pip = _lines(done.stdout, " -m pip install ")
    assert pip == [
        f"{venv}/bin/python -m pip install --timeout 5 --retries 0 --index-url {CPU_INDEX} "
        "--extra-index-url https://pypi.org/simple torch torchvision",
        f"{venv}/bin/python -m pip install -e {REPO}[postgres]",
    ], done.stdout
    # another index (a mirror) through the environment; a GPU or --cuda: no CPU index at all
    mirror = "http://mirror.hospital.example/whl/cpu"
    done = _install(tmp_path, "--dry-run", "--venv", str(venv), CXR_TRIAGE_TORCH_INDEX=mirror)
    assert f"--index-url {mirror} " in done.stdout and CPU_INDEX not in done.stdout, done.stdout
    for args, gpu in ((("--cuda",), False), ((), True)):
        done = _install(tmp_path, "--dry-run", "--venv", str(venv), *args, gpu=gpu)
        assert done.returncode == 0, done.stderr
        assert _lines(done.stdout, " -m pip install ") == [f"{venv}/bin/python -m pip install -e {REPO}"]
        assert "--index-url" not in done.stdout and "CUDA build from PyPI" in done.stderr
    # --cpu wins over a GPU
    done = _install(tmp_path, "--dry-run", "--venv", str(venv), "--cpu", gpu=True)
    assert "--retries 0" in done.stdout and "torch torchvision" in done.stdout


@pytest.mark.slow
def test_an_unreachable_cpu_index_is_one_line_and_the_end_reports_what_was_installed(tmp_path: Path) -> None:
    index = f"http://127.0.0.1:{_closed_port()}/whl/cpu"
    venv = tmp_path / "venv"
    done = _install(tmp_path, "--cpu", "--system-site-packages", "--venv", str(venv), CXR_TRIAGE_TORCH_INDEX=index)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    notice = _lines(output, index)
    assert len(notice) == 1, output  # one line, and pip never looked there
    assert "cannot be reached" in notice[0] and "Connection refused" in notice[0], notice
    assert "PyPI's CUDA build" in notice[0] and re.search(r"\d+(\.\d+)? GiB", notice[0]), notice
    assert "Retrying" not in output and "Traceback" not in output, output
    report = [match for line in done.stderr.splitlines() if (match := REPORT.match(line))]
    assert len(report) == 1, done.stderr
    version, build, size = report[0].groups()
    assert version == torch.__version__
    assert build == (f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build")
    assert re.fullmatch(r"[\d.]+[KMGT]", size), size
    assert "not counted" in _lines(done.stderr, "installed torch")[0]  # torch lies in the system's site-packages
    version = subprocess.run([str(venv / "bin" / "cxr-triage"), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("cxr-triage "), version


def test_a_reachable_cpu_index_is_asked_for_torch_and_torchvision_only(tmp_path: Path) -> None:
    """A local stand-in index answers; torch and torchvision are already satisfied from the system's site-packages,
    so pip downloads nothing, but the script takes the CPU-index branch for real."""
    root = tmp_path / "index"
    (root / "torch").mkdir(parents=True)
    (root / "torch" / "index.html").write_text("<!DOCTYPE html><html><body></body></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    index = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        done = _install(tmp_path, "--cpu", "--system-site-packages", "--venv", str(tmp_path / "venv"),
                        CXR_TRIAGE_TORCH_INDEX=index)  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "cannot be reached" not in output and f"torch and torchvision from {index} (CPU build)" in output
    assert f"Looking in indexes: {index}, " in output  # the first pip call, and only that one, looks there
    assert len(_lines(output, f"Looking in indexes: {index}")) == 1, output
    assert len([line for line in done.stderr.splitlines() if REPORT.match(line)]) == 1, done.stderr


def test_wheels_from_a_folder_that_is_missing_or_holds_no_package_wheel(tmp_path: Path) -> None:
    for folder in (tmp_path / "absent", tmp_path / "empty"):
        if folder.name == "empty":
            folder.mkdir()
        done = _install(tmp_path, "--wheels", str(folder), "--venv", str(tmp_path / "venv"))
        assert done.returncode == 1, done.stdout + done.stderr
        assert "Traceback" not in done.stderr and done.stdout == ""
        assert len(done.stderr.splitlines()) == 1 and str(folder) in done.stderr, done.stderr
        assert "see --help" in done.stderr
        assert not (tmp_path / "venv").exists()  # refused before anything was created


@pytest.fixture(scope="module")
def package_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with this package's wheel only (built offline from a copy of the tree: no build/ in the repo)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "weights")
    for name in ("cxr_triage", "training"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(wheels), str(source)], check=True, capture_output=True, timeout=300)  # fmt: skip
    assert len(list(wheels.glob("cxr_triage-*.whl"))) == 1
    return wheels


def test_wheels_that_lack_a_dependency_end_in_pips_error_and_one_line_not_a_traceback(
    tmp_path: Path, package_wheel: Path
) -> None:
    done = _install(tmp_path, "--wheels", str(package_wheel), "--venv", str(tmp_path / "venv"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "ERROR: " in done.stdout + done.stderr  # pip names what it could not find
    assert done.stderr.splitlines()[-1].startswith(f"install.sh: {package_wheel} lacks a wheel that pip needs")


def test_wheels_install_offline(tmp_path: Path, package_wheel: Path) -> None:
    """The package's wheel from the folder, everything else already satisfied by this environment's packages."""
    wheels = tmp_path / "wheels"
    shutil.copytree(package_wheel, wheels)
    # the venv's own setuptools (Python 3.11's venv ships 65.5) may be older than the installed torch needs
    needs = [r for r in importlib.metadata.requires("torch") or [] if re.match(r"setuptools\b", r) and ";" not in r]
    if needs:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), *needs],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert got.returncode == 0, f"no wheel of {needs} to be had for the offline folder: {got.stderr[-300:]}"
    venv = tmp_path / "venv"
    done = _install(tmp_path, "--wheels", str(wheels), "--system-site-packages", "--venv", str(venv),
                    CXR_TRIAGE_TORCH_INDEX=f"http://127.0.0.1:{_closed_port()}/whl/cpu")  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Looking in indexes" not in output and "cannot be reached" not in output  # no index was asked at all
    assert _lines(output, "Processing ") and all(str(wheels) in line for line in _lines(output, "Processing "))
    assert len([line for line in done.stderr.splitlines() if REPORT.match(line)]) == 1, done.stderr
    version = subprocess.run([str(venv / "bin" / "cxr-triage"), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("cxr-triage "), version
