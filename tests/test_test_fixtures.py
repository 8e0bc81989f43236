"""The shared test fixtures keep the promises tests/README.md makes: ports in this xdist worker's share and never
handed out twice, and a fresh PostgreSQL database per test in the session's cluster."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from cxr_triage.testing import peers


def test_free_ports_keep_to_this_workers_share_and_never_repeat(monkeypatch: pytest.MonkeyPatch) -> None:
    for index in range(3):  # each worker of three finds ports (the kernel's bind(0) favours odd ones)
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{index}")
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
        assert peers.worker_slot() == (index, 3)
        ports = peers.free_ports(20) + [peers.free_port() for _ in range(20)]
        assert all((port >> 1) % 3 == index for port in ports), ports
        assert len(set(ports)) == len(ports)
        assert not any(peers.port_open(port) for port in ports)


def test_worker_slot_outside_xdist_and_on_odd_variables() -> None:
    assert peers.worker_slot({}) == (0, 1)
    assert peers.worker_slot({"PYTEST_XDIST_WORKER": "gw0", "PYTEST_XDIST_WORKER_COUNT": "1"}) == (0, 1)
    assert peers.worker_slot({"PYTEST_XDIST_WORKER": "master", "PYTEST_XDIST_WORKER_COUNT": "2"}) == (0, 1)
    assert peers.worker_slot({"PYTEST_XDIST_WORKER": "gw5", "PYTEST_XDIST_WORKER_COUNT": "4"}) == (1, 4)


@pytest.mark.postgres
@pytest.mark.parametrize("turn", [1, 2])
def test_postgres_url_is_a_fresh_empty_database_for_each_test(postgres_url: str, turn: int) -> None:
    engine = sa.create_engine(postgres_url)
    try:
        with engine.begin() as conn:
            name = conn.execute(sa.text("SELECT current_database()")).scalar()
            tables = conn.execute(sa.text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")).scalar()
            conn.execute(sa.text("CREATE TABLE left_behind (turn integer)"))  # the next test must not see it
            listen = conn.execute(sa.text("SHOW listen_addresses")).scalar()
    finally:
        engine.dispose()
    assert str(name).startswith("test_") and tables == 0, (name, tables, turn)
    assert listen == "127.0.0.1"
