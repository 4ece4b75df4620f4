"""``forgeflow engine start|run|stop|status``: this host's engine, the warm worker pools every job shares."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from forgeflow.cli.help import ProseHelp
from forgeflow.cli.local_prefect import use_local_prefect
from forgeflow.cli.output import console, out, print_json
from forgeflow.exit_codes import ExitCode

if TYPE_CHECKING:
    from collections.abc import Mapping

    from pydantic import JsonValue

engine_app = typer.Typer(
    cls=ProseHelp, help="This host's engine: warm worker pools shared by every job.", no_args_is_help=True
)


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
    use_local_prefect()
    try:
        client, status = ensure_engine(settings, timeout=180.0, idle_stop_s=idle_stop, started_by=STARTED_BY_COMMAND)
        if status.get("idle_stop_s") != idle_stop and status.get("owner_pid") is None:
            client.set_idle_stop(idle_stop)
    except (EngineUnavailable, LockTimeout) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(ExitCode.FAILED) from None
    console.print(
        f"engine pid {status['pid']} on {settings.engine_socket_path} (Prefect: {status['prefect_api_url']}); "
        f"log: {settings.logs_dir / 'engine.log'}"
    )


@engine_app.command("run")
def engine_run() -> None:
    """Run this host's engine in the foreground (until SIGTERM or Ctrl-C)."""
    from forgeflow.host.server import main as engine_main

    use_local_prefect()
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
        raise typer.Exit(ExitCode.FAILED) from None
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
        raise typer.Exit(ExitCode.FAILED) from None
    if as_json:
        print_json(json.dumps(status))
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


def _engine_life(status: Mapping[str, JsonValue]) -> str:
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
