"""Who may call what: named tokens with scopes from a file of hashes, rotated without a restart; each
route's scope taken from the OpenAPI document (403 naming the missing scope outside it); who submitted,
saved, cancelled and deleted; the per-token submission rate limit; tokens never in URLs or logs."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.test_api.conftest import THREE_STAGES, InProcessApi, event

READER, RUNNER, ADMIN = "reader-token-1", "runner-token-2", "admin-token-3"
OTHER_RUNNER = "runner-token-4"
STAGES = [{"plugin": "testkit", "tool": "noop"}]


def write_tokens(path: Path, tokens: dict[str, tuple[str, list[str]]]) -> Path:
    """A tokens file: name -> (token, scopes), kept as hashes only; its mtime moves on every write."""
    from forgeflow.api.auth import hash_token

    entries = [{"name": n, "scopes": s, "sha256": hash_token(t)} for n, (t, s) in tokens.items()]
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(json.dumps({"tokens": entries}))
    if path.stat().st_mtime_ns == before:  # a coarse clock: make the change visible
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))
    return path


TOKENS = {
    "reader": (READER, ["read"]),
    "runner": (RUNNER, ["read", "run"]),
    "other-runner": (OTHER_RUNNER, ["read", "run"]),
    "boss": (ADMIN, ["read", "run", "admin"]),
}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def scoped(in_process_factory: Any, tmp_path: Path) -> InProcessApi:
    api: InProcessApi = in_process_factory(api_tokens_file=write_tokens(tmp_path / "tokens.json", TOKENS))
    return api


def _operations(api: InProcessApi) -> list[tuple[str, str, list[str]]]:
    """Every operation of the OpenAPI document behind a token, with the scopes it declares."""
    spec = api.client.get("/openapi.json").json()
    out = []
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            for requirement in operation.get("security") or []:
                out.append((method.upper(), path, requirement["HTTPBearer"]))
    return out


def _concrete(path: str) -> str:
    return (
        path.replace("{job_id}", "no-such-job")
        .replace("{pipeline_id}", "no-such")
        .replace("{name}", "testkit")
        .replace("{ref}", "sha256:" + "0" * 64)
    )


@pytest.mark.fast
def test_each_route_refuses_a_token_outside_its_scope_naming_the_scope(scoped: InProcessApi) -> None:
    """From the OpenAPI paths: GET is read, DELETE admin, other writes run unless a route declares its
    own; a token without the scope gets 403 with ``missing_scope`` before the route does anything."""
    operations = _operations(scoped)
    declared = {(m, p): s for m, p, s in operations}
    assert declared[("GET", "/v1/jobs")] == ["read"] and declared[("DELETE", "/v1/pipelines/{pipeline_id}")] == [
        "admin"
    ]
    assert declared[("POST", "/v1/jobs")] == ["run"] and declared[("POST", "/v1/media")] == ["run"]
    assert declared[("GET", "/v1/auth/me")] == []  # any valid token may ask who it is
    assert len(operations) >= 18
    holders = {"read": READER, "run": OTHER_RUNNER, "admin": ADMIN}
    lacking = {"read": [], "run": [READER], "admin": [READER, RUNNER]}
    client = scoped.client
    for method, path, scopes in operations:
        for scope in scopes:
            for token in lacking[scope]:
                refused = client.request(method, _concrete(path), headers=bearer(token), json={})
                assert refused.status_code == 403, (method, path, token, refused.text)
                body = refused.json()
                assert body["error_type"] == "Forbidden" and body["missing_scope"] == scope, body
                assert f"'{scope}' scope" in body["error"]
            allowed = client.request(method, _concrete(path), headers=bearer(holders[scope]), json={})
            assert allowed.status_code not in (401, 403), (method, path, allowed.text)
    ingest = bearer(scoped.state.auth.ingest_token)
    # No token at all is a 401; the ingest token opens media and batches only (a worker host's batch
    # flow run registers and follows its batch with it).
    for method, path, _scopes in operations:
        assert client.request(method, _concrete(path), headers={"Authorization": ""}).status_code == 401
        by_worker = client.request(method, _concrete(path), headers=ingest, json={})
        if path.startswith(("/v1/media", "/v1/batches")):
            assert by_worker.status_code not in (401, 403), (method, path, by_worker.text)
        else:
            assert by_worker.status_code == 401, (method, path, by_worker.text)
    assert scoped.client.get("/v1/jobs", headers=bearer("not-a-token")).status_code == 401


@pytest.mark.fast
def test_auth_me_says_what_the_token_may_do(scoped: InProcessApi, in_process_factory: Any) -> None:
    me = scoped.client.get("/v1/auth/me", headers=bearer(READER)).json()
    assert me == {"name": "reader", "scopes": ["read"], "auth_required": True}
    boss = scoped.client.get("/v1/auth/me", headers=bearer(ADMIN)).json()
    assert boss["scopes"] == ["read", "run", "admin"]
    # FORGEFLOW_API_TOKEN keeps working, with every scope; an open service has no name and every scope.
    single = in_process_factory(token="the-one-token")
    assert single.client.get("/v1/auth/me").json() == {
        "name": "api-token",
        "scopes": ["read", "run", "admin"],
        "auth_required": True,
    }
    assert single.client.delete("/v1/pipelines/nothing").status_code == 404  # admin: past the guard
    assert in_process_factory().client.get("/v1/auth/me").json() == {
        "name": None,
        "scopes": ["read", "run", "admin"],
        "auth_required": False,
    }


@pytest.mark.fast
def test_the_tokens_file_holds_hashes_only_and_rotates_without_a_restart(
    in_process_factory: Any, tmp_path: Path
) -> None:
    from forgeflow.api.auth import InvalidTokens

    path = write_tokens(tmp_path / "tokens.json", {"first": ("first-secret", ["read"])})
    api = in_process_factory(api_tokens_file=path)
    assert "first-secret" not in path.read_text()
    assert api.client.get("/v1/jobs", headers=bearer("first-secret")).status_code == 200
    # Rotate: a new token in, the old one out, while the service runs.
    write_tokens(path, {"second": ("second-secret", ["read", "run"])})
    assert api.client.get("/v1/jobs", headers=bearer("first-secret")).status_code == 401
    assert api.client.get("/v1/auth/me", headers=bearer("second-secret")).json()["name"] == "second"
    # A broken edit keeps the tokens in force (and says why in the log); fixing it applies the fix.
    path.write_text('{"tokens": [{"name": "x", "scopes": ["read"], "token": "plain"}]}')
    assert api.client.get("/v1/jobs", headers=bearer("second-secret")).status_code == 200
    assert api.client.get("/v1/jobs", headers=bearer("plain")).status_code == 401
    write_tokens(path, {"third": ("third-secret", ["read"])})
    assert api.client.get("/v1/jobs", headers=bearer("second-secret")).status_code == 401
    assert api.client.get("/v1/jobs", headers=bearer("third-secret")).status_code == 200
    path.unlink()  # a removed file opens nothing
    assert api.client.get("/v1/jobs", headers=bearer("third-secret")).status_code == 401

    # At start-up a plain token, an unknown scope or a missing file stops the service, naming the problem.
    plain = tmp_path / "plain.json"
    plain.write_text('{"tokens": [{"name": "ci", "scopes": ["read"], "token": "s3cret"}]}')
    with pytest.raises(InvalidTokens, match="keep only its hash"):
        in_process_factory(api_tokens_file=plain)
    bad_scope = tmp_path / "scope.toml"
    bad_scope.write_text('[[tokens]]\nname = "ci"\nscopes = ["write"]\nsha256 = "' + "a" * 64 + '"\n')
    with pytest.raises(InvalidTokens, match="unknown scope 'write'"):
        in_process_factory(api_tokens_file=bad_scope)
    with pytest.raises(InvalidTokens, match="no such file"):
        in_process_factory(api_tokens_file=tmp_path / "missing.json")
    # TOML works as JSON does.
    from forgeflow.api.auth import hash_token

    toml = tmp_path / "tokens.toml"
    toml.write_text(f'[[tokens]]\nname = "toml-ci"\nscopes = ["read", "run"]\nsha256 = "{hash_token("t-o-m-l")}"\n')
    from_toml = in_process_factory(api_tokens_file=toml)
    assert from_toml.client.get("/v1/auth/me", headers=bearer("t-o-m-l")).json()["name"] == "toml-ci"


@pytest.mark.fast
def test_who_submitted_saved_cancelled_and_deleted(scoped: InProcessApi) -> None:
    from forgeflow.api.launching import launcher_for

    api = scoped
    api.state.launcher = launcher_for(api.state)  # not started: a queued job is cancelled at once
    client = api.client
    job = client.post("/v1/jobs", json={"pipeline": STAGES, "input": {}}, headers=bearer(RUNNER))
    assert job.status_code == 202 and job.json()["created_by"] == "runner"
    job_id = job.json()["job_id"]
    assert client.get(f"/v1/jobs/{job_id}", headers=bearer(READER)).json()["created_by"] == "runner"
    listed = client.get("/v1/jobs", headers=bearer(READER)).json()["items"]
    assert [(j["job_id"], j["created_by"]) for j in listed] == [(job_id, "runner")]

    # Another run token may not cancel it (admin may); its own submitter may.
    other = client.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(OTHER_RUNNER))
    assert other.status_code == 403 and other.json()["missing_scope"] == "admin"
    assert "'runner'" in other.json()["error"]
    cancel = client.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(RUNNER))
    assert cancel.status_code == 202 and cancel.json()["cancelled_by"] == "runner", cancel.text
    view = client.get(f"/v1/jobs/{job_id}", headers=bearer(READER)).json()
    assert (view["status"], view["cancelled_by"]) == ("cancelled", "runner")

    second = client.post("/v1/jobs", json={"pipeline": STAGES, "input": {}}, headers=bearer(RUNNER)).json()
    assert client.post(f"/v1/jobs/{second['job_id']}/cancel", headers=bearer(ADMIN)).json()["cancelled_by"] == "boss"

    saved = client.post("/v1/pipelines", json={"name": "Kept", "stages": STAGES}, headers=bearer(RUNNER))
    assert saved.status_code == 201 and saved.json()["created_by"] == "runner"
    assert client.get("/v1/pipelines/kept", headers=bearer(READER)).json()["created_by"] == "runner"
    refused = client.delete("/v1/pipelines/kept", headers=bearer(RUNNER))
    assert refused.status_code == 403 and refused.json()["missing_scope"] == "admin"
    assert client.delete("/v1/pipelines/kept", headers=bearer(ADMIN)).status_code == 204

    audit = client.get("/v1/audit", headers=bearer(READER)).json()
    assert [(a["actor"], a["action"], a["target"]) for a in audit["items"]] == [
        ("boss", "template.delete", "kept"),
        ("boss", "job.cancel", second["job_id"]),
        ("runner", "job.cancel", job_id),
    ]
    assert audit["total"] == 3


@pytest.mark.fast
def test_submissions_are_rate_limited_per_token_and_recover(in_process_factory: Any, tmp_path: Path) -> None:
    from forgeflow.api.quota import SubmissionQuota

    api = in_process_factory(
        api_tokens_file=write_tokens(tmp_path / "tokens.json", TOKENS), submit_rate_per_minute=60, submit_burst=3
    )
    now = [1000.0]
    api.state.quota = SubmissionQuota(60, 3, clock=lambda: now[0])  # the settings' numbers, on a clock we move
    body = {"pipeline": STAGES, "input": {}}
    for _ in range(3):
        assert api.client.post("/v1/jobs", json=body, headers=bearer(RUNNER)).status_code == 202
    limited = api.client.post("/v1/jobs", json=body, headers=bearer(RUNNER))
    assert limited.status_code == 429 and limited.json()["error_type"] == "TooManyRequests"
    assert limited.headers["retry-after"] == "1" and "FORGEFLOW_SUBMIT_RATE_PER_MINUTE" in limited.json()["error"]
    # Another token is not starved by this one; reading is never limited.
    assert api.client.post("/v1/jobs", json=body, headers=bearer(ADMIN)).status_code == 202
    assert api.client.get("/v1/jobs", headers=bearer(RUNNER)).status_code == 200
    now[0] += 1.0  # one submission a second comes back
    assert api.client.post("/v1/jobs", json=body, headers=bearer(RUNNER)).status_code == 202
    assert api.client.post("/v1/jobs", json=body, headers=bearer(RUNNER)).status_code == 429
    now[0] += 30.0  # and the burst refills (up to its size)
    assert [api.client.post("/v1/jobs", json=body, headers=bearer(RUNNER)).status_code for _ in range(4)] == [
        202,
        202,
        202,
        429,
    ]
    assert api.client.get("/openapi.json").json()["paths"]["/v1/jobs"]["post"]["responses"]["429"]


@pytest.mark.fast
def test_a_live_setting_limits_submissions(in_process_factory: Any) -> None:
    """The limit the settings name is the one the service applies (no clock of the test's)."""
    api = in_process_factory(token="t", submit_rate_per_minute=1, submit_burst=2)
    body = {"pipeline": STAGES, "input": {}}
    codes = [api.client.post("/v1/jobs", json=body).status_code for _ in range(3)]
    assert codes == [202, 202, 429]
    assert 1 <= int(api.client.post("/v1/jobs", json=body).headers["retry-after"]) <= 60


def test_websockets_take_the_bearer_subprotocol_and_refuse_a_token_in_the_url(api_factory: Any, tmp_path: Path) -> None:
    from forgeflow.api.auth import ws_bearer_protocol

    api = api_factory(launch_jobs=False, api_tokens_file=write_tokens(tmp_path / "tokens.json", TOKENS))
    api.ingest([event("wsjob", "job_status", status="running")])
    url = f"{api.ws_url}/v1/ws/jobs/wsjob"
    with connect(url, subprotocols=["forgeflow.v1", ws_bearer_protocol(READER)]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "forgeflow.v1"  # the secret one is never echoed
        assert '"seq":1' in ws.recv(timeout=10)
    with connect(url, additional_headers=bearer(READER)) as ws:
        assert '"seq":1' in ws.recv(timeout=10)
    # A token in the URL is refused even when it is right; so are a wrong or missing one.
    for attempt in (
        {"uri": f"{url}?token={READER}"},
        {"uri": f"{api.ws_url}/v1/ws/jobs?token={READER}"},
        {"uri": url, "subprotocols": ["forgeflow.v1", ws_bearer_protocol("wrong")]},
        {"uri": url, "subprotocols": ["forgeflow.v1", "forgeflow.bearer.!!not-base64"]},
        {"uri": url},
    ):
        with pytest.raises(InvalidStatus) as info:
            connect(**attempt)  # type: ignore[arg-type]
        assert info.value.response.status_code == 401, attempt
    with pytest.raises(InvalidStatus) as info:
        connect(f"{url}?token={READER}", additional_headers=bearer(READER))
    assert b"token in the URL is refused" in (info.value.response.body or b"")


@pytest.mark.fast
def test_logs_never_hold_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    from forgeflow.redact import REDACTED, redact, redact_record

    secret = "Zq9-tOkEn_value"
    for text in (
        f'127.0.0.1:5000 - "GET /v1/jobs?token={secret} HTTP/1.1" 401',
        f"WebSocket /v1/ws/jobs?after_cursor=3&access_token={secret}",
        f"url=http://h/x?a=1&api_key={secret}&b=2",
        f"headers={{'Authorization': 'Bearer {secret}'}}",
        f"Authorization: Basic {secret}",
        f"Sec-WebSocket-Protocol: forgeflow.v1, forgeflow.bearer.{secret}",
        f"/x?password={secret}#frag",
    ):
        cleaned = redact(text)
        assert secret not in cleaned and REDACTED in cleaned, cleaned
    assert redact("GET /v1/jobs?after_seq=3&limit=5") == "GET /v1/jobs?after_seq=3&limit=5"
    assert redact("the token 'reader' has: read") == "the token 'reader' has: read"
    # uvicorn's access formatter reads the arguments one by one: they stay a tuple, each redacted.
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        "",
        0,
        '%s - "%s %s HTTP/%s" %d',
        ("c", "GET", f"/v?token={secret}", "1.1", 200),
        None,
    )
    redact_record(record)
    assert isinstance(record.args, tuple) and secret not in record.getMessage() and record.args[4] == 200
    try:
        raise RuntimeError(f"failed for http://h/?ticket={secret}")
    except RuntimeError:
        import sys

        failed = logging.LogRecord("x", logging.ERROR, "", 0, "boom", None, sys.exc_info())
    # The traceback is formatted when a handler first formats the record, not when it is made (a
    # record a filter drops costs none), and that one text serves every later handler.
    formatted: list[object] = []
    format_exception = logging.Formatter.formatException
    monkeypatch.setattr(
        logging.Formatter, "formatException", lambda self, ei: formatted.append(ei) or format_exception(self, ei)
    )
    redact_record(failed)
    assert formatted == []
    text = logging.Formatter().format(failed)
    assert secret not in text and REDACTED in text and "RuntimeError" in text and "Traceback" in text
    assert logging.Formatter("%(levelname)s %(message)s").format(failed).endswith(text.split("\n", 1)[1])
    assert len(formatted) == 1


@pytest.mark.fast
def test_the_tokens_command_adds_hashes_lists_and_revokes(tmp_path: Path, in_process_factory: Any) -> None:
    from typer.testing import CliRunner

    from forgeflow.api.auth import hash_token
    from forgeflow.cli.main import app

    runner = CliRunner()
    path = tmp_path / "tokens.json"
    added = runner.invoke(app, ["tokens", "add", "ci", "--scopes", "read,run", "--file", str(path)])
    assert added.exit_code == 0, added.output
    token = added.stdout.strip().splitlines()[-1]
    assert token.startswith("ff_") and token not in path.read_text()
    assert json.loads(path.read_text())["tokens"] == [
        {"name": "ci", "scopes": ["read", "run"], "sha256": hash_token(token)}
    ]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    api = in_process_factory(api_tokens_file=path)
    assert api.client.get("/v1/auth/me", headers=bearer(token)).json()["scopes"] == ["read", "run"]
    assert runner.invoke(app, ["tokens", "add", "ci", "--file", str(path)]).exit_code == 2  # the name is taken
    assert runner.invoke(app, ["tokens", "add", "x", "--scopes", "write", "--file", str(path)]).exit_code == 2
    assert runner.invoke(app, ["tokens", "list", "--file", str(path)]).stdout == "ci\tread,run\n"
    hashed = runner.invoke(app, ["tokens", "hash"], input="some-token\n")
    assert hashed.stdout.strip() == hash_token("some-token")
    assert runner.invoke(app, ["tokens", "revoke", "ci", "--file", str(path)]).exit_code == 0
    assert api.client.get("/v1/auth/me", headers=bearer(token)).status_code == 401  # at once, no restart


def test_the_watch_command_follows_a_job_with_the_token_in_a_header(api_factory: Any, tmp_path: Path) -> None:
    """``forgeflow watch`` prints every message of the job as JSON lines and exits with the job."""
    import subprocess
    import sys

    api = api_factory(token="watch-secret-42")
    client = api.client()
    job_id = client.post("/v1/jobs", json={"pipeline": THREE_STAGES, "input": {"count": 2}}).json()["job_id"]
    token_file = tmp_path / "token"
    token_file.write_text("watch-secret-42\n")
    command = [
        sys.executable,
        "-m",
        "forgeflow.cli",
        "watch",
        job_id,
        "--api",
        api.url,
        "--token-file",
        str(token_file),
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=180,
        env={k: v for k, v in os.environ.items() if k != "FORGEFLOW_API_TOKEN"},
    )
    assert done.returncode == 0, done.stderr
    messages = [json.loads(line) for line in done.stdout.splitlines()]
    assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
    assert messages[-1]["type"] == "job_status" and messages[-1]["status"] == "succeeded"
    caught_up = subprocess.run(  # nothing after the last seq: the job's status still decides the exit
        [*command, "--after-seq", str(len(messages))],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "FORGEFLOW_API_TOKEN"},
    )
    assert (caught_up.returncode, caught_up.stdout) == (0, ""), caught_up.stderr
    refused = subprocess.run(
        [sys.executable, "-m", "forgeflow.cli", "watch", job_id, "--api", api.url],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "FORGEFLOW_API_TOKEN"},
    )
    assert refused.returncode == 2 and "401" in refused.stderr
