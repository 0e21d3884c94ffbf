"""`mprun graph`: the topology as Mermaid, Graphviz dot and JSON, through the real entry point."""

from __future__ import annotations

import json
import re

from tests.conftest import run_cli

FAN = """\
version: 1
name: fan
queues:
  words: {type: lifo, maxsize: 0}
stages:
  - name: left
    kind: producer
    source: {items: [a]}
    output: words
  - name: right
    kind: producer
    processes: 2
    source: {items: [b]}
    output: words
  - name: split
    kind: pool
    processes: 3
    input: words
    function: identity
    output: [upper, lower]
  - name: up
    kind: consumer
    input: upper
    function: collect
    after: [left]
  - name: low
    kind: consumer
    input: lower
    function: collect
"""


def test_mermaid_is_the_default(tmp_pipeline):
    """Without --format the graph is a Mermaid flowchart: every stage, queue, edge and `after` (dashed)."""
    result = run_cli("graph", str(tmp_pipeline(FAN)))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "flowchart LR"
    assert '  s2["split<br/>pool, 3 processes<br/>identity"]' in lines
    assert '  s1["right<br/>producer, 2 processes<br/>source: items"]' in lines
    assert '  q0[("words<br/>lifo, unbounded")]' in lines
    # fan-in: both producers write 'words'; fan-out: split writes 'upper' and 'lower'
    assert {"  s0 --> q0", "  s1 --> q0", "  q0 --> s2", "  s2 --> q1", "  s2 --> q2"} <= set(lines)
    assert "  s0 -.->|after| s3" in lines


def test_dot_format_draws_boxes_cylinders_and_dashed_after_edges(tmp_pipeline):
    """--format dot prints a Graphviz digraph: boxes, cylinders with type and maxsize, a dashed `after` edge."""
    result = run_cli("graph", str(tmp_pipeline(FAN)), "--format", "dot")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith('digraph "fan" {\n  rankdir=LR;')
    assert out.rstrip().endswith("}")
    assert 's2 [shape=box, style="rounded", label="split\\npool, 3 processes\\nidentity"];' in out
    assert 'q0 [shape=cylinder, label="words\\nlifo, unbounded"];' in out
    assert 's0 -> s3 [style=dashed, label="after"];' in out
    assert "s1 -> q0;" in out and "s2 -> q2;" in out
    body = out.strip().splitlines()[1:-1]
    assert all(line.endswith(";") for line in body), body


def test_json_format_lists_stages_queues_and_edges(tmp_pipeline):
    """--format json gives stages (kind, processes, daemon), queues (type, maxsize, writers, readers) and edges."""
    result = run_cli("graph", str(tmp_pipeline(FAN)), "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    stages = {s["name"]: s for s in data["stages"]}
    assert (stages["split"]["kind"], stages["split"]["processes"], stages["split"]["daemon"]) == ("pool", 3, False)
    assert stages["split"]["outputs"] == ["upper", "lower"]
    queues = {q["name"]: q for q in data["queues"]}
    assert queues["words"] == {"name": "words", "type": "lifo", "maxsize": 0, "writers": ["left", "right"], "readers": ["split"]}
    assert queues["upper"]["type"] == "fifo" and queues["upper"]["writers"] == ["split"]
    assert {"from": "stage:left", "to": "stage:up", "kind": "after"} in data["edges"]
    assert len([e for e in data["edges"] if e["kind"] == "output"]) == 4


def test_daemon_stage_is_labelled_and_drawn_apart():
    """A daemon stage is labelled daemon (and drawn rounded in Mermaid, dashed in dot)."""
    mer = run_cli("graph", "pipelines/daemon.yaml")
    assert mer.returncode == 0, mer.stderr
    assert '  s0("monitor<br/>producer, 1 process, daemon<br/>source: tasks:monitor")' in mer.stdout.splitlines()
    dot = run_cli("graph", "pipelines/daemon.yaml", "--format", "dot")
    assert re.search(r'^  s0 \[shape=box, style="rounded,dashed", label="monitor\\nproducer, 1 process, daemon', dot.stdout, re.MULTILINE)


def test_every_shipped_pipeline_graphs(capsys):
    """Every example pipeline graphs with exit 0, one node per stage and per queue (``cli.main`` in this
    process: the other tests here go through the real entry point)."""
    import yaml

    from runner import cli
    from tests.conftest import PIPELINES

    for path in sorted(PIPELINES.glob("*.yaml")):
        code = cli.main(["graph", str(path), "--format", "json"])
        out, err = capsys.readouterr()
        assert code == 0, (path, err)
        data = json.loads(out)
        assert [s["name"] for s in data["stages"]] == [s["name"] for s in yaml.safe_load(path.read_text())["stages"]]


def test_invalid_file_gives_located_errors(tmp_pipeline):
    """An invalid file is not graphed: the located diagnostics on stderr, exit 2, no traceback."""
    path = tmp_pipeline("version: 1\nstages:\n  - name: a\n    kind: producer\n    source: {items: [1]}\n    procesess: 2\n")
    result = run_cli("graph", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"{path}:6:5: error: stages[0].procesess: unknown key 'procesess'" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_format_is_a_usage_error():
    """--format svg is refused by the command line with exit 2."""
    result = run_cli("graph", "pipelines/lifo.yaml", "--format", "svg")
    assert result.returncode == 2
    assert "invalid choice: 'svg'" in result.stderr
