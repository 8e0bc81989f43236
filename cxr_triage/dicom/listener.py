"""The DICOM listener: a pynetdicom C-ECHO / C-STORE SCP that spools, records and only then answers success.

The C-STORE handler runs on the association's thread, so it does only what must happen before the answer:
check the spool reserve, parse the header (never the pixels), write the encoded dataset as received (file meta
preserved) atomically to the spool, and record the instance as a queued job in the database. Decoding and the
model run in the workers. Statuses, most specific first:

* 0xA700 (Refused: out of resources): the spool is below ``[storage] min_free_mb`` or the write failed;
* 0xA701 (Refused: out of resources): the instance could not be recorded in the database;
* 0xA900 (Error: data set does not match SOP class): the dataset's SOP Class UID is not the context's;
* 0xC210 (Error: cannot understand): the dataset cannot be parsed;
* 0xC211 (Error: cannot understand): SOP Class, SOP Instance or Study Instance UID is missing or malformed;
* 0xC212 (Error: cannot understand): the dataset's SOP Instance UID is not the request's Affected SOP Instance
  UID. PS3.4 B.2.3 has no status for this: 0xA900 names the SOP class (dcmtk's storescp answers it for both
  mismatches, which tells the sender's operator the wrong thing), while the Cxxx range is the SCP's "cannot
  understand" failure, not worth a retry unchanged; this listener's own code in that range says which.

Instances refused for their content (a lateral view, not a chest, DX for processing) are stored and answered
success: the worker records why, and the sender does not retry them forever.

Connections reach pynetdicom through ``cxr_triage.dicom.guard``: a per-peer connection cap, a deadline for the
A-ASSOCIATE-RQ, and every PDU's announced length checked before it is read. Memory per C-STORE is the dataset
once (pynetdicom's receive buffer, parsed and spooled in place). pynetdicom's ``_config.STORE_RECV_CHUNKED_DATASET``
would move that buffer to a temporary file, but in the system temporary folder (a tmpfs on many systems, so RAM
all the same, and another file system than the spool, so a second full write instead of a rename), and for every
AE in the process: it is not used.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.pixels import get_decoder
from pynetdicom import AE, Association, evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import files, log_name
from cxr_triage.core import db, dicomwarnings
from cxr_triage.core.failurelog import FailureLog
from cxr_triage.core.settings import ListenerSettings, StorageSettings
from cxr_triage.dicom import guard
from cxr_triage.queue import jobqueue, spool
from cxr_triage.queue.jobqueue import ReceivedInstance

logger = logging.getLogger(log_name(__name__))

HEADER_DEFER_BYTES = 65536
"""Values larger than this (the pixel data) are not read when the listener parses a received dataset."""

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
"""The spool is below its reserve, or the file could not be written."""
STATUS_NOT_RECORDED = 0xA701
"""The instance could not be recorded in the database (transient: the sender should retry)."""
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_CANNOT_PARSE = 0xC210
STATUS_MISSING_UIDS = 0xC211
STATUS_INSTANCE_MISMATCH = 0xC212
"""The dataset's SOP Instance UID is not the request's Affected SOP Instance UID."""

STORAGE_SOP_CLASSES: tuple[str, ...] = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)
"""CR, DX (both intents: for-processing is stored and refused by the worker) and Secondary Capture."""


def decodable_transfer_syntaxes() -> list[str]:
    """Every transfer syntax pydicom (with the installed pylibjpeg plugins) can decode, uncompressed first."""
    native = [
        pydicom.uid.ExplicitVRLittleEndian,
        pydicom.uid.ImplicitVRLittleEndian,
        pydicom.uid.DeflatedExplicitVRLittleEndian,
        pydicom.uid.ExplicitVRBigEndian,
    ]
    compressed = []
    for uid in sorted(pydicom.uid.AllTransferSyntaxes):
        if uid in native:
            continue
        try:
            if get_decoder(uid).is_available:
                compressed.append(uid)
        except (NotImplementedError, ValueError):
            continue
    return [str(u) for u in native + compressed]


def uid_ok(value: Any) -> bool:
    """Whether ``value`` is a well-formed UID (what the spool may name a file after)."""
    return isinstance(value, str) and spool.safe_uid(value) == value.strip() and bool(value.strip())


class Receiver:
    """The state the C-STORE handler needs: where to spool, the reserve, and the database.

    ``on_queued`` is called (on the association's thread, so it must be quick) after an instance has been
    recorded as a new job: ``serve`` uses it to wake its idle workers.

    It also tracks, through pynetdicom's public events, whether an association is in the middle of a request
    (``busy``): from the first P-DATA PDU of a request until our response has been sent.
    """

    def __init__(
        self,
        storage: StorageSettings,
        sessions: sessionmaker[Session],
        on_queued: Callable[[], None] | None = None,
    ) -> None:
        self.spool_dir = Path(storage.spool_dir).resolve()
        self.min_free_mb = float(storage.min_free_mb)
        self.sessions = sessions
        self.on_queued = on_queued
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._handling: dict[int, int] = {}
        self._receiving: set[int] = set()
        self._lock = threading.Lock()
        self.database = FailureLog(
            logger, "recording received instances in the database (answered 0xA701)", new_errors=False
        )
        """One ERROR when the database becomes unreachable and one WARNING when it is back, not one per C-STORE."""

    def handling(self, assoc: Any) -> bool:
        """Whether a C-STORE of ``assoc`` is being handled or answered right now."""
        with self._lock:
            return self._handling.get(id(assoc), 0) > 0

    def busy(self, assoc: Any) -> bool:
        """Whether ``assoc`` is receiving a request or has one being handled."""
        with self._lock:
            return id(assoc) in self._receiving or self._handling.get(id(assoc), 0) > 0

    def handle_pdu(self, event: Event) -> None:
        """EVT_PDU_RECV: a P-DATA PDU means a request (or part of one) is arriving."""
        if isinstance(event.pdu, P_DATA_TF):
            with self._lock:
                self._receiving.add(id(event.assoc))

    def handle_store(self, event: Event) -> int:
        """EVT_C_STORE: spool, record, then answer (see the module docstring for the statuses)."""
        key = id(event.assoc)
        with self._lock:  # busy until the response has been sent (see handle_sent)
            self._handling[key] = self._handling.get(key, 0) + 1
        with dicomwarnings.collected() as complaints:
            status = self._handle_store(event)
        if complaints:  # the worker, which reads the whole dataset, gives its one record; here only at DEBUG
            logger.debug(
                "SOP instance %s from AE %r: %s",
                event.request.AffectedSOPInstanceUID,
                event.assoc.requestor.ae_title,
                dicomwarnings.summary(complaints),
            )
        return status

    def handle_sent(self, event: Event) -> None:
        """EVT_DIMSE_SENT: a response went out, so that request is finished."""
        key = id(event.assoc)
        with self._lock:
            self._receiving.discard(key)
            if not isinstance(event.message, C_STORE_RSP):
                return
            if self._handling.get(key, 0) <= 1:
                self._handling.pop(key, None)
            else:
                self._handling[key] -= 1

    def handle_closed(self, event: Event) -> None:
        """EVT_CONN_CLOSE: nothing of this association is in progress any more."""
        with self._lock:
            self._handling.pop(id(event.assoc), None)
            self._receiving.discard(id(event.assoc))

    def below_reserve(self, what: str) -> bool:
        """Whether the spool is below its reserve (``[storage] min_free_mb``); logged as refusing ``what``."""
        free = spool.free_mb(self.spool_dir)
        if free < self.min_free_mb:
            logger.error(
                "refusing %s: %.0f MiB free in the spool, below the reserve of %.0f MiB", what, free, self.min_free_mb
            )
            return True
        return False

    def _handle_store(self, event: Event) -> int:
        requested_uid = event.request.AffectedSOPInstanceUID
        if self.below_reserve(f"SOP instance {requested_uid}"):
            return STATUS_OUT_OF_RESOURCES
        try:
            ds = read_header(event)
            sop_class = ds.get("SOPClassUID")
            sop_instance = ds.get("SOPInstanceUID")
            study_uid = ds.get("StudyInstanceUID")
        except Exception as exc:
            logger.error("cannot parse the dataset of SOP instance %s: %s", requested_uid, parse_error(exc))
            return STATUS_CANNOT_PARSE
        context_class = event.context.abstract_syntax
        if not sop_class or not uid_ok(sop_instance) or not uid_ok(study_uid):
            logger.error(
                "SOP instance %s: SOP Class UID %r, SOP Instance UID %r or Study Instance UID %r is missing or "
                "malformed",
                requested_uid,
                sop_class,
                sop_instance,
                study_uid,
            )
            return STATUS_MISSING_UIDS
        if str(sop_class) != context_class:
            logger.error(
                "SOP instance %s: dataset SOP Class UID %s does not match the presentation context's %s",
                requested_uid,
                sop_class,
                context_class,
            )
            return STATUS_SOP_CLASS_MISMATCH
        if str(sop_instance).strip() != str(requested_uid or "").strip():
            logger.error(
                "SOP instance %s from AE %r: the dataset's SOP Instance UID is %s",
                requested_uid,
                event.assoc.requestor.ae_title,
                sop_instance,
            )
            return STATUS_INSTANCE_MISMATCH
        with event.request.DataSet.getbuffer() as body:  # the dataset as received, not copied
            return self._store_received(event, ds, body)

    def _store_received(self, event: Event, ds: Dataset, body: memoryview) -> int:
        sop_instance, study_uid, series_uid = ds.SOPInstanceUID, ds.StudyInstanceUID, ds.get("SeriesInstanceUID")
        accession = str(ds.get("AccessionNumber") or "").strip() or None
        # The Part 10 file pynetdicom's encoded_dataset(include_meta=True) makes, written without joining the parts
        data = (b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta), body)
        item = ReceivedInstance(
            sop_instance_uid=str(sop_instance).strip(),
            sop_class_uid=str(event.context.abstract_syntax),
            study_instance_uid=str(study_uid).strip(),
            series_instance_uid=str(series_uid).strip() if uid_ok(series_uid) else None,
            transfer_syntax_uid=str(event.context.transfer_syntax),
            calling_ae=event.assoc.requestor.ae_title,
            sha256=spool.sha256_bytes(data),
            size_bytes=sum(len(part) for part in data),
            accession_number=accession,
        )
        return self.store(item, data)

    def store(self, item: ReceivedInstance, data: spool.Buffer | Sequence[spool.Buffer] | Path) -> int:
        """Deduplicate, spool atomically (``data``: the file's bytes, or its parts in order, or a temporary file in
        the spool folder, written and synced, that is renamed into place or deleted), record; the status to answer.
        Shared by the C-STORE handler and the STOW-RS endpoint (``cxr_triage.dicom.stow``)."""
        try:
            return self._store(item, data)
        finally:
            if isinstance(data, Path):
                data.unlink(missing_ok=True)  # gone already when it was renamed into place

    def _store(self, item: ReceivedInstance, data: spool.Buffer | Sequence[spool.Buffer] | Path) -> int:
        try:
            with self.sessions() as session:
                db.read_only(session)
                same = jobqueue.is_queued(session, item.sop_instance_uid, item.sha256)
            if same:
                self.database.succeeded()
                logger.info("SOP instance %s received again with the same bytes: nothing to do", item.sop_instance_uid)
                return STATUS_SUCCESS
        except SQLAlchemyError as exc:
            self.database.failed(exc, f"SOP instance {item.sop_instance_uid}")
            return STATUS_NOT_RECORDED
        path = spool.spool_path(self.spool_dir, item.sop_instance_uid, item.sha256)
        try:
            if isinstance(data, Path):
                files.make_folder(path.parent)
                data.replace(path)
                files.fsync_dir(path.parent)
            else:
                parts = (data,) if isinstance(data, spool.Buffer) else data
                files.write_atomic(path, lambda fh: [fh.write(part) for part in parts])
        except OSError:
            logger.exception("cannot write SOP instance %s to the spool %s", item.sop_instance_uid, self.spool_dir)
            return STATUS_OUT_OF_RESOURCES
        try:
            with self.sessions() as session, session.begin():
                outcome = jobqueue.enqueue(session, item, path)
        except IntegrityError:
            # The same UID and bytes recorded by a concurrent association between our check and our insert.
            logger.info("SOP instance %s recorded concurrently by another association", item.sop_instance_uid)
            return STATUS_SUCCESS
        except SQLAlchemyError as exc:
            # The spool file stays; start-up recovery enqueues it, and the sender's retry is then a no-op.
            self.database.failed(exc, f"SOP instance {item.sop_instance_uid}, spooled")
            return STATUS_NOT_RECORDED
        self.database.succeeded()
        if not outcome.duplicate:
            if self.on_queued is not None:
                try:
                    self.on_queued()
                except Exception:  # the instance is safely queued; the workers' polling will find it
                    logger.exception("could not notify the workers of job %s", outcome.instance_id)
            logger.info(
                "received SOP instance %s (study %s, %s, %d bytes) from %s as job %s",
                item.sop_instance_uid,
                item.study_instance_uid,
                item.transfer_syntax_uid,
                item.size_bytes,
                item.calling_ae,
                outcome.instance_id,
            )
        return STATUS_SUCCESS


def parse_error(exc: BaseException) -> str:
    """What stopped the parse (the exception's type, and the tag pydicom names), without its message: pydicom
    quotes the bytes it choked on, which may be a patient's name."""
    tags = re.findall(r"\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)", " ".join(str(e) for e in (exc, exc.__cause__) if e))
    where = f" in element {tags[-1]}" if tags else ""
    return f"{type(exc).__name__}{where} (the values are not logged: they may be patient data)"


def read_header(event: Event) -> Dataset:
    """The received dataset, parsed without copying its large values (pixel data stays in pynetdicom's buffer).

    Every element is parsed, and values of up to ``HEADER_DEFER_BYTES`` are decoded, so that a malformed element
    raises here. Pixel data cut short is not an error here, whatever its size: the instance is stored and the
    worker refuses it, naming Pixel Data. A deflated dataset is inflated and decoded whole by pynetdicom.
    """
    syntax = event.context.transfer_syntax
    if syntax.is_deflated:
        ds: Dataset = event.dataset
        for _ in ds:
            pass
        return ds
    stream = event.request.DataSet
    stream.seek(0)
    ds = read_dataset(stream, syntax.is_implicit_VR, syntax.is_little_endian, defer_size=HEADER_DEFER_BYTES)
    return decode_values(ds)


def decode_values(ds: Dataset) -> Dataset:
    """``ds`` (read with ``defer_size=HEADER_DEFER_BYTES``) with every value that was read decoded, so that a
    malformed element raises here; the deferred (large) values stay unread."""
    for tag, raw in list(ds.items()):  # items() gives the raw elements: iterating would read deferred values
        if raw.value is not None or not raw.length:  # else deferred: a large value, of defined length or not
            ds[tag]  # decodes the value
    return ds


def _handle_rejected(event: Event) -> None:
    logger.warning(
        "association from AE %r at %s:%s rejected: %s",
        event.assoc.requestor.ae_title,
        event.assoc.requestor.address,
        event.assoc.requestor.port,
        _rejection_reason(event.assoc),
    )


def _rejection_reason(assoc: Association) -> str:
    """Why pynetdicom rejected ``assoc`` (its event does not say): its checks in its order, the last one wins."""
    ae = assoc.ae
    if len([a for a in ae.active_associations if a.is_acceptor]) > ae.maximum_associations:
        return f"local limit exceeded ({ae.maximum_associations} associations at once, [listener] max_associations)"
    if assoc.requestor.user_identity:
        return "user identity not verified"
    called = str(getattr(assoc.requestor.primitive, "called_ae_title", "") or "").strip()
    if ae.require_called_aet and called != assoc.acceptor.ae_title.strip():
        return f"called AE title {called!r} is not this listener's ({assoc.acceptor.ae_title.strip()!r})"
    if ae.require_calling_aet and assoc.requestor.ae_title not in [t.strip() for t in ae.require_calling_aet]:
        return "calling AE title not on the allow-list ([listener] allowed_calling_aes)"
    return "refused by the DICOM library's negotiation"


def _handle_accepted(event: Event) -> None:
    logger.debug(
        "association from AE %r at %s:%s accepted",
        event.assoc.requestor.ae_title,
        event.assoc.requestor.address,
        event.assoc.requestor.port,
    )


def _handle_echo(event: Event) -> int:
    logger.debug("C-ECHO from AE %r", event.assoc.requestor.ae_title)
    return STATUS_SUCCESS


def build_ae(listener: ListenerSettings) -> AE:
    """An AE configured from ``[listener]`` with the CR/DX/SC storage and Verification contexts."""
    ae = AE(ae_title=listener.ae_title)
    ae.maximum_associations = listener.max_associations
    ae.maximum_pdu_size = listener.max_pdu
    ae.acse_timeout = listener.acse_timeout
    ae.dimse_timeout = listener.dimse_timeout
    ae.network_timeout = listener.network_timeout
    ae.require_calling_aet = list(listener.allowed_calling_aes)
    ae.require_called_aet = listener.require_called_ae
    syntaxes = decodable_transfer_syntaxes()
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, syntaxes)
    ae.add_supported_context(Verification)
    return ae


class Listener:
    """The running SCP: ``start()`` returns once the port is bound; ``stop()`` stops accepting associations."""

    def __init__(self, listener: ListenerSettings, receiver: Receiver) -> None:
        self.settings = listener
        self.receiver = receiver
        self.ae = build_ae(listener)
        self.server: guard.GuardedServer | None = None

    @property
    def address(self) -> tuple[str, int]:
        if self.server is None:
            raise RuntimeError("listener not started")
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        handlers = [
            (evt.EVT_C_STORE, self.receiver.handle_store),
            (evt.EVT_PDU_RECV, self.receiver.handle_pdu),
            (evt.EVT_DIMSE_SENT, self.receiver.handle_sent),
            (evt.EVT_CONN_CLOSE, self.receiver.handle_closed),
            (evt.EVT_C_ECHO, _handle_echo),
            (evt.EVT_REJECTED, _handle_rejected),
            (evt.EVT_ACCEPTED, _handle_accepted),
        ]
        tls = self.settings.server_tls_context()
        if tls is not None:
            tls.sslsocket_class = guard.GuardedSSLSocket
        self.server = self.ae.make_server(
            (self.settings.host, self.settings.port),
            evt_handlers=handlers,
            ssl_context=tls,
            server_class=guard.GuardedServer,
            request_handler=guard.GuardedRequestHandler,
            guard=guard.ConnectionGuard(guard.ConnectionPolicy.from_settings(self.settings)),
        )
        threading.Thread(target=self.server.serve_forever, name="cxr-listener-accept", daemon=True).start()
        host, port = self.address
        logger.info(
            "listening as AE %r on %s:%d%s",
            self.settings.ae_title,
            host,
            port,
            " (TLS)" if self.settings.tls_enabled else "",
        )

    def stop(self, wait: float = 30.0) -> None:
        """Stop accepting associations and drain the open ones.

        A connection that has not sent its A-ASSOCIATE-RQ yet (a health check or port scanner) is closed by the
        server's shutdown. An association with no C-STORE in progress (one still negotiating, or one idle between
        requests) is aborted at once: the sender has been answered for everything it sent, and a request it sends
        now is not acknowledged, so it retries later. An association receiving or handling a C-STORE gets up to
        ``wait`` seconds to answer it and is aborted as soon as it is idle.
        """
        if self.server is None:
            return
        server, self.server = self.server, None
        server.shutdown()
        deadline = time.monotonic() + wait
        running = [assoc for assoc in server.active_associations if assoc.is_alive()]
        aborted: set[int] = set()
        while running:
            for assoc in running:
                if id(assoc) not in aborted and (not self._busy(assoc) or time.monotonic() >= deadline):
                    if self._busy(assoc):
                        logger.warning("association with AE %r still busy at shutdown: aborting it", _ae(assoc))
                    else:
                        logger.info("aborting idle association with AE %r at shutdown", _ae(assoc))
                    aborted.add(id(assoc))
                    _drop(assoc)
            time.sleep(0.05)
            running = [assoc for assoc in running if assoc.is_alive()]
            if running and time.monotonic() >= deadline + 5.0:
                logger.error("%d association thread(s) did not end after the abort", len(running))
                break

    def _busy(self, assoc: Any) -> bool:
        """Whether ``assoc`` is receiving a request or running our handler for one."""
        return bool(assoc.is_established) and self.receiver.busy(assoc)


def _drop(assoc: Any) -> None:
    """Abort ``assoc``, including a connection that has not sent its A-ASSOCIATE-RQ yet.

    The one use of pynetdicom internals (checked with pynetdicom 3.0): a connection still waiting for its
    A-ASSOCIATE-RQ is in DUL state 2, where A-ABORT is not a valid event and ``Association.abort`` does nothing;
    the public API has no way to end it before its ACSE timeout. So it gets what that timeout would do: the ARTIM
    timer expires (the DUL closes the connection, back to state 1) and the acceptor is woken with ``None``.
    """
    try:
        dul = assoc.dul
        if dul.state_machine.current_state == "Sta2":
            dul.artim_timer.timeout = 0
            dul.to_user_queue.put(None)
        else:
            assoc.abort(block=False)
    except Exception:
        logger.exception("could not abort the association with AE %r", _ae(assoc))


def _ae(assoc: Any) -> str:
    try:
        return str(assoc.requestor.ae_title or "") or "(none yet)"
    except Exception:
        return "(unknown)"


def make_receiver(storage: StorageSettings, engine: Any, on_queued: Callable[[], None] | None = None) -> Receiver:
    return Receiver(storage, db.session_factory(engine), on_queued)
