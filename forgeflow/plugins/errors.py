"""Typed errors of the plugin layer.

Each carries enough context (plugin, tool, field) for a message a user can act on, and an
``error_type`` string that travels in results and realtime messages.
"""

from __future__ import annotations

from pydantic import ValidationError


class ForgeFlowError(Exception):
    """Base of every error ForgeFlow raises on purpose."""

    error_type: str = "ForgeFlowError"

    def __init__(self, message: str, **context: object) -> None:
        super().__init__(message)
        self.message = message
        self.context = {k: v for k, v in context.items() if v is not None}

    def to_dict(self) -> dict[str, object]:
        return {"error": self.message, "error_type": self.error_type, **self.context}


class UnknownPlugin(ForgeFlowError):
    error_type = "UnknownPlugin"


class UnknownTool(ForgeFlowError):
    error_type = "UnknownTool"


class PluginUnavailable(ForgeFlowError):
    """The plugin cannot load (missing dependency, missing weights)."""

    error_type = "PluginUnavailable"


class ConfigError(ForgeFlowError):
    """A tool's config fails its config model."""

    error_type = "ConfigError"


class InputError(ForgeFlowError):
    """A tool's inputs fail its input model."""

    error_type = "InputError"


class OutputError(ForgeFlowError):
    """A tool returned something its output model rejects (a plugin bug)."""

    error_type = "OutputError"


class MediaError(ForgeFlowError):
    """Media that cannot be read: corrupt, unsupported, too large, outside the allowed roots."""

    error_type = "MediaError"


class MediaNotFound(MediaError):
    error_type = "MediaNotFound"


class MediaTooLarge(MediaError):
    error_type = "MediaTooLarge"


class DeviceUnavailable(ForgeFlowError):
    """The requested compute device (e.g. ``cuda``) does not exist on this host."""

    error_type = "DeviceUnavailable"


class StageTimeout(ForgeFlowError):
    error_type = "TimeoutError"


class StageMemoryExceeded(ForgeFlowError):
    error_type = "MemoryError"


class WorkerCrashed(ForgeFlowError):
    """The sandboxed process died (signal, ``os._exit``) or broke the protocol."""

    error_type = "WorkerCrashed"


def format_validation_error(exc: ValidationError) -> str:
    """One line per pydantic error: ``field.path: message``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)
