"""Workers forked from a fork server (:mod:`forgeflow.engine.runners.worker_fork`): who forks them,
that they are the workers a spawn makes (same outputs, own session, crashes told by their signal),
and when a runner spawns instead (no preload, the setting off, a server unsafe to fork or gone)."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

from forgeflow.engine.runners.worker_fork import ForkServer

from ._helpers import call, group_gone

pytestmark = pytest.mark.timeout(120)


def _parent(pid: int) -> psutil.Process:
    return psutil.Process(psutil.Process(pid).ppid())


def _two_workers(runner) -> list[int]:
    """Two testkit workers (two calls that overlap), their pids."""
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(runner.run(call("sleep", config={"seconds": 0.5}))))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.ok for r in results] == [True, True], results
    return runner.worker_pids("testkit")


def test_workers_that_preload_the_same_modules_are_forks_of_one_server_that_imported_them(runner):
    pids = _two_workers(runner)
    assert len(pids) == 2
    servers = {_parent(pid) for pid in pids}
    assert len(servers) == 1
    (server,) = servers
    assert server.pid != os.getpid() and server.ppid() == os.getpid()
    assert "--fork-server" in server.cmdline()
    assert "--preload=forgeflow.plugins.builtin.schemas" in server.cmdline()  # testkit's Plugin(preload=...)
    for pid in pids:  # each worker leads its own session and group, as a spawned one does
        assert os.getsid(pid) == pid and os.getpgid(pid) == pid
        assert "forgeflow.engine.runners.worker" in " ".join(psutil.Process(pid).cmdline())
    log = (runner.settings.logs_dir / "workers" / "fork-server.log").read_text()
    assert f"[fork server pid={server.pid} preload=['forgeflow.plugins.builtin.schemas'] failed=[] unsafe=None]" in log
    runner.close()
    assert all(group_gone(pid, within_s=3) for pid in pids)
    assert group_gone(server.pid, within_s=3), "the fork server outlived its runner"


def test_a_plugin_that_preloads_nothing_gets_a_spawned_worker(runner):
    result = runner.run(call("classify_actions", plugin="classifier", inputs={"players": [], "poses": []}))
    assert result.ok, result
    (pid,) = runner.worker_pids("classifier")
    assert _parent(pid).pid == os.getpid()


def test_forked_workers_give_the_outputs_of_spawned_ones_and_their_crashes_are_told_by_signal(make_runner):
    forked, spawned = make_runner("process"), make_runner("process", worker_fork_server=False)
    calls = [
        call("numbers", inputs={"count": 5}, config={"start": 3}),
        call("echo", inputs={"value": {"a": [1, 2.5, "x"]}}),
        call("measure_text", inputs={"text": "naïve ✓"}),
    ]
    for c in calls:
        a, b = forked.run(c), spawned.run(c)
        assert a.ok and b.ok, (a, b)
        assert a.outputs == b.outputs
    assert _parent(forked.worker_pids("testkit")[0]).pid != os.getpid()
    assert _parent(spawned.worker_pids("testkit")[0]).pid == os.getpid()
    for runner in (forked, spawned):
        crash = runner.run(call("segfault"))
        assert crash.error_type == "WorkerCrashed" and "died with SIGSEGV (signal 11)" in crash.error, crash
        exited = runner.run(call("hard_exit", config={"code": 3}))
        assert exited.error_type == "WorkerCrashed" and "exited with code 3" in exited.error, exited
        assert runner.run(call("noop")).ok  # a fresh worker serves the next call


def test_a_fork_server_that_dies_takes_its_workers_once_then_workers_are_spawned(runner):
    (pid,) = {runner.run(call("pid")).outputs["pid"] for _ in range(2)}
    server = _parent(pid)
    os.kill(server.pid, signal.SIGKILL)
    assert group_gone(pid, within_s=3), "a forked worker outlived its fork server"
    deadline = time.monotonic() + 5
    while any(w.alive() for w in runner._all) and time.monotonic() < deadline:  # the runner hears of it
        time.sleep(0.02)
    assert not any(w.alive() for w in runner._all)
    after = runner.run(call("pid"))
    assert after.ok, after
    assert _parent(after.outputs["pid"]).pid == os.getpid()  # spawned from now on


def test_a_server_whose_imports_start_a_thread_does_not_fork(runner, tmp_path, monkeypatch):
    (tmp_path / "starts_a_thread.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), name='busy', daemon=True).start()\n"
    )
    env = {**runner._env, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    from forgeflow.engine.runners.worker_fork import ForkServerGone

    with pytest.raises(ForkServerGone, match="Python threads run after the preload imports: busy"):
        ForkServer(["starts_a_thread"], env, tmp_path / "server.log").wait_ready(60)
    entry = runner.registry.entries["testkit"]
    monkeypatch.setattr(entry.plugin, "preload", ("starts_a_thread",))
    monkeypatch.setattr(runner._fork_servers, "_env", env)
    result = runner.run(call("pid"))
    assert result.ok, result
    assert _parent(result.outputs["pid"]).pid == os.getpid()
