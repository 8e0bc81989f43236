"""Every output in one place: what it needs, how it builds its payload, how it delivers it, its configuration.

An output is a result that leaves cxr-triage: the Structured Report of a classified instance forwarded to the PACS
by C-STORE (``forward``) or STOW-RS (``dicomweb``), a finished study's HL7 ORU^R01 to the RIS (``hl7``), its
priority as Orthanc metadata (``orthanc``) and its FHIR R4 DiagnosticReport (``fhir``). As an operator of MONAI
Deploy's App SDK declares its inputs and outputs and the application wires the graph in one ``compose`` method, each
output here declares:

- ``needs``: ``INSTANCE``, the SR row of a classified instance (the recorder calls ``enqueue`` inside the
  transaction that records the result, after the SR file is durable), or ``STUDY``, a study just aggregated (the
  housekeeping calls ``enqueue`` inside the aggregation's transaction);
- ``enqueue``: builds its payload and adds one outbox row per configured destination (``delivery.new_row``), in
  that same transaction: a crash keeps both the result and its rows or neither;
- ``table`` and ``send_due``: its outbox rows (pending -> sent | dead, ``delivery``) and one round of sending the
  due ones, a housekeeping job named ``job``; ``drain``: whether ``forward --retry`` repeats rounds until every
  pending row was tried (one forced round sends every pending SR forward);
- ``as_record`` and ``listed``: its outcomes and rows as ``cxr-triage forward`` prints them; ``unsendable``: rows
  that stay dead whatever is retried (an HL7 message that could not be built), with the note that says so;
- ``check``: a start-up check of its configuration, run by the commands that send (``start_up_checks``);
- ``noun`` and ``states``: how ``/metrics`` (``cxr_triage.ops.metrics``) names its rows in the help of its series
  (named after its table), and the states that series always shows (0 when no row has them).

``compose`` wires them in the order they run (the housekeeping's jobs, the ``forward`` command's output). Adding
an output (FHIR, DICOMweb) is its module, its table (a migration) and one entry in ``compose``.

The heatmap object (``outputs.heatmapobject``, issue 31) is not an output of its own: it is part of the ``sr``
output's delivery. The SR references it, so a PACS must not get the SR without it; one ``forwards`` row carries
both, sent in one association, the heatmap object first and the SR only once it was stored, and the row is
``sent`` only when both were (``forward``); a ``dicomweb_stores`` row likewise carries both in one STOW-RS
request, the heatmap object first, and is ``sent`` only when the answer lists both as stored (``dicomweb``).
An entry of its own would have its own rows, retried and dead-lettered apart from the SR's, and a PACS could then
hold an SR whose reference it cannot resolve. ``[heatmap] pacs_object = "none"`` leaves it out.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from cxr_triage.core import db
from cxr_triage.outputs import delivery, dicomweb, fhir, forward, hl7, orthanc

if TYPE_CHECKING:
    from cxr_triage.core.settings import Settings


class Needs(StrEnum):
    """What an output is made from."""

    INSTANCE = "instance"
    """A classified instance's recorded result: its SR row (``db.SRDocument``)."""
    STUDY = "study"
    """A study aggregated after its quiet period (``db.Study``)."""


@dataclass(frozen=True)
class Output:
    """One output (module docstring)."""

    kind: str
    needs: Needs
    table: type[delivery.Outgoing]
    job: str
    enqueue: Callable[[Session, Any, Settings, dt.datetime], int]
    send_due: Callable[[sessionmaker[Session], Settings, bool, Collection[int]], Sequence[Any]]
    as_record: Callable[[Any], dict[str, Any]]
    listed: Callable[[Session], list[dict[str, Any]]]
    drain: bool = True
    check: Callable[[Settings], None] | None = None
    unsendable: Callable[[Session], int] | None = None
    unsendable_note: str = ""
    noun: str = "rows"
    states: tuple[str, ...] = ()


def compose() -> tuple[Output, ...]:
    """The outputs, wired to what they need and the settings they read, in the order they run."""
    # Long: one entry per output, the whole wiring in one place; it grows by one entry with each output.
    return (
        Output(
            "sr",
            Needs.INSTANCE,
            db.Forward,
            "forward SRs",
            enqueue=lambda session, sr, settings, now: forward.enqueue(session, sr, settings.forward, now),
            send_due=lambda sessions, settings, force, _: forward.process_due(sessions, settings.forward, force=force),
            as_record=forward.as_record,
            listed=forward.listed,
            drain=False,
            noun="SR forwards",  # each with its heatmap object, when the SR references one (docstring)
            states=(db.FORWARD_PENDING, db.FORWARD_SENT, db.FORWARD_DEAD),
        ),
        Output(
            "dicomweb",
            Needs.INSTANCE,
            db.DicomwebStore,
            "send SRs by STOW-RS",
            enqueue=lambda session, sr, settings, now: dicomweb.enqueue(session, sr, settings.dicomweb, now),
            send_due=lambda sessions, settings, force, tried: dicomweb.process_due(
                sessions, settings.dicomweb, force=force, exclude=tried
            ),
            as_record=dicomweb.as_record,
            listed=dicomweb.listed,
            check=dicomweb.check_settings,
            noun="SR STOW-RS deliveries",
            states=(db.FORWARD_PENDING, db.FORWARD_SENT, db.FORWARD_DEAD),
        ),
        Output(
            "hl7",
            Needs.STUDY,
            db.HL7Message,
            "send HL7 results",
            enqueue=lambda session, study, settings, now: hl7.enqueue(session, study, settings.hl7, now),
            send_due=lambda sessions, settings, force, tried: hl7.process_due(
                sessions, settings.hl7, force=force, exclude=tried
            ),
            as_record=hl7.as_record,
            listed=hl7.listed,
            check=hl7.check_settings,
            unsendable=hl7.unbuilt,
            unsendable_note="HL7 message(s) could not be built and stay dead: `cxr-triage forward` says why",
            noun="HL7 messages",
        ),
        Output(
            "orthanc",
            Needs.STUDY,
            db.OrthancMetadata,
            "set Orthanc metadata",
            enqueue=lambda session, study, settings, now: orthanc.enqueue(session, study, settings.forward, now),
            send_due=lambda sessions, settings, force, tried: orthanc.process_due(
                sessions, settings.forward, force=force, exclude=tried
            ),
            as_record=orthanc.as_record,
            listed=orthanc.listed,
            noun="Orthanc metadata updates",
        ),
        Output(
            "fhir",
            Needs.STUDY,
            db.FHIRReport,
            "send FHIR reports",
            enqueue=lambda session, study, settings, now: fhir.enqueue(session, study, settings.fhir, now),
            send_due=lambda sessions, settings, force, tried: fhir.process_due(
                sessions, settings.fhir, force=force, exclude=tried
            ),
            as_record=fhir.as_record,
            listed=fhir.listed,
            check=fhir.check_settings,
            unsendable=fhir.unbuilt,
            unsendable_note="FHIR report(s) could not be built and stay dead: `cxr-triage forward` says why",
            noun="FHIR reports",
        ),
    )


OUTPUTS = compose()


def needing(needs: Needs) -> tuple[Output, ...]:
    """The outputs made from ``needs``, in order."""
    return tuple(output for output in OUTPUTS if output.needs is needs)


def start_up_checks() -> tuple[Callable[[Settings], None], ...]:
    """The outputs' checks of their configuration, for the commands that send (serve, worker, forward)."""
    return tuple(output.check for output in OUTPUTS if output.check is not None)
