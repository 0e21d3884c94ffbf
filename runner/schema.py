"""The JSON Schema (draft 2020-12) of the pipeline format, generated from the Pydantic models.

Editors use it through the modeline every shipped pipeline starts with
(``# yaml-language-server: $schema=../schemas/pipeline.schema.json``): completion, and each field's
description as hover documentation.  It is plain JSON Schema: a stage is checked against its ``kind``
with ``if``/``then`` (no OpenAPI ``discriminator``), so an editor names the wrong key.
``schemas/pipeline.schema.json`` is this module's output; a test fails when it drifts
(regenerate: ``.venv/bin/mprun schema > schemas/pipeline.schema.json``).
"""

from __future__ import annotations

import json
from typing import Any

from schemas import Pipeline

# `${VAR}` is replaced before validation, so `stop: ${N}` is valid: number, boolean and choice fields accept it.
ENV_REFERENCE = {
    "type": "string",
    "pattern": r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:[-?].*)?\}$",
    "description": "An environment variable, replaced before validation: ${VAR}, ${VAR:-default} or ${VAR:?message}.",
}
_SCALARS = ("integer", "number", "boolean")
SCHEMA_ID = "urn:mprun:schema:pipeline:1"  # names the format (version 1); editors find the file through the modeline


def _allow_env(node: Any) -> Any:
    """Let every integer, number, boolean or choice (enum) property also be written as a ``${VAR}`` reference."""
    if isinstance(node, list):
        return [_allow_env(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _allow_env(value) for key, value in node.items()}
    for name, prop in node.get("properties", {}).items():
        if prop.get("type") in _SCALARS or "enum" in prop:
            keep = {k: prop[k] for k in ("title", "description", "default") if k in prop}
            typed = {k: v for k, v in prop.items() if k not in keep}
            node["properties"][name] = {**keep, "anyOf": [typed, {"$ref": "#/$defs/EnvReference"}]}
        elif any(b.get("type") in _SCALARS or "enum" in b for b in prop.get("anyOf", [])):
            prop["anyOf"] = [*prop["anyOf"], {"$ref": "#/$defs/EnvReference"}]
    return node


def _by_kind(node: Any) -> Any:
    """Replace Pydantic's ``discriminator`` + ``oneOf`` (OpenAPI) with plain JSON Schema: ``if kind is X then X``.

    With ``oneOf``, one wrong key in a stage makes every branch fail and editors say only "not valid under
    any of the given schemas"; with ``if``/``then``, the stage is checked against its own kind, so the
    message names the problem ("Property procesess is not allowed").
    """
    if isinstance(node, list):
        return [_by_kind(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _by_kind(value) for key, value in node.items()}
    found = node.pop("discriminator", None)
    if found is None:
        return node
    order = [branch["$ref"] for branch in node.pop("oneOf", [])]
    key = found["propertyName"]
    mapping = sorted(
        found["mapping"].items(), key=lambda item: order.index(item[1]) if item[1] in order else len(order)
    )
    values = [value for value, _ in mapping]
    return {
        **node,
        "type": "object",
        "required": [key],
        "properties": {key: {"enum": values, "description": f"What the stage is: {', '.join(values)}."}},
        "allOf": [
            {"if": {"properties": {key: {"const": value}}, "required": [key]}, "then": {"$ref": ref}}
            for value, ref in mapping
        ],
    }


def schema() -> dict[str, Any]:
    """The schema as a dict."""
    doc = _by_kind(_allow_env(Pipeline.model_json_schema()))
    doc["$defs"]["EnvReference"] = ENV_REFERENCE
    draft = "https://json-schema.org/draft/2020-12/schema"
    return {"$schema": draft, "$id": SCHEMA_ID, "title": "mprun pipeline", **doc}


def schema_json() -> str:
    """The schema as the text committed in ``schemas/pipeline.schema.json``."""
    return json.dumps(schema(), indent=2) + "\n"


def write_schema(path: str | None) -> None:
    """Print the schema, or write it to ``path`` (its folders created).

    Raises:
        UsageError: ``path`` cannot be written.
    """
    import sys
    from pathlib import Path

    from runner.errors import UsageError

    text = schema_json()
    if path is None:
        sys.stdout.write(text)
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    except OSError as e:
        msg = f"cannot write {path}: {e.strerror or e}"
        raise UsageError(msg) from None
