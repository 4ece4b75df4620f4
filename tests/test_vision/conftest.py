"""Session fixtures of the vision tests: models load once, the sample clip is made once, and each
real-inference result is computed once and shared by the tests that check it."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

from forgeflow.cli.sample_clip import assets_dir, make_sample_clip
from forgeflow.plugins import MediaStore, ToolContext

CLIP_IMGSZ = 320  # small: the clip tests check tracking, not accuracy


@pytest.fixture(scope="session")
def vision_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="forgeflow-vision-"))


@pytest.fixture(scope="session")
def assets() -> Path:
    return assets_dir()


@pytest.fixture(scope="session")
def sample_clip(vision_dir: Path) -> Path:
    return make_sample_clip(vision_dir / "clips" / "sample.mp4")


@pytest.fixture(scope="session")
def vision_ctx(vision_dir: Path, assets: Path) -> ToolContext:
    """A tool context whose allowed media roots are Ultralytics' assets and the session's folder."""
    return ToolContext(media_store=MediaStore(vision_dir / "media"), input_roots=[assets, vision_dir])


def tool(plugin_module: str, name: str):
    import importlib

    module = importlib.import_module(f"forgeflow.plugins.builtin.{plugin_module}")
    return module.plugin.tools[name]


def run_soccer(ctx: ToolContext, media: str, *, imgsz: int = 640, max_frames: int | None = None) -> dict[str, Any]:
    """detect_players → estimate_poses → classify_actions, the way the engine feeds them."""
    detect_cfg: dict[str, Any] = {"device": "cpu", "confidence": 0.25, "imgsz": imgsz}
    pose_cfg: dict[str, Any] = {"device": "cpu", "model": "light", "imgsz": imgsz}
    if max_frames:
        detect_cfg["max_frames"] = max_frames
    players = tool("yolo_tracker", "detect_players").invoke(detect_cfg, {"media": media}, ctx)
    poses = tool("pose_estimator", "estimate_poses").invoke(pose_cfg, {"media": media, **players}, ctx)
    actions = tool("classifier", "classify_actions").invoke({}, {"media": media, **poses}, ctx)
    return {**players, **poses, **actions}


@pytest.fixture(scope="session")
def bus_result(vision_ctx: ToolContext, assets: Path) -> dict[str, Any]:
    return run_soccer(vision_ctx, str(assets / "bus.jpg"))


@pytest.fixture(scope="session")
def zidane_result(vision_ctx: ToolContext, assets: Path) -> dict[str, Any]:
    ref = vision_ctx.media_store.put_file(assets / "zidane.jpg").ref  # by media ref, as jobs do
    return run_soccer(vision_ctx, ref)


@pytest.fixture(scope="session")
def clip_result(vision_ctx: ToolContext, sample_clip: Path) -> dict[str, Any]:
    return run_soccer(vision_ctx, str(sample_clip), imgsz=CLIP_IMGSZ)


@pytest.fixture(scope="session")
def soccer():
    """The three tools called in a row: ``soccer(ctx, media, imgsz=..., max_frames=...)``."""
    return run_soccer


@pytest.fixture(scope="session")
def get_tool():
    """``get_tool("yolo_tracker", "detect_players")`` → the Tool object."""
    return tool
