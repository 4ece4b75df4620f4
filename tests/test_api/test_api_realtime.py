"""Ingest, event store and WebSocket streams, driven by events posted to the ingest endpoint."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.test_api.conftest import ApiServer, event, stage_events, ws_collect


def _job_events(job_id: str, stages: int = 3) -> list[dict[str, Any]]:
    out = [event(job_id, "job_status", status="running", flow_run_id=str(uuid.uuid4()))]
    for index in range(stages):
        out += stage_events(job_id, index, total=stages)
    out.append(
        event(
            job_id,
            "job_status",
            status="succeeded",
            envelope={"ok": True, "result": {"total": 1}, "stages_executed": stages},
        )
    )
    return out


@pytest.mark.every_database
def test_ingest_assigns_seq_dedupes_and_rejects_malformed(quiet_api: ApiServer) -> None:
    events = _job_events("ext-1")
    first = quiet_api.ingest(events[:4])
    assert first.json() == {"received": 4, "stored": 4, "duplicates": 0}
    # A retried delivery (the same batch again, overlapping the next one) is stored once.
    second = quiet_api.ingest(events[2:])
    assert second.json()["stored"] == len(events) - 4 and second.json()["duplicates"] == 2
    stored = quiet_api.client().get("/v1/jobs/ext-1/events").json()
    assert [e["seq"] for e in stored["events"]] == list(range(1, len(events) + 1))
    assert [e["event_id"] for e in stored["events"]] == [e["event_id"] for e in events]
    job = quiet_api.client().get("/v1/jobs/ext-1").json()
    assert job["status"] == "succeeded" and job["source"] == "external" and job["stages_completed"] == 3

    # A malformed batch (422, nothing stored): test_api_requests.py::test_ingest_validation, in-process.
    too_long = quiet_api.ingest([event("j" * 129, "job_status", status="running")])
    assert too_long.status_code == 422 and too_long.json()["field"] == "events.0.job_id"
    assert quiet_api.ingest([]).json() == {"received": 0, "stored": 0, "duplicates": 0}


def test_late_and_reconnecting_clients_get_every_message_once(quiet_api: ApiServer) -> None:
    events = _job_events("replay", stages=4)
    quiet_api.ingest(events[:5])
    ws_url = f"{quiet_api.ws_url}/v1/ws/jobs/replay"
    received: list[dict[str, Any]] = []
    with connect(ws_url) as ws:  # late: the job started before it connected
        for _ in range(5):
            received.append(json.loads(ws.recv(timeout=10)))
        quiet_api.ingest(events[5:8])
        for _ in range(3):
            received.append(json.loads(ws.recv(timeout=10)))
    # Disconnected: more happens meanwhile, then it reconnects from the last seq it saw.
    quiet_api.ingest(events[8:12])
    with connect(f"{ws_url}?after_seq={received[-1]['seq']}") as ws:
        for _ in range(4):
            received.append(json.loads(ws.recv(timeout=10)))
        quiet_api.ingest(events[12:])
        try:
            while True:
                received.append(json.loads(ws.recv(timeout=10)))
        except ConnectionClosed:
            pass
        assert ws.protocol.close_rcvd.code == 1000
    assert [m["seq"] for m in received] == list(range(1, len(events) + 1))
    assert [m["event_id"] for m in received] == [e["event_id"] for e in events]


@pytest.mark.every_database
def test_events_published_during_replay_are_neither_lost_nor_doubled(quiet_api: ApiServer) -> None:
    job_id = "race"
    quiet_api.ingest([event(job_id, "job_status", status="running")])
    stop = threading.Event()
    sent: list[dict[str, Any]] = []

    def producer() -> None:
        n = 0
        while not stop.is_set() and n < 400:
            batch = [
                event(job_id, "pipeline_progress", stages_total=400, stages_completed=n + i, percent=0)
                for i in range(5)
            ]
            quiet_api.ingest(batch)
            sent.extend(batch)
            n += 5
        final = event(
            job_id, "job_status", status="succeeded", envelope={"ok": True, "result": {}, "stages_executed": 0}
        )
        quiet_api.ingest([final])
        sent.append(final)

    thread = threading.Thread(target=producer)
    thread.start()
    clients = []
    for after in (0, 0, 3):
        time.sleep(0.05)
        clients.append(ws_collect(f"{quiet_api.ws_url}/v1/ws/jobs/{job_id}?after_seq={after}", timeout=60)[0])
    thread.join()
    for after, messages in zip((0, 0, 3), clients, strict=True):
        assert [m["seq"] for m in messages] == list(range(after + 1, len(sent) + 2))
        assert messages[-1]["status"] == "succeeded"


@pytest.mark.every_database
def test_concurrent_producers_get_gapless_sequences(quiet_api: ApiServer) -> None:
    jobs = [f"conc-{i}" for i in range(4)]

    def produce(job_id: str) -> None:
        for _ in range(10):
            quiet_api.ingest(
                [event(job_id, "pipeline_progress", stages_total=1, stages_completed=0, percent=0) for _ in range(5)]
            )

    threads = [threading.Thread(target=produce, args=(j,)) for j in jobs]
    with connect(f"{quiet_api.ws_url}/v1/ws/jobs?after_cursor=0") as all_ws:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = [json.loads(all_ws.recv(timeout=10)) for _ in range(200)]
    for job_id in jobs:
        seqs = [m["seq"] for m in got if m["job_id"] == job_id]
        assert seqs == list(range(1, 51))
    assert [m["cursor"] for m in got] == sorted(m["cursor"] for m in got)
    # Resume the all-jobs stream from a cursor.
    middle = got[99]["cursor"]
    with connect(f"{quiet_api.ws_url}/v1/ws/jobs?after_cursor={middle}") as all_ws:
        rest = [json.loads(all_ws.recv(timeout=10)) for _ in range(100)]
    assert rest == got[100:]


def test_slow_client_is_closed_with_reason_and_never_slows_the_others(api_factory: Any) -> None:
    api = api_factory(launch_jobs=False, ws_queue_size=10)
    job_id = "flood"
    api.ingest([event(job_id, "job_status", status="running")])
    big = "x" * 150_000
    fast_msgs: list[dict[str, Any]] = []
    slow_seqs: list[int] = []
    slow_close: list[Any] = []
    done = threading.Event()

    def fast_reader() -> None:
        with connect(f"{api.ws_url}/v1/ws/jobs/{job_id}", max_size=None) as ws:
            try:
                while True:
                    msg = json.loads(ws.recv(timeout=30))
                    fast_msgs.append(msg)
                    if msg["type"] == "job_status" and msg["status"] == "failed":
                        break
            finally:
                done.set()

    def slow_reader() -> None:
        # Reads, but far slower than messages arrive (and uncompressed, so buffers really fill).
        with connect(f"{api.ws_url}/v1/ws/jobs/{job_id}", max_queue=1, compression=None, max_size=None) as ws:
            try:
                while True:
                    slow_seqs.append(json.loads(ws.recv(timeout=60))["seq"])
                    time.sleep(0.3)
            except ConnectionClosed:
                pass
            slow_close.append(ws.protocol.close_rcvd)

    readers = [threading.Thread(target=fast_reader), threading.Thread(target=slow_reader)]
    for reader in readers:
        reader.start()
    time.sleep(0.5)
    slowest = 0.0
    for i in range(300):
        started = time.monotonic()
        response = api.ingest(
            [
                event(
                    job_id,
                    "pipeline_error",
                    stage_index=0,
                    plugin="p",
                    tool="t",
                    error=f"{i} {big}",
                    error_type="RuntimeError",
                )
            ]
        )
        slowest = max(slowest, time.monotonic() - started)
        assert response.status_code == 200
    api.ingest(
        [
            event(
                job_id,
                "job_status",
                status="failed",
                envelope={"ok": False, "error": "e", "error_type": "RuntimeError", "stages_executed": 0},
            )
        ]
    )
    assert done.wait(60)
    for reader in readers:
        reader.join(120)
    assert [m["seq"] for m in fast_msgs] == list(range(1, 303))
    assert slowest < 5  # ingestion never waited for the slow client
    # The slow client was dropped with a reason, after what it had been sent; it resumes by seq.
    close = slow_close[0]
    assert close is not None and close.code == 1013 and "after_seq=" in close.reason, close
    assert slow_seqs == list(range(1, len(slow_seqs) + 1)) and len(slow_seqs) < 302
    rest, final = ws_collect(f"{api.ws_url}/v1/ws/jobs/{job_id}?after_seq={slow_seqs[-1]}")
    assert [m["seq"] for m in rest] == list(range(slow_seqs[-1] + 1, 303)) and final.code == 1000


def test_websocket_rejects_unknown_jobs_and_bad_positions(quiet_api: ApiServer) -> None:
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as info:
        connect(f"{quiet_api.ws_url}/v1/ws/jobs/nope")
    assert info.value.response.status_code == 404
    quiet_api.ingest([event("known", "job_status", status="running")])
    with pytest.raises(InvalidStatus) as info:
        connect(f"{quiet_api.ws_url}/v1/ws/jobs/known?after_seq=-1")
    assert info.value.response.status_code == 422


def test_spooled_events_are_imported_at_start_up(api_factory: Any, tmp_path: Any) -> None:
    api = api_factory(launch_jobs=False)
    spool = api.settings.spool_dir
    spool.mkdir(parents=True, exist_ok=True)
    events = _job_events("spooled", stages=2)
    # Half was delivered before the outage; the whole list is in the spool of a dead process.
    api.ingest(events[:3])
    dead_pid = 999_999
    path = spool / f"{dead_pid}-abcdef12.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + '{"torn', encoding="utf-8")
    api.stop()
    again = api_factory(launch_jobs=False)
    assert again.settings.home == api.settings.home
    stored = again.client().get("/v1/jobs/spooled/events").json()["events"]
    assert [e["event_id"] for e in stored] == [e["event_id"] for e in events]
    assert [e["seq"] for e in stored] == list(range(1, len(events) + 1))
    assert not list(spool.glob("*.jsonl*")) or all(p.name.endswith(".bad") for p in spool.iterdir())
    assert again.client().get("/v1/jobs/spooled").json()["status"] == "succeeded"


def test_plugin_lifecycle_follows_ingested_stage_events(quiet_api: ApiServer) -> None:
    client = quiet_api.client()
    quiet_api.ingest(
        [
            event("remote", "job_status", status="running"),
            event("remote", "pipeline_stage_start", stage_index=0, plugin="tk", tool="numbers"),
            event(
                "remote",
                "pipeline_error",
                stage_index=0,
                plugin="tk",
                tool="numbers",
                error="GPU fell off",
                error_type="RuntimeError",
            ),
            event(
                "remote",
                "pipeline_stage_end",
                stage_index=0,
                plugin="tk",
                tool="numbers",
                duration_ms=5,
                ok=False,
                result_size_bytes=0,
            ),
        ]
    )
    health = client.get("/v1/plugins/testkit/health").json()
    assert health["healthy"] is False and health["state"] == "FAILED" and health["last_error"] == "GPU fell off"
    quiet_api.ingest(
        [
            event("remote2", "pipeline_stage_start", stage_index=0, plugin="testkit", tool="numbers"),
            event(
                "remote2",
                "pipeline_stage_end",
                stage_index=0,
                plugin="testkit",
                tool="numbers",
                duration_ms=5,
                ok=True,
                result_size_bytes=10,
            ),
        ]
    )
    health = client.get("/v1/plugins/tk/health").json()
    assert health["healthy"] is True and health["state"] == "INITIALIZED"
    assert health["calls"] >= 2 and health["failures"] >= 1
