"""A plugin whose weights are missing: UNAVAILABLE with the reason its availability check gives."""

from pathlib import Path

from pydantic import BaseModel

from forgeflow.plugins import Plugin

WEIGHTS = Path("/nonexistent/forgeflow-test-weights.pt")

plugin = Plugin("needs-weights", "0.1.0", description="Needs a weights file that is not there.")


@plugin.availability_check
def _weights_present() -> str | None:
    return None if WEIGHTS.exists() else f"weights file not found: {WEIGHTS}"


class Detections(BaseModel):
    count: int


@plugin.tool(output=Detections)
def detect(inputs, config, ctx) -> Detections:
    """Never runs: the plugin is unavailable."""
    return Detections(count=0)
