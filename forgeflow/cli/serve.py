"""``forgeflow serve|up|worker|down``: the API, the production stack and its Prefect workers."""

from __future__ import annotations

import os

import typer

from forgeflow.cli.output import console, out
from forgeflow.exit_codes import ExitCode


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
                raise typer.Exit(ExitCode.INVALID)
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
        raise typer.Exit(ExitCode.FAILED) from None
    out.print(f"Prefect UI   {started.ui_url}")
    out.print(f"ForgeFlow    {started.api_url}  (POST /v1/jobs runs a flow run of forgeflow-pipeline/pipeline)")
    if not join:
        out.print(f"worker hosts FORGEFLOW_INGEST_TOKEN is in {stack.stack_dir(settings) / 'ingest-token'}")
    out.print(f"logs         {stack.stack_dir(settings)}")


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


def down() -> None:
    """Stop what `forgeflow up` started."""
    from forgeflow.cli import stack
    from forgeflow.settings import get_settings

    stopped = stack.down(get_settings())
    out.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
