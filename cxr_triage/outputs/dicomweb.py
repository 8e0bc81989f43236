"""STOW-RS of the Structured Reports to DICOMweb servers: an alternative to C-STORE per destination.

Each SR gets one ``dicomweb_stores`` row per ``[dicomweb] destinations`` entry (``enqueue``, in the recorder's
transaction, like an SR forward), state ``pending``. The housekeeping sends due rows (``process_due``): one
``POST {url}/studies`` per destination per round, a ``multipart/related; type="application/dicom"`` body holding
each SR file as it was written (``multipart_related``), with the destination's bearer token or basic
authentication (read from its environment variable or file at every send), over TLS verified against
``[dicomweb] tls_ca_file`` for https URLs. The answer (PS3.18 10.5.3, ``application/dicom+json``) says per SR
whether it was stored: listed in the Referenced SOP Sequence (or answered 200) -> ``sent``; listed in the Failed
SOP Sequence, or the request failed -> retried after ``delivery.retry_delay`` and dead after ``max_attempts``
(``cxr_triage.outputs.delivery``, which SR forwards, HL7 messages and Orthanc metadata share).
``cxr-triage forward --retry`` puts dead rows back to pending and sends them at once.

The HTTP client is the standard library's ``urllib``, as for Orthanc's REST API (``cxr_triage.outputs.orthanc``).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import secrets
import ssl
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import log_name
from cxr_triage.core import db
from cxr_triage.core.config import ConfigError
from cxr_triage.core.dicomweb import DicomwebServer, DicomwebSettings
from cxr_triage.outputs import delivery, srfiles

if TYPE_CHECKING:
    from cxr_triage.core.settings import Settings

logger = logging.getLogger(log_name(__name__))

MAX_PER_ROUND = 20
"""Most SRs sent to one destination in one request."""
ERROR_BODY_CHARS = 300
FAILED_SOP_SEQUENCE, REFERENCED_SOP_SEQUENCE = "00081198", "00081199"
REFERENCED_SOP_INSTANCE_UID, FAILURE_REASON = "00081155", "00081197"


def multipart_related(parts: Sequence[bytes], boundary: str | None = None) -> tuple[bytes, str]:
    """A ``multipart/related; type="application/dicom"`` body (RFC 2387, PS3.18 8.6.1.2) with one part per DICOM
    file of ``parts``, and its Content-Type. The boundary is random (it cannot occur in the parts by chance)."""
    boundary = boundary or f"cxr-triage-{secrets.token_hex(16)}"
    delimiter = f"--{boundary}".encode("ascii")
    body = bytearray()
    for part in parts:
        body += delimiter + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
    body += delimiter + b"--\r\n"
    return bytes(body), f'multipart/related; type="application/dicom"; boundary="{boundary}"'


def stored_and_failed(answer: Any) -> tuple[set[str], dict[str, int]]:
    """The SOP Instance UIDs a STOW-RS answer (its DICOM JSON) lists as stored, and those it lists as failed with
    their Failure Reason (0 when none is given)."""
    if isinstance(answer, list) and answer:  # some servers wrap the one dataset in an array
        answer = answer[0]
    if not isinstance(answer, dict):
        return set(), {}

    def items(tag: str) -> list[dict[str, Any]]:
        value = answer.get(tag, {}).get("Value", []) if isinstance(answer.get(tag), dict) else []
        return [item for item in value if isinstance(item, dict)]

    def first(item: dict[str, Any], tag: str) -> Any:
        values = item.get(tag, {}).get("Value", []) if isinstance(item.get(tag), dict) else []
        return values[0] if values else None

    stored = {str(first(i, REFERENCED_SOP_INSTANCE_UID)) for i in items(REFERENCED_SOP_SEQUENCE)}

    def reason(item: dict[str, Any]) -> int:
        value = first(item, FAILURE_REASON)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    failed = {str(first(i, REFERENCED_SOP_INSTANCE_UID)): reason(i) for i in items(FAILED_SOP_SEQUENCE)}
    return stored - {"None"}, {uid: reason for uid, reason in failed.items() if uid != "None"}


class StowError(RuntimeError):
    """A STOW-RS request failed as a whole; ``status`` is the HTTP status when an answer came."""

    def __init__(self, message: str, status: int | None = None, answer: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.answer = answer


def _headers(server: DicomwebServer, content_type: str) -> dict[str, str]:
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
    if server.token:
        headers["Authorization"] = f"Bearer {server.token.read()}"
    elif server.username:
        pair = f"{server.username}:{server.password.read()}".encode()
        headers["Authorization"] = f"Basic {base64.b64encode(pair).decode('ascii')}"
    return headers


def _json(data: bytes) -> Any:
    try:
        return json.loads(data) if data.strip() else None
    except ValueError:
        return None


def stow(server: DicomwebServer, files: Sequence[bytes], timeout: float, tls: ssl.SSLContext | None) -> tuple[int, Any]:
    """POST ``files`` to ``{url}/studies``: the HTTP status and the answer's DICOM JSON (None when it has none).
    A 409 (none stored) is an answer too; other failures raise StowError (the secret unreadable: ValueError)."""
    body, content_type = multipart_related(files)
    request = urllib.request.Request(
        f"{server.url}/studies", data=body, method="POST", headers=_headers(server, content_type)
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=tls) as response:
            return int(response.status), _json(response.read())
    except urllib.error.HTTPError as exc:
        data = exc.read()
        if exc.code == 409:
            return 409, _json(data)
        detail = data.decode("utf-8", errors="replace")[:ERROR_BODY_CHARS]
        raise StowError(f"POST {server.url}/studies: HTTP {exc.code}: {detail}", exc.code) from exc
    except urllib.error.URLError as exc:
        raise StowError(f"POST {server.url}/studies: {exc.reason}") from exc
    except (TimeoutError, OSError) as exc:
        raise StowError(f"POST {server.url}/studies: {exc}") from exc


def enqueue(session: Session, sr: db.SRDocument, settings: DicomwebSettings, now: dt.datetime) -> int:
    """Add a pending STOW-RS of ``sr`` to every configured destination; the number added."""
    for server in settings.destinations:
        session.add(delivery.new_row(db.DicomwebStore, now, sr_id=sr.id, destination=server.name))
    return len(settings.destinations)


@dataclass(frozen=True)
class StowOutcome:
    row_id: int
    sr_sop_instance_uid: str
    destination: str
    state: str
    attempts: int
    status: int | None
    detail: str


@dataclass(frozen=True)
class _Result:
    ok: bool
    status: int | None
    detail: str


def _send(
    settings: DicomwebSettings, name: str, items: list[tuple[int, str, str]], tls: ssl.SSLContext | None
) -> dict[int, _Result]:
    """Send the SRs of ``items`` (row id, path, SR UID) to the destination ``name`` in one request: each row's
    result."""
    results: dict[int, _Result] = {}
    files: list[tuple[int, str, bytes]] = []
    for row_id, path, uid in items:
        try:
            srfiles.ensure_final(path)  # its rename may be a moment behind its commit
            with open(path, "rb") as fh:
                files.append((row_id, uid, fh.read()))
        except OSError as exc:
            results[row_id] = _Result(False, None, f"cannot read SR file {path}: {exc.strerror}")
    server = settings.destination(name)
    if not files:
        return results
    try:
        if server is None:
            raise StowError(f"{name} is no longer a [dicomweb] destination")
        status, answer = stow(server, [data for _, _, data in files], settings.timeout, tls)
    except (StowError, ValueError, ssl.SSLError) as exc:
        failed = _Result(False, getattr(exc, "status", None), str(exc))
        return {**results, **{row_id: failed for row_id, _, _ in files}}
    stored, refused = stored_and_failed(answer)
    for row_id, uid, _ in files:
        if uid in refused:
            results[row_id] = _Result(False, status, f"HTTP {status}: failed, Failure Reason 0x{refused[uid]:04X}")
        elif uid in stored or status == 200:
            results[row_id] = _Result(True, status, f"stored (HTTP {status})")
        else:
            results[row_id] = _Result(False, status, f"HTTP {status}: the answer does not list SR {uid} as stored")
    return results


def tls_context(settings: DicomwebSettings) -> ssl.SSLContext:
    """The TLS context of https destinations: their certificates verified against ``[dicomweb] tls_ca_file`` (the
    system's trust store when empty), and their host names."""
    context = ssl.create_default_context(cafile=settings.tls_ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def process_due(
    sessions: sessionmaker[Session],
    settings: DicomwebSettings,
    now: dt.datetime | None = None,
    force: bool = False,
    exclude: Collection[int] = (),
) -> list[StowOutcome]:
    """Send one round of the due STOW-RS rows (every pending one not in ``exclude`` when ``force``), one request
    per destination; one outcome per row."""
    now = now or db.utcnow()
    lease = dt.timedelta(seconds=2 * settings.timeout * max(1, len(settings.destinations)) + 60)
    ids = delivery.claim_due(sessions, db.DicomwebStore, now, lease, force, MAX_PER_ROUND, exclude)
    if not ids:
        return []
    with sessions() as session:
        db.read_only(session)
        rows = session.execute(
            select(
                db.DicomwebStore.id, db.DicomwebStore.destination, db.SRDocument.path, db.SRDocument.sop_instance_uid
            )
            .join(db.SRDocument, db.DicomwebStore.sr_id == db.SRDocument.id)
            .where(db.DicomwebStore.id.in_(ids))
            .order_by(db.DicomwebStore.id)
        ).all()
    by_destination: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    for row_id, destination, path, uid in rows:
        by_destination[destination].append((row_id, path, uid))
    tls = tls_context(settings) if any(d.url.startswith("https:") for d in settings.destinations) else None
    outcomes: list[StowOutcome] = []
    for name, items in by_destination.items():
        results = _send(settings, name, items, tls)
        outcomes += _record(sessions, settings, name, items, results)
    return outcomes


def _record(
    sessions: sessionmaker[Session],
    settings: DicomwebSettings,
    name: str,
    items: list[tuple[int, str, str]],
    results: dict[int, _Result],
) -> list[StowOutcome]:
    outcomes = []
    finished = db.utcnow()
    with sessions() as session, session.begin():
        for row_id, _, uid in items:
            row, result = session.get(db.DicomwebStore, row_id), results[row_id]
            if row is None:
                continue
            row.status = result.status
            delay = delivery.count_attempt(row, result.ok, result.detail, settings, finished)
            if row.state == db.FORWARD_SENT:
                logger.info("SR %s stored by STOW-RS on %s", uid, name)
            elif row.state == db.FORWARD_DEAD:
                logger.error(
                    "SR %s to %s by STOW-RS: dead after %d attempts: %s", uid, name, row.attempts, result.detail
                )
            elif delay is not None:
                logger.warning(
                    "SR %s to %s by STOW-RS: attempt %d failed (%s); retry in %.0f s",
                    uid,
                    name,
                    row.attempts,
                    result.detail,
                    delay,
                )
            outcomes.append(StowOutcome(row_id, uid, name, row.state, row.attempts, result.status, result.detail))
    return outcomes


def as_record(o: StowOutcome) -> dict[str, Any]:
    """A STOW-RS outcome as ``cxr-triage forward`` prints it."""
    return {
        "kind": "dicomweb",
        "sr_sop_instance_uid": o.sr_sop_instance_uid,
        "destination": o.destination,
        "state": o.state,
        "attempts": o.attempts,
        "status": o.status,
        "detail": o.detail,
    }


def listed(session: Session) -> list[dict[str, Any]]:
    """Every STOW-RS row, oldest first, as ``cxr-triage forward`` lists it."""
    records = []
    for row, uid in session.execute(
        select(db.DicomwebStore, db.SRDocument.sop_instance_uid)
        .join(db.SRDocument, db.DicomwebStore.sr_id == db.SRDocument.id)
        .order_by(db.DicomwebStore.id)
    ).all():
        outcome = StowOutcome(row.id, uid, row.destination, row.state, row.attempts, row.status, row.last_error or "")
        when = row.next_attempt_at.isoformat() if row.next_attempt_at else None
        records.append({**as_record(outcome), "detail": row.last_error, "next_attempt_at": when})
    return records


def check_settings(settings: Settings) -> None:
    """Start-up check: every destination's secret can be read (a missing one would fail every send for hours)."""
    for server in settings.dicomweb.destinations:
        for secret in (server.token, server.password):
            if secret:
                try:
                    secret.read()
                except ValueError as exc:
                    raise ConfigError(f"[dicomweb] destination {server.name}: {exc}") from exc
