"""Draw a soccer-analysis result onto its image or video (OpenCV only: no torch, no Ultralytics).

``annotate_media(source, result, out)`` draws, per frame, each player's box with its track id and
confidence, the pose skeleton (COCO-17 limbs between keypoints with confidence >= 0.3) and the
action label. ``result`` holds any of ``players``, ``poses``, ``actions`` (the pipeline's final
result). A video keeps its size and fps; frames the pipeline skipped (``frame_stride`` > 1) show the
annotations of the last processed frame. Colours are fixed per track id, so the output is
reproducible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from forgeflow.plugins.errors import MediaError, MediaNotFound
from forgeflow.plugins.media import sniff

__all__ = ["SKELETON", "annotate_frame", "annotate_media"]

#: COCO-17 limbs (pairs of keypoint indices).
SKELETON: tuple[tuple[int, int], ...] = (
    (5, 7),
    (7, 9),
    (6, 8),
    (8, 10),  # arms
    (5, 6),
    (5, 11),
    (6, 12),
    (11, 12),  # torso
    (11, 13),
    (13, 15),
    (12, 14),
    (14, 16),  # legs
    (0, 1),
    (0, 2),
    (1, 3),
    (2, 4),
    (3, 5),
    (4, 6),  # head
)

_PALETTE = (
    (56, 56, 255),
    (151, 157, 255),
    (31, 112, 255),
    (29, 178, 255),
    (49, 210, 207),
    (10, 249, 72),
    (23, 204, 146),
    (134, 219, 61),
    (52, 147, 26),
    (187, 212, 0),
    (168, 153, 44),
    (255, 194, 0),
    (147, 69, 52),
    (255, 115, 100),
    (236, 24, 0),
    (255, 56, 132),
    (133, 0, 82),
    (255, 56, 203),
)
_UNTRACKED = (160, 160, 160)
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def _color(track_id: int | None) -> tuple[int, int, int]:
    return _UNTRACKED if track_id is None else _PALETTE[track_id % len(_PALETTE)]


def _by_frame(frames: Any, key: str) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for frame in frames or []:
        out[int(frame["frame_index"])] = list(frame.get(key) or [])
    return out


def _label(image: Any, text: str, x: int, y: int, color: tuple[int, int, int], scale: float) -> None:
    import cv2

    thickness = max(1, round(scale * 2))
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    y = max(y, h + base + 2)
    cv2.rectangle(image, (x, y - h - base - 2), (x + w + 4, y), color, -1)
    luminance = 0.114 * color[0] + 0.587 * color[1] + 0.299 * color[2]
    ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    cv2.putText(image, text, (x + 2, y - base - 1), cv2.FONT_HERSHEY_SIMPLEX, scale, ink, thickness, cv2.LINE_AA)


def annotate_frame(
    image: Any,
    players: list[dict[str, Any]],
    poses: list[dict[str, Any]],
    actions: list[dict[str, Any]],
    *,
    min_keypoint_confidence: float = 0.3,
) -> Any:
    """Draw one frame's players, poses and actions onto ``image`` (BGR, modified in place)."""
    import cv2

    height, width = image.shape[:2]
    scale = max(0.5, min(width, height) / 600.0)
    line = max(1, round(scale * 2))
    action_by_player = {int(a["player_index"]): a for a in actions if "player_index" in a}
    for pose in poses:
        color = _color(pose.get("track_id"))
        kps = pose.get("keypoints") or []
        for a, b in SKELETON:
            if (
                a < len(kps)
                and b < len(kps)
                and kps[a][2] >= min_keypoint_confidence
                and kps[b][2] >= min_keypoint_confidence
            ):
                p1 = (round(kps[a][0]), round(kps[a][1]))
                p2 = (round(kps[b][0]), round(kps[b][1]))
                cv2.line(image, p1, p2, color, line, cv2.LINE_AA)
        for x, y, c in kps:
            if c >= min_keypoint_confidence:
                cv2.circle(image, (round(x), round(y)), line + 1, (255, 255, 255), -1, cv2.LINE_AA)
    for index, player in enumerate(players):
        box = [round(v) for v in player["box"]]
        track_id = player.get("track_id")
        color = _color(track_id)
        cv2.rectangle(image, (box[0], box[1]), (box[2], box[3]), color, line)
        name = f"#{track_id}" if track_id is not None else player.get("class_name", "person")
        _label(image, f"{name} {player.get('confidence', 0):.2f}", box[0], box[1], color, scale * 0.7)
        action = action_by_player.get(index)
        if action is not None:
            text = action["action"] + (f" {action['confidence']:.2f}" if "confidence" in action else "")
            _label(image, text, box[0], min(box[3], height - 1), color, scale * 0.7)
    # actions of players the result does not list (a result with actions only): label at the pose box
    if not players:
        for pose in poses:
            action = action_by_player.get(int(pose.get("player_index", -1)))
            if action is not None:
                box = [round(v) for v in pose["box"]]
                _label(image, action["action"], box[0], box[1], _color(pose.get("track_id")), scale * 0.7)
    return image


def annotate_media(source_path: Path | str, result: dict[str, Any], out_path: Path | str) -> Path:
    """Write ``source_path`` with ``result`` drawn on it; returns the file written.

    An image is written in the format of ``out_path``'s suffix (``.jpg`` when it has none of an
    image's); a video as MP4 (``mp4v``) with the source's size and fps.
    """
    import cv2
    import numpy as np

    source = Path(source_path)
    out = Path(out_path)
    if not source.is_file():
        raise MediaNotFound(f"media file not found: {source}")
    with source.open("rb") as fh:
        kind = sniff(fh.read(64))
    if kind is None:
        raise MediaError(f"unsupported or corrupt media: {source.name}")
    players = _by_frame(result.get("players"), "players")
    poses = _by_frame(result.get("poses"), "poses")
    actions = _by_frame(result.get("actions"), "actions")
    out.parent.mkdir(parents=True, exist_ok=True)

    if kind[0] == "image":
        if out.suffix.lower() not in _IMAGE_SUFFIXES:
            out = out.with_suffix(".jpg")
        image = cv2.imdecode(np.fromfile(str(source), dtype=np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise MediaError(f"cannot decode image: {source.name}")
        annotate_frame(image, players.get(0, []), poses.get(0, []), actions.get(0, []))
        if not cv2.imwrite(str(out), image):
            raise MediaError(f"cannot write annotated image {out}")
        return out

    if out.suffix.lower() != ".mp4":
        out = out.with_suffix(".mp4")
    cap = cv2.VideoCapture(str(source))
    if not cap.isOpened():
        raise MediaError(f"cannot open video (corrupt or truncated?): {source.name}")
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) or 25.0
    width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    tmp = out.with_name(f".{out.stem}.partial.mp4")
    fourcc = cv2.VideoWriter_fourcc(*"mp4v")  # type: ignore[attr-defined]
    writer = cv2.VideoWriter(str(tmp), fourcc, fps, (width, height))
    if not writer.isOpened():
        cap.release()
        raise MediaError("OpenCV cannot write MP4 (mp4v) video here")
    annotated = sorted(set(players) | set(poses) | set(actions))
    last_index = annotated[-1] if annotated else -1
    current: int | None = None
    index = 0
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if index in players or index in poses or index in actions:
                current = index
            if current is not None and index <= last_index + (annotated[1] - annotated[0] if len(annotated) > 1 else 0):
                annotate_frame(frame, players.get(current, []), poses.get(current, []), actions.get(current, []))
            writer.write(frame)
            index += 1
    finally:
        cap.release()
        writer.release()
    if index == 0:
        tmp.unlink(missing_ok=True)
        raise MediaError(f"video has no readable frames: {source.name}")
    tmp.replace(out)
    return out
