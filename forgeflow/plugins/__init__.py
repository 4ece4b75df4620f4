"""ForgeFlow's plugin layer: SDK, registry with lifecycle, media store and sandboxed runners.

Knows nothing of Prefect or FastAPI. A plugin author imports from here only.
"""

from forgeflow.plugins.errors import (
    ConfigError,
    DeviceUnavailable,
    ForgeFlowError,
    InputError,
    MediaError,
    MediaNotFound,
    MediaTooLarge,
    OutputError,
    PluginUnavailable,
    UnknownPlugin,
    UnknownTool,
)
from forgeflow.plugins.lifecycle import LifecycleState, LifecycleStore, PluginStatus
from forgeflow.plugins.media import Frame, MediaInfo, MediaReader, MediaStore
from forgeflow.plugins.registry import PluginEntry, PluginRegistry
from forgeflow.plugins.sdk import EmptyModel, Plugin, Tool, ToolContext, resource

__all__ = [
    "ConfigError",
    "DeviceUnavailable",
    "EmptyModel",
    "ForgeFlowError",
    "Frame",
    "InputError",
    "LifecycleState",
    "LifecycleStore",
    "MediaError",
    "MediaInfo",
    "MediaNotFound",
    "MediaReader",
    "MediaStore",
    "MediaTooLarge",
    "OutputError",
    "Plugin",
    "PluginEntry",
    "PluginRegistry",
    "PluginStatus",
    "PluginUnavailable",
    "Tool",
    "ToolContext",
    "UnknownPlugin",
    "UnknownTool",
    "resource",
]
