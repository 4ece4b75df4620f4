"""The plugin SDK: what a plugin author writes against.

A plugin is a :class:`Plugin` object exposed through an entry point in the group
``forgeflow.plugins``. Each tool declares a pydantic config model (its defaults), an input model
and an output model, and a run function ``fn(inputs, config, ctx) -> output``. The engine reads the
models' JSON Schemas to validate a pipeline before anything runs, so they are the tool's manifest.

Heavy resources (model weights) are loaded through :func:`resource`, which caches per worker
process: a warm worker keeps them for every later call.
"""

from __future__ import annotations

import functools
import inspect
import math
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, ParamSpec, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from forgeflow.plugins import frames
from forgeflow.plugins.batching import BatchGather, BatchSpec, GroupFn
from forgeflow.plugins.cache import OutputCache
from forgeflow.plugins.checkpoints import Checkpoints
from forgeflow.plugins.errors import ConfigError, InputError, OutputError, PluginUnavailable, format_validation_error
from forgeflow.settings import MATCH_MEDIA_BYTES

if TYPE_CHECKING:
    from pydantic.json_schema import JsonSchemaValue

    from forgeflow.canonical import JsonObject
    from forgeflow.plugins.media import MediaStore
    from forgeflow.plugins.media_reader import MediaReader

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")

__all__ = [
    "DRAW_KINDS",
    "BatchSpec",
    "DrawKind",
    "EmptyModel",
    "Plugin",
    "Tool",
    "ToolContext",
    "format_validation_error",
    "resource",
]


class EmptyModel(BaseModel):
    """Config or input model of a tool that takes nothing."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class ToolContext:
    """What a running tool may use besides its inputs and config.

    ``media`` opens images and videos by media ref (``sha256:...``) or by a local path inside the
    allowed input roots, with the host's limits applied. ``put_media`` stores a file the tool made
    (an annotated video, say) and returns its ref. ``cache`` keeps what the tool computed for later
    stages of the same job (see :mod:`forgeflow.plugins.cache`). ``progress`` tells whoever watches
    the job how far the tool is (a ``pipeline_stage_progress`` message).
    """

    media_store: MediaStore
    input_roots: list[Path] = field(default_factory=list)
    max_bytes: int = MATCH_MEDIA_BYTES
    max_frames: int | None = None
    max_pixels: int = 8192 * 8192
    #: Records per chunk of a ``FrameStream`` output (see :mod:`forgeflow.plugins.frames`).
    chunk_frames: int = 256
    #: Disk the call's per-frame artifacts may still take (None: no budget).
    artifact_budget_bytes: int | None = None
    #: Where the call's chunks are journalled (:mod:`forgeflow.plugins.checkpoints`), under its key.
    checkpoints: Checkpoints = field(default_factory=Checkpoints)
    checkpoint_key: str | None = None
    #: The job resumes an earlier attempt: a resumable tool continues after its journalled chunks.
    resume: bool = False
    #: Set for a resumable tool that resumes: its per-frame outputs hold every frame up to this one
    #: already, so it may start after it (records up to it are dropped either way).
    resume_after: int | None = None
    job_id: str | None = None
    stage_index: int | None = None
    plugin: str = ""
    tool: str = ""
    cache: OutputCache = field(default_factory=OutputCache)
    #: Where :meth:`progress` sends ``{done, total, message}`` (set by the worker; None: nowhere).
    progress_sink: Callable[[JsonObject], None] | None = field(default=None, repr=False)
    progress_interval_s: float = 0.5
    #: The batch this call is part of (set by the worker; None: the call runs alone).
    gather: BatchGather | None = field(default=None, repr=False)
    _progress_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _progress_sent_at: float | None = field(default=None, init=False, repr=False)
    _readers: list[MediaReader] = field(default_factory=list, init=False, repr=False)
    _tool_reports: bool = field(default=False, init=False, repr=False)
    _progress_sent: JsonObject | None = field(default=None, init=False, repr=False)

    def progress(self, done: float, total: float | None, message: str | None = None) -> None:
        """Report that ``done`` of ``total`` units (frames, say) are done; ``total`` None when unknown.

        Cheap to call every frame: reports closer together than ``FORGEFLOW_PROGRESS_INTERVAL_S``
        are dropped, except the last one (``done >= total``), and so is a report equal to the one
        sent before it. ``done`` above ``total`` counts as ``total``; ``message`` is cut to 200
        characters. Raises ``ValueError`` for a negative or non-finite ``done`` or a ``total`` that is
        not positive.
        """
        if isinstance(done, bool) or not isinstance(done, (int, float)) or not math.isfinite(done) or done < 0:
            raise ValueError(f"ctx.progress: done must be a finite number >= 0, got {done!r}")
        if total is not None and (
            isinstance(total, bool) or not isinstance(total, (int, float)) or not math.isfinite(total) or total <= 0
        ):
            raise ValueError(f"ctx.progress: total must be a finite number > 0 or None, got {total!r}")
        self._tool_reports = True
        self._send(done, total, message)

    def frames_written(self, frames: int) -> None:
        """The SDK stored another chunk of a per-frame output: progress for a tool that reports none
        of its own (it keeps a long stage's timeout, which counts from its last progress, from firing)."""
        if not self._tool_reports:
            self._send(frames, None, f"{frames} frames written")

    def _send(self, done: float, total: float | None, message: str | None) -> None:
        if total is not None:
            done = min(done, total)
        final = total is not None and done >= total
        now = time.monotonic()
        with self._progress_lock:
            sink = self.progress_sink
            if sink is None:
                return
            sent_at = self._progress_sent_at
            if not final and sent_at is not None and now - sent_at < self.progress_interval_s:
                return
            report: JsonObject = {
                "done": done,
                "total": total,
                "message": None if message is None else str(message)[:200],
            }
            if report == self._progress_sent:  # a final report that repeats the last one says nothing new
                return
            self._progress_sent_at, self._progress_sent = now, report
            sink(report)

    def batched(self, key: Hashable, items: Sequence[T], fn: GroupFn[T, R]) -> list[R]:
        """This call's results of ``fn``, one per item, in order: ``fn(groups)`` takes one list of
        items per call and returns one list of results per call.

        Alone, that is ``fn([items])[0]``. In a batch (a tool declared with ``batch=`` that the engine
        gave several jobs' calls at once), the calls that ask with an equal ``key`` at about the same
        time go through one ``fn`` with a group each (one model call for all of them). ``key`` says
        which calls may join: put in it whatever the results depend on besides the items (model,
        device, thresholds). To keep batched results byte-identical to unbatched ones, ``fn`` must
        give each group what it would give it alone: a model whose output depends on what else
        shares its forward pass (most convolution kernels, in the last float bits) runs each group
        as its own pass."""
        if self.gather is None:
            return BatchGather.alone(items, fn)
        return self.gather.call(key, items, fn)

    def end_progress(self) -> None:
        """The call is over: later reports (from a thread the tool left running) go nowhere."""
        with self._progress_lock:
            self.progress_sink = None

    def media(self, source: str) -> MediaReader:
        from forgeflow.plugins.media_reader import MediaReader

        path = self.media_store.resolve(source, input_roots=self.input_roots)
        reader = MediaReader(path, max_bytes=self.max_bytes, max_frames=self.max_frames, max_pixels=self.max_pixels)
        self._readers.append(reader)
        return reader

    def frames_seen(self) -> FramesRead | None:
        """How much of its media the call read, over every reader it opened (None: it opened none):
        the stage report's ``media_frames``/``frames_read``/``truncated``, so no cut goes unsaid."""
        if not self._readers:
            return None
        return FramesRead(
            media_frames=max(r.frame_count for r in self._readers),
            frames_read=max(r.frames_read for r in self._readers),
            truncated=any(r.truncated for r in self._readers),
            max_frames=self.max_frames,
        )

    def put_media(self, path: Path, filename: str | None = None) -> str:
        return self.media_store.put_file(path, filename=filename).ref


class FramesRead(BaseModel):
    """Frames in a call's media and frames it read: a cut is never silent (``truncated``: the host's
    ``FORGEFLOW_MAX_FRAMES`` stopped reading before the media's end)."""

    media_frames: int = Field(ge=0)
    frames_read: int = Field(ge=0)
    truncated: bool = False
    max_frames: int | None = None


#: A tool's function: ``fn(inputs, config, ctx)``, inputs and config as the tool's own models, returning
#: its output model (or what validates as it).
RunFn = Callable[..., object]
F = TypeVar("F", bound=RunFn)


#: How a job's annotated media (:mod:`forgeflow.jobs.annotate`) draws the items of an output field a
#: tool declares in ``draws`` (per-frame records ``{frame_index, <field>: [item, ...]}``, or a list of
#: items for an image):
#:
#: * ``boxes``: ``{box: [x1, y1, x2, y2], track_id?, confidence?, class_name?}``, a box and its label;
#: * ``poses``: ``{keypoints: [[x, y, confidence], ...] (COCO-17), track_id?, box, player_index?}``;
#: * ``labels``: ``{player_index, action, confidence?}``, a text under the ``boxes`` item it names.
DrawKind = Literal["boxes", "poses", "labels"]
#: Every :data:`DrawKind`, in the order they are drawn.
DRAW_KINDS: tuple[DrawKind, ...] = get_args(DrawKind)


@dataclass(frozen=True)
class Tool:
    """One callable capability of a plugin, with typed config, inputs and outputs."""

    name: str
    description: str
    config_model: type[BaseModel]
    input_model: type[BaseModel]
    output_model: type[BaseModel]
    fn: RunFn = field(repr=False)
    plugin_name: str = ""
    #: Its per-frame outputs depend on each frame alone (no state carried from frame to frame), so a
    #: retried call may continue after the chunks an interrupted attempt wrote (``ctx.resume_after``).
    resumable: bool = False
    #: The tool takes batches: the engine may join concurrent calls of it from different jobs (its
    #: model passes meet in :meth:`ToolContext.batched`); None: every call runs alone.
    batch: BatchSpec | None = None
    #: The output fields a job's annotated media draws, and as what (``(field, kind)`` pairs): what
    #: the job's stage loop draws is what its tools declare here, never a field it knows by name.
    draws: tuple[tuple[str, DrawKind], ...] = ()

    def schemas(self) -> dict[str, JsonSchemaValue]:
        """JSON Schemas of config, input and output (the tool's manifest)."""
        return {
            "config": self.config_model.model_json_schema(),
            "input": self.input_model.model_json_schema(),
            "output": self.output_model.model_json_schema(),
        }

    def parse_config(self, config: Mapping[str, JsonValue] | None) -> BaseModel:
        try:
            return self.config_model.model_validate(config or {})
        except ValidationError as exc:
            raise ConfigError(
                f"{self.plugin_name}.{self.name}: invalid config: {format_validation_error(exc)}",
                plugin=self.plugin_name,
                tool=self.name,
            ) from None

    def parse_inputs(self, inputs: Mapping[str, JsonValue], store: MediaStore | None = None) -> BaseModel:
        """The inputs as the tool's input model. A frames artifact (a per-frame output passed by ref) is
        opened from ``store``: a ``FrameStream`` field reads it as the tool iterates, a ``list`` field
        gets every record. Without a store (a call checked before it runs) artifacts are not read:
        they stand for valid streams of their kind."""
        opened = {
            name: self._open_frames(name, value, store)
            for name, value in inputs.items()
            if frames.is_frames(value) or frames.is_live(value)
        }
        try:
            return self.input_model.model_validate({**inputs, **opened})
        except ValidationError as exc:
            raise InputError(
                f"{self.plugin_name}.{self.name}: invalid input: {format_validation_error(exc)}",
                plugin=self.plugin_name,
                tool=self.name,
            ) from None

    def _open_frames(
        self, name: str, value: frames.FramesDescriptor | frames.LiveFeed, store: MediaStore | None
    ) -> list[JsonObject] | frames.FrameStream[BaseModel]:
        record_type = frames.frame_fields(self.input_model).get(name)
        if record_type is None:  # a list field: every record, in memory
            return list(frames.iter_frame_records(value, store)) if store is not None else []
        if store is None:
            count = value.get("frames") if frames.is_frames(value) else None
            return frames.FrameStream((), record_type, frames=count)
        return frames.open_stream(value, record_type, store)

    def invoke(
        self, config: Mapping[str, JsonValue] | None, inputs: Mapping[str, JsonValue], ctx: ToolContext
    ) -> JsonObject:
        """Validate, run, validate the output, and return it as JSON-ready data.

        ``FrameStream`` inputs read artifacts from ``ctx.media_store`` as the tool iterates them (a
        plain ``list`` input gets the records read into a list); ``FrameStream`` outputs are pulled
        record by record and written chunk by chunk (:mod:`forgeflow.plugins.frames`)."""
        cfg = self.parse_config(config)
        data = self.parse_inputs(inputs, ctx.media_store)
        writers = self._writers(ctx)
        out = self.fn(data, cfg, ctx)
        try:
            model = out if isinstance(out, self.output_model) else self.output_model.model_validate(out)
        except ValidationError as exc:
            raise OutputError(
                f"{self.plugin_name}.{self.name} returned invalid output: {format_validation_error(exc)}",
                plugin=self.plugin_name,
                tool=self.name,
            ) from None
        result: JsonObject = model.model_dump(mode="json", exclude=set(writers))
        for name, writer in writers.items():
            writer.budget_bytes = ctx.artifact_budget_bytes
            result[name] = writer.write_all(getattr(model, name))
            if ctx.artifact_budget_bytes is not None:
                ctx.artifact_budget_bytes -= writer.size_bytes
        return result

    def _writers(self, ctx: ToolContext) -> dict[str, frames.FrameWriter]:
        """A writer per ``FrameStream`` output, journalling its chunks; a resumable tool's start with
        those of an earlier attempt when the job resumes (``ctx.resume_after``: where all of them end)."""
        writers = {
            name: frames.FrameWriter(
                store=ctx.media_store,
                record_type=record_type,
                field_name=name,
                chunk_frames=ctx.chunk_frames,
                label=f"{self.plugin_name}.{self.name}",
                # every chunk is journalled: a checkpoint (for a resumable tool) and the feed that a
                # next stage reads while this one still writes
                journal=ctx.checkpoints.journal(ctx.checkpoint_key, name),
                on_chunk=ctx.frames_written,
            )
            for name, record_type in frames.frame_fields(self.output_model).items()
        }
        if self.resumable and ctx.resume and writers:
            ends = [writer.resume() for writer in writers.values()]
            ctx.resume_after = None if None in ends else min(e for e in ends if e is not None)
        else:
            for writer in writers.values():
                writer.restart()
        return writers


class Plugin:
    """A named, versioned set of tools; expose one instance through an entry point.

    Example::

        plugin = Plugin("greeter", "1.0.0", aliases=["hello"])

        @plugin.tool(input=GreetIn, output=GreetOut, config=GreetConfig)
        def greet(inputs: GreetIn, config: GreetConfig, ctx: ToolContext) -> GreetOut:
            '''Say hello.'''
            return GreetOut(text=f"{config.greeting}, {inputs.name}")
    """

    def __init__(
        self,
        name: str,
        version: str,
        *,
        aliases: list[str] | tuple[str, ...] = (),
        description: str = "",
        preload: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.version = version
        self.aliases = tuple(aliases)
        self.description = description
        # Modules a worker imports when it starts, before any call's memory limit applies: heavy
        # frameworks (torch maps ~4 GB of address space on import) load once, outside the budget.
        # The process runner imports them once in a fork server and forks the workers from it.
        self.preload = tuple(preload)
        self.tools: dict[str, Tool] = {}
        self._availability_check: Callable[[], str | None] | None = None

    def __repr__(self) -> str:
        return f"Plugin({self.name!r}, {self.version!r}, tools={sorted(self.tools)})"

    def tool(
        self,
        name: str | None = None,
        *,
        input: type[BaseModel] = EmptyModel,
        output: type[BaseModel],
        config: type[BaseModel] = EmptyModel,
        description: str | None = None,
        resumable: bool = False,
        batch: BatchSpec | bool | None = None,
        draws: Mapping[str, DrawKind] | None = None,
    ) -> Callable[[F], F]:
        """Register ``fn(inputs, config, ctx)`` as a tool (its name defaults to the function's).

        ``resumable=True``: the tool's per-frame outputs depend on each frame alone, so a retried job
        continues it after the chunks an interrupted attempt wrote; the tool may skip to
        ``ctx.resume_after`` (records up to it are dropped anyway).

        ``batch=BatchSpec(max_batch=..., max_wait_ms=...)`` (or ``True`` for the host's defaults):
        the tool takes batches. The engine may give one warm worker the concurrent calls of several
        jobs with the same config; each still runs ``fn`` with its own inputs and ``ctx``, and the
        model passes it routes through :meth:`ToolContext.batched` run once for all of them.

        ``draws={"players": "boxes"}``: output fields a job draws on its input media (its annotated
        media), each as a :data:`DrawKind`; a field the output model lacks or an unknown kind is a
        ``ValueError`` here."""
        spec = BatchSpec() if batch is True else (batch or None)
        drawn = tuple((draws or {}).items())
        for field_name, kind in drawn:
            if field_name not in output.model_fields:
                raise ValueError(f"draws names {field_name!r}, which the output model {output.__name__} lacks")
            if kind not in DRAW_KINDS:
                raise ValueError(f"draws gives {field_name!r} the kind {kind!r}; known kinds: {', '.join(DRAW_KINDS)}")

        def register(fn: F) -> F:
            tool_name = name or fn.__name__
            if tool_name in self.tools:
                raise ValueError(f"plugin {self.name!r} already has a tool {tool_name!r}")
            if len(inspect.signature(fn).parameters) != 3:
                raise TypeError(f"tool {tool_name!r} must take (inputs, config, ctx)")
            self.tools[tool_name] = Tool(
                name=tool_name,
                description=description or inspect.getdoc(fn) or "",
                config_model=config,
                input_model=input,
                output_model=output,
                fn=fn,
                plugin_name=self.name,
                resumable=resumable,
                batch=spec,
                draws=drawn,
            )
            return fn

        return register

    def availability_check(self, fn: Callable[[], str | None]) -> Callable[[], str | None]:
        """Register a cheap check that returns why the plugin cannot run (or None when it can).

        It runs at discovery in every process, the API's included: test for files and installed
        packages (``importlib.util.find_spec``) here, never import heavy libraries.
        """
        self._availability_check = fn
        return fn

    def unavailable_reason(self) -> str | None:
        if self._availability_check is None:
            return None
        try:
            return self._availability_check()
        except Exception as exc:  # a broken check means the plugin cannot be trusted to run
            return f"availability check failed: {type(exc).__name__}: {exc}"

    def ensure_available(self) -> None:
        reason = self.unavailable_reason()
        if reason:
            raise PluginUnavailable(f"plugin {self.name!r} is unavailable: {reason}", plugin=self.name)


_resource_loads = 0  # how many resource() loads this process has done: a warm worker's count stays put


def resource_loads() -> int:
    """How many times :func:`resource` functions of this process actually loaded (cache misses)."""
    return _resource_loads


def resource(fn: Callable[P, T]) -> Callable[P, T]:
    """Cache what ``fn`` loads for the life of the worker process, per distinct arguments.

    Use it for model weights: the first call of a warm worker loads them, later calls reuse them.
    Thread-safe: concurrent first calls load once.
    """
    cache: dict[Hashable, T] = {}
    lock = threading.Lock()

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        global _resource_loads
        key = (args, tuple(sorted(kwargs.items())))
        with lock:
            if key not in cache:
                cache[key] = fn(*args, **kwargs)
                _resource_loads += 1
            return cache[key]

    wrapper.cache_clear = cache.clear  # type: ignore[attr-defined]
    return wrapper
