"""A PACS's parallel send on the default [listener] settings: ``--senders`` dcmtk storescu processes from one host
at once, ``--per-sender`` small synthetic CRs each, against ``cxr-triage serve`` with no workers ([worker]
processes = 0: only the listener's acknowledgement is measured).

Usage: ``python bench/pacs_defaults.py [--senders 16] [--per-sender 50] [--size 64]``. Printed, from the receiver's
database (never from the senders' exit statuses): how many of the instances sent were recorded (each row is
written before 0x0000 is answered), the seconds the send took, the machine. Exit status 1 when one is missing.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

from cxr_triage.core.config import load_config, merge
from cxr_triage.testing import parallel, peers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--senders", type=int, default=16, help="parallel associations from 127.0.0.1 (default 16)")
    parser.add_argument("--per-sender", type=int, default=50, help="instances per association (default 50)")
    parser.add_argument("--size", type=int, default=64, help="rows = columns of each image (default 64)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cxr-pacs-") as name:
        tmp = Path(name)
        port = peers.free_port()
        values = merge(
            {k: dict(v) for k, v in load_config(None, environ={}).values.items()},
            {
                "listener": {"port": port},  # every other [listener] key keeps its default
                "storage": {"spool_dir": str(tmp / "spool"), "sr_dir": str(tmp / "sr"), "min_free_mb": 1},
                "database": {"url": f"sqlite:///{tmp / 'cxr.sqlite'}"},
                "worker": {"processes": 0},
            },
            "bench",
        )
        config = peers.write_config(tmp / "cxr.toml", values)
        groups = parallel.make_files(tmp / "files", args.senders, args.per_sender, args.size)
        with peers.Server(config, port, ready_timeout=180):
            result = parallel.run(port, str(values["database"]["url"]), groups)
    listener = values["listener"]
    print(
        f"machine: {platform.node()}, {os.cpu_count()} CPUs ({cpu_name()}); load {os.getloadavg()[0]:.1f}\n"
        f"defaults: max_associations {listener['max_associations']}, max_connections_per_peer "
        f"{listener['max_connections_per_peer']}\n"
        f"{result.senders} parallel associations x {args.per_sender} instances ({args.size}x{args.size}): "
        f"{result.recorded} of {result.sent} recorded by the receiver ({dict(result.statuses)}) "
        f"in {result.seconds:.1f} s ({result.sent / result.seconds:.0f} instances/s)"
    )
    return 0 if result.recorded == result.sent else 1


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
