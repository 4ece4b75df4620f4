"""Two hosts on one machine: PostgreSQL behind Prefect and the API; host A runs the Prefect server,
the API and a worker, host B (`forgeflow up --join`) only an engine and a worker, with its own
FORGEFLOW_HOME and no shared folder. Jobs spread over both; when host B dies mid-job, its jobs end
`crashed` with the reason and the others succeed."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.test_api.conftest import wait_job
from tests.test_deployments import KEEP_ALIVE, PrefectRest

pytestmark = pytest.mark.xdist_group("stack")

JOBS = 10
SLEEP_S = 4.0


def _host_of(pid: int) -> str | None:
    try:
        return psutil.Process(pid).environ().get("FORGEFLOW_HOME")
    except psutil.Error:
        return None


def host_of_flow_run(prefect: Any, flow_run_id: str) -> str | None:
    """The FORGEFLOW_HOME of the host whose worker runs the flow run (None: no process, or gone)."""
    pid = str(prefect.get(f"/flow_runs/{flow_run_id}").json().get("infrastructure_pid") or "")
    pid = pid.rsplit(":", 1)[-1]
    return _host_of(int(pid)) if pid.isdigit() else None


def _kill_host(home: Path) -> int:
    """SIGKILL every process of the host whose FORGEFLOW_HOME is ``home`` (its power goes off)."""
    killed = 0
    for proc in psutil.process_iter():
        if proc.pid != os.getpid() and _host_of(proc.pid) == str(home):
            try:
                proc.kill()
                killed += 1
            except psutil.Error:
                pass
    return killed


def test_jobs_spread_over_two_hosts_and_a_dead_host_crashes_only_its_jobs(two_hosts: tuple[Any, Path, Path]) -> None:
    started, home_a, home_b = two_hosts
    api = httpx.Client(base_url=started.api_url, timeout=30, limits=KEEP_ALIVE)
    prefect = PrefectRest(started.prefect_api_url)
    stages = [
        {"plugin": "testkit", "tool": "numbers", "config": {}},
        {"plugin": "testkit", "tool": "sleep", "config": {"seconds": SLEEP_S}},
    ]
    ids = [f"job-spread-{i}" for i in range(JOBS)]
    for job_id in ids:
        answer = api.post("/v1/jobs", json={"job_id": job_id, "pipeline": stages, "input": {"count": 3}})
        assert answer.status_code == 202, answer.text

    # Wait until host B runs a job, then take host B down.
    on_b: set[str] = set()
    deadline = time.monotonic() + 120
    while not on_b and time.monotonic() < deadline:
        for summary in api.get("/v1/jobs", params={"status": "running", "limit": 100}).json()["items"]:
            flow_run_id = api.get(f"/v1/jobs/{summary['job_id']}").json()["flow_run_id"]
            if host_of_flow_run(prefect, flow_run_id) == str(home_b):
                on_b.add(summary["job_id"])
        time.sleep(0.2)
    assert on_b, "host B ran no job"
    assert _kill_host(home_b) >= 2  # its worker, its engine, its flow runs
    killed_at = time.monotonic()

    for job_id in on_b:  # the API notices the silence and ends them
        assert wait_job(api, job_id, timeout=60)["status"] == "crashed"
    noticed_after = time.monotonic() - killed_at
    print(f"host B's jobs ended crashed {noticed_after:.1f} s after it died")
    assert noticed_after < 30
    jobs = {job_id: wait_job(api, job_id, timeout=180) for job_id in ids}
    crashed = {job_id for job_id, job in jobs.items() if job["status"] == "crashed"}
    assert on_b <= crashed, {j: jobs[j]["status"] for j in on_b}
    for job_id in crashed:
        assert "no heartbeat" in jobs[job_id]["error"], jobs[job_id]["error"]
        assert jobs[job_id]["finished_at"] is not None
    succeeded = {job_id for job_id, job in jobs.items() if job["status"] == "succeeded"}
    assert succeeded | crashed == set(ids) and len(succeeded) >= JOBS - 4
    # Both hosts ran jobs: B's were seen in B's processes (on_b) before it died; every job that
    # succeeded left its checkpoint folder in the home of the host that ran it.
    ran_on_a = {p.name for p in (home_a / "jobs").iterdir()} if (home_a / "jobs").exists() else set()
    ran_on_b = {p.name for p in (home_b / "jobs").iterdir()} if (home_b / "jobs").exists() else set()
    assert on_b and ran_on_a, (ran_on_a, ran_on_b)
    assert succeeded <= ran_on_a | ran_on_b
    for job_id in crashed:  # the Prefect side agrees
        state = prefect.get(f"/flow_runs/{jobs[job_id]['flow_run_id']}").json()["state"]["type"]
        assert state == "CRASHED", (job_id, state)
