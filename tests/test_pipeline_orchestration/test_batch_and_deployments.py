"""The prefect.yaml deployments registered for real (the batch flow itself: tests/test_api/test_batches.py
and tests/test_deployments/test_batch_stack.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from .conftest import prefect_flow_run

ROOT = Path(__file__).resolve().parents[2]


def test_prefect_yaml_entrypoints_and_schedules_are_valid():
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = {}
    for deployment in config["deployments"]:
        loaded = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        names[deployment["name"]] = loaded.name
        for schedule in deployment.get("schedules", []):
            CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    assert names == {"pipeline": "forgeflow-pipeline", "soccer-nightly": "forgeflow-batch"}


def test_deployment_runs_through_a_real_prefect_worker(prefect_api_url, ff_home, tmp_path):
    """`prefect deploy` registers prefect.yaml; a process worker picks the run up, as from the UI."""
    env = {**os.environ, "FORGEFLOW_CODE_DIR": str(ROOT), "PREFECT_API_URL": prefect_api_url}
    template = ROOT / "deployments" / "work-pools" / "forgeflow-process.json"
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    subprocess.run(
        [
            *prefect,
            "work-pool",
            "create",
            "forgeflow-process",
            "--type",
            "process",
            "--base-job-template",
            str(template),
            "--overwrite",
        ],
        env=env,
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    deployed = subprocess.run(
        [*prefect, "deploy", "--all"], env=env, capture_output=True, text=True, cwd=ROOT, timeout=180
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    response = httpx.post(f"{prefect_api_url}/deployments/filter", json={}, timeout=10)
    deployments = {d["name"]: d for d in response.json()}
    assert {"pipeline", "soccer-nightly"} <= set(deployments)

    body = {
        "parameters": {
            "pipeline": {"pipeline": [{"plugin": "tk", "tool": "numbers"}, {"plugin": "tk", "tool": "total"}]}
        }
    }
    body["parameters"]["pipeline"]["pipeline"][1]["tool"] = "scale"
    body["parameters"]["input"] = {"count": 3}
    body["parameters"]["job_id"] = "job-from-deployment"
    flow_run = httpx.post(
        f"{prefect_api_url}/deployments/{deployments['pipeline']['id']}/create_flow_run", json=body, timeout=10
    ).json()
    worker = subprocess.Popen(
        [*prefect, "worker", "start", "--pool", "forgeflow-process", "--run-once"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        state = None
        while time.monotonic() < deadline:
            state = prefect_flow_run(flow_run["id"])["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED"):
                break
            time.sleep(1)
        assert state == "COMPLETED", worker.stdout.read().decode() if worker.poll() is not None else state
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, 9)
        worker.wait(10)
    shutil.rmtree(tmp_path, ignore_errors=True)
