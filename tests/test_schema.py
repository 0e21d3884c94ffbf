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
            if key != "if":  # a condition (`if kind is pool`), not a field
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


def test_stages_are_checked_by_kind_in_plain_json_schema():
    """No OpenAPI `discriminator` or `oneOf` (whose errors say only "not valid under any of the given schemas"):
    a stage's `kind` is an enum, and `if kind is X then` the model of X, which refuses unknown keys; `$id` names it."""
    schema = json.loads(run_cli("schema").stdout)
    text = json.dumps(schema)
    assert "discriminator" not in text and "oneOf" not in text
    assert schema["$id"] == "urn:mprun:schema:pipeline:1"
    items = schema["properties"]["stages"]["items"]
    assert items["required"] == ["kind"]
    assert items["properties"]["kind"]["enum"] == ["producer", "consumer", "pool"]
    branches = {b["if"]["properties"]["kind"]["const"]: b["then"]["$ref"] for b in items["allOf"]}
    assert branches == {"producer": "#/$defs/Producer", "consumer": "#/$defs/Consumer", "pool": "#/$defs/Pool"}
    assert all(schema["$defs"][ref.rsplit("/", 1)[1]]["additionalProperties"] is False for ref in branches.values())


def test_schema_output_writes_a_file(tmp_path):
    """`mprun schema --output PATH` writes what `mprun schema` prints, creating folders; an unwritable PATH is exit 2."""
    target = tmp_path / "proj" / "schemas" / "pipeline.schema.json"
    result = run_cli("schema", "--output", str(target))
    assert (result.returncode, result.stdout) == (0, "")
    assert target.read_text() == run_cli("schema").stdout
    (tmp_path / "file").write_text("")
    bad = run_cli("schema", "--output", str(tmp_path / "file" / "x.json"))
    assert bad.returncode == 2
    assert bad.stderr.startswith("mprun: error: cannot write ") and "Traceback" not in bad.stderr


def test_every_shipped_pipeline_starts_with_the_modeline():
    """Each pipelines/*.yaml's first line points editors at the committed schema."""
    files = sorted(PIPELINES.glob("*.yaml"))
    assert files
    assert [p.name for p in files if p.read_text().splitlines()[0] != MODELINE] == []
