"""HL7 v2.5.1 ORU^R01 with a finished study's result, sent to the RIS over MLLP, with retries and a dead letter.

When ``studies.aggregate_studies`` completes a study (again after new instances: a corrected result, OBR-25 "C"),
``enqueue`` adds one ``hl7_messages`` row per ``[hl7] destinations`` entry in the same transaction, holding the
encoded message; the housekeeping sends due rows (``process_due``) and checks each ACK: MSA-1 ``AA`` (or ``CA``)
accepted; ``AE``, ``AR``, another message's ACK or no ACK within ``[hl7] timeout`` is a failure, retried and
dead-lettered like SR forwarding (``cxr_triage.outputs.delivery``). ``cxr-triage forward --retry`` resends dead ones.

The message (built and validated with hl7apy; the ACK read with python-hl7, which takes any v2 version), after
IHE RAD-128 as dcm4chee-arc sends it:

- MSH: ``[hl7]`` sending application/facility, the destination's application/facility, control ID (echoed in
  MSA-2), processing ID; MSH-18 ``UNICODE UTF-8`` when the text is not ASCII (always sent as UTF-8).
- PID-3 Patient ID ^^^ Issuer of Patient ID, PID-5 name (HL7's null ``""`` where the header has none usable),
  PID-7 birth date, PID-8 sex; PV1-2 ``U``.
- ORC-1 ``RE``; ORC-2/OBR-2 placer order number (0040,2016), ORC-3/OBR-3 filler order number (0040,2017), else the
  Accession Number; OBR-18 the Accession Number; OBR-4/OBR-44 the images' procedure code, else
  ``[hl7] procedure_code``; OBR-7 Study Date/Time; OBR-22 when the result was made; OBR-25 ``F`` or ``C``;
  the priority in TQ1-9 (table 0485) and OBR-27.6 (retired in v2.5.1, read by dcm4chee-arc and older RIS).
- NTE: the priority's rule and reason, and that this is an AI triage suggestion for research use.
- OBX: the finding (CWE ``[hl7] finding_values`` of the worst label, OBX-8 ``[hl7] abnormal_flags`` of the priority,
  OBX-9 its probability 0-1; OBX-11 ``X`` when nothing was classified), one NM OBX per class probability in %
  (``[hl7] probability_codes``), and the Study Instance UID as ``113014^DICOM Study^DCM`` (OBX-11 ``O``).
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import socket
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import CLASS_NAMES, log_name
from cxr_triage.core import db
from cxr_triage.core.config import ConfigError
from cxr_triage.core.endpoints import HL7Code, HL7Destination
from cxr_triage.outputs import delivery, mllp
from cxr_triage.outputs.hl7report import ReportError, StudyReport, hl7_datetime, read_report, sample_report

if TYPE_CHECKING:
    from cxr_triage.core.settings import HL7Settings, Settings

logger = logging.getLogger(log_name(__name__))

VERSION = "2.5.1"
MAX_PER_ROUND = 10
"""Most messages sent in one round; each may take up to twice ``[hl7] timeout`` (connection, ACK)."""
ACCEPTED = ("AA", "CA")
"""MSA-1 codes of an accepted message (original mode; commit accept in enhanced mode)."""
HL7_NULL = '""'
"""HL7's explicit null: a required field whose value is not known."""
PRIORITY_NAMES = {"S": "Stat", "A": "ASAP", "R": "Routine", "P": "Preop", "C": "Callback", "T": "Timing critical"}
"""HL7 table 0485 (TQ1-9), whose codes table 0027 (OBR-27.6) shares."""
STUDY_UID_OBSERVATION = ("113014", "DICOM Study", "DCM")
"""OBX-3 of the Study Instance UID (IHE RAD-128, as dcm4chee-arc sends it)."""
PERCENT_UNITS = ("%", "percent", "UCUM")


# --- what the message says -----------------------------------------------------------------------------------


# --- building ------------------------------------------------------------------------------------------------


def _text(element: Any, name: str, value: str) -> None:
    """Set the leaf ``name`` of ``element`` to ``value`` as text: HL7's delimiters in it are escaped (a plain string
    would be parsed as ER7, its ``&`` taken for a subcomponent separator)."""
    from hl7apy.factories import datatype_factory

    leaf = getattr(element, name)
    setattr(element, name, datatype_factory(leaf.datatype, value, version=VERSION))


def _code(element: Any, code: HL7Code | tuple[str, str, str], prefix: str) -> None:
    """Set the three components of a CE/CWE ``element`` (``prefix`` "ce" or "cwe"), each escaped."""
    values = (code.code, code.text, code.system) if isinstance(code, HL7Code) else code
    for index, value in enumerate(values, start=1):
        if value:
            _text(element, f"{prefix}_{index}", value)


def _msh(message: Any, settings: HL7Settings, destination: HL7Destination, control_id: str, now: dt.datetime) -> None:
    msh = message.msh
    msh.msh_3.hd_1 = settings.sending_application
    if settings.sending_facility:
        msh.msh_4.hd_1 = settings.sending_facility
    msh.msh_5.hd_1 = destination.application
    if destination.facility:
        msh.msh_6.hd_1 = destination.facility
    msh.msh_7.ts_1 = hl7_datetime(now)
    msh.msh_9.msg_1, msh.msh_9.msg_2, msh.msh_9.msg_3 = "ORU", "R01", "ORU_R01"
    msh.msh_10 = control_id
    msh.msh_11.pt_1 = settings.processing_id


def _patient(result: Any, report: StudyReport) -> None:
    patient = result.add_group("ORU_R01_PATIENT")
    pid = patient.add_segment("PID")
    pid.pid_1 = "1"
    _text(pid.pid_3, "cx_1", report.patient_id)
    if report.issuer_of_patient_id:
        _text(pid.pid_3.cx_4, "hd_1", report.issuer_of_patient_id)
    family, *others = report.patient_name
    if family or not any(others):
        _text(pid.pid_5.xpn_1, "fn_1", family or HL7_NULL)  # PID-5 is required; HL7's null says "no name known"
    for index, part in enumerate(others, start=2):
        if part:
            _text(pid.pid_5, f"xpn_{index}", part)
    if report.birth_date:
        pid.pid_7.ts_1 = report.birth_date
    if report.sex:
        pid.pid_8 = report.sex
    patient.add_group("ORU_R01_VISIT").add_segment("PV1").pv1_2 = "U"  # patient class unknown (IHE RAD-128)


def _order(order: Any, report: StudyReport, settings: HL7Settings, now: dt.datetime) -> None:
    from hl7apy.v2_5_1 import FT, ST

    status = "C" if report.corrected else "F"
    filler = report.filler_order_number or report.accession_number
    priority = settings.priorities[report.priority]
    orc = order.add_segment("ORC")
    orc.orc_1 = "RE"
    obr = order.add_segment("OBR")
    obr.obr_1 = "1"
    for segment, prefix in ((orc, "orc"), (obr, "obr")):
        if report.placer_order_number:
            _text(getattr(segment, f"{prefix}_2"), "ei_1", report.placer_order_number)
        if filler:
            _text(getattr(segment, f"{prefix}_3"), "ei_1", filler)
    procedure = report.procedure_code or settings.procedure_code
    _code(obr.obr_4, procedure, "ce")
    obr.obr_7.ts_1 = report.observed_at
    if report.accession_number:
        obr.obr_18 = ST(report.accession_number)
    obr.obr_22.ts_1 = hl7_datetime(now)
    obr.obr_24 = "RAD"
    obr.obr_25 = status
    obr.obr_27.tq_6 = priority
    _code(obr.obr_44, procedure, "ce")
    nte = order.add_segment("NTE")
    nte.nte_1 = "1"
    reason = f" ({report.priority_reason})" if report.priority_reason else ""
    nte.nte_3 = FT(
        f"cxr-triage AI triage suggestion, research use only, not a diagnosis: priority {report.priority}{reason}"
    )
    tq1 = order.add_group("ORU_R01_TIMING_QTY").add_segment("TQ1")
    tq1.tq1_1 = "1"
    tq1.tq1_7.ts_1 = report.observed_at
    _code(tq1.tq1_9, (priority, PRIORITY_NAMES.get(priority, ""), "HL70485"), "cwe")


def _observations(order: Any, report: StudyReport, settings: HL7Settings, now: dt.datetime) -> None:

    status = "C" if report.corrected else "F"
    segments = []
    finding = order.add_group("ORU_R01_OBSERVATION").add_segment("OBX")
    _code(finding.obx_3, settings.finding_code, "ce")
    if report.label is not None:
        finding.obx_2 = "CWE"
        finding.obx_5 = str(settings.finding_values[report.label])
        if flag := settings.abnormal_flags[report.priority]:
            finding.obx_8 = flag
        if report.probabilities and report.label in report.probabilities:
            finding.obx_9 = f"{float(report.probabilities[report.label]):.3f}"
        finding.obx_11 = status
    else:
        finding.obx_11 = "X"  # nothing was classified: results cannot be obtained
    segments.append(finding)
    for name in CLASS_NAMES if report.probabilities else ():
        obx = order.add_group("ORU_R01_OBSERVATION").add_segment("OBX")
        obx.obx_2 = "NM"
        _code(obx.obx_3, settings.probability_codes[name], "ce")
        obx.obx_5 = f"{100 * float(report.probabilities[name]):.1f}"  # type: ignore[index]
        _code(obx.obx_6, PERCENT_UNITS, "ce")
        obx.obx_11 = status
        segments.append(obx)
    for obx in segments:
        if report.model_version:
            _text(obx.obx_18, "ei_1", report.model_version)
            obx.obx_18.ei_2 = settings.sending_application
        obx.obx_19.ts_1 = hl7_datetime(now)
    uid = order.add_group("ORU_R01_OBSERVATION").add_segment("OBX")
    uid.obx_2 = "ST"
    _code(uid.obx_3, STUDY_UID_OBSERVATION, "ce")
    uid.obx_5 = report.study_instance_uid  # digits and dots: nothing to escape
    uid.obx_11 = "O"  # order detail, not a result
    segments.append(uid)
    for index, obx in enumerate(segments, start=1):
        obx.obx_1 = str(index)


def build_oru(
    report: StudyReport, settings: HL7Settings, destination: HL7Destination, control_id: str, now: dt.datetime
) -> str:
    """The ORU^R01 of ``report`` for ``destination``, validated by hl7apy (v2.5.1, strict): ER7 text, segments
    ending in CR. A value HL7 cannot carry (too long, say) raises ``ReportError``."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.core import Message
    from hl7apy.exceptions import HL7apyException

    try:
        message = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
        _msh(message, settings, destination, control_id, now)
        result = message.add_group("ORU_R01_PATIENT_RESULT")
        _patient(result, report)
        order = result.add_group("ORU_R01_ORDER_OBSERVATION")
        _order(order, report, settings, now)
        _observations(order, report, settings, now)
        if not message.to_er7().isascii():
            message.msh.msh_18 = "UNICODE UTF-8"
        message.validate()
    except (HL7apyException, ValueError, KeyError) as exc:
        raise ReportError(f"HL7 v{VERSION} cannot carry this study's values: {type(exc).__name__}: {exc}") from exc
    return str(message.to_er7()) + "\r"


TRIAL_TIME = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def check_settings(settings: Settings) -> None:
    """A start-up check of the commands that send HL7 (``serve``, ``worker``, ``forward``): a trial message built
    with the ``[hl7]`` codes, so that a value HL7 cannot carry stops the start-up rather than the first result."""
    hl7 = settings.hl7
    if hl7.destinations:
        try:
            build_oru(sample_report(), hl7, hl7.destinations[0], "0" * 20, TRIAL_TIME)
        except ReportError as exc:
            raise ConfigError(f"[hl7] the codes do not fit an HL7 v2.5.1 message: {exc}") from exc


def new_control_id() -> str:
    """A message control ID (MSH-10, at most 20 characters): 20 random hex digits."""
    return secrets.token_hex(10)


# --- the ACK --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AckResult:
    """What became of one message: accepted or not, MSA-1 (None when no ACK came) and a detail for the log."""

    ok: bool
    code: str | None
    detail: str
    connection_failed: bool = False
    """No ACK at all (refused, timed out, closed): the destination is not tried again this round."""


def parse_ack(raw: bytes, control_id: str) -> AckResult:
    """Read an ACK (any v2 version) for the message ``control_id``: MSA-1, MSA-2 and the error text."""
    import hl7
    import hl7.exceptions

    text = raw.decode("utf-8", errors="replace").strip("\x0b\x1c\r\n")
    try:
        ack = hl7.parse(text)
        msa = ack.segment("MSA")
    except (hl7.exceptions.HL7Exception, KeyError, ValueError, IndexError) as exc:
        return AckResult(False, None, f"the answer is not an HL7 ACK ({exc}): {text[:200]!r}")
    code = str(msa[1]).strip() if len(msa) > 1 else ""
    acknowledged = str(msa[2]).strip() if len(msa) > 2 else ""
    said = str(msa[3]).strip() if len(msa) > 3 else ""
    try:
        err = ack.segment("ERR")
        said = "; ".join(
            s for s in (said, str(err[8]) if len(err) > 8 else "", str(err[3]) if len(err) > 3 else "") if s
        )
    except KeyError:
        pass
    if acknowledged != control_id:
        return AckResult(False, code or None, f"ACK {code} for message {acknowledged!r}, not {control_id!r}")
    if code in ACCEPTED:
        return AckResult(True, code, f"accepted ({code})")
    meaning = {"AE": "application error", "AR": "application reject", "CE": "commit error", "CR": "commit reject"}
    return AckResult(
        False, code or None, f"ACK {code} ({meaning.get(code, 'not accepted')}){': ' + said if said else ''}"
    )


def exchange(destination: HL7Destination, message: str, control_id: str, timeout: float) -> AckResult:
    """Send one message over its own MLLP connection and read its ACK; never raises for network errors."""
    try:
        raw = mllp.send(destination.host, destination.port, message.encode("utf-8"), timeout)
    except TimeoutError:
        return AckResult(False, None, f"no ACK from {destination} within {timeout:g} s", True)
    except ConnectionRefusedError:
        return AckResult(False, None, f"connection refused: {destination}", True)
    except socket.gaierror as exc:
        return AckResult(False, None, f"cannot resolve host name {destination.host!r}: {exc.strerror or exc}", True)
    except OSError as exc:
        return AckResult(False, None, f"{destination}: {exc.strerror or exc}", True)
    return parse_ack(raw, control_id)


# --- the outbox ----------------------------------------------------------------------------------------------


def enqueue(session: Session, study: db.Study, settings: HL7Settings, now: dt.datetime) -> int:
    """Queue the ORU^R01 of the just-aggregated ``study`` for every ``[hl7]`` destination (inside the aggregation's
    transaction); a correction (OBR-25 C) where an earlier one was sent. The number of rows added; a message that
    cannot be built is added dead, with the reason."""
    if not settings.destinations:
        return 0
    try:
        report: StudyReport | None = read_report(session, study)
        problem = ""
    except ReportError as exc:
        report, problem = None, str(exc)
    except Exception as exc:  # an unexpected header must not stop the aggregation of every study after it
        logger.exception("building the HL7 report of study %s failed", study.study_instance_uid)
        report, problem = None, f"{type(exc).__name__}: {exc}"
    for destination in settings.destinations:
        name = str(destination)
        corrected = delivery.supersede(session, db.HL7Message, study.id, name, now)
        control_id = new_control_id()
        message = None
        if report is not None:
            try:
                message = build_oru(replace(report, corrected=corrected), settings, destination, control_id, now)
            except ReportError as exc:
                problem = str(exc)
            except Exception as exc:  # as above: recorded on the row, never raised into the aggregation
                logger.exception("building the ORU^R01 of study %s failed", study.study_instance_uid)
                problem = f"{type(exc).__name__}: {exc}"
        if message is None:
            logger.error("HL7 result of study %s for %s not sent: %s", study.study_instance_uid, name, problem)
        dead_because = None if message else f"cannot build the ORU^R01: {problem}"
        columns = {"study_id": study.id, "destination": name, "control_id": control_id, "message": message}
        session.add(
            delivery.new_row(db.HL7Message, now, dead_because, result_status="C" if corrected else "F", **columns)
        )
    return len(settings.destinations)


@dataclass(frozen=True)
class HL7Outcome:
    row_id: int
    study_instance_uid: str
    control_id: str
    destination: str
    state: str
    attempts: int
    ack: str | None
    detail: str


OUTBOX: delivery.Outbox[db.HL7Message, HL7Outcome] = delivery.Outbox(
    "hl7",
    db.HL7Message,
    lambda m, uid, detail: HL7Outcome(m.id, uid, m.control_id, m.destination, m.state, m.attempts, m.ack_code, detail),
    logger,
    sent="HL7 result of study %(study_instance_uid)s (%(control_id)s) accepted by %(destination)s",
    about="HL7 result of study %(study_instance_uid)s to %(destination)s",
    answer="ack_code",
    listing=lambda m: {"result_status": m.result_status},
)
as_record = OUTBOX.as_record
"""An HL7 message's outcome as ``cxr-triage forward`` prints it."""
listed = OUTBOX.listed
"""Every HL7 message, oldest first, as ``cxr-triage forward`` lists it."""


def process_due(
    sessions: sessionmaker[Session],
    settings: HL7Settings,
    now: dt.datetime | None = None,
    force: bool = False,
    exclude: Collection[int] = (),
) -> list[HL7Outcome]:
    """Send one round of the HL7 messages that are due (pending ones not in ``exclude`` when ``force``); after a
    destination failed to answer, its other messages wait for the next round (their attempt counted, like a failed
    association)."""
    now = now or db.utcnow()
    lease = dt.timedelta(seconds=2 * settings.timeout * MAX_PER_ROUND + 60)
    columns = (db.HL7Message.id, db.HL7Message.destination, db.HL7Message.control_id, db.HL7Message.message)
    rows = OUTBOX.claim(sessions, now, lease, force, MAX_PER_ROUND, exclude, *columns, db.Study.study_instance_uid)
    by_destination: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    study_uids: dict[int, str] = {}
    for message_id, destination, control_id, message, study_uid in rows:
        by_destination[destination].append((message_id, control_id, message or ""))
        study_uids[message_id] = study_uid
    outcomes: list[HL7Outcome] = []
    for name, items in by_destination.items():
        results = _send_all(settings, name, items)
        attempts = [delivery.Attempt(i, study_uids[i], r.ok, r.code, r.detail) for i, r in results.items()]
        outcomes += OUTBOX.record(sessions, settings, attempts)
    return outcomes


def _send_all(settings: HL7Settings, name: str, items: Sequence[tuple[int, str, str]]) -> dict[int, AckResult]:
    try:
        destination = settings.destination(name) or HL7Destination.parse(name)
    except ValueError as exc:
        return {message_id: AckResult(False, None, f"bad destination {name!r}: {exc}") for message_id, _, _ in items}
    results: dict[int, AckResult] = {}
    unreachable: AckResult | None = None
    for message_id, control_id, message in items:
        if unreachable is not None:
            results[message_id] = AckResult(False, None, f"not sent: {unreachable.detail} (earlier in this round)")
            continue
        result = exchange(destination, message, control_id, settings.timeout)
        results[message_id] = result
        if result.connection_failed:
            unreachable = result
    return results


def unbuilt(session: Session) -> int:
    """Messages that could not be built: dead for good (``forward --retry`` cannot send what does not exist)."""
    return delivery.unbuilt(session, db.HL7Message)
