"""``--help`` that reads as prose, for every command group of the ``forgeflow`` command.

Typer vends its own copy of click, whose classes it does not export: the hooks below name them
from ``typer._click`` (for mypy only) and forward a group's settings to Typer as they are."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from typer._click.core import Command, Context
    from typer._click.formatting import HelpFormatter


class ProseHelp(typer.core.TyperGroup):
    """A command group whose ``--help`` reads as prose: an option shows the name of its value
    (``--input MEDIA``) or nothing for a flag, never a Python type (``<str>``, ``<bool>``); an argument
    is its plain name (``FILE``, not ``{file} <path>``); a command's summary in a list is its first
    paragraph on one line (not the docstring's own line breaks)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _prose_params(self)
        for command in self.commands.values():
            if command.help and not command.short_help:
                command.short_help = " ".join(command.help.split("\n\n")[0].split())
            if not isinstance(command, typer.core.TyperGroup):  # a group of ours does its own
                _prose_params(command)

    def format_help(self, ctx: Context, formatter: HelpFormatter) -> None:
        _prose_params(self)  # the root's completion options are added after __init__
        super().format_help(ctx, formatter)


def _prose_params(command: Command) -> None:
    """Name a command's parameters as :class:`ProseHelp` says, ``--help`` (made on demand) included."""
    for param in command.params:
        name = (param.metavar or param.name or "").upper()
        if isinstance(param, typer.core.TyperArgument):
            usage = name if param.required else f"[{name}]"
            setattr(param, "display_type_rich", lambda ctx: None)  # noqa: B010 - this instance's own
            setattr(param, "get_usage_pieces", lambda ctx, usage=usage: [usage])  # noqa: B010
            param.metavar = name
        elif isinstance(param, typer.core.TyperOption):
            param.metavar = "" if param.is_flag else name
    make_help_option = command.get_help_option

    def help_option(ctx: Context) -> typer.core.TyperOption | None:
        option = make_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    setattr(command, "get_help_option", help_option)  # noqa: B010
