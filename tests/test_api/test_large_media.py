"""Match-sized media: uploads stream into the store and worker hosts' fetches stream and resume.

A 90-minute match is gigabytes. The upload and the fetch of a file larger than the old upload
limit (512 MiB) run against an API server in a subprocess of its own, so the test reads that
process's peak memory (VmHWM) and the fetching process's, and checks that neither grows with the
file. A fetch whose connection breaks goes through a proxy that cuts the body after a given number
of bytes: the fetch continues with ``Range`` and nothing is sent twice; a partial file that a killed
fetch left is continued the same way; an API that ignores ``Range`` is read again from the start.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, wait_http
from tests.test_api.conftest import ApiServer

TOKEN = "large-media-token"
INGEST = "large-media-ingest-token"
MIB = 1024 * 1024
OLD_UPLOAD_LIMIT = 512 * MIB
#: Peak memory a process may gain while it moves the whole file (the file is 600 MiB).
MEMORY_BOUND = 150 * MIB
MP4_HEAD = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2mp41"  # what the store recognises as a video

# An API server of its own, like `forgeflow serve` but without an engine or Prefect: media routes only.
SERVE = """
import forgeflow, sys, uvicorn
from forgeflow.api.app import create_app
from forgeflow.settings import Settings
print("forgeflow from", forgeflow.__file__, flush=True)
settings = Settings()
app = create_app(settings, prefect_api_url=None, launch_jobs=False)
uvicorn.run(app, host="127.0.0.1", port=settings.api_port, log_level="warning")
"""

# A worker host's fetch in a process of its own: its peak memory is its own.
FETCH = """
import json, sys, time
from pathlib import Path
from forgeflow.jobs.media_sync import MediaSync
from forgeflow.plugins.media import MediaStore
url, root, token, ref = sys.argv[1:5]
def peak():
    status = Path("/proc/self/status").read_text()
    return int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) * 1024
sync = MediaSync(url, MediaStore(Path(root)), token)
before = peak()
started = time.monotonic()
sync.fetch([ref])
print(json.dumps({"peak_before": before, "peak_after": peak(), "seconds": time.monotonic() - started,
                  "downloads": sync.stats.downloads, "downloaded_bytes": sync.stats.downloaded_bytes}))
"""


def write_video_like(path: Path, size: int, seed: int = 21) -> str:
    """A file of ``size`` bytes that the store takes for an MP4 (its signature, then pseudo-random
    bytes, every MiB numbered so a block out of place changes the digest); returns its ref."""
    block = random.Random(seed).randbytes(MIB)
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        for index in range(-(-size // MIB)):
            chunk = (index.to_bytes(8, "big") + block[8:])[: size - index * MIB]
            if index == 0:
                chunk = MP4_HEAD + chunk[len(MP4_HEAD) :]
            fh.write(chunk)
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def peak_memory(pid: int) -> int:
    """The peak resident memory (VmHWM) of a process so far, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen[bytes]
    home: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def api_process(tmp_path: Path) -> Iterator[ServerProcess]:
    """The API in a subprocess with the default limits (its own home, SQLite)."""
    home = tmp_path / "api-home"
    home.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "FORGEFLOW_HOME": str(home),
        "FORGEFLOW_API_PORT": str(port),
        "FORGEFLOW_API_TOKEN": TOKEN,
        "FORGEFLOW_INGEST_TOKEN": INGEST,
    }
    for name in ("FORGEFLOW_MAX_UPLOAD_BYTES", "FORGEFLOW_MAX_MEDIA_BYTES", "FORGEFLOW_DATABASE_URL"):
        env.pop(name, None)
    log = (home / "api.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", timeout=90, proc=proc)
        yield ServerProcess(url, proc, home)
    finally:
        ApiServer(url, None, proc=proc).stop()
        shutil.rmtree(home / "media", ignore_errors=True)  # gigabytes: gone now, not when pytest prunes


def test_a_file_over_the_old_upload_limit_uploads_and_fetches_without_memory_growth(
    api_process: ServerProcess, tmp_path: Path
) -> None:
    from forgeflow.plugins.media import MediaStore

    size = 600 * MIB
    assert size > OLD_UPLOAD_LIMIT
    source = tmp_path / "match.mp4"
    worker_root = tmp_path / "worker-media"
    try:
        ref = write_video_like(source, size)
        with httpx.Client(base_url=api_process.url, headers=api_process.headers, timeout=120) as client:
            # Warm the upload route (imports, first allocations) so the peak below is the file's alone.
            small = tmp_path / "small.mp4"
            write_video_like(small, 3 * MIB, seed=1)
            with small.open("rb") as fh:
                assert client.post("/v1/media", files={"file": ("small.mp4", fh)}).status_code == 201
            with small.open("rb") as fh:
                raw = client.post("/v1/media", content=fh, headers={"Content-Type": "application/octet-stream"})
                assert raw.status_code == 201, raw.text

            # A multipart upload (as the web page sends it), with the default limit.
            baseline = api_peak = peak_memory(api_process.proc.pid)
            started = time.monotonic()
            with source.open("rb") as fh:
                response = client.post("/v1/media", files={"file": ("match.mp4", fh, "video/mp4")})
            upload_s = time.monotonic() - started
            assert response.status_code == 201, response.text
            assert response.json()["ref"] == ref
            assert (response.json()["size_bytes"], response.json()["kind"]) == (size, "video")
            upload_growth = peak_memory(api_process.proc.pid) - baseline
            assert upload_growth < MEMORY_BOUND, f"the API's peak memory grew by {upload_growth} bytes"
            blob = MediaStore(api_process.home / "media").path(ref)
            assert blob.stat().st_size == size
            assert [p.name for p in (api_process.home / "media").glob(".upload-*")] == []

            # The raw body (as a worker host sends its media) streams the same way.
            baseline = peak_memory(api_process.proc.pid)
            with source.open("rb") as fh:
                raw = client.post("/v1/media", content=fh, headers={"Content-Type": "application/octet-stream"})
            assert raw.status_code == 201 and raw.json()["ref"] == ref
            raw_growth = peak_memory(api_process.proc.pid) - baseline
            assert raw_growth < MEMORY_BOUND, f"the API's peak memory grew by {raw_growth} bytes"

        # A worker host fetches it in a process of its own; the API serves it while we watch its memory.
        baseline = peak_memory(api_process.proc.pid)
        fetched = subprocess.run(
            [sys.executable, "-c", FETCH, api_process.url, str(worker_root), INGEST, ref],
            capture_output=True,
            timeout=300,
            check=False,
        )
        assert fetched.returncode == 0, fetched.stderr.decode()[-2000:]
        report = json.loads(fetched.stdout)
        serve_growth = peak_memory(api_process.proc.pid) - baseline
        fetch_growth = report["peak_after"] - report["peak_before"]
        assert fetch_growth < MEMORY_BOUND, f"the fetching process's peak memory grew by {fetch_growth} bytes"
        assert serve_growth < MEMORY_BOUND, f"the API's peak memory grew by {serve_growth} bytes serving it"
        assert (report["downloads"], report["downloaded_bytes"]) == (1, size)
        worker = MediaStore(worker_root)
        assert worker.has(ref) and worker.info(ref).size_bytes == size  # committed only once the digest matched
        assert worker.info(ref).filename == "match.mp4"
        assert not worker.partial_path(ref).exists()
        print(
            f"\n600 MiB (API peak before: {api_peak / MIB:.0f} MiB, fetcher's: {report['peak_before'] / MIB:.0f} MiB): "
            f"multipart upload {upload_s:.1f} s ({size / MIB / upload_s:.0f} MiB/s), API peak +"
            f"{upload_growth / MIB:.1f} MiB; raw upload API peak +{raw_growth / MIB:.1f} MiB; fetch "
            f"{report['seconds']:.1f} s ({size / MIB / report['seconds']:.0f} MiB/s), fetcher peak "
            f"+{fetch_growth / MIB:.1f} MiB, API peak +{serve_growth / MIB:.1f} MiB"
        )
    finally:
        source.unlink(missing_ok=True)
        shutil.rmtree(worker_root, ignore_errors=True)


# --- broken connections ----------------------------------------------------------------------------


@dataclass
class Plan:
    """What the proxy does with one request: cut the body after ``cut`` bytes (None: send it all),
    and after cutting, wait for ``hold`` before closing (a fetch that stalls until it is killed)."""

    cut: int | None = None
    hold: threading.Event | None = None


@dataclass
class Seen:
    range: str | None
    status: int
    sent: int


@dataclass
class CuttingProxy:
    """An HTTP proxy in front of the API that cuts answers where its plans say and records, for
    every request, the ``Range`` the client sent, the status and the body bytes it passed on."""

    upstream: str
    ignore_range: bool = False
    plans: list[Plan] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    url: str = ""

    @property
    def sent(self) -> int:
        return sum(s.sent for s in self.seen)


@pytest.fixture
def proxy(api_factory: Any) -> Iterator[CuttingProxy]:
    api = api_factory(launch_jobs=False, token=TOKEN, ingest_token=INGEST)
    state = CuttingProxy(api.url)
    upstream = httpx.Client(base_url=api.url, timeout=30)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            plan = state.plans.pop(0) if state.plans else Plan()
            wanted = self.headers.get("Range")
            forward = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "range", "if-range")}
            if state.ignore_range:
                forward = {k: v for k, v in forward.items() if k.lower() == "authorization"}
            with upstream.stream("GET", self.path, headers=forward) as answer:
                # Recorded before any byte goes out, counted before each is written: the client never
                # sees a byte the record lacks.
                seen = Seen(wanted, answer.status_code, 0)
                state.seen.append(seen)
                self.send_response(answer.status_code)
                for name in ("content-type", "content-length", "content-range", "etag", "content-disposition"):
                    if name in answer.headers:
                        self.send_header(name, answer.headers[name])
                self.end_headers()
                for chunk in answer.iter_raw():
                    passed = chunk if plan.cut is None else chunk[: plan.cut - seen.sent]
                    seen.sent += len(passed)
                    self.wfile.write(passed)
                    if plan.cut is not None and seen.sent >= plan.cut:
                        break
            if plan.cut is not None:
                self.wfile.flush()
                if plan.hold is not None:
                    plan.hold.wait(60)
                self.close_connection = True  # the body ends short: the client sees a broken transfer

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        for plan in state.plans:
            if plan.hold is not None:
                plan.hold.set()
        server.shutdown()
        server.server_close()
        upstream.close()


def _stored(proxy: CuttingProxy, tmp_path: Path, size: int) -> tuple[str, bytes]:
    """A video-like file of ``size`` bytes uploaded to the API behind ``proxy``: its ref and bytes."""
    path = tmp_path / "clip.mp4"
    ref = write_video_like(path, size)
    with path.open("rb") as fh:
        response = httpx.post(
            f"{proxy.upstream}/v1/media",
            files={"file": ("clip.mp4", fh)},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )
    assert response.status_code == 201 and response.json()["ref"] == ref, response.text
    return ref, path.read_bytes()


def _sync(proxy: CuttingProxy, root: Path, **options: Any) -> Any:
    from forgeflow.jobs.media_sync import MediaSync
    from forgeflow.plugins.media import MediaStore

    return MediaSync(proxy.url, MediaStore(root), INGEST, **options)


def test_a_fetch_whose_connection_breaks_resumes_with_range(proxy: CuttingProxy, tmp_path: Path) -> None:
    size = 3 * MIB + 4321
    ref, data = _stored(proxy, tmp_path, size)
    cut = MIB + 12345
    proxy.plans = [Plan(cut=cut)]
    sync = _sync(proxy, tmp_path / "worker")
    try:
        assert sync.fetch({"media": ref}) == [ref]
    finally:
        sync.close()
    assert proxy.seen == [Seen(None, 200, cut), Seen(f"bytes={cut}-", 206, size - cut)]
    assert proxy.sent == size  # nothing went twice
    assert (sync.stats.downloads, sync.stats.downloaded_bytes, sync.stats.resumes) == (1, size, 1)
    assert sync.store.path(ref).read_bytes() == data
    assert sync.store.info(ref).filename == "clip.mp4"
    assert not sync.store.partial_path(ref).exists()


def test_a_fetch_that_keeps_breaking_gives_up_and_keeps_its_bytes(proxy: CuttingProxy, tmp_path: Path) -> None:
    from forgeflow.jobs.media_sync import MediaSyncError

    ref, data = _stored(proxy, tmp_path, 2 * MIB)
    proxy.plans = [Plan(cut=100_000), Plan(cut=200_000), Plan(cut=300_000)]
    sync = _sync(proxy, tmp_path / "worker", max_resumes=2)
    try:
        with pytest.raises(MediaSyncError, match=f"{ref}.*the 600000 bytes received are kept for the next try"):
            sync.fetch({"media": ref})
    finally:
        sync.close()
    assert [s.range for s in proxy.seen] == [None, "bytes=100000-", "bytes=300000-"]
    assert not sync.store.has(ref)
    assert sync.store.partial_path(ref).read_bytes() == data[:600_000]

    again = _sync(proxy, tmp_path / "worker")  # the next try, in a later stage or job
    try:
        again.fetch({"media": ref})
    finally:
        again.close()
    assert proxy.seen[-1] == Seen("bytes=600000-", 206, len(data) - 600_000)
    assert again.store.path(ref).read_bytes() == data and not again.store.partial_path(ref).exists()


def test_the_partial_file_of_a_killed_fetch_is_resumed(proxy: CuttingProxy, tmp_path: Path) -> None:
    from forgeflow.plugins.media import MediaStore

    size = 2 * MIB
    ref, data = _stored(proxy, tmp_path, size)
    root = tmp_path / "worker"
    cut = 700_000
    stalled = threading.Event()
    proxy.plans = [Plan(cut=cut, hold=stalled)]
    fetch = subprocess.Popen(
        [sys.executable, "-c", FETCH, proxy.url, str(root), INGEST, ref],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    partial = MediaStore(root).partial_path(ref)
    try:
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size == cut):
            assert fetch.poll() is None and time.monotonic() < deadline, "the fetch never got the first bytes"
            time.sleep(0.05)
        fetch.send_signal(signal.SIGKILL)  # mid-download, its connection still open
        fetch.wait(10)
    finally:
        if fetch.poll() is None:
            fetch.kill()
            fetch.wait(10)
        stalled.set()
    assert not MediaStore(root).has(ref)

    sync = _sync(proxy, root)
    try:
        sync.fetch({"media": ref})
    finally:
        sync.close()
    assert proxy.seen[-1] == Seen(f"bytes={cut}-", 206, size - cut)
    assert sync.stats.resumes == 1 and sync.stats.downloaded_bytes == size - cut
    assert sync.store.path(ref).read_bytes() == data and not partial.exists()


def test_a_partial_file_that_is_whole_is_stored_without_fetching_again(proxy: CuttingProxy, tmp_path: Path) -> None:
    from forgeflow.plugins.media import MediaStore

    ref, data = _stored(proxy, tmp_path, MIB)
    partial = MediaStore(tmp_path / "worker").partial_path(ref)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data)  # a run killed after the last byte, before storing it
    sync = _sync(proxy, tmp_path / "worker")
    try:
        sync.fetch({"media": ref})
    finally:
        sync.close()
    assert [(s.range, s.status) for s in proxy.seen] == [(f"bytes={len(data)}-", 416)]
    assert sync.stats.downloaded_bytes == 0
    assert sync.store.path(ref).read_bytes() == data and not partial.exists()


def test_a_partial_file_with_wrong_bytes_is_refused_and_dropped(proxy: CuttingProxy, tmp_path: Path) -> None:
    from forgeflow.plugins.media import MediaDigestMismatch, MediaStore

    ref, data = _stored(proxy, tmp_path, MIB)
    partial = MediaStore(tmp_path / "worker").partial_path(ref)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\x00" * 1000)  # not what the ref hashes: the final digest check catches it
    sync = _sync(proxy, tmp_path / "worker")
    try:
        with pytest.raises(MediaDigestMismatch, match="nothing was stored"):
            sync.fetch({"media": ref})
        assert not sync.store.has(ref) and not partial.exists()
        sync.fetch({"media": ref})  # the next try starts from byte 0
    finally:
        sync.close()
    assert [s.range for s in proxy.seen] == ["bytes=1000-", None]
    assert sync.store.path(ref).read_bytes() == data


def test_an_api_that_ignores_range_is_read_again_from_the_start(proxy: CuttingProxy, tmp_path: Path) -> None:
    size = 2 * MIB + 17
    ref, data = _stored(proxy, tmp_path, size)
    proxy.ignore_range = True
    cut = 500_000
    proxy.plans = [Plan(cut=cut)]
    sync = _sync(proxy, tmp_path / "worker")
    try:
        sync.fetch({"media": ref})
    finally:
        sync.close()
    assert proxy.seen == [Seen(None, 200, cut), Seen(f"bytes={cut}-", 200, size)]
    assert (sync.stats.resumes, sync.stats.downloaded_bytes) == (0, cut + size)
    assert sync.store.path(ref).read_bytes() == data and not sync.store.partial_path(ref).exists()


# --- the upload route's streaming multipart parser (in process) -------------------------------------


@pytest.mark.fast
def test_a_multipart_upload_takes_the_file_field_and_refuses_a_cut_body(in_process_factory: Any) -> None:
    api = in_process_factory(max_upload_bytes=MIB)
    client = api.client
    video = MP4_HEAD + bytes(range(256)) * 100
    ref = "sha256:" + hashlib.sha256(video).hexdigest()

    mixed = client.post("/v1/media", data={"note": "kick-off"}, files={"file": ("first-half.mp4", video)})
    assert mixed.status_code == 201, mixed.text
    assert (mixed.json()["ref"], mixed.json()["filename"]) == (ref, "first-half.mp4")

    boundary = "cut-here"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="b.mp4"\r\n'
        "Content-Type: video/mp4\r\n\r\n"
    ).encode()
    other = MP4_HEAD + b"\x01" * 5000
    cut = client.post(
        "/v1/media",
        content=head + other[:3000],  # the client went away mid-file: no closing boundary
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert cut.status_code == 422 and cut.json()["field"] == "file", cut.text
    assert "ended before the file did" in cut.json()["error"]
    two = client.post(
        "/v1/media",
        content=head + other + b"\r\n" + head + other + f"\r\n--{boundary}--\r\n".encode(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert two.status_code == 422 and "more than one file" in two.json()["error"]
    no_boundary = client.post("/v1/media", content=b"x", headers={"Content-Type": "multipart/form-data"})
    assert no_boundary.status_code == 422 and "boundary" in no_boundary.json()["error"]
    too_big = client.post("/v1/media", files={"file": ("big.mp4", MP4_HEAD + b"\x00" * MIB)})
    assert too_big.status_code == 413 and "FORGEFLOW_MAX_UPLOAD_BYTES" in too_big.json()["error"]
    # Only the first upload is in the store; nothing half-written is left anywhere.
    media = Path(api.settings.home) / "media"
    assert sorted(p.name for p in media.rglob("*") if p.is_file()) == sorted(
        [ref.removeprefix("sha256:"), ref.removeprefix("sha256:") + ".json"]
    )


@pytest.mark.fast
def test_the_default_limits_fit_a_match() -> None:
    from forgeflow.settings import Settings

    settings = Settings()
    whole_1080p_match = 10 * 1000**3  # 90 minutes at ~15 Mbit/s (720p: 1-3 GB)
    assert settings.max_upload_bytes >= whole_1080p_match
    assert settings.max_media_bytes >= settings.max_upload_bytes  # what is uploaded can be read


def test_two_fetches_of_one_ref_on_one_host_take_turns(proxy: CuttingProxy, tmp_path: Path) -> None:
    """Two flow runs of a host (two MediaSyncs on one store) never append to the same partial file:
    the second waits for the first's lock, then finds the ref stored and fetches nothing."""
    ref, data = _stored(proxy, tmp_path, 2 * MIB)
    stalled = threading.Event()
    proxy.plans = [Plan(cut=300_000, hold=stalled)]
    first, second = _sync(proxy, tmp_path / "worker"), _sync(proxy, tmp_path / "worker")
    errors: list[BaseException] = []

    def fetch(sync: Any) -> None:
        try:
            sync.fetch({"media": ref})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fetch, args=(first,))]
    threads[0].start()
    partial = first.store.partial_path(ref)
    deadline = time.monotonic() + 30
    while not (partial.exists() and partial.stat().st_size == 300_000):
        assert time.monotonic() < deadline, "the first fetch never got its first bytes"
        time.sleep(0.02)
    threads.append(threading.Thread(target=fetch, args=(second,)))
    threads[1].start()
    time.sleep(0.5)  # the second is waiting for the lock now, not fetching
    assert len(proxy.seen) == 1
    stalled.set()  # the first one's connection breaks; it resumes and stores the file
    for thread in threads:
        thread.join(30)
    first.close()
    second.close()
    assert errors == []
    assert [s.range for s in proxy.seen] == [None, "bytes=300000-"]
    assert (first.stats.downloads, first.stats.resumes) == (1, 1)
    assert (second.stats.downloads, second.stats.local_hits) == (0, 1)
    assert first.store.path(ref).read_bytes() == data and not partial.exists()
