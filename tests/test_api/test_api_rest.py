"""REST surface: malformed requests, unknown ids, templates, plugins, media uploads, auth, OpenAPI."""

from __future__ import annotations

import io
import sys
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.test_api.conftest import THREE_STAGES, ApiServer, event, make_settings

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "pipeline"),
        ({"pipeline": [], "input": {}}, "pipeline"),
        ({"pipeline": [{"plugin": "testkit"}], "input": {}}, "pipeline.0.tool"),
        (
            {"pipeline": [{"plugin": "testkit", "tool": "numbers", "bogus": 1}], "input": {"count": 1}},
            "pipeline.0.bogus",
        ),
        ({"pipeline": THREE_STAGES, "input": {"count": "many"}}, "input.count"),
        ({"pipeline": THREE_STAGES, "input": {}}, "input.count"),
        ({"pipeline": THREE_STAGES, "input": [1, 2]}, "input"),
        ({"pipeline": "numbers", "input": {}}, "pipeline"),
        ({"pipeline": [{"plugin": "nope", "tool": "x"}], "input": {}}, "pipeline.0"),
        ({"pipeline": [{"plugin": "tk", "tool": "numbr"}], "input": {"count": 1}}, "pipeline.0"),
        (
            {"pipeline": [{"plugin": "tk", "tool": "numbers", "config": {"start": "a"}}], "input": {"count": 1}},
            "pipeline.0.config.start",
        ),
        ({"pipeline": [{"plugin": "testkit", "tool": "measure_text"}], "input": {"text": 5}}, "input.text"),
        (
            {
                "pipeline": [{"plugin": "testkit", "tool": "numbers"}, {"plugin": "testkit", "tool": "measure_text"}],
                "input": {"count": 1},
            },
            "pipeline.1.text",
        ),
        ({"pipeline": [{"plugin": "needs-weights", "tool": "detect"}], "input": {}}, "pipeline.0"),
        ({"pipeline": THREE_STAGES, "pipeline_id": "x", "input": {"count": 1}}, "pipeline_id"),
        ({"plugin_id": "tk", "input": {"count": 1}}, "tool_name"),
        ({"plugin_id": "nope", "tool_name": "numbers", "input": {"count": 1}}, "plugin_id"),
        ({"plugin_id": "tk", "tool_name": "nope", "input": {"count": 1}}, "tool_name"),
        ({"plugin_id": "tk", "tool_name": "numbers", "config": {"start": []}, "input": {"count": 1}}, "config.start"),
        ({"job_id": "has space", "pipeline": THREE_STAGES, "input": {"count": 1}}, "job_id"),
        ({"job_id": "../etc", "pipeline": THREE_STAGES, "input": {"count": 1}}, "job_id"),
        ({"pipeline": THREE_STAGES, "input": {"count": 1}, "extra": True}, "extra"),
        (
            {"pipeline": [{"plugin": "tk", "tool": "numbers", "timeout_seconds": -1}], "input": {"count": 1}},
            "pipeline.0.timeout_seconds",
        ),
    ],
)
def test_malformed_job_submissions_are_422_naming_the_field(
    quiet_api: ApiServer, body: dict[str, Any], field: str
) -> None:
    client = quiet_api.client()
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    data = response.json()
    assert data["error"] and data["error_type"]
    assert (data.get("field") or "").startswith(field), data
    assert client.get("/v1/jobs").json()["total"] == 0  # nothing stored


def test_requests_that_are_not_json_or_name_unknown_ids(quiet_api: ApiServer) -> None:
    client = quiet_api.client()
    bad = client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 422 and bad.json()["error_type"] == "RequestValidationError"
    for path in (
        "/v1/jobs/nope",
        "/v1/jobs/nope/pipeline",
        "/v1/jobs/nope/events",
        "/v1/pipelines/nope",
        "/v1/plugins/nope",
        "/v1/plugins/nope/health",
        "/v1/nothing-here",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"], path
    assert client.post("/v1/jobs/nope/cancel").status_code == 404
    assert client.post("/v1/jobs", json={"pipeline_id": "nope", "input": {}}).status_code == 404
    assert client.get("/v1/jobs", params={"limit": 0}).json()["field"] == "limit"
    assert client.get("/v1/jobs", params={"status": "sleeping"}).status_code == 422
    assert client.get("/v1/jobs/x/events", params={"after_seq": -1}).json()["field"] == "after_seq"
    assert client.delete("/v1/jobs/x").status_code == 405


def test_templates_validate_slug_and_conflict(quiet_api: ApiServer) -> None:
    client = quiet_api.client()
    saved = client.post(
        "/v1/pipelines", json={"name": "Soccer Analysis", "pipeline": THREE_STAGES, "description": "numbers"}
    )
    assert saved.status_code == 201 and saved.json()["id"] == "soccer-analysis"
    assert saved.headers["location"] == "/v1/pipelines/soccer-analysis"
    again = client.post("/v1/pipelines", json={"name": "soccer analysis", "stages": THREE_STAGES})
    assert again.status_code == 409 and again.json()["field"] == "name"
    invalid = client.post("/v1/pipelines", json={"name": "broken", "stages": [{"plugin": "tk", "tool": "nope"}]})
    assert invalid.status_code == 422 and invalid.json()["field"].startswith("stages.0")
    mismatch = client.post(
        "/v1/pipelines",
        json={
            "name": "mismatch",
            "stages": [
                {"plugin": "testkit", "tool": "numbers"},
                {"plugin": "testkit", "tool": "scale", "config": {"factor": "x"}},
            ],
        },
    )
    assert mismatch.status_code == 422 and mismatch.json()["issues"][0]["stage_index"] == 1
    assert client.post("/v1/pipelines", json={"name": "!!!", "stages": THREE_STAGES}).json()["field"] == "name"
    assert client.post("/v1/pipelines", json={"stages": THREE_STAGES}).json()["field"] == "name"
    assert client.post("/v1/pipelines", json={"name": "empty"}).json()["field"] == "stages"
    assert [p["id"] for p in client.get("/v1/pipelines").json()] == ["soccer-analysis"]
    detail = client.get("/v1/pipelines/soccer-analysis").json()
    assert detail["runs"]["total"] == 0 and detail["description"] == "numbers"
    # A template job with the wrong input is refused before anything is stored.
    refused = client.post("/v1/jobs", json={"pipeline_id": "soccer-analysis", "input": {}})
    assert refused.status_code == 422 and refused.json()["field"] == "input.count"
    assert client.delete("/v1/pipelines/soccer-analysis").status_code == 204
    assert client.get("/v1/pipelines/soccer-analysis").status_code == 404


def test_plugins_endpoints(quiet_api: ApiServer) -> None:
    client = quiet_api.client()
    plugins = {p["name"]: p for p in client.get("/v1/plugins").json()}
    assert {"testkit", "needs-weights", "broken-import"} <= set(plugins)
    assert plugins["testkit"]["available"] and "tk" in plugins["testkit"]["aliases"]
    assert plugins["needs-weights"]["lifecycle"]["state"] == "UNAVAILABLE"
    assert plugins["broken-import"]["unavailable_reason"]
    detail = client.get("/v1/plugins/tk").json()  # the alias resolves
    assert detail["name"] == "testkit"
    numbers = next(t for t in detail["tools"] if t["name"] == "numbers")
    assert "count" in str(numbers["schemas"])
    health = client.get("/v1/plugins/needs-weights/health").json()
    assert health["healthy"] is False and health["state"] == "UNAVAILABLE" and health["reason"]
    assert "did you mean" in client.get("/v1/plugins/testkt").json()["error"]


def test_media_upload_limits(api_factory: Any) -> None:
    api = api_factory(launch_jobs=False, max_upload_bytes=4096)
    client = api.client()
    ok = client.post("/v1/media", files={"file": ("frame.png", PNG, "image/png")})
    assert ok.status_code == 201
    ref = ok.json()["ref"]
    assert ref.startswith("sha256:") and ok.json()["kind"] == "image" and ok.json()["filename"] == "frame.png"
    assert client.post("/v1/media", files={"file": ("again.png", PNG)}).json()["ref"] == ref
    assert client.get(f"/v1/media/{ref}").json()["size_bytes"] == len(PNG)
    raw = client.post("/v1/media", content=PNG, headers={"content-type": "application/octet-stream"})
    assert raw.status_code == 201 and raw.json()["ref"] == ref

    too_big = client.post("/v1/media", files={"file": ("big.png", PNG + b"\x00" * 5000)})
    assert too_big.status_code == 413 and too_big.json()["error_type"] == "MediaTooLarge"

    def chunks() -> Any:  # no Content-Length: the limit still holds while streaming
        yield PNG
        for _ in range(100):
            yield b"\x00" * 1000

    streamed = client.post("/v1/media", content=chunks(), headers={"content-type": "application/octet-stream"})
    assert streamed.status_code == 413
    way_too_big = client.post("/v1/media", files={"file": ("huge.bin", b"\x00" * 200_000)})
    assert way_too_big.status_code == 413
    assert client.post("/v1/media", files={"file": ("a.txt", b"hello world")}).status_code == 415
    assert client.post("/v1/media", files={"file": ("empty.png", b"")}).status_code == 422
    assert client.post("/v1/media", files={"other": ("a.png", PNG)}).json()["field"] == "file"
    assert client.post("/v1/media", json={"a": 1}).status_code == 415
    assert client.get("/v1/media/sha256:" + "0" * 64).status_code == 404
    assert client.get("/v1/media/garbage").status_code == 422
    # The service keeps serving after all that.
    assert client.get("/healthz").json()["status"] == "ok"


def test_token_is_required_on_every_call_when_set(api_factory: Any) -> None:
    api = api_factory(launch_jobs=False, token="s3cret")
    anonymous = httpx.Client(base_url=api.url, timeout=10)
    for method, path in (
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/x"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/pipelines"),
        ("GET", "/v1/plugins"),
        ("GET", "/v1/plugins/tk/health"),
        ("POST", "/v1/media"),
    ):
        response = anonymous.request(method, path, json={} if method == "POST" else None)
        assert response.status_code == 401, (method, path)
        assert response.json()["error_type"] == "Unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    wrong = anonymous.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert api.client().get("/v1/jobs").status_code == 200
    assert anonymous.get("/healthz").status_code == 200

    api.ingest([event("authjob", "job_status", status="running")])
    with pytest.raises(InvalidStatus) as info:
        connect(f"{api.ws_url}/v1/ws/jobs/authjob")
    assert info.value.response.status_code == 401
    with pytest.raises(InvalidStatus):
        connect(f"{api.ws_url}/v1/ws/jobs?token=nope")
    with connect(f"{api.ws_url}/v1/ws/jobs/authjob?token=s3cret") as ws:
        assert '"seq":1' in ws.recv(timeout=10)
    with connect(f"{api.ws_url}/v1/ws/jobs/authjob", additional_headers=api.headers) as ws:
        assert '"seq":1' in ws.recv(timeout=10)
    # The API token also works on the ingest endpoint; nothing else does.
    ok = httpx.post(f"{api.url}/internal/v1/events", json={"events": []}, headers=api.headers)
    assert ok.status_code == 200


def test_non_loopback_bind_without_token_refuses_to_start(tmp_path: Any) -> None:
    from pydantic import SecretStr

    from forgeflow.api.app import create_app
    from forgeflow.api.auth import InsecureBind, is_loopback
    from forgeflow.api.server import serve

    settings = make_settings(tmp_path / "home", 8999, None, api_host="0.0.0.0")
    with pytest.raises(InsecureBind, match="FORGEFLOW_API_TOKEN"):
        serve(settings)
    with pytest.raises(InsecureBind):
        create_app(settings)
    create_app(make_settings(tmp_path / "home", 8999, None, api_host="0.0.0.0", api_token=SecretStr("t")))
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5")


def test_openapi_documents_every_endpoint(quiet_api: ApiServer) -> None:
    spec = httpx.get(f"{quiet_api.url}/openapi.json").json()
    paths = spec["paths"]
    expected = {
        "/v1/jobs": {"get", "post"},
        "/v1/jobs/{job_id}": {"get"},
        "/v1/jobs/{job_id}/pipeline": {"get"},
        "/v1/jobs/{job_id}/events": {"get"},
        "/v1/jobs/{job_id}/cancel": {"post"},
        "/v1/pipelines": {"get", "post"},
        "/v1/pipelines/{pipeline_id}": {"get", "delete"},
        "/v1/plugins": {"get"},
        "/v1/plugins/{name}": {"get"},
        "/v1/plugins/{name}/health": {"get"},
        "/v1/media": {"post"},
        "/internal/v1/events": {"post"},
        "/healthz": {"get"},
    }
    for path, methods in expected.items():
        assert methods <= set(paths[path]), path
        for method in methods:
            operation = paths[path][method]
            assert operation.get("summary") and operation["responses"]
    job_create = spec["components"]["schemas"]["JobCreate"]
    assert {"job_id", "pipeline", "pipeline_id", "plugin_id", "tool_name", "config", "input"} <= set(
        job_create["properties"]
    )
    assert "multipart/form-data" in paths["/v1/media"]["post"]["requestBody"]["content"]


def test_the_api_process_never_imports_torch(quiet_api: ApiServer) -> None:
    quiet_api.client().get("/v1/plugins")
    assert "torch" not in sys.modules
    assert io  # keep the import list honest


def test_server_module_refuses_non_loopback_without_token(tmp_path: Any) -> None:
    import os
    import subprocess

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
