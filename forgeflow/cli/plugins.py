"""``forgeflow plugins list|show``: the installed plugins, their tools and lifecycle states."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import typer
from rich import box
from rich.table import Table

from forgeflow.cli.help import ProseHelp
from forgeflow.cli.output import console, out, print_json
from forgeflow.exit_codes import ExitCode

if TYPE_CHECKING:
    from collections.abc import Mapping

    from pydantic import JsonValue

    from forgeflow.plugins.registry import PluginRegistry

plugins_app = typer.Typer(cls=ProseHelp, help="Installed plugins and their lifecycle.", no_args_is_help=True)


def plugin_registry() -> PluginRegistry:
    """The plugins installed in this Python environment, with their lifecycle states on this host."""
    from forgeflow.plugins.lifecycle import LifecycleStore
    from forgeflow.plugins.registry import PluginRegistry
    from forgeflow.settings import get_settings

    return PluginRegistry.discover(LifecycleStore(get_settings().lifecycle_db))


@plugins_app.command("list")
def plugins_list(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Installed plugins: versions, aliases, tools and lifecycle states."""
    registry = plugin_registry()
    items = [registry.describe(name) for name in registry.names()]
    if as_json:
        print_json(json.dumps(items))
        return
    table = Table(title="ForgeFlow plugins", title_justify="left")
    for column in ("plugin", "version", "aliases", "tools", "state", "last error"):
        table.add_column(column, overflow="fold")
    colors = {"FAILED": "red", "UNAVAILABLE": "red", "RUNNING": "yellow", "INITIALIZED": "green", "LOADED": "cyan"}
    for item in items:
        state = item["lifecycle"]["state"]
        table.add_row(
            item["name"],
            item["version"] or "",
            ", ".join(item["aliases"]),
            ", ".join(t["name"] for t in item["tools"]),
            f"[{colors.get(state, 'white')}]{state}[/]",
            item["lifecycle"].get("last_error") or "",
        )
    out.print(table)


@plugins_app.command("show")
def plugins_show(
    name: str = typer.Argument(..., help="Plugin name or alias.", metavar="NAME"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (with the tools' JSON Schemas) instead."),
) -> None:
    """One plugin: its tools with their inputs, outputs and config fields (types, defaults)."""
    from forgeflow.plugins import UnknownPlugin

    try:
        item = plugin_registry().describe(name, schemas=True)
    except UnknownPlugin as exc:
        console.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(ExitCode.INVALID) from None
    if as_json:
        print_json(json.dumps(item))
        return
    aliases = f" (aliases: {', '.join(item['aliases'])})" if item["aliases"] else ""
    out.print(f"[bold]{item['name']}[/bold] {item['version'] or ''}{aliases} · {item['lifecycle']['state']}")
    for line in (item["description"], item["unavailable_reason"], f"entry point: {item['entry_point']}"):
        if line:
            out.print(f"  {line}", highlight=False)
    for tool in item["tools"]:
        table = Table(title=f"{tool['name']}: {tool['description']}", title_justify="left", box=box.SIMPLE_HEAD)
        for column in ("", "field", "type", "default", "description"):
            table.add_column(column, overflow="fold")
        for part in ("input", "output", "config"):
            rows = _schema_fields(tool["schemas"][part], with_defaults=part != "output")
            for index, (field, kind, default, description) in enumerate(rows):
                table.add_row(part if index == 0 else "", field, kind, default, description)
            if not rows:
                table.add_row(part, "[dim]none[/dim]", "", "", "")
        out.print(table)


def _schema_fields(schema: Mapping[str, JsonValue], *, with_defaults: bool) -> list[tuple[str, str, str, str]]:
    """``(field, type, default, description)`` for each property of a model's JSON Schema; with
    ``with_defaults``, the default is "required" for a field without one."""
    rows = []
    required = {name for name in _listed(schema.get("required")) if isinstance(name, str)}
    for field, value in _object(schema.get("properties")).items():
        spec = _object(value)
        default = ""
        if with_defaults:
            default = "required" if field in required else json.dumps(spec.get("default"))
        description = spec.get("description", "")
        rows.append((field, _schema_type(spec), default, description if isinstance(description, str) else ""))
    return rows


def _schema_type(spec: Mapping[str, JsonValue]) -> str:
    """A short name of a JSON Schema type: ``integer``, ``array of FramePlayers``, ``"cpu" | "cuda"``."""
    if "$ref" in spec:
        return str(spec["$ref"]).rsplit("/", 1)[-1]
    if "enum" in spec:
        return " | ".join(json.dumps(value) for value in _listed(spec["enum"]))
    if "const" in spec:
        return json.dumps(spec["const"])
    if "anyOf" in spec:
        return " | ".join(_schema_type(_object(option)) for option in _listed(spec["anyOf"]))
    if spec.get("type") == "array":
        return f"array of {_schema_type(_object(spec.get('items')))}"
    return str(spec.get("type", "any"))


def _object(value: JsonValue) -> Mapping[str, JsonValue]:
    """``value`` when it is a JSON object (a schema, its properties), else an empty one."""
    return value if isinstance(value, dict) else {}


def _listed(value: JsonValue) -> list[JsonValue]:
    """``value`` when it is a JSON array (a schema's ``required``, ``enum``, ``anyOf``), else an empty one."""
    return value if isinstance(value, list) else []
