"""End-to-end with Orthanc as the PACS: routing by the production Lua script, and the whole pipeline
(Orthanc -> listener -> worker -> SR -> Orthanc) through REST push and through Lua auto-routing.

Orthanc binds every interface, so each scenario runs in its own network namespace (tests/e2e_orthanc_scenario.py
under ``unshare -n``); all traffic is on that namespace's 127.0.0.1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import peers
import pydicom
import pytest

pytestmark = pytest.mark.peers

SCENARIO = Path(__file__).resolve().parent / "e2e_orthanc_scenario.py"


def run_scenario(*args: str, timeout: float = 170) -> dict[str, Any]:
    argv = peers.netns_command([sys.executable, str(SCENARIO), *args])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=peers.REPO)
    assert done.returncode == 0, f"scenario {args} failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-8000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_orthanc_refuses_to_start_in_the_host_network(tmp_path: Path) -> None:
    with pytest.raises(peers.PeerError, match="netns"):
        peers.Orthanc(tmp_path, peers.free_port(), peers.free_port()).__enter__()


def test_production_lua_routes_cr_and_dx_for_presentation_only(tmp_path: Path) -> None:
    summary = run_scenario("routing", str(tmp_path / "work"))

    assert summary["storescu_returncode"] == 0
    assert all(summary["stored_in_orthanc"].values()), summary
    assert summary["routed"] == ["cr", "dx"]
    assert summary["received_count"] == 2


@pytest.mark.parametrize("route", ["rest", "lua"])
def test_sr_comes_back_into_the_same_orthanc_study(tmp_path: Path, route: str) -> None:
    source = pydicom.dcmread(peers.SAMPLE_CR, stop_before_pixels=True)

    summary = run_scenario("pipeline", str(tmp_path / "work"), "--route", route, "--image", str(peers.SAMPLE_CR))

    row = summary["result"]
    assert row["sop_instance_uid"] == source.SOPInstanceUID
    assert row["study_instance_uid"] == source.StudyInstanceUID
    assert row["status"] == "ok"
    assert row["label"] in ("covid", "normal", "pneumonia")
    assert set(row["probabilities"]) == {"covid", "normal", "pneumonia"}
    assert row["model_version"] == "test-tiny"
    assert row["received_at"] <= row["completed_at"]
    # One instance in, one result out: the SR sent back to Orthanc was not routed to the listener again.
    assert summary["results_count"] == 1
    # Orthanc filed the SR in the CR's own study and patient, in a new series of its own.
    assert summary["orthanc_studies"] == 1
    assert summary["orthanc_patients"] == 1
    assert summary["sr_parent_study"] == summary["orthanc_study"]
    assert summary["sr_series_modality"] == "SR"
    assert summary["sr_sop_instance_uid"] == row["sr_sop_instance_uid"]
    assert summary["sr_instances_in_orthanc"] == 1
    assert summary["series_in_study"] == 2
    assert summary["sr_study_instance_uid"] == source.StudyInstanceUID
    assert summary["sr_patient_id_matches"]
    assert summary["sr_evidence"] == [source.SOPInstanceUID]
    assert summary["dciodvfy_errors"] == []
