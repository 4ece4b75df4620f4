"""The store on its own: migrations match the tables, and seq assignment under concurrent writers."""

from __future__ import annotations

import threading
import uuid

from forgeflow.api.store import Store
from forgeflow.events.models import JobStatusEvent, PipelineProgress


def test_migrations_create_exactly_the_declared_schema(store_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from forgeflow.api.store.tables import metadata

    store = Store(store_url)
    try:
        store.migrate()
        store.migrate()  # idempotent
        with store.engine.connect() as conn:
            context = MigrationContext.configure(conn)
            assert context.get_current_revision() == "0006_batches"
            diff = [
                d
                for d in compare_metadata(context, metadata)
                if d[0] != "remove_table" or d[1].name != "alembic_version"
            ]
            assert diff == []
    finally:
        store.close()


def test_a_store_of_the_first_schema_upgrades_in_place_keeping_its_rows(store_url: str) -> None:
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from forgeflow.api.store.db import MIGRATIONS_DIR

    store = Store(store_url)
    try:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.set_main_option("path_separator", "os")
        with store.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0001_initial")
        with store.engine.begin() as conn:  # rows as the first schema's code wrote them
            conn.execute(
                text(
                    "INSERT INTO jobs (id, status, source, pipeline, input, request_hash, created_at, updated_at, "
                    "cancel_requested, last_seq, stages_total, stages_completed) VALUES ('old', 'succeeded', "
                    "'inline', '{\"stages\": []}', '{}', 'h', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, false, 1, 1, 1)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO stage_runs (job_id, stage_index, plugin, tool, status, attempt) "
                    "VALUES ('old', 0, 'testkit', 'numbers', 'completed', 1)"
                )
            )
        store.migrate()
        (row,) = store.stage_rows("old")
        assert (row["plugin"], row["status"], row["progress"]) == ("testkit", "completed", None)
        job = store.get_job("old")
        assert job is not None and job["status"] == "succeeded" and job["heartbeat_at"] is None
        assert (job["created_by"], job["cancelled_by"]) == (None, None)  # made before tokens had names
        store.set_cancel_requested("old", "later-admin")
        assert store.audit_entries(10)[0][0]["actor"] == "later-admin"
    finally:
        store.close()


def test_concurrent_writers_get_gapless_per_job_sequences(store_url: str) -> None:
    store = Store(store_url)
    store.migrate()
    published: list[tuple[str, int, int]] = []
    lock = threading.Lock()

    def publish(events) -> None:  # type: ignore[no-untyped-def]
        with lock:
            published.extend((e.job_id, e.seq, e.cursor) for e in events)

    jobs = [f"store-{i}" for i in range(3)]

    def writer(job_id: str) -> None:
        for _ in range(20):
            batch = [PipelineProgress(job_id=job_id, stages_total=1, stages_completed=0, percent=0) for _ in range(3)]
            store.ingest(batch, publish=publish)
            store.ingest(batch, publish=publish)  # a retried delivery: stored once

    threads = [threading.Thread(target=writer, args=(j,)) for j in jobs for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        for job_id in jobs:
            seqs = [s for j, s, _ in published if j == job_id]
            assert seqs == list(range(1, 121))
            assert store.get_job(job_id)["last_seq"] == 120
        cursors = [c for _, _, c in published]
        assert cursors == sorted(cursors)  # published in commit order
        job, created = store.create_job(
            job_id=f"j-{uuid.uuid4().hex[:6]}",
            pipeline={"stages": []},
            input_data={},
            request_hash="h",
            source="inline",
            template_id=None,
        )
        assert created and job["last_seq"] == 1
        assert store.ingest([JobStatusEvent(job_id=job["id"], status="cancelled")])[0].terminal
    finally:
        store.close()


def test_the_store_keeps_who_created_cancelled_and_deleted(store_url: str) -> None:
    store = Store(store_url)
    store.migrate()
    try:
        job, created = store.create_job(
            job_id="who-1",
            pipeline={"stages": []},
            input_data={},
            request_hash="h",
            source="inline",
            template_id=None,
            created_by="ci",
        )
        assert created and job["created_by"] == "ci" and job["cancelled_by"] is None
        store.set_cancel_requested("who-1", "ops")
        store.set_cancel_requested("who-1", "someone-later")  # the first request counts
        assert store.get_job("who-1")["cancelled_by"] == "ops"  # type: ignore[index]
        assert store.create_template("t", "T", {"stages": []}, created_by="ci")["created_by"] == "ci"
        assert store.delete_template("t", by="ops") and not store.delete_template("t", by="ops")
        entries, total = store.audit_entries(10)
        assert [(e["actor"], e["action"], e["target"]) for e in entries] == [
            ("ops", "template.delete", "t"),
            ("ops", "job.cancel", "who-1"),
        ]
        assert total == 2
    finally:
        store.close()
