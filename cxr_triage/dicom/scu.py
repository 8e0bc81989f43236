"""C-STORE sender (SCU) that forwards reports to the configured DICOM destinations.

:func:`send_datasets` sends a batch over one association and reports one :class:`SendResult` per dataset; network
and association failures (refused connection, timeout, rejection, abort) come back as failed results with a clear
detail and are never raised, so the caller can record them and retry later (``cxr_triage.outputs.delivery``).
:class:`Destination` is one entry of the ``[forward] destinations`` configuration, validated at construction; a
destination with ``tls`` is reached over TLS (DICOM PS3.15 B.1), the peer's certificate verified against
:func:`client_tls_context`'s trust anchors and host name, with our own certificate for mutual TLS when configured.
"""

from __future__ import annotations

import copy
import logging
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association

from cxr_triage import log_name
from cxr_triage.core.endpoints import Destination, client_tls_context, validate_ae_title

logger = logging.getLogger(log_name(__name__))

MAX_PRESENTATION_CONTEXTS = 128
"""An association request carries at most 128 presentation contexts (PS3.8 9.3.2.2)."""

PROBE_TIMEOUT = 5.0
"""Seconds the follow-up TCP probe that classifies a failed connection (refused, timed out, ...) may take."""

_STATUS_WARNINGS = frozenset({0x0001, 0xB000, 0xB006, 0xB007})


@dataclass(frozen=True)
class SendResult:
    """Outcome of sending one dataset: ``status`` is the C-STORE response status, None when none came back."""

    ok: bool
    status: int | None
    detail: str


def _transfer_syntax(dataset: Dataset) -> UID:
    meta = getattr(dataset, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(uid) if uid else ExplicitVRLittleEndian


def _probe_connection(destination: Destination, timeout: float, tls: ssl.SSLContext | None) -> str:
    """Say why a connection to the destination fails (only called after pynetdicom failed to connect): TCP, then
    the TLS handshake for a TLS destination."""
    try:
        with socket.create_connection((destination.host, destination.port), timeout=min(timeout, PROBE_TIMEOUT)) as raw:
            if tls is None:
                return "could not connect (the connection failed, but a later attempt succeeded)"
            try:
                with tls.wrap_socket(raw, server_hostname=destination.host):
                    return "could not connect over TLS (the handshake failed, but a later attempt succeeded)"
            except ssl.SSLError as exc:
                why = getattr(exc, "verify_message", None) or exc.reason or str(exc)
                return f"TLS handshake failed ({why})"
    except ConnectionRefusedError:
        return "connection refused"
    except TimeoutError:
        return "connection timed out"
    except OSError as exc:
        return f"could not connect: {exc.strerror or exc}"


def _association_failure(
    assoc: Association,
    connected: bool,
    destination: Destination,
    timeout: float,
    elapsed: float,
    tls: ssl.SSLContext | None,
) -> str:
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        if primitive is not None and primitive.result is not None:
            return (
                f"association rejected by {destination} ({primitive.result_str}, source: {primitive.source_str}, "
                f"reason: {primitive.reason_str})"
            )
        return f"association rejected by {destination}"
    if not connected:
        return f"{_probe_connection(destination, timeout, tls)}: {destination}"
    if elapsed >= timeout:
        return f"association request to {destination} timed out after {timeout:g} s"
    if assoc.is_aborted:
        return f"association aborted by {destination} (connection closed after {elapsed:.1f} s without an answer)"
    return f"association with {destination} not established"


def send_datasets(
    datasets: Sequence[Dataset],
    destination: Destination,
    calling_ae_title: str,
    timeout: float = 30,
    tls_context: ssl.SSLContext | None = None,
    requires: Sequence[int | None] | None = None,
) -> list[SendResult]:
    """Send ``datasets`` to ``destination`` over one association; one result per dataset, in order.

    ``requires[i] = j`` (an earlier index): dataset i is sent only if dataset j was stored, or failed only because
    the destination accepted no presentation context for it (it does not store that SOP class at all); otherwise
    it fails unsent, naming why (a report is not filed without the object it references).

    A destination with ``tls`` is reached over TLS with ``tls_context`` (default: :func:`client_tls_context` with
    the system's trust store); ``tls_context`` is not used for other destinations.

    The association proposes one presentation context per SOP class and transfer syntax the datasets are stored in,
    plus Explicit and Implicit VR Little Endian per SOP class as fallbacks. Network and
    association errors never raise: every dataset not acknowledged gets ``ok=False`` and a detail naming the failure
    (refused connection, timeout, rejection with its reason, abort, or the DIMSE status). An invalid
    ``calling_ae_title`` raises ValueError (a configuration error).
    """
    calling = validate_ae_title(calling_ae_title, "calling AE title")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    if not datasets:
        return []

    results: list[SendResult | None] = [None] * len(datasets)
    contexts = _presentation_contexts(datasets, results)
    if not contexts:
        return [result for result in results if result is not None]

    ae = _application_entity(calling, timeout, contexts)
    tls = (tls_context or client_tls_context()) if destination.tls else None
    return _associate_and_send(ae, datasets, results, destination, timeout, tls, requires)


def _presentation_contexts(
    datasets: Sequence[Dataset], results: list[SendResult | None]
) -> dict[tuple[str, str], None]:
    """The (SOP class, transfer syntax) pairs to propose, in order of first use, then the fallbacks per SOP class.

    A dataset without SOP Class or SOP Instance UID gets its failed result in ``results`` here. More contexts than
    fit in one association raise ValueError.
    """
    contexts: dict[tuple[str, str], None] = {}  # (SOP class, transfer syntax), in order of first use
    for index, dataset in enumerate(datasets):
        sop_class = dataset.get("SOPClassUID")
        if not sop_class or not dataset.get("SOPInstanceUID"):
            results[index] = SendResult(False, None, "dataset lacks SOP Class UID or SOP Instance UID; not sent")
            continue
        contexts[(str(sop_class), str(_transfer_syntax(dataset)))] = None
    for sop_class in dict.fromkeys(sop_class for sop_class, _ in contexts):
        for fallback in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            contexts[(sop_class, str(fallback))] = None
    if len(contexts) > MAX_PRESENTATION_CONTEXTS:
        raise ValueError(
            f"a batch needs {len(contexts)} presentation contexts (SOP class x transfer syntax), at most "
            f"{MAX_PRESENTATION_CONTEXTS} fit in one association"
        )
    return contexts


def _application_entity(calling: str, timeout: float, contexts: dict[tuple[str, str], None]) -> AE:
    """Our AE, titled ``calling``, with every timeout set to ``timeout`` and ``contexts`` requested."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    # One transfer syntax per presentation context: an SCP accepts at most one syntax per context, so files of one
    # SOP class stored in different syntaxes (JPEG 2000 lossy and lossless, say) each need their own context.
    # Explicit and Implicit VR Little Endian (every SCP takes the latter) follow as fallbacks per SOP class.
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, [syntax])
    return ae


def _fail_unsent(results: list[SendResult | None], destination: Destination, detail: str) -> list[SendResult]:
    """Log the failure of a forward to ``destination``; every dataset without a result yet fails with ``detail``."""
    logger.warning("forward to %s failed: %s", destination, detail)
    return [result or SendResult(False, None, detail) for result in results]


def _associate_and_send(
    ae: AE,
    datasets: Sequence[Dataset],
    results: list[SendResult | None],
    destination: Destination,
    timeout: float,
    tls: ssl.SSLContext | None,
    requires: Sequence[int | None] | None = None,
) -> list[SendResult]:
    """Associate with ``destination`` and send every dataset without a result yet (``requires``: as for
    ``send_datasets``); ``ae`` is shut down after."""
    connected = False

    def on_connection_open(event: evt.Event) -> None:
        nonlocal connected
        connected = True

    started = time.monotonic()
    try:
        assoc = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, on_connection_open)],
            tls_args=(tls, destination.host) if tls is not None else None,
        )
    except socket.gaierror as exc:
        ae.shutdown()
        return _fail_unsent(
            results, destination, f"cannot resolve host name {destination.host!r}: {exc.strerror or exc}"
        )
    except (OSError, ValueError) as exc:
        ae.shutdown()
        return _fail_unsent(results, destination, f"could not connect to {destination}: {exc}")
    try:
        if not assoc.is_established:
            detail = _association_failure(assoc, connected, destination, timeout, time.monotonic() - started, tls)
            return _fail_unsent(results, destination, detail)
        for index, dataset in enumerate(datasets):
            if results[index] is not None:
                continue
            needed = requires[index] if requires is not None else None
            if needed is not None and (unmet := _unmet(results[needed])) is not None:
                results[index] = SendResult(False, None, f"not sent: {unmet}")
                continue
            results[index] = _send_one(assoc, dataset, destination, timeout)
        if assoc.is_established:
            assoc.release()
    finally:
        if assoc.is_established:
            assoc.abort()
        ae.shutdown()
    return [result for result in results if result is not None]


NO_CONTEXT = "No presentation context"
"""How pynetdicom's refusal to send a dataset of a SOP class the destination did not accept begins."""


def _unmet(required: SendResult | None) -> str | None:
    """Why a dataset that requires ``required`` may not be sent; None when it may."""
    if required is None or required.ok or (required.status is None and NO_CONTEXT in required.detail):
        return None
    return f"the object it requires was not stored ({required.detail})"


def _send_one(assoc: Association, dataset: Dataset, destination: Destination, timeout: float) -> SendResult:
    uid = dataset.SOPInstanceUID
    if not assoc.is_established:
        return SendResult(False, None, f"association with {destination} ended before this dataset was sent")
    if "TransferSyntaxUID" not in getattr(dataset, "file_meta", {}):
        # pynetdicom picks the presentation context by the file meta Transfer Syntax UID; a dataset built in memory
        # has none, so a copy (the caller's dataset is left alone) says it is to be encoded as Explicit VR LE.
        dataset = copy.copy(dataset)
        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    try:
        status = assoc.send_c_store(dataset)
    except (ValueError, AttributeError, TypeError, OSError, RuntimeError) as exc:
        logger.warning("C-STORE of %s to %s not sent: %s", uid, destination, exc)
        return SendResult(False, None, f"not sent: {exc}")
    if "Status" not in status:
        detail = f"no C-STORE response from {destination} (timed out after {timeout:g} s or association aborted)"
        logger.warning("C-STORE of %s: %s", uid, detail)
        return SendResult(False, None, detail)
    code = int(status.Status)
    if code == 0x0000:
        logger.info("C-STORE of %s to %s succeeded", uid, destination)
        return SendResult(True, code, "success")
    comment = status.get("ErrorComment")
    suffix = f": {comment}" if comment else ""
    if code in _STATUS_WARNINGS:
        logger.info("C-STORE of %s to %s stored with warning 0x%04X", uid, destination, code)
        return SendResult(True, code, f"stored with warning status 0x{code:04X}{suffix}")
    logger.warning("C-STORE of %s to %s failed with status 0x%04X", uid, destination, code)
    return SendResult(False, code, f"C-STORE failed with status 0x{code:04X}{suffix}")
