"""Imported by a vision plugin's worker when it starts (``Plugin(preload=[...])``; by the process runner's
fork server, once, for every vision worker it forks), before any call's memory limit applies: torch maps ~3-4 GB of address space on import and would otherwise count
against the first call's budget. Sets Ultralytics up offline and quiet first (never import
Ultralytics any other way). Never imported by the API process."""

from forgeflow.plugins.builtin._ultralytics import setup_ultralytics

setup_ultralytics()

import ultralytics.trackers.byte_tracker  # noqa: E402,F401 - ByteTrack and its lap dependency
from ultralytics.models import YOLO  # noqa: E402,F401 - what ``from ultralytics import YOLO`` gives
