"""End-to-end scenarios with Orthanc as the PACS, run inside a private network namespace (see tests/peers.py).

    unshare -n -- sh -c 'ip link set lo up && exec "$0" "$@"' python tests/e2e_orthanc_scenario.py routing DIR
    unshare -n -- sh -c '...' python tests/e2e_orthanc_scenario.py pipeline DIR [--image CR.dcm]

Orthanc runs the production example, deploy/orthanc/orthanc.json with deploy/orthanc/cxr-triage.lua, with
local ports and storage.

``routing``: a dcmtk storescp stands in for the listener; a CR, a DX for presentation, a DX for processing and a
Secondary Capture are sent to Orthanc by storescu, and a CR is uploaded by REST; reports which the Lua script
forwarded.

``pipeline``: ``cxr-triage db upgrade`` and ``cxr-triage serve`` (SQLite, tiny random model, SRs forwarded to
Orthanc, whose forward destination has its REST URL, so each study's triage result is also set as Orthanc user
metadata, declared by the production orthanc.json). A real chest CR reaches Orthanc by C-STORE, as from a
modality, and the Lua script routes it; a generated CR of another patient is uploaded by REST and pushed with
POST /modalities/cxr-triage/store. Waits (bounded) for both SRs in Orthanc, then reports the result rows, where
Orthanc filed each SR and its heatmap object (the Secondary Capture the SR references, sent before it) and what
dciodvfy and Pixelmed's SR validator say of them, and each study's metadata in Orthanc.

The last line of stdout is a JSON summary the pytest tests assert on; on failure the exit status is 1 and
stderr holds the error and the tails of the logs.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import select

from cxr_triage.core import db
from cxr_triage.outputs import orthanc as triage_orthanc
from cxr_triage.testing import peers, synthetic

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
        "cr": synthetic.chest_file(images / "cr.dcm", study_uid=study, seed=1, modality="CR"),
        "dx": synthetic.chest_file(images / "dx.dcm", study_uid=study, seed=2, modality="DX"),
        "dx_for_processing": synthetic.chest_file(
            images / "dxp.dcm", study_uid=study, seed=3, modality="DX", for_processing=True
        ),
        "secondary_capture": synthetic.chest_file(images / "ot.dcm", study_uid=study, seed=4, modality="OT"),
    }
    uids = {name: str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for name, path in cases.items()}
    with (
        peers.Storescp(workdir / "listener", scp_port, ae_title=LISTENER_AET) as scp,
        production_orthanc(workdir / "orthanc", dicom_port, http_port, scp_port) as orthanc,
    ):
        sent = peers.storescu(dicom_port, list(cases.values()), called_ae=ORTHANC_AET, calling_ae="MODALITY")
        rest_cr = synthetic.chest_file(images / "cr-rest.dcm", study_uid=study, seed=5, modality="CR")
        orthanc.upload(rest_cr)
        uids["cr_uploaded_by_rest"] = str(pydicom.dcmread(rest_cr, stop_before_pixels=True).SOPInstanceUID)
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


def sr_summary(orthanc: peers.Orthanc, workdir: Path, source_id: str, row: dict[str, Any]) -> dict[str, Any]:
    """Where Orthanc filed the SR of one routed instance, and what the SR says."""
    study = orthanc.get(f"/instances/{source_id}/study")["ID"]
    sr_id = lookup_instance(orthanc, row["sr_sop_instance_uid"]) if row.get("sr_sop_instance_uid") else None
    if sr_id is None:
        return {"result": row, "orthanc_study": study, "sr_in_orthanc": False}
    sr_series = orthanc.get(f"/series/{orthanc.get(f'/instances/{sr_id}')['ParentSeries']}")
    sr_path = workdir / f"sr-{sr_id}.dcm"
    sr_path.write_bytes(orthanc.request_bytes(f"/instances/{sr_id}/file"))
    sr = pydicom.dcmread(sr_path)
    source = pydicom.dcmread(io.BytesIO(orthanc.request_bytes(f"/instances/{source_id}/file")), stop_before_pixels=True)
    evidence = [
        str(item.ReferencedSOPInstanceUID)
        for ev_study in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in ev_study.get("ReferencedSeriesSequence", [])
        for item in series.get("ReferencedSOPSequence", [])
    ]
    dciodvfy = subprocess.run(["dciodvfy", str(sr_path)], capture_output=True, text=True, timeout=60)
    return {
        **heatmap_summary(orthanc, workdir, study, [uid for uid in evidence if uid != str(source.SOPInstanceUID)]),
        "result": row,
        "sr_in_orthanc": True,
        "orthanc_study": study,
        "sr_parent_study": sr_series["ParentStudy"],
        "sr_series_modality": sr_series["MainDicomTags"].get("Modality"),
        "series_in_study": len(orthanc.get(f"/studies/{study}/series")),
        "source_study_instance_uid": str(source.StudyInstanceUID),
        "sr_study_instance_uid": str(sr.StudyInstanceUID),
        "sr_patient_id_matches": str(sr.get("PatientID", "")) == str(source.get("PatientID", "")),
        "sr_evidence": evidence,
        "dciodvfy_errors": [line for line in (dciodvfy.stdout + dciodvfy.stderr).splitlines() if "Error" in line],
        "sr_path": str(sr_path),
    }


def heatmap_summary(orthanc: peers.Orthanc, workdir: Path, study: str, referenced: list[str]) -> dict[str, Any]:
    """The heatmap object the SR references besides its image: whether Orthanc has it, in which study and series,
    its SOP class, and what dciodvfy says of it."""
    found = [lookup_instance(orthanc, uid) for uid in referenced]
    if len(found) != 1 or found[0] is None:
        return {"heatmap_in_orthanc": False, "heatmap_references": referenced}
    instance = orthanc.get(f"/instances/{found[0]}")
    series = orthanc.get(f"/series/{instance['ParentSeries']}")
    path = workdir / f"heatmap-{found[0]}.dcm"
    path.write_bytes(orthanc.request_bytes(f"/instances/{found[0]}/file"))
    heatmap = pydicom.dcmread(path, stop_before_pixels=True)
    checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return {
        "heatmap_in_orthanc": True,
        "heatmap_parent_study": series["ParentStudy"],
        "heatmap_in_same_study": series["ParentStudy"] == study,
        "heatmap_sop_class_uid": str(heatmap.SOPClassUID),
        "heatmap_burned_in_annotation": str(heatmap.get("BurnedInAnnotation", "")),
        "heatmap_dciodvfy_errors": [x for x in (checked.stdout + checked.stderr).splitlines() if "Error" in x],
    }


def study_metadata(orthanc: peers.Orthanc, config: Path, study_id: str, timeout: float) -> dict[str, Any]:
    """Wait for cxr-triage's user metadata on an Orthanc study; it, the names Orthanc lists, the priority and
    label cxr-triage recorded for the study, and its `forward --json` rows of kind orthanc."""

    def values() -> dict[str, str] | None:
        found = {}
        for name in triage_orthanc.METADATA:
            try:
                found[name] = orthanc.request_bytes(f"/studies/{study_id}/metadata/{name}").decode()
            except peers.PeerError:  # 404 until the study has been aggregated and its metadata set
                return None
        return found

    metadata = peers.wait_until(values, timeout, f"cxr-triage's metadata on Orthanc study {study_id}", 0.5)
    study_uid = orthanc.get(f"/studies/{study_id}")["MainDicomTags"]["StudyInstanceUID"]
    engine = db.make_engine(f"sqlite:///{config.parent / 'cxr-triage.sqlite'}", create_dirs=False)
    with db.read_session(engine) as session:
        study = session.scalars(select(db.Study).where(db.Study.study_instance_uid == study_uid)).one()
        recorded = {"priority": study.priority, "label": study.label, "model": study.priority_model_version}
    engine.dispose()
    listed = [json.loads(line) for line in peers.cli("forward", "--json", config=config).stdout.splitlines()]
    return {
        "orthanc_metadata": metadata,
        "orthanc_metadata_names": orthanc.get(f"/studies/{study_id}/metadata"),
        "recorded_study": recorded,
        "orthanc_updates": [r for r in listed if r["kind"] == "orthanc" and r["study_instance_uid"] == study_uid],
    }


def pipeline(workdir: Path, image: Path, timeout: float) -> dict[str, Any]:
    """Orthanc from the production example; ``image`` sent to it by C-STORE (routed by the Lua script), and a
    generated CR of another patient uploaded by REST (not routed: REST imports aren't) and pushed explicitly."""
    # One scenario read top to bottom, each step depending on the last: split, it would read worse.
    started = time.monotonic()
    listener_port, dicom_port, http_port = peers.free_ports(3)
    workdir.mkdir(parents=True, exist_ok=True)
    model = peers.make_tiny_checkpoint(workdir / "model.pt")
    # The single-host example (allow-list: only ORTHANC may send), made local.
    config = peers.write_config(
        workdir / "cxr-triage.toml",
        peers.example_config(
            "sqlite",
            {
                "listener": {"ae_title": LISTENER_AET, "host": "127.0.0.1", "port": listener_port},
                "storage": {"spool_dir": str(workdir / "spool"), "sr_dir": str(workdir / "sr"), "min_free_mb": 1},
                "database": {"url": f"sqlite:///{workdir / 'cxr-triage.sqlite'}"},
                "model": {"path": str(model), "device": "cpu", "batch_size": 4},
                "worker": {"processes": 1, "poll_interval": 0.2, "study_quiet_seconds": 2},
                "gate": {"enabled": False},  # the synthetic images sent here are not chest radiographs to it
                "forward": {
                    "destinations": [
                        {
                            "ae_title": ORTHANC_AET,
                            "host": "127.0.0.1",
                            "port": dicom_port,
                            "orthanc_url": f"http://127.0.0.1:{http_port}",
                        }
                    ],
                    "backoff_seconds": 1,
                    "timeout": 20,
                },
            },
        ),
    )
    rest_image = synthetic.chest_file(workdir / "rest-upload.dcm", patient_id="E2E-REST", seed=7)
    uids = {
        route: str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        for route, path in (("lua", image), ("rest", rest_image))
    }
    peers.cli("db", "upgrade", config=config)
    orthanc = production_orthanc(workdir / "orthanc", dicom_port, http_port, listener_port)
    with orthanc, peers.Server(config, listener_port, log=workdir / "serve.log") as server:
        try:
            sent = peers.storescu(dicom_port, [image], called_ae=ORTHANC_AET, calling_ae="MODALITY")
            if lookup_instance(orthanc, uids["lua"]) is None:
                raise peers.PeerError(f"storescu to Orthanc stored nothing: {sent.stdout}{sent.stderr}")
            uploaded = orthanc.upload(rest_image)
            pushed = orthanc.store_to_modality(MODALITY, [uploaded["ID"]])

            def srs_in_orthanc() -> list[str] | None:
                if not server.alive():
                    raise peers.PeerError("cxr-triage serve exited")
                found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {"Modality": "SR"}})
                return found if len(found) >= len(uids) else None

            peers.wait_until(srs_in_orthanc, timeout, f"{len(uids)} SRs to arrive in Orthanc", 0.5)
            time.sleep(1.0)  # anything routed twice, or an SR routed back, would show up by now
            rows = peers.results(config)
            cases = {}
            for route, uid in uids.items():
                matching = [r for r in rows if r.get("sop_instance_uid") == uid]
                if len(matching) != 1:
                    raise peers.PeerError(f"expected one result row for {uid}, got {matching}")
                cases[route] = sr_summary(orthanc, workdir, lookup_instance(orthanc, uid) or "", matching[0])
                cases[route].update(study_metadata(orthanc, config, cases[route]["orthanc_study"], timeout))
            checked = peers.pixelmed_validate([case["sr_path"] for case in cases.values() if "sr_path" in case])
            for case in cases.values():
                if "sr_path" in case:
                    case["pixelmed_errors"], case["pixelmed_warnings"] = checked[case["sr_path"]]
            sr_count = len(orthanc.post("/tools/find", {"Level": "Instance", "Query": {"Modality": "SR"}}))
            studies, patients = len(orthanc.get("/studies")), len(orthanc.get("/patients"))
        except BaseException:
            print(f"--- serve.log ---\n{peers.tail(server.log)}", file=sys.stderr)
            print(f"--- orthanc.log ---\n{peers.tail(orthanc.log)}", file=sys.stderr)
            raise
    return {
        "sop_instance_uids": uids,
        "rest_push_failed_instances": pushed.get("FailedInstancesCount") if isinstance(pushed, dict) else None,
        "cases": cases,
        "results_count": len(rows),
        "sr_instances_in_orthanc": sr_count,
        "orthanc_studies": studies,
        "orthanc_patients": patients,
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=["routing", "pipeline"])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--image", type=Path, default=peers.SAMPLE_CR)
    parser.add_argument("--timeout", type=float, default=90.0, help="deadline of each wait, seconds")
    args = parser.parse_args(argv)
    peers.stop_on_sigterm()
    if not peers.in_private_netns():
        parser.error("run inside a private network namespace: Orthanc and storescp bind every interface")
    if args.scenario == "routing":
        summary = routing(args.workdir, args.timeout)
    else:
        summary = pipeline(args.workdir, args.image, args.timeout)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
