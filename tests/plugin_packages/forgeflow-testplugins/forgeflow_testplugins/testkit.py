"""``testkit``: a small typed chain (numbers → scale → total) and tools that misbehave on purpose."""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, Field

from forgeflow.plugins import BatchSpec, EmptyModel, FrameStream, Plugin, ToolContext
from forgeflow.plugins.builtin.schemas import FramePlayers, FramePoses, Player, Pose

# Its workers are forked from a fork server that imported these first, as the vision plugins' workers
# are from one that imported torch (forgeflow.engine.runners.worker_fork): the misbehaving tools below
# (hang, segfault, allocate, hard_exit, ...) are tried on forked workers.
plugin = Plugin(
    "testkit",
    "0.1.0",
    aliases=["tk"],
    description="Test tools for ForgeFlow itself.",
    preload=["forgeflow.plugins.builtin.schemas"],
)


# --- a well-behaved typed chain --------------------------------------------------------------


class NumbersInput(BaseModel):
    count: int = Field(ge=0, le=1_000_000)


class NumbersConfig(BaseModel):
    start: int = 0


class NumbersOutput(BaseModel):
    numbers: list[int]


@plugin.tool(input=NumbersInput, output=NumbersOutput, config=NumbersConfig)
def numbers(inputs: NumbersInput, config: NumbersConfig, ctx: ToolContext) -> NumbersOutput:
    """``count`` consecutive integers from ``start``."""
    return NumbersOutput(numbers=list(range(config.start, config.start + inputs.count)))


class ScaleInput(BaseModel):
    numbers: list[int]


class ScaleConfig(BaseModel):
    factor: int = 2


class ScaleOutput(BaseModel):
    scaled: list[int]


@plugin.tool(input=ScaleInput, output=ScaleOutput, config=ScaleConfig)
def scale(inputs: ScaleInput, config: ScaleConfig, ctx: ToolContext) -> ScaleOutput:
    """Multiply every number by ``factor``."""
    return ScaleOutput(scaled=[n * config.factor for n in inputs.numbers])


class TotalInput(BaseModel):
    scaled: list[int]


class TotalOutput(BaseModel):
    total: int


@plugin.tool(input=TotalInput, output=TotalOutput)
def total(inputs: TotalInput, config: EmptyModel, ctx: ToolContext) -> TotalOutput:
    """Sum of ``scaled``."""
    return TotalOutput(total=sum(inputs.scaled))


class LabelInput(BaseModel):
    total: str


class LabelOutput(BaseModel):
    label: str


@plugin.tool(input=LabelInput, output=LabelOutput)
def label_total(inputs: LabelInput, config: EmptyModel, ctx: ToolContext) -> LabelOutput:
    """Wants ``total`` as a string: placed after ``total`` (an integer) it is an incompatible stage."""
    return LabelOutput(label=f"total={inputs.total}")


class TextInput(BaseModel):
    text: str


class TextOutput(BaseModel):
    text_length: int


@plugin.tool(input=TextInput, output=TextOutput)
def measure_text(inputs: TextInput, config: EmptyModel, ctx: ToolContext) -> TextOutput:
    """Length of ``text`` (its input type is incompatible with ``numbers``' output)."""
    return TextOutput(text_length=len(inputs.text))


class MediaInput(BaseModel):
    media: str


class MediaOutput(BaseModel):
    media_kind: str
    frame_count: int
    width: int
    height: int


@plugin.tool(input=MediaInput, output=MediaOutput)
def probe_media(inputs: MediaInput, config: EmptyModel, ctx: ToolContext) -> MediaOutput:
    """Open ``media`` through the SDK and count its frames."""
    reader = ctx.media(inputs.media)
    count = sum(1 for _ in reader.frames())
    return MediaOutput(media_kind=reader.kind, frame_count=count, width=reader.width, height=reader.height)


class FileWorkConfig(BaseModel):
    seconds: float = Field(0.0, ge=0)
    calls_log: str | None = None


class FileWorkOutput(BaseModel):
    media_kind: str
    frame_count: int
    slept_s: float


@plugin.tool(input=MediaInput, output=FileWorkOutput, config=FileWorkConfig)
def file_work(inputs: MediaInput, config: FileWorkConfig, ctx: ToolContext) -> FileWorkOutput:
    """A batch's work on one file: count its frames (a corrupt file fails here), sleep ``seconds``
    (so a batch's wall time is not CPU-bound), and append a line to ``calls_log`` (the calls made)."""
    reader = ctx.media(inputs.media)
    count = sum(1 for _ in reader.frames())
    time.sleep(config.seconds)
    if config.calls_log:
        with open(config.calls_log, "a", encoding="utf-8") as fh:
            fh.write(f"{inputs.media}\n")
    return FileWorkOutput(media_kind=reader.kind, frame_count=count, slept_s=config.seconds)


class ThumbnailOutput(BaseModel):
    thumbnail: str
    thumbnail_width: int


@plugin.tool(input=MediaInput, output=ThumbnailOutput)
def thumbnail(inputs: MediaInput, config: EmptyModel, ctx: ToolContext) -> ThumbnailOutput:
    """Store the first frame of ``media`` at half size as a PNG (``ctx.put_media``): a tool that makes media."""
    import tempfile
    from pathlib import Path

    import cv2

    frame = next(iter(ctx.media(inputs.media).frames(max_frames=1))).image
    small = cv2.resize(frame, (max(1, frame.shape[1] // 2), max(1, frame.shape[0] // 2)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "thumbnail.png"
        cv2.imwrite(str(path), small)
        ref = ctx.put_media(path, filename="thumbnail.png")
    return ThumbnailOutput(thumbnail=ref, thumbnail_width=small.shape[1])


class FakePlayersConfig(BaseModel):
    frames: int | None = Field(
        None, ge=1, le=10_000, description="Frames to report without reading the media; None: one per frame of it."
    )


class FakePlayersOutput(BaseModel):
    players: list[dict[str, Any]]
    poses: list[dict[str, Any]]


@plugin.tool(
    input=MediaInput, output=FakePlayersOutput, config=FakePlayersConfig, draws={"players": "boxes", "poses": "poses"}
)
def fake_players(inputs: MediaInput, config: FakePlayersConfig, ctx: ToolContext) -> FakePlayersOutput:
    """One player (box, track id 1) and its pose per frame, in the shapes of the vision plugins'
    ``players`` and ``poses``: something for the job's annotated media to draw, without a model."""
    if config.frames is None:
        reader = ctx.media(inputs.media)
        sizes = [(frame.index, reader.width, reader.height) for frame in reader.frames()]
    else:
        sizes = [(index, 100, 100) for index in range(config.frames)]
    players, poses = [], []
    for index, width, height in sizes:
        x1, y1, x2, y2 = width * 0.3 + index, height * 0.2, width * 0.6 + index, height * 0.9
        player = {"box": [x1, y1, x2, y2], "confidence": 0.9, "track_id": 1, "class_name": "person"}
        keypoints = [[x1 + (x2 - x1) * (k % 2), y1 + (y2 - y1) * k / 16, 0.9] for k in range(17)]
        pose = {"player_index": 0, "track_id": 1, "box": player["box"], "keypoints": keypoints}
        players.append({"frame_index": index, "timestamp_s": 0.0, "players": [player]})
        poses.append({"frame_index": index, "timestamp_s": 0.0, "poses": [pose]})
    return FakePlayersOutput(players=players, poses=poses)


# --- per-frame streams at match length, without a model ----------------------------------------


class CrowdConfig(BaseModel):
    people: int = Field(22, ge=0, le=500, description="Players a frame.")
    frames: int | None = Field(
        None, ge=1, le=10_000_000, description="Frames to make without reading the media; None: every frame of it."
    )
    tally_file: str | None = Field(None, description="Append a byte per frame made here (tests count the work).")
    delay_s: float = Field(0.0, ge=0, le=10, description="Sleep this long per frame (a slower detector).")
    fail_at_frame: int | None = Field(None, ge=0, description="Raise on reaching this frame.")


class CrowdOutput(BaseModel):
    players: FrameStream[FramePlayers]


def crowd_frame(index: int, timestamp_s: float, people: int, width: int = 1280, height: int = 720) -> FramePlayers:
    """``people`` boxes that drift across the frame by a fixed rule (track ids 1..people)."""
    players = []
    for i in range(people):
        x = float((i * 53 + index * 3) % max(width - 40, 1))
        y = float((i * 31) % max(height - 90, 1))
        players.append(
            Player(box=[x, y, x + 40.0, y + 90.0], confidence=0.5 + (i % 5) / 10, track_id=i + 1, class_name="person")
        )
    return FramePlayers(frame_index=index, timestamp_s=round(timestamp_s, 4), players=players)


@plugin.tool(input=MediaInput, output=CrowdOutput, config=CrowdConfig, resumable=True, draws={"players": "boxes"})
def crowd_players(inputs: MediaInput, config: CrowdConfig, ctx: ToolContext) -> CrowdOutput:
    """A model-free stand-in detector: ``people`` players on every frame of the media (decoded, so the
    media is really read to its end), streamed frame by frame like the real detector's. Each frame's
    players depend on that frame alone, so a retried call continues after its last checkpointed chunk."""
    start = 0 if ctx.resume_after is None else ctx.resume_after + 1

    def made(frame: FramePlayers) -> FramePlayers:
        if config.fail_at_frame is not None and frame.frame_index >= config.fail_at_frame:
            raise RuntimeError(f"the stand-in detector fails on purpose at frame {frame.frame_index}")
        if config.tally_file:  # a byte per frame made, whatever becomes of the process
            with open(config.tally_file, "a") as tally:
                tally.write(".")
        if config.delay_s:
            time.sleep(config.delay_s)
        return frame

    def frames() -> Iterator[FramePlayers]:
        if config.frames is not None:
            for index in range(start, config.frames):
                yield made(crowd_frame(index, index / 25, config.people))
                ctx.progress(index + 1, config.frames)
            return
        reader = ctx.media(inputs.media)
        expected = reader.expected_frames()
        for frame in reader.frames(start=start):
            yield made(crowd_frame(frame.index, frame.timestamp_s, config.people, reader.width, reader.height))
            ctx.progress(frame.index + 1, max(expected or 0, frame.index + 1))

    return CrowdOutput(players=frames())


class CrowdPosesInput(BaseModel):
    players: FrameStream[FramePlayers]


class CrowdPosesOutput(BaseModel):
    poses: FrameStream[FramePoses]


def crowd_pose(frame: FramePlayers) -> FramePoses:
    """An upright skeleton in each player's box (the COCO-17 layout of a standing person)."""
    poses = []
    for index, player in enumerate(frame.players):
        x1, y1, x2, y2 = player.box
        w, h = x2 - x1, y2 - y1
        keypoints = [[round(x1 + w * (0.35 + 0.3 * (k % 2)), 2), round(y1 + h * k / 17, 2), 0.9] for k in range(17)]
        poses.append(
            Pose(
                track_id=player.track_id,
                player_index=index,
                box=player.box,
                confidence=player.confidence,
                match_iou=1.0,
                keypoints=keypoints,
            )
        )
    return FramePoses(frame_index=frame.frame_index, timestamp_s=frame.timestamp_s, poses=poses)


@plugin.tool(input=CrowdPosesInput, output=CrowdPosesOutput, resumable=True, draws={"poses": "poses"})
def crowd_poses(inputs: CrowdPosesInput, config: EmptyModel, ctx: ToolContext) -> CrowdPosesOutput:
    """A model-free stand-in pose estimator: a skeleton per player, frame by frame as players stream in."""
    return CrowdPosesOutput(poses=(crowd_pose(frame) for frame in inputs.players))


class FrameCount(BaseModel):
    frame_index: int = Field(ge=0)
    players: int = Field(ge=0)
    mean_confidence: float | None = None


class CountPlayersConfig(BaseModel):
    fail_at_frame: int | None = Field(None, ge=0, description="Raise on reaching this frame (partial results).")
    fail_while_file: str | None = Field(None, description="Raise at the first frame while this file exists.")


class CountPlayersInput(BaseModel):
    players: FrameStream[FramePlayers]


class CountPlayersOutput(BaseModel):
    counts: FrameStream[FrameCount]


@plugin.tool(input=CountPlayersInput, output=CountPlayersOutput, config=CountPlayersConfig)
def count_players(inputs: CountPlayersInput, config: CountPlayersConfig, ctx: ToolContext) -> CountPlayersOutput:
    """A third-party streaming consumer and producer: players a frame, read a chunk at a time from the
    upstream stream and written as it goes."""

    def counts() -> Iterator[FrameCount]:
        for done, frame in enumerate(inputs.players, start=1):
            if config.fail_at_frame is not None and frame.frame_index >= config.fail_at_frame:
                raise RuntimeError(f"failing on purpose at frame {frame.frame_index}")
            if config.fail_while_file and os.path.exists(config.fail_while_file):
                raise RuntimeError(f"failing while {config.fail_while_file} exists")
            confidences = [p.confidence for p in frame.players]
            mean = round(sum(confidences) / len(confidences), 4) if confidences else None
            yield FrameCount(frame_index=frame.frame_index, players=len(frame.players), mean_confidence=mean)
            ctx.progress(done, inputs.players.frames)

    return CountPlayersOutput(counts=counts())


class ListPlayersInput(BaseModel):
    players: list[FramePlayers]


class ListPlayersOutput(BaseModel):
    frames: int
    total_players: int


@plugin.tool(input=ListPlayersInput, output=ListPlayersOutput)
def count_players_list(inputs: ListPlayersInput, config: EmptyModel, ctx: ToolContext) -> ListPlayersOutput:
    """A tool written before streams: its ``list`` input gets every record, read into memory."""
    return ListPlayersOutput(frames=len(inputs.players), total_players=sum(len(f.players) for f in inputs.players))


# --- no-op and timing tools ------------------------------------------------------------------


@plugin.tool(output=EmptyModel)
def noop(inputs: EmptyModel, config: EmptyModel, ctx: ToolContext) -> EmptyModel:
    """Do nothing (benchmarks the cost of a call)."""
    return EmptyModel()


class SleepConfig(BaseModel):
    seconds: float = Field(0.2, ge=0)


class SleepOutput(BaseModel):
    slept_s: float


@plugin.tool(output=SleepOutput, config=SleepConfig)
def sleep(inputs: EmptyModel, config: SleepConfig, ctx: ToolContext) -> SleepOutput:
    """Sleep ``seconds`` then succeed."""
    time.sleep(config.seconds)
    return SleepOutput(slept_s=config.seconds)


class EchoValue(BaseModel):
    value: Any = None


@plugin.tool(input=EchoValue, output=EchoValue)
def echo(inputs: EchoValue, config: EmptyModel, ctx: ToolContext) -> EchoValue:
    """Return ``value`` as it came."""
    return EchoValue(value=inputs.value)


class StepsConfig(BaseModel):
    steps: int = Field(5, ge=1)
    delay_s: float = Field(0.0, ge=0)
    keep_reporting: bool = Field(False, description="Leave a thread that goes on reporting after the call.")


class StepsOutput(BaseModel):
    steps: int


@plugin.tool(output=StepsOutput, config=StepsConfig)
def steps(inputs: EmptyModel, config: StepsConfig, ctx: ToolContext) -> StepsOutput:
    """Report progress ``steps`` times (``ctx.progress(i, steps, "step i")``), ``delay_s`` apart."""
    for i in range(1, config.steps + 1):
        time.sleep(config.delay_s)
        ctx.progress(i, config.steps, f"step {i}")
    if config.keep_reporting:

        def late() -> None:
            for _ in range(100):
                time.sleep(0.005)
                ctx.progress(1, None, "late")

        threading.Thread(target=late, daemon=True).start()
    return StepsOutput(steps=config.steps)


class PidOutput(BaseModel):
    pid: int


@plugin.tool(output=PidOutput)
def pid(inputs: EmptyModel, config: EmptyModel, ctx: ToolContext) -> PidOutput:
    """The process id that ran the call (shows isolation and worker reuse)."""
    return PidOutput(pid=os.getpid())


# --- tools that misbehave --------------------------------------------------------------------


class FailConfig(BaseModel):
    message: str = "boom"
    error: Literal["ValueError", "RuntimeError", "KeyError"] = "RuntimeError"


@plugin.tool(output=EmptyModel, config=FailConfig)
def fail(inputs: EmptyModel, config: FailConfig, ctx: ToolContext) -> EmptyModel:
    """Raise ``error(message)``."""
    raise {"ValueError": ValueError, "RuntimeError": RuntimeError, "KeyError": KeyError}[config.error](config.message)


class HangConfig(BaseModel):
    seconds: float = 3600.0
    ignore_sigterm: bool = True


@plugin.tool(output=EmptyModel, config=HangConfig)
def hang(inputs: EmptyModel, config: HangConfig, ctx: ToolContext) -> EmptyModel:
    """Block for ``seconds`` in a C call, ignoring SIGTERM: only a hard kill stops it."""
    import signal

    if config.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(config.seconds)
    return EmptyModel()


class AllocateConfig(BaseModel):
    megabytes: int = Field(8192, ge=1)


class AllocateOutput(BaseModel):
    allocated_mb: int


@plugin.tool(output=AllocateOutput, config=AllocateConfig)
def allocate(inputs: EmptyModel, config: AllocateConfig, ctx: ToolContext) -> AllocateOutput:
    """Allocate and touch ``megabytes`` of memory, 16 MiB at a time (a leak that grows)."""
    chunks: list[bytearray] = []
    for _ in range(config.megabytes // 16):
        chunks.append(bytearray(b"\x01" * (16 * 1024 * 1024)))
    return AllocateOutput(allocated_mb=len(chunks) * 16)


@plugin.tool(output=EmptyModel)
def segfault(inputs: EmptyModel, config: EmptyModel, ctx: ToolContext) -> EmptyModel:
    """Crash the interpreter with SIGSEGV."""
    ctypes.string_at(0)
    return EmptyModel()


class ExitConfig(BaseModel):
    code: int = 3


@plugin.tool(output=EmptyModel, config=ExitConfig)
def hard_exit(inputs: EmptyModel, config: ExitConfig, ctx: ToolContext) -> EmptyModel:
    """Leave with ``os._exit(code)``: no cleanup, no reply."""
    os._exit(config.code)


class SpamConfig(BaseModel):
    lines: int = 20_000


class SpamOutput(BaseModel):
    lines: int


@plugin.tool(output=SpamOutput, config=SpamConfig)
def spam_stdout(inputs: EmptyModel, config: SpamConfig, ctx: ToolContext) -> SpamOutput:
    """Print to stdout through Python, and write straight to file descriptor 1."""
    for i in range(config.lines):
        print(f'spam line {i} {{"not": "a protocol message"}}')
    sys.stdout.flush()
    os.write(1, b"\x00\x00\x00\x10raw bytes on fd 1\n" * 100)
    return SpamOutput(lines=config.lines)


class BadOutput(BaseModel):
    value: int


@plugin.tool(output=BadOutput)
def bad_output(inputs: EmptyModel, config: EmptyModel, ctx: ToolContext) -> Any:
    """Return something the output model rejects."""
    return {"value": "not a number"}


# --- a batchable tool (the engine's cross-job batching) ------------------------------------------


class BatchProbeInput(BaseModel):
    value: int
    seconds: float = Field(0.0, ge=0, description="Sleep this long before the batched pass (a slow call).")
    crash: bool = Field(False, description="Crash the worker (a segfault) when the batched pass sees this input.")
    fail: bool = Field(False, description="Raise in the batched pass for this input.")
    allocate_mb: int = Field(0, ge=0, description="Allocate (and touch) this much memory before the pass.")


class BatchProbeConfig(BaseModel):
    record: str = Field(description="A file each batched pass appends 'pid groups' to (what was joined).")
    hold_s: float = Field(0.0, ge=0, description="The pass takes this long (a model call in progress).")


class BatchProbeOutput(BaseModel):
    doubled: int
    pid: int


@plugin.tool(
    input=BatchProbeInput,
    output=BatchProbeOutput,
    config=BatchProbeConfig,
    batch=BatchSpec(max_batch=8, max_wait_ms=200),
)
def batch_probe(inputs: BatchProbeInput, config: BatchProbeConfig, ctx: ToolContext) -> BatchProbeOutput:
    """Doubles ``value`` in a batched pass that records how many calls it joined (and misbehaves on demand)."""
    if inputs.seconds:
        time.sleep(inputs.seconds)
    if inputs.allocate_mb:
        hog = bytearray(inputs.allocate_mb * 2**20)
        hog[::4096] = b"x" * len(range(0, len(hog), 4096))
        del hog
    ctx.progress(0, 1, "before the pass")

    def double(groups: list[list[BatchProbeInput]]) -> list[list[int]]:
        with open(config.record, "a") as fh:
            fh.write(f"{os.getpid()} {len(groups)}\n")
        if any(item.crash for group in groups for item in group):
            ctypes.string_at(0)
        if any(item.fail for group in groups for item in group):
            raise ValueError("a marked input")
        time.sleep(config.hold_s)
        return [[item.value * 2 for item in group] for group in groups]

    (doubled,) = ctx.batched("double", [inputs], double)
    ctx.progress(1, 1, "after the pass")
    return BatchProbeOutput(doubled=doubled, pid=os.getpid())
