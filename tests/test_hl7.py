"""HL7 ORU^R01 to the RIS: a real MLLP server (hl7apy's) receives each message, parses and validates it with hl7apy
and answers AA, AE or nothing; the fields, the correction after re-aggregation, retries with backoff, the dead
letter and `cxr-triage forward --retry`, the ACK checks and the [hl7] configuration errors."""

from __future__ import annotations

import datetime as dt
import io
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import chest_dataset, free_port, write_config
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message
from sqlalchemy import select

from cxr_triage.cli import main
from cxr_triage.core import db
from cxr_triage.core.config import ConfigError
from cxr_triage.core.settings import HL7Settings
from cxr_triage.ops import retention
from cxr_triage.ops.housekeeping import Housekeeping
from cxr_triage.outputs import hl7, hl7report
from cxr_triage.outputs.delivery import retry_delay


@dataclass
class Receiver:
    """What the MLLP server answers, in turn (``AA``, ``AE``, ``AR`` or ``silent``; the last one repeats), and
    the messages it received (ER7 text, each parsed and validated by hl7apy before it answered)."""

    answers: list[str]
    received: list[str] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_answer(self, message: str) -> str:
        with self.lock:
            self.received.append(message)
            return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


class ORUHandler(AbstractHandler):
    def __init__(self, message: str, receiver: Receiver) -> None:
        super().__init__(message)
        self.receiver = receiver

    def reply(self) -> str:
        parsed = parse_message(self.incoming_message, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        parsed.validate()
        answer = self.receiver.next_answer(self.incoming_message)
        if answer == "silent":
            self.receiver.released.wait(60)
            raise ConnectionAbortedError("the test's receiver stays silent")
        ack = Message("ACK", version="2.5.1", validation_level=VALIDATION_LEVEL.STRICT)
        ack.msh.msh_3.hd_1, ack.msh.msh_5.hd_1 = "RIS", "CXR_TRIAGE"
        ack.msh.msh_9.msg_1, ack.msh.msh_9.msg_2, ack.msh.msh_9.msg_3 = "ACK", "R01", "ACK"
        ack.msh.msh_10, ack.msh.msh_11.pt_1 = "ACK1", "P"
        ack.msa.msa_1, ack.msa.msa_2 = answer, parsed.msh.msh_10.value
        if answer != "AA":
            ack.msa.msa_3 = "patient unknown"
        return f"\x0b{ack.to_er7()}\r\x1c\r"


@contextmanager
def mllp_server(port: int, *answers: str) -> Iterator[Receiver]:
    receiver = Receiver(list(answers))
    server = MLLPServer("127.0.0.1", port, {"ORU^R01^ORU_R01": (ORUHandler, receiver)}, timeout=30)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.released.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


def _hl7_config(port: int, **extra: Any) -> dict[str, Any]:
    return {"destinations": [{"application": "RIS", "facility": "HOSP", "host": "127.0.0.1", "port": port}], **extra}


def _messages(harness) -> list[db.HL7Message]:
    with harness.sessions() as session:
        return list(session.scalars(select(db.HL7Message).order_by(db.HL7Message.id)).all())


def _parse(text: str) -> Any:
    return parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)


def _observations(order: Any) -> dict[str, Any]:
    """OBX segments by OBX-3.1."""
    return {group.obx.obx_3.ce_1.value: group.obx for group in order.oru_r01_observation}


def test_oru_is_accepted_with_the_dicom_identifiers_and_a_correction_follows_new_images(make_harness) -> None:
    port = free_port()
    harness = make_harness(hl7=_hl7_config(port, timeout=10))
    study_uid = pydicom.uid.generate_uid()
    header = {"StudyInstanceUID": study_uid, "PatientID": "PAT-42", "IssuerOfPatientID": "HOSP-MRN",
              "PatientName": "Doe^Jane", "AccessionNumber": "ACC123", "PatientSex": "F",
              "PatientBirthDate": "19800102", "StudyTime": "093000"}  # fmt: skip
    with mllp_server(port, "AA") as receiver:
        harness.send([chest_dataset(seed=1, **header)])
        harness.work()
        (row,) = _messages(harness)
        assert (row.state, row.attempts, row.ack_code, row.result_status) == (db.FORWARD_SENT, 1, "AA", "F")
        assert len(receiver.received) == 1

        message = _parse(receiver.received[0])
        assert message.msh.msh_10.value == row.control_id
        assert message.msh.msh_12.value == "2.5.1" and message.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
        assert (message.msh.msh_5.to_er7(), message.msh.msh_6.to_er7()) == ("RIS", "HOSP")
        result = message.oru_r01_patient_result
        pid = result.oru_r01_patient.pid
        assert pid.pid_3.to_er7() == "PAT-42^^^HOSP-MRN"
        assert pid.pid_5.to_er7() == "Doe^Jane" and pid.pid_7.to_er7() == "19800102" and pid.pid_8.to_er7() == "F"
        order = result.oru_r01_order_observation
        obr = order.obr
        assert obr.obr_3.to_er7() == order.orc.orc_3.to_er7() == "ACC123", "filler order number: the accession"
        assert obr.obr_18.to_er7() == "ACC123"
        assert obr.obr_25.to_er7() == "F"
        assert obr.obr_7.to_er7() == "20260101093000", "the study's date and time"
        with harness.sessions() as session:
            study = session.scalars(select(db.Study)).one()
            priority, label, probabilities = study.priority, study.label, study.summary["max_probabilities"]
        codes = harness.settings.hl7
        assert order.oru_r01_timing_qty.tq1.tq1_9.cwe_1.value == codes.priorities[priority]
        assert order.oru_r01_timing_qty.tq1.tq1_9.cwe_3.value == "HL70485"
        assert obr.obr_27.to_er7() == f"^^^^^{codes.priorities[priority]}", "OBR-27.6 for older receivers"
        obx = _observations(order)
        assert obx["113014"].obx_5.to_er7() == study_uid and obx["113014"].obx_11.to_er7() == "O"
        finding = obx[codes.finding_code.code]
        assert finding.obx_2.to_er7() == "CWE" and finding.obx_5.to_er7() == str(codes.finding_values[label])
        assert finding.obx_8.to_er7() == codes.abnormal_flags[priority]
        assert float(finding.obx_9.to_er7()) == pytest.approx(probabilities[label], abs=0.0005)
        for name, code in codes.probability_codes.items():
            assert obx[code.code].obx_2.to_er7() == "NM" and obx[code.code].obx_6.to_er7() == "%^percent^UCUM"
            assert float(obx[code.code].obx_5.to_er7()) == pytest.approx(100 * probabilities[name], abs=0.05)
        assert len(obx) == 1 + len(codes.probability_codes) + 1

        harness.send([chest_dataset(seed=2, **header)])  # a later image of the same study: re-aggregated
        harness.work()
        first, second = _messages(harness)
        assert (first.state, second.state, second.result_status) == (db.FORWARD_SENT, db.FORWARD_SENT, "C")
        corrected = _parse(receiver.received[1]).oru_r01_patient_result.oru_r01_order_observation
        assert corrected.obr.obr_25.to_er7() == "C"
        assert {g.obx.obx_11.to_er7() for g in corrected.oru_r01_observation} == {"C", "O"}


def test_the_message_is_built_from_the_database_after_retention_deleted_the_spool_file(make_harness, caplog) -> None:
    caplog.set_level("DEBUG", logger="cxr_triage")
    port = free_port()
    harness = make_harness(hl7=_hl7_config(port, timeout=10))
    procedure = pydicom.Dataset()
    procedure.CodeValue, procedure.CodingSchemeDesignator, procedure.CodeMeaning = "RPID42", "RADLEX", "XR chest PA"
    header = {"StudyInstanceUID": pydicom.uid.generate_uid(), "PatientID": "PAT-43", "IssuerOfPatientID": "HOSP-MRN",
              "PatientName": "Roe^Richard^Q^^Dr", "AccessionNumber": "ACC124", "PatientSex": "M",
              "PatientBirthDate": "19700203", "StudyDate": "20260304", "StudyTime": "101500",
              "ProcedureCodeSequence": pydicom.Sequence([procedure])}  # fmt: skip
    dataset = chest_dataset(seed=6, **header)
    expected = hl7.StudyReport(**hl7report.report_from_header(_read_back(dataset)))
    with mllp_server(port, "AA") as receiver:
        harness.send([dataset])
        harness.worker.run_until_idle()
        (row,) = harness.rows()
        assert retention.purge_spool(harness.sessions, 1, now=db.utcnow() + dt.timedelta(days=2)) == 1
        assert not Path(row["path"]).exists()
        Housekeeping(harness.settings, harness.sessions).run_once()  # aggregation: the ORU^R01 is built now
        (message_row,) = _messages(harness)
        assert (message_row.state, message_row.ack_code) == (db.FORWARD_SENT, "AA"), message_row.last_error
        settings = harness.settings.hl7
        want = _parse(hl7.build_oru(expected, settings, settings.destinations[0], "X", dt.datetime.now(dt.UTC)))
        got = _parse(receiver.received[0])
        want_pid, got_pid = (m.oru_r01_patient_result.oru_r01_patient.pid for m in (want, got))
        assert got_pid.to_er7() == want_pid.to_er7()
        assert got_pid.pid_5.to_er7() == "Roe^Richard^Q^Dr" and got_pid.pid_3.to_er7() == "PAT-43^^^HOSP-MRN"
        assert (got_pid.pid_7.to_er7(), got_pid.pid_8.to_er7()) == ("19700203", "M")
        want_obr, got_obr = (m.oru_r01_patient_result.oru_r01_order_observation.obr for m in (want, got))
        for field_name in ("obr_2", "obr_3", "obr_4", "obr_7", "obr_18", "obr_44"):
            assert getattr(got_obr, field_name).to_er7() == getattr(want_obr, field_name).to_er7(), field_name
        assert got_obr.obr_4.to_er7() == "RPID42^XR chest PA^RADLEX" and got_obr.obr_7.to_er7() == "20260304101500"
        assert got_obr.obr_3.to_er7() == got_obr.obr_18.to_er7() == "ACC124"

        harness.send([chest_dataset(seed=7, **header)])  # a later image; the first file is still gone
        harness.work()
        first, second = _messages(harness)
        assert (second.state, second.result_status) == (db.FORWARD_SENT, "C")
        corrected = _parse(receiver.received[1]).oru_r01_patient_result.oru_r01_patient.pid
        assert corrected.to_er7() == want_pid.to_er7()
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("cxr_triage")]
    assert ours and not [m for m in ours if "PAT-43" in m or "Richard" in m], "logs carry UIDs, never patient data"


def test_ae_is_retried_after_the_backoff_and_then_accepted(make_harness) -> None:
    port = free_port()
    harness = make_harness(hl7=_hl7_config(port, backoff_seconds=10, backoff_max_seconds=60, timeout=10))
    with mllp_server(port, "AE", "AA") as receiver:
        harness.send([chest_dataset(seed=3)])
        harness.work()
        (row,) = _messages(harness)
        assert (row.state, row.attempts, row.ack_code) == (db.FORWARD_PENDING, 1, "AE")
        assert "AE" in row.last_error and "patient unknown" in row.last_error
        assert (row.next_attempt_at - row.updated_at).total_seconds() == retry_delay(1, 10, 60)
        assert hl7.process_due(harness.sessions, harness.settings.hl7) == [], "not due before the backoff"
        (outcome,) = hl7.process_due(harness.sessions, harness.settings.hl7, now=db.utcnow() + dt.timedelta(seconds=11))
        assert (outcome.state, outcome.attempts, outcome.ack) == (db.FORWARD_SENT, 2, "AA")
        assert receiver.received[0] == receiver.received[1], "the same message, control ID and all, is resent"


def test_no_answer_times_out_dead_letters_and_forward_retry_resends(make_harness, capsys) -> None:
    port = free_port()
    harness = make_harness(hl7=_hl7_config(port, timeout=1, max_attempts=2, backoff_seconds=5))
    config = write_config(harness.tmp / "cxr.toml", harness.config)
    with mllp_server(port, "silent", "silent", "AA") as receiver:
        harness.send([chest_dataset(seed=4)])
        harness.work()
        (row,) = _messages(harness)
        assert (row.state, row.attempts, row.ack_code) == (db.FORWARD_PENDING, 1, None)
        assert "no ACK" in row.last_error and "within 1 s" in row.last_error
        (outcome,) = hl7.process_due(harness.sessions, harness.settings.hl7, now=db.utcnow() + dt.timedelta(seconds=6))
        assert (outcome.state, outcome.attempts) == (db.FORWARD_DEAD, 2)

        assert main(["forward", "--json", "--config", str(config)]) == 0
        (listed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert (listed["kind"], listed["state"], listed["attempts"]) == ("hl7", "dead", 2)
        assert listed["study_instance_uid"] == harness.rows()[0]["study_instance_uid"]
        assert main(["forward", "--retry", "--json", "--config", str(config)]) == 0
        (resent,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert (resent["kind"], resent["state"], resent["attempts"], resent["ack"]) == ("hl7", "sent", 1, "AA")
        assert len(receiver.received) == 3
        (row,) = _messages(harness)
        assert row.state == db.FORWARD_SENT


def test_a_study_without_patient_id_is_dead_with_the_reason_and_not_resent(make_harness, capsys) -> None:
    port = free_port()
    harness = make_harness(hl7=_hl7_config(port))
    config = write_config(harness.tmp / "cxr.toml", harness.config)
    harness.send([chest_dataset(seed=5, PatientID="")])
    harness.work()
    (row,) = _messages(harness)
    assert row.state == db.FORWARD_DEAD and row.message is None and "no Patient ID" in row.last_error
    assert main(["forward", "--retry", "--config", str(config)]) == 1
    assert "could not be built" in capsys.readouterr().err
    assert _messages(harness)[0].state == db.FORWARD_DEAD


def _report(**changes: Any) -> hl7.StudyReport:
    return hl7.StudyReport(**{**hl7.sample_report().__dict__, **changes})


def test_values_with_hl7_delimiters_are_escaped_and_non_ascii_declared() -> None:
    settings = HL7Settings.from_table(_hl7_config(2575))
    name = ("Mü|ller", "Ann^Marie", "", "", "Dr&")
    text = hl7.build_oru(_report(patient_name=name, accession_number="A~1"), settings, settings.destinations[0],
                         "C1", dt.datetime(2026, 1, 1, tzinfo=dt.UTC))  # fmt: skip
    message = _parse(text)
    assert message.msh.msh_18.to_er7() == "UNICODE UTF-8"
    assert message.oru_r01_patient_result.oru_r01_patient.pid.pid_5.to_er7() == "Mü\\F\\ller^Ann\\S\\Marie^^^Dr\\T\\"
    assert message.oru_r01_patient_result.oru_r01_order_observation.obr.obr_18.to_er7() == r"A\R\1"
    ascii_only = hl7.build_oru(_report(), settings, settings.destinations[0], "C2", dt.datetime.now(dt.UTC))
    assert "UNICODE" not in ascii_only and ascii_only.endswith("\r")


def test_ack_checks() -> None:
    def ack(msa: str, extra: str = "") -> bytes:
        return f"\x0bMSH|^~\\&|RIS||CXR||20260101||ACK|9|P|2.3\rMSA|{msa}\r{extra}\x1c\r".encode()

    assert hl7.parse_ack(ack("AA|C1"), "C1").ok
    assert hl7.parse_ack(ack("CA|C1"), "C1").ok
    other = hl7.parse_ack(ack("AA|C2"), "C1")
    assert not other.ok and "not 'C1'" in other.detail
    rejected = hl7.parse_ack(ack("AR|C1", "ERR|||200^Unsupported message type^HL70357|E\r"), "C1")
    assert (rejected.ok, rejected.code) == (False, "AR") and "Unsupported message type" in rejected.detail
    garbage = hl7.parse_ack(b"\x0bhello\x1c\r", "C1")
    assert not garbage.ok and garbage.code is None and "not an HL7 ACK" in garbage.detail


def test_a_closed_port_is_a_connection_failure() -> None:
    result = hl7.exchange(hl7.HL7Destination("RIS", "127.0.0.1", free_port()), "MSH|^~\\&|\r", "C1", 5)
    assert (result.ok, result.connection_failed) == (False, True) and "refused" in result.detail


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"priorities": {"urgent": "S"}}, "priorities must name exactly urgent, priority, review, routine"),
        ({"finding_code": "121071^Finding"}, "[hl7] finding_code: '121071^Finding': expected code^text^system"),
        ({"destinations": [{"application": "RIS", "host": "ris"}]}, "[hl7] destinations[0]: destination"),
        ({"sending_application": "X" * 21}, "sending_application"),
        ({"processing_id": "Q"}, "processing_id = 'Q'"),
        ({"abnormal_flags": {"urgent": "A|", "priority": "A", "review": "", "routine": "N"}}, "abnormal_flags.urgent"),
    ],
)
def test_configuration_errors_name_the_key(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        HL7Settings.from_table({**_hl7_config(2575), **table})
    assert message in str(raised.value)


def test_default_codes_fit_a_message_and_a_site_may_replace_them() -> None:
    site = HL7Settings.from_table(
        {
            **_hl7_config(2575),
            "priorities": {"urgent": "S", "priority": "S", "review": "A", "routine": "R"},
            "finding_code": "CXR-AI^AI finding^L",
        }  # fmt: skip
    )
    assert site.priorities["priority"] == "S" and site.finding_code == hl7.HL7Code("CXR-AI", "AI finding", "L")
    assert HL7Settings().probability_codes == HL7Settings.from_table({}).probability_codes


def _read_back(dataset: pydicom.Dataset) -> pydicom.Dataset:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


@pytest.mark.parametrize(
    ("vr", "value"),
    [("UT", "A" * 70_000), ("OW", b"B" * 70_001), ("PN", "C" * 65 + "^D"), ("US", 7), ("PN", "")],
    ids=["text-70000", "odd-words", "over-64-per-group", "numeric", "empty"],
)
def test_an_unusable_or_empty_patient_name_is_sent_as_the_hl7_null(vr: str, value: Any, caplog) -> None:
    dataset = chest_dataset(PatientID="PID-77")
    dataset.add_new((0x0010, 0x0010), vr, value)
    with caplog.at_level("WARNING", logger="cxr_triage.hl7"):
        header = hl7report.report_from_header(_read_back(dataset))
    assert header["patient_name"] == ("", "", "", "", "")
    assert (f"VR {vr}" in caplog.text) == (value != "")
    assert "AAAA" not in caplog.text and "BBBB" not in caplog.text and "CCCC" not in caplog.text
    settings = HL7Settings.from_table(_hl7_config(2575))
    pid = _parse(hl7.build_oru(hl7.StudyReport(**header), settings, settings.destinations[0], "C1",
                               dt.datetime.now(dt.UTC))).oru_r01_patient_result.oru_r01_patient.pid  # fmt: skip
    assert (pid.pid_3.cx_1.to_er7(), pid.pid_5.to_er7()) == ("PID-77", '""')


def test_a_person_name_keeps_its_components_in_pid5() -> None:
    dataset = chest_dataset(PatientID="PID-78", PatientName="Doe^Jane^Q^Dr^III")
    header = hl7report.report_from_header(_read_back(dataset))
    assert header["patient_name"] == ("Doe", "Jane", "Q", "III", "Dr")
