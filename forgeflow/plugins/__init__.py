"""The plugin SDK: everything a plugin author imports, and nothing else.

A plugin is a :class:`Plugin` of :class:`Tool` s with typed config/input/output models; a tool gets a
:class:`ToolContext` (media store, device, cache, logging) and raises the errors below. Discovery
and lifecycle are :mod:`forgeflow.plugins.registry` and :mod:`forgeflow.plugins.lifecycle` (not
imported here); the sandboxed runners that call plugins live in :mod:`forgeflow.engine`.
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
from forgeflow.plugins.frames import ArtifactBudgetExceeded, FrameStream
from forgeflow.plugins.media import MediaInfo, MediaStore
from forgeflow.plugins.media_reader import Frame, MediaReader
from forgeflow.plugins.sdk import BatchSpec, EmptyModel, Plugin, Tool, ToolContext, resource

__all__ = [
    "ArtifactBudgetExceeded",
    "BatchSpec",
    "ConfigError",
    "DeviceUnavailable",
    "EmptyModel",
    "ForgeFlowError",
    "Frame",
    "FrameStream",
    "InputError",
    "MediaError",
    "MediaInfo",
    "MediaNotFound",
    "MediaReader",
    "MediaStore",
    "MediaTooLarge",
    "OutputError",
    "Plugin",
    "PluginUnavailable",
    "Tool",
    "ToolContext",
    "UnknownPlugin",
    "UnknownTool",
    "resource",
]
