"""Credentials never reach a log: every record of the process is redacted as it is made.

Logs are shipped, rotated and read by more people than a token should reach. :func:`redact` replaces
the credential-shaped parts of a text with ``[redacted]``: the values of query parameters such as
``token``, ``access_token``, ``api_key``, ``ticket`` or ``password``; ``Authorization`` header values
(``Bearer …``, ``Basic …``); and ForgeFlow's WebSocket bearer subprotocol. :func:`install_log_redaction`
applies it to every log record this process makes (message, arguments, exception text), whichever
logger or handler (uvicorn's access log, Prefect's, ForgeFlow's) writes it. Every long-lived ForgeFlow
process (API, engine, Prefect workers, the CLI) installs it at start-up.
"""

from __future__ import annotations

import logging
import re
import threading

REDACTED = "[redacted]"

_SECRET_PARAMS = (
    r"token|access_token|id_token|refresh_token|api[_-]?key|apikey|key|ticket|password|passwd|pwd|"
    r"secret|client_secret|auth|authorization|signature|sig|session|credential|credentials"
)
_QUERY = re.compile(rf"(?i)([?&;](?:{_SECRET_PARAMS})=)[^&;#\s\"'<>]+")
_AUTH_VALUE = re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=:-]{4,}")
_SUBPROTOCOL = re.compile(r"(forgeflow\.bearer\.)[A-Za-z0-9_-]+")


def redact(text: str) -> str:
    """``text`` with credential-shaped query values, ``Authorization`` values and bearer subprotocols
    replaced by ``[redacted]``."""
    if not text:
        return text
    text = _QUERY.sub(rf"\g<1>{REDACTED}", text)
    text = _AUTH_VALUE.sub(rf"\g<1>\g<2>{REDACTED}", text)
    return _SUBPROTOCOL.sub(rf"\g<1>{REDACTED}", text)


def _redact_value(value: object) -> object:
    return redact(value) if isinstance(value, str) else value


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Redact a record in place: message, each argument (uvicorn's access formatter reads them one by
    one, so they stay a tuple), and the exception text (formatted now, as the formatter would)."""
    if isinstance(record.msg, str):
        record.msg = redact(record.msg)
    if isinstance(record.args, tuple):
        record.args = tuple(_redact_value(a) for a in record.args)
    elif isinstance(record.args, dict):
        record.args = {k: _redact_value(v) for k, v in record.args.items()}
    if record.exc_info and not record.exc_text:
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    return record


_installed = False
_lock = threading.Lock()


def install_log_redaction() -> None:
    """Redact every log record this process makes from now on (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        make = logging.getLogRecordFactory()

        def factory(*args: object, **kwargs: object) -> logging.LogRecord:
            return redact_record(make(*args, **kwargs))

        logging.setLogRecordFactory(factory)
        _installed = True
