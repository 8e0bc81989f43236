"""End-to-end on PostgreSQL with two worker processes, run inside a private network namespace.

    unshare -n -- sh -c 'ip link set lo up && exec "$0" "$@"' python tests/e2e_postgres_scenario.py DIR

A throwaway PostgreSQL cluster (127.0.0.1, random port), ``cxr-triage db upgrade`` and ``cxr-triage serve`` with
``[worker] processes = 2`` and one job claimed at a time (so the two workers compete for every instance), SRs
forwarded to a dcmtk storescp. Several synthetic chest CRs in several studies are sent by two concurrent dcmtk
storescu processes. Waits (bounded) until every instance has a completed result and every SR has reached
storescp, then reads the database directly: predictions, attempts, SR documents and forwards per instance,
and which worker process logged each classification.

The last line of stdout is a JSON summary the pytest test asserts on; on failure the exit status is 1 and
stderr holds the error and the tails of the logs.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom
import sqlalchemy as sa

from cxr_triage.testing import peers, synthetic

LISTENER_AET = "CXR_TRIAGE"
RECEIVER_AET = "PACS"
CLASSIFIED = re.compile(r" (?P<process>\S+) cxr_triage\.recorder: SOP instance (?P<uid>[0-9.]+): ")
"""A worker's log line for one classified instance (format of ``worker_process_main``)."""
WORKER_READY = re.compile(r" (?P<process>\S+) cxr_triage\.worker: ready: model \S+ warmed up ")
"""A worker's log line once its model is loaded and warmed up: it takes jobs from then on."""


def database_facts(url: str) -> dict[str, Any]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            instances = conn.execute(sa.text("SELECT id, sop_instance_uid, status, attempts FROM instances")).all()
            predictions = Counter(r[0] for r in conn.execute(sa.text("SELECT instance_id FROM predictions")))
            srs = conn.execute(
                sa.text("SELECT instance_id, sop_instance_uid, heatmap_sop_instance_uid FROM sr_documents")
            ).all()
            forwards = conn.execute(sa.text("SELECT sr_id, state, attempts FROM forwards")).all()
    finally:
        engine.dispose()
    sr_count = Counter(r[0] for r in srs)
    return {
        "instances": len(instances),
        "sop_instance_uids": sorted(r[1] for r in instances),
        "distinct_sop_instance_uids": len({r[1] for r in instances}),
        "statuses": dict(Counter(r[2] for r in instances)),
        "attempts": dict(Counter(str(r[3]) for r in instances)),
        "predictions_per_instance": dict(Counter(str(predictions.get(r[0], 0)) for r in instances)),
        "srs_per_instance": dict(Counter(str(sr_count.get(r[0], 0)) for r in instances)),
        "sr_uids": sorted(r[1] for r in srs),
        "heatmap_uids": sorted(r[2] for r in srs if r[2]),
        "forward_states": dict(Counter(r[1] for r in forwards)),
        "forward_attempts": dict(Counter(str(r[2]) for r in forwards)),
        "forwards": len(forwards),
    }


def run(workdir: Path, count: int, studies: int, timeout: float) -> dict[str, Any]:
    # One scenario read top to bottom, each step depending on the last: split, it would read worse.
    started = time.monotonic()
    listener_port, receiver_port = peers.free_ports(2)
    workdir.mkdir(parents=True, exist_ok=True)
    images = workdir / "images"
    images.mkdir()
    study_uids = [pydicom.uid.generate_uid() for _ in range(studies)]
    files = [
        synthetic.chest_file(
            images / f"{i:03d}.dcm", study_uid=study_uids[i % studies], patient_id=f"E2E-{i % studies}", seed=i
        )
        for i in range(count)
    ]
    sent_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    model = peers.make_tiny_checkpoint(workdir / "model.pt")
    with (
        peers.PostgresCluster() as cluster,
        peers.Storescp(workdir / "received", receiver_port, ae_title=RECEIVER_AET) as receiver,
    ):
        # The PostgreSQL example, made local.
        config = peers.write_config(
            workdir / "cxr-triage.toml",
            peers.example_config(
                "postgresql",
                {
                    "listener": {
                        "ae_title": LISTENER_AET,
                        "host": "127.0.0.1",
                        "port": listener_port,
                        "allowed_calling_aes": ["MODALITY0", "MODALITY1"],
                    },
                    "storage": {"spool_dir": str(workdir / "spool"), "sr_dir": str(workdir / "sr"), "min_free_mb": 1},
                    "database": {"url": cluster.url},
                    "model": {"path": str(model), "device": "cpu", "batch_size": 4},
                    "worker": {"processes": 2, "poll_interval": 0.1, "claim_batch": 1, "study_quiet_seconds": 2},
                    "gate": {"enabled": False},  # the synthetic images sent here are not chest radiographs to it
                    "forward": {
                        "destinations": [{"ae_title": RECEIVER_AET, "host": "127.0.0.1", "port": receiver_port}],
                        "backoff_seconds": 1,
                        "timeout": 20,
                    },
                },
            ),
        )
        peers.cli("db", "upgrade", config=config)
        with peers.Server(config, listener_port, log=workdir / "serve.log") as server:
            try:
                # Send only when both workers poll, so that they compete for every instance.
                peers.wait_until(
                    lambda: len({m["process"] for m in WORKER_READY.finditer(server.log.read_text())}) >= 2,
                    timeout,
                    "both worker processes to be ready",
                )
                halves = [files[0::2], files[1::2]]
                senders = [
                    subprocess.Popen(
                        [
                            peers.dcmtk_tool("storescu"),
                            *("-aet", f"MODALITY{n}", "-aec", LISTENER_AET, "-to", "30", "-ta", "30", "-td", "30"),
                            *("127.0.0.1", str(listener_port), *map(str, half)),
                        ],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                    )
                    for n, half in enumerate(halves)
                ]
                for sender in senders:
                    sender.communicate(timeout=timeout)
                # A calling AE title not on the allow-list is rejected at association: nothing stored.
                intruder_file = synthetic.chest_file(workdir / "intruder.dcm", patient_id="E2E-X", seed=99)
                intruder_uid = str(pydicom.dcmread(intruder_file, stop_before_pixels=True).SOPInstanceUID)
                intruder = peers.storescu(listener_port, [intruder_file], called_ae=LISTENER_AET, calling_ae="INTRUDER")

                engine = sa.create_engine(cluster.url)

                def all_done() -> bool:
                    if not server.alive():
                        raise peers.PeerError("cxr-triage serve exited")
                    with engine.connect() as conn:
                        done = conn.execute(sa.text("SELECT count(*) FROM instances WHERE status = 'done'")).scalar()
                    return int(done or 0) >= count

                try:
                    peers.wait_until(all_done, timeout, f"{count} instances to be classified", 0.5)
                finally:
                    engine.dispose()
                arrived = lambda: len(receiver.received()) >= 2 * count  # noqa: E731 (each SR and its heatmap)
                peers.wait_until(arrived, timeout, "the SRs and their heatmap objects to reach storescp")
                time.sleep(1.5)  # a duplicate classification or forward would land by now
                facts = database_facts(cluster.url)
                rows = [r for r in peers.results(config) if r.get("sop_instance_uid") in sent_uids]
                received = [pydicom.dcmread(p, stop_before_pixels=True) for p in receiver.received()]
            except BaseException:
                print(f"--- serve.log ---\n{peers.tail(server.log)}", file=sys.stderr)
                print(f"--- postgres.log ---\n{peers.tail(cluster.log)}", file=sys.stderr)
                raise
        log = server.log.read_text(errors="replace")
    classified = [(m["process"], m["uid"]) for m in CLASSIFIED.finditer(log)]
    return {
        "sent": count,
        "storescu_returncodes": [s.returncode for s in senders],
        "intruder_storescu_returncode": intruder.returncode,
        "intruder_stored": intruder_uid in facts["sop_instance_uids"],
        "results": len(rows),
        "result_statuses": dict(Counter(r.get("status") for r in rows)),
        "result_sop_uids_match": {r["sop_instance_uid"] for r in rows} == sent_uids,
        "result_sr_uids": sorted(r["sr_sop_instance_uid"] for r in rows),
        "database": facts,
        "received_srs": len([ds for ds in received if ds.Modality == "SR"]),
        "received_modalities": dict(Counter(str(ds.Modality) for ds in received)),
        "received_sr_uids": sorted(str(ds.SOPInstanceUID) for ds in received if ds.Modality == "SR"),
        "received_heatmaps_referenced": sorted(str(ds.SOPInstanceUID) for ds in received if ds.Modality != "SR")
        == sorted(facts["heatmap_uids"]),
        "received_study_uids_match": {str(ds.StudyInstanceUID) for ds in received} == set(study_uids),
        "classification_log_lines": len(classified),
        "classified_distinct_uids": len({uid for _, uid in classified}),
        "classified_by_process": dict(Counter(process for process, _ in classified)),
        "server_returncode": server.returncode,
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=90.0, help="deadline of each wait, seconds")
    args = parser.parse_args(argv)
    peers.stop_on_sigterm()
    if not peers.in_private_netns():
        parser.error("run inside a private network namespace: storescp binds every interface")
    print(json.dumps(run(args.workdir, args.images, args.studies, args.timeout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
