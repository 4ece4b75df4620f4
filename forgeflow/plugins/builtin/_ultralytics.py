"""Ultralytics in a worker, offline and quiet: its environment, the torch device, the model, a pass.

Nothing here imports torch or Ultralytics at module level (see :mod:`._vision`): they are imported
inside the functions, which run in the sandboxed worker.

* :func:`setup_ultralytics` — offline, quiet, no auto-install, a private config dir with a local
  font (so nothing ever tries to download ``Arial.ttf``), explicit torch thread count.
* :func:`resolve_device` — ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; a CUDA device that does not
  exist raises :class:`DeviceUnavailable`, never a silent fallback to the CPU.
* :func:`load_yolo` — one Ultralytics model per (weights, device) per worker process
  (:func:`forgeflow.plugins.sdk.resource`).
* :func:`predict` — one Ultralytics pass over a list of frames.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, cast

from forgeflow.plugins.errors import ConfigError, DeviceUnavailable
from forgeflow.plugins.sdk import resource

if TYPE_CHECKING:
    from cv2.typing import MatLike
    from ultralytics.engine.results import Results
    from ultralytics.models import YOLO

__all__ = ["load_yolo", "predict", "resolve_device", "setup_ultralytics", "torch_threads"]

_setup_lock = threading.Lock()
_setup_done = False


def _font_source() -> Path | None:
    """A TTF shipped by an installed package (matplotlib's DejaVuSans) or the system."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if candidate.is_file():
            return candidate
    for root in ("/usr/share/fonts", "/usr/local/share/fonts"):
        if os.path.isdir(root):
            for found in sorted(Path(root).rglob("*.ttf")):
                return found
    return None


def _config_dir() -> Path:
    """YOLO_CONFIG_DIR: under FORGEFLOW_HOME when writable, else a private temp dir."""
    if os.environ.get("YOLO_CONFIG_DIR"):
        return Path(os.environ["YOLO_CONFIG_DIR"])
    try:
        from forgeflow.settings import get_settings

        candidate = get_settings().home / "ultralytics"
        (candidate / "Ultralytics").mkdir(parents=True, exist_ok=True)
        if os.access(candidate / "Ultralytics", os.W_OK):
            return candidate
    except OSError:
        pass
    candidate = Path(tempfile.gettempdir()) / f"forgeflow-ultralytics-{os.getuid()}"
    (candidate / "Ultralytics").mkdir(parents=True, exist_ok=True)
    return candidate


def torch_threads() -> int:
    """Threads for torch: the ``torch_threads`` setting, else the CPUs this process may use."""
    from forgeflow.settings import get_settings

    configured = get_settings().torch_threads
    if configured:
        return configured
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def setup_ultralytics() -> None:
    """Make Ultralytics offline and quiet; call before (and instead of) importing it anywhere.

    Sets YOLO_OFFLINE, YOLO_VERBOSE=False, YOLO_AUTOINSTALL=False and a private YOLO_CONFIG_DIR
    holding a local TTF as Arial.ttf / Arial.Unicode.ttf (Ultralytics downloads those otherwise),
    and fixes the torch thread count (Ultralytics would set OMP_NUM_THREADS=1 when unset).
    """
    global _setup_done
    with _setup_lock:
        if _setup_done:
            return
        threads = torch_threads()
        os.environ["YOLO_OFFLINE"] = "1"
        os.environ["YOLO_VERBOSE"] = "False"
        os.environ["YOLO_AUTOINSTALL"] = "False"
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        config_dir = _config_dir()
        os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
        font = _font_source()
        if font is not None:
            for name in ("Arial.ttf", "Arial.Unicode.ttf"):
                target = config_dir / "Ultralytics" / name
                if not target.exists():
                    tmp = target.with_suffix(f".tmp{os.getpid()}")
                    shutil.copyfile(font, tmp)
                    os.replace(tmp, target)
        import torch

        torch.set_num_threads(threads)
        import ultralytics  # noqa: F401 - imported here, after the environment is set
        from ultralytics.utils import LOGGER, SETTINGS

        LOGGER.setLevel("ERROR")
        try:  # never phone home, never write runs/ next to the caller
            SETTINGS.update({"sync": False, "hub": False})  # type: ignore[no-untyped-call]
        except Exception:  # settings keys differ between versions: not fatal
            pass
        _setup_done = True


def resolve_device(device: str) -> str:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` → a torch device string; DeviceUnavailable if absent."""
    import torch

    device = device.strip().lower()
    if device == "cpu":
        return "cpu"
    cuda = torch.cuda.is_available()
    if device == "auto":
        return "cuda:0" if cuda else "cpu"
    if not device.startswith("cuda"):
        raise ConfigError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not cuda:
        build = torch.version.cuda
        why = (
            f"torch {torch.__version__} (CUDA {build}) sees no CUDA device"
            if build
            else f"torch {torch.__version__} is a CPU-only build"
        )
        raise DeviceUnavailable(
            f"device {device!r} requested but no CUDA GPU is available on this host: {why}. "
            "Use device 'cpu' or 'auto', or run this stage on a GPU worker."
        )
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceUnavailable(
            f"device {device!r} requested but this host has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
        )
    return f"cuda:{index}"


@resource
def load_yolo(weights: str, device: str) -> YOLO:
    """An Ultralytics YOLO model on ``device``, loaded once per worker process."""
    setup_ultralytics()
    from ultralytics.models import YOLO  # what ``from ultralytics import YOLO`` gives

    try:
        model = YOLO(weights, task=None)
    except Exception as exc:  # a corrupt or foreign file: say which
        raise ConfigError(f"cannot load model weights {weights}: {type(exc).__name__}: {exc}") from None
    model.to(device)
    return model


_predict_lock = threading.Lock()


def predict(
    model: YOLO, images: list[MatLike], *, device: str, imgsz: int, confidence: float, classes: list[int] | None
) -> list[Results]:
    """Run ``model`` on BGR frames; one Ultralytics Results per frame (no saving, no printing)."""
    with _predict_lock:  # one predictor per model object: never run it from two threads at once
        # stream=False on a detection or pose model: a list of one Results per image
        results = cast(
            "list[Results]",
            model.predict(
                source=images,
                device=device,
                imgsz=imgsz,
                conf=confidence,
                classes=classes,
                verbose=False,
                save=False,
                stream=False,
                half=False,
            ),
        )
    return results
