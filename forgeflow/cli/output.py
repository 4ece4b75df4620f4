"""Where the ``forgeflow`` command writes: messages and progress on stderr, results on stdout."""

from __future__ import annotations

import sys

from rich.console import Console

#: Messages, warnings, errors and progress bars.
console = Console(stderr=True, soft_wrap=True)
out = Console()
#: Largest JSON document coloured on a terminal: highlighting is slow on big ones (a 50 MB result).
HIGHLIGHT_MAX_CHARS = 256 * 1024


def print_json(text: str) -> None:
    """JSON on stdout: coloured on a terminal when small, else as is (a pipe or file gets plain JSON)."""
    if out.is_terminal and len(text) <= HIGHLIGHT_MAX_CHARS:
        out.print_json(text)
    else:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
