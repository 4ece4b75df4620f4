"""Hosts that share nothing but the API: a worker host's flow run fetches the media its stages read
from ``GET /v1/media/{ref}/content`` (checked against the ref, cached in its own store) and uploads
the media its stages make to ``POST /v1/media``.

The worker side runs against a real API server (``api_factory``, its own FORGEFLOW_HOME) from a
second FORGEFLOW_HOME with ``FORGEFLOW_API_URL`` pointing at it; the content route itself is also
checked in process (fast tier).
"""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port

TOKEN = "media-token"
INGEST = "worker-ingest-token"  # what a worker host holds; the media routes take it
PROBE_AND_THUMBNAIL = [
    {"plugin": "testkit", "tool": "probe_media"},
    {"plugin": "testkit", "tool": "thumbnail"},
]


def _png(width: int = 32, height: int = 24, value: int = 0) -> bytes:
    import cv2
    import numpy as np

    image = np.full((height, width, 3), value, dtype=np.uint8)
    image[: height // 2, : width // 2] = (0, 128, 255)
    ok, data = cv2.imencode(".png", image)
    assert ok
    return bytes(data)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The project's sample clip, short and small: 12 frames of 160x96 (MP4)."""
    from forgeflow.cli.sample_clip import make_sample_clip

    return make_sample_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=12, size=(160, 96)).read_bytes()


def _ref(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- the content route (in process) ---------------------------------------------------------------


@pytest.mark.fast
def test_content_streams_the_stored_bytes_with_their_digest(in_process_factory: Any) -> None:
    api = in_process_factory(token=TOKEN)
    png = _png()
    ref = api.client.post("/v1/media", files={"file": ("frame.png", png, "image/png")}).json()["ref"]

    got = api.client.get(f"/v1/media/{ref}/content")
    assert got.status_code == 200, got.text
    assert got.content == png
    assert got.headers["content-type"] == "image/png"
    digest = hashlib.sha256(png)
    assert got.headers["etag"] == f'"{digest.hexdigest()}"'
    assert got.headers["repr-digest"] == f"sha-256=:{base64.b64encode(digest.digest()).decode()}:"
    assert got.headers["content-length"] == str(len(png))
    assert 'filename="frame.png"' in got.headers["content-disposition"]

    again = api.client.get(f"/v1/media/{ref}/content", headers={"If-None-Match": got.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    part = api.client.get(f"/v1/media/{ref}/content", headers={"Range": "bytes=0-7"})
    assert part.status_code == 206 and part.content == png[:8]

    unknown = api.client.get(f"/v1/media/{_ref(b'never stored')}/content")
    assert unknown.status_code == 404
    assert unknown.json()["error_type"] == "NotFound" and _ref(b"never stored") in unknown.json()["error"]
    assert api.client.get("/v1/media/sha256:abc/content").status_code == 422
    anonymous = api.client.get(f"/v1/media/{ref}/content", headers={"Authorization": ""})
    assert anonymous.status_code == 401


@pytest.mark.fast
def test_the_content_route_is_in_the_openapi_document(in_process_api: Any) -> None:
    operation = in_process_api.client.get("/openapi.json").json()["paths"]["/v1/media/{ref}/content"]["get"]
    ok = operation["responses"]["200"]
    assert {"image/png", "image/jpeg", "video/mp4"} <= set(ok["content"])
    assert {"ETag", "Repr-Digest"} <= set(ok["headers"])
    for status in ("401", "404", "422"):
        schema = operation["responses"][status]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith("/ErrorBody")


@pytest.mark.fast
def test_a_store_keeps_nothing_of_bytes_that_do_not_match_their_ref(tmp_path: Path) -> None:
    import io

    from forgeflow.plugins.media import MediaDigestMismatch, MediaStore

    store = MediaStore(tmp_path / "media")
    png = _png()
    with pytest.raises(MediaDigestMismatch, match="hash to"):
        store.put_stream(io.BytesIO(png), expected_ref=_ref(png + b"x"))
    assert not store.has(_ref(png + b"x")) and not store.has(_ref(png))
    assert [p for p in (tmp_path / "media").rglob("*") if p.is_file()] == []
    assert store.put_stream(io.BytesIO(png), expected_ref=_ref(png)).ref == _ref(png)


@pytest.mark.fast
def test_the_ingest_token_opens_the_media_routes_and_nothing_else(in_process_factory: Any) -> None:
    api = in_process_factory(token=TOKEN, ingest_token=INGEST)
    worker = {"Authorization": f"Bearer {INGEST}"}
    stored = api.client.post("/v1/media", files={"file": ("frame.png", _png(), "image/png")}, headers=worker)
    assert stored.status_code == 201, stored.text
    ref = stored.json()["ref"]
    assert api.client.get(f"/v1/media/{ref}/content", headers=worker).status_code == 200
    assert api.client.get("/v1/jobs", headers=worker).status_code == 401
    assert api.client.get("/v1/pipelines", headers=worker).status_code == 401
    wrong = api.client.get(f"/v1/media/{ref}", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error_type"] == "Unauthorized"


# --- a worker host against a real API ---------------------------------------------------------------


def _worker_services(home: Path, api_url: str | None, token: str | None = INGEST, **sync_options: Any) -> Any:
    """Services as a flow run on a worker host builds them (FORGEFLOW_API_URL set), with its own home."""
    from pydantic import SecretStr

    from forgeflow.events.sinks import MemorySink
    from forgeflow.jobs.media_sync import MediaSync
    from forgeflow.jobs.stages import Services
    from forgeflow.plugins.media import MediaStore
    from forgeflow.settings import Settings

    settings = Settings(
        home=home, api_url=api_url, ingest_token=SecretStr(token) if token else None, use_engine=False, pool_size=1
    )
    services = Services.from_settings(settings, sink=MemorySink())
    if sync_options and api_url:  # the same MediaSync with other timeouts
        services.media_sync.close()
        services.media_sync = MediaSync(api_url, MediaStore(settings.media_root), token, **sync_options)
    return services


def _run_directly(services: Any, stages: list[dict[str, Any]], job_input: dict[str, Any]) -> tuple[dict, list]:
    """The stage loop in this thread (no Prefect): the same call_stage a flow run's tasks make."""
    from forgeflow.jobs.stages import JobRun, PipelineFailed, execute
    from forgeflow.pipeline import outcome
    from forgeflow.pipeline.definition import PipelineDefinition

    definition = PipelineDefinition.model_validate({"stages": stages})
    run = JobRun("remote-media", services, outcome.pending_reports(definition.stages))
    try:
        envelope = execute(run, definition, None, job_input).to_dict()
    except PipelineFailed as failed:
        envelope = failed.envelope.to_dict()
    return envelope, [e.model_dump(mode="json") for e in services.sink.events]


def _upload(api: Any, data: bytes, name: str) -> str:
    with api.client() as client:
        response = client.post("/v1/media", files={"file": (name, data)})
    assert response.status_code == 201, response.text
    return str(response.json()["ref"])


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_a_worker_host_fetches_verifies_caches_and_uploads_media(
    api_factory: Any, prefect_api_url: str, tmp_path: Path, clip: bytes
) -> None:
    from forgeflow.jobs.executor import PipelineExecutor
    from forgeflow.plugins.media import MediaStore

    api = api_factory(launch_jobs=False, token=TOKEN, ingest_token=INGEST)
    ref = _upload(api, clip, "clip.mp4")
    worker_home = tmp_path / "worker"
    assert worker_home.resolve() != Path(api.settings.home).resolve()

    services = _worker_services(worker_home, api.url)
    try:
        envelope = PipelineExecutor(services).execute({"pipeline": PROBE_AND_THUMBNAIL}, {"media": ref}, "remote-1")
        stats = services.media_sync.stats
    finally:
        services.close()
    assert envelope["ok"] is True, envelope
    result = envelope["result"]
    assert (result["media_kind"], result["frame_count"], result["width"]) == ("video", 12, 160)
    assert result["thumbnail_width"] == 80
    # fetched once (the second stage read the cached copy), verified, kept in the worker's own store
    assert (stats.downloads, stats.downloaded_bytes, stats.local_hits) == (1, len(clip), 1)
    worker_store = MediaStore(worker_home / "media")
    assert worker_store.path(ref).read_bytes() == clip
    assert worker_store.info(ref).filename == "clip.mp4"
    # the stage's own media went to the API, which now serves it by its ref
    thumb = result["thumbnail"]
    assert (stats.uploads, stats.remote_hits) == (1, 0)
    with api.client() as client:
        served = client.get(f"/v1/media/{thumb}/content")
        assert served.status_code == 200 and served.headers["content-type"] == "image/png"
        assert served.content == worker_store.path(thumb).read_bytes()
        assert _ref(served.content) == thumb
        assert client.get(f"/v1/media/{thumb}").json()["filename"] == "thumbnail.png"

    # a later job of the host: nothing downloaded (the store has it), nothing uploaded (the API has it)
    again = _worker_services(worker_home, api.url)
    try:
        second = PipelineExecutor(again).execute({"pipeline": PROBE_AND_THUMBNAIL}, {"media": ref}, "remote-2")
        stats = again.media_sync.stats
    finally:
        again.close()
    assert second["ok"] is True and second["result"] == result
    assert (stats.downloads, stats.uploads, stats.local_hits, stats.remote_hits) == (0, 0, 2, 1)


def test_an_unknown_ref_fails_the_stage_naming_the_ref_and_the_api(api_factory: Any, tmp_path: Path) -> None:
    api = api_factory(launch_jobs=False, token=TOKEN, ingest_token=INGEST)
    missing = _ref(b"never uploaded")
    services = _worker_services(tmp_path / "worker", api.url)
    try:
        envelope, events = _run_directly(services, PROBE_AND_THUMBNAIL, {"media": missing})
    finally:
        services.close()
    assert envelope["ok"] is False and envelope["stage_failed"] == 0
    assert envelope["error_type"] == "MediaNotFound"
    assert missing in envelope["error"] and api.url in envelope["error"] and "404" in envelope["error"]
    assert [s["status"] for s in envelope["stages"]] == ["failed", "skipped"]
    error = next(e for e in events if e["type"] == "pipeline_error")
    assert error["stage_index"] == 0 and error["error_type"] == "MediaNotFound" and missing in error["error"]
    assert _files(tmp_path / "worker" / "media") == []


def test_bytes_that_do_not_match_the_ref_are_refused_and_nothing_stays(
    api_factory: Any, tmp_path: Path, clip: bytes
) -> None:
    api = api_factory(launch_jobs=False, token=TOKEN, ingest_token=INGEST)
    ref = _upload(api, clip, "clip.mp4")
    api.state.media.path(ref).write_bytes(clip[:-100] + b"\x00" * 100)  # the API's copy went bad on disk
    services = _worker_services(tmp_path / "worker", api.url)
    try:
        envelope, _ = _run_directly(services, PROBE_AND_THUMBNAIL, {"media": ref})
        assert services.media_sync.stats.downloads == 0
    finally:
        services.close()
    assert envelope["ok"] is False and envelope["stage_failed"] == 0
    assert envelope["error_type"] == "MediaDigestMismatch"
    assert ref in envelope["error"] and api.url in envelope["error"] and "nothing was stored" in envelope["error"]
    assert _files(tmp_path / "worker" / "media") == []  # no blob, no sidecar, no half-written temporary file


def test_an_unreachable_api_fails_the_stage_at_once(tmp_path: Path, clip: bytes) -> None:
    from forgeflow.plugins.media import MediaStore

    ref = MediaStore(tmp_path / "elsewhere").put_bytes(clip).ref  # a ref this host has never seen
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    services = _worker_services(tmp_path / "worker", url)
    started = time.monotonic()
    try:
        envelope, _ = _run_directly(services, PROBE_AND_THUMBNAIL, {"media": ref})
    finally:
        services.close()
    assert time.monotonic() - started < 20
    assert envelope["ok"] is False and envelope["error_type"] == "MediaSyncError"
    assert ref in envelope["error"] and url in envelope["error"] and "unreachable" in envelope["error"]
    assert _files(tmp_path / "worker" / "media") == []


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A real TCP server that accepts connections and reads requests but never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    listener.close()


def test_an_api_that_never_answers_times_out_rather_than_hangs(silent_server: str, tmp_path: Path, clip: bytes) -> None:
    ref = _ref(clip)
    services = _worker_services(tmp_path / "worker", silent_server, io_timeout_s=1.0)
    started = time.monotonic()
    try:
        envelope, _ = _run_directly(services, PROBE_AND_THUMBNAIL, {"media": ref})
    finally:
        services.close()
    assert time.monotonic() - started < 15
    assert envelope["ok"] is False and envelope["error_type"] == "MediaSyncError"
    assert ref in envelope["error"] and silent_server in envelope["error"] and "no answer in time" in envelope["error"]


def test_a_worker_without_the_ingest_token_is_told_which_token_it_needs(
    api_factory: Any, tmp_path: Path, clip: bytes
) -> None:
    api = api_factory(launch_jobs=False, token=TOKEN, ingest_token=INGEST)
    ref = _upload(api, clip, "clip.mp4")
    services = _worker_services(tmp_path / "worker", api.url, token=None)
    try:
        envelope, _ = _run_directly(services, PROBE_AND_THUMBNAIL, {"media": ref})
    finally:
        services.close()
    assert envelope["ok"] is False and envelope["error_type"] == "MediaSyncError"
    assert ref in envelope["error"] and "401" in envelope["error"] and "FORGEFLOW_INGEST_TOKEN" in envelope["error"]


def test_an_upload_the_api_refuses_fails_the_stage_that_made_the_media(api_factory: Any, tmp_path: Path) -> None:
    api = api_factory(
        launch_jobs=False, token=TOKEN, ingest_token=INGEST, max_upload_bytes=64
    )  # the thumbnail is larger
    png = _png(64, 48, value=200)
    ref = api.state.media.put_bytes(png, filename="frame.png").ref  # into the API's store directly
    services = _worker_services(tmp_path / "worker", api.url)
    try:
        envelope, _ = _run_directly(services, PROBE_AND_THUMBNAIL, {"media": ref})
        stats = services.media_sync.stats
    finally:
        services.close()
    assert stats.downloads == 1 and stats.uploads == 0
    assert envelope["ok"] is False and envelope["stage_failed"] == 1
    assert envelope["error_type"] == "MediaSyncError"
    assert "413" in envelope["error"] and api.url in envelope["error"]
    assert envelope["partial_result"]["frame_count"] == 1  # the first stage's result is kept
    named = re.findall(r"sha256:[0-9a-f]{64}", envelope["error"])
    assert len(named) == 1 and named[0] != ref  # the thumbnail, which the API still lacks
    assert httpx.get(f"{api.url}/v1/media/{named[0]}", headers=api.headers, timeout=10).status_code == 404


@pytest.mark.fast
def test_without_an_api_url_nothing_is_synced(tmp_path: Path) -> None:
    from forgeflow.jobs.media_sync import MediaSync
    from forgeflow.settings import Settings

    assert MediaSync.from_settings(Settings(home=tmp_path, api_url=None)) is None
    services = _worker_services(tmp_path / "embedded", None)
    try:
        assert services.media_sync is None
    finally:
        services.close()
