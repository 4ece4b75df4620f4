"""A new user's first ``forgeflow run`` and the next one, against the one-pass Ultralytics script.

    .venv/bin/python bench/bench_first_run.py [--runs 3] [--no-embedded] [--torch-threads N] [--spawned]

The README's main job, ``forgeflow run examples/soccer-analysis.json --input examples/sample.mp4``
(64 frames, 640x360), whole process wall time (the command's start to its exit), median of
``--runs`` rounds. Each round, in this order (so machine load hits every side alike):

* **first run on this machine** — a fresh ``FORGEFLOW_HOME``, no engine, no kept Prefect database
  (a fresh ``FORGEFLOW_PREFECT_DB_CACHE``): the command starts the engine in the background, whose
  Prefect server migrates a new database (and keeps a copy of it); the engine is stopped after;
* **first run in a new home** — a fresh ``FORGEFLOW_HOME``, no engine running, the kept database
  there (what a user's first run is after ForgeFlow ran once on the machine, and every run in a new
  home): the engine starts in the background;
* **next run** — the same command again: the engine the first run started is warm;
* **direct** — the 20-line one-pass script (``bench_engine.ONE_PASS``: ``YOLO(pose).track`` on the
  clip and a per-player rule), a fresh process;
* **spawned** (with ``--spawned``) — the first and the next run in another new home with
  ``FORGEFLOW_WORKER_FORK_SERVER=false``: every vision worker imports torch itself;
* **embedded** (unless ``--no-embedded``) — ``forgeflow run --no-engine`` in a fresh home: the job
  in the command's own process with Prefect's ephemeral server, as every first run was before.

Every engine is stopped (and its process tree waited for) before the next measurement. Prints a
markdown table with the ratios to the direct script, the Prefect start-up times from the engines'
logs, and the machine's load average (the bench is meant for a quiet machine; on a shared one,
read the ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_engine import ONE_PASS, timed  # noqa: E402 - the script every cold/warm comparison uses

PIPELINE = ROOT / "examples" / "soccer-analysis.json"
CLIP = ROOT / "examples" / "sample.mp4"
CLI = [sys.executable, "-m", "forgeflow.cli"]


def stop_engine(env: dict[str, str]) -> str:
    """Stop the engine of ``env``'s home, wait until all its processes are gone; its log."""
    home = Path(env["FORGEFLOW_HOME"])
    status = subprocess.run([*CLI, "engine", "status", "--json"], env=env, capture_output=True, text=True)
    if status.returncode == 0:
        pid = json.loads(status.stdout)["pid"]
        tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        subprocess.run([*CLI, "engine", "stop"], env=env, capture_output=True, timeout=60)
        _, alive = psutil.wait_procs(tree, timeout=60)
        for proc in alive:
            proc.kill()
    log = home / "logs" / "engine.log"
    return log.read_text(errors="replace") if log.exists() else ""


def prefect_ready_s(log: str) -> float | None:
    found = re.search(r"Prefect at \S+ ready after ([0-9.]+) s", log)
    return float(found.group(1)) if found else None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-embedded", action="store_true", help="skip the `--no-engine` rows")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="FORGEFLOW_TORCH_THREADS for ForgeFlow's workers (the script keeps its own)",
    )
    parser.add_argument(
        "--spawned",
        action="store_true",
        help="also the first and next run with every worker spawned (FORGEFLOW_WORKER_FORK_SERVER=false)",
    )
    args = parser.parse_args()
    if not CLIP.exists():
        subprocess.run([*CLI, "sample-clip", str(CLIP)], check=True)
    base = Path(tempfile.mkdtemp(prefix="ff-bench-first-run-"))
    cache = base / "prefect-db-cache"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FORGEFLOW_", "PREFECT_"))}
    threads = {} if args.torch_threads is None else {"FORGEFLOW_TORCH_THREADS": str(args.torch_threads)}
    run = [*CLI, "run", str(PIPELINE), "--input", str(CLIP)]
    rows: dict[str, list[float]] = {
        "first_on_machine": [],
        "first": [],
        "next": [],
        "first_spawned": [],
        "next_spawned": [],
        "direct": [],
        "embedded": [],
    }
    ready: dict[str, list[float]] = {"first_on_machine": [], "first": [], "first_spawned": []}
    load_before = os.getloadavg()
    try:
        for round_ in range(args.runs):

            def home(name: str, round_: int = round_) -> dict[str, str]:
                return {
                    **clean,
                    "FORGEFLOW_HOME": str(base / f"{name}-{round_}"),
                    "FORGEFLOW_PREFECT_DB_CACHE": str(cache),
                    **threads,
                }

            shutil.rmtree(cache, ignore_errors=True)  # no kept database: the machine's first run
            env = home("first-on-machine")
            rows["first_on_machine"].append(timed(run, env))
            seconds = prefect_ready_s(stop_engine(env))
            if seconds is not None:
                ready["first_on_machine"].append(seconds)

            env = home("new-home")  # the database kept by the run before
            rows["first"].append(timed(run, env))
            rows["next"].append(timed(run, env))
            seconds = prefect_ready_s(stop_engine(env))
            if seconds is not None:
                ready["first"].append(seconds)

            if args.spawned:  # the same with no fork server: each vision worker imports torch itself
                env = {**home("spawned"), "FORGEFLOW_WORKER_FORK_SERVER": "false"}
                rows["first_spawned"].append(timed(run, env))
                rows["next_spawned"].append(timed(run, env))
                seconds = prefect_ready_s(stop_engine(env))
                if seconds is not None:
                    ready["first_spawned"].append(seconds)

            rows["direct"].append(timed([sys.executable, "-c", ONE_PASS, str(CLIP)], clean))
            if not args.no_embedded:
                rows["embedded"].append(timed([*run, "--no-engine"], home("embedded")))
            print(f"round {round_ + 1}: " + json.dumps({k: round(v[-1], 2) for k, v in rows.items() if v}), flush=True)
    finally:
        for leftover in base.glob("*/engine.sock"):
            stop_engine({**clean, "FORGEFLOW_HOME": str(leftover.parent)})
    load_after = os.getloadavg()

    med = {k: statistics.median(v) for k, v in rows.items() if v}
    direct = med["direct"]
    table = [
        ("first run in a new home: no engine running (starts in the background)", "first", "≤ 1.3×"),
        ("next run: the engine that run started, warm", "next", "≤ 0.9×"),
        ("first run in a new home, every worker spawned (no fork server)", "first_spawned", "—"),
        ("next run, every worker spawned", "next_spawned", "—"),
        ("first run on this machine: no kept Prefect database either", "first_on_machine", "—"),
        ("`--no-engine`: the job in the command (every first run before)", "embedded", "—"),
    ]
    print(f"\nmedian of {args.runs}; direct one-pass script {direct:.2f} s\n")
    print("| `forgeflow run` README main job, whole process | ForgeFlow | direct script | ratio | target |")
    print("|---|---:|---:|---:|---:|")
    for label, key, target in table:
        if key in med:
            print(f"| {label} | {med[key]:.2f} s | {direct:.2f} s | {med[key] / direct:.2f}× | {target} |")
    for key, values in ready.items():
        if values:
            print(f"\nPrefect server ready after engine start ({key}): median {statistics.median(values):.2f} s")
    print(
        f"\nload average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, "
        f"after {tuple(round(x, 2) for x in load_after)}; {os.cpu_count()} CPUs"
    )
    print("raw:", json.dumps({k: [round(x, 2) for x in v] for k, v in rows.items()}))
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
