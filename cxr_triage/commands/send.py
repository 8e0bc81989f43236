"""Send DICOM files to a DICOM listener with C-STORE, each in the transfer syntax it is stored in.

By default the files go to this installation's own listener (the ``[listener]`` AE title, host and port of the
configuration), so that ``cxr-triage send FILES`` then ``cxr-triage results`` is a complete first test. Folders
are searched recursively; files in them that are not DICOM are reported and skipped (a file named on the command
line that is not DICOM counts as not stored). A compressed file (JPEG 2000,
JPEG-LS, RLE, ...) is sent as it is: the association proposes each file's own transfer syntax, with Explicit and
Implicit VR Little Endian as fallbacks.

One line per file: the path, its SOP Instance UID and what the receiver answered. The exit status is 0 when every
file was stored, 1 when any was not (or was not DICOM), 2 when the command cannot run (a missing path, a bad
configuration).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from cxr_triage.core.bootstrap import CommandError, Context, run_command
from cxr_triage.dicom.scu import Destination, SendResult, send_datasets

BATCH = 16
"""Files sent per association (all of a batch is read into memory first)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, help="DICOM files or folders (searched recursively)")
    parser.add_argument("--config", default=None, help="configuration file whose [listener] is the default target")
    parser.add_argument("--host", default=None, help="receiver's host (default: the configured listener's)")
    parser.add_argument("--port", type=int, default=None, help="receiver's port (default: the configured listener's)")
    parser.add_argument("--called-ae", default=None, help="receiver's AE title (default: the configured listener's)")
    parser.add_argument("--calling-ae", default="CXR_SEND", help="our AE title (default: CXR_SEND)")
    parser.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds (default: 30)")


def iter_files(paths: Sequence[Path]) -> Iterator[tuple[Path, bool]]:
    """(file, named on the command line): files as given, and every non-hidden file under each folder, sorted."""
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and not any(part.startswith(".") for part in child.relative_to(path).parts):
                    yield child, False
        else:
            yield path, True


def read_dicom(path: Path) -> Dataset | str:
    """The dataset of ``path``, or why it cannot be sent.

    A file without a file meta header (ACR-NEMA style) is given the transfer syntax it was read in, so that it is
    sent in that encoding.
    """
    try:
        with warnings.catch_warnings():  # pydicom warns about what it guesses in a non-DICOM file; we say it once
            warnings.simplefilter("ignore")
            dataset = dcmread(path, force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        return f"not sent: cannot read it as DICOM ({exc})"
    if "SOPInstanceUID" not in dataset or "SOPClassUID" not in dataset:
        return "not DICOM (no SOP Class or Instance UID)"
    if "TransferSyntaxUID" not in dataset.file_meta:
        implicit, little = dataset.original_encoding
        if implicit is not None:
            dataset.file_meta.TransferSyntaxUID = (
                ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
            )
    return dataset


def describe(result: SendResult) -> str:
    if result.ok and result.status == 0:
        return "stored (0x0000)"
    return result.detail


def send_paths(paths: Sequence[Path], destination: Destination, calling_ae: str, timeout: float) -> tuple[int, int]:
    """Send every file, printing a line each; (files stored, files not stored)."""
    stored = failed = 0
    batch: list[tuple[Path, Dataset]] = []

    def flush() -> None:
        nonlocal stored, failed
        if not batch:
            return
        results = send_datasets([ds for _, ds in batch], destination, calling_ae, timeout=timeout)
        for (path, ds), result in zip(batch, results, strict=True):
            print(f"{path}\t{ds.get('SOPInstanceUID', '-')}\t{describe(result)}", flush=True)
            stored, failed = (stored + 1, failed) if result.ok else (stored, failed + 1)
        batch.clear()

    for path, named in iter_files(paths):
        dataset = read_dicom(path)
        if isinstance(dataset, str):
            if named:  # a file the user named is a failure; one found in a folder (a README, say) is skipped
                print(f"{path}\t-\t{dataset}", flush=True)
                failed += 1
            else:
                print(f"{path}\t-\tskipped: {dataset}", flush=True)
            continue
        batch.append((path, dataset))
        if len(batch) >= BATCH:
            flush()
    flush()
    return stored, failed


def _send(args: argparse.Namespace, context: Context) -> int:
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        raise CommandError(f"no such file or folder: {', '.join(missing)}")
    listener = context.settings.listener
    host = args.host or listener.host
    try:
        destination = Destination(
            ae_title=args.called_ae or listener.ae_title,
            host="127.0.0.1" if host in ("0.0.0.0", "::") else host,
            port=args.port or listener.port,
        )
        stored, failed = send_paths(args.paths, destination, args.calling_ae, args.timeout)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    print(f"{stored} stored, {failed} not stored, to {destination}", file=sys.stderr)
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    return run_command(args, "send", lambda context: _send(args, context))
