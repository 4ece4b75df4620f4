"""The Docker runner: one locked-down container per call. Needs a Docker engine and the worker image
(``deployments/build_image.sh``); skips only when no engine answers."""

from __future__ import annotations

import time

import pytest

from ._helpers import call

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def docker_client():
    try:
        import docker

        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as exc:
        pytest.skip(f"no Docker engine answers: {exc}")
    yield client
    client.close()


@pytest.fixture
def docker_runner(make_runner, docker_client, monkeypatch):
    """A docker runner that records the keyword arguments of every container it creates."""
    from docker.models.containers import ContainerCollection

    runner = make_runner("docker")
    runner.created = []
    real_create = ContainerCollection.create

    def create(self, *args, **kwargs):
        container = real_create(self, *args, **kwargs)
        runner.created.append((container.id, kwargs))
        return container

    monkeypatch.setattr(ContainerCollection, "create", create)
    return runner


def leftover_containers(client, ids):
    # ignore_removed: a container of a test in another xdist worker may go between list and inspect
    existing = {c.id for c in client.containers.list(all=True, ignore_removed=True)}
    return [i for i in ids if i in existing]


def test_docker_call_succeeds_in_a_locked_down_container(docker_runner, docker_client):
    result = docker_runner.run(call("numbers", config={"start": 2}, inputs={"count": 3}))
    assert result.ok, result
    assert result.outputs == {"numbers": [2, 3, 4]}
    assert result.result_size_bytes == len(b'{"numbers":[2,3,4]}')
    assert result.peak_memory_mb is not None
    ((cid, kwargs),) = docker_runner.created
    assert kwargs["network_disabled"] is True
    assert kwargs["read_only"] is True
    assert "/tmp" in kwargs["tmpfs"]
    assert kwargs["mem_limit"].endswith("m") and kwargs["pids_limit"] > 0
    assert kwargs["cap_drop"] == ["ALL"]
    assert kwargs["device_requests"] is None
    assert any(v["mode"] == "ro" and v["bind"].endswith("/media") for v in kwargs["volumes"].values())
    assert leftover_containers(docker_client, [cid]) == []


def test_docker_failures_are_typed_and_containers_removed(docker_runner, docker_client):
    failed = docker_runner.run(call("fail", config={"message": "in a box"}))
    assert (failed.error_type, failed.error) == ("RuntimeError", "in a box")
    assert "RuntimeError: in a box" in failed.traceback

    crashed = docker_runner.run(call("segfault"))
    assert crashed.error_type == "WorkerCrashed"
    assert "SIGSEGV" in crashed.error and "Segmentation fault" in crashed.error

    exited = docker_runner.run(call("hard_exit", config={"code": 5}))
    assert exited.error_type == "WorkerCrashed" and "exited with code 5" in exited.error

    memory = docker_runner.run(call("allocate", config={"megabytes": 2048}, memory_limit_mb=128))
    assert memory.error_type == "MemoryError" and "128 MB" in memory.error

    spam = docker_runner.run(call("spam_stdout", config={"lines": 2000}))
    assert spam.ok and spam.outputs == {"lines": 2000}

    assert docker_runner.run(call("noop")).ok
    assert leftover_containers(docker_client, [cid for cid, _ in docker_runner.created]) == []


def test_docker_timeout_kills_the_container(docker_runner, docker_client):
    started = time.monotonic()
    result = docker_runner.run(call("hang", timeout_s=1.5))
    elapsed = time.monotonic() - started
    assert result.error_type == "TimeoutError"
    assert "timed out after 1.5 s" in result.error
    assert 1.5 <= result.duration_ms / 1000 < 2.5
    assert elapsed < 1.5 + 10  # container start-up and removal on a busy 2-core machine
    assert leftover_containers(docker_client, [cid for cid, _ in docker_runner.created]) == []


def test_docker_oom_kill_is_memory_error(make_runner, docker_client, monkeypatch):
    """Without the worker's RLIMIT_AS, the container's cgroup limit OOM-kills it: still MemoryError."""
    monkeypatch.setenv("FORGEFLOW_WORKER_RLIMIT_AS", "off")
    runner = make_runner("docker")
    result = runner.run(call("allocate", config={"megabytes": 4096}, memory_limit_mb=128))
    assert result.error_type == "MemoryError"
    assert "OOM-killed" in result.error and "128 MB" in result.error


def test_docker_reads_media_from_the_read_only_store(docker_runner, settings, tmp_path):
    import cv2
    import numpy as np

    from forgeflow.plugins import MediaStore

    image = tmp_path / "frame.png"
    cv2.imwrite(str(image), np.zeros((10, 20, 3), dtype=np.uint8))
    ref = MediaStore(settings.media_root).put_file(image).ref
    result = docker_runner.run(call("probe_media", inputs={"media": ref}))
    assert result.ok, result
    assert result.outputs == {"media_kind": "image", "frame_count": 1, "width": 20, "height": 10}


def test_docker_gpus_requested_only_with_the_nvidia_runtime(make_runner, docker_client):
    runner = make_runner("docker", docker_gpus=True)
    has_nvidia = "nvidia" in (docker_client.info().get("Runtimes") or {})
    assert runner.gpus_available(runner.client()) is has_nvidia
    if not has_nvidia:  # falls back to a CPU container rather than failing at start
        assert runner.run(call("noop")).ok


def test_docker_bad_calls_start_no_container(docker_runner):
    assert docker_runner.run(call("nope")).error_type == "UnknownTool"
    assert docker_runner.run(call("numbers", inputs={"count": "x"})).error_type == "InputError"
    assert docker_runner.created == []


def test_a_tools_progress_leaves_the_container_while_it_runs(make_runner, docker_client):
    runner = make_runner("docker", progress_interval_s=0)
    updates: list[tuple[float, float | None, str | None, float]] = []
    started = time.monotonic()
    result = runner.run(
        call("steps", config={"steps": 4, "delay_s": 0.4}),
        lambda u: updates.append((u.done, u.total, u.message, time.monotonic())),
    )
    ended = time.monotonic()
    assert result.ok, result
    assert [u[:3] for u in updates] == [(i, 4, f"step {i}") for i in range(1, 5)]
    assert updates[0][3] < ended - 0.8 and started < updates[0][3]  # streamed while running, not after
