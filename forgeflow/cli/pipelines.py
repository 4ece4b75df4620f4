"""``forgeflow validate|schema|sample-clip``: check pipeline files, their schema, the sample media;
and how a pipeline's problems and warnings are shown (``forgeflow run`` shows them the same way)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from forgeflow.cli.documents import INPUT_JSON_OPTION, load_document, read_job_input
from forgeflow.cli.output import console, out, print_json
from forgeflow.cli.plugins import plugin_registry
from forgeflow.exit_codes import ExitCode

if TYPE_CHECKING:
    from forgeflow.pipeline.validation import PipelineValidationError, ValidatedPipeline


def print_issues(exc: PipelineValidationError) -> None:
    for issue in exc.issues:
        console.print(f"[red]✗[/red] {issue.location or 'pipeline'}: {issue.message} [dim]({issue.error_type})[/dim]")


def print_warnings(validated: ValidatedPipeline) -> None:
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


def validate(
    file: Path = typer.Argument(..., help="Pipeline JSON file.", metavar="FILE"),
    media: Path | None = typer.Option(
        None, "--input", help="Media file the job would read (checks input types).", metavar="MEDIA"
    ),
    input_json: str | None = INPUT_JSON_OPTION,
) -> None:
    """Check a pipeline without running it: plugins, tools, configs, stage compatibility."""
    from forgeflow.pipeline.validation import PipelineValidationError, parse_definition, validate_pipeline

    document = load_document(file)
    job_input = (
        read_job_input(document, media, input_json)
        if (media or input_json or (isinstance(document, dict) and "input" in document))
        else None
    )
    try:
        validated = validate_pipeline(parse_definition(document), job_input, plugin_registry())
    except PipelineValidationError as exc:
        print_issues(exc)
        raise typer.Exit(ExitCode.INVALID) from None
    print_warnings(validated)
    out.print(f"[green]✓[/green] {file}: valid, {len(validated.stages)} stage(s)")
    for stage in validated.stages:
        out.print(f"  {stage.index}: {stage.name}  → {', '.join(stage.output_fields)}")
    if validated.job_input_fields:
        out.print(f"  job input: {', '.join(validated.job_input_fields)}")


def schema() -> None:
    """Print the JSON Schema of pipeline files."""
    from forgeflow.pipeline.definition import pipeline_json_schema

    print_json(json.dumps(pipeline_json_schema()))


def sample_clip(
    path: Path = typer.Argument(Path("examples/sample.mp4"), help="Where to write the clip."),
    frames: int = typer.Option(64, min=2, help="Number of frames."),
    fps: float = typer.Option(25.0, min=1, help="Frames per second."),
) -> None:
    """Make the offline sample clip: camera pans over bus.jpg and zidane.jpg, which Ultralytics ships."""
    from forgeflow.cli.sample_clip import make_sample_clip

    console.print(f"wrote {make_sample_clip(path, frames=frames, fps=fps)} ({frames} frames at {fps:g} fps)")
