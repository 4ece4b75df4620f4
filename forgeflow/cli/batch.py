"""``forgeflow batch``: run a pipeline over a folder as a batch of the API, with a progress bar.

``forgeflow batch PIPELINE.json FOLDER [--pattern] [--max-concurrency] [--force] [--out DIR]`` uploads
the folder's files to the API (``--api``, default ``FORGEFLOW_API_URL`` or this host's), creates the
batch (each file its own job, on any worker of the fleet; files whose work was done before take that
result unless ``--force``) and follows it with a bar until it ends; ``--out`` writes each file's result
envelope and the summary (CSV, Parquet). ``forgeflow batch status|cancel|retry BATCH_ID`` act on a
batch. Exit code: 0 when every file succeeded, 1 otherwise, 2 when the API refused the request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from forgeflow.cli.output import console
from forgeflow.cli.watch import _token
from forgeflow.exit_codes import ExitCode
from forgeflow.jobs.batch_client import BatchApiError, BatchClient, folder_files

ACTIONS = ("status", "cancel", "retry")


def _api(api: str | None) -> str:
    from forgeflow.settings import get_settings

    settings = get_settings()
    if api is not None:
        return api
    if settings.api_url:
        return settings.api_url
    from forgeflow.api.app import local_api_url

    return local_api_url(settings)


def _counts_line(batch: dict[str, Any]) -> str:
    c = batch["counts"]
    rate = f" · {batch['files_per_s']:.2f} files/s" if batch.get("files_per_s") else ""
    eta = f" · ETA {batch['eta_s']:.0f} s" if batch.get("eta_s") else ""
    return (
        f"[green]{c['succeeded']} ok[/green] ({c['reused']} reused) · {c['running']} running · "
        f"{c['queued']} queued · [red]{c['failed'] + c['crashed']} failed[/red] · {c['cancelled']} cancelled{rate}{eta}"
    )


def _show_batch(batch: dict[str, Any]) -> None:
    """The batch on stdout: its status and counts, then one line per file (name, status, job, …)."""
    out = Console(soft_wrap=True, highlight=False)
    out.print(f"batch {batch['batch_id']} ({batch['name']}): [bold]{batch['status']}[/bold]")
    out.print(_counts_line(batch))
    for f in batch.get("files", []):
        reused = f" reused from {f['reused_from']}" if f["reused_from"] else ""
        error = f" {f['error_type']}: {f['error']}" if f["error"] else ""
        out.print(
            f"  {f['name']}  {f['status']}  {f['job_id'] or '-'}  attempts {f['attempts']}{reused}{error}", markup=False
        )


def _follow(client: BatchClient, batch: dict[str, Any]) -> dict[str, Any]:
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    ) as progress:
        bar = progress.add_task(batch["name"], total=batch["files_total"] or 1, status="")

        def update(current: dict[str, Any]) -> None:
            progress.update(bar, completed=current["counts"]["done"], status=_counts_line(current))

        try:
            return client.wait(batch["batch_id"], poll_s=0.5, on_update=update)
        except KeyboardInterrupt:
            console.print(f"cancelling batch {batch['batch_id']} …")
            client.cancel(batch["batch_id"])
            return client.wait(batch["batch_id"], poll_s=0.5, on_update=update)


def batch(
    target: str = typer.Argument(..., help="The pipeline JSON file, or one of status, cancel, retry."),
    source: str = typer.Argument(..., help="The folder of media files, or (after status/cancel/retry) the batch id."),
    pattern: str = typer.Option("*", "--pattern", help="Glob of the file names to take."),
    max_concurrency: int | None = typer.Option(None, "--max-concurrency", min=1, help="Jobs of the batch at once."),
    force: bool = typer.Option(False, "--force", help="Compute every file again (no reuse of earlier work)."),
    out: Path | None = typer.Option(None, "--out", help="Write each file's result JSON and the summary here."),
    name: str | None = typer.Option(None, "--name", help="The batch's name (default: the folder's)."),
    api: str | None = typer.Option(None, "--api", help="The API's URL (default: FORGEFLOW_API_URL, else this host's)."),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="A file whose first line is the token (default: FORGEFLOW_API_TOKEN)."
    ),
) -> None:
    """Run a pipeline over every file of a folder (one job per file, across the fleet), or show,
    cancel or retry a batch: `forgeflow batch status|cancel|retry BATCH_ID`."""
    with BatchClient(_api(api), _token(token_file)) as client:
        try:
            if target in ACTIONS:
                result = {"status": client.get, "cancel": client.cancel, "retry": client.retry}[target](source)
                if target == "retry":
                    console.print(f"retrying {len(result['retried'])} files: {', '.join(result['retried'])}")
                    result = client.get(source)
                _show_batch(result)
                raise typer.Exit(ExitCode.OK if result["status"] in ("succeeded", "running") else ExitCode.FAILED)
            batch = _run(client, Path(target), Path(source), pattern, max_concurrency, force, name)
        except BatchApiError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(ExitCode.INVALID) from None
        _show_batch(batch)
        if out is not None:
            from forgeflow.jobs.batch import _write_out_dir

            _write_out_dir(client, batch, out)
            console.print(f"results in {out}")
    raise typer.Exit(ExitCode.OK if batch["status"] == "succeeded" else ExitCode.FAILED)


def _run(
    client: BatchClient,
    pipeline_file: Path,
    folder: Path,
    pattern: str,
    max_concurrency: int | None,
    force: bool,
    name: str | None,
) -> dict[str, Any]:
    try:
        document = json.loads(pipeline_file.read_text(encoding="utf-8"))
        paths = folder_files(folder, pattern, 100_000)
    except (OSError, ValueError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(ExitCode.INVALID) from None
    if not paths:
        console.print(f"[red]no file of {folder} matches {pattern!r}[/red]")
        raise typer.Exit(ExitCode.INVALID)
    console.print(f"uploading {len(paths)} files …")
    media, refused = client.upload_folder(paths)
    for file_name, reason in refused.items():
        console.print(f"[yellow]{file_name}: not stored ({reason})[/yellow]")
    fields = {"pipeline_id": document["pipeline_id"]} if "pipeline_id" in document else {"pipeline": document}
    body = {**fields, "name": name or folder.name, "media": media, "max_concurrency": max_concurrency, "force": force}
    created = client.create(body)
    console.print(f"batch {created['batch_id']}: {created['files_total']} files")
    return _follow(client, created)
