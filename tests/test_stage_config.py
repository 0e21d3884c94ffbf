"""The configuration and I/O edge of stages for real work (SPEC 1b): ``processes: auto``, batch and concurrency
keys, named routes and self-fed stages in the plan and the graph, standard input and glob sources, and the
``csv``, ``lines`` and ``jsonl`` sinks (``-``: standard output).  Error cases live in ``tests/broken/stage_config_*``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from runner import load_pipeline, run_pipeline
from runner.compiler import compile_pipeline
from runner.graph import graph_data, render
from tests.conftest import ROOT, run_cli, wait_gone

ROUTES = """version: 1
settings: {start_method: fork}
stages:
  - {name: seeds, kind: producer, source: {items: [1, 2]}, output: work}
  - name: expand
    kind: consumer
    input: work
    function: tasks_t:expand
    output: {more: work, done: results, default: results}
    batch: 8
    batch_timeout: 0.5
    concurrency: 4
  - {name: save, kind: pool, input: results, function: collect}
"""
TASKS = """
import runner

def expand(item):
    if item < 4:
        return runner.route("more", item * 2)
    return runner.route("done", item)

class Scale:
    def __init__(self, factor=2):
        self.factor = factor

    def __call__(self, item):
        return item * self.factor
"""


def test_processes_auto_is_the_cpus_this_process_may_use(tmp_pipeline):
    """``auto`` (a pool's default) is the size of this process's CPU affinity mask, not the machine's CPU count;
    with ``process_names`` it is their number; other kinds default to 1."""
    path = tmp_pipeline("""version: 1
stages:
  - {name: src, kind: producer, source: {items: [1]}, output: a}
  - {name: many, kind: consumer, processes: auto, input: a, function: identity, output: b}
  - {name: named, kind: consumer, processes: auto, process_names: [x, y, z], input: b, function: identity, output: c}
  - {name: pool, kind: pool, input: c, function: print}
""")
    mask = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(mask)})
        one = compile_pipeline(load_pipeline(path))
    finally:
        os.sched_setaffinity(0, mask)
    every = compile_pipeline(load_pipeline(path))
    assert [s.processes for s in one.stages] == [1, 1, 3, 1]
    assert [s.processes for s in every.stages] == [1, len(mask), 3, len(mask)]
    assert every.stage("named").process_names == ("x", "y", "z")


def test_plan_holds_routes_their_queues_batch_and_concurrency(tmp_pipeline):
    """An output mapping becomes ``routes`` (route -> queue) and ``outputs`` (its distinct queues, in order);
    a route back to the stage's own input makes it self-fed; batch keys and concurrency are carried over."""
    path = tmp_pipeline(ROUTES, TASKS)
    plan = compile_pipeline(load_pipeline(path))
    expand = plan.stage("expand")
    assert expand.routes == {"more": "work", "done": "results", "default": "results"}
    assert expand.outputs == ("work", "results")
    assert expand.self_fed and not plan.stage("save").self_fed
    assert (expand.batch, expand.batch_timeout, expand.concurrency) == (8, 0.5, 4)
    save = plan.stage("save")
    assert (save.batch, save.batch_timeout, save.concurrency, save.routes) == (None, 0.1, 1, {})
    assert plan.queues["work"].writers == ("seeds", "expand")


def test_self_fed_stage_and_class_validate(tmp_pipeline):
    """A stage feeding its own input (through a route) is valid, as is a class with ``__call__`` and kwargs of
    its ``__init__``; ``mprun validate`` says ok."""
    text = ROUTES + "  - {name: scale, kind: consumer, input: r2, function: tasks_t:Scale, kwargs: {factor: 3}}\n"
    text = text.replace("function: collect}", "function: identity, output: r2}")
    path = tmp_pipeline(text, TASKS)
    result = run_cli("validate", str(path))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"ok {path}\n", "")


def test_graph_labels_routes_and_draws_the_loop(tmp_pipeline):
    """``mprun graph``: one edge per route, labelled with its name; the edge back to the stage's input is a loop."""
    pipeline = load_pipeline(tmp_pipeline(ROUTES, TASKS))
    edges = [e for e in graph_data(pipeline)["edges"] if e["kind"] == "output" and e["from"] == "stage:expand"]
    assert edges == [
        {"from": "stage:expand", "to": "queue:work", "kind": "output", "route": "more", "loop": True},
        {"from": "stage:expand", "to": "queue:results", "kind": "output", "route": "done"},
        {"from": "stage:expand", "to": "queue:results", "kind": "output", "route": "default"},
    ]
    mermaid = render(pipeline, "mermaid").splitlines()
    assert '  s1 -->|"more (loop)"| q0' in mermaid and '  s1 -->|"done"| q1' in mermaid
    dot = render(pipeline, "dot").splitlines()
    assert '  s1 -> q0 [label="more (loop)", constraint=false];' in dot


def test_json_schema_takes_the_new_forms():
    """The committed JSON Schema (what editors check) accepts auto, batch, concurrency and routes where the
    format does, and rejects routes on a producer, concurrency 0 and processes 'all'."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "schemas" / "pipeline.schema.json").read_text())
    checker = jsonschema.Draft202012Validator(schema)

    def valid(*stages: dict) -> bool:
        return checker.is_valid({"stages": list(stages)})

    src = {"name": "s", "kind": "producer", "source": {"file": {"path": "logs/*.jsonl"}}, "output": "q"}
    pool = {"name": "p", "kind": "pool", "input": "q", "function": "m:C", "processes": "auto", "batch": 10,
            "batch_timeout": 0.5, "concurrency": 50, "output": {"ok": "a", "default": "b"}}
    assert valid(src, pool)
    assert valid({**src, "processes": "auto"}, {**pool, "processes": 4, "output": ["a", "b"]})
    assert not valid({**src, "output": {"r": "q"}}, pool)
    assert not valid(src, {**pool, "concurrency": 0})
    assert not valid(src, {**pool, "processes": "all"})
    assert not valid(src, {**pool, "batch_timeout": 0})
    assert not valid(src, {**pool, "output": {}})
    assert not valid(src, {**pool, "output": {"bad route": "a"}})


def _run(path, *args: str, stdin: str = "", cwd=None) -> subprocess.CompletedProcess[str]:
    """``mprun run PATH ARGS`` with ``stdin`` as its standard input; fails if a process outlives it."""
    token = uuid.uuid4().hex
    mprun = os.path.join(os.path.dirname(sys.executable), "mprun")
    result = subprocess.run([mprun, "run", str(path), "--no-progress", *args], input=stdin, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "MPRUN_TEST_TOKEN": token}, cwd=cwd, check=False)
    assert wait_gone(token) == []
    return result


@pytest.mark.parametrize("how", ["forkserver", "inline"])
def test_stdin_source_reads_what_is_piped_in(tmp_pipeline, how):
    """``file: {path: "-"}`` reads mprun's standard input, from a producer process and with ``--inline``."""
    path = tmp_pipeline("""version: 1
stages:
  - {name: rows, kind: producer, source: {file: {path: "-", format: jsonl}}, output: q}
  - {name: save, kind: consumer, input: q, function: collect}
""")
    args = ("--inline",) if how == "inline" else ("--start-method", how)
    result = _run(path, *args, stdin='{"n": 1}\n\n{"n": 2}\n{"n": 3}\n')
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [{"n": 1}, {"n": 2}, {"n": 3}]


GLOB_TASKS = """\
import logging

def check(row):
    assert row["i"] == 1, "not the first"
    return row

def bury(letter):
    logging.getLogger("tasks").warning("buried")
"""


def test_glob_source_reads_files_in_sorted_order_and_names_them(tmp_pipeline, tmp_path):
    """A glob reads every matching file (not folders) in sorted order; a record per file gives the index of its
    first item; each item's id names its file and line, through later stages (a stage's records, dead
    letters); bad data is named by its own file and line."""
    logs = tmp_path / "logs"
    (logs / "c.jsonl").mkdir(parents=True)  # a folder that matches: not read
    (logs / "b.jsonl").write_text('{"f": "b", "i": 1}\n\n{"f": "b", "i": 2}\n')
    (logs / "a.jsonl").write_text('{"f": "a", "i": 1}\n')
    (logs / "notes.txt").write_text("not json\n")
    path = tmp_pipeline("""version: 1
settings: {start_method: fork}
queues: {dead: {}}
stages:
  - {name: rows, kind: producer, source: {file: {path: "logs/*.jsonl", format: jsonl}}, output: q}
  - {name: check, kind: pool, processes: 2, input: q, function: "tasks_t:check", output: r, on_error: skip,
     dead_letter: dead}
  - {name: save, kind: consumer, input: r, function: collect}
  - {name: graveyard, kind: consumer, input: dead, function: "tasks_t:bury"}
""", GLOB_TASKS)
    log_file = tmp_path / "run.log"
    result = run_pipeline(path, log_file=str(log_file))
    assert result.exit_code == 0, result.error
    assert sorted((x["f"], x["i"]) for x in result.collected["save"]) == [("a", 1), ("b", 1)]
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    starts = [(r["file"], r["first_item"]) for r in records if r["event"] == "reading file"]
    assert starts == [("logs/a.jsonl", 0), ("logs/b.jsonl", 1)]
    given_up = [r for r in records if r["event"] == "item given up"]
    assert [r["item_id"] for r in given_up] == ["rows:logs/b.jsonl:3"]  # line 3: the blank line 2 counts
    buried = [r for r in records if r["event"] == "buried"]
    assert [(r["item_id"], r["stage"]) for r in buried] == [("rows:logs/b.jsonl:3", "graveyard")]
    (logs / "b.jsonl").write_text('{"f": "b", "i": 1}\n{"f": \n')
    failed = _run(path)
    assert failed.returncode == 1
    assert "logs/b.jsonl:2: invalid JSON" in failed.stderr and "Traceback" not in failed.stderr


def test_file_sinks_write_exactly_their_lines(tmp_pipeline, tmp_path):
    """csv (header from the first item's keys, written once by two processes), lines (``str(item)``) and jsonl to
    ``-`` (standard output) write exactly one line per item; missing folders are made, old content replaced."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "rows.csv").write_text("old,content\n")
    path = tmp_pipeline("""version: 1
settings: {start_method: fork}
stages:
  - {name: src, kind: producer, source: {items: [{b: 1, a: "x,y"}, {a: 2, b: 3}, {b: 4}, {a: 5, b: 6}]}, output: q}
  - {name: fan, kind: consumer, input: q, function: identity, output: [c, l, j, k]}
  - {name: table, kind: consumer, processes: 2, input: c, function: csv, kwargs: {path: out/rows.csv}}
  - {name: text, kind: consumer, input: l, function: lines, kwargs: {path: new/deeper/items.txt}}
  - {name: json, kind: consumer, input: j, function: jsonl, kwargs: {path: "-"}}
  - {name: picked, kind: consumer, input: k, function: csv, kwargs: {path: picked.csv, columns: [b]}, on_error: skip}
""")
    result = _run(path)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"b": 1, "a": "x,y"}, {"a": 2, "b": 3}, {"b": 4}, {"a": 5, "b": 6}]
    rows = (tmp_path / "out" / "rows.csv").read_text().splitlines()
    assert rows[0] in ("b,a", "a,b") and len(rows) == 5  # whichever process wrote first chose the order
    body = sorted(rows[1:])
    assert body == (sorted(['1,"x,y"', "3,2", "4,", "6,5"]) if rows[0] == "b,a" else sorted(['"x,y",1', "2,3", ",4", "5,6"]))
    assert (tmp_path / "new" / "deeper" / "items.txt").read_text() == (
        "{'b': 1, 'a': 'x,y'}\n{'a': 2, 'b': 3}\n{'b': 4}\n{'a': 5, 'b': 6}\n")
    # columns given: an item with other keys is that item's error (skipped here), the rest are written
    assert (tmp_path / "picked.csv").read_text() == "b\n4\n"


def test_csv_sink_fails_an_item_that_is_not_a_dict(tmp_pipeline, tmp_path):
    """A csv sink's item must be a dict: anything else is an error of that item (skipped, counted, named)."""
    path = tmp_pipeline("""version: 1
settings: {start_method: fork}
stages:
  - {name: src, kind: producer, source: {items: [{a: 1}, 7, {a: 2}, {a: 3, b: 4}]}, output: q}
  - {name: table, kind: consumer, input: q, function: csv, kwargs: {path: t.csv}, on_error: skip}
""")
    result = run_pipeline(path)
    assert result.exit_code == 0, result.error
    assert result.stats["table"].skipped == 2
    assert (tmp_path / "t.csv").read_text() == "a\n1\n2\n"


def test_unwritable_sink_stops_the_run_before_it_starts(tmp_pipeline, tmp_path):
    """``mprun run`` with a csv sink whose folder is a file: exit 2 at the path's line, no traceback, nothing run."""
    (tmp_path / "blocker").write_text("")
    path = tmp_pipeline("""version: 1
stages:
  - {name: src, kind: producer, source: {items: [{a: 1}]}, output: q}
  - {name: table, kind: consumer, input: q, function: lines, kwargs: {path: blocker/out.txt}}
""")
    result = _run(path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"{path}:4:77: error: stages[1].kwargs.path: cannot create ")
    assert "Traceback" not in result.stderr and "process started" not in result.stderr


def test_a_case_watches_a_queue_written_through_a_route(tmp_pipeline, tmp_path):
    """``mprun test`` taps a queue a stage writes through a route by a relay (a route leads to one queue), and
    refuses to watch a queue a stage feeds back to itself (a relay there would make a cycle)."""
    from runner.testing import CaseInvalid, case_pipeline

    text = ROUTES.replace("function: collect}", "function: identity, output: kept}") + """\
  - {name: last, kind: consumer, input: kept, function: print}
tests:
  - {name: results, expect: {results: [8, 8]}}
  - {name: loop, expect: {work: [1, 2]}}
"""
    pipeline = load_pipeline(tmp_pipeline(text, TASKS))
    case, taps = case_pipeline(pipeline, pipeline.tests[0], str(tmp_path))
    assert case.stage("expand").routes == {"more": "work", "done": "_routed_results", "default": "_routed_results"}
    relay = case.stage("_routed_results")
    assert (relay.input, relay.function, relay.outputs) == ("_routed_results", "identity", ["results", taps["results"]])
    with pytest.raises(CaseInvalid, match="feeds queue 'work' back to itself by its route 'more'"):
        case_pipeline(pipeline, pipeline.tests[1], str(tmp_path))


def test_run_refuses_what_validate_refuses_before_any_stage_starts(tmp_pipeline):
    """``mprun run`` reports the class and route problems ``validate`` finds (exit 2, same lines), starting nothing."""
    text = ROUTES.replace("function: collect", "function: tasks_t:Scale").replace("{more: work, done:", "{done:")
    path = tmp_pipeline(text, TASKS.replace("    def __call__(self, item):", "    def call(self, item):"))
    validated = run_cli("validate", str(path))
    ran = run_cli("run", str(path), "--no-progress")
    assert (validated.returncode, ran.returncode) == (2, 2)
    problems = validated.stdout.splitlines()
    assert [line.split(": error: ")[1].split(":")[0] for line in problems] == ["stages[1].output", "stages[2].function"]
    assert "sends items to route 'more'" in problems[0] and "class without __call__" in problems[1]
    assert ran.stderr.splitlines() == problems
    assert "process started" not in ran.stderr and "Traceback" not in ran.stderr


def test_glob_items_name_the_line_where_each_item_starts(tmp_path):
    """csv: after the header, a row's first line (a quoted field may span lines; blank lines count); lines: each
    line."""
    from runner import worker

    (tmp_path / "a.csv").write_text('x,y\n1,"two\nlines"\n\n3,4\n')
    (tmp_path / "b.txt").write_text("p\nq\n")
    assert list(worker.glob_items(str(tmp_path), "*.csv", "csv")) == [
        ("a.csv:2", {"x": "1", "y": "two\nlines"}), ("a.csv:5", {"x": "3", "y": "4"})]
    assert list(worker.glob_items(str(tmp_path), "*.txt", "lines")) == [("b.txt:1", "p"), ("b.txt:2", "q")]
