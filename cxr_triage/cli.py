"""The ``cxr-triage`` command: one subcommand per module, each with ``add_arguments`` and ``run``.

Like pynetdicom's apps, ``main(args=None)`` takes an argument list so tests call ``main([...])``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from cxr_triage import __version__

COMMANDS: dict[str, tuple[str, str]] = {
    "classify": ("cxr_triage.classify", "classify DICOM/PNG/JPEG files or folders"),
    "serve": ("cxr_triage.server", "run the DICOM listener, workers and study aggregation"),
    "worker": ("cxr_triage.worker", "run one worker alone (for more hosts sharing the database)"),
    "results": ("cxr_triage.results", "print what the database holds, one line per instance"),
    "forward": ("cxr_triage.forward", "list SR forwards, or resend dead and pending ones now (--retry)"),
    "status": ("cxr_triage.status", "the pipeline's health: queue, forwards, spool, model; exit 1 on problems"),
    "db": ("cxr_triage.dbcli", "apply database migrations (upgrade) or show the revision (current)"),
}
"""Subcommand -> (module, help). Each module defines ``add_arguments(parser)`` and ``run(args) -> int``."""


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
        command_parser = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_module=module)
    return parser


def main(args: Sequence[str] | None = None) -> int:
    parsed = _setup_argparser(args).parse_args(args)
    logging.basicConfig(
        level=(parsed.log_level or "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(parsed._module.run(parsed))


if __name__ == "__main__":
    sys.exit(main())
