"""Odd inputs to the loader: each ends in one located line and exit 2, never a traceback."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli

ODD = [
    # (file name, bytes, expected stdout after "FILE:")
    ("empty.yaml", b"", "1:1: error: (root): the file is empty; a pipeline needs at least 'stages'"),
    ("comment.yaml", b"# nothing\n", "1:1: error: (root): the file is empty; a pipeline needs at least 'stages'"),
    ("list.yaml", b"- 1\n- 2\n", "1:1: error: (root): a pipeline file must be a mapping with 'stages', not a list"),
    ("scalar.yaml", b"hello\n", "1:1: error: (root): a pipeline file must be a mapping with 'stages', not a str value"),
    ("latin1.yaml", b"version: 1\nname: caf\xe9\n", "2:10: error: (file): the file is not UTF-8: byte 0xe9 (invalid continuation byte); save it as UTF-8"),
    ("listkey.yaml", b"? [a, b]\n: 1\nstages: []\n",
     "1:3: error: (root): a mapping key must be a plain value, not a list or mapping"),
]


@pytest.mark.parametrize(("name", "content", "expected"), ODD, ids=[o[0] for o in ODD])
def test_odd_file_gets_exactly_its_located_line_and_exit_2(tmp_path, name, content, expected):
    """An odd file gets exactly its one located line (plus any schema error after it) and exit 2."""
    path = tmp_path / name
    path.write_bytes(content)
    result = run_cli("validate", str(path))
    assert result.returncode == 2
    assert result.stdout.splitlines()[0] == f"{path}:{expected}"
    assert "Traceback" not in result.stdout + result.stderr


def test_missing_file_and_directory_are_unreadable_exit_2(tmp_path):
    """A missing file and a directory are reported as unreadable, each on its line, with exit 2."""
    result = run_cli("validate", str(tmp_path / "nope.yaml"), str(tmp_path))
    assert result.returncode == 2
    assert result.stdout.splitlines() == [
        f"{tmp_path / 'nope.yaml'}:1:1: error: (file): cannot read the file: No such file or directory",
        f"{tmp_path}:1:1: error: (file): cannot read the file: Is a directory",
    ]


def test_run_reports_all_problems_on_stderr(tmp_path):
    """``mprun run`` of an invalid file prints every problem, sorted, to stderr and exits 2 before running."""
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nstages:\n  - name: a\n    kind: producer\n    source: {items: [1]}\n"
                    "    output: q\n    procesess: 2\n  - {name: b, kind: consumr, input: q, function: print}\n")
    result = run_cli(str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{path}:7:5: error: stages[0].procesess: unknown key 'procesess'; did you mean 'processes'?",
        (f"{path}:8:21: error: stages[1].kind: unknown kind 'consumr'; expected one of producer, consumer, pool; "
        "did you mean 'consumer'?"),
    ]
    assert result.stdout == ""


def test_schema_and_topology_problems_together(tmp_path):
    """A schema error that does not touch the topology's keys is reported along with topology problems."""
    path = tmp_path / "p.yaml"
    path.write_text("stages:\n  - {name: a, kind: producer, source: {items: [1]}, output: q, processes: 0}\n"
                    "  - {name: b, kind: consumer, input: r, function: print}\n")
    result = run_cli("validate", str(path))
    assert result.returncode == 2
    assert result.stdout.splitlines() == [
        f"{path}:2:61: error: stages[0].output: queue 'q' is written but no stage reads it",
        f"{path}:2:75: error: stages[0].processes: Input should be greater than or equal to 1, got 0",
        f"{path}:3:38: error: stages[1].input: queue 'r' has readers but no stage writes to it",
    ]


def test_topology_skipped_when_its_keys_are_invalid(tmp_path):
    """When a structural key (here a stage's kind) is invalid, no guessed topology problem is added."""
    path = tmp_path / "p.yaml"
    path.write_text("stages:\n  - {name: a, kind: producr, source: {items: [1]}, output: q}\n"
                    "  - {name: b, kind: consumer, input: q, function: print}\n")
    result = run_cli("validate", str(path))
    assert result.returncode == 2
    assert len(result.stdout.splitlines()) == 1
    assert "unknown kind 'producr'" in result.stdout
