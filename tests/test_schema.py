"""``mprun schema``: the committed JSON Schema is current, documented, and named by every shipped pipeline."""

from __future__ import annotations

import json

from tests.conftest import PIPELINES, ROOT, run_cli

REGENERATE = ".venv/bin/mprun schema > schemas/pipeline.schema.json"
MODELINE = "# yaml-language-server: $schema=../schemas/pipeline.schema.json"


def test_committed_schema_is_current():
    """``schemas/pipeline.schema.json`` equals ``mprun schema`` output byte for byte (fails when models change)."""
    result = run_cli("schema")
    assert result.returncode == 0, result.stderr
    committed = (ROOT / "schemas" / "pipeline.schema.json").read_text()
    assert result.stdout == committed, f"schemas/pipeline.schema.json is out of date; regenerate it: {REGENERATE}"


def _properties(node, where=""):
    """Every (location, property schema) pair in a JSON Schema."""
    if isinstance(node, dict):
        for name, prop in node.get("properties", {}).items():
            yield f"{where}.{name}", prop
        for key, value in node.items():
            yield from _properties(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _properties(value, f"{where}[{i}]")


def test_schema_is_2020_12_and_every_field_is_described():
    """The schema declares draft 2020-12, and every field and model has a description (editor hover docs)."""
    schema = json.loads(run_cli("schema").stdout)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    undocumented = [where for where, prop in _properties(schema) if not prop.get("description")]
    assert undocumented == []
    assert [name for name, model in schema["$defs"].items() if not model.get("description")] == []
    assert schema["additionalProperties"] is False  # unknown keys are flagged in the editor too


def test_number_fields_accept_env_references():
    """``stop: ${N}`` is valid in the editor as it is for mprun: integer fields also accept a ${VAR} string."""
    schema = json.loads(run_cli("schema").stdout)
    stop = schema["$defs"]["RangeSource"]["properties"]["stop"]
    assert {"$ref": "#/$defs/EnvReference"} in stop["anyOf"]
    assert {"type": "integer"} in stop["anyOf"]


def test_choice_fields_accept_env_references():
    """``log_level: ${LOG_LEVEL:-info}`` is valid in the editor as it is for mprun: enum fields accept ${VAR} too."""
    schema = json.loads(run_cli("schema").stdout)
    for model, field in (("Settings", "log_level"), ("Settings", "start_method"), ("QueueSpec", "type"), ("Pool", "on_error")):
        branches = schema["$defs"][model]["properties"][field]["anyOf"]
        assert {"$ref": "#/$defs/EnvReference"} in branches, (model, field)
        assert any("enum" in b for b in branches), (model, field)


def test_every_shipped_pipeline_starts_with_the_modeline():
    """Each pipelines/*.yaml's first line points editors at the committed schema."""
    files = sorted(PIPELINES.glob("*.yaml"))
    assert files
    assert [p.name for p in files if p.read_text().splitlines()[0] != MODELINE] == []
