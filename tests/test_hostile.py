"""Hostile and careless input: each case ends in a located ``FILE:LINE:COL: error: ...`` and exit 2, no traceback.

The pipeline files a CI job validates come from pull requests: a file must not take unbounded memory or
time (alias bombs, deep nesting, huge files), nor carry a tag past validation. The limit tests run the
real command under a 600 MB address-space limit with a short timeout as the hang guard.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli, wait_gone

AS_LIMIT = 600 * 1024 * 1024
GUARD = 10  # seconds: the hang guard of one refused file (today's code took 29 s and 2.5 GB on the bomb)


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def run_limited(*args: str) -> subprocess.CompletedProcess[str]:
    """``mprun ARGS`` under a 600 MB address-space limit, killed after ``GUARD`` seconds; no process left behind."""
    token = uuid.uuid4().hex
    mprun = Path(sys.executable).with_name("mprun")
    result = subprocess.run([str(mprun), *args], capture_output=True, text=True, timeout=GUARD, check=False,
                            env={**os.environ, "MPRUN_TEST_TOKEN": token}, cwd=ROOT, preexec_fn=_limited)
    assert wait_gone(token) == []
    return result


def alias_bomb() -> str:
    """Nine aliases of nine aliases ... nine levels deep: 9**9 strings once expanded."""
    lines = ["version: 1", 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    lines.append("stages: [{name: x, kind: producer, source: {items: *i}}]")
    return "\n".join(lines) + "\n"


def deep(levels: int) -> str:
    """A producer whose items are lists nested ``levels`` deep on line 5."""
    return ("version: 1\nstages:\n  - name: x\n    kind: producer\n"
            f"    source: {{items: {'[' * levels}{']' * levels}}}\n")


@pytest.mark.parametrize("command", ["validate", "run"])
def test_an_alias_bomb_is_refused_at_its_line(tmp_path, command):
    """A 9x9 alias bomb: exit 2 at the alias that passes the limit (line 7), within the memory limit and the guard."""
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    result = run_limited(command, str(path))
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert out.startswith(f"{path}:7:8: error: (file): aliases stand for more than 100,000 values"), out
    assert "Traceback" not in out


@pytest.mark.parametrize("command", ["validate", "run"])
def test_deep_nesting_is_refused_at_its_line(tmp_path, command):
    """600 nested lists: exit 2 where level 101 opens (line 5), not a RecursionError."""
    path = tmp_path / "deep.yaml"
    path.write_text(deep(600))
    result = run_limited(command, str(path))
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert out.startswith(f"{path}:5:117: error: (file): lists and mappings are nested more than 100 levels deep"), out
    assert "Traceback" not in out


def test_nesting_within_the_limit_loads(tmp_path):
    """90 nested lists are within the limit: the file validates."""
    path = tmp_path / "deep.yaml"
    path.write_text(deep(90) + "    output: q\n  - {name: y, kind: consumer, input: q, function: identity}\n")
    result = run_cli("validate", str(path))
    assert result.returncode == 0, result.stdout


def test_a_huge_file_is_refused_without_being_parsed(tmp_path):
    """A 50 MB file: exit 2 at the line where its first MiB ends, well within the memory limit and the guard."""
    path = tmp_path / "huge.yaml"
    row = "        - 12345678901234567890\n"
    path.write_text("version: 1\nstages:\n  - name: x\n    kind: producer\n    source:\n      items:\n"
                    + row * (50_000_000 // len(row)))
    result = run_limited("validate", str(path))
    assert result.returncode == 2, result.stdout
    line = (1024 * 1024 - 86) // len(row) + 7
    assert result.stdout.startswith(f"{path}:{line}:"), result.stdout
    assert "more than the 1,048,576 a pipeline file may have" in result.stdout


def test_a_structure_that_contains_itself_is_refused(tmp_path):
    """``&a [1, *a]`` would make a list holding itself: refused at the alias."""
    path = tmp_path / "self.yaml"
    path.write_text("version: 1\nname: &a [1, *a]\nstages: []\n")
    result = run_cli("validate", str(path))
    assert result.returncode == 2
    assert result.stdout.startswith(f"{path}:2:14: error: (file): alias *a is inside the node it names"), result.stdout


TAGGED = """\
version: 1
stages:
  - name: numbers
    kind: producer
    source: {items: [1, 2]}
    output: numbers
  - !!python/object:os.system {name: w, kind: consumer, input: numbers, function: identity}
"""


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_python_tag_on_a_mapping_is_an_error_at_its_line(tmp_path, command):
    """``!!python/object:...`` on a mapping used to vanish (the file validated); now it is refused where it is."""
    path = tmp_path / "tagged.yaml"
    path.write_text(TAGGED)
    result = run_cli(command, str(path))
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert out.startswith(f"{path}:7:5: error: YAML syntax: tag '!!python/object:os.system' is not part of the pipeline format")
    assert "Traceback" not in out


@pytest.mark.parametrize(("value", "col"), [("!foo 3", 21), ("!!set {a, b}", 21), ("!!binary aGk=", 21)])
def test_tags_the_format_does_not_define_are_errors(tmp_path, value, col):
    """Local tags and the YAML types a pipeline does not use are errors at the tag, with exit 2."""
    path = tmp_path / "p.yaml"
    path.write_text(TAGGED.replace("{items: [1, 2]}", f"{{items: {value}}}").replace(
        "!!python/object:os.system ", ""))
    result = run_cli("validate", str(path))
    assert result.returncode == 2
    assert result.stdout.startswith(f"{path}:5:{col}: error: YAML syntax: tag "), result.stdout


def test_core_tags_are_kept(tmp_path):
    """``!!str``, ``!!int`` and the other core tags are plain YAML: the file validates."""
    path = tmp_path / "p.yaml"
    path.write_text(TAGGED.replace("{items: [1, 2]}", "!!map {items: !!seq [!!int '1', !!str 2, !!float 3, !!null '', !!bool true]}")
                    .replace("!!python/object:os.system ", ""))
    result = run_cli("validate", str(path))
    assert result.returncode == 0, result.stdout


def test_a_tag_in_a_set_value_is_an_error_of_that_argument(tmp_path):
    """``--set`` values are YAML too, with the same rules."""
    path = tmp_path / "p.yaml"
    path.write_text(TAGGED.replace("!!python/object:os.system ", ""))
    result = run_cli("validate", str(path), "--set", "stages.numbers.source=!!python/object/apply:os.system [id]")
    assert result.returncode == 2
    assert result.stdout.startswith("--set stages.numbers.source=!!python/object/apply:os.system [id]: error: "
                                    "VALUE is not valid YAML: tag '!!python/object/apply:os.system'"), result.stdout


# -- what validated but crashed the run: caught by validate and by run, before any stage starts ----------

SINK = """\
version: 1
stages:
  - name: numbers
    kind: producer
    source: {items: [1, 2, 3]}
    output: numbers
  - name: out
    kind: consumer
    processes: 1
    input: numbers
    function: jsonl
    kwargs: {path: out.jsonl}
"""


def both(path: Path, *options: str) -> list[subprocess.CompletedProcess[str]]:
    """``mprun validate`` and ``mprun run`` of one file."""
    return [run_cli("validate", str(path), *options), run_cli("run", str(path), *options)]


def assert_refused(results: list[subprocess.CompletedProcess[str]], expected: str) -> None:
    """Each result: exit 2, ``expected`` as its first line, no traceback, and no stage process was started."""
    for result in results:
        out = result.stdout + result.stderr
        assert result.returncode == 2, out
        assert out.splitlines()[0] == expected, out
        assert "Traceback" not in out
        assert "process started" not in out


def test_too_many_processes_is_refused_with_the_reason(tmp_path):
    """``processes: 100000`` tried to start them all; now exit 2 at the value, saying why there is a bound."""
    path = tmp_path / "p.yaml"
    path.write_text(SINK.replace("processes: 1", "processes: 100000"))
    assert_refused(both(path), f"{path}:9:16: error: stages[1].processes: at most 256 processes per stage, got 100000: "
                   "each process is a whole Python interpreter and holds file descriptors in the main process, so "
                   "more exhaust memory or the open-file limit before they add speed")


def test_a_jsonl_sink_without_a_path_is_refused(tmp_path):
    """A ``jsonl`` sink without ``kwargs.path`` raised KeyError in the run; now exit 2 at its function."""
    path = tmp_path / "p.yaml"
    path.write_text(SINK.replace("    kwargs: {path: out.jsonl}\n", ""))
    assert_refused(both(path), f"{path}:11:15: error: stages[1].function: the built-in 'jsonl' needs kwargs.path")


def test_unknown_kwargs_of_a_built_in_are_refused(tmp_path):
    """``print`` takes no argument and ``jsonl`` only ``path``: any other is an error at its key."""
    path = tmp_path / "p.yaml"
    path.write_text(SINK.replace("{path: out.jsonl}", "{path: out.jsonl, mode: w}"))
    assert_refused(both(path), f"{path}:12:37: error: stages[1].kwargs.mode: the built-in 'jsonl' has no argument "
                   "'mode'; it takes path")
    path.write_text(SINK.replace("function: jsonl", "function: print").replace("{path: out.jsonl}", "{sep: ','}"))
    assert_refused(both(path), f"{path}:12:19: error: stages[1].kwargs.sep: the built-in 'print' has no argument "
                   "'sep'; it takes none")


def test_a_jsonl_sink_creates_its_missing_folder(tmp_path):
    """A sink path in folders that do not exist yet: they are created and the items written."""
    path = tmp_path / "p.yaml"
    path.write_text(SINK.replace("out.jsonl", "out/a/b/out.jsonl"))
    result = run_cli("run", str(path), "--no-summary")
    assert result.returncode == 0, result.stderr
    assert sorted((tmp_path / "out" / "a" / "b" / "out.jsonl").read_text().split()) == ["1", "2", "3"]


def test_an_unwritable_jsonl_path_is_refused(tmp_path):
    """A sink path below a file (its folder can never be made): exit 2 at the path, by validate and run."""
    (tmp_path / "notes.txt").write_text("")
    path = tmp_path / "p.yaml"
    path.write_text(SINK.replace("out.jsonl", "notes.txt/out.jsonl"))
    assert_refused(both(path), f"{path}:12:20: error: stages[1].kwargs.path: cannot create "
                   f"{tmp_path}/notes.txt/out.jsonl: {tmp_path}/notes.txt is not a folder")


def test_an_unwritable_log_file_is_refused_before_the_run(tmp_path):
    """``settings.log_file`` (validate and run) and ``--log-file`` (run) that cannot be created: exit 2 first."""
    (tmp_path / "notes.txt").write_text("")
    bad = f"{tmp_path}/notes.txt/run.log"
    path = tmp_path / "p.yaml"
    path.write_text(SINK.replace("stages:", f"settings: {{log_file: {bad}}}\nstages:"))
    assert_refused(both(path), f"{path}:2:22: error: settings.log_file: cannot create {bad}: {tmp_path}/notes.txt is not a folder")
    path.write_text(SINK)
    assert_refused([run_cli("run", str(path), "--log-file", bad)],
                   f"--log-file {bad}: error: cannot create {bad}: {tmp_path}/notes.txt is not a folder")


def test_an_unwritable_metrics_path_is_refused_before_the_run(tmp_path):
    """``--metrics-json`` below a file: exit 2 before any stage starts (it used to fail after a successful run)."""
    (tmp_path / "notes.txt").write_text("")
    bad = f"{tmp_path}/notes.txt/m.json"
    path = tmp_path / "p.yaml"
    path.write_text(SINK)
    assert_refused([run_cli("run", str(path), "--metrics-json", bad)],
                   f"--metrics-json {bad}: error: cannot create {bad}: {tmp_path}/notes.txt is not a folder")


def test_writes_that_fail_at_the_end_keep_the_summary(tmp_path):
    """Metrics and log records written to a full disk (/dev/full): the summary is printed, each failure is one line."""
    path = tmp_path / "p.yaml"
    path.write_text(SINK)
    result = run_cli("run", str(path), "--metrics-json", "/dev/full", "--log-file", "/dev/full")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr and "Logging error" not in result.stderr
    assert lines.count("mprun: error: cannot write the log file /dev/full: No space left on device; "
                       "later records are not in it") == 1
    assert lines[-1] == "mprun: error: cannot write --metrics-json /dev/full: No space left on device"
    assert lines[-2].startswith("ok in ")


SOURCE = """\
version: 1
stages:
  - name: numbers
    kind: producer
    source: {file: {path: PATH, format: jsonl}}
    output: numbers
  - {name: out, kind: consumer, input: numbers, function: collect}
"""


def test_a_missing_file_source_is_refused_before_the_run(tmp_path):
    """A file source that does not exist: exit 2 at its path, by validate and by run (and run --inline)."""
    path = tmp_path / "p.yaml"
    path.write_text(SOURCE.replace("PATH", "in.jsonl"))
    expected = (f"{path}:5:27: error: stages[0].source.file.path: no such file: {tmp_path}/in.jsonl "
                "(a relative path starts at the pipeline file's folder)")
    assert_refused([*both(path), run_cli("run", "--inline", str(path))], expected)


def test_a_file_source_from_a_variable_is_checked_by_run_only(tmp_path):
    """``path: ${IN}``: the run's environment decides it, so validate leaves it; run refuses a missing one."""
    path = tmp_path / "p.yaml"
    path.write_text(SOURCE.replace("PATH", "\"${IN}\""))
    env = {"IN": "nowhere.jsonl"}
    assert run_cli("validate", str(path), env=env).returncode == 0
    result = run_cli("run", str(path), env=env)
    assert result.returncode == 2
    assert result.stderr.startswith(f"{path}:5:27: error: stages[0].source.file.path: no such file: "), result.stderr


def test_a_file_source_written_by_an_earlier_stage_need_not_exist(tmp_path):
    """A source that a jsonl sink of the same pipeline writes (read after it) is not refused."""
    path = tmp_path / "p.yaml"
    path.write_text(SINK + "  - {name: again, kind: producer, after: [out], source: {file: {path: out.jsonl, "
                    "format: jsonl}}, output: back}\n  - {name: show, kind: consumer, input: back, function: collect}\n")
    result = run_cli("run", str(path), "--no-summary")
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(result.stdout)) == [1, 2, 3]


# -- bad data in a file source names its file and line ----------------------------------------------------


@pytest.mark.parametrize("inline", [False, True], ids=["run", "inline"])
@pytest.mark.parametrize(("name", "fmt", "content", "expected"), [
    ("in.jsonl", "jsonl", '{"a": 1}\n\n{"a": \n', "in.jsonl:3: invalid JSON: Expecting value (column 7)"),
    ("in.jsonl", "jsonl", '{"a": 1}\n{"a": 2} x\n', "in.jsonl:2: invalid JSON: Extra data (column 10)"),
    ("in.csv", "csv", "a,b\n1,2\n\n3,4,5\n", "in.csv:4: the row has 3 fields, the header (line 1) has 2"),
    ("in.csv", "csv", "a,b\n1,2\n3\n", "in.csv:3: the row has 1 fields, the header (line 1) has 2"),
], ids=["jsonl-truncated", "jsonl-extra", "csv-long-row", "csv-short-row"])
def test_bad_source_data_names_the_file_and_line(tmp_path, name, fmt, content, expected, inline):
    """Malformed JSON lines and ragged CSV rows fail the run with ``FILE:LINE: ...`` and no traceback of ours."""
    (tmp_path / name).write_text(content)
    path = tmp_path / "p.yaml"
    path.write_text(SOURCE.replace("PATH", name).replace("format: jsonl", f"format: {fmt}"))
    result = run_cli("run", str(path), "--no-summary", *(["--inline"] if inline else []))
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1].endswith(f"failed: SourceError: {expected}"), result.stderr
    assert "Traceback" not in result.stderr


def test_good_csv_rows_are_dicts_by_header(tmp_path):
    """Rows with as many fields as the header become dicts; blank lines are skipped."""
    (tmp_path / "in.csv").write_text("a,b\n1,2\n\n3,4\n")
    path = tmp_path / "p.yaml"
    path.write_text(SOURCE.replace("PATH", "in.csv").replace("format: jsonl", "format: csv"))
    result = run_cli("run", str(path), "--no-summary")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [{"a": "1", "b": "2"}, {"a": "3", "b": "4"}]


# -- a failing stage stays readable: repeats summarised on stderr, every one in the log file -------------

FAILING = """\
version: 1
stages:
  - name: numbers
    kind: producer
    source: {range: {stop: 3000}}
    output: numbers
  - name: double
    kind: pool
    processes: 2
    input: numbers
    function: tasks_t:fail_every
    on_error: skip
    output: doubled
  - {name: out, kind: consumer, input: doubled, function: collect}
"""
FAIL_EVERY = """\
def fail_every(x):
    if x % 10 == 0:
        raise ValueError(f"bad item {x}")
    return x
"""


@pytest.mark.parametrize("inline", [False, True], ids=["run", "inline"])
def test_repeated_warnings_are_summarised_and_all_logged(tmp_pipeline, tmp_path, inline):
    """300 skipped items: stderr shows the first 5 warnings and counts the rest; the log file holds all 300."""
    path = tmp_pipeline(FAILING, FAIL_EVERY)
    log_file = tmp_path / "run.log"
    result = run_cli("run", str(path), "--no-summary", "--log-file", str(log_file), *(["--inline"] if inline else []))
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)) == 2700
    shown = [line for line in result.stderr.splitlines() if " item given up " in line]
    summaries = [line for line in result.stderr.splitlines() if "item given up: " in line]
    assert len(shown) == 5, result.stderr
    counts = [int(line.split("item given up: ")[1].split(" more like this")[0].replace(",", "")) for line in summaries]
    assert sum(counts) == 295, summaries
    assert all("(every one is in the log file)" in line and "last_error=" in line for line in summaries)
    logged = [json.loads(line) for line in log_file.read_text().splitlines()]
    given_up = [r for r in logged if r["event"] == "item given up"]
    assert sorted(int(r["item"]) for r in given_up) == list(range(0, 3000, 10))
    assert all(r["stage"] == "double" and r["level"] == "warning" and r["error"].startswith("ValueError: bad item")
               for r in given_up)


def test_without_a_log_file_repeats_are_only_counted(tmp_pipeline):
    """Without a log file the repeats are only counted: the summary line does not point to a file."""
    path = tmp_pipeline(FAILING, FAIL_EVERY)
    result = run_cli("run", str(path), "--no-summary")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len([line for line in lines if " item given up " in line]) == 5
    assert len(lines) < 40, result.stderr
    assert "more like this" in result.stderr and "log file" not in result.stderr
