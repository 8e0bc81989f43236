"""End-to-end with Orthanc as the PACS: routing by the production Lua script, and the whole pipeline
(Orthanc -> listener -> worker -> SR -> Orthanc, and the study's triage result as Orthanc user metadata), by Lua
auto-routing and by REST push, in one run.

Orthanc binds every interface, so each scenario runs in its own network namespace (tests/e2e_orthanc_scenario.py
under ``unshare -n``); all traffic is on that namespace's 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cxr_triage.testing import peers

pytestmark = pytest.mark.peers

SCENARIO = Path(__file__).resolve().parent / "e2e_orthanc_scenario.py"
SR_DOC = peers.REPO / "docs" / "SR.md"


def run_scenario(*args: str, timeout: float = 300) -> dict[str, Any]:
    done = peers.run_scenario(peers.netns_command([sys.executable, str(SCENARIO), *args]), timeout)
    assert done.returncode == 0, f"scenario {args} failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-8000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_netns_command_gives_a_network_with_loopback_only() -> None:
    probe = "import socket; print(sorted(n for _, n in socket.if_nameindex()))"
    done = subprocess.run(
        peers.netns_command([sys.executable, "-c", probe]), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['lo']"
    assert not peers.in_private_netns(), "the test process itself runs in the host's network"


def test_dcmtk_tools_are_dcmtk_not_same_named_python_apps() -> None:
    for name in ("storescu", "storescp", "echoscu"):
        done = subprocess.run([peers.dcmtk_tool(name), "--version"], capture_output=True, text=True, timeout=10)
        assert "dcmtk" in done.stdout.lower(), (name, done.stdout)


def test_orthanc_refuses_to_start_in_the_host_network(tmp_path: Path) -> None:
    with pytest.raises(peers.PeerError, match="netns"):
        peers.Orthanc(tmp_path, peers.free_port(), peers.free_port()).__enter__()


def test_production_lua_routes_cr_and_dx_for_presentation_only(tmp_path: Path) -> None:
    summary = run_scenario("routing", str(tmp_path / "work"))

    assert summary["storescu_returncode"] == 0
    assert all(summary["stored_in_orthanc"].values()), summary
    # Only CR and DX for presentation, and only what arrived over DICOM (not the REST upload).
    assert summary["routed"] == ["cr", "dx"]
    assert summary["received_count"] == 2


@pytest.mark.slow
def test_sr_comes_back_into_the_same_orthanc_study(tmp_path: Path) -> None:
    summary = run_scenario("pipeline", str(tmp_path / "work"), "--image", str(peers.SAMPLE_CR))

    # Two instances in (one routed by the Lua script, one pushed by REST), two results, two SRs: nothing was
    # routed twice and no SR was routed back to the listener.
    assert summary["rest_push_failed_instances"] == 0
    assert summary["results_count"] == 2
    assert summary["sr_instances_in_orthanc"] == 2
    assert summary["orthanc_studies"] == 2
    assert summary["orthanc_patients"] == 2
    for route, case in summary["cases"].items():
        row = case["result"]
        assert row["sop_instance_uid"] == summary["sop_instance_uids"][route]
        assert row["status"] == "ok", (route, row)
        assert row["label"] in ("covid", "normal", "pneumonia")
        assert set(row["probabilities"]) == {"covid", "normal", "pneumonia"}
        assert row["model_version"] == "test-tiny"
        assert row["received_at"] <= row["completed_at"]
        # Orthanc filed the SR in the image's own study and patient, in a new series of its own.
        assert case["sr_in_orthanc"], (route, case)
        assert case["sr_parent_study"] == case["orthanc_study"]
        assert case["sr_series_modality"] == "SR"
        assert case["series_in_study"] == 3, "the image's, the SR's and the heatmap's"
        assert row["study_instance_uid"] == case["source_study_instance_uid"] == case["sr_study_instance_uid"]
        assert case["sr_patient_id_matches"]
        assert row["sop_instance_uid"] in case["sr_evidence"] and len(case["sr_evidence"]) == 2
        assert case["dciodvfy_errors"] == [], (route, case["dciodvfy_errors"])
        # The heatmap object the SR references is in Orthanc beside it, in the image's study (issue 31).
        assert case["heatmap_in_orthanc"], (route, case)
        assert case["heatmap_in_same_study"] and case["heatmap_sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.7"
        assert case["heatmap_burned_in_annotation"] == "YES"
        assert case["heatmap_dciodvfy_errors"] == [], (route, case["heatmap_dciodvfy_errors"])
        # The study's priority as Orthanc user metadata (declared in deploy/orthanc/orthanc.json), as recorded.
        metadata, recorded = case["orthanc_metadata"], case["recorded_study"]
        assert metadata["CxrTriagePriority"] == recorded["priority"]
        assert metadata["CxrTriagePriority"] in ("urgent", "priority", "review", "routine")
        assert metadata["CxrTriageFinding"] == recorded["label"] == row["label"]
        assert metadata["CxrTriageModel"] == recorded["model"] == "test-tiny"
        assert metadata["CxrTriageReason"]
        names = {"CxrTriagePriority", "CxrTriageFinding", "CxrTriageReason", "CxrTriageModel"}
        assert names <= set(case["orthanc_metadata_names"])
        assert [(u["state"], u["attempts"]) for u in case["orthanc_updates"]] == [("sent", 1)]
        # Pixelmed, as IHE's AI Results tools validate: no error, and only the warnings docs/SR.md justifies.
        assert case["pixelmed_errors"] == [], (route, case["pixelmed_errors"])
        for warning in case["pixelmed_warnings"]:
            assert re.sub(r"^Warning: [\d.]+: ", "", warning) in SR_DOC.read_text(encoding="utf-8"), (route, warning)
