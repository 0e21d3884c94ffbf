"""The JSON Schema (draft 2020-12) of the pipeline format, generated from the Pydantic models.

Editors use it through the modeline every shipped pipeline starts with
(``# yaml-language-server: $schema=../schemas/pipeline.schema.json``): completion, and each field's
description as hover documentation.  ``schemas/pipeline.schema.json`` is this module's output; a test
fails when it drifts (regenerate: ``.venv/bin/mprun schema > schemas/pipeline.schema.json``).
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


def schema() -> dict[str, Any]:
    """The schema as a dict."""
    doc = _allow_env(Pipeline.model_json_schema())
    doc["$defs"]["EnvReference"] = ENV_REFERENCE
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "mprun pipeline", **doc}


def schema_json() -> str:
    """The schema as the text committed in ``schemas/pipeline.schema.json``."""
    return json.dumps(schema(), indent=2) + "\n"
