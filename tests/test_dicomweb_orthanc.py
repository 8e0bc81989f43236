"""DICOMweb both ways with a real peer: Orthanc 1.10 with its DICOMweb plugin (Debian ``orthanc-dicomweb``) sends a
chest CR to cxr-triage's STOW-RS endpoint, cxr-triage sends the SR back to Orthanc by STOW-RS with its heatmap
Secondary Capture in the same request, and the SR and the heatmap object are then retrieved from Orthanc by WADO-RS.
Orthanc's HTTP API requires a user: cxr-triage sends with basic authentication.

Orthanc binds every interface, so the scenario (tests/e2e_dicomweb_scenario.py) runs in its own network namespace
under ``unshare -n``; all traffic is on that namespace's 127.0.0.1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cxr_triage.testing import peers

pytestmark = pytest.mark.peers

SCENARIO = Path(__file__).resolve().parent / "e2e_dicomweb_scenario.py"


def test_orthanc_stores_by_stow_rs_and_retrieves_the_sr_and_its_heatmap_by_wado_rs(tmp_path: Path) -> None:
    done = peers.run_scenario(peers.netns_command([sys.executable, str(SCENARIO), str(tmp_path / "work")]), 400)
    assert done.returncode == 0, f"scenario failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-8000:]}"
    summary = json.loads(done.stdout.strip().splitlines()[-1])

    # In: Orthanc's STOW-RS client stored the CR here; it was recorded and classified.
    assert summary["orthanc_stow_answer"]["InstancesCount"] == "1"
    [row] = summary["results"]
    assert row["sop_instance_uid"] == summary["source_sop_instance_uid"]
    assert row["status"] == "ok" and row["model_version"] == "test-tiny"
    # Out: its SR went to Orthanc by STOW-RS (the only route: no [forward] destination), stored at the first try,
    # with the user Orthanc requires (basic authentication, the password from a file).
    assert summary["orthanc_without_credentials"] == 401
    [stored] = summary["outbox"]
    assert (stored["kind"], stored["destination"], stored["state"]) == ("dicomweb", "orthanc", "sent")
    assert (stored["attempts"], stored["status"]) == (1, 200)
    assert stored["sr_sop_instance_uid"] == row["sr_sop_instance_uid"]
    assert summary["status_outboxes"]["dicomweb"] == {"pending": 0, "sent": 1, "dead": 0}
    # WADO-RS from Orthanc gives back that SR, in the image's study, naming the image and its heatmap as evidence.
    wado = summary["wado_rs"]
    assert wado["sop_instance_uid"] == row["sr_sop_instance_uid"]
    assert wado["study_instance_uid"] == summary["source_study_instance_uid"]
    assert wado["modality"] == "SR"
    # Beside it in the study, by WADO-RS too: the heatmap Secondary Capture it references, sent in its request.
    [heatmap] = summary["beside_the_sr"]
    assert heatmap["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.7"
    assert heatmap["study_instance_uid"] == summary["source_study_instance_uid"]
    assert sorted(wado["evidence"]) == sorted([summary["source_sop_instance_uid"], heatmap["sop_instance_uid"]])
