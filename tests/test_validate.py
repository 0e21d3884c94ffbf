"""``mprun validate`` through the real entry point: the broken-file corpus, the tiers, the output formats.

Each file in ``tests/broken/`` starts with one ``# expect: LINE:COL TEXT`` comment per problem it holds;
``mprun validate`` must exit 2 and print, for that file, exactly those problems: each at that line and
column, its text containing TEXT.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

BROKEN = sorted((ROOT / "tests" / "broken").glob("*.yaml"))
FORK = "settings: {start_method: fork}\n"


def expectations(path: Path) -> list[tuple[int, int, str]]:
    """The ``# expect: LINE:COL TEXT`` lines at the top of a corpus file."""
    found = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        match = re.fullmatch(r"# expect: (\d+):(\d+) (.+)", line)
        if match is None:
            break
        found.append((int(match[1]), int(match[2]), match[3]))
    return found


@pytest.fixture(scope="module")
def corpus_output() -> dict[str, list[str]]:
    """One ``mprun validate`` over the whole corpus (text format): the error lines of each file."""
    result = run_cli("validate", *(str(p.relative_to(ROOT)) for p in BROKEN), timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    by_file: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        by_file.setdefault(line.split(":", 1)[0], []).append(line)
    return by_file


def test_corpus_is_large_and_annotated():
    """The corpus holds at least 30 broken files and every one says what it expects."""
    assert len(BROKEN) >= 30
    assert all(expectations(p) for p in BROKEN), [p.name for p in BROKEN if not expectations(p)]


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.stem)
def test_broken_file_reports_exactly_its_problems(path, corpus_output):
    """Every expected problem is reported at its exact line:col with its message, and nothing else is."""
    name = str(path.relative_to(ROOT))
    lines = corpus_output.get(name, [])
    expected = expectations(path)
    assert len(lines) == len(expected), "\n".join(lines)
    for (line, col, text), got in zip(sorted(expected), lines, strict=True):
        assert got.startswith(f"{name}:{line}:{col}: error: "), got
        assert text in got, got


def test_broken_file_alone_exits_2_with_its_lines():
    """A single broken file on its own: exit 2, its located lines on stdout, no ``ok`` line."""
    result = run_cli("validate", "tests/broken/unknown_key_stage.yaml")
    assert result.returncode == 2
    assert result.stdout == (
        "tests/broken/unknown_key_stage.yaml:10:5: error: stages[1].procesess: "
        "unknown key 'procesess'; did you mean 'processes'?\n"
    )


def test_every_shipped_pipeline_validates():
    """``mprun validate pipelines/*.yaml`` prints ``ok FILE`` for each and exits 0."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "pipelines").glob("*.yaml"))
    result = run_cli("validate", *files, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [f"ok {f}" for f in files]


def test_good_and_bad_files_together(tmp_pipeline):
    """Good files still get ``ok`` when another file is bad; the exit code is 2."""
    good = tmp_pipeline(FORK + "stages:\n  - {name: n, kind: producer, source: {items: [1]}, output: q}\n"
                        "  - {name: s, kind: consumer, input: q, function: print}\n", name="good.yaml")
    result = run_cli("validate", str(good), "tests/broken/cycle.yaml")
    assert result.returncode == 2
    assert result.stdout.splitlines()[0] == f"ok {good}"
    assert "tests/broken/cycle.yaml:11:12: error:" in result.stdout


def test_json_format_is_one_document_of_located_errors():
    """``--format json`` prints a list of {file, ok, errors: [{line, col, path, message}]} and nothing else."""
    result = run_cli("validate", "--format", "json", "pipelines/doubler.yaml", "tests/broken/reader_without_writer.yaml")
    assert result.returncode == 2
    report = json.loads(result.stdout)
    assert report[0] == {"file": "pipelines/doubler.yaml", "ok": True, "errors": []}
    assert report[1]["file"] == "tests/broken/reader_without_writer.yaml" and report[1]["ok"] is False
    assert [(e["line"], e["col"], e["path"]) for e in report[1]["errors"]] == [
        (5, 67, "stages[0].output"),
        (8, 12, "stages[1].input"),
    ]
    assert report[1]["errors"][1]["message"] == "queue 'numbrs' has readers but no stage writes to it"


def test_github_format_is_one_annotation_per_problem():
    """``--format github`` prints one ``::error file=F,line=L,col=C::PATH: MESSAGE`` annotation per problem."""
    result = run_cli("validate", "--format", "github", "tests/broken/unknown_key_stage.yaml")
    assert result.returncode == 2
    assert result.stdout == (
        "::error file=tests/broken/unknown_key_stage.yaml,line=10,col=5::stages[1].procesess: "
        "unknown key 'procesess'; did you mean 'processes'?\n"
    )


def test_import_check_uses_the_pipeline_folder_and_rejects_missing_attributes(tmp_pipeline):
    """A tasks module beside the file is found (the check runs with that folder first on sys.path); a
    misspelt function in it is reported at its line, with the closest name."""
    body = FORK + ("stages:\n  - {name: n, kind: producer, source: {items: [1]}, output: q}\n"
                   "  - name: s\n    kind: consumer\n    input: q\n    function: tasks_t:{fn}\n")
    tasks = "def triple(x):\n    return 3 * x\n"
    good = tmp_pipeline(body.replace("{fn}", "triple"), tasks=tasks, name="good.yaml")
    bad = tmp_pipeline(body.replace("{fn}", "tripel"), name="bad.yaml")
    result = run_cli("validate", str(good), str(bad), cwd=Path("/"))
    assert result.returncode == 2
    assert result.stdout.splitlines() == [
        f"ok {good}",
        (f"{bad}:7:15: error: stages[1].function: cannot import 'tasks_t:tripel': "
        "'tasks_t' has no attribute 'tripel'; did you mean 'triple'?"),
    ]


def test_import_check_output_of_user_code_stays_off_stdout(tmp_pipeline):
    """A tasks module that prints when imported does not corrupt ``--format json`` on stdout."""
    path = tmp_pipeline(FORK + "stages:\n  - {name: n, kind: producer, source: {function: tasks_t:gen}, output: q}\n"
                        "  - {name: s, kind: consumer, input: q, function: print}\n",
                        tasks="print('hello from import')\ndef gen():\n    yield 1\n")
    result = run_cli("validate", "--format", "json", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout) == [{"file": str(path), "ok": True, "errors": []}]
    assert "hello from import" in result.stderr


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_run_refuses_a_missing_module_before_starting(tmp_pipeline, tmp_path, method):
    """``mprun run`` exits 2 with the located import error, and no stage ran (its producer's file is absent)."""
    path = tmp_pipeline(
        f"settings: {{start_method: {method}}}\nstages:\n"
        "  - {name: n, kind: producer, source: {items: [1]}, output: q}\n"
        "  - {name: w, kind: consumer, input: q, function: jsonl, kwargs: {path: out.jsonl}, output: r}\n"
        "  - {name: s, kind: consumer, input: r, function: no_such_module_x:f}\n")
    result = run_cli(str(path), "--no-summary")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"{path}:5:51: error: stages[2].function: cannot import 'no_such_module_x:f': "
        "no module named 'no_such_module_x' beside the pipeline file or on sys.path"
    )
    assert not (tmp_path / "out.jsonl").exists()


KWARGS_PIPELINE = """\
settings: {start_method: fork}
stages:
  - name: numbers
    kind: producer
    source: {function: tasks_t:numbers}
    kwargs: {cuont: 3}
    output: q
  - name: score
    kind: consumer
    input: q
    function: tasks_t:score
    kwargs: {fail_rat: 0.1, x: 1, scale: 2}
    output: r
  - name: sink
    kind: consumer
    input: r
    function: tasks_t:sink
    kwargs: {anything: 1}
"""
KWARGS_TASKS = """\
def numbers(count=3):
    return range(count)


def score(x, fail_rate=0.0, *, scale=1):
    return x * scale


def sink(item, **options):
    pass
"""


def test_kwargs_are_checked_against_the_signature(tmp_pipeline):
    """`validate` (and `run`, before any stage starts) reports keyword arguments the function does not take, at
    their key, with did-you-mean; the item's own parameter is refused too; a function with **kwargs takes any."""
    path = tmp_pipeline(KWARGS_PIPELINE, KWARGS_TASKS)
    expected = [
        (f"{path}:6:14: error: stages[0].kwargs.cuont: unknown keyword argument 'cuont' for tasks_t:numbers; "
         "did you mean 'count'?"),
        (f"{path}:12:14: error: stages[1].kwargs.fail_rat: unknown keyword argument 'fail_rat' for tasks_t:score; "
         "did you mean 'fail_rate'?"),
        (f"{path}:12:29: error: stages[1].kwargs.x: tasks_t:score gets the item as 'x': a keyword argument of that "
         "name would be a second value for it"),
    ]
    result = run_cli("validate", str(path))
    assert (result.returncode, result.stdout.splitlines()) == (2, expected)
    ran = run_cli(str(path))
    assert (ran.returncode, ran.stderr.splitlines()) == (2, expected)
    fixed = tmp_pipeline(KWARGS_PIPELINE.replace("cuont", "count").replace("fail_rat: 0.1, x: 1", "fail_rate: 0.1"),
                         name="fixed.yaml")
    assert run_cli("validate", str(fixed)).returncode == 0
