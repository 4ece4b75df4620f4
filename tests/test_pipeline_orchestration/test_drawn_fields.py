"""Post-steps declared, not known: what a job's annotated media draws is what its tools declare.

A tool names its drawn output fields in ``@plugin.tool(..., draws={field: kind})``; the stage loop
reads that off the pipeline's tools (``jobs.annotated_media.layers_of``) and knows no field by name.
"""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import BaseModel

from forgeflow.jobs.annotate import has_drawable
from forgeflow.jobs.annotated_media import layers_of
from forgeflow.plugins.media import MediaStore
from forgeflow.plugins.sdk import Plugin
from forgeflow.settings import get_settings
from tests.test_pipeline_orchestration.conftest import run_stage_loop

pytestmark = pytest.mark.fast


class Boxes(BaseModel):
    players: list[dict[str, object]]
    count: int = 0


def test_a_tool_declares_its_drawn_fields_and_a_wrong_declaration_fails_at_registration():
    plugin = Plugin("drawer", "1.0.0")

    @plugin.tool(output=Boxes, draws={"players": "boxes"})
    def detect(inputs, config, ctx):
        return Boxes(players=[])

    assert plugin.tools["detect"].draws == (("players", "boxes"),)
    with pytest.raises(ValueError, match="'people', which the output model Boxes lacks"):
        plugin.tool(name="missing", output=Boxes, draws={"people": "boxes"})(detect)
    with pytest.raises(ValueError, match="the kind 'circles'; known kinds: boxes, poses, labels"):
        plugin.tool(name="unknown", output=Boxes, draws={"players": "circles"})(detect)
    assert set(plugin.tools) == {"detect"}


def test_layers_follow_the_declarations_a_later_stage_winning_a_kind():
    plugin = Plugin("drawer", "1.0.0")

    class Other(BaseModel):
        people: list[dict[str, object]]
        skeletons: list[dict[str, object]]

    @plugin.tool(output=Boxes, draws={"players": "boxes"})
    def first(inputs, config, ctx):
        return Boxes(players=[])

    @plugin.tool(output=Other, draws={"people": "boxes", "skeletons": "poses"})
    def second(inputs, config, ctx):
        return Other(people=[], skeletons=[])

    @plugin.tool(output=Boxes)
    def silent(inputs, config, ctx):
        return Boxes(players=[])

    tools = plugin.tools
    assert layers_of([tools["first"]]) == {"boxes": "players"}
    assert layers_of([tools["first"], tools["second"]]) == {"boxes": "people", "poses": "skeletons"}
    assert layers_of([tools["silent"]]) == {}
    result = {"players": [{"frame_index": 0, "players": [{"box": [0, 0, 1, 1]}]}]}
    assert has_drawable(result, {"boxes": "players"})
    assert not has_drawable(result, {})  # the same field, undeclared: nothing to draw
    assert not has_drawable(result, {"boxes": "people"})


def test_a_job_whose_tools_declare_nothing_is_not_drawn_whatever_its_fields_are_called(
    registry, ff_home, tmp_path, monkeypatch
):
    import cv2
    import numpy as np

    image = tmp_path / "in.png"
    cv2.imwrite(str(image), np.full((120, 160, 3), 90, dtype=np.uint8))
    ref = MediaStore(get_settings().media_root).put_file(image).ref
    stages = [{"plugin": "testkit", "tool": "fake_players"}]
    declared, _ = run_stage_loop(registry, stages, {"media": ref}, job_id="job-declared")
    assert declared["ok"] is True and declared["result"]["players"] and declared["annotated_media"]

    tools = registry.resolve("testkit").plugin.tools
    monkeypatch.setitem(tools, "fake_players", dataclasses.replace(tools["fake_players"], draws=()))
    undeclared, _ = run_stage_loop(registry, stages, {"media": ref}, job_id="job-undeclared")
    assert undeclared["ok"] is True and undeclared["result"]["players"] == declared["result"]["players"]
    assert "annotated_media" not in undeclared and "annotated_media_error" not in undeclared
