"""The engine's control protocol (``forgeflow.engine.control``) between a real daemon service on a
real Unix socket (``forgeflow.host.server.EngineService`` around a real ``Engine``; no job runs, so
no Prefect and no worker starts) and the real ``EngineClient``: what the client sends is what the
daemon takes, a body that is not the route's model is refused with a 400 that says what is wrong,
and the daemon serves on after it."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from forgeflow.engine import control
from forgeflow.engine.client import EngineClient, EngineUnavailable
from forgeflow.host.core import Engine
from forgeflow.host.server import EngineService
from forgeflow.settings import Settings

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def service() -> Iterator[EngineService]:
    """One daemon service for the module (no test starts a job; each says what it changes)."""
    home = Path(tempfile.mkdtemp(prefix="ff-ctl-"))  # short: a Unix socket path has ~100 characters
    engine = Engine(Settings(home=home))
    service = EngineService(engine, home / "engine.sock", started_by="test_control")
    thread = threading.Thread(target=service.serve, daemon=True)
    thread.start()
    client = EngineClient(service.socket_path, timeout=10.0)
    try:
        for _ in range(200):
            if client.alive():
                break
            service.stopped.wait(0.02)
        yield service
    finally:
        client.close()
        service.stop()
        service.stopped.wait(10)
        shutil.rmtree(home, ignore_errors=True)


def raw(service: EngineService) -> httpx.Client:
    """A plain HTTP client on the socket, to send what EngineClient never would."""
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(service.socket_path)), base_url="http://engine")


def test_client_and_daemon_speak_the_same_models(service: EngineService) -> None:
    client = EngineClient(service.socket_path)
    status = client.engine_status()
    assert isinstance(status, control.EngineStatus)
    assert status.started_by == "test_control" and status.jobs.running == [] and status.jobs.finished == 0
    assert client.status()["max_concurrent_jobs"] == service.engine.settings.max_concurrent_jobs
    assert client.jobs() == {} and client.jobs(active_only=True) == {}
    assert client.warm([]) == []
    client.set_owner(None)
    client.set_idle_stop(30)
    assert client.status()["idle_stop_s"] == 30
    with pytest.raises(EngineUnavailable) as unknown:
        client.cancel("no-such-job")
    assert unknown.value.status_code == 404
    client.close()


def test_the_two_bodies_of_post_jobs_are_told_apart() -> None:
    sink = {"api_url": "http://api", "ingest_token": None}
    submit = control.JOB_REQUEST.validate_python({"job_id": "j", "pipeline": {"stages": []}, "sink": sink})
    assert isinstance(submit, control.SubmitJob) and submit.input == {}
    handover = control.JOB_REQUEST.validate_python({"flow_run_id": "f", "handed_by": 7, "sink": sink})
    assert isinstance(handover, control.HandOverFlowRun) and handover.handed_by == 7
    with pytest.raises(ValidationError):  # a field of neither body
        control.JOB_REQUEST.validate_python({"job_id": "j", "pipeline": {}, "stream": True, "priority": 1})
    with pytest.raises(ValidationError):  # the client refuses to send what the daemon would refuse
        control.IdleStopRequest(seconds=-1)


@pytest.mark.parametrize(
    ("path", "body", "names"),
    [
        ("/jobs", {"pipeline": {"stages": []}, "stream": True}, "job_id"),
        ("/jobs", {"job_id": "j", "pipeline": {}, "stream": True, "priority": 1}, "priority"),
        ("/calls", {"plugin": "testkit"}, "tool"),
        ("/warm", {"plugins": "testkit"}, "plugins"),
        ("/shutdown", {"drain": "later"}, "drain"),
        ("/owner", b"{not json", "json"),
    ],
)
def test_a_body_that_is_not_the_routes_model_is_refused_and_the_daemon_serves_on(
    service: EngineService, path: str, body: dict[str, object] | bytes, names: str
) -> None:
    with raw(service) as http:
        if isinstance(body, bytes):
            answer = http.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            answer = http.post(path, json=body)
        assert answer.status_code == 400, answer.text
        error = control.ErrorAnswer.model_validate_json(answer.content).error
        assert path in error and names in error.lower()
        assert http.get("/status").status_code == 200
    assert not service.stopping and service.engine.jobs() == {}


def test_idle_stop_refuses_a_negative_time_and_keeps_the_one_it_had(service: EngineService) -> None:
    before = service.idle_stop_s
    with raw(service) as http:
        answer = http.post("/idle-stop", json={"seconds": -1})
    assert answer.status_code == 400
    assert control.ErrorAnswer.model_validate_json(answer.content).error == "seconds must be a number >= 0"
    assert service.idle_stop_s == before


def test_a_job_without_a_sink_or_stream_is_refused(service: EngineService) -> None:
    with raw(service) as http:
        answer = http.post("/jobs", json={"job_id": "j", "pipeline": {"stages": []}})
    assert answer.status_code == 400
    assert "sink" in control.ErrorAnswer.model_validate_json(answer.content).error
    assert service.engine.jobs() == {}
