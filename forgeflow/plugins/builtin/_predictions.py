"""One model pass per frame per job: a frame's detections (:class:`Prediction`), kept in the job's
cache so the detection and the pose stage share the pose model's pass (see :data:`PREDICT_CONF_FLOOR`),
and joined with other jobs' passes of a batch (:func:`model_passes`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from forgeflow.plugins.builtin._ultralytics import predict
from forgeflow.plugins.cache import file_digest
from forgeflow.plugins.sdk import ToolContext

if TYPE_CHECKING:
    import numpy as np
    import torch
    from cv2.typing import MatLike
    from numpy.typing import NDArray
    from ultralytics.engine.results import Boxes, Results
    from ultralytics.models import YOLO

    from forgeflow.plugins.media_reader import Frame

__all__ = [
    "PREDICT_CONF_FLOOR",
    "Prediction",
    "cached_prediction",
    "model_passes",
    "predict_frames",
    "prediction_key",
]

#: With the job cache on, every vision tool asks the model for detections down to this confidence
#: (or its own, if lower) and keeps those above its own threshold afterwards, so tools with
#: different thresholds share one pass per frame. Ultralytics keeps a box when its score is over the
#: threshold and no kept higher-scoring box of its class overlaps it, so the boxes over a threshold
#: are the same whether the lower ones were computed too (checked byte for byte by the tests).
PREDICT_CONF_FLOOR = 0.1


@dataclass(frozen=True)
class Prediction:
    """One frame's detections, in the model's (score) order."""

    data: NDArray[np.float32]  # (N, 6): x1, y1, x2, y2, confidence, class
    keypoints: NDArray[np.float32] | None  # (N, K, 3) for pose models, else None
    orig_shape: tuple[int, int]

    @classmethod
    def from_result(cls, result: Results) -> Prediction:
        if result.boxes is None:
            raise TypeError("an Ultralytics result without boxes: not a detection or pose model's")
        data = _float32(result.boxes.data)
        kps = _float32(result.keypoints.data) if result.keypoints is not None else None
        height, width = result.orig_shape
        return cls(data, kps, (int(height), int(width)))

    def encode(self) -> bytes:
        import io

        import numpy as np

        buf = io.BytesIO()
        shape = np.asarray(self.orig_shape, dtype=np.int64)
        if self.keypoints is None:
            np.savez(buf, data=self.data, shape=shape)
        else:
            np.savez(buf, data=self.data, shape=shape, keypoints=self.keypoints)
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

    def boxes(self) -> Boxes:
        """As Ultralytics ``Boxes`` (what the tracker takes)."""
        from ultralytics.engine.results import Boxes

        return Boxes(self.data, self.orig_shape)


def _float32(data: torch.Tensor | NDArray[np.generic]) -> NDArray[np.float32]:
    """An Ultralytics result's tensor as a float32 numpy array on the CPU."""
    import numpy as np
    import torch

    array = data.cpu().numpy() if isinstance(data, torch.Tensor) else data
    return array.astype(np.float32, copy=False)


def prediction_key(
    ctx: ToolContext, *, weights: Path, media: Path, frame_index: int, device: str, imgsz: int, floor: float, batch: int
) -> str:
    """The cache key of one frame's pass: model file, media content, frame, and what shapes the pass."""
    return ctx.cache.key(
        "ultralytics.predict/1", file_digest(weights), file_digest(media), frame_index, device, imgsz, floor, batch
    )


def predict_frames(
    model: YOLO,
    frames: Sequence[Frame],
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
    blobs = [blob for blob in cached if blob is not None]
    if len(blobs) == len(cached):
        found = [Prediction.decode(blob) for blob in blobs]
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
    model: YOLO,
    images: Sequence[MatLike],
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

    def passes(groups: list[list[MatLike]]) -> list[list[Prediction]]:
        from forgeflow.settings import get_settings

        def run(batch: list[MatLike]) -> list[Prediction]:
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
