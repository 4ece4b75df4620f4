"""The inline runner (plugin unit tests): same results as the process runner, in this process."""

from __future__ import annotations

import os

import pytest
from pydantic import BaseModel

from forgeflow.plugins import InputError, Plugin
from forgeflow.plugins.lifecycle import LifecycleState, LifecycleStore
from forgeflow.plugins.registry import PluginRegistry

from ._helpers import call

pytestmark = pytest.mark.fast


def test_inline_runs_in_this_process(make_runner):
    runner = make_runner("inline")
    result = runner.run(call("pid"))
    assert result.ok and result.outputs == {"pid": os.getpid()}
    numbers = runner.run(call("numbers", config={"start": 1}, inputs={"count": 2}))
    assert numbers.outputs == {"numbers": [1, 2]}
    assert numbers.result_size_bytes == len(b'{"numbers":[1,2]}')


def test_inline_errors_match_the_process_runner(make_runner):
    runner = make_runner("inline")
    failed = runner.run(call("fail", config={"message": "inline boom"}))
    assert (failed.error_type, failed.error) == ("RuntimeError", "inline boom")
    assert "RuntimeError: inline boom" in failed.traceback
    assert runner.run(call("numbers", inputs={"count": "x"})).error_type == "InputError"
    assert runner.run(call("bad_output")).error_type == "OutputError"
    assert runner.run(call("nope")).error_type == "UnknownTool"
    assert runner.run(call("detect", plugin="needs-weights")).error_type == "PluginUnavailable"


def test_inline_with_an_in_memory_plugin_and_lifecycle(tmp_path, make_runner):
    class In(BaseModel):
        name: str

    class Out(BaseModel):
        greeting: str

    class Cfg(BaseModel):
        greeting: str = "hello"

    plugin = Plugin("greeter", "1.0.0", aliases=["hi"])

    @plugin.tool(input=In, output=Out, config=Cfg)
    def greet(inputs, config, ctx):
        """Say hello."""
        if inputs.name == "error":
            raise ValueError("no greeting for errors")
        if not inputs.name:
            raise InputError("an empty name cannot be greeted", plugin=ctx.plugin, tool=ctx.tool)
        return Out(greeting=f"{config.greeting}, {inputs.name} ({ctx.plugin}.{ctx.tool})")

    store = LifecycleStore(tmp_path / "lc.sqlite")
    registry = PluginRegistry.from_plugins([plugin], store)
    runner = make_runner("inline", registry_=registry)
    ok = runner.run(call("greet", plugin="hi", inputs={"name": "Ada"}, config={"greeting": "hey"}))
    assert ok.outputs == {"greeting": "hey, Ada (greeter.greet)"}
    assert store.get("greeter").state == LifecycleState.INITIALIZED
    bad = runner.run(call("greet", plugin="greeter", inputs={"name": "error"}))
    assert bad.error_type == "ValueError"
    assert store.get("greeter").state == LifecycleState.FAILED
    assert runner.run(call("greet", plugin="greeter", inputs={"name": "Bob"})).ok
    assert store.get("greeter").state == LifecycleState.INITIALIZED
    assert (store.get("greeter").calls, store.get("greeter").failures) == (3, 1)
    # The tool refusing what the caller gave it fails the call, not the plugin.
    refused = runner.run(call("greet", plugin="greeter", inputs={"name": ""}))
    assert refused.error_type == "InputError"
    assert store.get("greeter").state == LifecycleState.INITIALIZED
    assert (store.get("greeter").calls, store.get("greeter").failures) == (4, 1)


def test_docker_media_overlay_reads_store_writes_aside_and_imports(tmp_path, settings):
    """Docker mode: the worker reads the read-only store, writes new media aside; the runner then
    adds them to the host store under the same ref."""
    import cv2
    import numpy as np

    from forgeflow.engine.runners.docker import DockerRunner
    from forgeflow.engine.runners.worker import _OverlayMediaStore
    from forgeflow.plugins import MediaStore

    host = MediaStore(settings.media_root)
    png = tmp_path / "a.png"
    cv2.imwrite(str(png), np.zeros((4, 4, 3), dtype=np.uint8))
    existing = host.put_file(png).ref
    out = tmp_path / "out" / "media"
    overlay = _OverlayMediaStore(settings.media_root, out)
    assert overlay.path(existing) == host.path(existing)
    cv2.imwrite(str(png), np.full((4, 4, 3), 9, dtype=np.uint8))
    made = overlay.put_file(png, filename="made.png").ref
    assert overlay.path(made).is_relative_to(out)
    runner = DockerRunner(settings, registry=type("R", (), {"lifecycle": None})())
    runner._import_media(out)
    assert host.info(made).filename == "made.png"
