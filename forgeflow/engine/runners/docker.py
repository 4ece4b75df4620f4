"""The Docker runner: one container per call, for production GPU hosts and strict isolation.

Each call starts a container of ``settings.docker_image`` (built from ``deployments/``) whose
entrypoint is the same worker module as the process runner's, in one-shot mode::

    python -m forgeflow.engine.runners.worker --plugin NAME --oneshot \
        --request /forgeflow/call/request.json --response /forgeflow/out/response.json \
        --media-out /forgeflow/out/media

The container has no network, a read-only root file system with a tmpfs on ``/tmp``, a memory
limit (the call's limit plus ``CONTAINER_OVERHEAD_MB`` for the interpreter; no swap), a pids limit,
no capabilities, and runs as the host user. The media root is mounted read-only at
``/forgeflow/home/media`` and each allowed input root read-only at its own path; media a tool stores
(``ctx.put_media``) go to a writable output folder and are added to the host's media store after
the call (their refs are content hashes, so they do not change).

Timeouts: the plugin must import within ``worker_startup_timeout_s`` (the worker touches
``/forgeflow/out/ready``), then the call has ``timeout_s``; past either the container is killed
(``TimeoutError``). ``OOMKilled`` gives ``MemoryError``; a container that exits without an answer
gives ``WorkerCrashed`` with its exit code or signal and the tail of its log. The container is always
removed (create, start inside ``try``, ``remove(force=True)`` in ``finally``).

A container costs 0.3–0.5 s to start and stop: give it a batch of work (a whole video), not a frame.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from forgeflow.engine.runners import LifecycleRecorder, Prepared, prepare, progress_relay, result_from_message
from forgeflow.engine.runners.base import CallResult, ProgressCallback, ToolCall
from forgeflow.engine.runners.worker import PROGRESS_FILE
from forgeflow.plugins.errors import PluginUnavailable, StageMemoryExceeded, StageTimeout, WorkerCrashed

log = logging.getLogger("forgeflow.runners.docker")

#: Memory a container gets on top of the call's limit (interpreter, libraries).
CONTAINER_OVERHEAD_MB = 256
PIDS_LIMIT = 512
TMPFS_SIZE = "1g"
LOG_TAIL_BYTES = 2048
CONTAINER_HOME = "/forgeflow/home"
#: How often a call's progress file is read while its tool runs.
PROGRESS_POLL_S = 0.25


class DockerRunner:
    """Runs each call in a fresh, locked-down container of the worker image."""

    name = "docker"

    def __init__(self, settings: Any, registry: Any, client: Any = None) -> None:
        self.settings = settings
        self.registry = registry
        self.lifecycle = LifecycleRecorder(registry)
        self._client = client
        self._lock = threading.Lock()
        self._gpu_runtime: bool | None = None
        self._running: set[str] = set()

    # -- public -------------------------------------------------------------------------------

    def run(self, call: ToolCall, on_progress: ProgressCallback | None = None) -> CallResult:
        prepared = prepare(self.registry, call)
        if isinstance(prepared, CallResult):
            return prepared
        self.lifecycle.running(prepared.plugin)
        try:
            result = self._run(prepared, call, on_progress)
        except Exception as exc:  # never raise for anything
            log.exception("docker runner failed on %s.%s", call.plugin, call.tool)
            result = CallResult.failure("RunnerError", f"{prepared.plugin}.{call.tool}: docker runner error: {exc}")
        self.lifecycle.finished(prepared.plugin, result)
        return result

    def close(self) -> None:
        """Kill containers still running (calls in other threads) and drop the client."""
        with self._lock:
            running = list(self._running)
            client, self._client = self._client, None
        if client is None:
            return
        for cid in running:
            try:
                client.containers.get(cid).remove(force=True)
            except Exception:
                pass
        try:
            client.close()
        except Exception:
            pass

    # -- internals ----------------------------------------------------------------------------

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                import docker

                self._client = docker.from_env(timeout=60)
            return self._client

    def gpus_available(self, client: Any) -> bool:
        if self._gpu_runtime is None:
            try:
                self._gpu_runtime = "nvidia" in (client.info().get("Runtimes") or {})
            except Exception:
                self._gpu_runtime = False
        return self._gpu_runtime

    def _environment(self) -> dict[str, str]:
        s = self.settings
        env = {
            "FORGEFLOW_HOME": CONTAINER_HOME,
            "FORGEFLOW_MEDIA_INPUT_ROOTS": json.dumps([str(p) for p in s.media_input_roots]),
            "FORGEFLOW_MAX_MEDIA_BYTES": str(s.max_media_bytes),
            "FORGEFLOW_MAX_FRAMES": str(s.max_frames),
            "FORGEFLOW_MAX_PIXELS": str(s.max_pixels),
            "FORGEFLOW_MAX_OUTPUT_BYTES": str(s.max_output_bytes),
            "FORGEFLOW_PROGRESS_INTERVAL_S": str(s.progress_interval_s),
            "PYTHONUNBUFFERED": "1",
        }
        if "FORGEFLOW_WORKER_RLIMIT_AS" in os.environ:
            env["FORGEFLOW_WORKER_RLIMIT_AS"] = os.environ["FORGEFLOW_WORKER_RLIMIT_AS"]
        return env

    def _run(self, prepared: Prepared, call: ToolCall, on_progress: ProgressCallback | None) -> CallResult:
        import docker
        from docker.errors import DockerException, ImageNotFound

        plugin, tool = prepared.plugin, prepared.tool.name
        label = f"{plugin}.{tool}"
        try:
            client = self.client()
            client.images.get(self.settings.docker_image)
        except ImageNotFound:
            return CallResult.failure(
                "RunnerError",
                f"{label}: docker image {self.settings.docker_image!r} not found; build it with deployments/build_image.sh",
            )
        except DockerException as exc:
            return CallResult.failure("RunnerError", f"{label}: no Docker engine answers: {exc}")

        limit_mb = int(call.memory_limit_mb or self.settings.stage_memory_limit_mb)
        media_root = Path(self.settings.media_root)
        media_root.mkdir(parents=True, exist_ok=True)
        scratch_parent = Path(self.settings.home) / "docker"
        scratch_parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="call-", dir=scratch_parent))
        call_dir, out_dir = scratch / "call", scratch / "out"
        (out_dir / "media").mkdir(parents=True)
        call_dir.mkdir()
        (call_dir / "request.json").write_text(
            json.dumps(
                {
                    "type": "call",
                    "tool": tool,
                    "config": call.config,
                    "inputs": call.inputs,
                    "memory_limit_mb": limit_mb,
                    "job_id": call.job_id,
                    "stage_index": call.stage_index,
                }
            )
        )
        volumes: dict[str, dict[str, str]] = {
            str(call_dir): {"bind": "/forgeflow/call", "mode": "ro"},
            str(out_dir): {"bind": "/forgeflow/out", "mode": "rw"},
            str(media_root.resolve()): {"bind": f"{CONTAINER_HOME}/media", "mode": "ro"},
        }
        for root in self.settings.media_input_roots:
            real = Path(root).expanduser().resolve()
            if real.is_dir():
                volumes.setdefault(str(real), {"bind": str(real), "mode": "ro"})
        device_requests = None
        if self.settings.docker_gpus:
            if self.gpus_available(client):
                device_requests = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
            else:
                log.warning("docker_gpus is set but the engine has no 'nvidia' runtime: running %s without GPUs", label)
        container = None
        start = time.monotonic()
        try:
            container = client.containers.create(
                self.settings.docker_image,
                command=[
                    "--plugin",
                    plugin,
                    "--oneshot",
                    "--request",
                    "/forgeflow/call/request.json",
                    "--response",
                    "/forgeflow/out/response.json",
                    "--media-out",
                    "/forgeflow/out/media",
                ],
                detach=True,
                network_disabled=True,
                read_only=True,
                tmpfs={"/tmp": f"rw,size={TMPFS_SIZE}"},
                mem_limit=f"{limit_mb + CONTAINER_OVERHEAD_MB}m",
                memswap_limit=f"{limit_mb + CONTAINER_OVERHEAD_MB}m",
                pids_limit=PIDS_LIMIT,
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                user=f"{os.getuid()}:{os.getgid()}",
                environment=self._environment(),
                volumes=volumes,
                device_requests=device_requests,
                labels={"forgeflow.plugin": plugin, "forgeflow.tool": tool, "forgeflow.job_id": call.job_id or ""},
            )
            with self._lock:
                self._running.add(container.id)
            container.start()
            outcome = self._wait(container, out_dir, call, label, start, _ProgressTail(out_dir, on_progress))
            if outcome is not None:
                return outcome
            return self._collect(container, out_dir, limit_mb, label, start)
        except DockerException as exc:
            return CallResult.failure(
                "RunnerError", f"{label}: docker error: {exc}", duration_ms=(time.monotonic() - start) * 1000.0
            )
        finally:
            if container is not None:
                with self._lock:
                    self._running.discard(container.id)
                try:
                    container.remove(force=True)
                except Exception:
                    log.warning("could not remove container %s", container.id, exc_info=True)
            shutil.rmtree(scratch, ignore_errors=True)

    def _wait(
        self, container: Any, out_dir: Path, call: ToolCall, label: str, start: float, progress: _ProgressTail
    ) -> CallResult | None:
        """Wait for start-up, then for the call (passing its progress on); a failed result on
        timeout, None when it exited."""
        import requests

        ready = out_dir / "ready"
        startup_deadline = start + float(self.settings.worker_startup_timeout_s)
        last_status = 0.0
        while not ready.exists():
            now = time.monotonic()
            if now > startup_deadline:
                container.kill()
                return CallResult.failure(
                    StageTimeout,
                    f"{label}: the container's plugin did not load within {self.settings.worker_startup_timeout_s:g} s"
                    " (worker_startup_timeout_s); container killed",
                    duration_ms=(now - start) * 1000.0,
                )
            if now - last_status > 0.25:
                container.reload()
                if container.status not in ("created", "running"):
                    return None  # exited during start-up: _collect explains why
                last_status = now
            time.sleep(0.02)
        call_start = time.monotonic()
        deadline = call_start + call.timeout_s
        while True:
            # Short waits while the tool reports progress; one wait to the deadline otherwise.
            remaining = deadline - time.monotonic()
            try:
                container.wait(timeout=max(0.01, min(remaining, PROGRESS_POLL_S) if progress.wanted else remaining))
                progress.poll()
                return None
            except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
                progress.poll()
                if time.monotonic() < deadline:
                    continue
                container.kill()
                return CallResult.failure(
                    StageTimeout,
                    f"{label} timed out after {call.timeout_s:g} s; its container was killed",
                    duration_ms=(time.monotonic() - call_start) * 1000.0,
                )

    def _collect(self, container: Any, out_dir: Path, limit_mb: int, label: str, start: float) -> CallResult:
        container.reload()
        state = container.attrs.get("State", {})
        elapsed = (time.monotonic() - start) * 1000.0
        response = out_dir / "response.json"
        if state.get("OOMKilled"):
            return CallResult.failure(
                StageMemoryExceeded,
                f"{label} exceeded its memory limit of {limit_mb} MB (the container was OOM-killed)",
                duration_ms=elapsed,
            )
        if response.exists():
            message = json.loads(response.read_text())
            if message.get("type") == "unavailable":
                return CallResult.failure(
                    PluginUnavailable,
                    f"plugin {label.split('.', maxsplit=1)[0]!r} is unavailable in the container: {message.get('reason')}",
                )
            result = result_from_message(message)
            if result.ok:
                self._import_media(out_dir / "media")
            return result
        code = state.get("ExitCode")
        if isinstance(code, int) and code > 128:
            try:
                what = f"died with {signal.Signals(code - 128).name} (signal {code - 128})"
            except ValueError:
                what = f"exited with code {code}"
        else:
            what = f"exited with code {code}"
        tail = ""
        try:
            tail = (
                container.logs(stdout=True, stderr=True, tail=200).decode("utf-8", "replace")[-LOG_TAIL_BYTES:].strip()
            )
        except Exception:
            pass
        text = f"{label}: plugin container {what} without an answer"
        if tail:
            text += f"\n--- container log (last {LOG_TAIL_BYTES} bytes) ---\n{tail}"
        return CallResult.failure(WorkerCrashed, text, duration_ms=elapsed)

    def _import_media(self, folder: Path) -> None:
        """Add media the tool stored in the container to the host's store (same refs)."""
        from forgeflow.plugins.media import MediaStore

        blobs = [p for p in folder.glob("??/*") if p.is_file() and not p.name.endswith(".json")]
        if not blobs:
            return
        store = MediaStore(self.settings.media_root)
        for blob in blobs:
            filename = None
            sidecar = blob.with_name(blob.name + ".json")
            if sidecar.exists():
                try:
                    filename = json.loads(sidecar.read_text()).get("filename")
                except ValueError:
                    pass
            store.put_file(blob, filename=filename)


class _ProgressTail:
    """Reads the progress reports the container's worker appends to ``progress.jsonl``."""

    def __init__(self, out_dir: Path, on_progress: ProgressCallback | None) -> None:
        self.path = out_dir / PROGRESS_FILE
        self.relay = progress_relay(on_progress)
        self.offset = 0

    @property
    def wanted(self) -> bool:
        return self.relay is not None

    def poll(self) -> None:
        if self.relay is None:
            return
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self.offset += len(complete)
        for line in complete.splitlines():
            try:
                update = json.loads(line)
            except ValueError:
                continue
            if isinstance(update, dict):
                self.relay(update)
