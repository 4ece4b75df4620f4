"""A batch on two hosts sharing PostgreSQL (the fleet of conftest.py): its files spread over both hosts'
workers; when host B is killed mid-batch, the files it held are retried on host A and every file ends
with exactly one succeeded job."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.batch_helpers import file_work, make_images, wait_batch
from tests.test_deployments import KEEP_ALIVE, PrefectRest
from tests.test_deployments.test_scale_out import _kill_host, host_of_flow_run

pytestmark = pytest.mark.xdist_group("stack")

FILES = 6
SLEEP_S = 3.0


def test_a_killed_hosts_files_are_retried_elsewhere_and_each_file_succeeds_once(
    two_hosts: tuple[Any, Path, Path],
    tmp_path: Path,
) -> None:
    started, _, home_b = two_hosts
    api = httpx.Client(base_url=started.api_url, timeout=30, limits=KEEP_ALIVE)
    prefect = PrefectRest(started.prefect_api_url)
    folder = tmp_path / "files"
    make_images(folder, FILES)
    media = [
        {"ref": api.post("/v1/media", files={"file": (p.name, p.read_bytes())}).json()["ref"], "name": p.name}
        for p in sorted(folder.iterdir())
    ]
    body = {"pipeline": file_work(tmp_path / "calls.log", seconds=SLEEP_S), "media": media, "max_concurrency": 4}
    answer = api.post("/v1/batches", json=body)
    assert answer.status_code == 201, answer.text
    batch_id = answer.json()["batch_id"]

    on_b: set[str] = set()
    deadline = time.monotonic() + 120
    while not on_b and time.monotonic() < deadline:
        for f in api.get(f"/v1/batches/{batch_id}").json()["files"]:
            if f["status"] != "running":
                continue
            flow_run_id = api.get(f"/v1/jobs/{f['job_id']}").json()["flow_run_id"]
            if host_of_flow_run(prefect, flow_run_id) == str(home_b):
                on_b.add(f["name"])
        time.sleep(0.2)
    assert on_b, "host B ran no file"
    assert _kill_host(home_b) >= 2

    batch = wait_batch(api, batch_id, timeout=180)
    assert batch["status"] == "succeeded", batch["counts"]
    files = {f["name"]: f for f in batch["files"]}
    retried = {name for name, f in files.items() if f["attempts"] == 2}
    assert on_b <= retried and all(f["attempts"] <= 2 for f in files.values())
    for name in retried:  # B's files crashed and were retried (on A: B is gone), resuming the crashed job
        retry = api.get(f"/v1/jobs/{files[name]['job_id']}").json()
        assert retry["status"] == "succeeded" and retry["retry_of"] and retry["pipeline"].get("resume") is True
        assert api.get(f"/v1/jobs/{retry['retry_of']}").json()["status"] == "crashed"
    jobs = [j for j in api.get("/v1/jobs", params={"limit": 500}).json()["items"] if j["batch_id"] == batch_id]
    succeeded: dict[str, int] = {}
    for job in jobs:
        if job["status"] == "succeeded":
            position = job["job_id"][len(batch_id) + 1 :][:5]
            succeeded[position] = succeeded.get(position, 0) + 1
    assert succeeded == {f"{i:05d}": 1 for i in range(FILES)}  # exactly one succeeded job per file
    # None analysed twice but those B held: one job per file, one more per file that crashed with B.
    assert len(jobs) == FILES + len(retried)
    assert sorted(j["status"] for j in jobs).count("crashed") == len(retried)
