"""``forgeflow run``: run a pipeline on this host's engine (started in the background when none
runs), or in this process, showing each stage's progress and the result."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from forgeflow.cli.documents import INPUT_JSON_OPTION, load_document, read_job_input
from forgeflow.cli.local_prefect import use_local_prefect
from forgeflow.cli.output import console, out, print_json
from forgeflow.cli.pipelines import print_issues, print_warnings
from forgeflow.cli.plugins import plugin_registry
from forgeflow.cli.results import print_summary, show_progress, write_outputs
from forgeflow.exit_codes import ExitCode, exit_code_for

if TYPE_CHECKING:
    from concurrent.futures import Future

    from forgeflow.canonical import JsonObject
    from forgeflow.engine.client import EngineClient
    from forgeflow.events.sinks import MemorySink
    from forgeflow.pipeline.definition import PipelineDefinition
    from forgeflow.settings import Settings


def run(
    file: Path = typer.Argument(..., help="Pipeline JSON file (a definition or the seed's job form).", metavar="FILE"),
    media: Path | None = typer.Option(
        None, "--input", help="Image or video to analyse (becomes input.media).", metavar="MEDIA"
    ),
    input_json: str | None = INPUT_JSON_OPTION,
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
    from forgeflow.pipeline.outcome import job_status_of
    from forgeflow.pipeline.validation import PipelineValidationError, parse_definition, validate_pipeline
    from forgeflow.settings import get_settings

    document = load_document(file)
    job_input = read_job_input(document, media, input_json)
    settings = get_settings()
    # The engine starts (or is found) while this process validates the pipeline.
    plugins = [str(s.get("plugin")) for s in raw_stages(document) if isinstance(s, dict) and s.get("plugin")]
    engine_ready = _engine_for_run(settings, plugins, no_engine=no_engine)
    given_id = document.get("job_id") if isinstance(document, dict) else None
    job_id = job_id or (given_id if isinstance(given_id, str) else None) or f"job-{uuid.uuid4().hex[:12]}"
    registry = plugin_registry()
    try:
        definition = parse_definition(document)
        if resume:
            definition = definition.model_copy(update={"resume": True})
        validated = validate_pipeline(definition, job_input, registry)
    except PipelineValidationError as exc:
        print_issues(exc)
        raise typer.Exit(ExitCode.INVALID) from None
    print_warnings(validated)
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
        sink.subscribe(lambda event: show_progress(progress, bars, event))
        started = time.perf_counter()
        if engine is not None:
            envelope = _run_on_engine(engine, definition, job_input, job_id, sink, settings)
        else:
            envelope = _run_here(settings, definition, job_input, job_id, sink, verbose=verbose)
        elapsed = time.perf_counter() - started

    results = console if as_json else out  # with --json, stdout holds the envelope alone
    print_summary(results, envelope, elapsed, job_id)
    if out_dir is not None:
        write_outputs(results, out_dir, envelope, sink, settings)
    if as_json:
        print_json(canonical_json(envelope))
    raise typer.Exit(exit_code_for(job_status_of(envelope)))


def _engine_for_run(settings: Settings, plugins: list[str], *, no_engine: bool) -> Future[EngineClient] | None:
    """This host's engine for a run, as a future: the running one, or one started now in the
    background, warming ``plugins``' workers (:func:`forgeflow.jobs.placement.place_job` decides);
    None: the job runs in this process."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from forgeflow.engine.client import STARTED_BY_RUN, EngineClient, ensure_engine
    from forgeflow.jobs.placement import JobOrigin, place_job

    client = EngineClient(settings.engine_socket_path)
    running = not no_engine and settings.use_engine and client.alive()
    placement = place_job(settings, JobOrigin.CLI, engine_running=running, no_engine=no_engine)
    if placement.where != "engine":
        return None
    if not placement.start_engine:
        found: Future[EngineClient] = Future()
        found.set_result(client)
        return found
    use_local_prefect()  # the engine uses a running local Prefect server, else starts its own
    idle = settings.engine_idle_stop_s
    console.print(
        "[dim]starting this host's engine in the background"
        + (f" (it stops after {idle:g} s without work" if idle else " (it runs until `forgeflow engine stop`")
        + f"; log {settings.logs_dir / 'engine.log'}); --no-engine runs the job in this process[/dim]"
    )

    def start() -> EngineClient:
        started, _ = ensure_engine(settings, timeout=180.0, idle_stop_s=idle, started_by=STARTED_BY_RUN, warm=plugins)
        return started

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forgeflow-engine-start")
    try:
        return pool.submit(start)
    finally:
        pool.shutdown(wait=False)


def _engine_or_none(engine_ready: Future[EngineClient] | None) -> EngineClient | None:
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
    client: EngineClient,
    definition: PipelineDefinition,
    job_input: JsonObject,
    job_id: str,
    sink: MemorySink,
    settings: Settings,
) -> JsonObject:
    """Hand the job to the engine (warm models, its Prefect) and follow its events. An engine that
    went away before the job began (it stopped after its idle time just then) is started again."""
    from forgeflow.engine.client import STARTED_BY_RUN, EngineUnavailable, ensure_engine
    from forgeflow.events.models import parse_event

    envelope: JsonObject | None = None
    for attempt in (1, 2):
        began = False
        try:
            for line in client.stream(job_id, definition.model_dump(mode="json"), job_input):
                began = True
                event, ended = line.get("event"), line.get("envelope")
                if "event" in line:
                    if isinstance(event, dict):
                        sink.emit(parse_event(event))
                else:
                    envelope = ended if isinstance(ended, dict) else None
            break
        except KeyboardInterrupt:
            client.cancel(job_id)
            console.print(f"[yellow]cancelled job {job_id}[/yellow]")
            raise typer.Exit(ExitCode.INTERRUPTED) from None
        except EngineUnavailable as exc:
            if began or attempt == 2 or not settings.auto_engine:
                console.print(f"[red]{exc}[/red]")
                raise typer.Exit(ExitCode.FAILED) from None
            try:
                client, _ = ensure_engine(
                    settings, timeout=180.0, idle_stop_s=settings.engine_idle_stop_s, started_by=STARTED_BY_RUN
                )
            except EngineUnavailable as again:
                console.print(f"[red]{again}[/red]")
                raise typer.Exit(ExitCode.FAILED) from None
    if envelope is None:
        console.print("[red]the engine ended the job without a result (see its log)[/red]")
        raise typer.Exit(ExitCode.FAILED)
    return envelope


def _run_here(
    settings: Settings,
    definition: PipelineDefinition,
    job_input: JsonObject,
    job_id: str,
    sink: MemorySink,
    *,
    verbose: bool,
) -> JsonObject:
    """Run the job in this process: a running local Prefect server if there is one (else Prefect's
    ephemeral one), and the first stage's worker starting while Prefect does."""
    import logging
    import threading

    use_local_prefect()
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
