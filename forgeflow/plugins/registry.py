"""Discovery of installed plugins and resolution of names and aliases.

Plugins come only from installed entry points in the group ``forgeflow.plugins`` (the built-ins
too): nothing is imported from a path a request names. A plugin whose entry point fails to import,
or whose availability check reports a reason, is kept as UNAVAILABLE with that reason, so the
API can show it and validation can reject pipelines that use it.
"""

from __future__ import annotations

import difflib
import functools
import traceback
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from forgeflow.plugins.errors import PluginUnavailable, UnknownPlugin, UnknownTool
from forgeflow.plugins.lifecycle import LifecycleState, LifecycleStore, PluginStatus
from forgeflow.plugins.sdk import Plugin, Tool

ENTRY_POINT_GROUP = "forgeflow.plugins"


@functools.cache
def installed_entry_points(group: str = ENTRY_POINT_GROUP) -> tuple[EntryPoint, ...]:
    """The entry points of ``group``, read once per process: finding them reads the metadata of every
    installed distribution (~20-40 ms here), and what is installed does not change under a running
    process. A plugin installed later is found by the next process, as before (every process that
    discovers plugins does so once, at its start). Each discovery still loads them afresh."""
    return tuple(entry_points(group=group))


@dataclass
class PluginEntry:
    """One discovered plugin: the loaded object, or why it could not be loaded."""

    name: str
    entry_point: str
    plugin: Plugin | None = None
    unavailable_reason: str | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def version(self) -> str | None:
        return self.plugin.version if self.plugin else None

    @property
    def available(self) -> bool:
        return self.plugin is not None and not self.unavailable_reason

    def tool(self, name: str) -> Tool:
        if self.plugin is None:
            raise PluginUnavailable(f"plugin {self.name!r} is unavailable: {self.unavailable_reason}", plugin=self.name)
        try:
            return self.plugin.tools[name]
        except KeyError:
            known = sorted(self.plugin.tools)
            hint = difflib.get_close_matches(name, known, n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            raise UnknownTool(
                f"plugin {self.name!r} has no tool {name!r} (tools: {', '.join(known)}){suggestion}",
                plugin=self.name,
                tool=name,
            ) from None


class PluginRegistry:
    """The installed plugins of this environment, by canonical name and alias."""

    def __init__(self, entries: list[PluginEntry], lifecycle: LifecycleStore | None = None) -> None:
        self.entries = {e.name: e for e in entries}
        self.lifecycle = lifecycle
        self._aliases: dict[str, str] = {}
        for entry in entries:
            for alias in entry.aliases:
                self._aliases.setdefault(alias, entry.name)
        if lifecycle is not None:
            for entry in entries:
                lifecycle.loaded(entry.name, entry.unavailable_reason)

    @classmethod
    def discover(cls, lifecycle: LifecycleStore | None = None, group: str = ENTRY_POINT_GROUP) -> PluginRegistry:
        return cls([load_entry_point(ep) for ep in installed_entry_points(group)], lifecycle)

    @classmethod
    def from_plugins(cls, plugins: list[Plugin], lifecycle: LifecycleStore | None = None) -> PluginRegistry:
        """A registry of in-memory plugins (for plugin unit tests with the inline runner)."""
        entries = [PluginEntry(p.name, f"<memory:{p.name}>", p, p.unavailable_reason(), p.aliases) for p in plugins]
        return cls(entries, lifecycle)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def resolve(self, name: str) -> PluginEntry:
        """The plugin named ``name`` or aliased so; UnknownPlugin with a suggestion otherwise."""
        canonical = name if name in self.entries else self._aliases.get(name)
        if canonical is None:
            known = sorted([*self.entries, *self._aliases])
            hint = difflib.get_close_matches(name, known, n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            raise UnknownPlugin(
                f"unknown plugin {name!r} (installed: {', '.join(sorted(self.entries)) or 'none'}){suggestion}",
                plugin=name,
            )
        return self.entries[canonical]

    def tool(self, plugin: str, tool: str) -> tuple[PluginEntry, Tool]:
        entry = self.resolve(plugin)
        if not entry.available:
            raise PluginUnavailable(
                f"plugin {entry.name!r} is unavailable: {entry.unavailable_reason}", plugin=entry.name, tool=tool
            )
        return entry, entry.tool(tool)

    def status(self, name: str) -> PluginStatus:
        entry = self.resolve(name)
        stored = self.lifecycle.get(entry.name) if self.lifecycle else None
        if entry.unavailable_reason:
            return PluginStatus(entry.name, LifecycleState.UNAVAILABLE, entry.unavailable_reason, "PluginUnavailable")
        return stored or PluginStatus(entry.name, LifecycleState.LOADED)

    def describe(self, name: str, *, schemas: bool = False) -> dict[str, Any]:
        """A JSON-ready view of one plugin: version, aliases, tools, lifecycle."""
        entry = self.resolve(name)
        tools: list[dict[str, Any]] = []
        if entry.plugin is not None:
            for tool in entry.plugin.tools.values():
                item: dict[str, Any] = {
                    "name": tool.name,
                    "description": tool.description,
                    # it takes batches across jobs (the host's settings fill what it leaves None)
                    "batch": tool.batch.model_dump() if tool.batch is not None else None,
                }
                if schemas:
                    item["schemas"] = tool.schemas()
                tools.append(item)
        return {
            "name": entry.name,
            "version": entry.version,
            "aliases": list(entry.aliases),
            "description": entry.plugin.description if entry.plugin else "",
            "entry_point": entry.entry_point,
            "available": entry.available,
            "unavailable_reason": entry.unavailable_reason,
            "tools": tools,
            "lifecycle": self.status(entry.name).to_dict(),
        }


def load_entry_point(ep: EntryPoint) -> PluginEntry:
    """Import one entry point; any failure becomes an UNAVAILABLE entry with the reason."""
    try:
        obj = ep.load()
    except Exception as exc:
        last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
        where = f" ({last[0].filename}:{last[0].lineno})" if last else ""
        return PluginEntry(ep.name, ep.value, None, f"failed to import: {type(exc).__name__}: {exc}{where}")
    if not isinstance(obj, Plugin):
        return PluginEntry(ep.name, ep.value, None, f"entry point is a {type(obj).__name__}, not a forgeflow Plugin")
    if obj.name != ep.name:
        return PluginEntry(
            ep.name, ep.value, None, f"entry point name {ep.name!r} differs from the plugin's name {obj.name!r}"
        )
    return PluginEntry(obj.name, ep.value, obj, obj.unavailable_reason(), obj.aliases)
