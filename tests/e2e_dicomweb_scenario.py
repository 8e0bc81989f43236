"""DICOMweb end to end with Orthanc and its DICOMweb plugin, inside a private network namespace (tests/peers.py).

    unshare -n -- sh -c 'ip link set lo up && exec "$0" "$@"' python tests/e2e_dicomweb_scenario.py DIR

``cxr-triage serve`` (SQLite, tiny random model) with its STOW-RS endpoint on (a bearer token) and one
``[dicomweb]`` destination, Orthanc's DICOMweb API; no ``[forward]`` destination, so an SR reaches Orthanc only by
STOW-RS, as a user Orthanc's HTTP API requires (basic authentication, the password read from a file). Orthanc
(plugin ``libOrthancDicomWeb.so``) knows cxr-triage as a DICOMweb server (``DicomWeb.Servers``,
with the token as an HTTP header). A chest CR uploaded to Orthanc is sent to cxr-triage by Orthanc's STOW-RS
client (``POST /dicom-web/servers/cxr-triage/stow``); cxr-triage classifies it and sends its SR back by STOW-RS;
the SR is then retrieved from Orthanc by WADO-RS (``GET /dicom-web/studies/.../instances/...``) and parsed,
and so is every other instance of the study (the heatmap Secondary Capture, sent in the SR's request).

The last line of stdout is a JSON summary the pytest test asserts on; on failure the exit status is 1 and stderr
holds the error and the tails of the logs.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pydicom

from cxr_triage.dicom import multipart
from cxr_triage.testing import peers, synthetic

TOKEN_ENV = "CXR_E2E_STOW_TOKEN"
TOKEN = "e2e-token-5b0c1f0d9a"
ORTHANC_USER = ("cxr-triage", "e2e-password-77c1e0")
"""Orthanc's HTTP API requires this user: cxr-triage sends the SRs with it (basic authentication, password file)."""
SERVER = "cxr-triage"
"""cxr-triage's name in Orthanc's ``DicomWeb.Servers``."""


def configuration(workdir: Path, listener_port: int, stow_port: int, http_port: int) -> Path:
    model = peers.make_tiny_checkpoint(workdir / "model.pt")
    password = workdir / "orthanc-password"
    password.write_text(ORTHANC_USER[1] + "\n")
    return peers.write_config(
        workdir / "cxr-triage.toml",
        peers.example_config(
            "sqlite",
            {
                "listener": {"host": "127.0.0.1", "port": listener_port},
                "storage": {"spool_dir": str(workdir / "spool"), "sr_dir": str(workdir / "sr"), "min_free_mb": 1},
                "database": {"url": f"sqlite:///{workdir / 'cxr-triage.sqlite'}"},
                "model": {"path": str(model), "device": "cpu", "batch_size": 4},
                "worker": {"processes": 1, "poll_interval": 0.2, "study_quiet_seconds": 2},
                "gate": {"enabled": False},
                "forward": {"destinations": []},
                "dicomweb": {
                    "destinations": [
                        {
                            "name": "orthanc",
                            "url": f"http://127.0.0.1:{http_port}/dicom-web",
                            "username": ORTHANC_USER[0],
                            "password_file": str(password),
                        }
                    ],
                    "backoff_seconds": 1,
                    "timeout": 20,
                    "stow_enabled": True,
                    "stow_port": stow_port,
                    "stow_token_env": TOKEN_ENV,
                },
            },
        ),
    )


def dicomweb_orthanc(workdir: Path, dicom_port: int, http_port: int, stow_port: int) -> peers.Orthanc:
    server = {"Url": f"http://127.0.0.1:{stow_port}/", "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"}}
    base = {"DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {SERVER: server}}}
    return peers.Orthanc(workdir, dicom_port, http_port, base=base, plugins=[peers.ORTHANC_DICOMWEB], user=ORTHANC_USER)


def wado_rs(orthanc: peers.Orthanc, study: str, series: str, instance: str) -> pydicom.Dataset:
    """The instance, retrieved by WADO-RS and read from the multipart answer."""
    path = f"/dicom-web/studies/{study}/series/{series}/instances/{instance}"
    accept = 'multipart/related; type="application/dicom"'
    url = f"http://127.0.0.1:{orthanc.http_port}{path}"
    import urllib.request

    headers = {"Accept": accept, "Authorization": "Basic " + base64.b64encode(":".join(ORTHANC_USER).encode()).decode()}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as response:
        _, params = multipart.parse_content_type(response.headers["Content-Type"])
        reader = multipart.MultipartReader(params["boundary"])
        parts: list[bytearray] = []
        for event in reader.feed(response.read()):
            if isinstance(event, multipart.PartStart):
                parts.append(bytearray())
            elif isinstance(event, multipart.PartData):
                parts[-1] += event.data
        reader.finish()
    if len(parts) != 1:
        raise peers.PeerError(f"WADO-RS of {instance}: {len(parts)} parts")
    return pydicom.dcmread(io.BytesIO(bytes(parts[0])))


def study_by_wado_rs(orthanc: peers.Orthanc, study: str, skip: set[str]) -> list[dict[str, Any]]:
    """Each instance of ``study`` in Orthanc but those of ``skip``, retrieved by WADO-RS: its UIDs and Modality."""
    found = []
    for instance_id in orthanc.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study}}):
        tags = orthanc.get(f"/instances/{instance_id}/simplified-tags")
        if tags["SOPInstanceUID"] in skip:
            continue
        ds = wado_rs(orthanc, study, tags["SeriesInstanceUID"], tags["SOPInstanceUID"])
        found.append(
            {
                "sop_class_uid": str(ds.SOPClassUID),
                "sop_instance_uid": str(ds.SOPInstanceUID),
                "study_instance_uid": str(ds.StudyInstanceUID),
                "modality": str(ds.Modality),
            }
        )
    return found


def anonymous_status(orthanc: peers.Orthanc) -> int:
    """The HTTP status Orthanc answers a request without credentials (its API requires ``ORTHANC_USER``)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{orthanc.http_port}/dicom-web/studies", timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def scenario(workdir: Path, timeout: float) -> dict[str, Any]:
    """Orthanc -> STOW-RS -> cxr-triage -> SR -> STOW-RS -> Orthanc -> WADO-RS."""
    started = time.monotonic()
    listener_port, stow_port, dicom_port, http_port = peers.free_ports(4)
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ[TOKEN_ENV] = TOKEN
    config = configuration(workdir, listener_port, stow_port, http_port)
    image = synthetic.chest_file(workdir / "cr.dcm", patient_id="E2E-WEB", seed=11)
    source = pydicom.dcmread(image, stop_before_pixels=True)
    peers.cli("db", "upgrade", config=config)
    orthanc = dicomweb_orthanc(workdir / "orthanc", dicom_port, http_port, stow_port)
    with orthanc, peers.Server(config, listener_port, log=workdir / "serve.log") as server:
        try:
            uploaded = orthanc.upload(image)
            stow = orthanc.post(
                f"/dicom-web/servers/{SERVER}/stow", {"Resources": [uploaded["ID"]], "Synchronous": True}
            )

            def sr_in_orthanc() -> list[str] | None:
                if not server.alive():
                    raise peers.PeerError("cxr-triage serve exited")
                found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {"Modality": "SR"}})
                return found or None

            [sr_id] = peers.wait_until(sr_in_orthanc, timeout, "the SR to arrive in Orthanc by STOW-RS", 0.5)
            tags = orthanc.get(f"/instances/{sr_id}/simplified-tags")
            retrieved = wado_rs(orthanc, tags["StudyInstanceUID"], tags["SeriesInstanceUID"], tags["SOPInstanceUID"])
            skip = {str(source.SOPInstanceUID), tags["SOPInstanceUID"]}
            beside = study_by_wado_rs(orthanc, tags["StudyInstanceUID"], skip)
            rows = peers.results(config)
            outbox = [json.loads(line) for line in peers.cli("forward", "--json", config=config).stdout.splitlines()]
            status = json.loads(peers.cli("status", "--json", config=config, check=False).stdout)
            anonymous = anonymous_status(orthanc)
        except BaseException:
            print(f"--- serve.log ---\n{peers.tail(server.log)}", file=sys.stderr)
            print(f"--- orthanc.log ---\n{peers.tail(orthanc.log)}", file=sys.stderr)
            raise
    return {
        "source_sop_instance_uid": str(source.SOPInstanceUID),
        "source_study_instance_uid": str(source.StudyInstanceUID),
        "orthanc_stow_answer": stow,
        "orthanc_without_credentials": anonymous,
        "results": rows,
        "outbox": outbox,
        "status_outboxes": status["outboxes"],
        "wado_rs": {
            "sop_instance_uid": str(retrieved.SOPInstanceUID),
            "study_instance_uid": str(retrieved.StudyInstanceUID),
            "modality": str(retrieved.Modality),
            "sop_class_uid": str(retrieved.SOPClassUID),
            "evidence": [
                str(item.ReferencedSOPInstanceUID)
                for ev in retrieved.get("CurrentRequestedProcedureEvidenceSequence", [])
                for series in ev.get("ReferencedSeriesSequence", [])
                for item in series.get("ReferencedSOPSequence", [])
            ],
        },
        "beside_the_sr": beside,
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline of each wait, seconds")
    args = parser.parse_args(argv)
    peers.stop_on_sigterm()
    if not peers.in_private_netns():
        parser.error("run inside a private network namespace: Orthanc binds every interface")
    print(json.dumps(scenario(args.workdir, args.timeout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
