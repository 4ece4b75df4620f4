"""The REST surface where a real server matters: WebSocket auth, the server module, the API process
staying free of torch, and the local Prefect server. Request validation is in test_api_requests.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.test_api.conftest import event


def test_websockets_need_the_token_when_set(api_factory: Any) -> None:
    from forgeflow.api.auth import ws_bearer_protocol

    api = api_factory(launch_jobs=False, token="s3cret")
    assert httpx.get(f"{api.url}/v1/jobs", timeout=10).status_code == 401
    assert api.client().get("/v1/jobs").status_code == 200
    api.ingest([event("authjob", "job_status", status="running")])
    with pytest.raises(InvalidStatus) as info:
        connect(f"{api.ws_url}/v1/ws/jobs/authjob")
    assert info.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as info:
        connect(f"{api.ws_url}/v1/ws/jobs?token=nope")
    assert info.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as info:  # the right token, in the URL: refused (URLs are logged)
        connect(f"{api.ws_url}/v1/ws/jobs/authjob?token=s3cret")
    assert info.value.response.status_code == 401
    with connect(f"{api.ws_url}/v1/ws/jobs/authjob", subprotocols=["forgeflow.v1", ws_bearer_protocol("s3cret")]) as ws:  # type: ignore[list-item]
        assert '"seq":1' in ws.recv(timeout=10)
    with connect(f"{api.ws_url}/v1/ws/jobs/authjob", additional_headers=api.headers) as ws:
        assert '"seq":1' in ws.recv(timeout=10)


def test_the_api_process_never_imports_torch(tmp_path: Any) -> None:
    """Listing plugins (the vision ones included) and validating a vision pipeline load no torch,
    no Ultralytics: checked in a fresh interpreter, since this one may have imported them."""
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from fastapi.testclient import TestClient
        from forgeflow.api.app import build_state, create_app
        from forgeflow.settings import Settings

        settings = Settings(home=Path(sys.argv[1]))
        app = create_app(settings, launch_jobs=False)
        app.state.forgeflow = build_state(settings, api_url="http://127.0.0.1:1", prefect_api_url=None)
        client = TestClient(app)
        assert {p["name"] for p in client.get("/v1/plugins").json()} >= {"forgesyte-yolo-tracker", "pose-estimator"}
        stages = [{"plugin": "videotracker", "tool": "detect_players"}, {"plugin": "pose", "tool": "estimate_poses"}]
        refused = client.post("/v1/jobs", json={"pipeline": stages, "input": {}})
        assert refused.status_code == 422 and refused.json()["field"] == "input.media", refused.text
        heavy = [m for m in ("torch", "ultralytics") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script, str(tmp_path / "home")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_server_module_refuses_non_loopback_without_token(tmp_path: Any) -> None:
    import os

    env = {**os.environ, "FORGEFLOW_HOME": str(tmp_path), "FORGEFLOW_API_HOST": "0.0.0.0"}
    env.pop("FORGEFLOW_API_TOKEN", None)
    done = subprocess.run([sys.executable, "-m", "forgeflow.api.server"], env=env, capture_output=True, timeout=60)
    assert done.returncode == 2
    assert b"FORGEFLOW_API_TOKEN" in done.stderr


def test_local_prefect_server_starts_and_stops(tmp_path: Any) -> None:
    from forgeflow.jobs.prefect_server import LocalPrefectServer

    server = LocalPrefectServer(tmp_path / "prefect")
    url = server.start(timeout=120)
    try:
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    finally:
        server.stop()
    assert server.proc is not None and server.proc.poll() is not None
