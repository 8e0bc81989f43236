"""The STOW-RS endpoint (PS3.18 10.5): ``POST /studies`` with ``multipart/related; type="application/dicom"``, run
by ``serve`` beside the C-STORE listener, with the listener's guarantees.

Who changes what: for each part, ``_Part`` writes the bytes to a temporary file in the spool folder as they arrive
(``cxr_triage.dicom.multipart`` never holds more than a chunk), counting them against ``[dicomweb]
stow_max_instance_mb``; at the part's end it is synced and checked like a C-STORE (``check_instance``: the same
header parse, UIDs and refusals as ``cxr_triage.dicom.listener``), and a good one goes through the listener's own
``Receiver.store`` (deduplicate, rename into the spool, record the queued job in the database). Only then does it
count as stored, and the response, sent after the last part, lists it in the Referenced SOP Sequence (0008,1199);
every other part is in the Failed SOP Sequence (0008,1198) with its Failure Reason (0008,1197):

* 0xA700 out of resources: the spool below ``[storage] min_free_mb``, the file not written, or the instance over
  ``stow_max_instance_mb`` (not kept);
* 0x0110 processing failure: the instance could not be recorded in the database (the listener's 0xA701; a retry
  is safe: the same bytes again are a no-op);
* 0xA900 the file meta's SOP Class UID is not the dataset's; 0x0122 the SOP class is not one the listener accepts
  (CR, DX, SC: a C-STORE of it would find no presentation context); 0xC122 a transfer syntax it cannot decode;
* 0xC000 a part that is not ``application/dicom``; the listener's 0xC210 (cannot parse), 0xC211 (UIDs missing or
  malformed), 0xC212 (the file meta's SOP Instance UID is not the dataset's), all in the "cannot understand" range.

HTTP status (PS3.18 10.5.3): 200 every instance stored, 202 some, 409 none; before any part is read, 403 a client
outside ``stow_allowed_networks`` (the TCP peer's address: X-Forwarded-For is not trusted), 401 no or a wrong bearer
token, 415 another media type, 413 a Content-Length over ``stow_max_request_mb`` (a body without one is counted as
it streams, and cut with 413 at the cap: the parts completed before it are stored and recorded, and sending again is
safe), 400 a body that breaks the multipart syntax (likewise). Instances refused for their content (a lateral view)
are stored and answered as stored, as by the listener: the worker records why.

It runs on its own thread with its own event loop (``StowServer``, uvicorn) and anyio's worker threads for the file
syncs and the database: it takes none of the listener's association threads or ``max_associations`` slots.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import ipaddress
import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cxr_triage import log_name
from cxr_triage.core.dicomweb import DicomwebSettings
from cxr_triage.dicom import listener, multipart
from cxr_triage.files import TEMP_PREFIX
from cxr_triage.queue.jobqueue import ReceivedInstance

logger = logging.getLogger(log_name(__name__))

DICOM_JSON = "application/dicom+json"
HEAD_BYTES = 65536
"""The first bytes of each part kept in memory: enough to name a failed instance that was not kept on disk."""
MAX_CONNECTIONS = 64
"""Connections served at once (uvicorn's ``limit_concurrency``); more are answered 503 (busy: retry later)."""
CALLING_AE = "STOW-RS"
"""What an instance received by STOW-RS records as its calling AE title."""

OUT_OF_RESOURCES, PROCESSING_FAILURE, CANNOT_UNDERSTAND = 0xA700, 0x0110, 0xC000
SOP_CLASS_MISMATCH, SOP_CLASS_NOT_SUPPORTED, TRANSFER_SYNTAX_NOT_SUPPORTED = 0xA900, 0x0122, 0xC122
FROM_LISTENER = {
    listener.STATUS_OUT_OF_RESOURCES: OUT_OF_RESOURCES,
    listener.STATUS_NOT_RECORDED: PROCESSING_FAILURE,
}
"""The listener's statuses that PS3.18 names otherwise; its Cxxx codes are answered as they are."""


def _element(vr: str, value: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": [value]}


@dataclass
class Outcome:
    """What became of one part: the failure reason (None: stored) and the UIDs it could be named by."""

    reason: int | None
    sop_class: str | None = None
    sop_instance: str | None = None

    def item(self) -> dict[str, Any]:
        """Its Referenced or Failed SOP Sequence item (DICOM JSON, PS3.18 F.2)."""
        item: dict[str, Any] = {}
        if self.sop_class:
            item["00081150"] = _element("UI", self.sop_class)
        if self.sop_instance:
            item["00081155"] = _element("UI", self.sop_instance)
        if self.reason is not None:
            item["00081197"] = _element("US", self.reason)
        return item


def response_body(outcomes: list[Outcome]) -> tuple[int, dict[str, Any]]:
    """The HTTP status and the DICOM JSON of the Store Instances Response (PS3.18 10.5.3) for ``outcomes``."""
    stored = [o.item() for o in outcomes if o.reason is None]
    failed = [o.item() for o in outcomes if o.reason is not None]
    body: dict[str, Any] = {}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": stored}
    status = 200 if not failed else 202 if stored else 409
    return status, body


def _uids(ds: Dataset) -> tuple[str | None, str | None]:
    sop_class, sop_instance = ds.get("SOPClassUID"), ds.get("SOPInstanceUID")
    return (str(sop_class).strip() if sop_class else None), (str(sop_instance).strip() if sop_instance else None)


def check_instance(path: Path, syntaxes: frozenset[str]) -> tuple[Outcome, Dataset | None]:
    """The listener's checks of a received file (its header only): a failed outcome, or a passed one (reason
    None) with the dataset's header."""
    try:
        ds = listener.decode_values(pydicom.dcmread(path, defer_size=listener.HEADER_DEFER_BYTES))
        sop_class, sop_instance = _uids(ds)
        study = ds.get("StudyInstanceUID")
        meta = ds.file_meta
    except Exception as exc:
        logger.error("STOW-RS: cannot parse an instance: %s", listener.parse_error(exc))
        return Outcome(listener.STATUS_CANNOT_PARSE), None
    found = Outcome(None, sop_class, sop_instance)
    if not sop_class or not listener.uid_ok(sop_instance) or not listener.uid_ok(study):
        logger.error("STOW-RS: SOP Class UID %r, SOP Instance UID %r or Study Instance UID %r is missing or "
                     "malformed", sop_class, sop_instance, study)  # fmt: skip
        found.reason = listener.STATUS_MISSING_UIDS
    elif str(meta.get("MediaStorageSOPClassUID", "")).strip() != sop_class:
        logger.error("STOW-RS: SOP instance %s: its file meta names SOP class %s, the dataset %s", sop_instance,
                     meta.get("MediaStorageSOPClassUID"), sop_class)  # fmt: skip
        found.reason = SOP_CLASS_MISMATCH
    elif str(meta.get("MediaStorageSOPInstanceUID", "")).strip() != sop_instance:
        logger.error("STOW-RS: SOP instance %s: its file meta names SOP instance %s", sop_instance,
                     meta.get("MediaStorageSOPInstanceUID"))  # fmt: skip
        found.reason = listener.STATUS_INSTANCE_MISMATCH
    elif sop_class not in listener.STORAGE_SOP_CLASSES:
        logger.error("STOW-RS: SOP instance %s: SOP class %s is not CR, DX or SC", sop_instance, sop_class)
        found.reason = SOP_CLASS_NOT_SUPPORTED
    elif str(meta.get("TransferSyntaxUID", "")) not in syntaxes:
        logger.error("STOW-RS: SOP instance %s: transfer syntax %s cannot be decoded here", sop_instance,
                     meta.get("TransferSyntaxUID"))  # fmt: skip
        found.reason = TRANSFER_SYNTAX_NOT_SUPPORTED
    return found, ds


def _named(head: bytes) -> Outcome:
    """A failed part's UIDs, read from its first bytes where they parse."""
    try:
        ds = pydicom.dcmread(io.BytesIO(head), defer_size=1024, stop_before_pixels=True)
        return Outcome(None, *_uids(ds))
    except Exception:
        return Outcome(None)


@dataclass
class _Part:
    """One part being received: its temporary spool file, its first bytes, its size and digest."""

    refusal: int | None = None
    file: BinaryIO | None = None
    path: Path | None = None
    head: bytearray = field(default_factory=bytearray)
    size: int = 0
    digest: Any = field(default_factory=hashlib.sha256)

    def write(self, data: bytes, cap: int) -> None:
        if len(self.head) < HEAD_BYTES:
            self.head += data[: HEAD_BYTES - len(self.head)]
        self.size += len(data)
        if self.file is None:
            return
        if self.size > cap:
            self.discard()
            self.refusal = OUT_OF_RESOURCES
            return
        self.digest.update(data)
        self.file.write(data)

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


class StowEndpoint:
    """The endpoint's state: its settings, the listener's ``Receiver`` (spool, database, worker wake-up)."""

    def __init__(self, settings: DicomwebSettings, receiver: listener.Receiver) -> None:
        self.settings = settings
        self.receiver = receiver
        self.networks = [ipaddress.ip_network(n, strict=False) for n in settings.stow_allowed_networks]
        self.syntaxes = frozenset(listener.decodable_transfer_syntaxes())
        self.max_request = int(settings.stow_max_request_mb * 1024 * 1024)
        self.max_instance = int(settings.stow_max_instance_mb * 1024 * 1024)

    def refusal(self, request: Request) -> Response | None:
        """The answer to a request refused before its body is read (network, token, media type, size), or None."""
        client = request.client.host if request.client else ""
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            address = None
        if self.networks and (address is None or not any(address in n for n in self.networks)):
            logger.warning("STOW-RS from %s refused: not in [dicomweb] stow_allowed_networks", client)
            return Response("this address may not store here\n", 403, media_type="text/plain")
        if self.settings.stow_token:
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            try:
                expected = self.settings.stow_token.read()
            except ValueError:
                logger.exception("STOW-RS: the bearer token cannot be read")
                return Response("the endpoint's token is not available\n", 503, media_type="text/plain")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
                logger.warning("STOW-RS from %s refused: %s bearer token", client, "a wrong" if given else "no")
                headers = {"WWW-Authenticate": 'Bearer realm="cxr-triage STOW-RS"'}
                return Response("a valid bearer token is required\n", 401, headers, media_type="text/plain")
        return self._media_refusal(request)

    def _media_refusal(self, request: Request) -> Response | None:
        media, params = multipart.parse_content_type(request.headers.get("content-type", ""))
        if media != "multipart/related" or params.get("type", "").lower() != "application/dicom":
            return Response(
                'expected Content-Type: multipart/related; type="application/dicom"\n', 415, media_type="text/plain"
            )
        if not params.get("boundary"):
            return Response("the multipart Content-Type has no boundary\n", 400, media_type="text/plain")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_request:
            logger.warning("STOW-RS: a body of %s bytes refused: over [dicomweb] stow_max_request_mb", length)
            return Response(f"the body is over {self.max_request} bytes\n", 413, media_type="text/plain")
        return None

    def start_part(self, headers: dict[str, str]) -> _Part:
        """A new part: its temporary file opened, unless it cannot be stored anyway."""
        media, _ = multipart.parse_content_type(headers.get("content-type", "application/dicom"))
        if media != "application/dicom":
            logger.error("STOW-RS: a part of type %r, not application/dicom", media)
            return _Part(refusal=CANNOT_UNDERSTAND)
        if self.receiver.below_reserve("a STOW-RS instance"):
            return _Part(refusal=OUT_OF_RESOURCES)
        try:
            fd, name = _mkstemp(self.receiver.spool_dir)
        except OSError:
            logger.exception("STOW-RS: cannot create a file in the spool %s", self.receiver.spool_dir)
            return _Part(refusal=OUT_OF_RESOURCES)
        return _Part(file=os.fdopen(fd, "wb"), path=Path(name))

    def finish_part(self, part: _Part, client: str) -> Outcome:
        """The part's bytes are in: sync, check and store it (blocking: run in a worker thread); its outcome."""
        if part.refusal is not None or part.file is None or part.path is None:
            part.discard()
            if part.refusal == OUT_OF_RESOURCES and part.size > self.max_instance:
                logger.error("STOW-RS: an instance of more than %d bytes refused ([dicomweb] stow_max_instance_mb)",
                             self.max_instance)  # fmt: skip
            outcome = _named(bytes(part.head))
            outcome.reason = part.refusal if part.refusal is not None else OUT_OF_RESOURCES
            return outcome
        try:
            part.file.flush()
            os.fsync(part.file.fileno())
            part.file.close()
        except OSError:
            logger.exception("STOW-RS: cannot write an instance to the spool %s", self.receiver.spool_dir)
            part.discard()
            named = _named(bytes(part.head))
            named.reason = OUT_OF_RESOURCES
            return named
        return self._store(part, part.path, client)

    def _store(self, part: _Part, path: Path, client: str) -> Outcome:
        outcome, ds = check_instance(path, self.syntaxes)
        if outcome.reason is not None or ds is None:
            path.unlink(missing_ok=True)
            return outcome
        series, accession = ds.get("SeriesInstanceUID"), str(ds.get("AccessionNumber") or "").strip()
        item = ReceivedInstance(
            sop_instance_uid=str(outcome.sop_instance),
            sop_class_uid=str(outcome.sop_class),
            study_instance_uid=str(ds.StudyInstanceUID).strip(),
            series_instance_uid=str(series).strip() if listener.uid_ok(series) else None,
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            calling_ae=CALLING_AE,
            sha256=part.digest.hexdigest(),
            size_bytes=part.size,
            accession_number=accession or None,
        )
        status = self.receiver.store(item, path)
        if status != listener.STATUS_SUCCESS:
            outcome.reason = FROM_LISTENER.get(status, status)
        else:
            logger.info("STOW-RS: SOP instance %s from %s stored", item.sop_instance_uid, client)
        return outcome

    async def store_instances(self, request: Request) -> Response:
        """``POST /studies``: each part spooled, checked, stored and recorded; then the PS3.18 answer."""
        refused = self.refusal(request)
        if refused is not None:
            return refused
        _, params = multipart.parse_content_type(request.headers.get("content-type", ""))
        client = request.client.host if request.client else "?"
        outcomes: list[Outcome] = []
        part: _Part | None = None
        received = 0
        try:
            reader = multipart.MultipartReader(params["boundary"])
            async for chunk in request.stream():
                received += len(chunk)
                if received > self.max_request:
                    logger.warning("STOW-RS from %s: body cut at %d bytes (stow_max_request_mb), %d instance(s) "
                                   "before it handled", client, self.max_request, len(outcomes))  # fmt: skip
                    return Response(f"the body is over {self.max_request} bytes\n", 413, media_type="text/plain")
                for event in reader.feed(chunk):
                    if isinstance(event, multipart.PartStart):
                        part = self.start_part(event.headers)
                    elif isinstance(event, multipart.PartData) and part is not None:
                        part.write(event.data, self.max_instance)
                    elif isinstance(event, multipart.PartEnd) and part is not None:
                        done, part = part, None
                        outcomes.append(await run_in_threadpool(self.finish_part, done, client))
            reader.finish()
        except multipart.MultipartError as exc:
            logger.warning("STOW-RS from %s: %s (%d instance(s) before it were handled)", client, exc, len(outcomes))
            return Response(f"{exc}\n", 400, media_type="text/plain")
        finally:
            if part is not None:
                part.discard()
        if not outcomes:
            return Response("the body has no part\n", 400, media_type="text/plain")
        status, body = response_body(outcomes)
        return JSONResponse(body, status, media_type=DICOM_JSON)


class StowServer:
    """The endpoint served by uvicorn on a thread of its own: ``start()`` returns once the port is bound."""

    def __init__(self, settings: DicomwebSettings, receiver: listener.Receiver, log_level: str = "info") -> None:
        import uvicorn

        self.settings = settings
        self.endpoint = StowEndpoint(settings, receiver)
        app = Starlette(routes=[Route("/studies", self.endpoint.store_instances, methods=["POST"])])
        tls = {}
        if settings.stow_tls:
            tls = {"ssl_certfile": settings.stow_tls_certificate, "ssl_keyfile": settings.stow_tls_private_key}
            if settings.stow_tls_ca_file:
                tls |= {"ssl_ca_certs": settings.stow_tls_ca_file, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        config = uvicorn.Config(
            app, host=settings.stow_host, port=settings.stow_port, log_config=None, log_level=log_level.lower(),
            access_log=False, server_header=False, lifespan="off", timeout_graceful_shutdown=30,
            limit_concurrency=MAX_CONNECTIONS, proxy_headers=False, **tls,
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return str(host), int(port)

    def start(self, timeout: float = 30.0) -> None:
        self.thread = threading.Thread(target=self.server.run, name="cxr-stow-rs", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the STOW-RS endpoint could not listen on {self.settings.stow_host}:"
                              f"{self.settings.stow_port} (the log says why)")  # fmt: skip
            time.sleep(0.05)
        host, port = self.address
        scheme = "https" if self.settings.stow_tls else "http"
        logger.info("STOW-RS endpoint on %s://%s:%d/studies", scheme, host, port)

    def stop(self, wait: float = 35.0) -> None:
        """Stop accepting; requests in progress get up to 30 s to finish (their instances are then answered)."""
        if self.thread is None:
            return
        self.server.should_exit = True
        self.thread.join(wait)
        if self.thread.is_alive():
            logger.error("the STOW-RS endpoint did not stop within %.0f s", wait)
        self.thread = None


def _mkstemp(folder: Path) -> tuple[int, str]:
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".stow", dir=folder)
