"""``forgeflow tokens``: named API tokens with scopes, kept in the tokens file as SHA-256 hashes.

``add`` makes a new random token, appends ``{name, scopes, sha256}`` to the file
(``FORGEFLOW_API_TOKENS_FILE`` or ``--file``; written whole to a new file and renamed over the old one,
mode 0600) and prints the token once: nothing else keeps it. The running API reads the file again
when it changes, so ``add`` and ``revoke`` take effect without a restart. ``hash`` prints the hash of a
token read from standard input (never from the command line, which shells and ``ps`` keep).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import tempfile
from pathlib import Path
from typing import TypedDict

import typer

from forgeflow.cli.output import console
from forgeflow.exit_codes import ExitCode

tokens_app = typer.Typer(help="Named API tokens with scopes (read, run, admin), hashed at rest.", no_args_is_help=True)

FILE_OPTION = typer.Option(None, "--file", help="The tokens file (default: FORGEFLOW_API_TOKENS_FILE).")


def _tokens_file(path: Path | None) -> Path:
    if path is not None:
        return path
    from forgeflow.settings import get_settings

    configured = get_settings().api_tokens_file
    if configured is None:
        console.print("[red]give --file or set FORGEFLOW_API_TOKENS_FILE[/red]")
        raise typer.Exit(ExitCode.INVALID)
    return configured


class TokenEntry(TypedDict):
    """One entry of a tokens file: the token's name, its scopes and its hash."""

    name: str
    scopes: list[str]
    sha256: str


def _read_entries(path: Path) -> list[TokenEntry]:
    """The file's entries, checked as the API checks them (an empty list for a file not made yet)."""
    from forgeflow.api.auth import parse_token_file

    if not path.exists():
        return []
    if path.suffix.lower() == ".toml":
        console.print(f"[red]{path}: `forgeflow tokens` writes JSON files; add the entry to the TOML by hand[/red]")
        raise typer.Exit(ExitCode.INVALID)
    try:
        entries = parse_token_file(path)
    except (OSError, ValueError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(ExitCode.INVALID) from None
    return [{"name": e.name, "scopes": sorted(e.scopes), "sha256": e.sha256} for e in entries]


def _write_entries(path: Path, entries: list[TokenEntry]) -> None:
    """Replace the file at once (the API never reads half of it), readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump({"tokens": entries}, out, indent=2)
            out.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@tokens_app.command("add")
def add(
    name: str = typer.Argument(
        ..., help="The token's name, recorded with what it does (1-64 letters, digits, . _ @ -)."
    ),
    scopes: str = typer.Option("read", "--scopes", help="Comma-separated: read, run, admin."),
    file: Path | None = FILE_OPTION,
) -> None:
    """Make a token: its hash goes into the file, the token is printed once (keep it; it is not stored)."""
    from forgeflow.api.auth import hash_token, parse_scopes

    path = _tokens_file(file)
    try:
        wanted = parse_scopes([s for s in scopes.split(",") if s.strip()], "--scopes")
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(ExitCode.INVALID) from None
    if not wanted:
        console.print("[red]--scopes needs at least one of read, run, admin[/red]")
        raise typer.Exit(ExitCode.INVALID)
    entries = _read_entries(path)
    if any(e["name"] == name for e in entries):
        console.print(f"[red]{path} already has a token named {name!r}: `forgeflow tokens revoke {name}` first[/red]")
        raise typer.Exit(ExitCode.INVALID)
    token = "ff_" + secrets.token_urlsafe(32)
    entries.append({"name": name, "scopes": sorted(wanted), "sha256": hash_token(token)})
    _write_entries(path, entries)
    _read_entries(path)  # what the API will read: a name it refuses fails here, not there
    console.print(f"added {name!r} ({', '.join(sorted(wanted))}) to {path}; the token (shown once):")
    sys.stdout.write(token + "\n")


@tokens_app.command("revoke")
def revoke(name: str = typer.Argument(..., help="The token's name."), file: Path | None = FILE_OPTION) -> None:
    """Remove a token from the file: the API refuses it from its next call on."""
    path = _tokens_file(file)
    entries = _read_entries(path)
    kept = [e for e in entries if e["name"] != name]
    if len(kept) == len(entries):
        console.print(f"[red]{path} has no token named {name!r}[/red]")
        raise typer.Exit(ExitCode.INVALID)
    _write_entries(path, kept)
    console.print(f"revoked {name!r}")


@tokens_app.command("list")
def list_tokens(file: Path | None = FILE_OPTION) -> None:
    """The names and scopes in the file (the tokens themselves are not kept anywhere)."""
    for entry in _read_entries(_tokens_file(file)):
        sys.stdout.write(f"{entry['name']}\t{','.join(entry['scopes'])}\n")


@tokens_app.command("hash")
def hash_command() -> None:
    """The SHA-256 of a token read from standard input: the `sha256` of a tokens file entry."""
    from forgeflow.api.auth import hash_token

    token = sys.stdin.readline().strip() if not sys.stdin.isatty() else typer.prompt("token", hide_input=True)
    if not token:
        console.print("[red]no token on standard input[/red]")
        raise typer.Exit(ExitCode.INVALID)
    sys.stdout.write(hash_token(token) + "\n")
