"""`mprun test`: `tests:` cases replace sources, check the items through queues, and report each case."""

from __future__ import annotations

import json
import re

import yaml

from tests.conftest import PIPELINES, run_cli

HEAD = """\
version: 1
settings: {start_method: fork}
stages:
  - name: numbers
    kind: producer
    source: {items: [1, 2, 3]}
    output: numbers
  - name: double
    kind: consumer
    input: numbers
    function: tasks_t:double
    output: doubled
  - name: results
    kind: consumer
    input: doubled
    function: collect
"""
TASKS = """\
import sys


def double(n):
    print(f"noise {n}")
    if n == 13:
        raise ValueError("unlucky 13")
    return n * 2


def pair(n):
    return (n, [n])
"""


def test_shipped_pipelines_pass():
    """Every shipped pipeline carries at least one case, and `mprun test pipelines/*.yaml` passes them all."""
    files = sorted(PIPELINES.glob("*.yaml"))
    cases = [len(yaml.safe_load(f.read_text()).get("tests", [])) for f in files]
    assert all(n >= 1 for n in cases), dict(zip([f.name for f in files], cases, strict=True))
    result = run_cli("test", *[f"pipelines/{f.name}" for f in files])
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == f"{sum(cases)} passed, 0 failed"
    assert len([line for line in lines if line.startswith("PASS pipelines/")]) == sum(cases)


def test_a_case_matches_as_a_multiset_and_a_wrong_one_names_the_difference(tmp_pipeline):
    """A case passes when the multiset matches in any order; a wrong one fails naming missing and unexpected items."""
    path = tmp_pipeline(
        HEAD
        + """\
tests:
  - name: any order
    expect: {doubled: [6, 2, 4]}
  - name: replaced source
    sources: {numbers: {range: {start: 10, stop: 12}}}
    expect: {doubled: [20, 22], numbers: [11, 10]}
  - name: wrong
    sources: {numbers: {items: [1, 2, 2]}}
    expect: {doubled: [2, 4, 8]}
""",
        TASKS,
    )
    result = run_cli("test", str(path))
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:4] == [
        f"PASS {path}::any order",
        f"PASS {path}::replaced source",
        f"FAIL {path}::wrong",
        "    queue 'doubled': missing 1 item(s): 8",
    ]
    assert lines[4] == "    queue 'doubled': unexpected 1 item(s): 4"
    assert lines[-1] == "2 passed, 1 failed"


def test_output_of_stages_is_captured(tmp_pipeline):
    """What stages print stays out of the report of a passing case and is shown under a failing one."""
    path = tmp_pipeline(
        HEAD + "tests:\n  - {name: ok, expect: {doubled: [2, 4, 6]}}\n  - {name: bad, expect: {doubled: [2]}}\n", TASKS
    )
    result = run_cli("test", str(path))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0] == f"PASS {path}::ok"
    assert lines[1] == f"FAIL {path}::bad"
    assert lines[2] == "    queue 'doubled': unexpected 2 item(s): 4, 6"
    assert lines[3] == "    output of the run:"
    shown = lines[4:-1]
    assert sorted(line for line in shown if "noise" in line) == ["      | noise 1", "      | noise 2", "      | noise 3"]
    assert all(line.startswith("      | ") for line in shown)
    assert result.stderr == ""


def test_ordered_case_reports_the_first_difference_or_the_missing_tail(tmp_pipeline):
    """`ordered: true` compares position by position: the first difference, or what is missing at the end."""
    path = tmp_pipeline(
        HEAD
        + """\
tests:
  - name: in order
    ordered: true
    expect: {doubled: [2, 4, 6]}
  - name: swapped
    ordered: true
    expect: {doubled: [2, 6, 4]}
  - name: too few
    ordered: true
    expect: {doubled: [2, 4, 6, 8]}
  - name: too many
    ordered: true
    expect: {doubled: [2, 4]}
""",
        TASKS,
    )
    result = run_cli("test", str(path))
    assert result.returncode == 1
    report = [line for line in result.stdout.splitlines() if not line.startswith(("      | ", "    output of the run"))]
    assert report == [
        f"PASS {path}::in order",
        f"FAIL {path}::swapped",
        "    queue 'doubled': first difference at position 1: expected 6, got 4",
        f"FAIL {path}::too few",
        "    queue 'doubled': 3 items, expected 4; missing at the end: 8",
        f"FAIL {path}::too many",
        "    queue 'doubled': 3 items, expected 2; unexpected at the end: 6",
        "1 passed, 3 failed",
    ]


def test_a_failing_run_is_a_failed_case(tmp_pipeline):
    """A case whose run fails (exit 1) is reported as failed with the run's error; the next case still runs."""
    path = tmp_pipeline(
        HEAD
        + """\
tests:
  - name: thirteen
    sources: {numbers: {items: [12, 13]}}
    expect: {doubled: [24, 26]}
  - name: fine
    expect: {doubled: [2, 4, 6]}
""",
        TASKS,
    )
    result = run_cli("test", str(path))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0] == f"FAIL {path}::thirteen"
    assert lines[1] == (
        "    the run failed (exit 1): stage 'double' (process double) failed on item 13: ValueError: unlucky 13"
    )
    assert f"PASS {path}::fine" in lines
    assert lines[-1] == "1 passed, 1 failed"


def test_items_compare_as_their_yaml(tmp_pipeline):
    """A tuple result equals the YAML list written for it (items compare as JSON values)."""
    text = HEAD.replace("tasks_t:double", "tasks_t:pair") + "tests:\n  - {name: pairs, expect: {doubled: [[1, [1]], [2, [2]], [3, [3]]]}}\n"
    result = run_cli("test", str(tmp_pipeline(text, TASKS)))
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines()[-1] == "1 passed, 0 failed"


def test_bad_references_in_cases_are_located_errors(tmp_pipeline):
    """An unknown stage, a non-producer in sources, or a queue no stage writes: located errors, exit 2, nothing runs."""
    path = tmp_pipeline(
        HEAD
        + """\
tests:
  - name: bad refs
    sources:
      nope: {items: [1]}
      double: {items: [1]}
    expect: {nothing: [1]}
""",
        TASKS,
    )
    result = run_cli("test", str(path))
    assert result.returncode == 2
    # The column is that of the key or of its value, depending on how diagnostics locate a topology problem.
    lines = [re.sub(r"^(.*?:\d+):\d+:", r"\1:", line) for line in result.stdout.splitlines()]
    assert lines == [
        f"{path}:20: error: tests[0].sources.nope: unknown stage 'nope'; producers: numbers",
        f"{path}:21: error: tests[0].sources.double: stage 'double' is a consumer, not a producer: only a producer has a source",
        f"{path}:22: error: tests[0].expect.nothing: no stage writes to queue 'nothing'; queues: doubled, numbers",
        "0 passed, 0 failed",
    ]
    assert "Traceback" not in result.stderr


def test_unknown_key_in_a_case_is_a_located_error(tmp_pipeline):
    """Misspelt keys of a case or its source are unknown keys at their line with a suggestion; `expect` is missing."""
    path = tmp_pipeline(HEAD + "tests:\n  - name: typo\n    expected: {doubled: [2]}\n    sources: {numbers: {itemz: [1]}}\n", TASKS)
    result = run_cli("test", str(path))
    assert result.returncode == 2
    errors = result.stdout.splitlines()
    assert f"{path}:19:5: error: tests[0].expected: unknown key 'expected'; did you mean 'expect'?" in errors, errors
    assert f"{path}:20:25: error: tests[0].sources.numbers.itemz: unknown key 'itemz'; did you mean 'items'?" in errors, errors
    assert any(line.startswith(f"{path}:18:") and "tests[0].expect: missing required key" in line for line in errors), errors
    assert errors[-1] == "0 passed, 0 failed"


def test_an_invalid_file_exits_2_while_other_files_cases_run(tmp_pipeline, tmp_path):
    """An invalid file gives exit 2 while the cases of the other files still run; a file without tests says so."""
    good = tmp_pipeline(HEAD + "tests:\n  - {name: ok, expect: {doubled: [2, 4, 6]}}\n", TASKS)
    bare = tmp_pipeline(HEAD, name="bare.yaml")
    broken = tmp_pipeline("version: 1\nstages: 3\n", name="broken.yaml")
    result = run_cli("test", str(broken), str(good), str(bare))
    assert result.returncode == 2
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{broken}:2:9: error: stages:")
    assert lines[1:] == [f"PASS {good}::ok", f"no tests in {bare}", "1 passed, 0 failed"]


SINKS = """\
version: 1
settings: {start_method: fork}
stages:
  - name: numbers
    kind: producer
    source: {items: [1, 2, 3]}
    output: numbers
  - name: double
    kind: consumer
    input: numbers
    function: tasks_t:double
    output: [doubled, copies]
  - name: clean
    kind: consumer
    input: doubled
    function: jsonl
    kwargs: {path: out/clean.jsonl}
  - name: save
    kind: consumer
    input: copies
    function: tasks_t:save
    kwargs: {path: out/saved.txt}
tests:
  - name: sinks stay away from real outputs
    expect: {doubled: [2, 4, 6]}
  - name: a user sink runs when asked, where the case says
    run_sinks: [save]
    set: {stages.save.kwargs.path: CASE_PATH, stages.numbers.source: {items: [7]}}
    expect: {copies: [14]}
"""
SAVE_TASKS = TASKS + """

def save(n, path):
    with open(path, "a") as f:
        f.write(f"{n}\\n")
"""


def test_cases_never_touch_real_outputs(tmp_pipeline, tmp_path):
    """In a case, a jsonl sink writes to a scratch folder and a user sink does nothing unless `run_sinks` names it;
    `set` changes values as --set does (here the user sink's path and a producer's source)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "clean.jsonl").write_text("real data\n")
    (out / "saved.txt").write_text("real saved\n")
    case_path = tmp_path / "case.txt"
    path = tmp_pipeline(SINKS.replace("CASE_PATH", str(case_path)), SAVE_TASKS)
    result = run_cli("test", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "clean.jsonl").read_text() == "real data\n"
    assert (out / "saved.txt").read_text() == "real saved\n"
    assert case_path.read_text() == "14\n"
    assert result.stdout.splitlines()[-1] == "2 passed, 0 failed"


def test_bad_set_and_run_sinks_are_located_errors(tmp_pipeline):
    """A `set` path that leads nowhere or a value the schema refuses, and `run_sinks` naming a stage that is not a
    user sink, are errors at their line, from `validate` and `test` alike (exit 2, nothing runs)."""
    head = SINKS.split("tests:", maxsplit=1)[0]
    text = head + """\
tests:
  - name: bad
    set: {stages.nope.processes: 2}
    expect: {doubled: [2, 4, 6]}
  - name: bad value
    set: {stages.double.processes: 0}
    expect: {doubled: [2, 4, 6]}
"""
    path = tmp_pipeline(text, SAVE_TASKS)
    for command in ("validate", "test"):
        result = run_cli(command, str(path))
        assert result.returncode == 2, result.stdout
        lines = [re.sub(r"^(.*?:\d+):\d+:", r"\1:", line) for line in result.stdout.splitlines()]
        assert lines[:2] == [
            (f"{path}:25: error: tests[0].set.stages.nope.processes: in this case: no stage named 'nope'; "
             "stages: numbers, double, clean, save"),
            (f"{path}:28: error: tests[1].set: in this case: stages[1].processes: Input should be greater than or "
             "equal to 1"),
        ], lines
    path = tmp_pipeline(head + "tests:\n  - {name: x, run_sinks: [clean], expect: {doubled: [2]}}\n", name="sinks.yaml")
    result = run_cli("validate", str(path))
    assert result.returncode == 2
    assert result.stdout.splitlines() == [
        (f"{path}:24:27: error: tests[0].run_sinks[0]: stage 'clean' is not a sink with a module:attribute function; "
         "sinks: save")
    ]


def test_dead_letters_can_be_expected(tmp_pipeline):
    """`expect` on a dead-letter queue sees every letter the run puts there, and its real reader still gets them."""
    text = HEAD.replace("    output: doubled\n", "    output: doubled\n    on_error: skip\n    dead_letter: failed\n", 1) + """\
  - name: bad
    kind: consumer
    input: failed
    function: collect
tests:
  - name: letters
    sources: {numbers: {items: [1, 13]}}
    expect:
      failed: [{item: 13, error: "ValueError: unlucky 13", stage: double, attempts: 1}]
      doubled: [2]
"""
    result = run_cli("test", str(tmp_pipeline(text, TASKS)))
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines()[-1] == "1 passed, 0 failed"


def test_junit_xml_and_json_reports(tmp_pipeline, tmp_path):
    """--junit-xml writes a testcase per case with a failure holding the difference; --format json one document;
    an invalid file is an error in both, located."""
    import xml.etree.ElementTree as ET

    path = tmp_pipeline(HEAD + "tests:\n  - {name: ok, expect: {doubled: [2, 4, 6]}}\n  - {name: bad, expect: {doubled: [2]}}\n", TASKS)
    junit = tmp_path / "reports" / "junit.xml"
    result = run_cli("test", str(path), "--junit-xml", str(junit), "--format", "json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert (report["passed"], report["failed"], report["invalid"]) == (1, 1, [])
    assert [(c["name"], c["passed"], c["details"]) for c in report["cases"]] == [
        ("ok", True, []), ("bad", False, ["queue 'doubled': unexpected 2 item(s): 4, 6"])
    ]
    suite = ET.parse(junit).getroot().find("testsuite")
    assert (suite.get("name"), suite.get("tests"), suite.get("failures")) == (str(path), "2", "1")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["ok", "bad"]
    assert cases[0].find("failure") is None
    failure = cases[1].find("failure")
    assert failure.get("message") == "queue 'doubled': unexpected 2 item(s): 4, 6"
    assert "noise 1" in cases[1].find("system-out").text

    broken = tmp_pipeline("version: 1\nstages: 3\n", name="broken.yaml")
    result = run_cli("test", str(broken), "--junit-xml", str(junit), "--format", "json")
    assert result.returncode == 2
    invalid = json.loads(result.stdout)["invalid"]
    assert [(p["file"], p["line"], p["path"]) for p in invalid] == [(str(broken), 2, "stages")]
    error = ET.parse(junit).getroot().find("testsuite/testcase/error")
    assert error is not None and error.text.startswith(f"{broken}:2:9: error: stages:")


def test_no_test_cases_is_a_failure(tmp_pipeline):
    """A run of `mprun test` in which no file has a case says so and exits 1, not a silent 0."""
    bare = tmp_pipeline(HEAD, TASKS)
    result = run_cli("test", str(bare))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"no tests in {bare}",
        f"no test cases in {bare}: add a tests: list to a pipeline file",
        "0 passed, 0 failed",
    ]


def test_output_is_captured_under_forkserver_too(tmp_pipeline):
    """With forkserver (the default start method), what stages print stays out of the report as well: the
    server the command starts is started inside the capture, so the processes it forks print into it."""
    path = tmp_pipeline(HEAD.replace("settings: {start_method: fork}\n", "") + "tests:\n  - {name: ok, expect: {doubled: [2, 4, 6]}}\n",
                        TASKS)
    result = run_cli("test", str(path))
    assert (result.returncode, result.stdout.splitlines()) == (0, [f"PASS {path}::ok", "1 passed, 0 failed"])
    as_json = run_cli("test", str(path), "--format", "json")
    assert json.loads(as_json.stdout)["passed"] == 1
