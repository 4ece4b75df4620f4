"""Batches at fleet scale: one job per file on every worker of every host, nothing analysed twice.

    .venv/bin/python bench/bench_batch.py [--files 200] [--sleep 1.0] [--out bench/results/batch.md]

Needs the test plugins (``testkit.file_work``: reads the file, sleeps ``--sleep`` s, logs the call, so
CPU does not limit the batch) and PostgreSQL's binaries (the hosts share the API's and Prefect's
databases). Two stacks, each started with ``forgeflow up`` in fresh ``FORGEFLOW_HOME`` folders:

* one host × 2 workers (one flow run each): the baseline;
* two hosts × 2 workers (host B joins with ``forgeflow up --join``), PostgreSQL behind both.

Rows: the same batch (``--files`` small images) on each; the same batch again (its files' work is
reused: model calls and wall time against the first run); a batch cancelled once half its slots run
(jobs that started after the cancel, seconds until every job ended); a batch during which host B is
killed (SIGKILL, all its processes): jobs per file that succeeded, jobs beyond one per file.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "plugin_packages" / "forgeflow-testplugins"))

from tests.batch_helpers import make_images  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.test_deployments.test_scale_out import _kill_host, host_of_flow_run  # noqa: E402


def start_postgres(root: Path) -> tuple[str, list[str]]:
    """A throwaway PostgreSQL cluster: (admin URL, the command that stops it)."""
    found = shutil.which("initdb") or sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))[-1]
    bindir = Path(os.path.realpath(found)).parent
    run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if run_as:
        shutil.chown(root, "postgres", "postgres")
    data, sock = root / "data", root / "sock"
    subprocess.run([*run_as, "mkdir", "-p", str(sock)], check=True)
    subprocess.run(
        [*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    port = free_port()
    options = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300"
    subprocess.run(
        [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o", options, "start"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    stop = [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", stop


def new_database(admin_url: str) -> str:
    import psycopg

    name = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{admin_url.rpartition('/')[0]}/{name}"


class Rows(list[tuple[str, str]]):
    """The table's rows, each also printed as it is measured (a long run shows its progress)."""

    def append(self, row: tuple[str, str]) -> None:
        print(f"{row[0]}: {row[1]}", flush=True)
        super().append(row)


class Fleet:
    """``hosts`` hosts of ``workers`` workers each (one flow run per worker) on one PostgreSQL."""

    def __init__(self, admin_url: str, root: Path, hosts: int, workers: int) -> None:
        from forgeflow.cli import stack
        from forgeflow.settings import Settings

        self.homes = [root / f"host-{i}" for i in range(hosts)]
        prefect_db = new_database(admin_url).replace("postgresql+psycopg://", "postgresql+asyncpg://")
        server_env = {
            "PREFECT_API_DATABASE_CONNECTION_URL": prefect_db,
            "FORGEFLOW_DATABASE_URL": new_database(admin_url),
        }
        os.environ.update(server_env, FORGEFLOW_HOME=str(self.homes[0]))
        self.started = stack.up(
            Settings(home=self.homes[0]),
            prefect_port=free_port(),
            api_port=free_port(),
            workers=workers,
            jobs_per_worker=1,
        )
        token = (stack.stack_dir(Settings(home=self.homes[0])) / "ingest-token").read_text().strip()
        for key in server_env:
            os.environ.pop(key)
        for home in self.homes[1:]:
            os.environ["FORGEFLOW_HOME"] = str(home)
            stack.join(
                Settings(home=home),
                prefect_api_url=self.started.prefect_api_url,
                api_url=self.started.api_url,
                ingest_token=token,
                workers=workers,
                jobs_per_worker=1,
            )
        self.api = httpx.Client(base_url=self.started.api_url, timeout=60)
        self.prefect = httpx.Client(base_url=self.started.prefect_api_url, timeout=60)

    def down(self) -> None:
        from forgeflow.cli import stack
        from forgeflow.settings import Settings

        for home in reversed(self.homes):
            stack.down(Settings(home=home))

    def upload(self, folder: Path) -> list[dict[str, str]]:
        return [
            {"ref": self.api.post("/v1/media", files={"file": (p.name, p.read_bytes())}).json()["ref"], "name": p.name}
            for p in sorted(folder.iterdir())
        ]

    def create(self, media: list[dict[str, str]], pipeline: list[dict[str, Any]], concurrency: int) -> str:
        answer = self.api.post(
            "/v1/batches", json={"pipeline": pipeline, "media": media, "max_concurrency": concurrency}
        )
        answer.raise_for_status()
        return str(answer.json()["batch_id"])

    def batch(self, batch_id: str) -> dict[str, Any]:
        return dict(self.api.get(f"/v1/batches/{batch_id}").json())

    def wait(self, batch_id: str, timeout: float = 3600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            batch = self.batch(batch_id)
            if batch["status"] != "running":
                return batch
            if time.monotonic() > deadline:
                raise TimeoutError(batch_id)
            time.sleep(0.25)

    def run(
        self, media: list[dict[str, str]], pipeline: list[dict[str, Any]], concurrency: int
    ) -> tuple[float, dict[str, Any]]:
        started = time.perf_counter()
        batch = self.wait(self.create(media, pipeline, concurrency))
        return time.perf_counter() - started, batch

    def batch_jobs(self, batch_id: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        offset: int | None = 0
        while offset is not None:
            page = self.api.get("/v1/jobs", params={"limit": 500, "offset": offset}).json()
            items += [j for j in page["items"] if j["batch_id"] == batch_id]
            offset = page["next_offset"]
        return items


def pipeline(log: Path, seconds: float) -> list[dict[str, Any]]:
    return [{"plugin": "testkit", "tool": "file_work", "config": {"seconds": seconds, "calls_log": str(log)}}]


def calls(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--sleep", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    pg_root = Path(tempfile.mkdtemp(prefix="bench-batch-pg-"))  # its own folder: PostgreSQL's user owns it
    admin_url, stop_pg = start_postgres(pg_root)
    folder = root / "files"
    make_images(folder, args.files)
    rows = Rows()
    ideal_one, ideal_two = args.files * args.sleep / 2, args.files * args.sleep / 4
    try:
        one = Fleet(admin_url, root / "one", hosts=1, workers=2)
        try:
            media = one.upload(folder)
            one.run(media[:2], pipeline(root / "warm-1.log", 0.0), 2)  # warm-up: workers, engine
            wall_one, batch = one.run(media, pipeline(root / "one.log", args.sleep), 2)
            assert batch["counts"]["succeeded"] == args.files, batch["counts"]
            rows.append(
                ("1 host × 2 workers", f"{wall_one:.1f} s ({wall_one / ideal_one:.2f}× the ideal {ideal_one:.0f} s)")
            )
        finally:
            one.down()
        two = Fleet(admin_url, root / "two", hosts=2, workers=2)
        try:
            media = two.upload(folder)
            two.run(media[:4], pipeline(root / "warm-2.log", 0.0), 4)
            log = root / "two.log"
            wall_two, batch = two.run(media, pipeline(log, args.sleep), 4)
            assert batch["counts"]["succeeded"] == args.files, batch["counts"]
            rows.append(
                (
                    "2 hosts × 2 workers",
                    f"{wall_two:.1f} s: {wall_two / wall_one:.2f}× one host (target ≤ 0.6), "
                    f"{wall_two / ideal_two:.2f}× the ideal {ideal_two:.0f} s (target ≤ 1.3)",
                )
            )
            before = calls(log)
            wall_again, batch = two.run(media, pipeline(log, args.sleep), 4)
            rows.append(
                (
                    "the same batch again",
                    f"{wall_again:.2f} s ({wall_again / wall_two:.1%} of the first run, target ≤ 5%), "
                    f"{calls(log) - before} model calls, {batch['counts']['reused']} of {args.files} files reused",
                )
            )
            # Cancel once the batch is under way.
            cancel_log = root / "cancel.log"
            batch_id = two.create(media, pipeline(cancel_log, args.sleep * 5), 4)
            while two.batch(batch_id)["counts"]["running"] < 2:  # the batch is under way
                time.sleep(0.1)
            cancelled_at = time.perf_counter()
            two.api.post(f"/v1/batches/{batch_id}/cancel").raise_for_status()
            jobs_then = {j["job_id"] for j in two.batch_jobs(batch_id) if j["started_at"]}
            batch = two.wait(batch_id)
            ended_s = time.perf_counter() - cancelled_at
            started_after = [j for j in two.batch_jobs(batch_id) if j["started_at"] and j["job_id"] not in jobs_then]
            rows.append(
                (
                    "cancel mid-batch",
                    f"{len(started_after)} jobs started after it; every job ended in {ended_s:.1f} s (target ≤ 30 s); "
                    f"{batch['counts']['cancelled']} files cancelled",
                )
            )
            # Host B killed a third of the way through.
            kill_log = root / "kill.log"
            started = time.perf_counter()
            batch_id = two.create(media, pipeline(kill_log, args.sleep), 4)
            on_b = False
            while not on_b:
                current = two.batch(batch_id)
                if current["counts"]["done"] >= args.files // 3:
                    for f in current["files"]:
                        if f["status"] != "running":
                            continue
                        flow_run_id = two.api.get(f"/v1/jobs/{f['job_id']}").json()["flow_run_id"]
                        on_b = on_b or host_of_flow_run(two.prefect, flow_run_id) == str(two.homes[1])
                time.sleep(0.1)
            _kill_host(two.homes[1])
            batch = two.wait(batch_id)
            wall_kill = time.perf_counter() - started
            jobs = two.batch_jobs(batch_id)
            ok_per_file: dict[str, int] = {}
            for job in jobs:
                if job["status"] == "succeeded":
                    key = job["job_id"][len(batch_id) + 1 :][:5]
                    ok_per_file[key] = ok_per_file.get(key, 0) + 1
            once = sum(1 for v in ok_per_file.values() if v == 1)
            rows.append(
                (
                    "host B killed mid-batch",
                    f"{once} of {args.files} files with exactly one succeeded job; {len(jobs) - args.files} jobs "
                    f"beyond one per file (B's crashed ones); {calls(kill_log) - args.files} calls beyond one per "
                    f"file; {wall_kill:.1f} s",
                )
            )
        finally:
            two.down()
    finally:
        subprocess.run(stop_pg, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(pg_root, ignore_errors=True)
    load = os.getloadavg()
    lines = [
        f"Batch of {args.files} files, testkit.file_work sleeping {args.sleep:g} s a file; "
        f"{platform.node()} ({os.cpu_count()} CPUs), load average {load[0]:.1f}",
        "",
        "| row | result |",
        "|---|---|",
        *[f"| {name} | {result} |" for name, result in rows],
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
