"""The one canonical JSON text of ForgeFlow: sorted keys, no spaces, UTF-8 kept.

Equal values give equal bytes, so it serves request hashes (idempotent job ids), cache keys, result
sizes and the runner↔worker wire format alike. :func:`storable_problem` says what every store can hold.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Annotated, TypeAlias, TypeVar, overload

from pydantic import GetPydanticSchema, JsonValue
from pydantic_core import core_schema

#: A JSON object as Python holds it (what ``json.loads`` gives for one). Values are pydantic's
#: recursive ``JsonValue``, so mypy checks what goes in and makes readers narrow what comes out;
#: take ``Mapping[str, JsonValue]`` where a function only reads (``dict`` is invariant).
JsonObject: TypeAlias = dict[str, JsonValue]

#: A :data:`JsonObject` field of a pydantic model, validated as a ``dict`` with ``str`` keys whose values
#: pass as they are (as an unparametrized ``dict`` value type always did): pydantic's ``JsonValue`` validation
#: would copy each value (about 600 times slower on a large result) and word its errors differently.
#: What makes the values storable JSON is checked where it matters (:func:`storable`).
JsonObjectField = Annotated[
    JsonObject,
    GetPydanticSchema(
        lambda _source, _handler: core_schema.dict_schema(core_schema.str_schema(), core_schema.any_schema())
    ),
]
#: A JSON array parameter or field, validated (and described in JSON Schema) as a plain ``list`` is:
#: its items pass as they are, as :data:`JsonObjectField`'s values do.
JsonArrayField = Annotated[
    list[JsonValue],
    GetPydanticSchema(lambda _source, _handler: core_schema.list_schema(core_schema.any_schema())),
]

_T = TypeVar("_T")


def canonical_json(value: object, *, default: Callable[[object], object] | None = None) -> str:
    """``value`` as canonical JSON text; ``default`` converts what JSON cannot hold (as in :func:`json.dumps`)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=default)


def canonical_bytes(value: object) -> bytes:
    """:func:`canonical_json` encoded as UTF-8."""
    return canonical_json(value).encode()


#: Largest count a store keeps in a 32-bit column (a seq, an attempt, a number of stages or calls).
MAX_COUNT = 2**31 - 1
#: Largest size or duration a store keeps (2^53 - 1: exact in every JSON client, and in a 64-bit column).
MAX_AMOUNT = 2**53 - 1
#: The most stages any pipeline may have, whatever a host allows (``FORGEFLOW_MAX_STAGES``, 32 by
#: default, is at most this): stage indexes are below it in every message and store.
MAX_STAGES = 10_000
#: How deeply a stored JSON value may nest (``[]`` and ``{}`` count one level): deeper ones could not
#: be sent back (JSON encoders stop near 255 levels).
MAX_JSON_DEPTH = 100


def storable_problem(value: object, *, max_depth: int = MAX_JSON_DEPTH, allow_nul: bool = False) -> str | None:
    """Why ``value`` cannot be stored and sent back as JSON by every store ForgeFlow supports, or None:
    nested deeper than ``max_depth``, a number that is not finite (JSON has no NaN or Infinity), or
    (unless ``allow_nul``) U+0000 in a string or key (PostgreSQL refuses it in text and JSON). The
    reason names where the value is when it is inside ``value`` (``config.confidence: ...``)."""
    found = storable_issue(value, max_depth=max_depth, allow_nul=allow_nul)
    if found is None:
        return None
    path, problem = found
    return f"{path}: {problem}" if path else problem


def storable_issue(
    value: object, *, max_depth: int = MAX_JSON_DEPTH, allow_nul: bool = False
) -> tuple[str, str] | None:
    """:func:`storable_problem` as ``(path, problem)``: the dotted path inside ``value`` (``""`` for
    ``value`` itself, ``config.confidence``, ``stages.0.config``) and the reason."""
    stack: list[tuple[object, int, str]] = [(value, 0, "")]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, str):
            if not allow_nul and "\x00" in item:
                return path, "text must not contain U+0000 (NUL)"
            continue
        if isinstance(item, float) and not math.isfinite(item):
            return path, "numbers must be finite (JSON has no NaN or Infinity)"
        if isinstance(item, dict):
            children: list[tuple[object, str]] = [(key, path) for key in item]
            children += [(child, _joined(path, key)) for key, child in item.items()]
        elif isinstance(item, (list, tuple)):
            children = [(child, _joined(path, index)) for index, child in enumerate(item)]
        else:
            continue
        if depth >= max_depth:
            return "", f"nested deeper than {max_depth} levels"  # the path would be as deep
        stack.extend((child, depth + 1, where) for child, where in reversed(children))
    return None


def _joined(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def storable(value: _T, *, allow_nul: bool = False) -> _T:
    """``value`` when :func:`storable_problem` finds nothing, else a ``ValueError`` saying why (a pydantic validator)."""
    problem = storable_problem(value, allow_nul=allow_nul)
    if problem is not None:
        raise ValueError(problem)
    return value


def whole_if_integral(value: float) -> int | float:
    """``64.0`` as ``64`` (counts such as frames done read as integers in JSON), other numbers as they are."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


@overload
def without_nul(value: JsonObject) -> JsonObject: ...
@overload
def without_nul(value: JsonValue) -> JsonValue: ...
def without_nul(value: JsonValue) -> JsonValue:
    """``value`` with each U+0000 in its strings and keys replaced by U+FFFD (what a PostgreSQL store keeps)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        # (a key that is not text, in a dict made in Python, stays as it is)
        return {(k.replace("\x00", "\ufffd") if isinstance(k, str) else k): without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_nul(v) for v in value]
    return value
