"""A PACS's parallel associations on the default [listener] settings: 16 dcmtk storescu processes from one host
at once, 50 instances each, against ``cxr-triage serve`` with no workers (only the listener's acknowledgement is
measured). Every instance must be recorded by the receiver (its row is written before 0x0000 is answered). The
protections against idle sockets, idle associations and slow senders are tested in tests/test_hostile_peers.py."""

from __future__ import annotations

from pathlib import Path

from conftest import config_values, write_config

from cxr_triage.core.settings import ListenerSettings
from cxr_triage.testing import parallel
from cxr_triage.testing.peers import Server

SENDERS = 16
PER_SENDER = 50


def test_the_defaults_take_16_parallel_associations_from_one_host(tmp_path: Path) -> None:
    values = config_values(tmp_path, None, worker={"processes": 0})
    defaults = ListenerSettings()
    for key in ("max_associations", "max_connections_per_peer", "association_request_timeout", "network_timeout"):
        assert values["listener"][key] == getattr(defaults, key), f"the test must run on the default {key}"
    assert defaults.max_associations >= SENDERS and defaults.max_connections_per_peer >= SENDERS
    config = write_config(tmp_path / "cxr.toml", values)
    groups = parallel.make_files(tmp_path / "files", SENDERS, PER_SENDER)
    with Server(config, int(values["listener"]["port"]), ready_timeout=180) as server:
        result = parallel.run(server.port, str(values["database"]["url"]), groups)
        log = server.log.read_text(errors="replace")
    assert result.sent == SENDERS * PER_SENDER == 800
    assert result.recorded == 800, (result, log[-4000:])
    assert set(result.statuses) == {"queued"}, result.statuses
    assert "max_connections_per_peer" not in log and "local limit exceeded" not in log, log[-4000:]
