"""The Docker runner: warm, locked-down containers per plugin. Needs a Docker engine and the worker
image (``deployments/build_image.sh``); skips only when no engine answers."""

from __future__ import annotations

import os
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


def created_ids(runner):
    return [cid for cid, _ in runner.created]


def test_docker_call_succeeds_in_a_locked_down_container(docker_runner, docker_client, settings):
    from forgeflow.engine.runners.docker import CONTAINER_OVERHEAD_MB, PIDS_LIMIT

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
    # what the engine runs the warm container with, as dockerd reports it
    container = docker_client.containers.get(cid)
    assert container.status == "running"
    host = container.attrs["HostConfig"]
    assert host["NetworkMode"] == "none" and host["ReadonlyRootfs"] is True and "/tmp" in host["Tmpfs"]
    limit = (settings.stage_memory_limit_mb + CONTAINER_OVERHEAD_MB) * 2**20
    assert host["Memory"] == host["MemorySwap"] == limit  # no swap
    assert host["PidsLimit"] == PIDS_LIMIT and host["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in host["SecurityOpt"]
    assert container.attrs["Config"]["User"] == f"{os.getuid()}:{os.getgid()}"
    mounts = {m["Destination"]: m["RW"] for m in container.attrs["Mounts"]}
    assert mounts["/forgeflow/home/media"] is False and mounts["/forgeflow/out"] is True
    assert docker_runner.container_ids() == [cid]  # warm: it waits for the next call
    docker_runner.close()
    assert leftover_containers(docker_client, [cid]) == []


def test_docker_failures_are_typed_and_containers_removed(docker_runner, docker_client):
    def only_live_containers_left():
        return sorted(leftover_containers(docker_client, created_ids(docker_runner))) == docker_runner.container_ids()

    failed = docker_runner.run(call("fail", config={"message": "in a box"}))
    assert (failed.error_type, failed.error) == ("RuntimeError", "in a box")
    assert "RuntimeError: in a box" in failed.traceback
    assert len(docker_runner.container_ids()) == 1  # a plugin's exception leaves the container warm

    crashed = docker_runner.run(call("segfault"))
    assert crashed.error_type == "WorkerCrashed"
    assert "SIGSEGV" in crashed.error and "Segmentation fault" in crashed.error
    assert docker_runner.container_ids() == [] and only_live_containers_left()  # removed at once

    exited = docker_runner.run(call("hard_exit", config={"code": 5}))
    assert exited.error_type == "WorkerCrashed" and "exited with code 5" in exited.error
    assert "plugin container" in exited.error
    assert docker_runner.container_ids() == [] and only_live_containers_left()

    memory = docker_runner.run(call("allocate", config={"megabytes": 2048}, memory_limit_mb=128))
    assert memory.error_type == "MemoryError" and "128 MB" in memory.error
    assert only_live_containers_left()

    spam = docker_runner.run(call("spam_stdout", config={"lines": 2000}))
    assert spam.ok and spam.outputs == {"lines": 2000}

    assert docker_runner.run(call("noop")).ok
    # fail + segfault in the first container; hard_exit in a fresh one; allocate in its own (128 MB,
    # left after its MemoryError); spam + noop in a fresh default one
    assert len(created_ids(docker_runner)) == 4
    docker_runner.close()
    assert leftover_containers(docker_client, created_ids(docker_runner)) == []


def test_docker_timeout_kills_the_container(docker_runner, docker_client):
    started = time.monotonic()
    result = docker_runner.run(call("hang", timeout_s=1.5))
    elapsed = time.monotonic() - started
    assert result.error_type == "TimeoutError"
    assert "timed out after 1.5 s" in result.error
    assert 1.5 <= result.duration_ms / 1000 < 2.5
    assert elapsed < 1.5 + 10  # container start-up and removal on a busy 2-core machine
    (killed,) = created_ids(docker_runner)
    assert leftover_containers(docker_client, [killed]) == []  # removed by the timeout, not at close
    assert docker_runner.container_ids() == []
    after = docker_runner.run(call("numbers", inputs={"count": 2}))
    assert after.ok and after.outputs == {"numbers": [0, 1]}
    (_, fresh) = created_ids(docker_runner)
    assert docker_runner.container_ids() == [fresh]


def test_docker_oom_kill_is_memory_error(make_runner, docker_client, monkeypatch):
    """Without the worker's RLIMIT_AS, the container's cgroup limit OOM-kills it: still MemoryError."""
    monkeypatch.setenv("FORGEFLOW_WORKER_RLIMIT_AS", "off")
    runner = make_runner("docker")
    result = runner.run(call("allocate", config={"megabytes": 4096}, memory_limit_mb=128))
    assert result.error_type == "MemoryError"
    assert "OOM-killed" in result.error and "128 MB" in result.error
    assert runner.container_ids() == []  # the killed container is gone; the next call gets a fresh one
    assert runner.run(call("noop", memory_limit_mb=128)).ok
    assert len(runner.container_ids()) == 1


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


def test_docker_device_cuda_without_the_nvidia_runtime_is_device_unavailable(docker_runner, docker_client):
    has_nvidia = "nvidia" in (docker_client.info().get("Runtimes") or {})
    result = docker_runner.run(call("numbers", config={"device": "cuda"}, inputs={"count": 1}))
    if has_nvidia:  # a GPU host: the call gets the GPUs
        assert result.ok, result
        ((_, kwargs),) = docker_runner.created
        assert kwargs["device_requests"][0]["Capabilities"] == [["gpu"]]
        return
    assert result.error_type == "DeviceUnavailable"
    assert "'cuda'" in result.error and "nvidia" in result.error
    assert docker_runner.created == []  # refused before anything started
    cpu = docker_runner.run(call("numbers", config={"device": "cpu"}, inputs={"count": 1}))
    assert cpu.ok and docker_runner.created[0][1]["device_requests"] is None


def test_warm_container_serves_calls_of_two_jobs(docker_runner, docker_client):
    """One container answers every call of the plugin (two stages of two jobs): the plugin loads once."""
    first = docker_runner.run(call("numbers", inputs={"count": 3}, job_id="job-a", stage_index=0))
    second = docker_runner.run(call("total", inputs={"scaled": [1, 2]}, job_id="job-a", stage_index=1))
    third = docker_runner.run(call("noop", job_id="job-b", stage_index=0))
    assert first.ok and second.ok and third.ok, (first, second, third)
    assert second.outputs == {"total": 3}
    (cid,) = created_ids(docker_runner)
    assert docker_runner.container_ids() == [cid]
    [row] = docker_runner.status()["workers"]
    assert (row["container"], row["calls"], row["state"]) == (cid[:12], 3, "idle")
    assert row["rss_mb"] > 5  # the container's processes, seen from the host


def test_another_memory_limit_gets_its_own_container(make_runner, docker_client):
    runner = make_runner("docker", pool_size=1)
    assert runner.run(call("noop", memory_limit_mb=256)).ok
    (small,) = runner.container_ids()
    assert runner.run(call("noop", memory_limit_mb=512)).ok
    (large,) = runner.container_ids()  # pool of one: the idle 256 MB container made room
    assert large != small
    deadline = time.monotonic() + 15  # it leaves in the background (stdin closed, then removed)
    while leftover_containers(docker_client, [small]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftover_containers(docker_client, [small]) == []
    host = docker_client.containers.get(large).attrs["HostConfig"]
    assert host["Memory"] == (512 + 256) * 2**20
    assert runner.run(call("noop", memory_limit_mb=512)).ok
    assert runner.container_ids() == [large]  # same limit: the warm one


def test_docker_container_has_no_network(docker_runner, docker_client):
    assert docker_runner.run(call("noop")).ok
    (cid,) = docker_runner.container_ids()
    probe = "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=3)\nexcept OSError as e:\n    print('unreachable', e)\nelse:\n    print('connected')"
    code, output = docker_client.containers.get(cid).exec_run(["python", "-c", probe])
    text = output.decode()
    assert code == 0 and text.startswith("unreachable"), text
    interfaces = docker_client.containers.get(cid).exec_run(
        ["python", "-c", "import socket; print(sorted(n for _, n in socket.if_nameindex()))"]
    )
    assert interfaces.output.decode().strip() == "['lo']"


def test_cancel_removes_the_container_serving_the_job(docker_runner, docker_client):
    import threading

    box = {}
    worker = threading.Thread(target=lambda: box.update(r=docker_runner.run(call("hang", job_id="job-x"))))
    worker.start()
    deadline = time.monotonic() + 30
    while not any(w["job_id"] == "job-x" for w in docker_runner.status()["workers"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (cid,) = docker_runner.container_ids()
    assert docker_runner.cancel_job("job-x") == 1
    worker.join(30)
    assert box["r"].error_type == "Cancelled"
    assert leftover_containers(docker_client, [cid]) == []


def test_runner_set_runs_each_stage_where_its_pipeline_asks(make_runner_set, docker_runner, registry, settings):
    """Real pipeline runs (the stage loop): the pipeline says docker, one stage says process; two jobs."""
    from forgeflow.events.sinks import MemorySink
    from forgeflow.jobs.stages import JobRun, Services, execute
    from forgeflow.pipeline import outcome
    from forgeflow.pipeline.definition import PipelineDefinition

    runners = make_runner_set("process")
    services = Services(settings, registry, runners, MemorySink())
    definition = PipelineDefinition.model_validate(
        {
            "runner": "docker",
            "stages": [
                {"plugin": "testkit", "tool": "numbers", "config": {"start": 1}},
                {"plugin": "testkit", "tool": "scale", "config": {"factor": 10}, "runner": "process"},
                {"plugin": "testkit", "tool": "total"},
            ],
        }
    )
    for job_id in ("job-1", "job-2"):
        run = JobRun(job_id, services, outcome.pending_reports(definition.stages))
        envelope = execute(run, definition, None, {"count": 3})
        assert envelope.ok and envelope.result == {"numbers": [1, 2, 3], "scaled": [10, 20, 30], "total": 60}
    assert sorted(runners.runners()) == ["docker", "process"]
    docker, process = runners.runner("docker"), runners.runner("process")
    [container] = docker.status()["workers"]
    assert container["calls"] == 4  # stages 0 and 2 of both jobs, in one warm container
    [worker] = process.status()["workers"]
    assert worker["calls"] == 2  # stage 1 of both jobs
    assert len(docker_runner.created) == 1  # (the fixture records every container created)
    merged = runners.status()
    assert sorted((w["runner"], w["calls"]) for w in merged["workers"]) == [("docker", 4), ("process", 2)]


def test_containers_of_a_killed_runner_are_removed_by_the_next(make_runner, docker_client, settings):
    """A runner killed with SIGKILL cannot remove its containers: the next runner of the host does."""
    import socket
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    labels = {"forgeflow.runner": "docker", "forgeflow.owner_pid": str(gone.pid)}
    orphan = docker_client.containers.create(
        settings.docker_image, ["--plugin", "testkit"], labels={**labels, "forgeflow.owner_host": socket.gethostname()}
    )
    mine = docker_client.containers.create(
        settings.docker_image,
        ["--plugin", "testkit"],
        labels={**labels, "forgeflow.owner_pid": str(os.getpid()), "forgeflow.owner_host": socket.gethostname()},
    )
    try:
        runner = make_runner("docker")
        runner.client()
        assert leftover_containers(docker_client, [orphan.id, mine.id]) == [mine.id]  # its owner still runs
    finally:
        for container in (orphan, mine):
            try:
                container.remove(force=True)
            except Exception:
                pass
