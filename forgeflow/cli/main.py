"""The ``forgeflow`` command: run and validate pipelines, list plugins, serve the API."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

# Quiet, offline Prefect for a command-line tool (the user's environment still wins).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")  # the CLI prints its own summary
os.environ.setdefault("PREFECT_UI_ENABLED", "false")
# A loaded 2-core machine needs more than the default 20 s to start the ephemeral server.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from forgeflow.cli.batch import batch
from forgeflow.cli.tokens import tokens_app
from forgeflow.cli.watch import watch
from forgeflow.redact import install_log_redaction

# Every ForgeFlow process a command becomes (API, engine, worker, the stack's parts) logs no credential.
install_log_redaction()


class ProseHelp(typer.core.TyperGroup):
    """A command group whose ``--help`` reads as prose: an option shows the name of its value
    (``--input MEDIA``) or nothing for a flag, never a Python type (``<str>``, ``<bool>``); an argument
    is its plain name (``FILE``, not ``{file} <path>``); a command's summary in a list is its first
    paragraph on one line (not the docstring's own line breaks)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _prose_params(self)
        for command in self.commands.values():
            if command.help and not command.short_help:
                command.short_help = " ".join(command.help.split("\n\n")[0].split())
            if not isinstance(command, typer.core.TyperGroup):  # a group of ours does its own
                _prose_params(command)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _prose_params(self)  # the root's completion options are added after __init__
        super().format_help(ctx, formatter)


def _prose_params(command: Any) -> None:
    """Name a command's parameters as :class:`ProseHelp` says, ``--help`` (made on demand) included."""
    for param in command.params:
        name = (param.metavar or param.name or "").upper()
        if isinstance(param, typer.core.TyperArgument):
            usage = name if param.required else f"[{name}]"
            setattr(param, "display_type_rich", lambda ctx: None)  # noqa: B010 - this instance's own
            setattr(param, "get_usage_pieces", lambda ctx, usage=usage: [usage])  # noqa: B010
            param.metavar = name
        elif isinstance(param, typer.core.TyperOption):
            param.metavar = "" if param.is_flag else name
    make_help_option = command.get_help_option

    def help_option(ctx: Any) -> Any:
        option = make_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    setattr(command, "get_help_option", help_option)  # noqa: B010


app = typer.Typer(
    cls=ProseHelp, help="ForgeFlow: fault-isolated multi-plugin vision pipelines on Prefect.", no_args_is_help=True
)
plugins_app = typer.Typer(cls=ProseHelp, help="Installed plugins and their lifecycle.", no_args_is_help=True)
app.add_typer(plugins_app, name="plugins")
engine_app = typer.Typer(
    cls=ProseHelp, help="This host's engine: warm worker pools shared by every job.", no_args_is_help=True
)
app.add_typer(engine_app, name="engine")
app.add_typer(tokens_app, name="tokens")
app.command("watch")(watch)
app.command("batch")(batch)
console = Console(stderr=True, soft_wrap=True)
out = Console()
#: Largest JSON document coloured on a terminal: highlighting is slow on big ones (a 50 MB result).
HIGHLIGHT_MAX_CHARS = 256 * 1024


def _print_json(text: str) -> None:
    """JSON on stdout: coloured on a terminal when small, else as is (a pipe or file gets plain JSON)."""
    if out.is_terminal and len(text) <= HIGHLIGHT_MAX_CHARS:
        out.print_json(text)
    else:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def _registry() -> Any:
    from forgeflow.plugins.lifecycle import LifecycleStore
    from forgeflow.plugins.registry import PluginRegistry
    from forgeflow.settings import get_settings

    return PluginRegistry.discover(LifecycleStore(get_settings().lifecycle_db))


def _load_document(path: Path) -> dict[str, Any] | list[Any]:
    """Read a pipeline file, turning unreadable or malformed JSON into a clear message and exit 2."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        console.print(f"[red]cannot read {path}: {exc.strerror or exc}[/red]")
        raise typer.Exit(EXIT_INVALID) from None
    try:
        document: dict[str, Any] | list[Any] = json.loads(text)
        return document
    except json.JSONDecodeError as exc:
        console.print(f"[red]{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}[/red]")
        raise typer.Exit(EXIT_INVALID) from None


def _job_input(document: Any, media: Path | None, input_json: str | None) -> dict[str, Any]:
    """The job input: the file's own ``input``, then ``--input-json``, then ``--input`` media."""
    data: dict[str, Any] = dict(document.get("input") or {}) if isinstance(document, dict) else {}
    if input_json:
        text = Path(input_json).read_text(encoding="utf-8") if Path(input_json).is_file() else input_json
        try:
            extra = json.loads(text)
        except json.JSONDecodeError as exc:
            console.print(f"[red]--input-json is not valid JSON: {exc.msg}[/red]")
            raise typer.Exit(EXIT_INVALID) from None
        if not isinstance(extra, dict):
            console.print("[red]--input-json must be a JSON object[/red]")
            raise typer.Exit(EXIT_INVALID)
        data.update(extra)
    if media is not None:
        from forgeflow.plugins import MediaError, MediaStore
        from forgeflow.settings import get_settings

        settings = get_settings()
        try:
            info = MediaStore(settings.media_root).put_file(media, max_bytes=settings.max_media_bytes)
        except MediaError as exc:
            console.print(f"[red]--input {media}: {exc.message}[/red]")
            raise typer.Exit(EXIT_INVALID) from None
        data["media"] = info.ref
    return data


def _print_issues(exc: Any) -> None:
    for issue in exc.issues:
        console.print(f"[red]✗[/red] {issue.location or 'pipeline'}: {issue.message} [dim]({issue.error_type})[/dim]")


def _print_warnings(validated: Any) -> None:
    """What may still run but is likely a mistake, on stderr: the validation's warnings (a stage that
    needs a field only a later stage produces) and a stage asking for a GPU this host lacks."""
    from forgeflow.engine.admission import host_gpu_count

    warnings = [(w.location, w.message, w.error_type) for w in validated.warnings]
    if not host_gpu_count():
        for stage in validated.stages:
            device = str(stage.config.get("device") or "").strip().lower()
            if device.startswith("cuda"):
                warnings.append(
                    (
                        f"stage {stage.index} {stage.name} field 'config.device'",
                        f"asks for {device!r}, but this host has no NVIDIA GPU: run here, the stage fails "
                        "(use 'auto' or 'cpu', or run it on a GPU worker)",
                        "DeviceUnavailable",
                    )
                )
    for location, message, error_type in warnings:
        console.print(f"[yellow]![/yellow] {location}: {message} [dim]({error_type})[/dim]")


@app.command()
def validate(
    file: Path = typer.Argument(..., help="Pipeline JSON file.", metavar="FILE"),
    media: Path | None = typer.Option(
        None, "--input", help="Media file the job would read (checks input types).", metavar="MEDIA"
    ),
    input_json: str | None = typer.Option(
        None, "--input-json", help="Job input as JSON (or a JSON file).", metavar="JSON"
    ),
) -> None:
    """Check a pipeline without running it: plugins, tools, configs, stage compatibility."""
    from forgeflow.pipeline.validation import PipelineValidationError, parse_definition, validate_pipeline

    document = _load_document(file)
    job_input = (
        _job_input(document, media, input_json)
        if (media or input_json or (isinstance(document, dict) and "input" in document))
        else None
    )
    try:
        validated = validate_pipeline(parse_definition(document), job_input, _registry())
    except PipelineValidationError as exc:
        _print_issues(exc)
        raise typer.Exit(EXIT_INVALID) from None
    _print_warnings(validated)
    out.print(f"[green]✓[/green] {file}: valid, {len(validated.stages)} stage(s)")
    for stage in validated.stages:
        out.print(f"  {stage.index}: {stage.name}  → {', '.join(stage.output_fields)}")
    if validated.job_input_fields:
        out.print(f"  job input: {', '.join(validated.job_input_fields)}")


@app.command()
def run(
    file: Path = typer.Argument(..., help="Pipeline JSON file (a definition or the seed's job form).", metavar="FILE"),
    media: Path | None = typer.Option(
        None, "--input", help="Image or video to analyse (becomes input.media).", metavar="MEDIA"
    ),
    input_json: str | None = typer.Option(
        None, "--input-json", help="Job input as JSON (or a JSON file).", metavar="JSON"
    ),
    out_dir: Path | None = typer.Option(
        None,
        "--out",
        help="Write result.json, events.jsonl, one <output>.parquet per per-frame output stored as an artifact "
        "and the job's annotated media (annotated.mp4/.jpg) here.",
        metavar="DIR",
    ),
    job_id: str | None = typer.Option(
        None, "--job-id", help="Job id (default: the file's job_id or a new one).", metavar="ID"
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result envelope as JSON on stdout."),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Resume an earlier attempt of the same work: completed stages are reused, a resumable stage "
        "continues after its last chunk (the pipeline's 'resume').",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show Prefect's own logs."),
    no_engine: bool = typer.Option(
        False,
        "--no-engine",
        help="Run the job in this process (a local Prefect server or Prefect's ephemeral one, process runner) "
        "instead of on this host's engine.",
    ),
) -> None:
    """Run a pipeline on this host's engine (warm models). With none running, one starts in the
    background and stays warm for the next run until it has been idle for FORGEFLOW_ENGINE_IDLE_STOP_S
    (FORGEFLOW_AUTO_ENGINE=false or --no-engine: the job runs in this process instead)."""
    from forgeflow.canonical import canonical_json
    from forgeflow.events.sinks import MemorySink
    from forgeflow.pipeline.definition import raw_stages
    from forgeflow.pipeline.validation import PipelineValidationError, parse_definition, validate_pipeline
    from forgeflow.settings import get_settings

    document = _load_document(file)
    job_input = _job_input(document, media, input_json)
    settings = get_settings()
    # The engine starts (or is found) while this process validates the pipeline.
    plugins = [str(s.get("plugin")) for s in raw_stages(document) if isinstance(s, dict) and s.get("plugin")]
    engine_ready = None if no_engine else _engine_for_run(settings, plugins)
    job_id = (
        job_id or (document.get("job_id") if isinstance(document, dict) else None) or f"job-{uuid.uuid4().hex[:12]}"
    )
    registry = _registry()
    try:
        definition = parse_definition(document)
        if resume:
            definition = definition.model_copy(update={"resume": True})
        validated = validate_pipeline(definition, job_input, registry)
    except PipelineValidationError as exc:
        _print_issues(exc)
        raise typer.Exit(EXIT_INVALID) from None
    _print_warnings(validated)
    definition = validated.canonical_definition()

    sink = MemorySink()
    engine = _engine_or_none(engine_ready)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        bars = [
            progress.add_task(f"{i}: {s.plugin}.{s.tool}", total=1, status="pending", start=False)
            for i, s in enumerate(definition.stages)
        ]
        sink.subscribe(lambda event: _show(progress, bars, event))
        started = time.perf_counter()
        if engine is not None:
            envelope = _run_on_engine(engine, definition, job_input, job_id, sink, settings)
        else:
            envelope = _run_here(settings, definition, job_input, job_id, sink, verbose=verbose)
        elapsed = time.perf_counter() - started

    results = console if as_json else out  # with --json, stdout holds the envelope alone
    _summary(results, envelope, elapsed, job_id)
    if out_dir is not None:
        _write_outputs(results, out_dir, envelope, sink, settings)
    if as_json:
        _print_json(canonical_json(envelope))
    raise typer.Exit(EXIT_OK if envelope["ok"] else EXIT_FAILED)


def _engine_for_run(settings: Any, plugins: list[str]) -> Any:
    """This host's engine for a run, as a future: the running one, or (``auto_engine``) one started
    now in the background, warming ``plugins``' workers; None: the job runs in this process."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from forgeflow.engine.client import STARTED_BY_RUN, EngineClient, ensure_engine

    if not settings.use_engine:
        return None
    client = EngineClient(settings.engine_socket_path)
    if client.alive():
        found: Future[Any] = Future()
        found.set_result(client)
        return found
    if not settings.auto_engine or settings.runner == "inline":
        return None
    _use_local_prefect()  # the engine uses a running local Prefect server, else starts its own
    idle = settings.engine_idle_stop_s
    console.print(
        "[dim]starting this host's engine in the background"
        + (f" (it stops after {idle:g} s without work" if idle else " (it runs until `forgeflow engine stop`")
        + f"; log {settings.logs_dir / 'engine.log'}); --no-engine runs the job in this process[/dim]"
    )

    def start() -> Any:
        started, _ = ensure_engine(settings, timeout=180.0, idle_stop_s=idle, started_by=STARTED_BY_RUN, warm=plugins)
        return started

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forgeflow-engine-start")
    try:
        return pool.submit(start)
    finally:
        pool.shutdown(wait=False)


def _engine_or_none(engine_ready: Any) -> Any:
    """The engine client of :func:`_engine_for_run`'s future, or None (the job runs here; a start
    that failed says why)."""
    from forgeflow.engine.client import EngineUnavailable
    from forgeflow.engine.locks import LockTimeout

    if engine_ready is None:
        return None
    try:
        return engine_ready.result()
    except (EngineUnavailable, LockTimeout) as exc:
        console.print(f"[yellow]the engine could not start, running the job in this process: {exc}[/yellow]")
        return None


def _run_on_engine(
    client: Any, definition: Any, job_input: dict[str, Any], job_id: str, sink: Any, settings: Any
) -> dict[str, Any]:
    """Hand the job to the engine (warm models, its Prefect) and follow its events. An engine that
    went away before the job began (it stopped after its idle time just then) is started again."""
    from forgeflow.engine.client import STARTED_BY_RUN, EngineUnavailable, ensure_engine
    from forgeflow.events.models import parse_event

    envelope: dict[str, Any] | None = None
    for attempt in (1, 2):
        began = False
        try:
            for line in client.stream(job_id, definition.model_dump(mode="json"), job_input):
                began = True
                if "event" in line:
                    sink.emit(parse_event(line["event"]))
                else:
                    envelope = line.get("envelope")
            break
        except KeyboardInterrupt:
            client.cancel(job_id)
            console.print(f"[yellow]cancelled job {job_id}[/yellow]")
            raise typer.Exit(130) from None
        except EngineUnavailable as exc:
            if began or attempt == 2 or not settings.auto_engine:
                console.print(f"[red]{exc}[/red]")
                raise typer.Exit(EXIT_FAILED) from None
            try:
                client, _ = ensure_engine(
                    settings, timeout=180.0, idle_stop_s=settings.engine_idle_stop_s, started_by=STARTED_BY_RUN
                )
            except EngineUnavailable as again:
                console.print(f"[red]{again}[/red]")
                raise typer.Exit(EXIT_FAILED) from None
    if envelope is None:
        console.print("[red]the engine ended the job without a result (see its log)[/red]")
        raise typer.Exit(EXIT_FAILED)
    return envelope


def _run_here(
    settings: Any, definition: Any, job_input: dict[str, Any], job_id: str, sink: Any, *, verbose: bool
) -> dict[str, Any]:
    """Run the job in this process: a running local Prefect server if there is one (else Prefect's
    ephemeral one), and the first stage's worker starting while Prefect does."""
    import logging
    import threading

    _use_local_prefect()
    from forgeflow.jobs.executor import PipelineExecutor
    from forgeflow.jobs.stages import Services

    if not verbose:  # after Prefect configured its logging: failures go to the summary, not tracebacks
        for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).setLevel(logging.CRITICAL)

    services = Services.from_settings(settings, sink=sink)
    warm = getattr(services.runner, "warm", None)
    if warm is not None and definition.stages:
        try:
            first = services.registry.resolve(definition.stages[0].plugin).name
            threading.Thread(target=warm, args=(first,), name="forgeflow-prewarm", daemon=True).start()
        except Exception:  # validation already named the problem; warming is only a head start
            pass
    try:
        return PipelineExecutor(services).execute(definition, job_input, job_id)
    finally:
        services.close()


#: Where ``prefect server start`` listens by default (and ``forgeflow up`` puts it).
LOCAL_PREFECT_URL = "http://127.0.0.1:4200/api"


def _use_local_prefect() -> None:
    """Point Prefect at a running local server (``PREFECT_API_URL`` wins) instead of an ephemeral one."""
    if os.environ.get("PREFECT_API_URL"):
        return
    import httpx

    try:
        if httpx.get(f"{LOCAL_PREFECT_URL}/health", timeout=0.5).status_code == 200:
            os.environ["PREFECT_API_URL"] = LOCAL_PREFECT_URL
    except httpx.HTTPError:
        pass


def _show(progress: Progress, bars: list[Any], event: Any) -> None:
    index = getattr(event, "stage_index", None)
    if index is None or not 0 <= index < len(bars):
        return
    bar = bars[index]
    if event.type == "pipeline_stage_start":
        progress.start_task(bar)
        progress.update(bar, status="[yellow]running[/yellow]")
    elif event.type == "pipeline_stage_progress":
        # The bar counts what the tool counts (frames): "37/64 frames" or the tool's own message.
        count = f"{event.done:g}/{event.total:g}" if event.total else f"{event.done:g}"
        pace = f" · {event.rate:.1f}/s" if event.rate else ""
        pace += f" · ETA {_duration(event.eta_s)}" if event.eta_s is not None else ""
        status = f"[yellow]{event.message or count}{pace}[/yellow]"
        if event.total:
            progress.update(bar, total=event.total, completed=event.done, status=status)
        else:
            progress.update(bar, status=status)
    elif event.type == "pipeline_stage_end":
        if event.ok:
            total = progress.tasks[bar].total or 1
            progress.update(bar, completed=total, status=f"[green]done[/green] {event.duration_ms} ms")
        else:
            progress.update(bar, status="[red]failed[/red]")
        progress.stop_task(bar)


def _summary(results: Console, envelope: dict[str, Any], elapsed: float, job_id: str) -> None:
    """The stage table and the result's fields on ``results``; a failure's reason on stderr."""
    stages = envelope.get("stages", [])
    # "0: plugin.tool" as the progress bars name it. No cell breaks mid-word: with two spaces between
    # columns and no side rules, the soccer pipeline's table fits 80 columns ("peak mem" wraps at its space).
    names = [f"{report['index']}: {report['plugin']}.{report['tool']}" for report in stages]
    table = Table(
        title=f"job {job_id} · {elapsed:.2f} s",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=(0, 1, 0, 0),
        pad_edge=False,
    )
    for column in ("stage", "status", "duration", "output", "peak mem"):
        table.add_column(
            column,
            justify="left" if column in ("stage", "status") else "right",
            no_wrap=column != "peak mem",
            min_width=max(map(len, names), default=0) if column == "stage" else None,
        )
    colors = {"completed": "green", "failed": "red", "skipped": "dim"}
    for report, name in zip(stages, names, strict=True):
        status = report["status"]
        table.add_row(
            name,
            f"[{colors.get(status, 'white')}]{status}[/]",
            f"{report['duration_ms']:.0f} ms" if report.get("duration_ms") is not None else "",
            _size(report.get("result_size_bytes")),
            f"{report['peak_memory_mb']:.0f} MB" if report.get("peak_memory_mb") else "",
        )
    results.print(table)
    result = envelope.get("result") if envelope["ok"] else envelope.get("partial_result")
    if result:
        parts = [_described(key, value) for key, value in result.items()]
        results.print(("result · " if envelope["ok"] else "partial result · ") + ", ".join(parts))
    if not envelope["ok"]:
        console.print(
            f"[red]failed at stage {envelope.get('stage_failed')}: {envelope.get('error_type')}: {envelope.get('error')}[/red]"
        )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _described(key: str, value: Any) -> str:
    from forgeflow.plugins.frames import is_frames

    if is_frames(value):
        return f"{key}: {value['frames']} frame(s) in {value['chunks']} chunk(s), {_size(value['size_bytes'])}"
    return f"{key}: {len(value)} item(s)" if isinstance(value, list) else f"{key}: {value!r}"[:80]


def _size(value: int | None) -> str:
    if value is None:
        return ""
    return f"{value / 1024:.1f} KB" if value >= 1024 else f"{value} B"


def _write_outputs(results: Console, out_dir: Path, envelope: dict[str, Any], sink: Any, settings: Any) -> None:
    from forgeflow.events.models import JobStatusEvent

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.json").write_text(json.dumps(envelope, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    with (out_dir / "events.jsonl").open("w", encoding="utf-8") as fh:
        for event in sink.events:  # the result is in result.json: the terminal message has its summary
            shown = event.summarized() if isinstance(event, JobStatusEvent) else event
            fh.write(shown.model_dump_json() + "\n")
    written = [out_dir / "result.json", out_dir / "events.jsonl"]
    written += _write_frame_outputs(out_dir, envelope, settings)
    annotated = envelope.get("annotated_media")
    if annotated:  # the job drew its result on its media and stored it: a copy of that file
        from forgeflow.plugins import MediaError, MediaStore

        suffix = _ANNOTATED_SUFFIXES.get(
            annotated.get("media_type"), ".mp4" if annotated.get("kind") == "video" else ".jpg"
        )
        target = out_dir / f"annotated{suffix}"
        try:
            shutil.copyfile(MediaStore(settings.media_root).path(annotated["ref"]), target)
            written.append(target)
        except (MediaError, OSError) as exc:
            console.print(f"[yellow]annotated media {annotated['ref']} not copied: {exc}[/yellow]")
    elif envelope.get("annotated_media_error"):
        console.print(f"[yellow]{envelope['annotated_media_error']}[/yellow]")
    for path in written:
        results.print(f"wrote {path}")


def _write_frame_outputs(out_dir: Path, envelope: dict[str, Any], settings: Any) -> list[Path]:
    """``<output>.parquet`` for each per-frame output of the (partial) result, written a chunk at a time:
    what an analyst opens with pandas, polars or DuckDB (result.json names them by ref)."""
    from forgeflow.plugins import MediaError, MediaStore
    from forgeflow.plugins.frames import is_frames, write_frames_file

    result = envelope.get("result") if envelope.get("ok") else envelope.get("partial_result")
    store = MediaStore(settings.media_root)
    written = []
    for key, value in (result or {}).items():
        if not is_frames(value):
            continue
        target = out_dir / f"{key}.parquet"
        try:
            write_frames_file(value, store, target)
            written.append(target)
        except (MediaError, OSError) as exc:
            console.print(f"[yellow]{key} ({value['$frames']}) not written: {exc}[/yellow]")
    return written


#: The file suffix of the copy of a job's annotated media, by its media type.
_ANNOTATED_SUFFIXES = {"video/mp4": ".mp4", "image/jpeg": ".jpg", "image/png": ".png"}


@app.command()
def schema() -> None:
    """Print the JSON Schema of pipeline files."""
    from forgeflow.pipeline.definition import pipeline_json_schema

    _print_json(json.dumps(pipeline_json_schema()))


@plugins_app.command("list")
def plugins_list(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Installed plugins: versions, aliases, tools and lifecycle states."""
    registry = _registry()
    items = [registry.describe(name) for name in registry.names()]
    if as_json:
        _print_json(json.dumps(items))
        return
    table = Table(title="ForgeFlow plugins", title_justify="left")
    for column in ("plugin", "version", "aliases", "tools", "state", "last error"):
        table.add_column(column, overflow="fold")
    colors = {"FAILED": "red", "UNAVAILABLE": "red", "RUNNING": "yellow", "INITIALIZED": "green", "LOADED": "cyan"}
    for item in items:
        state = item["lifecycle"]["state"]
        table.add_row(
            item["name"],
            item["version"] or "",
            ", ".join(item["aliases"]),
            ", ".join(t["name"] for t in item["tools"]),
            f"[{colors.get(state, 'white')}]{state}[/]",
            item["lifecycle"].get("last_error") or "",
        )
    out.print(table)


@plugins_app.command("show")
def plugins_show(
    name: str = typer.Argument(..., help="Plugin name or alias.", metavar="NAME"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (with the tools' JSON Schemas) instead."),
) -> None:
    """One plugin: its tools with their inputs, outputs and config fields (types, defaults)."""
    from forgeflow.plugins import UnknownPlugin

    try:
        item = _registry().describe(name, schemas=True)
    except UnknownPlugin as exc:
        console.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(EXIT_INVALID) from None
    if as_json:
        _print_json(json.dumps(item))
        return
    aliases = f" (aliases: {', '.join(item['aliases'])})" if item["aliases"] else ""
    out.print(f"[bold]{item['name']}[/bold] {item['version'] or ''}{aliases} · {item['lifecycle']['state']}")
    for line in (item["description"], item["unavailable_reason"], f"entry point: {item['entry_point']}"):
        if line:
            out.print(f"  {line}", highlight=False)
    for tool in item["tools"]:
        table = Table(title=f"{tool['name']}: {tool['description']}", title_justify="left", box=box.SIMPLE_HEAD)
        for column in ("", "field", "type", "default", "description"):
            table.add_column(column, overflow="fold")
        for part in ("input", "output", "config"):
            rows = _schema_fields(tool["schemas"][part], with_defaults=part != "output")
            for index, (field, kind, default, description) in enumerate(rows):
                table.add_row(part if index == 0 else "", field, kind, default, description)
            if not rows:
                table.add_row(part, "[dim]none[/dim]", "", "", "")
        out.print(table)


def _schema_fields(schema: dict[str, Any], *, with_defaults: bool) -> list[tuple[str, str, str, str]]:
    """``(field, type, default, description)`` for each property of a model's JSON Schema; with
    ``with_defaults``, the default is "required" for a field without one."""
    rows = []
    required = set(schema.get("required", []))
    for field, spec in schema.get("properties", {}).items():
        default = ""
        if with_defaults:
            default = "required" if field in required else json.dumps(spec.get("default"))
        rows.append((field, _schema_type(spec), default, spec.get("description", "")))
    return rows


def _schema_type(spec: dict[str, Any]) -> str:
    """A short name of a JSON Schema type: ``integer``, ``array of FramePlayers``, ``"cpu" | "cuda"``."""
    if "$ref" in spec:
        return str(spec["$ref"]).rsplit("/", 1)[-1]
    if "enum" in spec:
        return " | ".join(json.dumps(value) for value in spec["enum"])
    if "const" in spec:
        return json.dumps(spec["const"])
    if "anyOf" in spec:
        return " | ".join(_schema_type(option) for option in spec["anyOf"])
    if spec.get("type") == "array":
        return f"array of {_schema_type(spec.get('items', {}))}"
    return str(spec.get("type", "any"))


@app.command("sample-clip")
def sample_clip(
    path: Path = typer.Argument(Path("examples/sample.mp4"), help="Where to write the clip."),
    frames: int = typer.Option(64, min=2, help="Number of frames."),
    fps: float = typer.Option(25.0, min=1, help="Frames per second."),
) -> None:
    """Make the offline sample clip: camera pans over bus.jpg and zidane.jpg, which Ultralytics ships."""
    from forgeflow.cli.sample_clip import make_sample_clip

    console.print(f"wrote {make_sample_clip(path, frames=frames, fps=fps)} ({frames} frames at {fps:g} fps)")


@app.command()
def serve(
    host: str | None = typer.Option(None, help="Bind address (default: FORGEFLOW_API_HOST, 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Port (default: FORGEFLOW_API_PORT, 8700)."),
) -> None:
    """Serve the REST and WebSocket API (starts a local Prefect server when none is configured)."""
    from forgeflow.api.server import serve as serve_api
    from forgeflow.settings import get_settings

    settings = get_settings()
    updates = {k: v for k, v in (("api_host", host), ("api_port", port)) if v is not None}
    serve_api(settings.model_copy(update=updates))


@app.command()
def up(
    prefect_port: int = typer.Option(4200, help="Port of the Prefect server (API and UI)."),
    api_port: int = typer.Option(8700, help="Port of the ForgeFlow API."),
    workers: int = typer.Option(1, min=1, max=16, help="Prefect workers to start on this host."),
    jobs_per_worker: int | None = typer.Option(None, min=1, help="Most flow runs one worker runs at once."),
    bind: str = typer.Option("127.0.0.1", help="Address the Prefect server and the API listen on."),
    join: bool = typer.Option(
        False,
        "--join",
        help="Only this host's engine and workers, for the stack that PREFECT_API_URL, FORGEFLOW_API_URL "
        "and FORGEFLOW_INGEST_TOKEN name (a worker host).",
    ),
) -> None:
    """Start the production shape in the background: a Prefect server (UI on :4200) with the work pool
    and prefect.yaml's deployments, the API in deployment mode on :8700, this host's engine and a
    Prefect worker. Logs under FORGEFLOW_HOME/stack; `forgeflow down` stops them."""
    from forgeflow.cli import stack
    from forgeflow.settings import get_settings

    settings = get_settings()
    try:
        if join:
            prefect_url = os.environ.get("PREFECT_API_URL")
            if not (prefect_url and settings.api_url and settings.ingest_token):
                console.print("[red]--join needs PREFECT_API_URL, FORGEFLOW_API_URL and FORGEFLOW_INGEST_TOKEN[/red]")
                raise typer.Exit(EXIT_INVALID)
            console.print("starting this host's engine and workers …")
            started = stack.join(
                settings,
                prefect_api_url=prefect_url,
                api_url=settings.api_url,
                ingest_token=settings.ingest_token.get_secret_value(),
                workers=workers,
                jobs_per_worker=jobs_per_worker,
            )
        else:
            console.print("starting the Prefect server, the API, the engine and the workers …")
            started = stack.up(
                settings,
                prefect_port=prefect_port,
                api_port=api_port,
                workers=workers,
                jobs_per_worker=jobs_per_worker,
                bind=bind,
            )
    except stack.StackError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_FAILED) from None
    out.print(f"Prefect UI   {started.ui_url}")
    out.print(f"ForgeFlow    {started.api_url}  (POST /v1/jobs runs a flow run of forgeflow-pipeline/pipeline)")
    if not join:
        out.print(f"worker hosts FORGEFLOW_INGEST_TOKEN is in {stack.stack_dir(settings) / 'ingest-token'}")
    out.print(f"logs         {stack.stack_dir(settings)}")


@app.command()
def worker(
    pool: str = typer.Option("forgeflow-process", help="The work pool to take flow runs from."),
    name: str | None = typer.Option(None, help="The worker's name (default: Prefect's)."),
    limit: int | None = typer.Option(None, min=1, help="Most flow runs at once."),
) -> None:
    """A Prefect process worker whose flow runs go to this host's engine (`forgeflow engine start`):
    warm Prefect and warm models instead of a cold process per run. Uses PREFECT_API_URL."""
    from forgeflow.jobs.prefect_worker import main as worker_main

    argv = ["--pool", pool] + (["--name", name] if name else []) + (["--limit", str(limit)] if limit else [])
    raise typer.Exit(worker_main(argv))


@app.command()
def down() -> None:
    """Stop what `forgeflow up` started."""
    from forgeflow.cli import stack
    from forgeflow.settings import get_settings

    stopped = stack.down(get_settings())
    out.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@engine_app.command("start")
def engine_start(
    idle_stop: float = typer.Option(
        0.0,
        "--idle-stop",
        min=0,
        help="Stop after this many seconds without a job or call (default 0: never).",
        metavar="SECONDS",
    ),
) -> None:
    """Start this host's engine in the background (jobs of `forgeflow run`, the API and Prefect
    workers on this host then share its warm workers). Uses PREFECT_API_URL, else a local Prefect
    server on :4200, else starts one under FORGEFLOW_HOME/prefect. An engine that `forgeflow run`
    started is kept: it stops only when asked (or after --idle-stop) from now on."""
    from forgeflow.engine.client import STARTED_BY_COMMAND, EngineUnavailable, ensure_engine
    from forgeflow.engine.locks import LockTimeout
    from forgeflow.settings import get_settings

    settings = get_settings()
    _use_local_prefect()
    try:
        client, status = ensure_engine(settings, timeout=180.0, idle_stop_s=idle_stop, started_by=STARTED_BY_COMMAND)
        if status.get("idle_stop_s") != idle_stop and status.get("owner_pid") is None:
            client.set_idle_stop(idle_stop)
    except (EngineUnavailable, LockTimeout) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_FAILED) from None
    console.print(
        f"engine pid {status['pid']} on {settings.engine_socket_path} (Prefect: {status['prefect_api_url']}); "
        f"log: {settings.logs_dir / 'engine.log'}"
    )


@engine_app.command("run")
def engine_run() -> None:
    """Run this host's engine in the foreground (until SIGTERM or Ctrl-C)."""
    from forgeflow.host.server import main as engine_main

    _use_local_prefect()
    raise typer.Exit(engine_main([]))


@engine_app.command("stop")
def engine_stop(drain: bool = typer.Option(False, "--drain", help="Let the running jobs finish first.")) -> None:
    """Stop this host's engine."""
    from forgeflow.engine.client import EngineClient, EngineUnavailable
    from forgeflow.settings import get_settings

    client = EngineClient(get_settings().engine_socket_path)
    try:
        client.shutdown(drain=drain)
    except EngineUnavailable as exc:
        console.print(f"[yellow]{exc}[/yellow]")
        raise typer.Exit(EXIT_FAILED) from None
    console.print("engine " + ("draining: it leaves when its running jobs end" if drain else "stopping"))


@engine_app.command("status")
def engine_status(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables.")) -> None:
    """Pools, workers and their warm models, the job queue and device slots of this host's engine."""
    from forgeflow.engine.client import EngineClient, EngineUnavailable
    from forgeflow.settings import get_settings

    try:
        status = EngineClient(get_settings().engine_socket_path).status()
    except EngineUnavailable as exc:
        console.print(f"[yellow]no engine: {exc}[/yellow]")
        raise typer.Exit(EXIT_FAILED) from None
    if as_json:
        _print_json(json.dumps(status))
        return
    jobs = status["jobs"]
    out.print(
        f"engine pid {status['pid']} · up {status['uptime_s']:.0f} s · Prefect {status['prefect_api_url']} · "
        f"jobs running {len(jobs['running'])}, queued {len(jobs['queued'])}, finished {jobs['finished']} "
        f"(at most {status['max_concurrent_jobs']} at once)"
    )
    out.print(_engine_life(status), highlight=False)
    devices = Table(title="devices", title_justify="left")
    for column in ("device", "slots", "running", "waiting"):
        devices.add_column(column)
    for name, d in status["devices"].items():
        devices.add_row(name, str(d["slots"]), str(len(d["running"])), str(len(d["waiting"])))
    out.print(devices)
    workers = Table(
        title=f"workers · idle memory {status['idle_memory_mb']:.0f} of {status['idle_memory_budget_mb']} MB"
        f" · evicted {status['evicted']}",
        title_justify="left",
    )
    for column in ("plugin", "pid", "state", "job", "calls", "model loads", "memory"):
        workers.add_column(column, overflow="fold")
    for w in status["workers"]:
        workers.add_row(
            w["plugin"],
            str(w["pid"]),
            w["state"],
            w["job_id"] or "",
            str(w["calls"]),
            str(w["model_loads"]),
            f"{w['rss_mb']:.0f} MB",
        )
    out.print(workers)


def _engine_life(status: dict[str, Any]) -> str:
    """Who started the engine and when it stops by itself, in a line."""
    owner = status.get("owner_pid")
    started = f"started by {status.get('started_by') or (f'its owner, pid {owner}' if owner else 'hand')}"
    if status.get("stopping"):
        return f"{started} · stopping"
    if status.get("owner_pid"):
        return f"{started} · stops with its owner, pid {status['owner_pid']}"
    if status.get("idle_stop_s"):
        return (
            f"{started} · idle {status.get('idle_s', 0):.0f} s · stops after {status['idle_stop_s']:g} s idle "
            f"(in {status.get('idle_stop_in_s') or 0:.0f} s)"
        )
    return f"{started} · runs until `forgeflow engine stop`"


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
