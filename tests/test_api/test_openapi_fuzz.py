"""The API does what its OpenAPI document says.

``test_the_api_keeps_to_its_openapi_document`` runs schemathesis (every check: no 5xx, only documented
status codes, content types, headers and bodies, schema-valid requests accepted and schema-invalid ones
rejected, ``Allow`` on 405, auth, links …) against a live server for a bounded time (``--max-time``:
examples, coverage, fuzzing and stateful phases all within it), and fails with schemathesis' report on
any failure. The budget is ``FORGEFLOW_FUZZ_SECONDS`` (60 by default: every phase runs to its end for
all 34 operations, ~4,700 cases here; 120 s gave ~6,500, the rest more random fuzzing); the read-token
run gets half of it (~2,700 cases, every phase). Set it higher for a deeper run, e.g. before a
release: ``FORGEFLOW_FUZZ_SECONDS=600 .venv/bin/python -m pytest tests/test_api/test_openapi_fuzz.py``.
``tests/test_api/schemathesis.toml`` holds its only allowances, each one a rejection the
document cannot state (plugins, tools and media known at run time). By hand, against a running
``forgeflow serve``::

    schemathesis --config-file tests/test_api/schemathesis.toml run http://127.0.0.1:8000/openapi.json \\
        --checks all -H "Authorization: Bearer $FORGEFLOW_API_TOKEN" --max-time 120

The other tests here are fast, in process: what the fuzzer cannot tell apart once a rejection is allowed
(the forms of a submission, stated as ``oneOf`` in the schema, must match the API exactly) and the
hardening it found.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.test_api.conftest import InProcessApi, event

FUZZ_SECONDS = int(os.environ.get("FORGEFLOW_FUZZ_SECONDS", "60"))
CONFIG = Path(__file__).with_name("schemathesis.toml")


def test_the_api_keeps_to_its_openapi_document(api_factory: Any, tmp_path: Path) -> None:
    # A fuzzed job never passes validation anyway; the submission rate limit is off so the fuzzer reaches
    # the submission code rather than its 429.
    api = api_factory(launch_jobs=False, token="fuzz-token", submit_rate_per_minute=0)
    done = _schemathesis(api.url, "fuzz-token", FUZZ_SECONDS, tmp_path)
    report = done.stdout + done.stderr
    print(report)  # pytest shows it with a failure; the seed to replay it is in its last lines
    assert done.returncode == 0, "schemathesis found failures:\n" + report[report.find("FAILURES") :][-20_000:]


def _schemathesis(url: str, token: str, seconds: int, cwd: Path, *extra: str, env: dict[str, str] | None = None) -> Any:
    import os
    import subprocess

    command = [
        sys.executable,
        "-c",
        "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
        "--config-file",
        str(CONFIG),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        *extra,
        "--header",
        f"Authorization: Bearer {token}",
        "--max-time",
        str(seconds),
        "--workers",
        "1",
        "--continue-on-failure",
        "--request-timeout",
        "30",
        "--generation-database",
        "none",
        "--no-color",
    ]
    return subprocess.run(
        command,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=False,
        env={**os.environ, **(env or {})},
    )


READ_FUZZ_SECONDS = FUZZ_SECONDS // 2


def test_a_read_token_finds_no_write_that_succeeds(api_factory: Any, tmp_path: Path) -> None:
    """Schemathesis with a ``read`` token, against a service holding a job, a template and media: no
    operation that needs more than ``read`` answers 2xx (the check in schemathesis_read_scope.py, from
    each operation's declared scopes), and afterwards the store holds exactly what it held before."""
    from tests.test_api.test_api_access import bearer, write_tokens
    from tests.test_api.test_api_requests import PNG

    tokens = {"fuzz-reader": ("fuzz-read-token", ["read"]), "seeder": ("fuzz-seed-token", ["read", "run", "admin"])}
    api = api_factory(launch_jobs=False, api_tokens_file=write_tokens(tmp_path / "tokens.json", tokens))
    import httpx

    with httpx.Client(base_url=api.url, headers=bearer("fuzz-seed-token"), timeout=30) as seeder:
        assert seeder.post("/v1/pipelines", json={"name": "Seeded", "stages": STAGES}).status_code == 201
        assert seeder.post("/v1/jobs", json={"pipeline": STAGES, "input": {}}).status_code == 202
        assert seeder.post("/v1/media", files={"file": ("x.png", PNG)}).status_code == 201

    def snapshot() -> Any:
        store = api.state.store
        jobs, _ = store.list_jobs(None, 500, 0)
        return (
            [(j["id"], j["status"], j["cancel_requested"]) for j in jobs],
            [(t["id"], t["name"]) for t in store.list_templates()],
            store.audit_entries(500)[1],
            sorted(str(p) for p in api.settings.media_root.rglob("*") if p.is_file()),
        )

    before = snapshot()
    hooks = {"SCHEMATHESIS_HOOKS": str(Path(__file__).with_name("schemathesis_read_scope.py"))}
    # Writes are refused by design (403), so "valid data is accepted" cannot hold for them.
    done = _schemathesis(
        api.url,
        "fuzz-read-token",
        READ_FUZZ_SECONDS,
        tmp_path,
        "--exclude-checks",
        "positive_data_acceptance",
        env=hooks,
    )
    report = done.stdout + done.stderr
    print(report)
    assert done.returncode == 0, "schemathesis found failures:\n" + report[report.find("FAILURES") :][-20_000:]
    assert snapshot() == before


# --- what the fuzzer cannot see once a rejection is allowed ---------------------------------------


def _schema(api: InProcessApi, name: str) -> Any:
    from jsonschema import Draft202012Validator

    spec = api.client.get("/openapi.json").json()
    return Draft202012Validator(spec["components"]["schemas"][name])


STAGES = [{"plugin": "testkit", "tool": "noop"}]
JOB_FIELDS: dict[str, list[Any]] = {
    "pipeline": [STAGES, {"stages": STAGES}],
    "pipeline_id": ["no-such-template"],
    "plugin_id": ["testkit"],
    "tool_name": ["noop"],
    "config": [{}],
    "timeout_seconds": [5],
    "description": ["d"],
}


def _job_bodies() -> list[dict[str, Any]]:
    """Every combination of the submission fields (absent or given), and each given as null."""
    bodies = []
    choices = [[None, *[(name, v) for v in values]] for name, values in JOB_FIELDS.items()]
    for combo in itertools.product(*choices):
        bodies.append({"input": {}, **dict(pair for pair in combo if pair is not None)})
    base = {"pipeline": STAGES, "input": {}}
    bodies += [{**base, name: None} for name in JOB_FIELDS if name != "pipeline"]
    bodies.append({"pipeline": None, "pipeline_id": "no-such-template", "input": {}})
    return bodies


@pytest.mark.fast
def test_the_forms_of_a_job_submission_are_stated_exactly(in_process_api: InProcessApi) -> None:
    """A body the schema's ``oneOf`` of forms allows is taken (202, or 404 for the unknown template);
    one it refuses is a 422 naming a field of the form."""
    schema = _schema(in_process_api, "JobCreate")
    for body in _job_bodies():
        response = in_process_api.client.post("/v1/jobs", json=body)
        if schema.is_valid(body):
            assert response.status_code in (202, 404), (body, response.json())
        else:
            assert response.status_code == 422, (body, response.json())
            assert response.json()["error_type"] == "RequestValidationError", (body, response.json())


@pytest.mark.fast
def test_the_forms_of_a_template_are_stated_exactly(in_process_api: InProcessApi) -> None:
    schema = _schema(in_process_api, "PipelineCreate")
    for number, (stages, pipeline) in enumerate(itertools.product(["absent", None, STAGES], repeat=2)):
        body: dict[str, Any] = {"name": f"template {number}"}
        body.update({k: v for k, v in (("stages", stages), ("pipeline", pipeline)) if v != "absent"})
        response = in_process_api.client.post("/v1/pipelines", json=body)
        assert response.status_code == (201 if schema.is_valid(body) else 422), (body, response.json())


# --- what the fuzzer found ------------------------------------------------------------------------


@pytest.mark.fast
def test_405_names_every_method_of_the_path(shared_in_process_api: InProcessApi) -> None:
    client = shared_in_process_api.client
    for path, allow in (
        ("/v1/jobs", "GET, POST"),
        ("/v1/pipelines", "GET, POST"),
        ("/v1/pipelines/x", "DELETE, GET, PUT"),
        ("/v1/jobs/x/cancel", "POST"),
        ("/openapi.json", "GET, HEAD"),
    ):
        response = client.options(path)
        assert response.status_code == 405 and response.headers["allow"] == allow, path
        assert response.json()["error_type"] == "MethodNotAllowed"


@pytest.mark.fast
def test_the_document_states_every_error_in_the_api_s_own_shape(shared_in_process_api: InProcessApi) -> None:
    spec = shared_in_process_api.client.get("/openapi.json").json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    error_body = {"$ref": "#/components/schemas/ErrorBody"}
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            for status, response in responses.items():
                if status.startswith("4"):
                    assert response["content"]["application/json"]["schema"] == error_body, (method, path, status)
            if operation.get("security"):
                assert "401" in responses, (method, path)
            if "application/json" in operation.get("requestBody", {}).get("content", {}):
                assert {"400", "413", "422"} <= set(responses), (method, path)
    ref = spec["paths"]["/v1/media/{ref}"]["get"]["parameters"][0]
    assert ref["name"] == "ref" and ref["schema"]["pattern"] == "^sha256:[0-9a-f]{64}$"


@pytest.mark.fast
def test_what_the_store_cannot_hold_or_send_back_is_refused(shared_in_process_api: InProcessApi) -> None:
    """A body that is not UTF-8 JSON is a 400; JSON nested too deeply to send back, NaN or Infinity (which
    Python's parser takes), or a NUL in text (which PostgreSQL cannot store) a 422 naming the field, down
    to the value inside it (``pipeline.0.config.confidence``, not ``pipeline``)."""
    client = shared_in_process_api.client
    json_type = {"content-type": "application/json"}
    not_utf8 = client.post("/v1/jobs", content=b'{"input": "\xff"}', headers=json_type)
    assert not_utf8.status_code == 400 and not_utf8.json()["error_type"] == "BadRequest"
    deep: Any = []
    for _ in range(150):
        deep = [deep]
    for path, body, field, message in (
        ("/v1/jobs", {"pipeline": STAGES, "input": {"x": deep}}, "input", "nested deeper than 100"),
        ("/v1/jobs", {"pipeline": STAGES, "input": {"x": "a\x00b"}}, "input.x", "U+0000"),
        ("/v1/jobs", {"pipeline": [{**STAGES[0], "config": {"\x00": 1}}]}, "pipeline.0.config", "U+0000"),
        ("/v1/pipelines", {"name": "a\x00b", "stages": STAGES}, "name", "U+0000"),
        (
            "/v1/jobs",
            b'{"pipeline": [{"plugin": "testkit", "tool": "noop"}], "input": {"x": NaN}}',
            "input.x",
            "finite",
        ),
        (
            "/v1/jobs",
            b'{"pipeline": [{"plugin": "testkit", "tool": "noop", "config": {"confidence": NaN}}]}',
            "pipeline.0.config.confidence",
            "finite",
        ),
        (
            "/v1/jobs",
            b'{"pipeline": [{"plugin": "testkit", "tool": "noop"}], "timeout_seconds": Infinity}',
            "timeout_seconds",
            "finite",
        ),
    ):
        if isinstance(body, bytes):
            response = client.post(path, content=body, headers=json_type)
        else:
            response = client.post(path, json=body)
        assert response.status_code == 422, (body, response.json())
        assert response.json()["field"] == field and message in response.json()["error"], (body, response.json())
    # An id with a NUL is not an id (the path and query patterns say so; PostgreSQL is never asked).
    for response in (
        client.get("/v1/jobs/a%00b"),
        client.get("/v1/jobs/a%00b/events"),
        client.get("/v1/pipelines/a%00b"),
        client.delete("/v1/pipelines/a%00b"),
        client.get("/v1/jobs", params={"pipeline_id": "a\x00b"}),
    ):
        assert response.status_code == 422 and response.json()["error_type"] == "RequestValidationError"


@pytest.mark.fast
def test_ingested_events_keep_to_the_store_s_limits(in_process_api: InProcessApi) -> None:
    """Values the store cannot hold, or a stage index that would make every read of the job build
    that many stages, are a 422 naming the field, never a 500; a number is never a string."""
    api = in_process_api
    start = {"plugin": "p", "tool": "t"}
    for bad, field in (
        (event("limits", "pipeline_stage_start", stage_index=10_000, **start), "stage_index"),
        (event("limits", "pipeline_stage_start", stage_index=2**70, **start), "stage_index"),
        (event("limits", "pipeline_stage_start", stage_index="5", **start), "stage_index"),
        (event("limits", "pipeline_stage_start", stage_index=-1, **start), "stage_index"),
        (event("limits", "pipeline_progress", stages_total=2**31, stages_completed=0, percent=0), "stages_total"),
        (event("limits", "pipeline_stage_start", stage_index=0, plugin="p" * 201, tool="t"), "plugin"),
        (event("limits", "job_status", status="running", timestamp="0001-01-01T00:00:00+23:59"), "timestamp"),
        (event("limits", "job_status", status="failed", envelope={"ok": False, "stages_executed": "3"}), "envelope"),
        (event("limits", "job_status", status="failed", envelope={"ok": False, "error_type": "e" * 201}), "envelope"),
        ({**event("limits", "job_status", status="running"), "type": {}}, ""),  # no such kind of event
    ):
        response = api.ingest([bad])
        assert response.status_code == 422, (bad, response.text)
        assert response.json()["field"].startswith(f"events.0{field and '.' + field}"), (bad, response.json())
    fine = event("limits", "pipeline_stage_start", stage_index=9_999, attempt=1, **start)
    assert api.ingest([fine]).status_code == 200
    # U+0000, which PostgreSQL refuses, is kept as U+FFFD in a message's text and an envelope
    nul = event("limits", "pipeline_error", stage_index=0, plugin="p\x00", error="e\x00", error_type="E")
    assert api.ingest([nul]).status_code == 200
    stored = api.client.get("/v1/jobs/limits/events").json()["events"][-1]
    assert (stored["plugin"], stored["error"]) == ("p\ufffd", "e\ufffd")
    assert api.client.get("/v1/jobs/limits/pipeline").json()["stages_total"] == 10_000
    # A position past any stored seq (a 32-bit integer on PostgreSQL) has nothing after it.
    after = api.client.get("/v1/jobs/limits/events", params={"after_seq": 2**40}).json()
    assert after["events"] == [] and after["last_seq"] == 2
    # One batch is one transaction under the store's write lock: over 1,000 events is refused whole.
    many = [
        event("limits", "pipeline_stage_progress", stage_index=0, plugin="p", tool="t", done=n, total=1001)
        for n in range(1001)
    ]
    response = api.ingest(many)
    assert response.status_code == 422 and response.json()["field"] == "events", response.text
    assert api.client.get("/v1/jobs/limits/events").json()["last_seq"] == 2
    assert api.ingest(many[:1000]).json()["stored"] == 1000
