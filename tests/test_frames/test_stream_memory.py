"""The memory of a match-length per-frame stream: writing and reading it holds a few chunks at a
time, whatever its length. Measured under tracemalloc, which makes it seconds long, so it is not in
the fast tier (its neighbours in ``test_artifacts.py`` are)."""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from forgeflow.plugins import MediaStore
from forgeflow.plugins.builtin.schemas import FramePlayers
from forgeflow.plugins.frames import FrameWriter, iter_frame_records


@pytest.fixture
def store(tmp_path: Path) -> MediaStore:
    return MediaStore(tmp_path / "media")


def test_writing_and_reading_a_match_length_stream_holds_one_chunk(store):
    """135,000 frames would take minutes under tracemalloc; 500 against 4,000 frames x 22 players (chunks
    of 128) shows the shape: the writer's and the reader's peak Python memory stay at a few chunks,
    whatever the length."""
    from forgeflow_testplugins.testkit import crowd_frame

    def peak_of(frames: int) -> tuple[int, dict[str, Any]]:
        # Garbage of earlier tests, collected while tracing, would count as this peak's (which tests
        # ran before decides when the collector runs): start from a collected heap.
        gc.collect()
        tracemalloc.start()
        writer = FrameWriter(store=store, record_type=FramePlayers, field_name="players", chunk_frames=128)
        descriptor = writer.write_all(crowd_frame(i, i / 25, 22) for i in range(frames))
        assert isinstance(descriptor, dict)
        read = sum(1 for _ in iter_frame_records(descriptor, store))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert read == frames
        return peak, descriptor

    short_peak, _ = peak_of(500)
    long_peak, descriptor = peak_of(4_000)
    assert descriptor["frames"] == 4_000 and descriptor["counts"] == {"players": 88_000}
    # 8x the frames, the same memory (a generous 1.5x for allocator noise); the records as JSON are ~12 MB
    assert long_peak < 1.5 * short_peak, (short_peak, long_peak)
    assert long_peak < 8 * 2**20, long_peak
