"""The JSON Schema (draft 2020-12) of the pipeline format, generated from the Pydantic models."""

from __future__ import annotations

import json
from typing import Any

from schemas import Pipeline


def schema() -> dict[str, Any]:
    """The schema as a dict."""
    doc = Pipeline.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "mprun pipeline", **doc}


def schema_json() -> str:
    """The schema as the text committed in ``schemas/pipeline.schema.json``."""
    return json.dumps(schema(), indent=2) + "\n"
