"""Helpers of the batch tests: media folders, the file_work pipeline, waiting for a batch."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

TERMINAL_BATCH = {"succeeded", "failed", "cancelled"}


def make_images(folder: Path, count: int, *, corrupt: int = 0) -> list[str]:
    """``count`` small distinct PNGs (``img-00.png`` …) and ``corrupt`` files that look like PNGs but
    are not (``bad-0.png`` …) in ``folder``; their names, sorted."""
    import cv2
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        cv2.imwrite(str(folder / f"img-{i:02d}.png"), np.full((24, 32, 3), 10 + 5 * i, dtype=np.uint8))
    for i in range(corrupt):
        (folder / f"bad-{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + f"not really a png {i}".encode() * 10)
    return sorted(p.name for p in folder.iterdir())


def file_work(calls_log: Path, seconds: float = 0.0) -> list[dict[str, Any]]:
    """The one-stage batch pipeline of these tests: testkit's file_work, logging each call."""
    return [{"plugin": "testkit", "tool": "file_work", "config": {"seconds": seconds, "calls_log": str(calls_log)}}]


def calls(calls_log: Path) -> int:
    return len(calls_log.read_text().splitlines()) if calls_log.exists() else 0


def wait_batch(
    client: httpx.Client, batch_id: str, statuses: set[str] | None = None, timeout: float = 120
) -> dict[str, Any]:
    statuses = statuses or TERMINAL_BATCH
    deadline = time.monotonic() + timeout
    while True:
        batch: dict[str, Any] = client.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in statuses:
            return batch
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} still {batch['status']} after {timeout}s: {batch['counts']}")
        time.sleep(0.2)
