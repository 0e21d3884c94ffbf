"""``--set PATH=VALUE`` and ``${VAR}`` interpolation, through the real ``mprun`` entry point."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

PIPELINE = """\
settings: {start_method: fork}
stages:
  - name: numbers
    kind: producer
    source: {range: {stop: "${MPRUN_T_N:-3}"}}
    output: q
  - name: sink
    kind: consumer
    input: q
    function: collect
    kwargs: {}
"""


def collected(result) -> list:
    """The one JSON array the ``collect`` sink printed."""
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_set_changes_values_by_stage_name(tmp_pipeline):
    """``--set`` with a stage name replaces that stage's value; VALUE is YAML (a list here)."""
    path = tmp_pipeline(PIPELINE)
    result = run_cli(str(path), "--no-summary", "--set", "stages.numbers.source={items: [7, 8]}",
                     "--set", "stages.sink.processes=2", "--set", "queues.q.maxsize=1", "--set", "settings.log_level=error")
    assert result.returncode == 0, result.stderr
    assert sorted(collected(result)) == [7, 8]
    assert result.stderr == ""  # log_level=error: no lifecycle records


def test_number_field_from_environment_and_default(tmp_pipeline):
    """``stop: ${N}`` becomes a number (3 from the default, 5 from the environment)."""
    path = tmp_pipeline(PIPELINE)
    assert collected(run_cli(str(path), "--no-summary")) == [0, 1, 2]
    assert collected(run_cli(str(path), "--no-summary", env={"MPRUN_T_N": "5"})) == [0, 1, 2, 3, 4]


def test_a_whole_reference_takes_the_yaml_type_of_its_value(tmp_pipeline):
    """A value that is exactly one ``${VAR}`` is typed as YAML (int, float, bool, null), in kwargs and items too;
    text around a reference keeps a string, as does a string field (``name``) and a ``yes`` that is no ``true``."""
    text = PIPELINE.replace('source: {range: {stop: "${MPRUN_T_N:-3}"}}',
                            'source: {items: ["${MPRUN_T_N:-500}", "x-${MPRUN_T_N:-500}", "${MPRUN_T_F}", '
                            '"${MPRUN_T_B}", "${MPRUN_T_EMPTY:-}", "${MPRUN_T_YES}"]}')
    text = "name: ${MPRUN_T_NAME}\n" + text.replace("function: collect\n    kwargs: {}",
                                                      "function: tasks_t:typed\n    kwargs: {n: '${MPRUN_T_N:-500}'}")
    text += "    output: out\n  - {name: result, kind: consumer, input: out, function: collect}\n"
    tasks = "def typed(item, n):\n    return [item, type(item).__name__, n, type(n).__name__]\n"
    env = {"MPRUN_T_F": "0.5", "MPRUN_T_B": "true", "MPRUN_T_YES": "yes", "MPRUN_T_NAME": "2024"}
    result = run_cli(str(tmp_pipeline(text, tasks)), "--no-summary", env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(collected(result), key=str) == sorted([
        [500, "int", 500, "int"], ["x-500", "str", 500, "int"], [0.5, "float", 500, "int"],
        [True, "bool", 500, "int"], [None, "NoneType", 500, "int"], ["yes", "str", 500, "int"],
    ], key=str)


def test_escape_and_comment_are_not_interpolated(tmp_pipeline):
    """``$${X}`` stays a literal ``${X}``; a ``${VAR}`` in a comment is never looked at."""
    path = tmp_pipeline(PIPELINE.replace("    output: q\n", "    output: q  # ${MPRUN_T_NEVER_SET}\n", 1)
                        .replace('source: {range: {stop: "${MPRUN_T_N:-3}"}}', 'source: {items: ["$${HOME}", "${MPRUN_T_V}"]}'))
    result = run_cli(str(path), "--no-summary", env={"MPRUN_T_V": "v"})
    assert result.returncode == 0, result.stderr
    assert sorted(collected(result)) == ["${HOME}", "v"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages.nope.processes=2", "--set stages.nope.processes=2: error: no stage named 'nope'; stages: numbers, sink"),
        ("stages.sinc.processes=2", "--set stages.sinc.processes=2: error: no stage named 'sinc'; did you mean 'sink'?"),
        ("processes", "--set processes: error: expected PATH=VALUE, e.g. stages.doubler.processes=2"),
        ("stages.5.processes=1", "--set stages.5.processes=1: error: index 5 is out of range: stages has 2 items"),
        ("settings.log_file.x=1", "--set settings.log_file.x=1: error: settings.log_file: Input should be a valid string"),
        ("stages.sink.kind.x=1", "--set stages.sink.kind.x=1: error: stages.sink.kind is a str, not a mapping, so it has no 'x'"),
        ("stages.sink.processes=0",
         "--set stages.sink.processes=0: error: stages[1].processes: Input should be greater than or equal to 1, got 0"),
        ("stages.sink.procesess=2",
         "--set stages.sink.procesess=2: error: stages[1].procesess: unknown key 'procesess'; did you mean 'processes'?"),
        ("settings.log_level=loud", ("--set settings.log_level=loud: error: settings.log_level: Input should be "
         "'debug', 'info', 'warning' or 'error', got 'loud'")),
    ],
)
def test_bad_override_is_located_at_the_argument(tmp_pipeline, override, message):
    """A bad PATH or an invalid VALUE is one line located at the ``--set`` argument, exit 2, for run and validate."""
    path = tmp_pipeline(PIPELINE)
    run = run_cli(str(path), "--set", override)
    assert (run.returncode, run.stderr.strip()) == (2, message)
    check = run_cli("validate", str(path), "--set", override)
    assert (check.returncode, check.stdout.strip()) == (2, message)


def test_unset_variable_is_named_with_its_line(tmp_pipeline):
    """An unset ``${VAR}`` (also inside ``--set`` VALUE) names the variable, at its line or argument."""
    path = tmp_pipeline(PIPELINE.replace("kwargs: {}", "kwargs: {tag: '${MPRUN_T_UNSET}'}"))
    result = run_cli("validate", str(path), "--set", "stages.numbers.source.range.stop=${MPRUN_T_ALSO:?give a count}")
    assert result.returncode == 2
    assert result.stdout.splitlines() == [
        ("--set stages.numbers.source.range.stop=${MPRUN_T_ALSO:?give a count}: error: stages[0].source.range.stop: "
        "environment variable 'MPRUN_T_ALSO' is not set: give a count"),
        (f"{path}:11:19: error: stages[1].kwargs.tag: environment variable 'MPRUN_T_UNSET' is not set "
        "(set it, or write ${MPRUN_T_UNSET:-default})"),
    ]


def test_validate_with_set_checks_the_file_as_it_would_run(tmp_pipeline):
    """``mprun validate --set`` checks the file as it would run: a fix given by --set makes it valid."""
    path = tmp_pipeline(PIPELINE.replace("processes", "processes").replace("kwargs: {}", "processes: 0"))
    assert run_cli("validate", str(path)).returncode == 2
    fixed = run_cli("validate", str(path), "--set", "stages.sink.processes=1")
    assert (fixed.returncode, fixed.stdout) == (0, f"ok {path}\n")
