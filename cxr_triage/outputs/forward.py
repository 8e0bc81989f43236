"""``cxr-triage forward``: forwarding of Structured Reports to the PACS, and the command to list or resend what
goes out (SRs, HL7 messages to the RIS, Orthanc metadata).

Each SR gets one ``forwards`` row per ``[forward] destinations`` entry, state ``pending``. The heatmap object the SR
references (``sr_documents.heatmap_path``, ``outputs.heatmapobject``) is part of that delivery: it is sent in the
same association, just before its SR, and the SR only once the heatmap object was stored (``send_datasets``'s
``requires``); the row is ``sent`` only when both were stored, otherwise both are retried together. So a PACS that
has the SR has its heatmap, with the SR's retries, dead letter and TLS (a destination that takes no Secondary
Captures at all gets the SR alone, with a warning).
The housekeeping sends due rows (``process_due``), one association per destination per round:
success -> ``sent``; failure -> retried after ``delivery.retry_delay(attempt, backoff_seconds,
backoff_max_seconds)``, and after ``max_attempts`` attempts the row goes to the dead-letter state ``dead`` with its
last error (``cxr_triage.outputs.delivery``, which HL7 messages and Orthanc metadata share). ``cxr-triage forward
--retry`` puts dead rows of all three back to pending and sends every pending row now.

A row being sent is leased by pushing its ``next_attempt_at`` past the send's timeout, so two workers never send
the same SR at once; a worker killed mid-send leaves the row pending, to be retried when that lease passes.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import log_name
from cxr_triage.core import db
from cxr_triage.core.settings import ForwardSettings
from cxr_triage.dicom.scu import NO_CONTEXT, SendResult, send_datasets
from cxr_triage.outputs import delivery, srfiles

if TYPE_CHECKING:
    import ssl


logger = logging.getLogger(log_name(__name__))

MAX_PER_ROUND = 100
"""Most forwards sent by one worker in one round."""


def enqueue(session: Session, sr: db.SRDocument, forwarding: ForwardSettings, now: dt.datetime) -> int:
    """Add a pending forward of ``sr`` to every configured destination; the number added."""
    for destination in forwarding.destinations:
        session.add(delivery.new_row(db.Forward, now, sr_id=sr.id, destination=str(destination)))
    return len(forwarding.destinations)


class ForwardOutcome(delivery.SROutcome):
    """What became of an SR forward (C-STORE): ``status`` is the last DIMSE status."""

    @property
    def forward_id(self) -> int:
        return self.row_id


OUTBOX = delivery.sr_outbox(
    "sr",
    db.Forward,
    ForwardOutcome,
    logger,
    sent="SR %(sr_sop_instance_uid)s forwarded to %(destination)s",
    about="SR %(sr_sop_instance_uid)s to %(destination)s",
)
as_record = OUTBOX.as_record
"""An SR forward's outcome as ``cxr-triage forward`` prints it."""
listed = OUTBOX.listed
"""Every SR forward, oldest first, as ``cxr-triage forward`` lists it."""


def _claim_due(
    sessions: sessionmaker[Session], now: dt.datetime, lease: dt.timedelta, force: bool
) -> list[tuple[int, str, tuple[str, ...], str]]:
    columns = (db.Forward.id, db.Forward.destination, db.SRDocument.path, db.SRDocument.sop_instance_uid)
    rows = OUTBOX.claim(sessions, now, lease, force, MAX_PER_ROUND, (), *columns, db.SRDocument.heatmap_path)
    # the heatmap object first: a PACS that has stored the SR has what it references
    return [(r[0], r[1], (r[4], r[2]) if r[4] else (r[2],), r[3]) for r in rows]


def process_due(
    sessions: sessionmaker[Session],
    forwarding: ForwardSettings,
    now: dt.datetime | None = None,
    force: bool = False,
) -> list[ForwardOutcome]:
    """Send the forwards that are due (all pending ones when ``force``), one association per destination."""
    timeout = forwarding.timeout
    now = now or db.utcnow()
    claimed = _claim_due(sessions, now, dt.timedelta(seconds=4 * timeout + 60), force)
    if not claimed:
        return []
    by_destination: dict[str, list[tuple[int, tuple[str, ...], str]]] = defaultdict(list)
    for forward_id, destination, paths, sr_uid in claimed:
        by_destination[destination].append((forward_id, paths, sr_uid))
    outcomes: list[ForwardOutcome] = []
    context = None  # built for the first TLS destination; a TLS error is recorded on its forwards
    for destination_text, items in by_destination.items():
        results, datasets, sendable = _read_datasets(items)
        # an SR goes only after its heatmap object was stored (or the destination takes no Secondary Captures)
        requires = [i - 1 if i and sendable[i - 1] == forward_id else None for i, forward_id in enumerate(sendable)]
        sent, context = _send_to(forwarding, destination_text, datasets, context, requires)
        results.update(_combined(sendable, sent, destination_text))
        outcomes += _record_results(sessions, forwarding, items, results)
    return outcomes


def _read_datasets(
    items: list[tuple[int, tuple[str, ...], str]],
) -> tuple[dict[int, SendResult], list[Any], list[int]]:
    """Read the files of ``items`` (forward id, paths: the heatmap object's if any, then the SR's, SR UID): the
    failed results of the forwards with an unreadable file, the datasets read, and the forward id of each dataset
    (in the same order)."""
    import pydicom

    results: dict[int, SendResult] = {}
    datasets = []
    sendable = []
    for forward_id, paths, _ in items:
        try:
            read = []
            for path in paths:
                srfiles.ensure_final(path)  # its rename may be a moment behind its commit
                read.append(pydicom.dcmread(path))
        except Exception as exc:
            logger.exception("forward %s: cannot read file %s", forward_id, path)
            results[forward_id] = SendResult(False, None, f"cannot read file {path}: {type(exc).__name__}: {exc}")
            continue
        datasets += read
        sendable += [forward_id] * len(read)
    return results, datasets, sendable


def _combined(sendable: list[int], sent: list[SendResult], destination: str) -> dict[int, SendResult]:
    """One result per forward from the results of its datasets (the heatmap object, then the SR): the first
    failure, the heatmap object's named as such, else the SR's success. A heatmap object that the destination
    refused to negotiate (no presentation context for Secondary Capture: it does not store them at all, which no
    retry changes) does not hold its SR back: a WARNING says the destination has no heatmaps."""
    results: dict[int, SendResult] = {}
    for position, (forward_id, result) in enumerate(zip(sendable, sent, strict=True)):
        earlier = results.get(forward_id)
        if earlier is not None and not earlier.ok:
            continue  # its first failure stands
        heatmap = position + 1 < len(sendable) and sendable[position + 1] == forward_id
        if heatmap and not result.ok:
            if result.status is None and NO_CONTEXT in result.detail:
                logger.warning("%s does not store Secondary Captures: a heatmap object is not filed there", destination)
                continue
            result = SendResult(False, result.status, f"heatmap object: {result.detail}")
        results[forward_id] = result
    return results


def _send_to(
    forwarding: ForwardSettings,
    destination_text: str,
    datasets: list[Any],
    context: ssl.SSLContext | None,
    requires: list[int | None] | None = None,
) -> tuple[list[SendResult], ssl.SSLContext | None]:
    """Send ``datasets`` to the destination named ``destination_text``: one result per dataset, and the TLS context
    (``context``, or the one built here for the first TLS destination) for the next destinations."""
    try:
        destination = forwarding.destination(destination_text)
        if destination.tls and context is None:
            context = forwarding.client_tls_context()
        sent = send_datasets(
            datasets,
            destination,
            forwarding.calling_ae_title,
            timeout=forwarding.timeout,
            tls_context=context,
            requires=requires,
        )
    except Exception as exc:  # a malformed destination or calling AE title: a configuration error
        logger.exception("forwarding to %s failed", destination_text)
        sent = [SendResult(False, None, f"{type(exc).__name__}: {exc}")] * len(datasets)
    return sent, context


def _record_results(
    sessions: sessionmaker[Session],
    forwarding: ForwardSettings,
    items: list[tuple[int, tuple[str, ...], str]],
    results: dict[int, SendResult],
) -> list[ForwardOutcome]:
    """Record the result of each forward of ``items`` in its row, in one transaction; the outcomes, in order."""
    attempts = [
        delivery.Attempt(forward_id, sr_uid, result.ok, result.status, result.detail)
        for forward_id, _, sr_uid in items
        for result in (results[forward_id],)
    ]
    return OUTBOX.record(sessions, forwarding, attempts)


def requeue_dead(sessions: sessionmaker[Session], now: dt.datetime | None = None) -> int:
    """Dead forwards back to pending with a fresh attempt budget; the number requeued."""
    return delivery.requeue_dead(sessions, db.Forward, now or db.utcnow())
