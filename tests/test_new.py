"""`mprun new NAME`: the scaffold validates, runs and passes `mprun test` as written; it never overwrites."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli


def test_new_pipeline_validates_runs_and_tests(tmp_path):
    """`mprun new demo` writes pipelines/demo.yaml (modeline, header, tests:) and demo.py; all three commands pass."""
    result = run_cli("new", "demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "wrote pipelines/demo.yaml", "wrote pipelines/demo.py", "wrote schemas/pipeline.schema.json"
    ]
    text = (tmp_path / "pipelines" / "demo.yaml").read_text()
    assert text.splitlines()[0] == "# yaml-language-server: $schema=../schemas/pipeline.schema.json"
    assert (tmp_path / "schemas" / "pipeline.schema.json").read_text() == run_cli("schema").stdout
    assert text.splitlines()[1].startswith("# demo: ")
    assert "function: demo:square" in text and "\ntests:\n" in text
    assert (tmp_path / "pipelines" / "demo.py").read_text().startswith('"""Stage functions of the demo pipeline')

    checked = run_cli("validate", "pipelines/demo.yaml", cwd=tmp_path)
    assert (checked.returncode, checked.stdout) == (0, "ok pipelines/demo.yaml\n"), checked.stderr
    ran = run_cli("pipelines/demo.yaml", "--no-summary", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert sorted(json.loads(ran.stdout)) == [1, 4, 9, 16, 25]
    tested = run_cli("test", "pipelines/demo.yaml", cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert tested.stdout.splitlines() == ["PASS pipelines/demo.yaml::squares three numbers", "1 passed, 0 failed"]


def test_new_with_dir_writes_there_and_runs_from_any_cwd(tmp_path):
    """--dir writes elsewhere; the modeline points from there to ./schemas, and the pipeline runs from any cwd."""
    result = run_cli("new", "etl_job", "--dir", "jobs/nightly", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "jobs" / "nightly"
    assert sorted(p.name for p in folder.iterdir()) == ["etl_job.py", "etl_job.yaml"]
    assert not (tmp_path / "pipelines").exists()
    first = (folder / "etl_job.yaml").read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=../../schemas/pipeline.schema.json"
    assert (tmp_path / "schemas" / "pipeline.schema.json").is_file()
    ran = run_cli(str(folder / "etl_job.yaml"), "--no-summary")
    assert ran.returncode == 0, ran.stderr
    assert sorted(json.loads(ran.stdout)) == [1, 4, 9, 16, 25]


def test_the_modeline_resolves_wherever_the_file_is_written(tmp_path):
    """The modeline points at a schema file that exists: the nearest schemas/pipeline.schema.json above the folder
    (never rewritten), else one written beside the project (the folder itself when it is outside the current one)."""
    root, project, elsewhere = tmp_path / "root", tmp_path / "proj", tmp_path / "elsewhere"
    root.mkdir()
    project.mkdir()
    for name, folder, cwd in (("first", root / "etl", root), ("second", root / "etl" / "deeper", root),
                              ("third", elsewhere, project)):
        result = run_cli("new", name, "--dir", str(folder), cwd=cwd)
        assert result.returncode == 0, result.stderr
        target = (folder / f"{name}.yaml").read_text().splitlines()[0].removeprefix("# yaml-language-server: $schema=")
        assert (folder / target).resolve().is_file(), target
    assert (root / "schemas" / "pipeline.schema.json").is_file()
    assert not (root / "etl" / "schemas").exists()
    assert (elsewhere / "schemas" / "pipeline.schema.json").is_file()
    assert not (project / "schemas").exists()


def test_new_refuses_to_overwrite(tmp_path):
    """An existing NAME.py (or NAME.yaml) is never overwritten: exit 2, a clear message, nothing written."""
    folder = tmp_path / "pipelines"
    folder.mkdir()
    (folder / "demo.py").write_text("# mine\n")
    result = run_cli("new", "demo", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "mprun: error: pipelines/demo.py already exists: not overwriting"
    assert (folder / "demo.py").read_text() == "# mine\n"
    assert not (folder / "demo.yaml").exists()
    assert run_cli("new", "other", cwd=tmp_path).returncode == 0
    again = run_cli("new", "other", cwd=tmp_path)
    assert again.returncode == 2
    assert "pipelines/other.yaml and pipelines/other.py already exist" in again.stderr


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("1st", "invalid name '1st': use letters, digits and _"),
        ("my-pipeline", "invalid name 'my-pipeline'"),
        ("class", "invalid name 'class'"),
        ("json", "json.py would shadow the installed module 'json'"),
        ("yaml", "yaml.py would shadow the installed module 'yaml'"),
    ],
)
def test_new_rejects_bad_names(tmp_path, name, problem):
    """A NAME that is not an identifier, is a keyword, or would shadow an importable module: exit 2, no file."""
    result = run_cli("new", name, cwd=tmp_path)
    assert result.returncode == 2
    assert problem in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "pipelines").exists()


def test_new_quotes_a_name_yaml_would_read_otherwise(tmp_path):
    """`mprun new on` writes `name: 'on'` (YAML would read on as true); the file validates and is named on."""
    assert run_cli("new", "on", cwd=tmp_path).returncode == 0
    assert "\nname: 'on'\n" in (tmp_path / "pipelines" / "on.yaml").read_text()
    graph = run_cli("graph", "pipelines/on.yaml", "--format", "json", cwd=tmp_path)
    assert graph.returncode == 0, graph.stderr
    assert json.loads(graph.stdout)["name"] == "on"
