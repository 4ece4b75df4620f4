"""The one interface every sandboxed runner implements: run one tool call, safely.

A runner takes a :class:`ToolCall` (plugin, tool, config, inputs, hard timeout, memory limit) and
always returns a :class:`CallResult`: ok + outputs, or an error with ``error_type`` and message.
It never raises for anything the plugin does: exceptions, hangs, memory blow-ups and interpreter
crashes are all reported as failed results. It also records the plugin's lifecycle transitions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, NotRequired, Protocol, TypedDict, Unpack

from pydantic import BaseModel, Field, JsonValue, PlainSerializer, computed_field

from forgeflow.canonical import whole_if_integral
from forgeflow.pipeline.definition import RunnerKind
from forgeflow.plugins.errors import ForgeFlowError
from forgeflow.plugins.sdk import FramesRead

__all__ = [
    "CallResult",
    "FramesRead",
    "PoolRow",
    "PoolStatus",
    "Progress",
    "ProgressCallback",
    "Runner",
    "ToolCall",
    "WorkerRow",
]


class ToolCall(BaseModel):
    """One invocation of one tool, as a runner receives it."""

    plugin: str = Field(description="Canonical plugin name (aliases resolved).")
    tool: str
    config: dict[str, Any] = Field(default_factory=dict)
    inputs: dict[str, Any] = Field(default_factory=dict)
    timeout_s: float = Field(300.0, gt=0)
    memory_limit_mb: int | None = Field(None, ge=16)
    job_id: str | None = None
    stage_index: int | None = None
    runner: RunnerKind | None = Field(
        None, description="The runner this call asks for (the stage's or its pipeline's); None: the host's default."
    )
    artifact_budget_bytes: int | None = Field(
        None,
        ge=0,
        description="Disk the call's per-frame artifacts may take (what the job has left); None: the host's.",
    )
    checkpoint_key: str | None = Field(
        None, max_length=128, description="The call's key: where its chunks are journalled (a resumable tool's)."
    )
    resume: bool = Field(False, description="The job resumes: a resumable tool continues after its journalled chunks.")


class ResultDetails(TypedDict, total=False):
    """What a failed :class:`CallResult` may say besides its error (:meth:`CallResult.failure`)."""

    traceback: str | None
    result_size_bytes: int
    peak_memory_mb: float | None
    reused_outputs: int
    computed_outputs: int
    frames: FramesRead | None


class CallResult(BaseModel):
    """What came of a :class:`ToolCall`."""

    ok: bool
    outputs: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None
    traceback: str | None = None
    duration_ms: float = 0.0
    result_size_bytes: int = 0
    peak_memory_mb: float | None = None
    reused_outputs: int = Field(
        0, description="Values this call read from the job's cache (ctx.cache) instead of computing."
    )
    computed_outputs: int = Field(0, description="Cacheable values this call computed.")
    frames: FramesRead | None = Field(None, description="How much of its media the call read (None: it read none).")

    @classmethod
    def failure(
        cls, kind: type[ForgeFlowError] | str, error: str, duration_ms: float = 0.0, **extra: Unpack[ResultDetails]
    ) -> CallResult:
        """A failed result; ``kind`` is the error's class (its ``error_type`` travels) or, for an
        error of the plugin's own, the name of its exception class."""
        error_type = kind if isinstance(kind, str) else kind.error_type
        return cls(ok=False, error=error, error_type=error_type, duration_ms=duration_ms, **extra)


class Progress(BaseModel):
    """How far a running call is, as its tool reported through ``ctx.progress(done, total, message)``."""

    done: Annotated[float, PlainSerializer(whole_if_integral)] = Field(ge=0)
    total: Annotated[float, PlainSerializer(whole_if_integral)] | None = Field(None, gt=0)
    message: str | None = None
    rate: float | None = Field(None, ge=0, description="Units a second since the call started (set by the job).")
    eta_s: float | None = Field(None, ge=0, description="Seconds left at that rate (set by the job).")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def fraction(self) -> float | None:
        """``done / total`` (at most 1); None when ``total`` is."""
        return min(1.0, self.done / self.total) if self.total else None

    @classmethod
    def from_message(cls, message: Mapping[str, JsonValue]) -> Progress | None:
        """A worker's ``progress`` message, or None when it is malformed (a plugin cannot break the call)."""
        try:
            return cls.model_validate({k: message.get(k) for k in ("done", "total", "message")})
        except ValueError:
            return None


#: Receives a running call's progress; called from the runner's thread, must not block long.
ProgressCallback = Callable[[Progress], None]


class Runner(Protocol):
    """Runs tool calls in isolation and reports lifecycle transitions."""

    name: str

    def run(self, call: ToolCall, on_progress: ProgressCallback | None = None) -> CallResult:
        """Run ``call``; ``on_progress`` (if given) receives the tool's progress while it runs."""
        ...

    def close(self) -> None:
        """Stop every worker this runner started."""


class WorkerRow(TypedDict):
    """One worker of a runner's pools, as its ``status()`` shows it."""

    plugin: str
    pid: int
    state: Literal["idle", "busy"]
    job_id: str | None
    calls: int
    model_loads: int
    rss_mb: float
    idle_s: float | None
    container: NotRequired[str | None]  # the docker runner's: the container's short id
    runner: NotRequired[str]  # the runner set's: which runner the worker is of


class PoolRow(TypedDict):
    """One plugin's pool of a runner, as its ``status()`` shows it."""

    plugin: str
    size: int
    busy: int
    idle: int
    starting: int
    waiting_calls: int
    runner: NotRequired[str]  # the runner set's: which runner the pool is of


class PoolStatus(TypedDict):
    """A pool runner's ``status()``: its workers and pools (the engine's status shows its fields)."""

    workers: list[WorkerRow]
    pools: list[PoolRow]
    idle_memory_mb: float
    idle_memory_budget_mb: int
    evicted: int
    runners: NotRequired[list[str]]  # the runner set's: the runners it has started
