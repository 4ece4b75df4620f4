"""Work reuse: what a job computes, as one key, so the same work is never done twice.

A job's ``work_key`` is the SHA-256 of its media's content (the sha256 of a media ref, or of a local
file's bytes), the rest of its input, its stages (plugin, tool, config) and the version of each
plugin they use. Two jobs with the same key compute the same result (a pipeline's result is
deterministic: same input and pipeline, byte-identical result), so a job whose key an earlier job
computed successfully takes that job's result (:meth:`forgeflow.api.store.Store.create_job` with
``reuse``). A new plugin version, another config or other media bytes give another key: that work
is done afresh. ``force`` (batches) or leaving ``reuse`` off (API jobs) computes regardless.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from pydantic import JsonValue

from forgeflow.api.store.rows import pipeline_stages
from forgeflow.canonical import canonical_json
from forgeflow.plugins import MediaStore
from forgeflow.plugins.registry import PluginRegistry

_READ_CHUNK = 1 << 20


def media_digest(media: MediaStore, source: str, input_roots: list[Path]) -> str:
    """``sha256:<hex>`` of the content ``source`` names: a media ref is its own digest, a local
    path (inside an allowed root) is hashed."""
    if source.startswith("sha256:"):
        return source
    digest = hashlib.sha256()
    with media.resolve(source, input_roots=input_roots).open("rb") as fh:
        while chunk := fh.read(_READ_CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def work_key(
    pipeline: Mapping[str, JsonValue],
    input_data: Mapping[str, JsonValue],
    registry: PluginRegistry,
    media: MediaStore,
    input_roots: list[Path],
) -> str:
    """The job's work key (see the module's docstring)."""
    stages: list[JsonValue] = []
    versions: dict[str, str | None] = {}
    for stage in pipeline_stages(pipeline):
        entry = registry.resolve(str(stage["plugin"]))
        versions[entry.name] = entry.version
        stages.append({"plugin": entry.name, "tool": stage["tool"], "config": stage.get("config") or {}})
    inputs = dict(input_data)
    source = inputs.get("media")
    if isinstance(source, str):
        inputs["media"] = media_digest(media, source, input_roots)
    text = canonical_json({"input": inputs, "stages": stages, "plugins": versions})
    return hashlib.sha256(text.encode()).hexdigest()
