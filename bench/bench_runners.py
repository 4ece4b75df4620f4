"""Cost of one no-op tool call (testkit.noop) through each runner, against a direct function call.

    .venv/bin/python bench/bench_runners.py            # prints the table, updates bench/results/runners.md

Rows: the plugin function called directly; ``Tool.invoke`` (validation included); the inline runner;
the process runner with a warm worker (with and without the lifecycle store, whose SQLite writes
are part of every real call); the process runner with a fresh process per call (cold); and, when an
engine answers and the image exists, the Docker runner with a warm container and with a fresh
container per call.

The warm Docker and warm process rows are measured side by side: their calls alternate (one to
each, ``--n-warm`` times), so both see the same machine load; ``docker warm / process warm`` is the
ratio of their medians (the issue's target: at most 1.2x).

    FORGEFLOW_DOCKER_IMAGE=forgeflow-worker:cpu-test .venv/bin/python bench/bench_runners.py
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "runners.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def measure(fn: Callable[[], object], n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000.0)
    return samples


def p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def fmt(ms: float) -> str:
    if ms < 0.01:
        return f"{ms * 1000:.2f} µs"
    if ms < 1:
        return f"{ms * 1000:.0f} µs"
    return f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-fast", type=int, default=5000, help="calls for direct/inline rows")
    parser.add_argument("--n-warm", type=int, default=300, help="calls for warm process and warm docker rows")
    parser.add_argument("--n-cold", type=int, default=15, help="calls for the fresh-process row")
    parser.add_argument("--n-docker", type=int, default=8, help="calls for the fresh-container docker row")
    parser.add_argument("--no-docker", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only; leave runners.md alone")
    parser.add_argument(
        "--vision",
        type=int,
        default=0,
        metavar="N",
        help="also time N starts of a pose-estimator worker while a detector worker is warm (forked, spawned)",
    )
    args = parser.parse_args()

    os.environ.setdefault("FORGEFLOW_HOME", tempfile.mkdtemp(prefix="forgeflow-bench-"))
    from forgeflow.engine.runners import ToolCall, get_runner
    from forgeflow.plugins import EmptyModel, MediaStore, ToolContext
    from forgeflow.plugins.lifecycle import LifecycleStore
    from forgeflow.plugins.registry import PluginRegistry
    from forgeflow.settings import get_settings

    settings = get_settings()
    registry = PluginRegistry.discover(LifecycleStore(settings.lifecycle_db))
    bare_registry = PluginRegistry.discover(None)
    _, tool = registry.tool("testkit", "noop")
    ctx = ToolContext(media_store=MediaStore(settings.media_root), plugin="testkit", tool="noop")
    call = ToolCall(plugin="testkit", tool="noop")
    rows: list[tuple[str, list[float]]] = []

    def checked(runner):
        def go() -> None:
            result = runner.run(call)
            if not result.ok:
                raise SystemExit(f"{runner.name}: {result.error_type}: {result.error}")

        return go

    empty = EmptyModel()
    rows.append(("direct function call", measure(lambda: tool.fn(empty, empty, ctx), args.n_fast, 100)))
    rows.append(("Tool.invoke (validation, no runner)", measure(lambda: tool.invoke({}, {}, ctx), args.n_fast, 100)))
    inline = get_runner(settings.model_copy(update={"runner": "inline"}), registry)
    rows.append(("inline runner", measure(checked(inline), args.n_fast // 5, 20)))

    docker_note = ""
    docker_ok = False
    if not args.no_docker:
        try:
            import docker

            client = docker.from_env(timeout=10)
            client.ping()
            client.images.get(settings.docker_image)
            docker_ok = True
        except Exception as exc:
            docker_note = f"docker rows skipped: {type(exc).__name__}: {exc}"

    process = get_runner(settings.model_copy(update={"runner": "process", "reuse_workers": True}), registry)
    warm_docker = get_runner(settings.model_copy(update={"runner": "docker", "reuse_workers": True}), registry)
    try:
        if docker_ok:
            # Side by side: one call to each in turn, so both see the same load.
            process_go, docker_go = checked(process), checked(warm_docker)
            for _ in range(10):
                process_go()
                docker_go()
            process_samples: list[float] = []
            docker_samples: list[float] = []
            for _ in range(args.n_warm):
                process_samples += measure(process_go, 1, 0)
                docker_samples += measure(docker_go, 1, 0)
            rows.append(("process, warm worker", process_samples))
            rows.append((f"docker, warm container ({settings.docker_image})", docker_samples))
            ratio = statistics.median(docker_samples) / statistics.median(process_samples)
            docker_note = (
                f"docker warm / process warm (medians, calls alternating): {ratio:.2f}x; "
                f"p95: {p95(docker_samples) / p95(process_samples):.2f}x"
            )
        else:
            rows.append(("process, warm worker", measure(checked(process), args.n_warm, 10)))
    finally:
        process.close()
        warm_docker.close()
    bare = get_runner(settings.model_copy(update={"runner": "process", "reuse_workers": True}), bare_registry)
    try:
        rows.append(("process, warm worker, no lifecycle store", measure(checked(bare), args.n_warm, 10)))
    finally:
        bare.close()
    # testkit preloads a module, as the vision plugins do (torch): its fresh workers are forks of a
    # fork server (worker_fork.py); with the setting off each one is a new interpreter.
    for label, fork_server in (("forked", True), ("spawned", False)):
        update = {"runner": "process", "reuse_workers": False, "worker_fork_server": fork_server}
        cold = get_runner(settings.model_copy(update=update), registry)
        try:
            rows.append((f"process, fresh process per call, {label}", measure(checked(cold), args.n_cold, 1)))
        finally:
            cold.close()

    if docker_ok:
        cold_docker = get_runner(settings.model_copy(update={"runner": "docker", "reuse_workers": False}), registry)
        try:
            rows.append(
                (
                    f"docker, fresh container per call ({settings.docker_image})",
                    measure(checked(cold_docker), args.n_docker, 1),
                )
            )
        finally:
            cold_docker.close()

    for label, fork_server in (("forked", True), ("spawned", False)) if args.vision else ():
        starts = []
        for _ in range(args.vision):  # a pool that grows: the torch plugins' second worker, to `ready`
            update = {"runner": "process", "worker_fork_server": fork_server}
            grown = get_runner(settings.model_copy(update=update), registry).runner("process")
            try:
                grown.warm("forgesyte-yolo-tracker")
                started = time.perf_counter()
                grown.warm("pose-estimator")
                starts.append((time.perf_counter() - started) * 1000.0)
            finally:
                grown.close()
        rows.append((f"a vision worker ready (pose-estimator, its detector warm), {label}", starts))

    direct = statistics.median(rows[0][1])
    lines = [
        "| path | calls | median / call | p95 / call | median vs direct |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, samples in rows:
        med = statistics.median(samples)
        lines.append(f"| {label} | {len(samples)} | {fmt(med)} | {fmt(p95(samples))} | {med / direct:,.0f}× |")
    table = "\n".join(lines)
    image = f"FORGEFLOW_DOCKER_IMAGE={settings.docker_image} " if docker_ok else ""
    command = f"{image}FORGEFLOW_HOME=$(mktemp -d) .venv/bin/python bench/bench_runners.py " + " ".join(sys.argv[1:])
    meta = (
        f"Command: `{command.strip()}`  \n"
        f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node() or 'this machine'}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()} {platform.release()}"
        + (f"  \n{docker_note}" if docker_note else "")
    )
    print(table)
    print()
    print(meta)
    if not args.no_write:
        block = f"{START}\n{meta}\n\n{table}\n{END}"
        if RESULTS.exists() and START in RESULTS.read_text():
            text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, RESULTS.read_text(), flags=re.S)
        else:
            text = f"# Runner benchmark: cost of a no-op call\n\n{block}\n"
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        print(f"\nwrote {RESULTS}")
    inline.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
