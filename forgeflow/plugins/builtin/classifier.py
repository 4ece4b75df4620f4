"""``classifier``: an action per player per frame, from pose kinematics over time.

``classify_actions`` takes the ``poses`` of the pose stage (and, optionally, the ``media`` to remove
camera motion) and labels every pose with deterministic, documented rules. No model, no training:
the same poses always give the same actions.

Method
------
All distances are normalised by body size: the **scale** ``s`` of a tracked pose at ``t`` is the
median torso length (mid-shoulders to mid-hips) of its track's observations within
``scale_window_s`` (30 s) centred on ``t``; of an untracked pose, or where no torso is visible in
that window, its own torso, else 0.3 x its box height. A window rather than the whole track keeps
memory bounded on a match, and a player's size on screen changes over a match anyway (distance to
the camera, zoom); a track that spans at most half the window gets the median of the whole track.
Keypoints count when their confidence is >= ``min_keypoint_confidence``. Times are the frames'
``timestamp_s`` (so the rules do not depend on fps or frame stride).

Camera motion (``camera_motion: "auto"``, videos only): the global translation between consecutive
frames is measured by phase correlation (OpenCV ``phaseCorrelate``, Hann window) on a grey,
downscaled copy of each frame with the people blanked out; its running sum is subtracted from
every position, so a camera pan does not look like running. Weak correlations (response < 0.05,
e.g. scene cuts) count as no motion. The pose stage's positions are used as they are otherwise.

Rules, for one pose at time ``t`` (``H`` = mid-hip, else the box's bottom centre):

* **speed** (tracked players seen at least twice within ``speed_window_s`` around ``t``): the
  least-squares velocity of ``H`` over that window, in scales per second (``speed`` in the output).
  ``< walk_speed`` (1.0) → ``standing``; ``< run_speed`` (4.0) → ``walking``; else ``running``.
  (A torso is ~0.5 m: 1 scale/s ~ 0.5 m/s, 4 scales/s ~ 2 m/s.)
* **jumping**: the height of ``H`` above its baseline exceeds ``jump_height`` (0.35 scale), and so
  does the ankles' height where ankles are visible (1.5 x ``jump_height`` for the hips alone). The
  baseline at ``t`` is the median, over ``jump_window_s`` around ``t``, of the positions carried to
  ``t`` along the least-squares trend (so walking towards the camera is not a jump).
* **crouching**: both visible knee angles (hip-knee-ankle) < ``crouch_knee_angle`` (120°), or with
  one leg visible, that angle < 100° and the hip-to-ankle height < 1.1 scales.
* **lying**: the torso (mid-hips → mid-shoulders) is more than 60° from vertical.
* **arms_raised**: a visible wrist at least 0.5 scale above its shoulder.
* **standing**: none of the above and not moving (or a still image, which cannot show motion).

A still image (a single frame) or an untracked player can show only ``standing``, ``crouching``,
``lying`` and ``arms_raised``; its ``speed`` is null. The primary ``action`` is the first label by
precedence lying > jumping > running > walking > crouching > arms_raised > standing; ``labels``
lists every label that applies. With too few visible keypoints to apply any rule, an upright pose
box (height >= 1.5 x width) is ``standing`` with confidence 0.5 x the pose's detection confidence;
anything else is ``unknown`` (confidence 0).

Confidence = (mean confidence of the keypoints the deciding rule used) x (margin), where the margin
is 0.5 + the distance of the feature from its nearest decision threshold in units of that
threshold's scale, clipped to [0.5, 1]; rounded to 4 decimals.

Streaming
---------
Every rule looks at a centred time window (speed, jump, scale), so a frame's actions are final once
the poses up to half the widest window later have arrived. :class:`ActionStream` takes frames in
frame order and returns each frame as soon as that is so (15 s behind the input by default); it
holds the frames not yet decided and, per live track, the entries still inside a window (a sorted
list of torsos for the sliding median): memory and cost per frame depend on the windows and the
number of players, never on the video's length. :func:`camera_offsets` reads the video alongside
the poses, one frame at a time. :func:`action_stream` is the tool end to end; :func:`classify`
(a list in, a list out) is a wrapper for clips and tests. The results equal the computation over
the whole video with the same windows, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import chain, islice

from pydantic import BaseModel, Field

from forgeflow.plugins.builtin._action_rules import (
    NO_OFFSET,
    PRECEDENCE,
    STILL_CLASSES,
    ClassifierConfig,
    Offset,
    _decide,
    _median,
    _Near,
    _Obs,
    _static_rules,
    _temporal_rules,
)
from forgeflow.plugins.builtin._action_stream import ActionStream, classify, classify_stream
from forgeflow.plugins.builtin._camera_motion import _PanMeter, camera_offsets
from forgeflow.plugins.builtin.schemas import FrameActions, FramePoses
from forgeflow.plugins.frames import FrameStream
from forgeflow.plugins.sdk import Plugin, ToolContext

__all__ = [
    "NO_OFFSET",
    "PRECEDENCE",
    "STILL_CLASSES",
    "ActionStream",
    "ClassifierConfig",
    "ClassifierInput",
    "ClassifierOutput",
    "Offset",
    "_Near",
    "_Obs",
    "_PanMeter",
    "_decide",
    "_median",
    "_static_rules",
    "_temporal_rules",
    "action_stream",
    "camera_offsets",
    "classify",
    "classify_actions",
    "classify_stream",
    "plugin",
]

plugin = Plugin(
    "classifier",
    "1.0.0",
    description="Per-player actions (standing, walking, running, jumping, crouching, lying, arms raised) from pose kinematics.",
)


@plugin.availability_check
def _available() -> str | None:
    import importlib.util

    missing = [name for name in ("numpy", "cv2") if importlib.util.find_spec(name) is None]
    return f"missing Python package(s): {', '.join(missing)}" if missing else None


class ClassifierInput(BaseModel):
    poses: FrameStream[FramePoses] = Field(description="Per-frame poses of the pose stage.")
    media: str | None = Field(
        None, min_length=1, description="The video the poses come from (used to remove camera motion)."
    )


class ClassifierOutput(BaseModel):
    actions: FrameStream[FrameActions]


def action_stream(
    poses: Iterable[FramePoses], config: ClassifierConfig, ctx: ToolContext, media: str | None = None
) -> Iterator[FrameActions]:
    """What ``classify_actions`` computes, as a stream: ``poses`` is iterated once, in frame order,
    and the video (camera motion) is read alongside it."""
    frames = iter(poses)
    head = list(islice(frames, 2))  # one frame shows no motion: then the video is not read
    stream = chain(head, frames)
    paired: Iterable[tuple[FramePoses, Offset]]
    if config.camera_motion == "auto" and media and len(head) > 1:
        paired = camera_offsets(ctx, media, stream)
    else:
        paired = ((f, NO_OFFSET) for f in stream)
    return classify_stream(paired, config)


@plugin.tool(input=ClassifierInput, output=ClassifierOutput, config=ClassifierConfig, draws={"actions": "labels"})
def classify_actions(inputs: ClassifierInput, config: ClassifierConfig, ctx: ToolContext) -> ClassifierOutput:
    """An action per player per frame (standing, walking, running, jumping, crouching, lying, arms_raised)."""
    return ClassifierOutput(actions=action_stream(inputs.poses, config, ctx, inputs.media))
