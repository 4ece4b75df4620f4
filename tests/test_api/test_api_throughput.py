"""Many small jobs and many clients (issue 24): a burst of submissions is all stored and all run, each
job's messages stay complete and in order, and a message reaches every one of 100 WebSocket clients.
No clocks: how fast is bench/bench_orchestration.py's business."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.test_api.conftest import ApiServer, event, stage_events

NOOP = [{"plugin": "testkit", "tool": "noop", "config": {}}]
BURST = 200


async def _submit_all(url: str, count: int) -> list[httpx.Response]:
    """``count`` submissions at once (64 connections)."""
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        return await asyncio.gather(
            *(http.post("/v1/jobs", json={"pipeline": NOOP, "input": {}, "job_id": f"burst-{n}"}) for n in range(count))
        )


def _wait_all_ended(client: httpx.Client, count: int, timeout: float = 1100) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        listed = client.get("/v1/jobs", params={"limit": 500}).json()
        ended = [j for j in listed["items"] if j["status"] in ("succeeded", "failed", "cancelled", "crashed")]
        if len(ended) == count:
            return list(listed["items"])
        if time.monotonic() > deadline:
            running = {j["job_id"]: j["status"] for j in listed["items"] if j not in ended}
            raise TimeoutError(f"{len(ended)} of {count} jobs ended; " + _why_unsuccessful(client, running))
        time.sleep(0.5)


def _why_unsuccessful(client: httpx.Client, unsuccessful: dict[str, Any]) -> str:
    """What each job that did not succeed said (its errors and last messages), for the failure report."""
    lines = []
    for job_id in sorted(unsuccessful)[:5]:
        events = client.get(f"/v1/jobs/{job_id}/events").json()["events"]
        lines.append(f"{job_id}: {unsuccessful[job_id]!r}; last messages: {json.dumps(events[-4:])[:3000]}")
    return f"{len(unsuccessful)} of {BURST} jobs did not succeed (or end):\n" + "\n".join(lines)


# 200 flow runs: about a minute on an idle 2-core machine, several on a busy one (pytest-timeout's 300 s
# default would fail a slow machine, not a wrong behaviour).
@pytest.mark.timeout(1200)
def test_a_burst_of_200_submissions_is_all_stored_all_run_and_every_job_keeps_its_messages_in_order(
    api_factory: Any,
) -> None:
    api: ApiServer = api_factory(max_concurrent_jobs=8)
    responses = asyncio.run(_submit_all(api.url, BURST))
    assert [r.status_code for r in responses] == [202] * BURST, [r.text for r in responses if r.status_code != 202]
    ids = {r.json()["job_id"] for r in responses}
    assert ids == {f"burst-{n}" for n in range(BURST)}
    with api.client() as client:
        stored = client.get("/v1/jobs", params={"limit": 500}).json()
        assert stored["total"] == BURST  # all stored at once, queued or already running

        jobs = _wait_all_ended(client, BURST)
        unsuccessful = {j["job_id"]: j.get("error_type") for j in jobs if j["status"] != "succeeded"}
        assert not unsuccessful, _why_unsuccessful(client, unsuccessful)
        flow_runs = {client.get(f"/v1/jobs/{job_id}").json()["flow_run_id"] for job_id in ids}
        assert len(flow_runs) == BURST and None not in flow_runs  # one Prefect flow run per job

        # Each job's messages, written while 8 jobs ran at once: numbered 1..N without a gap and in
        # the order the job made them.
        for job_id in sorted(ids):
            events = client.get(f"/v1/jobs/{job_id}/events").json()["events"]
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
            kinds = [(e["type"], e.get("status"), e.get("stage_index")) for e in events]
            assert kinds[0] == ("job_status", "queued", None)
            assert kinds[1] == ("job_status", "running", None)
            assert kinds[-1] == ("job_status", "succeeded", None)
            start = kinds.index(("pipeline_stage_start", None, 0))
            end = kinds.index(("pipeline_stage_end", None, 0))
            assert 1 < start < end < len(kinds) - 1
            assert sum(k[0] == "job_status" and k[1] == "succeeded" for k in kinds) == 1


async def _fan_out(api: ApiServer, job_id: str, clients: int, messages: list[dict[str, Any]]) -> list[list[int]]:
    url = f"{api.ws_url}/v1/ws/jobs/{job_id}"
    sockets = [await connect(url, max_queue=None) for _ in range(clients)]
    try:
        for ws in sockets:  # the stored first message, replayed to each
            assert json.loads(await ws.recv())["seq"] == 1

        async def ingest() -> None:
            async with httpx.AsyncClient(timeout=30) as http:
                for i in range(0, len(messages), 7):  # batches of 7, as a busy engine sends them
                    response = await http.post(
                        f"{api.url}/internal/v1/events",
                        json={"events": messages[i : i + 7]},
                        headers={"Authorization": f"Bearer {api.ingest_token}"},
                    )
                    assert response.status_code == 200

        async def collect(ws: Any) -> list[int]:
            seqs: list[int] = []
            async for raw in ws:  # the stream ends (1000, "job finished") after the terminal message
                seqs.append(json.loads(raw)["seq"])
            return seqs

        collectors = [asyncio.create_task(collect(ws)) for ws in sockets]
        await ingest()
        return list(await asyncio.wait_for(asyncio.gather(*collectors), 120))
    finally:
        for ws in sockets:
            await ws.close()


def test_every_message_reaches_each_of_100_websocket_clients_once_and_in_order(quiet_api: ApiServer) -> None:
    job_id = f"fan-{uuid.uuid4().hex[:8]}"
    assert quiet_api.ingest([event(job_id, "job_status", status="running")]).status_code == 200
    messages: list[dict[str, Any]] = []
    for index in range(10):
        messages += stage_events(job_id, index, total=10)
    messages.append(event(job_id, "job_status", status="succeeded", envelope={"ok": True, "result": {}}))
    received = asyncio.run(_fan_out(quiet_api, job_id, 100, messages))
    expected = list(range(2, len(messages) + 2))
    assert len(received) == 100
    assert all(seqs == expected for seqs in received), [s for s in received if s != expected][:1]
