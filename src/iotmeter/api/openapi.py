"""The OpenAPI document, made to say what the API takes: FastAPI's, plus what JSON Schema can
state of the API's own rules (the request guard's and the input models'):
- no string may hold NUL (`pattern` on every free string; `propertyNames` on free objects);
- an object whose keys follow a pattern takes no other keys;
- "any JSON value" is a JSON value without NUL and with 64-bit integers (what every store keeps).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

NO_NUL = "^[^\\u0000]*$"
JSON_VALUE = "JsonValue"
_JSON_VALUE_SCHEMA: dict[str, Any] = {
    "description": "Any JSON value: no NUL in strings or keys, integers within 64 bits.",
    "anyOf": [
        {"type": "null"},
        {"type": "boolean"},
        {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
        {"type": "number"},
        {"type": "string", "pattern": NO_NUL},
        {"type": "array", "items": {"$ref": f"#/components/schemas/{JSON_VALUE}"}},
        {
            "type": "object",
            "propertyNames": {"pattern": NO_NUL},
            "additionalProperties": {"$ref": f"#/components/schemas/{JSON_VALUE}"},
        },
    ],
}


def install_truthful_openapi(app: FastAPI) -> None:
    original: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        _tighten_requests(schema)
        schema.setdefault("components", {}).setdefault("schemas", {})[JSON_VALUE] = (
            _JSON_VALUE_SCHEMA
        )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _tighten_requests(schema: dict[str, Any]) -> None:
    """Only what clients send (parameters, request bodies and the components they use): an
    answer may echo what a client sent, NUL included, in an error message."""
    components: dict[str, Any] = schema.get("components", {}).get("schemas", {})
    used: set[str] = set()
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if not isinstance(operation, dict):
                continue
            for part in (operation.get("parameters", []), operation.get("requestBody", {})):
                _tighten(part)
                _collect_refs(part, components, used)
    for name in used:
        _tighten(components[name])


def _collect_refs(node: Any, components: dict[str, Any], used: set[str]) -> None:
    if isinstance(node, list):
        for item in node:
            _collect_refs(item, components, used)
    elif isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            name = ref.rsplit("/", 1)[1]
            if name in components and name not in used:
                used.add(name)
                _collect_refs(components[name], components, used)
        for value in node.values():
            _collect_refs(value, components, used)


def _is_any_json(node: dict[str, Any]) -> bool:
    """A schema that places no constraint on the value (FastAPI's rendering of `Any`)."""
    return not any(key in node for key in ("type", "anyOf", "oneOf", "allOf", "$ref", "enum"))


def _tighten(node: Any, key: str | None = None) -> None:
    if isinstance(node, list):
        for item in node:
            _tighten(item)
        return
    if not isinstance(node, dict):
        return
    for name, child in list(node.items()):
        if name in ("properties", "patternProperties") and isinstance(child, dict):
            for prop, value in child.items():
                if isinstance(value, dict) and _is_any_json(value):
                    child[prop] = {**value, "$ref": f"#/components/schemas/{JSON_VALUE}"}
                else:
                    _tighten(value, prop)
        elif name not in ("example", "examples", "default"):
            _tighten(child, name)
    kind = node.get("type")
    if kind == "string" and not any(k in node for k in ("pattern", "enum", "format", "const")):
        node["pattern"] = NO_NUL
    if kind == "object":
        if "patternProperties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        if node.get("additionalProperties") is True:
            node["additionalProperties"] = {"$ref": f"#/components/schemas/{JSON_VALUE}"}
            node.setdefault("propertyNames", {})["pattern"] = NO_NUL


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods of every operation whose path template matches `path` (with OPTIONS, and
    HEAD where GET is), for `Allow`."""
    patterns: list[tuple[re.Pattern[str], list[str]]] | None = getattr(
        app.state, "iotmeter_method_patterns", None
    )
    if patterns is None:
        patterns = [
            (_template_pattern(template), sorted(method.upper() for method in operations))
            for template, operations in app.openapi().get("paths", {}).items()
        ]
        app.state.iotmeter_method_patterns = patterns
    methods = {method for pattern, found in patterns if pattern.fullmatch(path) for method in found}
    if not methods:
        return []
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods | {"OPTIONS"})


def _template_pattern(template: str) -> re.Pattern[str]:
    # `{key}` of /raw/{key} spans slashes (a key holds the device id and a name).
    parts = re.split(r"(\{[^}]+\})", template)
    regex = "".join(
        (".+" if part == "{key}" and "/raw/" in template else "[^/]+")
        if part.startswith("{")
        else re.escape(part)
        for part in parts
    )
    return re.compile(regex)
