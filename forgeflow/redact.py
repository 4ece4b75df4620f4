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
    one, so they stay a tuple), and the exception text.

    The exception text is formatted and redacted when a handler first reads it (a plain record
    becomes a :class:`_RedactedRecord`), not here: a record that a filter drops costs no traceback.
    Prefect's server, say, drops uvicorn's record of every retryable "database is locked", which a
    burst of jobs makes dozens of; formatted at once, they were ~9 % of that server's CPU."""
    if isinstance(record.msg, str):
        record.msg = redact(record.msg)
    if isinstance(record.args, tuple):
        record.args = tuple(_redact_value(a) for a in record.args)
    elif isinstance(record.args, dict):
        record.args = {k: _redact_value(v) for k, v in record.args.items()}
    if record.exc_info and not record.exc_text:
        if type(record) is logging.LogRecord:
            record.__class__ = _RedactedRecord
        else:  # a record class of someone else's: formatted now, as the formatter would
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    return record


class _RedactedRecord(logging.LogRecord):
    """A log record whose exception text is formatted, and redacted, when first read:
    ``logging.Formatter.format`` reads ``exc_text`` and formats ``exc_info`` itself only when it is
    empty, so every handler gets the redacted text."""

    @property
    def exc_text(self) -> str | None:
        text: str | None = self.__dict__.get("_exc_text")
        if text is None and self.exc_info:
            text = self.__dict__["_exc_text"] = redact(logging.Formatter().formatException(self.exc_info))
        return text

    @exc_text.setter
    def exc_text(self, value: str | None) -> None:
        self.__dict__["_exc_text"] = value


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
