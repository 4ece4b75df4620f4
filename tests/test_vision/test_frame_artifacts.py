"""The vision plugins' per-frame outputs as chunked artifacts: the same bytes with the job's reuse cache
(one model pass per frame, issue 8) on or off, and the same records as inline output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from forgeflow.plugins import MediaStore, ToolContext
from forgeflow.plugins.cache import OutputCache
from forgeflow.plugins.frames import is_frames, iter_frame_records

from .conftest import CLIP_IMGSZ, tool

pytestmark = pytest.mark.vision


def _detect_and_pose(sample_clip: Path, store: MediaStore, chunk_frames: int, cache: Path | None) -> dict[str, Any]:
    ctx = ToolContext(
        media_store=store,
        input_roots=[sample_clip.parent],
        chunk_frames=chunk_frames,
        job_id="artifacts",
        cache=OutputCache(cache),
    )
    config = {"device": "cpu", "imgsz": CLIP_IMGSZ}
    players = tool("yolo_tracker", "detect_players").invoke(config, {"media": str(sample_clip)}, ctx)
    poses = tool("pose_estimator", "estimate_poses").invoke(config, {"media": str(sample_clip), **players}, ctx)
    return {**players, **poses, "passes_reused": ctx.cache.hits}


def test_artifacts_are_the_same_bytes_with_the_reuse_cache_on_or_off(sample_clip, tmp_path):
    store = MediaStore(tmp_path / "media")
    on = _detect_and_pose(sample_clip, store, 16, tmp_path / "cache")
    off = _detect_and_pose(sample_clip, store, 16, None)
    assert on["passes_reused"] == 64 and off["passes_reused"] == 0  # the pose stage reused detection's passes
    assert is_frames(on["players"]) and on["players"]["chunks"] == 4 and on["poses"]["frames"] == 64
    assert (on["players"], on["poses"]) == (off["players"], off["poses"])  # same refs: same chunk bytes
    inline = _detect_and_pose(sample_clip, store, 256, tmp_path / "cache-inline")
    assert list(iter_frame_records(on["poses"], store)) == inline["poses"]
