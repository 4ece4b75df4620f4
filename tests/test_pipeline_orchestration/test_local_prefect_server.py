"""The local Prefect server ForgeFlow starts never outlives its owner: it dies with it (even a
SIGKILLed one), and a server whose owner is gone is stopped by the next owner of the same home; it
records task runs in batches."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from forgeflow.jobs.prefect_server import TASK_RUN_RECORDER_BATCHING, LocalPrefectServer, free_port
from forgeflow.processes import pid_alive


def _wait_gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_the_server_dies_with_a_sigkilled_owner(tmp_path):
    owner_code = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-m', 'forgeflow.jobs.prefect_server', '--port', sys.argv[1],"
        " '--parent-pid', str(os.getpid())], start_new_session=True,"
        " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    owner = subprocess.Popen(
        [sys.executable, "-c", owner_code, str(free_port())], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        server_pid = int(owner.stdout.readline())
        time.sleep(1.0)  # let it get going (were the owner gone sooner, the server would see that and leave)
        assert pid_alive(server_pid)
        owner.kill()
        owner.wait(10)
        assert _wait_gone(server_pid, 60), "the Prefect server outlived its SIGKILLed owner"
    finally:
        owner.kill()


def test_a_server_whose_owner_is_gone_is_stopped_by_the_next_owner(tmp_path):
    # A stand-in for a server left running by an owner that died (same command-line marker, own group).
    stale = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", "forgeflow.jobs.prefect_server"],
        start_new_session=True,
    )
    dead_owner = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_owner.wait(10)
    home = tmp_path / "prefect"
    home.mkdir()
    server = LocalPrefectServer(home)
    stale_created = psutil.Process(stale.pid).create_time()
    server.pid_file.write_text(f"{stale.pid} {stale_created} {dead_owner.pid} 0.0\n")
    try:
        assert server.stop_stale()
        assert _wait_gone(stale.pid, 20)  # (reaped by stop_stale's wait, so no exit status is left here)
        assert not server.pid_file.exists()
        # One whose owner still runs (this test) is left alone.
        alive = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)", "forgeflow.jobs.prefect_server"],
            start_new_session=True,
        )
        me = psutil.Process(os.getpid())
        server.pid_file.write_text(
            f"{alive.pid} {psutil.Process(alive.pid).create_time()} {me.pid} {me.create_time()}\n"
        )
        assert not server.stop_stale()
        assert alive.poll() is None
        alive.kill()
        alive.wait(10)
    finally:
        stale.kill()


def test_the_server_records_task_runs_in_batches(prefect_api_url):
    if os.environ.get("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE"):
        pytest.skip("the caller's environment sets the recorder's batching")
    # What the running server (the session's, started like every local one) has in force.
    settings = httpx.get(f"{prefect_api_url}/admin/settings", timeout=10).json()
    recorder = settings["server"]["services"]["task_run_recorder"]
    assert (
        str(recorder["batch_size"])
        == TASK_RUN_RECORDER_BATCHING["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE"]
    )
    assert recorder["batch_size"] > 1
    assert float(recorder["flush_interval"]) == 1.0


def _read_then_write_while_another_commits(db_path: Path) -> int:
    """Prefect's write transaction on SQLite reads, another connection commits a row meanwhile, then
    the transaction writes: what happens to Prefect's server when jobs arrive together. The rows at
    the end (2 when both writes were kept)."""
    import asyncio
    import sqlite3
    import threading

    from prefect.server.database.configurations import AioSqliteConfiguration
    from sqlalchemy import text

    with sqlite3.connect(db_path) as setup:
        setup.execute("PRAGMA journal_mode=WAL")
        setup.execute("CREATE TABLE runs (n INTEGER)")

    def other_writer() -> None:
        with sqlite3.connect(db_path, timeout=10) as other:
            other.execute("INSERT INTO runs VALUES (1)")

    async def scenario() -> None:
        config = AioSqliteConfiguration(connection_url=f"sqlite+aiosqlite:///{db_path}")
        engine = await config.engine()
        try:
            async with await config.session(engine) as session, config.begin_transaction(session):
                await session.execute(text("SELECT count(*) FROM runs"))
                writer = threading.Thread(target=other_writer)
                writer.start()
                await asyncio.sleep(0.3)  # the other writer commits now, or waits for this one
                await session.execute(text("INSERT INTO runs VALUES (2)"))
            writer.join(15)
        finally:
            await engine.dispose()

    asyncio.run(scenario())
    with sqlite3.connect(db_path) as check:
        return int(check.execute("SELECT count(*) FROM runs").fetchone()[0])


def test_prefect_s_sqlite_writes_wait_their_turn_instead_of_failing(tmp_path: Path) -> None:
    """Prefect's own deferred transaction fails at once with "database is locked" when another writer
    commits between its read and its write (its server then answers 503 and the client repeats the
    request); the server ForgeFlow starts begins every write transaction IMMEDIATE, so it waits."""
    from prefect.server.database import configurations
    from sqlalchemy.exc import OperationalError

    from forgeflow.jobs.prefect_server import _sqlite_writes_wait_their_turn

    prefects_own = configurations.AioSqliteConfiguration.begin_transaction
    with pytest.raises(OperationalError, match="database is locked"):
        _read_then_write_while_another_commits(tmp_path / "deferred.db")
    try:
        _sqlite_writes_wait_their_turn()
        patched = configurations.AioSqliteConfiguration.begin_transaction
        _sqlite_writes_wait_their_turn()  # once is enough: not wrapped twice
        assert configurations.AioSqliteConfiguration.begin_transaction is patched is not prefects_own
        assert _read_then_write_while_another_commits(tmp_path / "immediate.db") == 2
    finally:
        configurations.AioSqliteConfiguration.begin_transaction = prefects_own  # type: ignore[method-assign]
