"""Per-stage orchestration overhead: ForgeFlow (Prefect task + sandboxed runner + events) against
calling the same no-op tool directly, for 3- and 20-stage pipelines. A plain Prefect flow of
trivial tasks shows how much of the cost is Prefect's own.

    .venv/bin/python bench/bench_pipeline.py [--reps 5]

Uses PREFECT_API_URL when set, else starts a local Prefect server (SQLite) for the run. Workers
are warmed once before measuring, as in a long-running service.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("FORGEFLOW_HOME", tempfile.mkdtemp(prefix="ff-bench-"))


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    from forgeflow.jobs.prefect_server import LocalPrefectServer
    from forgeflow.settings import get_settings

    settings = get_settings()
    server = None
    if not os.environ.get("PREFECT_API_URL"):
        server = LocalPrefectServer(settings.home / "prefect")
        os.environ["PREFECT_API_URL"] = server.start()
    try:
        run(args.reps)
    finally:
        if server is not None:
            server.stop()


def run(reps: int) -> None:
    from forgeflow.engine.runners.base import ToolCall
    from forgeflow.events.sinks import MemorySink
    from forgeflow.jobs.executor import PipelineExecutor
    from forgeflow.jobs.stages import Services
    from forgeflow.plugins import EmptyModel, MediaStore, ToolContext
    from forgeflow.settings import get_settings

    settings = get_settings()
    services = Services.from_settings(settings, sink=MemorySink())
    executor = PipelineExecutor(services)
    _, tool = services.registry.tool("testkit", "noop")
    ctx = ToolContext(media_store=MediaStore(settings.media_root))

    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    def trivial(index: int) -> int:
        return index

    trivial_task = task(trivial, cache_policy=NO_CACHE, persist_result=False)

    @flow(persist_result=False)
    def plain_prefect(stages: int) -> None:
        for index in range(stages):
            trivial_task(index)

    rows = []
    try:
        plain_prefect(1)
        executor.execute({"pipeline": [{"plugin": "testkit", "tool": "noop"}]}, {}, "warmup")
        for stages in (3, 20):
            pipeline = {"pipeline": [{"plugin": "testkit", "tool": "noop"}] * stages}
            direct, runner_only, prefect_only, forgeflow = [], [], [], []
            for rep in range(reps):
                started = time.perf_counter()
                for _ in range(stages):
                    tool.fn(EmptyModel(), EmptyModel(), ctx)
                direct.append(time.perf_counter() - started)

                started = time.perf_counter()
                for index in range(stages):
                    services.runner.run(ToolCall(plugin="testkit", tool="noop", stage_index=index))
                runner_only.append(time.perf_counter() - started)

                started = time.perf_counter()
                plain_prefect(stages)
                prefect_only.append(time.perf_counter() - started)

                started = time.perf_counter()
                envelope = executor.execute(pipeline, {}, f"bench-{stages}-{rep}")
                forgeflow.append(time.perf_counter() - started)
                assert envelope["ok"], envelope
            rows.append(
                (stages, median_ms(direct), median_ms(runner_only), median_ms(prefect_only), median_ms(forgeflow))
            )
    finally:
        services.close()

    header = (
        "| stages | direct calls (ms) | runner only (ms) | plain Prefect flow, trivial tasks (ms) "
        "| ForgeFlow flow run (ms) | ForgeFlow per stage (ms) | ForgeFlow over plain Prefect + runner, per stage (ms) |"
    )
    lines = [header, "|---:|---:|---:|---:|---:|---:|---:|"]
    for stages, direct_ms, runner_ms, prefect_ms, ff_ms in rows:
        lines.append(
            f"| {stages} | {direct_ms:.3f} | {runner_ms:.1f} | {prefect_ms:.0f} | {ff_ms:.0f} | {ff_ms / stages:.1f} "
            f"| {(ff_ms - prefect_ms - runner_ms) / stages:.1f} |"
        )
    print("\n".join(lines))
    print(f"\nmedians of {reps} runs; python {sys.version.split()[0]}, {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
