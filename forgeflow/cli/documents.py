"""What ``forgeflow run`` and ``forgeflow validate`` read: a pipeline file and the job's input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from forgeflow.cli.output import console
from forgeflow.exit_codes import ExitCode

if TYPE_CHECKING:
    from pydantic import JsonValue

    from forgeflow.canonical import JsonObject

#: ``--input-json``, the same option of ``run`` and ``validate``: read by :func:`read_job_input`.
INPUT_JSON_OPTION = typer.Option(None, "--input-json", help="Job input as JSON (or a JSON file).", metavar="JSON")


def load_document(path: Path) -> JsonObject | list[JsonValue]:
    """Read a pipeline file, turning unreadable or malformed JSON into a clear message and exit 2."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        console.print(f"[red]cannot read {path}: {exc.strerror or exc}[/red]")
        raise typer.Exit(ExitCode.INVALID) from None
    try:
        document: JsonObject | list[JsonValue] = json.loads(text)
        return document
    except json.JSONDecodeError as exc:
        console.print(f"[red]{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}[/red]")
        raise typer.Exit(ExitCode.INVALID) from None


def read_job_input(document: JsonObject | list[JsonValue], media: Path | None, input_json: str | None) -> JsonObject:
    """The job input: the file's own ``input``, then ``--input-json``, then ``--input`` media."""
    given = document.get("input") if isinstance(document, dict) else None
    data: JsonObject = dict(given) if isinstance(given, dict) else {}
    if input_json:
        text = Path(input_json).read_text(encoding="utf-8") if Path(input_json).is_file() else input_json
        try:
            extra = json.loads(text)
        except json.JSONDecodeError as exc:
            console.print(f"[red]--input-json is not valid JSON: {exc.msg}[/red]")
            raise typer.Exit(ExitCode.INVALID) from None
        if not isinstance(extra, dict):
            console.print("[red]--input-json must be a JSON object[/red]")
            raise typer.Exit(ExitCode.INVALID)
        data.update(extra)
    if media is not None:
        from forgeflow.plugins import MediaError, MediaStore
        from forgeflow.settings import get_settings

        settings = get_settings()
        try:
            info = MediaStore(settings.media_root).put_file(media, max_bytes=settings.max_media_bytes)
        except MediaError as exc:
            console.print(f"[red]--input {media}: {exc.message}[/red]")
            raise typer.Exit(ExitCode.INVALID) from None
        data["media"] = info.ref
    return data
