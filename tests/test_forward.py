"""Forwarding of SRs: success against a real C-STORE SCP, retries with exponential backoff against a closed port,
the dead-letter state after max_attempts, `cxr-triage forward --retry` resending dead forwards, and the Orthanc
REST settings of a destination (the metadata itself: tests/test_orthanc_e2e.py)."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pydicom
import pytest
from conftest import chest_dataset, free_port, write_config
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage
from sqlalchemy import select

from cxr_triage.cli import main
from cxr_triage.core import db
from cxr_triage.outputs import forward
from cxr_triage.outputs.delivery import retry_delay


@contextmanager
def receiver(port: int, ae_title: str = "PACS", ssl_context: Any = None) -> Iterator[list[pydicom.Dataset]]:
    """A pynetdicom Storage SCP on 127.0.0.1:``port`` (over TLS with ``ssl_context``) collecting what it receives."""
    received: list[pydicom.Dataset] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title=ae_title)
    ae.add_supported_context(ComprehensiveSRStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)], ssl_context=ssl_context
    )
    try:
        yield received
    finally:
        server.shutdown()


def _forwards(harness) -> list[db.Forward]:
    with harness.sessions() as session:
        return list(session.scalars(select(db.Forward).order_by(db.Forward.id)).all())


def test_sr_is_forwarded_to_every_destination(make_harness) -> None:
    ports = [free_port(), free_port()]
    destinations = [{"ae_title": f"PACS{i}", "host": "127.0.0.1", "port": p} for i, p in enumerate(ports)]
    harness = make_harness(forward={"destinations": destinations, "timeout": 5})
    with receiver(ports[0], "PACS0") as first, receiver(ports[1], "PACS1") as second:
        harness.send([chest_dataset(seed=1), chest_dataset(seed=2)])
        harness.work()
    rows = harness.rows()
    sent_uids = {r["sr_sop_instance_uid"] for r in rows}
    assert {str(ds.SOPInstanceUID) for ds in first} == sent_uids
    assert {str(ds.SOPInstanceUID) for ds in second} == sent_uids
    assert all(ds.SOPClassUID == ComprehensiveSRStorage for ds in first)
    forwards = _forwards(harness)
    assert len(forwards) == 4
    assert {(f.state, f.attempts, f.status) for f in forwards} == {(db.FORWARD_SENT, 1, 0)}
    assert {f.destination for f in forwards} == {f"PACS{i}@127.0.0.1:{p}" for i, p in enumerate(ports)}


def test_closed_port_backs_off_then_dead_letters_and_forward_retry_resends(make_harness, capsys) -> None:
    port = free_port()
    fcfg = {
        "destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": port}],
        "max_attempts": 3,
        "backoff_seconds": 10,
        "backoff_max_seconds": 15,
        "timeout": 3,
    }
    harness = make_harness(forward=fcfg)
    harness.send([chest_dataset()])
    harness.work()  # classifies, then the first forwarding round fails against the closed port
    (row,) = _forwards(harness)
    assert (row.state, row.attempts, row.status) == (db.FORWARD_PENDING, 1, None)
    delay = (row.next_attempt_at - row.updated_at).total_seconds()
    assert delay == retry_delay(1, 10, 15) == 10
    assert "refused" in row.last_error.lower() or "not established" in row.last_error.lower()

    assert forward.process_due(harness.sessions, harness.settings.forward) == [], (
        "not due before the backoff has passed"
    )
    later = db.utcnow() + dt.timedelta(seconds=11)
    (outcome,) = forward.process_due(harness.sessions, harness.settings.forward, now=later)
    assert (outcome.state, outcome.attempts) == (db.FORWARD_PENDING, 2)
    (row,) = _forwards(harness)
    assert (row.next_attempt_at - row.updated_at).total_seconds() == retry_delay(2, 10, 15) == 15
    (outcome,) = forward.process_due(harness.sessions, harness.settings.forward, now=later + dt.timedelta(seconds=20))
    assert (outcome.state, outcome.attempts) == (db.FORWARD_DEAD, 3)
    (row,) = _forwards(harness)
    assert row.state == db.FORWARD_DEAD and row.next_attempt_at is None and row.last_error
    assert forward.process_due(harness.sessions, harness.settings.forward, now=later + dt.timedelta(days=1)) == []

    config = write_config(harness.tmp / "cxr.toml", harness.config)
    assert main(["forward", "--json", "--config", str(config)]) == 0
    (listed,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert listed["state"] == "dead" and listed["attempts"] == 3
    assert main(["forward", "--retry", "--config", str(config)]) == 1, "still closed: not everything was sent"
    capsys.readouterr()
    with receiver(port) as received:
        assert main(["forward", "--retry", "--json", "--config", str(config)]) == 0
    (resent,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert resent["state"] == "sent" and resent["status"] == 0
    assert [str(ds.SOPInstanceUID) for ds in received] == [harness.rows()[0]["sr_sop_instance_uid"]]
    (row,) = _forwards(harness)
    assert row.state == db.FORWARD_SENT


def test_bad_destination_is_a_configuration_error(make_harness, capsys) -> None:
    harness = make_harness()
    harness.config["forward"]["destinations"] = [{"ae_title": "PACS", "host": "127.0.0.1"}]
    config = write_config(harness.tmp / "cxr.toml", harness.config)
    assert main(["forward", "--config", str(config)]) == 2
    assert "missing keys" in capsys.readouterr().err


def test_sr_is_forwarded_over_tls_to_a_tls_destination(make_harness, tmp_path) -> None:
    from test_scu import self_signed, server_tls

    cert, key = self_signed(tmp_path, "pacs")
    tls_port, plain_port = free_port(), free_port()
    harness = make_harness(
        forward={
            "destinations": [
                {"ae_title": "SECURE", "host": "127.0.0.1", "port": tls_port, "tls": True},
                {"ae_title": "PLAIN", "host": "127.0.0.1", "port": plain_port},
            ],
            "tls_ca_file": str(cert),
            "timeout": 5,
        }
    )
    with receiver(tls_port, "SECURE", server_tls(cert, key)) as secure, receiver(plain_port, "PLAIN") as plain:
        harness.send([chest_dataset(seed=3)])
        harness.work()
    (row,) = harness.rows()
    assert [str(ds.SOPInstanceUID) for ds in secure] == [row["sr_sop_instance_uid"]]
    assert [str(ds.SOPInstanceUID) for ds in plain] == [row["sr_sop_instance_uid"]]
    assert {(f.destination, f.state) for f in _forwards(harness)} == {
        (f"SECURE@127.0.0.1:{tls_port}", db.FORWARD_SENT),
        (f"PLAIN@127.0.0.1:{plain_port}", db.FORWARD_SENT),
    }


def test_an_orthanc_destination_takes_its_rest_url_and_credentials() -> None:
    from cxr_triage.core.config import ConfigError
    from cxr_triage.core.settings import ForwardSettings

    entry = {"ae_title": "ORTHANC", "host": "pacs", "port": 4242, "orthanc_url": "http://pacs:8042/"}
    settings = ForwardSettings.from_table({"destinations": [entry, {"ae_title": "OTHER", "host": "h", "port": 104}]})
    (endpoint,) = settings.orthanc
    assert (endpoint.destination, endpoint.url) == ("ORTHANC@pacs:4242", "http://pacs:8042")
    assert [str(d) for d in settings.destinations] == ["ORTHANC@pacs:4242", "OTHER@h:104"]
    secured = {**entry, "orthanc_username": "cxr", "orthanc_password": "secret"}
    (endpoint,) = ForwardSettings.from_table({"destinations": [secured]}).orthanc
    assert endpoint.username == "cxr" and "secret" not in repr(endpoint)
    for bad, message in [
        ({**entry, "orthanc_url": "pacs:8042"}, "expected http(s)://host:port"),
        ({**entry, "orthanc_username": "cxr"}, "go together"),
        ({**entry, "orthanc_port": 8042}, "unknown keys ['port']"),
        ({"ae_title": "ORTHANC", "host": "pacs", "port": 4242, "orthanc_password": "x"}, "need orthanc_url"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            ForwardSettings.from_table({"destinations": [bad]})
