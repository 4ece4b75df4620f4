"""The Docker runner: warm, locked-down containers per plugin, for GPU hosts and strict isolation.

It is the process runner (:mod:`.process`) whose workers are containers: the same pools
(``pool_size``, idle-memory LRU, ``reuse_workers``), timeouts, cancel, crash reports and progress,
and the same worker protocol, spoken over the container's stdin/stdout. Each worker is a container
of ``settings.docker_image`` (built from ``deployments/``) whose entrypoint is the worker module::

    python -m forgeflow.engine.runners.worker --plugin NAME --media-out /forgeflow/out/media

created with the Docker SDK and attached with ``docker start --attach --interactive ID`` (the
docker CLI; its process is the worker's process: its stdin/stdout are the protocol pipes, its
stderr the worker log ``logs_dir/workers/<plugin>.docker.log``). A warm container serves call after
call, so a plugin's imports and models load once per container, not once per stage.

Every container has no network, a read-only root file system with a tmpfs on ``/tmp``, a memory
limit (the call's limit plus ``CONTAINER_OVERHEAD_MB`` for the interpreter; no swap), a pids limit,
no capabilities, ``no-new-privileges``, and runs as the host user. The media root is mounted
read-only at ``/forgeflow/home/media`` and each allowed input root read-only at its own path; media
a tool stores (``ctx.put_media``) go to the container's writable output folder and are added to the
host's media store after each call (their refs are content hashes, so they do not change).

Per call:

* **memory limit**: a container serves only calls with its own memory limit (and GPU request): a
  call with another limit gets a new container (an idle container of another limit is stopped when
  the plugin's pool is full). Within a call the worker's ``RLIMIT_AS`` raises ``MemoryError``
  inside the plugin; past the cgroup limit the kernel OOM-kills the container: ``MemoryError`` too
  (``OOM-killed`` in the message);
* **timeout**: past ``timeout_s`` the container is removed (``TimeoutError``); the next call gets a
  fresh one. A container that exits without an answer gives ``WorkerCrashed`` with its exit code or
  signal and the tail of its log; cancelling a job removes the container serving it;
* **GPU**: a call whose config asks for ``device`` ``cuda``/``cuda:N`` gets all GPUs
  (``device_requests``) when the engine has the ``nvidia`` runtime, and ``DeviceUnavailable``
  without starting anything when it has not; ``auto`` (and ``docker_gpus=True``) get the GPUs where
  there are some and a CPU container elsewhere.

A container is always removed: when its worker is discarded (after its stdin closes and it exits),
killed (timeout, crash, cancel), or when the runner closes. Starting one costs about a second
(container start plus the interpreter); a warm call costs about what a warm process call costs (see
BENCHMARKS.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from forgeflow.engine.runners import Prepared
from forgeflow.engine.runners.base import CallResult, PoolStatus, ProgressCallback, ToolCall
from forgeflow.engine.runners.process import ProcessRunner
from forgeflow.engine.runners.worker_log import worker_log_path
from forgeflow.engine.runners.worker_process import Worker
from forgeflow.plugins.errors import DeviceUnavailable

if TYPE_CHECKING:
    from collections.abc import Mapping

    from docker import DockerClient
    from docker.models.containers import Container
    from pydantic import JsonValue

    from forgeflow.canonical import JsonObject
    from forgeflow.plugins.registry import PluginRegistry
    from forgeflow.settings import Settings

log = logging.getLogger("forgeflow.runners.docker")

#: Memory a container gets on top of the call's limit (interpreter, libraries).
CONTAINER_OVERHEAD_MB = 256
PIDS_LIMIT = 512
TMPFS_SIZE = "1g"
CONTAINER_HOME = "/forgeflow/home"
#: The container's writable folder (media a tool stores go to ``media/`` in it).
CONTAINER_OUT = "/forgeflow/out"
#: How long a crashed container's attach process gets to report its exit.
EXIT_WAIT_S = 5.0


@dataclass(frozen=True)
class ContainerKey:
    """What a warm container was created with, besides its plugin: it serves only calls that want
    the same."""

    memory_limit_mb: int
    gpus: bool


def wants_device(config: Mapping[str, JsonValue]) -> str:
    """The ``device`` a call's config asks for (``cpu``, ``auto``, ``cuda``, ``cuda:N``; ``""`` when none)."""
    return str(config.get("device") or "").strip().lower()


class ContainerWorker(Worker):
    """A worker whose process is ``docker start --attach --interactive`` of its container."""

    noun = "plugin container"
    killed_what = "its container was killed"
    watch_memory = False  # the container's memory cgroup enforces the limit (OOM kill)

    def __init__(
        self,
        plugin: str,
        proc: subprocess.Popen[bytes],
        log_path: Path,
        key: ContainerKey,
        container: Container,
        scratch: Path,
    ) -> None:
        super().__init__(plugin, proc, log_path, key)
        self.container = container
        self.container_id: str = container.id
        self.scratch = scratch
        self.media_dir = scratch / "media"
        self.state: JsonObject = {}  # the container's final ``State`` (docker inspect), once removed
        self.on_removed: Callable[[ContainerWorker], None] | None = None
        self._removed = False
        self._remove_lock = threading.Lock()
        self._rss_looked_up = False

    def kill(self) -> int | None:
        """Remove the container (kept: its final state), then reap the attach process."""
        self.remove_container()
        rc = super().kill()
        shutil.rmtree(self.scratch, ignore_errors=True)
        return rc

    def remove_container(self) -> None:
        with self._remove_lock:
            if self._removed:
                return
            self._removed = True
            try:
                self.container.reload()
                self.state = dict(self.container.attrs.get("State") or {})
            except Exception:  # already gone
                pass
            try:
                self.container.remove(force=True)
            except Exception as exc:
                if "404" not in str(exc) and "No such container" not in str(exc):
                    log.warning("could not remove container %s: %s", self.container_id[:12], exc)
            if self.on_removed is not None:
                self.on_removed(self)

    def exit_description(self, returncode: int | None) -> str:
        if self.state.get("OOMKilled"):
            return "was OOM-killed at its memory cgroup limit"
        exit_code = self.state.get("ExitCode")
        code = returncode
        if self.state.get("Status") in ("exited", "dead"):
            code = exit_code if isinstance(exit_code, int) else None
        if code is None:
            return "stopped answering"
        if code > 128:
            try:
                return f"died with {signal.Signals(code - 128).name} (signal {code - 128})"
            except ValueError:
                pass
        return f"exited with code {code}"

    def out_of_memory(self) -> bool:
        return bool(self.state.get("OOMKilled"))

    def stored_media(self) -> bool:
        """Whether the last call stored media (its folder is not empty)."""
        try:
            with os.scandir(self.media_dir) as entries:
                return any(True for _ in entries)
        except OSError:
            return False

    def clear_media(self) -> None:
        """Empty the folder of media the last call stored (they are in the host store now)."""
        for entry in self.media_dir.glob("*"):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)

    def group_rss(self) -> int:
        """Resident bytes of the container's processes (seen from the host), 0 where they are not
        visible (a remote or rootless engine)."""
        if self._ps is None and not self._rss_looked_up:
            self._rss_looked_up = True
            try:
                import psutil

                self.container.reload()
                pid = int(self.container.attrs["State"]["Pid"])
                if pid > 0:
                    self._ps = psutil.Process(pid)
            except Exception:
                return 0
        if self._ps is None:
            return 0
        return super().group_rss()


class DockerRunner(ProcessRunner):
    """The process runner with warm, locked-down containers as its workers (see the module docstring)."""

    name = "docker"

    def __init__(self, settings: Settings, registry: PluginRegistry, client: DockerClient | None = None) -> None:
        super().__init__(settings, registry)
        self._client = client
        self._client_lock = threading.Lock()
        self._gpu_runtime: bool | None = None
        self._containers: set[ContainerWorker] = set()  # every container not yet removed

    # -- public -------------------------------------------------------------------------------

    def close(self) -> None:
        """Remove every container (idle, busy or starting) and drop the client."""
        super().close()
        with self._client_lock:
            left = list(self._containers)
        for worker in left:
            worker.kill()
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:
                pass

    def client(self) -> DockerClient:
        with self._client_lock:
            if self._client is None:
                import docker

                self._client = docker.from_env(timeout=60)
                self._remove_orphans(self._client)
            return self._client

    @staticmethod
    def _remove_orphans(client: DockerClient) -> None:
        """Remove containers that a docker runner of this host left behind when its process was
        killed (SIGKILL runs no cleanup; its containers stopped when their stdin closed)."""
        from forgeflow.processes import pid_alive

        try:
            found = client.containers.list(
                all=True, ignore_removed=True, filters={"label": [f"forgeflow.owner_host={socket.gethostname()}"]}
            )
        except Exception:
            return
        for container in found:
            try:
                owner = int(container.labels.get("forgeflow.owner_pid", "0"))
            except ValueError:
                continue
            if owner > 0 and not pid_alive(owner):
                log.info("removing container %s left by process %s", container.id[:12], owner)
                try:
                    container.remove(force=True)
                except Exception:
                    pass

    def gpus_available(self, client: DockerClient) -> bool:
        """Whether the engine has the ``nvidia`` runtime (asked once)."""
        if self._gpu_runtime is None:
            try:
                self._gpu_runtime = "nvidia" in (client.info().get("Runtimes") or {})
            except Exception:
                self._gpu_runtime = False
        return self._gpu_runtime

    def container_ids(self, plugin: str | None = None) -> list[str]:
        """Ids of live containers (all, or of one plugin): for health checks and tests."""
        with self._lock:
            return sorted(
                w.container_id for w in self._all if isinstance(w, ContainerWorker) and plugin in (None, w.plugin)
            )

    def status(self) -> PoolStatus:
        status = super().status()
        with self._lock:
            ids = {w.pid: w.container_id[:12] for w in self._all if isinstance(w, ContainerWorker)}
        for row in status["workers"]:
            row["container"] = ids.get(row["pid"])
        return status

    # -- what a container is --------------------------------------------------------------------

    def _worker_key(self, prepared: Prepared, call: ToolCall) -> ContainerKey | CallResult:
        gpus = self._gpus_for(call.config, f"{prepared.plugin}.{prepared.tool.name}")
        if isinstance(gpus, CallResult):
            return gpus
        return ContainerKey(int(call.memory_limit_mb or self.settings.stage_memory_limit_mb), gpus)

    def _default_key(self, plugin: str) -> ContainerKey:
        gpus = self._gpus_for({}, plugin)
        return ContainerKey(int(self.settings.stage_memory_limit_mb), gpus is True)

    def _gpus_for(self, config: Mapping[str, JsonValue], label: str) -> bool | CallResult:
        """Whether a call with ``config`` gets the GPUs; DeviceUnavailable when it needs them and the
        engine has no ``nvidia`` runtime."""
        from docker.errors import DockerException

        device = wants_device(config)
        needs = device == "cuda" or device.startswith("cuda:")
        if not (needs or device == "auto" or self.settings.docker_gpus):
            return False
        try:
            available = self.gpus_available(self.client())
        except DockerException as exc:
            return CallResult.failure("RunnerError", f"{label}: no Docker engine answers: {exc}")
        if available:
            return True
        if needs:
            return CallResult.failure(
                DeviceUnavailable,
                f"{label}: config asks for device {device!r}, but the Docker engine has no 'nvidia' runtime "
                "(NVIDIA Container Toolkit), so its containers cannot use a GPU; use device 'cpu' or 'auto', "
                "or another runner for this stage",
            )
        if self.settings.docker_gpus and device != "auto":
            log.warning("docker_gpus is set but the engine has no 'nvidia' runtime: running %s without GPUs", label)
        return False

    def _log_path(self, plugin: str) -> Path:
        return worker_log_path(self.settings.logs_dir, f"{plugin}.docker")

    def _environment(self) -> dict[str, str]:
        s = self.settings
        env = {
            "FORGEFLOW_HOME": CONTAINER_HOME,
            "FORGEFLOW_MEDIA_INPUT_ROOTS": json.dumps([str(p) for p in s.media_input_roots]),
            "FORGEFLOW_MAX_MEDIA_BYTES": str(s.max_media_bytes),
            "FORGEFLOW_MAX_PIXELS": str(s.max_pixels),
            "FORGEFLOW_MAX_OUTPUT_BYTES": str(s.max_output_bytes),
            "FORGEFLOW_FRAME_CHUNK_FRAMES": str(s.frame_chunk_frames),
            "FORGEFLOW_PROGRESS_INTERVAL_S": str(s.progress_interval_s),
            "PYTHONUNBUFFERED": "1",
        }
        if s.max_frames is not None:
            env["FORGEFLOW_MAX_FRAMES"] = str(s.max_frames)
        if "FORGEFLOW_WORKER_RLIMIT_AS" in os.environ:
            env["FORGEFLOW_WORKER_RLIMIT_AS"] = os.environ["FORGEFLOW_WORKER_RLIMIT_AS"]
        return env

    def _launch(self, plugin: str, key: object, log_path: Path) -> Worker:
        import docker
        from docker.errors import DockerException, ImageNotFound

        assert isinstance(key, ContainerKey)
        cli = shutil.which("docker")
        if cli is None:
            raise RuntimeError("the docker CLI is not installed (the runner attaches to containers with it)")
        try:
            client = self.client()
            client.images.get(self.settings.docker_image)
        except ImageNotFound:
            raise RuntimeError(
                f"docker image {self.settings.docker_image!r} not found; build it with deployments/build_image.sh"
            ) from None
        except DockerException as exc:
            raise RuntimeError(f"no Docker engine answers: {exc}") from None
        media_root = Path(self.settings.media_root)
        media_root.mkdir(parents=True, exist_ok=True)
        scratch_parent = Path(self.settings.home) / "docker"
        scratch_parent.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in plugin)
        scratch = Path(tempfile.mkdtemp(prefix=f"{safe}-", dir=scratch_parent))
        (scratch / "media").mkdir()
        volumes: dict[str, dict[str, str]] = {
            str(scratch): {"bind": CONTAINER_OUT, "mode": "rw"},
            str(media_root.resolve()): {"bind": f"{CONTAINER_HOME}/media", "mode": "ro"},
        }
        for root in self.settings.media_input_roots:
            real = Path(root).expanduser().resolve()
            if real.is_dir():
                volumes.setdefault(str(real), {"bind": str(real), "mode": "ro"})
        device_requests = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])] if key.gpus else None
        memory = f"{key.memory_limit_mb + CONTAINER_OVERHEAD_MB}m"
        container = None
        try:
            container = client.containers.create(
                self.settings.docker_image,
                command=["--plugin", plugin, "--media-out", f"{CONTAINER_OUT}/media"],
                stdin_open=True,
                detach=True,
                network_disabled=True,
                network_mode="none",
                read_only=True,
                tmpfs={"/tmp": f"rw,size={TMPFS_SIZE}"},
                mem_limit=memory,
                memswap_limit=memory,
                pids_limit=PIDS_LIMIT,
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                user=f"{os.getuid()}:{os.getgid()}",
                environment=self._environment(),
                volumes=volumes,
                device_requests=device_requests,
                log_config=docker.types.LogConfig(type="none"),  # its stderr goes to the worker log
                labels={
                    "forgeflow.runner": "docker",
                    "forgeflow.plugin": plugin,
                    "forgeflow.memory_limit_mb": str(key.memory_limit_mb),
                    "forgeflow.owner_pid": str(os.getpid()),
                    "forgeflow.owner_host": socket.gethostname(),
                },
            )

            def attach() -> subprocess.Popen[bytes]:
                with log_path.open("ab") as log_file:
                    return subprocess.Popen(
                        [cli, "start", "--attach", "--interactive", container.id],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=log_file,
                        start_new_session=True,
                        close_fds=True,
                    )

            proc = self._spawner.submit(attach).result()
        except BaseException:
            if container is not None:
                try:
                    container.remove(force=True)
                except Exception:
                    pass
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        worker = ContainerWorker(plugin, proc, log_path, key, container, scratch)
        worker.exit_wait_s = EXIT_WAIT_S
        worker.on_removed = self._removed
        with self._client_lock:
            self._containers.add(worker)
        return worker

    def _removed(self, worker: ContainerWorker) -> None:
        with self._client_lock:
            self._containers.discard(worker)

    def _call(
        self, worker: Worker, prepared: Prepared, call: ToolCall, on_progress: ProgressCallback | None
    ) -> tuple[CallResult, bool]:
        result, reusable = super()._call(worker, prepared, call, on_progress)
        assert isinstance(worker, ContainerWorker)
        try:
            if worker.stored_media():
                if result.ok:
                    self._import_media(worker.media_dir)
                worker.clear_media()
        except Exception as exc:
            label = f"{prepared.plugin}.{prepared.tool.name}"
            result = CallResult.failure(
                "RunnerError", f"{label}: could not import the media the call stored: {exc}", result.duration_ms
            )
        return result, reusable

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
