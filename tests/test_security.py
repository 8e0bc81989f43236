"""No patient data and no credentials in what the node logs or prints: a full run (``cxr-triage serve`` at DEBUG on
PostgreSQL, whose URL holds a password, with a worker, a forwarding destination and an HL7 receiver both down)
receives instances whose patient attributes are distinctive strings, some of them classified, some refused, some
malformed where those strings are (a patient name with a wrong VR, a patient ID of a bad length), and then the
read-side commands run. Every log line and every command's output is searched for each of those strings and for
the password. (The calling-AE allow-list and TLS-only listeners: tests/test_listener.py; UIDs that try to steer a
path: tests/test_hostile_files.py.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import chest_dataset, config_values, send, write_config
from test_hostile_files import element, part10, with_raw, without

from cxr_triage.testing import peers

pytestmark = [pytest.mark.postgres, pytest.mark.peers]

TOKEN = os.urandom(3).hex().upper()
PATIENT = {
    "PatientName": f"Qzxwvemon{TOKEN}^Ylfrida",
    "PatientID": f"PID{TOKEN}77",
    "OtherPatientIDs": f"OPID{TOKEN}",
    "PatientBirthDate": "19230417",
    "ReferringPhysicianName": f"Drwxqu{TOKEN}^Ham",
    "PatientAddress": f"{TOKEN} Kestrel Lane",
}
"""Made-up patient attributes no log line or output may contain (the birth date too: it appears nowhere else)."""
PASSWORD = f"Sekr3t-{TOKEN}-pw"


def _instances(folder: Path) -> list[Path]:
    """The files sent: two classified, one refused, one without a Study UID, and five malformed where their
    patient data is (a patient name with a numeric VR and an odd length, a patient ID longer than LO allows, a
    patient name with a VR that does not exist, a patient name of 70,000 bytes, as text and as odd-length words,
    too long for the listener to decode): a parser's error message may quote the bytes it choked on."""
    from pydicom.uid import ExplicitVRLittleEndian

    folder.mkdir()
    made = []
    for index, extra in enumerate([{}, {}, {"ViewPosition": "LL"}, {"StudyInstanceUID": None}]):
        path = folder / f"{index}.dcm"
        chest_dataset(32, 32, seed=index, **PATIENT, **extra).save_as(path, enforce_file_format=True)
        made.append(path)
    name, patient_id = PATIENT["PatientName"].encode(), PATIENT["PatientID"].encode()
    huge = (name * (70001 // len(name) + 1))[:70001]
    for label, keyword, tag, vr, value in (
        ("odd-name", "PatientName", 0x00100010, b"US", name + b"x" * (1 - len(name) % 2)),
        ("long-id", "PatientID", 0x00100020, b"LO", (patient_id + b"\0" * 80)[:80]),
        ("bad-vr", "PatientName", 0x00100010, b"Q!", name + b" " * (len(name) % 2)),
        ("huge-name", "PatientName", 0x00100010, b"UT", huge + b" "),
        ("huge-odd-name", "PatientName", 0x00100010, b"OW", huge),
    ):
        ds = chest_dataset(32, 32, seed=len(made), **PATIENT)
        body = with_raw(without(ds, keyword), element(tag, vr, value), tag + 1)
        made.append(part10(folder / f"{label}.dcm", body, ExplicitVRLittleEndian, sop_uid=str(ds.SOPInstanceUID)))
    return made


def test_no_patient_data_or_password_in_any_log_or_output(tmp_path: Path, tiny_model: Path, postgres_url: str) -> None:
    from pydicom.uid import ExplicitVRLittleEndian

    from cxr_triage.ml.preprocess import CR_IMAGE_STORAGE

    url = postgres_url.replace("@127.0.0.1:", f":{PASSWORD}@127.0.0.1:")  # trust authentication: any password
    closed_dicom, closed_hl7 = peers.free_ports(2)
    values = config_values(
        tmp_path,
        tiny_model,
        database={"url": url},
        worker={"processes": 1, "threads": 1, "study_quiet_seconds": 1},
        forward={
            "destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": closed_dicom}],
            "backoff_seconds": 1,
            "timeout": 2,
        },
        hl7={"destinations": [{"application": "RIS", "host": "127.0.0.1", "port": closed_hl7}], "timeout": 2},
    )
    config = write_config(tmp_path / "cxr.toml", values)
    port = int(values["listener"]["port"])
    log = tmp_path / "serve.log"
    argv = [sys.executable, "-m", "cxr_triage", "--log-level", "DEBUG", "serve", "--config", str(config)]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    outputs: list[str] = []
    try:
        peers.wait_until(lambda: proc.poll() is not None or peers.dicom_ready(port, "CXR_TRIAGE"), 90, "serve")
        assert proc.poll() is None, peers.tail(log)
        statuses = {}
        for path in _instances(tmp_path / "in"):
            contexts = [(CR_IMAGE_STORAGE, ExplicitVRLittleEndian)]
            (statuses[path.name],) = send(port, [path], contexts=contexts, raw=True)
        assert statuses["0.dcm"] == statuses["1.dcm"] == statuses["2.dcm"] == 0, statuses
        assert statuses["3.dcm"] == 0xC211 and statuses["odd-name.dcm"] == 0xC210, statuses
        # classified and refused, the SRs tried against the closed PACS, each study's HL7 message against
        # the closed RIS
        peers.wait_until(lambda: _hl7_attempts(url) >= 3, 120, "three HL7 attempts", 0.5)
        commands = (["results"], ["results", "--json"], ["status"], ["forward", "--json"])
        running = [_command(args, config) for args in commands]  # at once: each starts a Python
        for args, command in zip(commands, running, strict=True):
            out, _ = command.communicate(timeout=180)
            outputs.append(f"$ cxr-triage {' '.join(args)}\n{out}")
    finally:
        peers.terminate(proc, timeout=30, group=True)
    texts = {"serve log (DEBUG)": log.read_text(errors="replace"), **{o.splitlines()[0]: o for o in outputs}}
    assert "received SOP instance" in texts["serve log (DEBUG)"] and "rejected" in texts["$ cxr-triage results"]
    assert "HL7" in texts["serve log (DEBUG)"] and "PACS@127.0.0.1" in texts["$ cxr-triage forward --json"]
    # digits only where no other digit touches them: the birth date must not match inside a UID
    patterns = {
        secret: re.compile(rf"(?<![0-9]){re.escape(secret)}(?![0-9])") for secret in [*PATIENT.values(), PASSWORD]
    }
    found = {
        (where, secret) for where, text in texts.items() for secret, pattern in patterns.items() if pattern.search(text)
    }
    assert found == set(), f"patient data or the password in: {sorted(found)}"


def _command(args: list[str], config: Path) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "cxr_triage", *args, "--config", str(config)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=config.parent)


def _hl7_attempts(url: str) -> int:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM hl7_messages WHERE attempts > 0")).scalar() or 0)
    except sa.exc.SQLAlchemyError:  # the tables are not there yet
        return 0
    finally:
        engine.dispose()
