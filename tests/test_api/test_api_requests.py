"""The REST surface in process (``create_app`` through an in-process client; no uvicorn, no Prefect,
no launcher): malformed requests and the field they name, unknown ids, templates, plugins, media
uploads, auth, health and the OpenAPI document."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.test_api.conftest import THREE_STAGES, InProcessApi, event, make_settings

pytestmark = pytest.mark.fast

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
        ({"pipeline": [{"plugin": "testkit", "tool": "probe_media"}], "input": {}}, "input.media"),
        ({"pipeline": [{"plugin": "testkit", "tool": "probe_media"}]}, "input.media"),
        (
            {
                "pipeline": [{"plugin": "testkit", "tool": "numbers"}, {"plugin": "testkit", "tool": "measure_text"}],
                "input": {"count": 1},
            },
            "pipeline.1.text",
        ),
        ({"pipeline": [{"plugin": "needs-weights", "tool": "detect"}], "input": {}}, "pipeline.0"),
        ({"pipeline": [{"plugin": "broken-import", "tool": "detect"}], "input": {}}, "pipeline.0"),
        ({"pipeline": THREE_STAGES, "pipeline_id": "x", "input": {"count": 1}}, "pipeline_id"),
        ({"pipeline": THREE_STAGES, "tool_name": "numbers", "input": {"count": 1}}, "tool_name"),
        (
            {"pipeline": {"stages": THREE_STAGES}, "timeout_seconds": 5, "input": {"count": 1}},
            "timeout_seconds",
        ),
        ({"plugin_id": "tk", "input": {"count": 1}}, "tool_name"),
        ({"plugin_id": "nope", "tool_name": "numbers", "input": {"count": 1}}, "plugin_id"),
        ({"plugin_id": "tk", "tool_name": "nope", "input": {"count": 1}}, "tool_name"),
        ({"plugin_id": "tk", "tool_name": "numbers", "config": {"start": []}, "input": {"count": 1}}, "config.start"),
        ({"plugin_id": "tk", "tool_name": "numbers", "input": {}}, "input.count"),
        ({"job_id": "has space", "pipeline": THREE_STAGES, "input": {"count": 1}}, "job_id"),
        ({"job_id": "../etc", "pipeline": THREE_STAGES, "input": {"count": 1}}, "job_id"),
        ({"job_id": "j" * 129, "pipeline": THREE_STAGES, "input": {"count": 1}}, "job_id"),
        ({"job_id": "", "pipeline": THREE_STAGES, "input": {"count": 1}}, "job_id"),
        ({"pipeline": THREE_STAGES, "input": {"count": 1}, "extra": True}, "extra"),
        ({"pipeline": THREE_STAGES, "input": {"count": 1}, "timeout_seconds": 0}, "timeout_seconds"),
        (
            {"pipeline": [{"plugin": "tk", "tool": "numbers", "timeout_seconds": -1}], "input": {"count": 1}},
            "pipeline.0.timeout_seconds",
        ),
    ],
)
def test_malformed_job_submissions_are_422_naming_the_field(
    shared_in_process_api: InProcessApi, body: dict[str, Any], field: str
) -> None:
    client = shared_in_process_api.client
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    data = response.json()
    assert data["error"] and data["error_type"]
    assert (data.get("field") or "").startswith(field), data
    assert client.get("/v1/jobs").json()["total"] == 0  # nothing stored


def test_validation_errors_list_every_issue(shared_in_process_api: InProcessApi) -> None:
    body = {
        "pipeline": [{"plugin": "testkitt", "tool": "numbers"}, {"plugin": "testkit", "tool": "scal"}],
        "input": {"count": 1},
    }
    data = shared_in_process_api.client.post("/v1/jobs", json=body).json()
    assert data["error_type"] == "PipelineValidationError" and data["field"] == "pipeline.0"
    assert [(i["stage_index"], i["error_type"]) for i in data["issues"]] == [(0, "UnknownPlugin"), (1, "UnknownTool")]
    assert "did you mean 'testkit'" in data["issues"][0]["message"]
    malformed = shared_in_process_api.client.post("/v1/jobs", json={"job_id": "a b", "input": 5}).json()
    assert malformed["error_type"] == "RequestValidationError"
    assert {i["field"] for i in malformed["issues"]} == {"job_id", "input"}
    assert malformed["error"].endswith("(and 1 more)")


def test_requests_that_are_not_json_or_name_unknown_ids(shared_in_process_api: InProcessApi) -> None:
    client = shared_in_process_api.client
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
        assert response.json()["error"] and response.json()["error_type"] == "NotFound", path
    assert client.post("/v1/jobs/nope/cancel").status_code == 404
    missing_template = client.post("/v1/jobs", json={"pipeline_id": "nope", "input": {}})
    assert missing_template.status_code == 404 and "GET /v1/pipelines" in missing_template.json()["error"]
    too_long = client.get("/v1/jobs/" + "j" * 129)
    assert too_long.status_code == 422 and too_long.json()["field"] == "job_id"
    assert client.get("/v1/jobs", params={"limit": 0}).json()["field"] == "limit"
    assert client.get("/v1/jobs", params={"limit": 501}).json()["field"] == "limit"
    assert client.get("/v1/jobs", params={"offset": -1}).json()["field"] == "offset"
    assert client.get("/v1/jobs", params={"status": "sleeping"}).status_code == 422
    assert client.get("/v1/jobs/x/events", params={"after_seq": -1}).json()["field"] == "after_seq"
    # Positions past what any client or database holds exactly: 422 naming the field, never a 500.
    for huge in (2**53, 2**63, 10**30):
        assert client.get("/v1/jobs", params={"offset": huge}).json()["field"] == "offset"
        assert client.get("/v1/jobs/x/events", params={"after_seq": huge}).json()["field"] == "after_seq"
    not_allowed = client.delete("/v1/jobs/x")
    assert not_allowed.status_code == 405 and not_allowed.json()["error_type"] == "MethodNotAllowed"


def test_a_valid_submission_is_stored_queued_and_idempotent(in_process_api: InProcessApi) -> None:
    client = in_process_api.client
    body = {"job_id": "job-1", "pipeline": THREE_STAGES, "input": {"count": 4}}
    accepted = client.post("/v1/jobs", json=body)
    assert accepted.status_code == 202, accepted.text
    assert accepted.headers["location"] == "/v1/jobs/job-1"
    assert accepted.json()["created"] is True and accepted.json()["status"] == "queued"
    assert accepted.json()["links"]["websocket"] == "/v1/ws/jobs/job-1"
    again = client.post("/v1/jobs", json=body)
    assert again.status_code == 200 and again.json()["created"] is False
    other = client.post("/v1/jobs", json={**body, "input": {"count": 5}})
    assert other.status_code == 409 and other.json()["field"] == "job_id"
    job = client.get("/v1/jobs/job-1").json()
    assert (job["status"], job["source"], job["pipeline_id"]) == ("queued", "inline", None)
    # stored under the canonical name, with the alias the stage was written with beside it
    assert [s["plugin"] for s in job["pipeline"]["stages"]] == ["testkit", "testkit", "testkit"]
    assert [s["plugin_alias"] for s in job["pipeline"]["stages"]] == [None, "tk", None]
    assert job["pipeline"]["stages"][1]["config"] == {"factor": 3}
    assert [s["status"] for s in client.get("/v1/jobs/job-1/pipeline").json()["stages"]] == ["pending"] * 3
    events = client.get("/v1/jobs/job-1/events").json()
    assert [(e["seq"], e["type"], e["status"]) for e in events["events"]] == [(1, "job_status", "queued")]
    generated = client.post("/v1/jobs", json={"pipeline": THREE_STAGES, "input": {"count": 1}})
    assert generated.status_code == 202 and generated.json()["job_id"].startswith("job-")
    listing = client.get("/v1/jobs", params={"status": "queued", "limit": 1}).json()
    assert listing["total"] == 2 and len(listing["items"]) == 1 and listing["next_offset"] == 1
    assert client.get("/healthz").json()["jobs_queued"] == 2


def test_templates_validate_slug_and_conflict(in_process_api: InProcessApi) -> None:
    client = in_process_api.client
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
    both = client.post("/v1/pipelines", json={"name": "both", "stages": THREE_STAGES, "pipeline": THREE_STAGES})
    assert both.status_code == 422 and both.json()["field"] == "pipeline"
    assert [p["id"] for p in client.get("/v1/pipelines").json()] == ["soccer-analysis"]
    detail = client.get("/v1/pipelines/soccer-analysis").json()
    assert detail["runs"]["total"] == 0 and detail["description"] == "numbers"
    assert detail["job_input_fields"] == ["count"]
    # A template job with the wrong input is refused before anything is stored; a good one is stored.
    refused = client.post("/v1/jobs", json={"pipeline_id": "soccer-analysis", "input": {}})
    assert refused.status_code == 422 and refused.json()["field"] == "input.count"
    timed = client.post(
        "/v1/jobs", json={"pipeline_id": "soccer-analysis", "input": {"count": 1}, "timeout_seconds": 3}
    )
    assert timed.status_code == 422 and timed.json()["field"] == "timeout_seconds"
    assert client.get("/v1/jobs").json()["total"] == 0
    accepted = client.post("/v1/jobs", json={"pipeline_id": "soccer-analysis", "input": {"count": 1}})
    assert accepted.status_code == 202 and accepted.json()["pipeline_id"] == "soccer-analysis"
    assert client.get("/v1/pipelines/soccer-analysis").json()["runs"]["queued"] == 1
    assert client.delete("/v1/pipelines/soccer-analysis").status_code == 204
    assert client.get("/v1/pipelines/soccer-analysis").status_code == 404
    assert client.delete("/v1/pipelines/soccer-analysis").status_code == 404


def test_plugins_endpoints(shared_in_process_api: InProcessApi) -> None:
    client = shared_in_process_api.client
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


def test_media_upload_limits(in_process_factory: Any) -> None:
    client = in_process_factory(max_upload_bytes=4096).client
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


def test_token_is_required_on_every_call_when_set(in_process_factory: Any) -> None:
    from fastapi.testclient import TestClient

    api = in_process_factory(token="s3cret")
    anonymous = TestClient(api.app)
    for method, path in (
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/x"),
        ("POST", "/v1/jobs"),
        ("POST", "/v1/jobs/x/cancel"),
        ("GET", "/v1/pipelines"),
        ("POST", "/v1/pipelines"),
        ("GET", "/v1/plugins"),
        ("GET", "/v1/plugins/tk/health"),
        ("POST", "/v1/media"),
        ("GET", "/v1/engine"),
    ):
        response = anonymous.request(method, path, json={} if method == "POST" else None)
        assert response.status_code == 401, (method, path)
        assert response.json()["error_type"] == "Unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    assert "missing" in anonymous.get("/v1/jobs").json()["error"]
    for header in ("Bearer nope", "Basic s3cret", "Bearer", "s3cret"):
        wrong = anonymous.get("/v1/jobs", headers={"Authorization": header})
        assert wrong.status_code == 401, header
    assert anonymous.get("/v1/jobs", headers={"Authorization": "bearer s3cret"}).status_code == 200
    assert api.client.get("/v1/jobs").status_code == 200  # the client sends the token
    # What reveals no data stays open.
    assert anonymous.get("/healthz").status_code == 200
    assert anonymous.get("/openapi.json").status_code == 200
    # The ingest endpoint takes the ingest token or the API token, nothing else.
    batch = [event("authjob", "job_status", status="running")]
    refused = api.ingest(batch, token="nope")
    assert refused.status_code == 401 and refused.json()["error_type"] == "Unauthorized"
    assert anonymous.post("/internal/v1/events", json={"events": batch}).status_code == 401
    assert api.ingest(batch).status_code == 200
    assert api.ingest([event("authjob", "job_status", status="running")], token="s3cret").json()["stored"] == 1
    anonymous.close()


def test_ingest_validation(shared_in_process_api: InProcessApi) -> None:
    api = shared_in_process_api
    good = event("never-stored", "job_status", status="running")
    broken = event(
        "never-stored",
        "pipeline_stage_end",
        stage_index=0,
        plugin="p",
        tool="t",
        ok="maybe",
        duration_ms=1,
        result_size_bytes=0,
    )
    response = api.ingest([good, broken])
    assert response.status_code == 422 and response.json()["field"].startswith("events.1")
    unknown = api.ingest([event("never-stored", "stage_started")])
    assert unknown.status_code == 422 and unknown.json()["field"].startswith("events.0")
    too_long = api.ingest([event("j" * 129, "job_status", status="running")])
    assert too_long.status_code == 422 and too_long.json()["field"] == "events.0.job_id"
    not_a_batch = api.client.post(
        "/internal/v1/events", json=[good], headers={"Authorization": f"Bearer {api.state.auth.ingest_token}"}
    )
    assert not_a_batch.status_code == 422
    assert api.ingest([]).json() == {"received": 0, "stored": 0, "duplicates": 0}
    assert api.client.get("/v1/jobs/never-stored").status_code == 404  # nothing of those batches was stored


def test_healthz(in_process_api: InProcessApi, monkeypatch: pytest.MonkeyPatch) -> None:
    client = in_process_api.client
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {
        "status": "ok",
        "version": health.json()["version"],
        "database": "ok",
        "jobs_running": 0,
        "jobs_queued": 0,
        "websocket_clients": 0,
    }
    from forgeflow import __version__

    assert health.json()["version"] == __version__

    def down() -> None:
        raise ConnectionError("database down")

    monkeypatch.setattr(in_process_api.state.store, "ping", down)
    degraded = client.get("/healthz")
    assert degraded.status_code == 503
    assert degraded.json()["status"] == "degraded" and degraded.json()["database"] == "error: ConnectionError"


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
    assert create_app(make_settings(tmp_path / "home", 8999, None, api_host="0.0.0.0", api_token=SecretStr("t")))
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("example.com")


def test_openapi_documents_every_endpoint(shared_in_process_api: InProcessApi) -> None:
    spec = shared_in_process_api.client.get("/openapi.json").json()
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
            assert operation.get("summary") and operation["responses"], (path, method)
    assert set(paths["/v1/jobs"]["post"]["responses"]) >= {"202", "200", "401", "409", "413", "422"}
    job_create = spec["components"]["schemas"]["JobCreate"]
    assert {"job_id", "pipeline", "pipeline_id", "plugin_id", "tool_name", "config", "input"} <= set(
        job_create["properties"]
    )
    assert job_create["additionalProperties"] is False
    assert "multipart/form-data" in paths["/v1/media"]["post"]["requestBody"]["content"]
    assert spec["info"]["title"] == "ForgeFlow" and {t["name"] for t in spec["tags"]} >= {"jobs", "health"}


def test_websocket_positions_out_of_range_are_refused_before_the_stream(shared_in_process_api: InProcessApi) -> None:
    from starlette.testclient import WebSocketDenialResponse

    client = shared_in_process_api.client
    for url in (
        "/v1/ws/jobs/x?after_seq=9223372036854775808",
        "/v1/ws/jobs?after_cursor=9007199254740992",
        "/v1/ws/jobs?after_seq=%C2%B2",  # a digit to str.isdigit, not a number
    ):
        with pytest.raises(WebSocketDenialResponse) as denied, client.websocket_connect(url):
            pass
        assert denied.value.status_code == 422, url
        body = denied.value.json()
        assert body["error_type"] == "RequestValidationError"
        assert "from 0 to 9007199254740991" in body["error"]  # what a client may send instead, never the same value


def test_request_and_job_input_limits_are_checked_at_submission(in_process_factory: Any) -> None:
    api = in_process_factory(max_request_bytes=64 * 1024, max_job_input_bytes=1024, max_stages=4)
    client = api.client
    stage = {"plugin": "testkit", "tool": "noop"}

    too_much_input = client.post("/v1/jobs", json={"pipeline": [stage], "input": {"x": "A" * 2000}})
    assert too_much_input.status_code == 422
    body = too_much_input.json()
    assert body["field"] == "input" and "over the limit of 1024" in body["error"]
    assert "FORGEFLOW_MAX_JOB_INPUT_BYTES" in body["error"]

    many_stages = client.post("/v1/jobs", json={"pipeline": [stage] * 500, "input": {}})
    assert many_stages.status_code == 422
    assert many_stages.json()["field"] == "pipeline" and "over the limit of 4" in many_stages.json()["error"]

    big = json.dumps({"pipeline": [stage], "input": {"x": "A" * 100_000}}).encode()
    declared = client.post("/v1/jobs", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and "FORGEFLOW_MAX_REQUEST_BYTES" in declared.json()["error"]

    def chunks() -> Any:  # no Content-Length: the limit holds while the body streams in
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    streamed = client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and streamed.json()["error_type"] == "RequestTooLarge"

    small = json.dumps({"pipeline": [stage], "input": {}}).encode()
    chunked_ok = client.post(
        "/v1/jobs", content=iter([small[:10], small[10:]]), headers={"content-type": "application/json"}
    )
    assert chunked_ok.status_code == 202  # a small chunked body is read whole and handed on
    assert client.get("/v1/jobs").json()["total"] == 1  # nothing of the refused submissions was stored


def test_input_media_is_checked_at_submission(in_process_factory: Any, tmp_path: Any) -> None:
    allowed = tmp_path / "videos"
    allowed.mkdir()
    (allowed / "frame.png").write_bytes(PNG)
    (tmp_path / "elsewhere.png").write_bytes(PNG)
    client = in_process_factory(media_input_roots=[allowed]).client
    probe = [{"plugin": "testkit", "tool": "probe_media"}]

    def submit(media: Any) -> Any:
        return client.post("/v1/jobs", json={"pipeline": probe, "input": {"media": media}})

    for media, error_type in (
        ("sha256:" + "0" * 64, "MediaNotFound"),
        ("sha256:abc", "MediaError"),
        (str(tmp_path / "elsewhere.png"), "MediaError"),
        (str(allowed / "missing.png"), "MediaNotFound"),
        ("relative/frame.png", "MediaError"),
    ):
        refused = submit(media)
        assert refused.status_code == 422, media
        assert (refused.json()["field"], refused.json()["error_type"]) == ("input.media", error_type), media
    assert client.get("/v1/jobs").json()["total"] == 0  # nothing stored

    ref = client.post("/v1/media", files={"file": ("frame.png", PNG, "image/png")}).json()["ref"]
    assert submit(ref).status_code == 202
    assert submit(str(allowed / "frame.png")).status_code == 202
    # A pipeline whose stages do not read media does not care what the input's media says.
    noop = client.post("/v1/jobs", json={"pipeline": [{"plugin": "testkit", "tool": "noop"}], "input": {"media": "x"}})
    assert noop.status_code == 202


def test_a_body_that_is_not_json_gets_line_column_and_reason(shared_in_process_api: InProcessApi) -> None:
    """Every JSON route says where the JSON breaks and why, as ``forgeflow validate`` does (not the
    character offset posing as a field)."""
    api = shared_in_process_api
    json_type = {"content-type": "application/json"}
    ingest = {**json_type, "Authorization": f"Bearer {api.state.auth.ingest_token}"}
    for text, (line, column) in (
        ('{"pipeline": [ {"plugin": "pc", "tool": "count_people",} ]}', (1, 56)),
        ('{\n  "pipeline": [\n    hello\n  ]\n}', (3, 5)),
        ("hello", (1, 1)),
    ):
        with pytest.raises(json.JSONDecodeError) as parsed:
            json.loads(text)
        assert (parsed.value.lineno, parsed.value.colno) == (line, column)
        expected = f"malformed JSON at line {line}, column {column}: {parsed.value.msg}"
        for method, path, headers in (
            ("POST", "/v1/jobs", json_type),
            ("POST", "/v1/pipelines", json_type),
            ("PUT", "/v1/pipelines/count", json_type),
            ("POST", "/v1/pipeline-checks", json_type),
            ("POST", "/internal/v1/events", ingest),
        ):
            response = api.client.request(method, path, content=text.encode(), headers=headers)
            assert response.status_code == 422, (path, response.text)
            body = response.json()
            assert body["error"] == expected, (path, body)
            assert (body["line"], body["column"], body.get("field")) == (line, column, None), (path, body)


def test_templates_take_the_pipeline_runner_and_are_replaced_with_put(in_process_api: InProcessApi) -> None:
    client = in_process_api.client
    body = {"name": "Count", "stages": THREE_STAGES, "runner": "process", "description": "count"}
    created = client.post("/v1/pipelines", json=body)
    assert created.status_code == 201, created.text
    saved = created.json()
    assert (saved["id"], saved["runner"], saved["description"]) == ("count", "process", "count")
    # stored under the canonical plugin name, the alias kept beside it
    assert [(s["plugin"], s["plugin_alias"]) for s in saved["stages"]] == [
        ("testkit", None),
        ("testkit", "tk"),
        ("testkit", None),
    ]
    again = client.post("/v1/pipelines", json=body)
    assert again.status_code == 409 and "PUT /v1/pipelines/count" in again.json()["error"]

    replaced = client.put(
        "/v1/pipelines/count", json={"name": "count", "pipeline": THREE_STAGES[:2], "timeout_seconds": 60}
    )
    assert replaced.status_code == 200, replaced.text
    detail = client.get("/v1/pipelines/count").json()
    assert [s["tool"] for s in detail["stages"]] == ["numbers", "scale"]
    assert (detail["name"], detail["timeout_seconds"], detail["runner"], detail["description"]) == (
        "count",
        60,
        None,
        "",
    )
    assert detail["updated_at"] >= detail["created_at"]
    assert [(s["plugin"], s["tool"]) for s in detail["stage_stats"]] == [("testkit", "numbers"), ("testkit", "scale")]
    job = client.post("/v1/jobs", json={"pipeline_id": "count", "input": {"count": 2}})
    assert (
        job.status_code == 202 and len(client.get(f"/v1/jobs/{job.json()['job_id']}").json()["pipeline"]["stages"]) == 2
    )

    renamed = client.put("/v1/pipelines/count", json={"name": "Other", "stages": THREE_STAGES})
    assert renamed.status_code == 422 and renamed.json()["field"] == "name"
    assert client.put("/v1/pipelines/nope", json={"name": "nope", "stages": THREE_STAGES}).status_code == 404
    invalid = client.put("/v1/pipelines/count", json={"name": "count", "stages": [{"plugin": "tk", "tool": "numbr"}]})
    assert invalid.status_code == 422 and invalid.json()["field"] == "stages.0"
    assert len(client.get("/v1/pipelines/count").json()["stages"]) == 2  # a refused update changes nothing


def test_stage_order_is_a_warning_to_check_and_an_error_to_save(in_process_api: InProcessApi) -> None:
    """``total`` before the ``scale`` that makes its ``scaled``: a job input may still give it, so a
    check warns; a template could never run as saved, so saving it is refused."""
    client = in_process_api.client
    reversed_stages = [THREE_STAGES[2], THREE_STAGES[0], THREE_STAGES[1]]
    checked = client.post("/v1/pipeline-checks", json={"pipeline": reversed_stages})
    assert checked.status_code == 200, checked.text
    [warning] = checked.json()["warnings"]
    assert (warning["stage_index"], warning["field"], warning["error_type"]) == (0, "scaled", "StageOrder")
    assert "stage 2 testkit.scale produces it: move that stage earlier" in warning["message"]
    with_input = client.post("/v1/pipeline-checks", json={"pipeline": reversed_stages, "input": {"count": 1}})
    assert with_input.status_code == 422 and "stage 2 testkit.scale produces it" in with_input.json()["error"]
    saved = client.post("/v1/pipelines", json={"name": "backwards", "pipeline": reversed_stages})
    assert saved.status_code == 422, saved.text
    assert (saved.json()["error_type"], saved.json()["field"]) == ("PipelineValidationError", "pipeline.0.scaled")
    assert saved.json()["issues"][0]["error_type"] == "StageOrder"
    assert client.get("/v1/pipelines").json() == []


def test_the_pipeline_view_reports_reused_and_computed_outputs_as_the_envelope_does(
    in_process_api: InProcessApi,
) -> None:
    from forgeflow.pipeline import outcome

    client = in_process_api.client
    assert (
        client.post("/v1/jobs", json={"job_id": "j1", "pipeline": THREE_STAGES, "input": {"count": 1}}).status_code
        == 202
    )
    reports = [
        outcome.StageReport(
            index=i, plugin="testkit", tool=s["tool"], status="completed", reused_outputs=i, computed_outputs=64 - i
        )
        for i, s in enumerate(THREE_STAGES)
    ]
    envelope = outcome.succeeded({"total": 0}, reports).to_dict()
    done = [
        event("j1", "job_status", status="running"),
        event("j1", "job_status", status="succeeded", envelope=envelope),
    ]
    assert in_process_api.ingest(done).status_code == 200
    stages = client.get("/v1/jobs/j1/pipeline").json()["stages"]
    shown = [(s["reused_outputs"], s["computed_outputs"]) for s in stages]
    assert (
        shown
        == [(r["reused_outputs"], r["computed_outputs"]) for r in envelope["stages"]]
        == [(0, 64), (1, 63), (2, 62)]
    )
