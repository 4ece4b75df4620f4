"""Storing 1,000 events of one job through ``Store.ingest`` (SQLite file): what the ingest hot path costs.

A job of 10 stages gets, per stage, a start, 98 progress messages and an end (1,000 events), ingested in
one call as the API's ingest route hands them over; the direct work beside it is writing the same
1,000 event rows with one multi-row insert (no seq, dedupe or derived state). Run it against two
trees to compare:

    PYTHONPATH=$PWD python bench/bench_ingest.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import insert

from forgeflow.api.store import Store
from forgeflow.api.store.tables import events
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


def direct_run(directory: Path, run: int) -> float:
    """The same 1,000 events written as rows directly: the floor of storing them."""
    store = Store(f"sqlite:///{directory / f'direct-{run}.db'}")
    store.migrate()
    job_id = f"direct-{run}"
    store.create_job(
        job_id=job_id, pipeline={"stages": []}, input_data={}, request_hash="h", source="api", template_id=None
    )
    batch = job_events(job_id)
    start = time.perf_counter()
    rows = [
        {
            "job_id": job_id,
            "seq": seq,
            "event_id": event.event_id,
            "type": event.type,
            "payload": json.dumps(event.model_dump(mode="json")),
            "received_at": datetime.now(UTC),
        }
        for seq, event in enumerate(batch, start=2)
    ]
    with store.engine.begin() as conn:
        conn.execute(insert(events), rows)
    elapsed = time.perf_counter() - start
    store.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        times = [one_run(Path(tmp), run) for run in range(args.repeat)]
        direct = [direct_run(Path(tmp), run) for run in range(args.repeat)]
    ingest_s, direct_s = statistics.median(times), statistics.median(direct)
    print(f"1,000 events in one ingest: median {ingest_s:.3f} s, best {min(times):.3f} s ({args.repeat} runs)")
    print(f"the same rows inserted directly: median {direct_s:.3f} s; ingest / direct = {ingest_s / direct_s:.1f}x")


if __name__ == "__main__":
    main()
