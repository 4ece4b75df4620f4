"""What the web page needs from the API, in process: the page itself (served without a token, with a
Content-Security-Policy, nothing from another origin), ``POST /v1/pipeline-checks`` (the rules of
``POST /v1/jobs``, the same field named), and the job list's stage names and current stage."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.test_api.conftest import THREE_STAGES, InProcessApi

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[2]
UI_DIR = ROOT / "forgeflow" / "api" / "ui"


def test_the_page_is_served_without_a_token_with_a_strict_policy(in_process_factory: Any) -> None:
    api: InProcessApi = in_process_factory(token="s3cret")
    page = api.client.get("/ui", headers={"Authorization": ""})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert api.client.get("/v1/jobs", headers={"Authorization": ""}).status_code == 401  # the data is not open
    boot = re.search(r'<script type="application/json" id="boot">(.*?)</script>', page.text, re.S)
    assert boot is not None
    example = json.loads((ROOT / "examples" / "soccer-analysis.json").read_text())["pipeline"]
    assert json.loads(boot.group(1))["example_pipeline"] == example
    scripts = re.findall(r"<script\b([^>]*)>", page.text)
    assert all("src=" in attrs or 'type="application/json"' in attrs for attrs in scripts)  # no inline code
    root = api.client.get("/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/ui"
    assert "/ui" not in api.client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    ("name", "media_type"),
    [
        ("app.js", "text/javascript"),
        ("job.js", "text/javascript"),
        ("batches.js", "text/javascript"),
        ("style.css", "text/css"),
    ],
)
def test_static_files_are_served(shared_in_process_api: InProcessApi, name: str, media_type: str) -> None:
    response = shared_in_process_api.client.get(f"/ui/static/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] in (media_type, "application/javascript")
    assert response.text == (UI_DIR / "static" / name).read_text()


def test_the_page_fetches_nothing_from_another_origin() -> None:
    files = [UI_DIR / "index.html", *sorted((UI_DIR / "static").iterdir())]
    assert len(files) >= 8
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(?:https?:)?//(?!/)[a-z0-9.-]+\.[a-z]{2,}", text, re.I), path  # no URL of a host
        if path.suffix == ".css":
            assert "@import" not in text and "url(" not in text, path


#: Requests POST /v1/jobs refuses, and the field it names: the check answers the same 422.
REFUSED = [
    ({"pipeline": [], "input": {}}, "pipeline"),  # the key the user sent, not the definition's "stages"
    ({"pipeline": {"stages": []}, "input": {}}, "pipeline.stages"),
    ({"pipeline": [{"plugin": "testkit"}], "input": {}}, "pipeline.0.tool"),
    (
        {"pipeline": [{"plugin": "testkit", "tool": "numbers", "bogus": 1}], "input": {"count": 1}},
        "pipeline.0.bogus",
    ),
    (
        {"pipeline": {"stages": THREE_STAGES, "timeout_seconds": -1}, "input": {"count": 1}},
        "pipeline.timeout_seconds",
    ),
    ({"pipeline": THREE_STAGES, "input": {"count": "many"}}, "input.count"),
    ({"pipeline": THREE_STAGES, "input": {}}, "input.count"),
    ({"pipeline": [{"plugin": "nope", "tool": "x"}], "input": {}}, "pipeline.0"),
    ({"pipeline": [{"plugin": "tk", "tool": "numbr"}], "input": {"count": 1}}, "pipeline.0"),
    (
        {"pipeline": [{"plugin": "tk", "tool": "numbers", "config": {"start": "a"}}], "input": {"count": 1}},
        "pipeline.0.config.start",
    ),
    ({"pipeline": [THREE_STAGES[0], THREE_STAGES[2]], "input": {"count": 1}}, "pipeline.1.scaled"),
    ({"pipeline": [{"plugin": "testkit", "tool": "probe_media"}], "input": {}}, "input.media"),
    (
        {"pipeline": [{"plugin": "testkit", "tool": "probe_media"}], "input": {"media": "sha256:" + "0" * 64}},
        "input.media",
    ),
]


@pytest.mark.parametrize(("body", "field"), REFUSED)
def test_a_check_refuses_what_a_submission_would(
    shared_in_process_api: InProcessApi, body: dict[str, Any], field: str
) -> None:
    client = shared_in_process_api.client
    submitted = client.post("/v1/jobs", json=body)
    checked = client.post("/v1/pipeline-checks", json=body)
    assert submitted.status_code == checked.status_code == 422, (submitted.text, checked.text)
    assert checked.json() == submitted.json()  # error, error_type, field and every issue
    assert checked.json()["field"] == field


def test_a_check_of_a_valid_pipeline_lists_stages_and_job_input(shared_in_process_api: InProcessApi) -> None:
    client = shared_in_process_api.client
    without_input = client.post("/v1/pipeline-checks", json={"pipeline": THREE_STAGES})
    assert without_input.status_code == 200
    assert without_input.json() == {
        "stages": ["testkit.numbers", "testkit.scale", "testkit.total"],  # the alias tk resolved
        "job_input_fields": ["count"],
        "warnings": [],
    }
    with_input = client.post("/v1/pipeline-checks", json={"pipeline": {"stages": THREE_STAGES}, "input": {"count": 2}})
    assert with_input.status_code == 200
    # Nothing is stored by a check.
    assert client.get("/v1/jobs").json()["total"] == 0
    malformed = client.post("/v1/pipeline-checks", json={"pipeline": THREE_STAGES, "extra": 1})
    assert malformed.status_code == 422 and malformed.json()["field"] == "extra"


def test_job_list_names_the_stages_and_the_current_one(in_process_api: InProcessApi) -> None:
    from tests.test_api.conftest import event, stage_events

    client = in_process_api.client
    submitted = client.post("/v1/jobs", json={"job_id": "j1", "pipeline": THREE_STAGES, "input": {"count": 1}})
    assert submitted.status_code == 202
    listed = client.get("/v1/jobs").json()["items"][0]
    assert listed["stages"] == ["testkit.numbers", "testkit.scale", "testkit.total"]  # canonical, not the alias tk
    assert listed["current_stage"] is None  # queued
    running = [event("j1", "job_status", status="running"), *stage_events("j1", 0)]
    assert in_process_api.ingest(running).status_code == 200
    listed = client.get("/v1/jobs").json()["items"][0]
    assert listed["status"] == "running" and listed["current_stage"] == 1
