"""Type compatibility between a stage's output field and a later stage's input field.

Both sides are JSON Schemas generated from the tools' pydantic models, so plugins from different
packages can be checked without importing each other's classes. The check is structural: an
input accepts an output when every value the output schema allows is one the input schema
allows, as far as JSON Schema's common keywords tell (types, arrays, objects, enums, unions).
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]
_MAX_DEPTH = 24


def _resolve(schema: Schema, defs: dict[str, Schema]) -> Schema:
    seen = 0
    while True:
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            extra = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**defs.get(name, {}), **extra}
        elif "allOf" in schema and len(schema["allOf"]) == 1:
            extra = {k: v for k, v in schema.items() if k != "allOf"}
            schema = {**schema["allOf"][0], **extra}
        else:
            return schema
        seen += 1
        if seen > _MAX_DEPTH:
            return {}


def _describe(schema: Schema) -> str:
    if "anyOf" in schema:
        return " | ".join(_describe(s) for s in schema["anyOf"])
    if "enum" in schema:
        return "one of " + ", ".join(repr(v) for v in schema["enum"])
    if "const" in schema:
        return repr(schema["const"])
    kind = schema.get("type")
    if kind == "array" and isinstance(schema.get("items"), dict):
        return f"array of {_describe(schema['items'])}"
    if kind == "object" and schema.get("title"):
        return f"object {schema['title']}"
    return str(kind or "any")


def incompatibility(
    src: Schema,
    dst: Schema,
    src_defs: dict[str, Schema] | None = None,
    dst_defs: dict[str, Schema] | None = None,
    _depth: int = 0,
) -> str | None:
    """Why values of ``src`` may not fit ``dst`` — or None when they fit."""
    src_defs = src_defs or {}
    dst_defs = dst_defs or {}
    if _depth > _MAX_DEPTH:
        return None
    src = _resolve(src, src_defs)
    dst = _resolve(dst, dst_defs)

    def recurse(s: Schema, d: Schema) -> str | None:
        return incompatibility(s, d, src_defs, dst_defs, _depth + 1)

    if not _constrains(dst):
        return None
    if "anyOf" in src or "oneOf" in src:
        for branch in src.get("anyOf", src.get("oneOf")) or []:
            reason = recurse(branch, dst)
            if reason:
                return reason
        return None
    if "anyOf" in dst or "oneOf" in dst:
        branches = dst.get("anyOf", dst.get("oneOf")) or []
        if any(recurse(src, branch) is None for branch in branches):
            return None
        return f"{_describe(src)} is not {_describe(dst)}"
    if not _constrains(src):
        return None  # an untyped output: checked by the input model at run time
    if "enum" in dst or "const" in dst:
        allowed = dst.get("enum", [dst.get("const")])
        offered = src.get("enum", [src["const"]] if "const" in src else None)
        if offered is None or any(v not in allowed for v in offered):
            return f"{_describe(src)} is not {_describe(dst)}"
        return None
    src_type, dst_type = src.get("type"), dst.get("type")
    if dst_type is None:
        return None
    if src_type is None:
        return None
    src_types = set(src_type) if isinstance(src_type, list) else {src_type}
    dst_types = set(dst_type) if isinstance(dst_type, list) else {dst_type}
    if "number" in dst_types:
        dst_types.add("integer")
    if not src_types <= dst_types:
        return f"{_describe(src)} is not {_describe(dst)}"
    if "array" in src_types and isinstance(dst.get("items"), dict):
        reason = recurse(src.get("items", {}), dst["items"])
        if reason:
            return f"array items: {reason}"
    if "object" in src_types and dst.get("properties"):
        src_props = src.get("properties")
        if src_props is None:
            return None  # a free-form object: checked at run time
        for name in dst.get("required", []):
            if name not in src_props:
                return f"{_describe(src)} lacks field {name!r} that {_describe(dst)} requires"
        for name, prop in dst["properties"].items():
            if name in src_props:
                reason = recurse(src_props[name], prop)
                if reason:
                    return f"field {name!r}: {reason}"
    return None


def _constrains(schema: Schema) -> bool:
    return any(k in schema for k in ("type", "anyOf", "oneOf", "enum", "const", "properties", "items"))


def field_schema(model_schema: Schema, name: str) -> tuple[Schema, dict[str, Schema]]:
    """The schema of one property of a model's JSON Schema, with the model's ``$defs``."""
    return model_schema.get("properties", {}).get(name, {}), model_schema.get("$defs", {})
