"""The store on its own: migrations match the tables, and seq assignment under concurrent writers."""

from __future__ import annotations

import threading
import time
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


def test_jobs_submitted_together_share_one_transaction_and_each_gets_its_own_answer(store_url: str) -> None:
    """While one writer holds the store's lock, submissions queue; the next holder stores them all in
    one statement, publishes each job's first message in commit order, and answers each caller: a
    repeated id with the same request is the stored job (not created), with another request a
    Conflict, even when the repeat arrives in the same group."""
    from sqlalchemy import event

    from forgeflow.api.store.db import Conflict

    store = Store(store_url)
    store.migrate()
    published: list[tuple[str, int, int]] = []
    job_inserts: list[int] = []
    publish_lock = threading.Lock()

    def publish(events) -> None:  # type: ignore[no-untyped-def]
        with publish_lock:
            published.extend((e.job_id, e.seq, e.cursor) for e in events)

    @event.listens_for(store.engine, "before_cursor_execute")
    def count_job_inserts(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("INSERT INTO JOBS"):
            job_inserts.append(len(context.compiled_parameters) if context.compiled_parameters else 1)

    def submit(job_id: str, request_hash: str = "h") -> tuple[dict, bool]:  # type: ignore[type-arg]
        job, created = store.create_job(
            job_id=job_id,
            pipeline={"stages": [{"plugin": "p", "tool": "t"}]},
            input_data={"n": job_id},
            request_hash=request_hash,
            source="inline",
            template_id=None,
            publish=publish,
        )
        return dict(job), created

    def in_one_group(calls: list[tuple[str, str]]) -> list[object]:
        outcomes: list[object] = [None] * len(calls)

        def run(i: int, job_id: str, request_hash: str) -> None:
            try:
                outcomes[i] = submit(job_id, request_hash)
            except Conflict as exc:
                outcomes[i] = exc

        threads = [threading.Thread(target=run, args=(i, *call)) for i, call in enumerate(calls)]
        with store.db.write_lock:  # a writer in the middle of its transaction
            for t in threads:
                t.start()
            time.sleep(0.5)  # every submission queued behind it
        for t in threads:
            t.join(30)
        return outcomes

    try:
        new_ids = [f"group-{i:02d}" for i in range(20)]
        outcomes = in_one_group([(job_id, "h") for job_id in new_ids])
        assert job_inserts == [20]  # one statement for all of them
        for job_id, (job, created) in zip(new_ids, outcomes, strict=True):  # type: ignore[misc]
            assert created and job["id"] == job_id and job["status"] == "queued" and job["last_seq"] == 1
            assert job["input"] == {"n": job_id} and job["stages_total"] == 1
            assert job == store.get_job(job_id)
        assert sorted(j for j, _, _ in published) == new_ids and {s for _, s, _ in published} == {1}
        cursors = [c for _, _, c in published]
        assert cursors == sorted(cursors)  # published in commit order
        created_at = [store.get_job(job_id)["created_at"] for job_id, _, _ in published]  # type: ignore[index]
        assert created_at == sorted(created_at)  # times in the order they were stored

        # A group that cannot be one statement (an id in use) is stored one by one, each answered.
        published.clear()
        job_inserts.clear()
        outcomes = in_one_group(
            [("group-a", "h"), ("group-00", "h"), ("group-01", "other"), ("group-b", "h"), ("group-b", "h")]
        )
        fresh_a, same, conflict, first_b, second_b = outcomes
        assert fresh_a[1] and fresh_a[0]["id"] == "group-a"  # type: ignore[index]
        assert same == (store.get_job("group-00"), False)
        assert isinstance(conflict, Conflict) and "group-01" in str(conflict)
        assert sorted([first_b[1], second_b[1]]) == [False, True]  # type: ignore[index]
        assert first_b[0] == second_b[0] == store.get_job("group-b")  # type: ignore[index]
        assert sorted(j for j, _, _ in published) == ["group-a", "group-b"]  # each new job once
        assert [e.seq for e in store.events_after("group-b", 0)] == [1]
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
