"""The production shape on real parts: `forgeflow up` (a Prefect server with the work pool and
prefect.yaml's deployments, the API in deployment mode, the engine, a `prefect worker`), then jobs
from the API, from Prefect's REST API the way the UI's "Run" makes them, and from a schedule. The stack
runs with a distinctive API token that no log, database or file of the stack may hold."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import environment, free_port
from tests.test_api.conftest import wait_job, ws_collect
from tests.test_deployments import KEEP_ALIVE, PrefectRest

pytestmark = pytest.mark.xdist_group("stack")

CHAIN = [
    {"plugin": "testkit", "tool": "numbers"},
    {"plugin": "testkit", "tool": "scale"},
    {"plugin": "testkit", "tool": "total"},
]
TERMINAL = {"succeeded", "failed", "cancelled", "crashed"}
#: The stack's API token: distinctive, so a search of everything the stack wrote finds any copy.
CANARY = "stack-canary-7f3a91c2d5e84b06"
AUTH = {"Authorization": f"Bearer {CANARY}"}


class Running:
    def __init__(self, stack: Any, home: Path) -> None:
        self.stack = stack
        self.home = home
        self.api = httpx.Client(base_url=stack.api_url, timeout=30, limits=KEEP_ALIVE, headers=AUTH)
        self.prefect = PrefectRest(stack.prefect_api_url)

    def deployment_id(self, name: str = "forgeflow-pipeline/pipeline") -> str:
        answer = self.prefect.get(f"/deployments/name/{name}")
        answer.raise_for_status()
        return str(answer.json()["id"])

    def flow_run(self, flow_run_id: str) -> dict[str, Any]:
        answer = self.prefect.get(f"/flow_runs/{flow_run_id}")
        answer.raise_for_status()
        return dict(answer.json())

    def wait_flow_run_state(self, flow_run_id: str, state: str, timeout: float = 30) -> dict[str, Any]:
        """The flow run once Prefect has it in ``state`` (the job's terminal message may come first)."""
        deadline = time.monotonic() + timeout
        flow_run = self.flow_run(flow_run_id)
        while flow_run["state"]["type"] != state and time.monotonic() < deadline:
            time.sleep(0.3)
            flow_run = self.flow_run(flow_run_id)
        return flow_run

    def wait_for_job(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = self.api.get(f"/v1/jobs/{job_id}")
            if answer.status_code == 200 and answer.json()["status"] in TERMINAL:
                return dict(answer.json())
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} did not end within {timeout} s")


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    from pydantic import SecretStr

    from forgeflow.cli import stack
    from forgeflow.settings import Settings

    home = tmp_path_factory.mktemp("stack-home")
    settings = Settings(home=home, api_token=SecretStr(CANARY))
    # PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS: schedule-made runs within seconds
    with environment({"FORGEFLOW_HOME": str(home), "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1"}):
        try:
            started = stack.up(settings, prefect_port=free_port(), api_port=free_port(), workers=1)
            parts = list(started.processes)
            yield Running(started, home)
        finally:
            stopped = stack.down(settings)
    from forgeflow.processes import pid_alive

    assert {p.name for p in parts} <= {*stopped, "never"}  # every part was still running until down
    assert not [p.name for p in parts if pid_alive(p.pid, p.create_time)]


def test_an_api_job_is_a_flow_run_of_the_pipeline_deployment(running: Running) -> None:
    answer = running.api.post("/v1/jobs", json={"job_id": "job-deployed", "pipeline": CHAIN, "input": {"count": 4}})
    assert answer.status_code == 202, answer.text
    job = wait_job(running.api, "job-deployed")
    assert job["status"] == "succeeded", job.get("error")
    assert job["envelope"]["result"] == {"numbers": [0, 1, 2, 3], "scaled": [0, 2, 4, 6], "total": 12}
    flow_run = running.wait_flow_run_state(job["flow_run_id"], "COMPLETED")
    assert flow_run["deployment_id"] == running.deployment_id()
    assert flow_run["name"] == "job-job-deployed" and flow_run["state"]["type"] == "COMPLETED"
    assert flow_run["parameters"]["job_id"] == "job-deployed"
    messages, _ = ws_collect(f"{running.stack.api_url.replace('http', 'ws')}/v1/ws/jobs/job-deployed", headers=AUTH)
    kinds = [m["type"] for m in messages]
    assert kinds.count("pipeline_stage_start") == kinds.count("pipeline_stage_end") == 3
    assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
    assert messages[-1]["status"] == "succeeded"


def test_a_run_made_like_the_prefect_ui_makes_one_is_a_job_of_its_own(running: Running) -> None:
    deployment = running.deployment_id()
    flow_runs = []
    for count in (5, 6):  # two runs without a job id: two jobs, each named after its flow run
        made = running.prefect.post(
            f"/deployments/{deployment}/create_flow_run",
            json={"parameters": {"pipeline": {"pipeline": CHAIN}, "input": {"count": count}}},
        )
        assert made.status_code == 201, made.text
        flow_runs.append(made.json()["id"])
    for flow_run_id, count in zip(flow_runs, (5, 6), strict=True):
        job = running.wait_for_job(flow_run_id)
        assert job["status"] == "succeeded", job.get("error")
        assert job["flow_run_id"] == flow_run_id
        assert job["input"] == {"count": count}
        assert [(s["plugin"], s["tool"]) for s in job["pipeline"]["stages"]] == [("testkit", t["tool"]) for t in CHAIN]
        assert job["envelope"]["result"]["total"] == 2 * sum(range(count))
        stages = running.api.get(f"/v1/jobs/{flow_run_id}/pipeline").json()["stages"]
        assert [s["status"] for s in stages] == ["completed"] * 3
        assert running.flow_run(flow_run_id)["name"] == f"job-{flow_run_id}"
    listed = {j["job_id"] for j in running.api.get("/v1/jobs", params={"limit": 100}).json()["items"]}
    assert set(flow_runs) <= listed
    # the all-jobs stream replays them like any job's, ending with their terminal status
    from websockets.sync.client import connect

    ended: set[str] = set()
    deadline = time.monotonic() + 30
    with connect(
        f"{running.stack.api_url.replace('http', 'ws')}/v1/ws/jobs?after_cursor=0", additional_headers=AUTH
    ) as ws:
        while ended != set(flow_runs) and time.monotonic() < deadline:
            message = json.loads(ws.recv(timeout=deadline - time.monotonic()))
            if message["job_id"] in flow_runs and message["type"] == "job_status" and message["status"] in TERMINAL:
                ended.add(message["job_id"])
    assert ended == set(flow_runs)


def test_a_scheduled_run_is_a_job(running: Running) -> None:
    from datetime import UTC, datetime, timedelta

    deployment = running.deployment_id()
    # Hourly from three seconds from now: the scheduler makes the first run for then.
    anchor = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()
    made = running.prefect.post(
        f"/deployments/{deployment}/schedules",
        json=[
            {
                "schedule": {"interval": 3600, "anchor_date": anchor},
                "active": True,
                "max_scheduled_runs": 1,
                "parameters": {"pipeline": {"pipeline": CHAIN}, "input": {"count": 7}},
            }
        ],
    )
    assert made.status_code == 201, made.text
    schedule_id = made.json()[0]["id"]
    try:
        deadline = time.monotonic() + 90
        runs: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not runs:
            answer = running.prefect.post(
                "/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [deployment]}}}
            )
            answer.raise_for_status()
            runs = sorted((r for r in answer.json() if r["auto_scheduled"]), key=lambda r: r["expected_start_time"])
            time.sleep(0.5)
        assert runs, "the scheduler made no run"
        job = running.wait_for_job(runs[0]["id"])
        assert job["status"] == "succeeded", job.get("error")
        assert job["input"] == {"count": 7} and job["envelope"]["result"]["total"] == 42
    finally:
        running.prefect.delete(f"/deployments/{deployment}/schedules/{schedule_id}")
        later = running.prefect.post(
            "/flow_runs/filter",
            json={"flow_runs": {"deployment_id": {"any_": [deployment]}, "state": {"type": {"any_": ["SCHEDULED"]}}}},
        )
        for run in later.json():
            running.prefect.delete(f"/flow_runs/{run['id']}")


def test_cancel_cancels_the_flow_run(running: Running) -> None:
    stages = [{"plugin": "testkit", "tool": "sleep", "config": {"seconds": 60}}]
    answer = running.api.post("/v1/jobs", json={"job_id": "job-cancel", "pipeline": stages})
    assert answer.status_code == 202, answer.text
    wait_job(running.api, "job-cancel", statuses={"running"}, timeout=60)
    started = time.monotonic()
    assert running.api.post("/v1/jobs/job-cancel/cancel").status_code == 202
    job = wait_job(running.api, "job-cancel", timeout=60)
    assert job["status"] == "cancelled", (job["error"], job["envelope"])
    assert time.monotonic() - started < 30
    assert running.wait_flow_run_state(job["flow_run_id"], "CANCELLED")["state"]["type"] == "CANCELLED"


def test_a_flow_run_killed_on_its_worker_ends_its_job_crashed_with_the_reason(running: Running) -> None:
    stages = [{"plugin": "testkit", "tool": "sleep", "config": {"seconds": 120}}]
    answer = running.api.post("/v1/jobs", json={"job_id": "job-killed", "pipeline": stages})
    assert answer.status_code == 202, answer.text
    job = wait_job(running.api, "job-killed", statuses={"running"}, timeout=60)
    pid = int(str(running.flow_run(job["flow_run_id"])["infrastructure_pid"]).rsplit(":", 1)[-1])
    os.kill(pid, signal.SIGKILL)  # the flow run's process, as a worker host losing it would
    killed = time.monotonic()
    job = wait_job(running.api, "job-killed", timeout=60)
    assert job["status"] == "crashed", job
    assert time.monotonic() - killed < 30
    # The reason: Prefect's worker saw its process die (SIGKILL, exit -9) and the flow's crash hook
    # said so, or the API reconciled the Crashed run: either way the error says what happened.
    assert "-9" in job["error"] or "died" in job["error"], job["error"]
    assert job["envelope"]["error_type"] == "FlowRunCrashed", job["envelope"]


def test_the_api_token_is_nowhere_in_what_the_stack_wrote(running: Running) -> None:
    """After every test above ran through the stack (the API, the engine, the worker and its flow runs,
    Prefect's server), the token is in none of the stack's logs, databases or files. A call with the
    token in its URL (refused) is in the API's access log, redacted."""
    assert httpx.get(f"{running.stack.api_url}/v1/jobs?token={CANARY}", timeout=10).status_code == 401
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    with pytest.raises(InvalidStatus):
        connect(f"{running.stack.api_url.replace('http', 'ws')}/v1/ws/jobs?token={CANARY}")
    api_log = running.home / "stack" / "api.log"
    deadline = time.monotonic() + 10
    while "?token=[redacted]" not in api_log.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "/v1/jobs?token=[redacted]" in api_log.read_text(errors="replace")
    hits = [str(path) for path in running.home.rglob("*") if path.is_file() and CANARY.encode() in path.read_bytes()]
    assert hits == []
    assert (running.home / "stack" / "worker-1.log").is_file() and (running.home / "prefect").is_dir()
