"""End-to-end scenarios with Orthanc as the PACS, run inside a private network namespace (see tests/peers.py).

    unshare -n -- sh -c 'ip link set lo up && exec "$0" "$@"' python tests/e2e_orthanc_scenario.py routing DIR
    unshare -n -- sh -c '...' python tests/e2e_orthanc_scenario.py pipeline DIR --route rest|lua

``routing``: Orthanc configured from deploy/orthanc/orthanc.json with deploy/orthanc/cxr-triage.lua, a dcmtk
storescp standing in for the listener; a CR, a DX for presentation, a DX for processing and a Secondary Capture
are sent to Orthanc by storescu; reports which of them the Lua script forwarded.

``pipeline``: Orthanc, ``cxr-triage db upgrade`` and ``cxr-triage serve`` (SQLite, tiny random model, SRs forwarded
to Orthanc). ``--route rest``: the CR is uploaded by REST and pushed with POST /modalities/cxr-triage/store.
``--route lua``: Orthanc runs the production configuration and Lua script and the CR arrives by C-STORE, as
from a modality. Waits (bounded) for the result row and for the SR in Orthanc, then reports where Orthanc filed it.

The last line of stdout is a JSON summary the pytest tests assert on; on failure the exit status is 1 and
stderr holds the error and the tails of the logs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import peers
import pydicom

DEPLOY = peers.REPO / "deploy" / "orthanc"
LISTENER_AET = "CXR_TRIAGE"
ORTHANC_AET = "ORTHANC"
MODALITY = "cxr-triage"
"""The DicomModalities name used by deploy/orthanc/orthanc.json and cxr-triage.lua."""


def production_orthanc(workdir: Path, dicom_port: int, http_port: int, listener_port: int) -> peers.Orthanc:
    """Orthanc from the production example, with local ports and storage and the repo's Lua script."""
    return peers.Orthanc(
        workdir,
        dicom_port,
        http_port,
        ae_title=ORTHANC_AET,
        modalities={MODALITY: (LISTENER_AET, listener_port)},
        lua_scripts=[DEPLOY / "cxr-triage.lua"],
        base=peers.read_orthanc_json(DEPLOY / "orthanc.json"),
    )


def lookup_instance(orthanc: peers.Orthanc, sop_instance_uid: str) -> str | None:
    found = orthanc.request("POST", "/tools/lookup", sop_instance_uid.encode(), "text/plain")
    ids = [item["ID"] for item in found or [] if item.get("Type") == "Instance"]
    return ids[0] if ids else None


def routing(workdir: Path, timeout: float) -> dict[str, Any]:
    dicom_port, http_port, scp_port = peers.free_ports(3)
    images = workdir / "images"
    images.mkdir(parents=True)
    study = pydicom.uid.generate_uid()
    cases = {
        "cr": peers.generate_chest_cr(images / "cr.dcm", study_uid=study, seed=1, modality="CR"),
        "dx": peers.generate_chest_cr(images / "dx.dcm", study_uid=study, seed=2, modality="DX"),
        "dx_for_processing": peers.generate_chest_cr(
            images / "dxp.dcm", study_uid=study, seed=3, modality="DX", for_processing=True
        ),
        "secondary_capture": peers.generate_chest_cr(images / "ot.dcm", study_uid=study, seed=4, modality="OT"),
    }
    uids = {name: str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for name, path in cases.items()}
    with (
        peers.Storescp(workdir / "listener", scp_port, ae_title=LISTENER_AET) as scp,
        production_orthanc(workdir / "orthanc", dicom_port, http_port, scp_port) as orthanc,
    ):
        sent = peers.storescu(dicom_port, list(cases.values()), called_ae=ORTHANC_AET, calling_ae="MODALITY")
        stored = {name: lookup_instance(orthanc, uid) is not None for name, uid in uids.items()}
        peers.wait_until(lambda: len(scp.received()) >= 2, timeout, "Orthanc's Lua routing to reach storescp")

        def jobs_settled() -> bool:
            jobs = [orthanc.get(f"/jobs/{job}") for job in orthanc.get("/jobs")]
            return all(job["State"] in ("Success", "Failure") for job in jobs)

        peers.wait_until(jobs_settled, timeout, "Orthanc's routing jobs to finish")
        received = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in scp.received()]
    return {
        "storescu_returncode": sent.returncode,
        "stored_in_orthanc": stored,
        "routed": sorted(name for name, uid in uids.items() if uid in received),
        "received_count": len(received),
    }


def pipeline(workdir: Path, route: str, image: Path, timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    listener_port, dicom_port, http_port = peers.free_ports(3)
    workdir.mkdir(parents=True, exist_ok=True)
    model = peers.make_tiny_checkpoint(workdir / "model.pt")
    config = peers.write_config(
        workdir / "cxr-triage.toml",
        {
            "listener": {"ae_title": LISTENER_AET, "host": "127.0.0.1", "port": listener_port},
            "storage": {"spool_dir": str(workdir / "spool"), "sr_dir": str(workdir / "sr"), "min_free_mb": 1},
            "database": {"url": f"sqlite:///{workdir / 'cxr-triage.sqlite'}"},
            "model": {"path": str(model), "device": "cpu", "batch_size": 4},
            "worker": {"processes": 1, "poll_interval": 0.2, "study_quiet_seconds": 2},
            "forward": {
                "destinations": [{"ae_title": ORTHANC_AET, "host": "127.0.0.1", "port": dicom_port}],
                "backoff_seconds": 1,
                "timeout": 20,
            },
        },
    )
    peers.cli("db", "upgrade", config=config)
    if route == "lua":
        orthanc = production_orthanc(workdir / "orthanc", dicom_port, http_port, listener_port)
    else:
        orthanc = peers.Orthanc(
            workdir / "orthanc",
            dicom_port,
            http_port,
            ae_title=ORTHANC_AET,
            modalities={MODALITY: (LISTENER_AET, listener_port)},
        )
    source = pydicom.dcmread(image, stop_before_pixels=True)
    sop_uid, study_uid = str(source.SOPInstanceUID), str(source.StudyInstanceUID)
    with orthanc, peers.Server(config, listener_port, log=workdir / "serve.log") as server:
        try:
            if route == "rest":
                uploaded = orthanc.upload(image)
                orthanc.store_to_modality(MODALITY, [uploaded["ID"]])
            else:
                sent = peers.storescu(dicom_port, [image], called_ae=ORTHANC_AET, calling_ae="MODALITY")
                if lookup_instance(orthanc, sop_uid) is None:
                    raise peers.PeerError(f"storescu to Orthanc stored nothing: {sent.stdout}{sent.stderr}")
            orthanc_study = orthanc.get(f"/instances/{lookup_instance(orthanc, sop_uid)}/study")["ID"]

            def sr_in_orthanc() -> str | None:
                if not server.alive():
                    raise peers.PeerError("cxr-triage serve exited")
                series = orthanc.post("/tools/find", {"Level": "Series", "Query": {"Modality": "SR"}})
                instances = [i for s in series for i in orthanc.get(f"/series/{s}")["Instances"]]
                return instances[0] if instances else None

            sr_orthanc_id = peers.wait_until(sr_in_orthanc, timeout, f"the SR of {sop_uid} to arrive in Orthanc", 0.5)
            time.sleep(1.0)  # anything routed back by mistake (an SR looping) would show up by now
            all_rows = peers.results(config)
            rows = [r for r in all_rows if r.get("sop_instance_uid") == sop_uid]
            if len(rows) != 1:
                raise peers.PeerError(f"expected one result row for {sop_uid}, got {rows}")
            row = rows[0]
            sr_instance = orthanc.get(f"/instances/{sr_orthanc_id}")
            sr_series = orthanc.get(f"/series/{sr_instance['ParentSeries']}")
            series_in_study = orthanc.get(f"/studies/{orthanc_study}/series")
            sr_path = workdir / "sr-from-orthanc.dcm"
            sr_path.write_bytes(orthanc.request_bytes(f"/instances/{sr_orthanc_id}/file"))
            sr = pydicom.dcmread(sr_path)
            evidence = [
                str(item.ReferencedSOPInstanceUID)
                for study in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
                for series in study.get("ReferencedSeriesSequence", [])
                for item in series.get("ReferencedSOPSequence", [])
            ]
            sr_count = len(orthanc.post("/tools/find", {"Level": "Instance", "Query": {"Modality": "SR"}}))
            studies, patients = len(orthanc.get("/studies")), len(orthanc.get("/patients"))
            dciodvfy = subprocess.run(["dciodvfy", str(sr_path)], capture_output=True, text=True, timeout=60)
        except BaseException:
            print(f"--- serve.log ---\n{peers.tail(server.log)}", file=sys.stderr)
            print(f"--- orthanc.log ---\n{peers.tail(orthanc.log)}", file=sys.stderr)
            raise
    return {
        "route": route,
        "sop_instance_uid": sop_uid,
        "study_instance_uid": study_uid,
        "result": row,
        "results_count": len(all_rows),
        "orthanc_studies": studies,
        "orthanc_patients": patients,
        "orthanc_study": orthanc_study,
        "sr_parent_study": sr_series["ParentStudy"],
        "sr_series_modality": sr_series["MainDicomTags"].get("Modality"),
        "sr_sop_instance_uid": str(sr.SOPInstanceUID),
        "sr_instances_in_orthanc": sr_count,
        "series_in_study": len(series_in_study),
        "sr_study_instance_uid": str(sr.StudyInstanceUID),
        "sr_patient_id_matches": str(sr.get("PatientID", "")) == str(source.get("PatientID", "")),
        "sr_evidence": evidence,
        "dciodvfy_errors": [line for line in (dciodvfy.stdout + dciodvfy.stderr).splitlines() if "Error" in line],
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=["routing", "pipeline"])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--route", choices=["rest", "lua"], default="rest")
    parser.add_argument("--image", type=Path, default=peers.SAMPLE_CR)
    parser.add_argument("--timeout", type=float, default=90.0, help="deadline of each wait, seconds")
    args = parser.parse_args(argv)
    if not peers.in_private_netns():
        parser.error("run inside a private network namespace: Orthanc and storescp bind every interface")
    if args.scenario == "routing":
        summary = routing(args.workdir, args.timeout)
    else:
        summary = pipeline(args.workdir, args.route, args.image, args.timeout)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
