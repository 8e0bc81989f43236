"""`cxr-triage status`: counts, the problems that need someone (each with what to do) and the exit status that
monitoring probes read: 0 healthy, 1 problems, 2 no readable database."""

from __future__ import annotations

import copy
import datetime as dt
import json

from conftest import chest_dataset, free_port, write_config

from cxr_triage.cli import main
from cxr_triage.core import db
from cxr_triage.ml import registry
from cxr_triage.queue import jobqueue
from cxr_triage.testing import peers


def status(capsys, config, *extra: str) -> tuple[int, dict]:
    code = main(["status", "--json", "--config", str(config), *extra])
    return code, json.loads(capsys.readouterr().out)


def test_a_healthy_pipeline_has_no_problems(harness, capsys) -> None:
    assert harness.send([chest_dataset(seed=1), chest_dataset(seed=2, ViewPosition="LL")]) == [0, 0]
    assert harness.work() == 2
    config = write_config(harness.tmp / "cxr.toml", harness.config)
    code, report = status(capsys, config)
    assert code == 0, report["problems"]
    assert report["problems"] == []
    assert report["instances"] == {"queued": 0, "processing": 0, "done": 1, "refused": 1, "failed": 0}
    assert report["oldest_queued_seconds"] is None
    assert report["model"]["present"] is True
    assert report["model"]["champion"]["version"] == "tiny-test"
    assert report["spool"]["free_mb"] > report["spool"]["reserve_mb"]
    assert main(["status", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "1 classified, 1 refused" in text and "problems: none" in text


def test_each_problem_is_named_with_what_to_do(make_harness, capsys) -> None:
    closed = free_port()
    harness = make_harness(model=None)
    assert harness.send([chest_dataset(seed=3), chest_dataset(seed=4)]) == [0, 0]
    config = write_config(harness.tmp / "cxr.toml", harness.config)
    code, report = status(capsys, config, "--max-queue-age", "0")
    assert code == 1
    assert report["instances"]["queued"] == 2 and report["oldest_queued_seconds"] >= 0
    assert any(p.startswith("no model at") for p in report["problems"])
    assert any("oldest queued instance has waited" in p for p in report["problems"])
    assert report["model"] == {
        "path": harness.config["model"]["path"],
        "present": False,
        "champion": None,
        "precision": {"configured": "auto", "last_used": None},
    }

    # A worker that died holding a job, then that job failing on its last attempt.
    sessions = harness.sessions
    long_ago = db.utcnow() - dt.timedelta(hours=1)
    assert len(jobqueue.claim(sessions, "gone", 1, 60, 1, now=long_ago)) == 1
    code, report = status(capsys, config)
    assert report["expired_leases"] == 1 and any("lease expired" in p for p in report["problems"])
    jobqueue.claim(sessions, "next", 1, 60, 1)  # fails the expired job (its only attempt), claims the other
    code, report = status(capsys, config)
    assert report["instances"]["failed"] == 1 and report["failed_last_24h"] == 1
    assert any("failed in the last 24 h" in p for p in report["problems"])

    # A classified instance whose SR forward was dead-lettered: the only problem of that pipeline.
    with_model = make_harness(
        forward={"destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": closed}], "max_attempts": 1}
    )
    assert with_model.send([chest_dataset(seed=5)]) == [0]
    assert with_model.work() == 1
    other = write_config(with_model.tmp / "cxr.toml", with_model.config)
    code, report = status(capsys, other)
    assert code == 1
    assert report["forwards"] == {"pending": 0, "sent": 0, "dead": 1}
    assert report["problems"] == [
        "1 SR forward(s) dead-lettered: fix the destination, then `cxr-triage forward --retry`"
    ]

    full = copy.deepcopy(with_model.config)
    full["storage"]["min_free_mb"] = 1 << 40
    code, report = status(capsys, write_config(with_model.tmp / "full.toml", full))
    assert code == 1 and any(p.startswith("spool below its reserve") for p in report["problems"])


def test_no_database_is_exit_status_2(tmp_path, capsys) -> None:
    from conftest import config_values

    values = config_values(tmp_path, None)
    config = write_config(tmp_path / "cxr.toml", values)
    assert main(["status", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "cxr-triage db upgrade" in err
    assert not (tmp_path / "db").exists(), "nothing was created"


def test_status_does_not_load_torch(harness) -> None:
    import subprocess
    import sys

    config = write_config(harness.tmp / "cxr.toml", harness.config)
    code = (
        "import sys\n"
        "from cxr_triage.cli import main\n"
        f"status = main(['status', '--config', {str(config)!r}])\n"
        "print('torch' in sys.modules, status)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "False 0", done.stdout + done.stderr


def test_the_model_shown_is_the_champion_not_a_newer_candidate(harness, capsys) -> None:
    assert harness.send([chest_dataset(seed=3)]) == [0]
    assert harness.work() == 1
    candidate = peers.make_tiny_checkpoint(harness.tmp / "candidate.pt", "tiny-candidate")
    registry.register_candidate(
        harness.sessions, candidate, parent_id=None, training_data={}, config={}, metrics={"accuracy": 0.5}
    )
    config = write_config(harness.tmp / "cxr.toml", harness.config)
    code, report = status(capsys, config)
    assert report["model"]["champion"]["version"] == "tiny-test"
    assert main(["status", "--config", str(config)]) == code
    assert "the workers run the champion tiny-test" in capsys.readouterr().out
