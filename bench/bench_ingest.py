"""Storing 1,000 events of one job through ``Store.ingest`` (SQLite file): what the ingest hot path costs.

A job of 10 stages gets, per stage, a start, 98 progress messages and an end (1,000 events), ingested in
one call as the API's ingest route hands them over. Run it against two trees to compare:

    PYTHONPATH=$PWD python bench/bench_ingest.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from forgeflow.api.store import Store
from forgeflow.events.models import Event, StageEnd, StageProgress, StageStart

STAGES = 10
PROGRESS_PER_STAGE = 98


def job_events(job_id: str) -> list[Event]:
    """1,000 events: per stage a start, progress messages and an end."""
    out: list[Event] = []
    for index in range(STAGES):
        out.append(StageStart(job_id=job_id, stage_index=index, plugin="testkit", tool=f"t{index}"))
        for done in range(PROGRESS_PER_STAGE):
            out.append(
                StageProgress(
                    job_id=job_id, stage_index=index, plugin="testkit", tool=f"t{index}", done=done, total=100
                )
            )
        out.append(
            StageEnd(
                job_id=job_id,
                stage_index=index,
                plugin="testkit",
                tool=f"t{index}",
                ok=True,
                duration_ms=5,
                result_size_bytes=10,
            )
        )
    return out


def one_run(directory: Path, run: int) -> float:
    store = Store(f"sqlite:///{directory / f'bench-{run}.db'}")
    store.migrate()
    job_id = f"job-{run}"
    stages = [{"plugin": "testkit", "tool": f"t{i}"} for i in range(STAGES)]
    store.create_job(
        job_id=job_id, pipeline={"stages": stages}, input_data={}, request_hash="h", source="api", template_id=None
    )
    batch = job_events(job_id)
    start = time.perf_counter()
    stored = store.ingest(batch)
    elapsed = time.perf_counter() - start
    assert len(stored) == len(batch)
    store.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        times = [one_run(Path(tmp), run) for run in range(args.repeat)]
    print(
        f"1,000 events in one ingest: median {statistics.median(times):.3f} s, "
        f"best {min(times):.3f} s ({args.repeat} runs)"
    )


if __name__ == "__main__":
    main()
