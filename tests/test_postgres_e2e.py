"""End-to-end on a throwaway PostgreSQL cluster: the cluster fixture itself, and the whole pipeline with two
worker processes competing for jobs (tests/e2e_postgres_scenario.py, in its own network namespace because the
dcmtk storescp receiving the SRs binds every interface).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from cxr_triage.testing import peers

pytestmark = [pytest.mark.postgres, pytest.mark.peers]

SCENARIO = Path(__file__).resolve().parent / "e2e_postgres_scenario.py"


def test_throwaway_cluster_serves_127_0_0_1_and_is_removed() -> None:
    with peers.PostgresCluster(database="probe") as cluster:
        root = cluster.root
        engine = sa.create_engine(cluster.url)
        try:
            with engine.connect() as conn:
                database = conn.execute(sa.text("SELECT current_database()")).scalar()
                listen = conn.execute(sa.text("SHOW listen_addresses")).scalar()
        finally:
            engine.dispose()
        assert database == "probe"
        assert listen == "127.0.0.1"
        assert peers.port_open(cluster.port)
    assert root is not None and not root.exists()
    assert not peers.port_open(cluster.port)


@pytest.mark.slow
def test_two_workers_process_every_instance_exactly_once(tmp_path: Path) -> None:
    count = 8
    argv = peers.netns_command([sys.executable, str(SCENARIO), str(tmp_path / "work"), "--images", str(count)])
    done = peers.run_scenario(argv, timeout=300)
    assert done.returncode == 0, f"scenario failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-8000:]}"
    summary = json.loads(done.stdout.strip().splitlines()[-1])

    facts = summary["database"]
    assert summary["results"] == count
    assert summary["result_sop_uids_match"]
    assert summary["result_statuses"] == {"ok": count}
    # Every instance stored once, claimed once, classified once, with one SR forwarded once.
    assert facts["instances"] == facts["distinct_sop_instance_uids"] == count
    # The allow-list of calling AE titles (config/postgresql.toml) kept the unknown sender out.
    assert summary["intruder_storescu_returncode"] != 0
    assert not summary["intruder_stored"]
    assert facts["statuses"] == {"done": count}
    assert facts["attempts"] == {"1": count}
    assert facts["predictions_per_instance"] == {"1": count}
    assert facts["srs_per_instance"] == {"1": count}
    assert facts["forwards"] == count
    assert facts["forward_states"] == {"sent": count}
    assert facts["forward_attempts"] == {"1": count}
    # The receiving PACS got exactly those SRs, filed into the original studies.
    assert summary["received_srs"] == count
    assert summary["received_modalities"] == {"SR": count, "OT": count}, "each SR with its heatmap object"
    assert summary["received_heatmaps_referenced"]
    assert summary["received_sr_uids"] == facts["sr_uids"] == summary["result_sr_uids"]
    assert summary["received_study_uids_match"]
    # Both worker processes took part, and no instance was classified twice.
    assert summary["classification_log_lines"] == summary["classified_distinct_uids"] == count
    assert len(summary["classified_by_process"]) == 2, summary["classified_by_process"]
