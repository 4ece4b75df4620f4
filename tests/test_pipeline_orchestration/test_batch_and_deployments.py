"""Scheduled batch pipelines over a folder, and the prefect.yaml deployments registered for real."""

from __future__ import annotations

import json
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
PROBE = {"pipeline": [{"plugin": "testkit", "tool": "probe_media"}]}


def _images(folder: Path) -> None:
    import cv2
    import numpy as np

    folder.mkdir()
    for name, size in (("a.png", (40, 60)), ("b.png", (80, 30))):
        cv2.imwrite(str(folder / name), np.full((*size, 3), 128, dtype=np.uint8))
    (folder / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    (folder / "notes.txt").write_text("not media")


def test_batch_flow_runs_the_pipeline_per_file_and_isolates_bad_files(services, tmp_path):
    from forgeflow.jobs.batch import batch_flow  # Prefect loads when a test needs it, not at collection
    from forgeflow.jobs.stages import use_services

    _images(tmp_path / "in")
    with use_services(services):
        summary = batch_flow(
            pipeline=PROBE, folder=str(tmp_path / "in"), pattern="*.png", out_dir=str(tmp_path / "out")
        )
    assert summary["files"] == 3
    assert summary["succeeded"] == 2
    assert summary["failed"] == ["c.png"]
    a = json.loads((tmp_path / "out" / "a.png.json").read_text())
    assert a["ok"] and a["result"] == {"media_kind": "image", "frame_count": 1, "width": 60, "height": 40}
    c = json.loads((tmp_path / "out" / "c.png.json").read_text())
    assert c["ok"] is False and c["error_type"] == "MediaError"


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
