"""Batches on the production shape (`forgeflow up`: Prefect server, the API in deployment mode, a
worker whose handoff gives pipeline runs to the engine): every deployment of prefect.yaml runs on
the worker, the nightly batch fans its files out as child flow runs of the `pipeline` deployment,
and a second nightly run (made as the scheduler makes one, Scheduled) computes only the new file."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.batch_helpers import calls, file_work, make_images
from tests.conftest import environment, free_port
from tests.test_deployments import KEEP_ALIVE, PrefectRest

pytestmark = pytest.mark.xdist_group("stack")

ROOT = Path(__file__).resolve().parents[2]
CHAIN = [{"plugin": "testkit", "tool": t} for t in ("numbers", "scale", "total")]
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def stack_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, PrefectRest, httpx.Client]]:
    from forgeflow.cli import stack
    from forgeflow.settings import Settings

    home = tmp_path_factory.mktemp("batch-stack")
    settings = Settings(home=home)
    with environment({"FORGEFLOW_HOME": str(home)}):
        try:
            started = stack.up(settings, prefect_port=free_port(), api_port=free_port(), workers=1, jobs_per_worker=3)
            yield (
                started,
                PrefectRest(started.prefect_api_url),
                httpx.Client(base_url=started.api_url, timeout=30, limits=KEEP_ALIVE),
            )
        finally:
            stack.down(settings)


def _run_deployment(prefect: PrefectRest, name: str, parameters: dict[str, Any], **body: Any) -> str:
    deployment = prefect.get(f"/deployments/name/{name}")
    deployment.raise_for_status()
    made = prefect.post(
        f"/deployments/{deployment.json()['id']}/create_flow_run", json={"parameters": parameters, **body}
    )
    assert made.status_code == 201, made.text
    return str(made.json()["id"])


def _final(prefect: PrefectRest, flow_run_id: str, timeout: float = 150) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        run: dict[str, Any] = prefect.get(f"/flow_runs/{flow_run_id}").json()
        if run["state"]["type"] in FINAL:
            return run
        if time.monotonic() > deadline:
            raise TimeoutError(f"flow run {flow_run_id} still {run['state']['type']}")
        time.sleep(0.5)


def _batch_of(api: httpx.Client, flow_run_id: str) -> dict[str, Any]:
    for item in api.get("/v1/batches", params={"limit": 100}).json()["items"]:
        if item["flow_run_id"] == flow_run_id:
            return dict(api.get(f"/v1/batches/{item['batch_id']}").json())
    raise AssertionError(f"no batch registered by flow run {flow_run_id}")


def test_every_deployment_runs_and_the_nightly_batch_fans_out_and_takes_only_new_files(
    stack_up: tuple[Any, PrefectRest, httpx.Client], tmp_path: Path
) -> None:
    _, prefect, api = stack_up
    deployments = {d["name"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert deployments == {"pipeline", "soccer-nightly"}  # a new deployment gets a run below too

    pipeline_run = _run_deployment(
        prefect, "forgeflow-pipeline/pipeline", {"pipeline": {"pipeline": CHAIN}, "input": {"count": 3}}
    )
    incoming = tmp_path / "incoming"
    names = make_images(incoming, 2, corrupt=1)
    log = tmp_path / "calls.log"
    nightly = {"pipeline": {"pipeline": file_work(log)}, "folder": str(incoming), "pattern": "*.png", "out_dir": None}
    batch_run = _run_deployment(prefect, "forgeflow-batch/soccer-nightly", nightly)
    assert _final(prefect, pipeline_run)["state"]["type"] == "COMPLETED"
    finished = _final(prefect, batch_run)
    assert finished["state"]["type"] == "COMPLETED", finished["state"]

    batch = _batch_of(api, batch_run)
    assert [f["name"] for f in batch["files"]] == names
    assert {f["name"]: f["status"] for f in batch["files"]} == {
        "bad-0.png": "failed",
        "img-00.png": "succeeded",
        "img-01.png": "succeeded",
    }
    assert calls(log) == 2
    # Each file's job is a child flow run of the pipeline deployment under the batch's flow run.
    pipeline_deployment = prefect.get("/deployments/name/forgeflow-pipeline/pipeline").json()["id"]
    for f in batch["files"]:
        job = api.get(f"/v1/jobs/{f['job_id']}").json()
        child = prefect.get(f"/flow_runs/{job['flow_run_id']}").json()
        assert child["deployment_id"] == pipeline_deployment and child["state"]["type"] in FINAL
        parent_task = prefect.get(f"/task_runs/{child['parent_task_run_id']}").json()
        assert parent_task["flow_run_id"] == batch_run
    artifacts = prefect.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [batch_run]}}}).json()
    assert [a["type"] for a in artifacts] == ["table"]

    # The next night, made as the scheduler makes a run (Scheduled for now): one new file arrived.
    import cv2
    import numpy as np

    cv2.imwrite(str(incoming / "img-99.png"), np.full((16, 16, 3), 77, dtype=np.uint8))
    next_run = _run_deployment(
        prefect, "forgeflow-batch/soccer-nightly", nightly, state={"type": "SCHEDULED", "name": "Scheduled"}
    )
    assert _final(prefect, next_run)["state"]["type"] == "COMPLETED"
    second = _batch_of(api, next_run)
    assert second["counts"]["reused"] == 2 and second["counts"]["succeeded"] == 3
    assert calls(log) == 3  # only the new file was computed (the corrupt one failed again, at no model cost)
    fresh = {f["name"]: f for f in second["files"]}
    assert fresh["img-99.png"]["reused_from"] is None and fresh["img-00.png"]["reused_from"]
