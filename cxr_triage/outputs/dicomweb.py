"""STOW-RS of the Structured Reports, with their heatmap objects, to DICOMweb servers: an alternative to C-STORE
per destination.

Each SR gets one ``dicomweb_stores`` row per ``[dicomweb] destinations`` entry (``enqueue``, in the recorder's
transaction, like an SR forward), state ``pending``. The housekeeping sends due rows (``process_due``): one
``POST {url}/studies`` per destination per round, a ``multipart/related; type="application/dicom"`` body holding
each row's files as they were written (``multipart_related``): the heatmap object the SR references
(``sr_documents.heatmap_path``, ``outputs.heatmapobject``) first when there is one, then the SR; with the
destination's bearer token or basic authentication (read from its environment variable or file at every send),
over TLS verified against ``[dicomweb] tls_ca_file`` for https URLs. The answer (PS3.18 10.5.3,
``application/dicom+json``) says per instance whether it was stored (``_row_result``): a row is ``sent`` when its
SR and its heatmap object are both listed in the Referenced SOP Sequence (or the answer is 200). A heatmap object
listed in the Failed SOP Sequence with Failure Reason 0x0122 (SOP class not supported: the server takes no
Secondary Captures, which no retry changes) does not hold its SR back: a WARNING says the destination has no
heatmaps, as a C-STORE destination that negotiates no Secondary Capture (``outputs.forward``). Any other failure of
either part, or of the request -> the row is retried with both parts after ``delivery.retry_delay`` and dead after
``max_attempts`` (``cxr_triage.outputs.delivery``, which SR forwards, HL7 messages and Orthanc metadata share);
unlike one association's C-STORE, one STOW-RS request cannot make the SR wait for its heatmap object, so a server
that failed only the heatmap object may hold the SR until the retry stores the object beside it (storing the same
SR again is a duplicate the server takes). ``cxr-triage forward --retry`` puts dead rows back to pending and sends
them at once. Rows of SRs without a heatmap object (``[heatmap] pacs_object = "none"``, or older rows) send the
SR alone.

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
"""Most SRs (each with its heatmap object) sent to one destination in one request."""
SOP_CLASS_NOT_SUPPORTED = 0x0122
"""The Failure Reason of an instance whose SOP class the server does not store (PS3.18 I.2.2)."""
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


class StowOutcome(delivery.SROutcome):
    """What became of an SR's STOW-RS: ``status`` is the HTTP status."""


OUTBOX = delivery.sr_outbox(
    "dicomweb",
    db.DicomwebStore,
    StowOutcome,
    logger,
    sent="SR %(sr_sop_instance_uid)s stored by STOW-RS on %(destination)s",
    about="SR %(sr_sop_instance_uid)s to %(destination)s by STOW-RS",
)
as_record = OUTBOX.as_record
"""A STOW-RS outcome as ``cxr-triage forward`` prints it."""
listed = OUTBOX.listed
"""Every STOW-RS row, oldest first, as ``cxr-triage forward`` lists it."""


@dataclass(frozen=True)
class _Result:
    ok: bool
    status: int | None
    detail: str


@dataclass(frozen=True)
class _Item:
    """One due row: what its request part holds (the heatmap object's file and UID are None when it has none)."""

    row_id: int
    sr_path: str
    sr_uid: str
    heatmap_path: str | None = None
    heatmap_uid: str | None = None

    def files(self) -> list[tuple[str, str]]:
        """(what, path) of each file it sends, in order: the heatmap object first, then the SR."""
        heatmap = [("heatmap object", self.heatmap_path)] if self.heatmap_path else []
        return [*heatmap, ("SR", self.sr_path)]


def _read(items: list[_Item]) -> tuple[dict[int, _Result], list[tuple[_Item, list[bytes]]]]:
    """The failed results of the rows with a file that cannot be read, and the files of the others (in order)."""
    results: dict[int, _Result] = {}
    read: list[tuple[_Item, list[bytes]]] = []
    for item in items:
        parts: list[bytes] = []
        try:
            for _, path in item.files():
                srfiles.ensure_final(path)  # its rename may be a moment behind its commit
                with open(path, "rb") as fh:
                    parts.append(fh.read())
        except OSError as exc:
            what, path = item.files()[len(parts)]
            results[item.row_id] = _Result(False, None, f"cannot read {what} file {path}: {exc.strerror}")
            continue
        read.append((item, parts))
    return results, read


def _part_result(uid: str, what: str, status: int, stored: set[str], refused: dict[str, int]) -> _Result:
    if uid in refused:
        return _Result(False, status, f"HTTP {status}: failed, Failure Reason 0x{refused[uid]:04X}")
    if uid in stored or status == 200:
        return _Result(True, status, f"stored (HTTP {status})")
    return _Result(False, status, f"HTTP {status}: the answer does not list {what} {uid} as stored")


def _row_result(item: _Item, name: str, status: int, stored: set[str], refused: dict[str, int]) -> _Result:
    """A row's result from the answer: its SR's, unless its heatmap object failed for another reason than a
    server that takes no Secondary Captures (then the row fails, named for the heatmap object)."""
    sr = _part_result(item.sr_uid, "SR", status, stored, refused)
    if not item.heatmap_path or not item.heatmap_uid:
        return sr
    heatmap = _part_result(item.heatmap_uid, "heatmap object", status, stored, refused)
    if heatmap.ok:
        return sr
    if refused.get(item.heatmap_uid) == SOP_CLASS_NOT_SUPPORTED:
        logger.warning("%s does not store Secondary Captures: a heatmap object is not filed there", name)
        return sr
    the_sr = "the SR was stored" if sr.ok else f"the SR: {sr.detail}"
    return _Result(False, status, f"heatmap object: {heatmap.detail}; {the_sr}")


def _send(settings: DicomwebSettings, name: str, items: list[_Item], tls: ssl.SSLContext | None) -> dict[int, _Result]:
    """Send the files of ``items`` (each row's heatmap object, then its SR) to the destination ``name`` in one
    request: each row's result."""
    results, read = _read(items)
    server = settings.destination(name)
    if not read:
        return results
    try:
        if server is None:
            raise StowError(f"{name} is no longer a [dicomweb] destination")
        status, answer = stow(server, [part for _, parts in read for part in parts], settings.timeout, tls)
    except (StowError, ValueError, ssl.SSLError) as exc:
        failed = _Result(False, getattr(exc, "status", None), str(exc))
        return {**results, **{item.row_id: failed for item, _ in read}}
    stored, refused = stored_and_failed(answer)
    for item, _ in read:
        results[item.row_id] = _row_result(item, name, status, stored, refused)
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
    files = (db.SRDocument.path, db.SRDocument.sop_instance_uid, db.SRDocument.heatmap_path)
    columns = (db.DicomwebStore.id, db.DicomwebStore.destination, *files, db.SRDocument.heatmap_sop_instance_uid)
    rows = OUTBOX.claim(sessions, now, lease, force, MAX_PER_ROUND, exclude, *columns)
    if not rows:
        return []
    by_destination: dict[str, list[_Item]] = defaultdict(list)
    for row_id, destination, path, uid, heatmap_path, heatmap_uid in rows:
        by_destination[destination].append(_Item(row_id, path, uid, heatmap_path, heatmap_uid))
    tls = tls_context(settings) if any(d.url.startswith("https:") for d in settings.destinations) else None
    outcomes: list[StowOutcome] = []
    for name, items in by_destination.items():
        results = _send(settings, name, items, tls)
        outcomes += _record(sessions, settings, items, results)
    return outcomes


def _record(
    sessions: sessionmaker[Session], settings: DicomwebSettings, items: list[_Item], results: dict[int, _Result]
) -> list[StowOutcome]:
    """Record each row's result in it (attempts, state, next attempt), in one transaction; the outcomes."""
    attempts = [
        delivery.Attempt(item.row_id, item.sr_uid, result.ok, result.status, result.detail)
        for item in items
        for result in (results[item.row_id],)
    ]
    return OUTBOX.record(sessions, settings, attempts)


def check_settings(settings: Settings) -> None:
    """Start-up check: every destination's secret can be read (a missing one would fail every send for hours)."""
    for server in settings.dicomweb.destinations:
        for secret in (server.token, server.password):
            if secret:
                try:
                    secret.read()
                except ValueError as exc:
                    raise ConfigError(f"[dicomweb] destination {server.name}: {exc}") from exc
