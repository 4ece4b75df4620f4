"""The one settings object of ForgeFlow.

Every knob is an environment variable with the ``FORGEFLOW_`` prefix (or a ``.env`` file), so the
API, the CLI, flow-run processes and sandboxed workers on other machines all read the same values.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from forgeflow.canonical import MAX_STAGES

#: Default of ``max_upload_bytes`` and ``max_media_bytes``: a whole match. A 90-minute broadcast is
#: 1-3 GB at 720p and 5-10 GB at 1080p (8-15 Mbit/s); 16 GiB takes 90 minutes at up to ~25 Mbit/s.
#: Neither limit costs memory (uploads, fetches and reads stream), only the disk the file takes.
MATCH_MEDIA_BYTES = 16 * 1024**3

_COUNTS_FORMS = 'a JSON object like {"cpu": 2, "cuda:0": 1}, or name=count pairs like cpu=2,cuda:0=1'
_PATHS_FORMS = f'a folder, several separated by "{os.pathsep}", or a JSON list like ["/data/a", "/data/b"]'


class InvalidSettings(SystemExit):
    """A ``FORGEFLOW_*`` setting that does not parse: start-up stops with a message naming the
    variable, the value and the forms it accepts (a SystemExit: the command ends with the message)."""


def _default_home() -> Path:
    return Path.home() / ".forgeflow"


class Settings(BaseSettings):
    """ForgeFlow configuration, read from ``FORGEFLOW_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="FORGEFLOW_", env_file=".env", extra="ignore")

    home: Path = Field(default_factory=_default_home, description="State folder: databases, media, spool, logs.")

    # --- plugins and runners -------------------------------------------------------------------
    runner: Literal["process", "docker", "inline"] = Field(
        "process", description="How stages run: sandboxed process (default), Docker container, or inline (tests only)."
    )
    reuse_workers: bool = Field(
        True,
        description="Keep one warm worker process per plugin (models stay loaded); false = fresh process per call.",
    )
    stage_memory_limit_mb: int = Field(4096, ge=64, description="Default memory limit of one stage call.")
    worker_startup_timeout_s: float = Field(120.0, gt=0, description="Time a worker may take to import its plugin.")
    worker_fork_server: bool = Field(
        True,
        description="Fork the workers of plugins with preload modules (torch) from one process that imported them.",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="Threads torch may use in a worker; default: the CPUs the process may use."
    )
    pool_size: int = Field(
        2, ge=1, le=64, description="Most worker processes one plugin may have at once (busy or idle)."
    )
    pool_sizes: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict,
        description='Per-plugin pool sizes, e.g. {"pose-estimator": 3} or pose-estimator=3; others use pool_size.',
    )
    idle_worker_memory_mb: int = Field(
        6144, ge=0, description="Resident memory idle warm workers may keep in all; past it the least recently used go."
    )
    device_slots: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict,
        description='Concurrent stages per device, e.g. {"cpu": 2, "cuda:0": 1}; default: one per CPU core for '
        '"cpu" and 1 per GPU. Stages beyond the slots wait (and say so).',
    )
    batching: bool = Field(
        True,
        description="Let the engine group concurrent calls of a batchable tool (same plugin, version, tool and "
        "config) from different jobs into one call of one warm worker; whether their model passes are joined "
        "is the tool's choice (the built-in vision tools join them only with vision_joined_passes).",
    )
    batch_max_size: int = Field(
        8, ge=1, le=256, description="Most calls in one batch, unless the tool or batch_sizes says otherwise."
    )
    batch_max_wait_ms: float = Field(
        10.0,
        ge=0,
        le=10_000,
        description="Longest a batchable call waits for others to join its batch (it also gathers while the "
        "device is busy); unless the tool or batch_waits_ms says otherwise.",
    )
    batch_sizes: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict,
        description='Per-tool batch sizes, e.g. {"pose-estimator.estimate_poses": 16} or '
        "pose-estimator.estimate_poses=16; 1 turns batching off for that tool.",
    )
    batch_waits_ms: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=dict,
        description='Per-tool longest waits in ms, e.g. {"pose-estimator.estimate_poses": 5}.',
    )
    vision_joined_passes: bool = Field(
        False,
        description="The built-in vision tools run a cross-job batch through one forward pass (faster on a GPU; "
        "results equal to ~1e-4, not byte for byte) instead of one pass per call inside the batch.",
    )
    reuse_outputs: bool = Field(
        True,
        description="Let a stage reuse what an earlier stage of the same job computed (ctx.cache): same bytes, less work.",
    )
    engine_socket: Path | None = Field(None, description="The engine's Unix socket (default: <home>/engine.sock).")
    use_engine: bool = Field(
        True, description="Run jobs and stage calls on this host's long-lived engine (warm models) when it is running."
    )
    auto_engine: bool = Field(
        True,
        description="`forgeflow run` with no engine running starts this host's engine in the background (logs under "
        "<home>/logs) and runs the job on it, so the next run finds the models warm; false: the job runs in the "
        "command's own process (as `forgeflow run --no-engine`).",
    )
    engine_idle_stop_s: float = Field(
        300.0,
        ge=0,
        description="An engine that `forgeflow run` started stops itself (workers, its Prefect server, socket) "
        "after this many seconds without a job or stage call; 0: never. One started with `forgeflow engine start` "
        "runs until stopped unless given --idle-stop.",
    )
    prefect_db_cache: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "forgeflow",
        description="Where an empty, migrated Prefect database is kept per Prefect version: the local Prefect "
        "server of a new home (the engine's, `forgeflow serve`'s) starts from it instead of migrating one (seconds).",
    )
    docker_image: str = Field("forgeflow-worker:cpu", description="Image the docker runner starts per stage.")
    docker_gpus: bool = Field(False, description="Request all GPUs for docker stages (needs the nvidia runtime).")

    # --- media -----------------------------------------------------------------------------------
    media_input_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Local folders whose files may be given as job input paths (besides media refs): "
        + _PATHS_FORMS
        + ".",
    )
    max_media_bytes: int = Field(
        MATCH_MEDIA_BYTES,
        gt=0,
        description="Largest image or video a stage reads, a worker host fetches or a tool stores (16 GiB: a "
        "whole match).",
    )
    max_frames: int | None = Field(
        None,
        gt=0,
        description="Most frames a stage reads from one video; none by default (the stage timeout is the guard). "
        "A video cut by it is never silent: the stage reports the frames it has and read, the envelope says "
        "`truncated`, and a pipeline_stage_warning message goes out.",
    )
    max_pixels: int = Field(8192 * 8192, gt=0, description="Largest frame (width x height) a stage decodes.")
    annotate_media: bool = Field(
        True,
        description="Draw a job's result (players, poses, actions) on its input media and store it (H.264 MP4 or "
        "JPEG), referenced from the envelope's annotated_media; false: no annotated media.",
    )

    # --- pipelines -------------------------------------------------------------------------------
    max_stages: int = Field(32, ge=1, le=MAX_STAGES, description="Most stages in one pipeline.")
    max_output_bytes: int = Field(
        64 * 1024**2,
        ge=1024,
        description="Largest output of one stage as JSON (an OutputError above it, raised in the worker before "
        "the result leaves it): large data belongs in the media store (ctx.media), passed on as refs.",
    )
    frame_chunk_frames: int = Field(
        256,
        ge=1,
        le=1_000_000,
        description="Frames per chunk of a per-frame output (players, poses, actions): an output of more frames "
        "is written as a chunked Parquet artifact in the media store and passed on by ref; one of at most this "
        "many frames stays inline JSON.",
    )
    max_artifact_bytes_per_job: int = Field(
        64 * 1024**3,
        gt=0,
        description="Disk budget of one job's per-frame artifacts, all stages together (an ArtifactBudgetExceeded "
        "error above it).",
    )
    progress_interval_s: float = Field(
        0.5,
        ge=0,
        le=60,
        description="Least time between two in-stage progress messages of one stage (ctx.progress is "
        "rate-limited to this; the last one, done == total, always goes through).",
    )
    max_stage_timeout_s: float = Field(6 * 3600.0, gt=0, description="Upper bound of a stage timeout.")
    max_stage_memory_mb: int | None = Field(
        None, ge=64, description="Upper bound of a stage's memory_limit_mb (default: this host's physical memory)."
    )

    # --- API service -----------------------------------------------------------------------------
    api_host: str = Field("127.0.0.1", description="Bind address; anything but loopback requires api_token.")
    api_port: int = Field(8700, ge=0, le=65535, description="TCP port the API listens on.")
    api_token: SecretStr | None = Field(
        None, description="A bearer token with every scope (read, run, admin), named 'api-token' in the records."
    )
    api_tokens_file: Path | None = Field(
        None,
        description="JSON or TOML file of named tokens, each {name, scopes, sha256}: only the SHA-256 of each "
        "token (`forgeflow tokens add`); read again when it changes, so tokens rotate without a restart.",
    )
    submit_rate_per_minute: float = Field(
        120.0,
        ge=0,
        description="Job submissions one token may make per minute, on average (0: no limit); past it 429 "
        "with Retry-After.",
    )
    submit_burst: int = Field(
        60, ge=1, description="Job submissions one token may make at once before the rate applies."
    )
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite file in home.")
    max_upload_bytes: int = Field(
        MATCH_MEDIA_BYTES,
        gt=0,
        description="Largest media upload (413 above it; 16 GiB: a whole match). Uploads stream to disk: memory "
        "does not grow with their size.",
    )
    max_request_bytes: int = Field(
        16 * 1024**2, gt=0, description="Largest JSON request body (413 above it; media uploads have their own limit)."
    )
    max_job_input_bytes: int = Field(
        1024**2, gt=0, description="Largest job input as JSON (422 above it): big data belongs in the media store."
    )
    max_concurrent_jobs: int = Field(
        8, ge=1, description="Jobs the engine runs at once (stages still wait for device slots)."
    )
    batch_max_concurrency: int = Field(
        8, ge=1, description="Jobs of one batch that run at once, unless the batch says its own max_concurrency."
    )
    batch_max_attempts: int = Field(
        3,
        ge=1,
        description="Attempts a batch file gets when its job crashes (its host or engine lost); a file that fails "
        "for a reason of its own (corrupt media, a plugin error) is not retried.",
    )
    batch_max_files: int = Field(10_000, ge=1, description="Most files one batch takes.")
    ws_queue_size: int = Field(1000, ge=10, description="Messages buffered per WebSocket client before it is dropped.")
    ws_ping_interval_s: float = Field(20.0, gt=0, description="Seconds between WebSocket pings to each client.")
    http_keep_alive_s: float = Field(
        30.0,
        gt=0,
        le=600,
        description="How long the API keeps an idle HTTP connection open. Longer than clients keep theirs "
        "(httpx: 5 s), so the client closes an idle connection first and never sends a request on one the "
        "server is closing (a read error under load).",
    )
    ws_compression: bool = Field(
        False,
        description="Compress WebSocket messages (permessage-deflate) for clients that offer it. Off: a "
        "message is compressed once per client, which was the largest part of fanning one out to 100 "
        "clients, and the messages are small JSON.",
    )

    # --- how the API runs jobs -------------------------------------------------------------------
    launch: Literal["local", "deployment"] = Field(
        "local",
        description="How the API runs a job: on this host's engine (local), or as a flow run of the "
        "Prefect deployment `deployment` that a Prefect worker picks up (deployment).",
    )
    deployment: str = Field(
        "forgeflow-pipeline/pipeline", min_length=3, description="The deployment jobs run as in deployment mode."
    )
    flow_run_poll_s: float = Field(
        1.0, gt=0, le=60, description="How often the API reads the state of a job's flow run in deployment mode."
    )
    event_linger_ms: float = Field(
        10.0,
        ge=0,
        le=1000,
        description="How long a host's event sender waits for more messages before it posts a batch to the "
        "API (a job's last message goes at once): fewer, larger requests for a few ms of latency.",
    )
    heartbeat_interval_s: float = Field(
        5.0, gt=0, le=300, description="How often a flow run tells the API that its running jobs are alive."
    )
    heartbeat_timeout_s: float = Field(
        15.0,
        gt=0,
        description="A running job of deployment mode whose host said nothing for this long has lost its host: "
        "the API ends it crashed (and marks its flow run Crashed).",
    )

    # --- where flow runs send their events -------------------------------------------------------
    api_url: str | None = Field(None, description="Base URL of the API service that ingests flow-run events.")
    ingest_token: SecretStr | None = Field(None, description="Token for the internal event ingest endpoint.")

    @field_validator("media_input_roots", mode="before")
    @classmethod
    def _paths(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON list ({exc.msg}); use {_PATHS_FORMS}") from None
        return [part for part in text.split(os.pathsep) if part.strip()]

    @field_validator("pool_sizes", "device_slots", "batch_sizes", "batch_waits_ms", mode="before")
    @classmethod
    def _counts(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("{"):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON object ({exc.msg}); use {_COUNTS_FORMS}") from None
        counts = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, count = part.rpartition("=")
            if not sep or not name.strip():
                raise ValueError(f"{part!r} is not name=count; use {_COUNTS_FORMS}")
            counts[name.strip()] = count.strip()
        return counts

    @property
    def has_api_tokens(self) -> bool:
        """Whether the API asks callers for a token (``api_token`` or a tokens file)."""
        return self.api_token is not None or self.api_tokens_file is not None

    @property
    def media_root(self) -> Path:
        return self.home / "media"

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def checkpoints_dir(self) -> Path:
        """Checkpoints of calls, for jobs that resume (:mod:`forgeflow.plugins.checkpoints`)."""
        return self.home / "checkpoints"

    @property
    def engine_socket_path(self) -> Path:
        return self.engine_socket or self.home / "engine.sock"

    def to_env(self) -> dict[str, str]:
        """These settings as ``FORGEFLOW_*`` variables: what a child process (engine, worker) reads back.

        Secrets (the API and ingest tokens) are left out: plugin code runs in those children."""
        import json

        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                continue
            if isinstance(value, (dict, list)):
                text = json.dumps(value, default=str)
            elif isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = str(value)
            env[f"FORGEFLOW_{name.upper()}"] = text
        return env

    def stage_memory_cap_mb(self) -> int:
        """The largest ``memory_limit_mb`` a stage may ask for on this host."""
        if self.max_stage_memory_mb is not None:
            return self.max_stage_memory_mb
        import psutil

        return int(psutil.virtual_memory().total // 2**20)

    def pool_size_of(self, plugin: str) -> int:
        return int(self.pool_sizes.get(plugin, self.pool_size))

    @property
    def lifecycle_db(self) -> Path:
        return self.home / "plugins.sqlite"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'forgeflow.sqlite'}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached; call ``get_settings.cache_clear()`` after changing env).

    Raises :class:`InvalidSettings` naming every variable that does not parse."""
    try:
        return Settings()
    except ValidationError as exc:
        raise InvalidSettings(explain(exc)) from None
    except SettingsError as exc:
        raise InvalidSettings(f"ForgeFlow cannot start: {exc}") from None


def explain(exc: ValidationError) -> str:
    """A settings error as a person reads it: each variable, its value, what is wrong, what it accepts."""
    lines = ["ForgeFlow cannot start: a FORGEFLOW_* setting is invalid."]
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else ""
        field = Settings.model_fields.get(name)
        variable = f"FORGEFLOW_{name.upper()}"
        value = os.environ.get(variable, err.get("input"))
        line = f"  {variable}={value!r}: {err['msg']}"
        if field is not None and field.description:
            line += f" (expected: {field.description})"
        lines.append(line)
    return "\n".join(lines)
