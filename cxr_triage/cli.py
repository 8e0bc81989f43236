"""The ``cxr-triage`` command: one subcommand per module, each with ``add_arguments`` and ``run``.

Like pynetdicom's apps, ``main(args=None)`` takes an argument list so tests call ``main([...])``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence

from cxr_triage import __version__

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("cxr_triage.commands.serve", "run the DICOM listener with its workers (the service itself)"),
    "send": ("cxr_triage.commands.send", "send DICOM files to the listener (or another DICOM node) with C-STORE"),
    "results": ("cxr_triage.commands.results", "print what became of each received image, one line per instance"),
    "status": (
        "cxr_triage.commands.status",
        "the pipeline's health: queue, forwards, spool, model; exit 1 on problems",
    ),
    "classify": (
        "cxr_triage.commands.classify",
        "classify DICOM/PNG/JPEG files or folders directly, without the listener",
    ),
    "forward": (
        "cxr_triage.commands.forward",
        "list the results sent to the PACS, RIS and Orthanc, or resend failed ones",
    ),
    "worker": ("cxr_triage.commands.worker", "run one worker alone (more hosts sharing one PostgreSQL database)"),
    "web": ("cxr_triage.commands.web", "serve the radiologists' worklist page and its JSON API"),
    "users": ("cxr_triage.commands.users", "add, list or remove the worklist's users"),
    "db": ("cxr_triage.commands.db", "create or upgrade the database schema (upgrade), or show its revision (current)"),
    "models": ("cxr_triage.commands.models", "the model registry: list the versions, promote one, roll back"),
    "retrain": ("cxr_triage.commands.retrain", "run the retraining job once now (--now), or list its recent runs"),
}
"""Subcommand -> (module, one-line help). Each module defines ``add_arguments(parser)`` and ``run(args) -> int``."""

DESCRIPTIONS: dict[str, str] = {
    "serve": """\
Receive chest radiographs over DICOM (C-STORE) and classify them as COVID-19, normal or pneumonia.

Every image the listener acknowledges is first written to the spool and recorded in the database, so nothing
acknowledged is lost if the service stops. Images that are not frontal chest radiographs are refused with a
reason. Results go to the database (see `cxr-triage results`), into a DICOM Structured Report filed in the
image's study, and to the configured PACS destinations. Without --config the built-in defaults apply: AE title
CXR_TRIAGE on 127.0.0.1:11112, a SQLite database and spool under ./var/, the bundled model. A new database is
created on first start. Stop with Ctrl-C or SIGTERM: images in progress are finished or handed back.

Research use only: not a medical device.""",
    "send": """\
Send DICOM files with C-STORE, each in the transfer syntax it is stored in (compressed files are sent as they
are). Without --host/--port/--called-ae the files go to the listener of the configuration (by default
CXR_TRIAGE on 127.0.0.1:11112), so `cxr-triage send FILES` then `cxr-triage results` is a complete test.
One line per file with what the receiver answered; exit 1 if any file was not stored.""",
    "results": """\
What became of each received image: classified (label and probabilities), refused (with the reason), failed,
or still queued. Run it in the folder `serve` runs in, or pass the same --config. The text output has the
columns received_at, sop_instance_uid, status, priority (the worklist's: urgent, priority, review, routine),
accession_number, then the label, probabilities and FLAGGED (or the reason); a header line names them when
standard output is a terminal (--header, --no-header). --json prints one object per line with the keys path,
sop_instance_uid, status, label, probabilities, reason, model_version, precision, typicality,
study_instance_uid, received_at, completed_at, sr_sop_instance_uid, flagged, spool_removed_at.
typicality is the typicality gate's score: higher = less like a chest radiograph (about 0-2 for one; over the
gate's threshold the image is refused as atypical); null when the gate did not score the image.""",
    "status": """\
The pipeline's health at a glance: images by state and how long the oldest has waited, failures of the last
24 hours, Structured Reports waiting or dead-lettered, free spool space against its reserve, the model and its
precision. Each problem is named with what to do. Exit status 0 healthy, 1 problems, 2 no database: usable as
a monitoring probe. Never loads the model.""",
    "classify": """\
Classify DICOM, PNG or JPEG files (or folders of them, searched recursively) without the listener or a database.
One line per input, refusals and unreadable files included; --json prints one object per line with path,
sop_instance_uid, status (ok, rejected, error), label, probabilities, reason, model_version, precision and
typicality. typicality is the typicality gate's score: higher = less like a chest radiograph (about 0-2 for one;
over the gate's threshold the image is refused as atypical); null with --no-gate. The text line shows it as
typicality=SCORE. Exit 0 when every input got a line; 2 when it cannot run (no model, a path that does not exist).""",
    "forward": """\
List every Structured Report sent (or to be sent) to the [forward] destinations, every HL7 ORU^R01 message to
the [hl7] destinations, every Orthanc metadata update and every FHIR report to the [fhir] destinations, with its
state (pending, sent, dead, superseded) and the last error. --retry puts dead ones back and sends everything
pending now; exit 1 if any still failed.""",
    "worker": """\
Run one worker without a listener: it takes received images from the shared database, classifies them and
records the results. For more hosts sharing one PostgreSQL database with a `serve` elsewhere.""",
    "web": """\
Serve the radiologists' worklist: studies sorted by suggested priority (urgent, priority, review, routine) then
arrival, refreshing itself; a page per study with its images, reasons and Structured Reports; radiologist
feedback (log in first); a JSON API under /api/ documented at /docs. Binds 127.0.0.1:8080 unless [web] host/port
or --host/--port say otherwise; restrict readers with [web] allowed_networks and serve it over HTTPS (a TLS
proxy, then [web] secure_cookies = true) before exposing it beyond this machine.""",
    "users": """\
Manage who may write through the worklist (feedback). add NAME asks for a password (at least 10 characters;
--password-stdin reads it from standard input); only its argon2 hash is stored. list shows the users; remove NAME
deletes one and ends their sessions.""",
    "db": """\
upgrade: create the database schema or bring it up to this version (run it after installing a new release;
`serve` refuses a database that is behind). current: show the database's schema revision; exit 1 when it is
not current.""",
    "models": """\
The model registry: every classifier the workers have run or may run, each with its sha256, state (candidate,
champion, retired), parent, when it was promoted and its metrics on the fixed evaluation set. The workers run
the champion. list shows them (--json: one object per line). promote ID makes that version the champion and
retires the current one; rollback returns to the champion before the current one (again: one further back).
Running workers switch between batches within [model] reload_interval seconds; nothing queued is lost and the
listener keeps its associations. A new [model] path file is promoted by the workers themselves ("configured").""",
    "retrain": """\
Retraining from the radiologists' feedback. --now runs it once: the labels confirmed or corrected since the last
promoted or rejected run (skipped, with the reason, when there are fewer than [retrain] min_new_labels images),
a challenger fine-tuned from the champion on them plus a replayed sample of the base data ([retrain] base_pack),
both models evaluated on the same fixed held-out set, and the challenger promoted only when its macro AUC is
better by [retrain] margin and no class's sensitivity falls by more than [retrain] sensitivity_tolerance; it is
rejected otherwise. The steps go to standard error, the outcome to standard output; exit 0 when the run finished
(promoted, rejected or skipped), 1 when it failed or another run was in progress. Without --now: the schedule
([retrain] schedule, run inside `serve` when [retrain] enabled) and the recent runs with their reasons.""",
}
"""What ``cxr-triage COMMAND --help`` says, written for the people who run the command."""


def _setup_argparser(args: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported (``classify`` alone loads torch)."""
    argv = sys.argv[1:] if args is None else list(args)
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = argparse.ArgumentParser(
        prog="cxr-triage",
        description="Chest X-ray triage DICOM plugin. Research use only: not a medical device.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if name != chosen:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        command_parser = sub.add_parser(
            name,
            help=help_text,
            description=DESCRIPTIONS[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(command_parser)
        command_parser.set_defaults(_module=module)
    return parser


def main(args: Sequence[str] | None = None) -> int:
    """Run ``cxr-triage ARGS``; each subcommand sets up logging and the rest in ``cxr_triage.core.bootstrap``."""
    parsed = _setup_argparser(args).parse_args(args)
    try:
        status = int(parsed._module.run(parsed))
        sys.stdout.flush()  # here, where a reader that left can be handled, not at the interpreter's exit
    except BrokenPipeError:
        return _reader_gone()
    return status


def _reader_gone() -> int:
    """The reader of standard output left (``cxr-triage results | head``): stop quietly, as Unix tools do."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush has nowhere to fail
    return 1


if __name__ == "__main__":
    sys.exit(main())
