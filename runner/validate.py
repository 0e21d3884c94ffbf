"""``mprun validate``: a pipeline file checked in tiers, every problem located.

    syntax (YAML, UTF-8, duplicate keys)
      -> schema (Pydantic: unknown keys, types, choices) + unset ${VAR}
      -> topology (queues read but never written or the reverse, unknown `after` stages, dead-letter
         queues nobody reads, duplicate names, cycles)
      -> environment: every module:attribute (function, init, source.function) imported in ONE fresh
         process started with the pipeline's start method, the pipeline's folder first on sys.path;
         the files the run reads (file sources) exist (a glob matches one), the files it writes (jsonl,
         csv and lines sinks, log_file) can be created (``path_problems``; ``validate`` leaves out
         paths that came from a ``${VAR}``)

A syntax error stops the file there; the other tiers are reported together.  The environment check
runs in a child because importing user code in the main process would run it before the fork and
hide what a fresh worker would see (a module only importable from the current directory, say).

    main process --Process(start_method)--> checker child: import each module, getattr, callable?
                 <-------- Pipe: [(index, problem or None), ...] --------
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

from runner.diagnostics import Diagnostic, Marks, PathKey, render
from runner.imports import import_problems, references
from runner.paths import FILE_SINKS, file_problems


def environment_problems(data: Any, marks: Marks, base_dir: str, start_method: str) -> list[Diagnostic]:
    """Every reference of ``data`` that a fresh worker process could not import, located."""
    refs = references(data)
    found = import_problems([ref for _, ref in refs], base_dir, start_method)
    return [
        marks.error(path, problem, key=path[-2:-1] == ("kwargs",))  # a keyword argument: at its key
        for (path, _), problem in zip(refs, found, strict=True)
        if problem
    ]


def _start_method(data: Any) -> str:
    settings = data.get("settings") if isinstance(data, dict) else None
    method = settings.get("start_method") if isinstance(settings, dict) else None
    return method if method in multiprocessing.get_all_start_methods() else "forkserver"


def validate_file(path: str, overrides: list[str] | None = None) -> list[Diagnostic]:
    """Every problem of one pipeline file, in every tier that can be checked; ``[]`` when it is valid."""
    from runner.errors import PipelineInvalid
    from runner.loader import check, load_document

    try:
        data, marks = load_document(path, overrides)
    except PipelineInvalid as e:
        return list(e.diagnostics)  # type: ignore[arg-type]
    pipeline, problems = check(data, marks)
    if pipeline is not None and pipeline.tests:
        from runner.testing import case_problems

        pipeline._marks = marks
        problems += case_problems(pipeline)
    if not any(p.path == "(root)" for p in problems):
        base_dir = str(Path(path).resolve().parent)
        problems += environment_problems(data, marks, base_dir, _start_method(data))
        problems += path_problems(data, marks, base_dir, literal_only=True)
    return render(problems)


def check_pipeline_environment(pipeline: Any, log_file_option: str | None = None) -> list[str]:
    """Before a run: refuse a pipeline whose functions a fresh worker could not import, or whose files
    cannot be read or written; its references if none.

    Args:
        log_file_option: the ``--log-file`` given (it replaced ``settings.log_file``), to locate a problem at it.

    Raises:
        PipelineInvalid: one located line per problem.
    """
    from runner.errors import PipelineInvalid

    marks = pipeline._marks or Marks(pipeline.name or "<pipeline>")
    data = pipeline.model_dump(include={"stages", "tests", "settings"})
    problems = environment_problems(data, marks, pipeline.base_dir, pipeline.settings.start_method)
    problems += path_problems(data, marks, pipeline.base_dir, log_file_option=log_file_option)
    if problems:
        raise PipelineInvalid(render(problems))
    return [ref for _, ref in references(data)]


def path_problems(
    data: Any, marks: Marks, base_dir: str, *, literal_only: bool = False, log_file_option: str | None = None
) -> list[Diagnostic]:
    """The files of a document a run would read or write and cannot (``runner.paths``), located.

    ``literal_only``: leave out paths that came from a ``${VAR}`` (``validate``: the run's environment
    decides them).  ``log_file_option``: the ``--log-file`` given, which replaces ``settings.log_file``.
    """
    if not isinstance(data, dict):
        return []

    def path_at(node: Any, loc: PathKey, *keys: str) -> list[tuple[PathKey, str]]:
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        loc = (*loc, *keys)
        given = isinstance(node, str) and node and not (literal_only and loc in marks.interpolated)
        return [(loc, node)] if given else []

    log_file = path_at(data, (), "settings", "log_file")
    stages = data.get("stages")
    stages = stages if isinstance(stages, list) else []
    sinks = [p for i, s in enumerate(stages) if isinstance(s, dict) and s.get("function") in FILE_SINKS
             for p in path_at(s, ("stages", i), "kwargs", "path")]
    sources = [p for i, s in enumerate(stages) for p in path_at(s, ("stages", i), "source", "file", "path")]
    tests = data.get("tests")
    tests = tests if isinstance(tests, list) else []
    for i, case in enumerate(tests):
        cases = case.get("sources") if isinstance(case, dict) else None
        for name in cases if isinstance(cases, dict) else {}:
            sources += path_at(cases, ("tests", i, "sources"), name, "file", "path")
    if log_file_option:
        log_file = [(("--log-file",), log_file_option)]
    found = file_problems(base_dir, log_file[0] if log_file else None, sinks, sources)
    return [Diagnostic(f"--log-file {log_file_option}", None, None, "", why) if loc == ("--log-file",)
            else marks.error(loc, why) for loc, why in found]


def as_dict(problem: str, file: str) -> dict[str, Any]:
    """``{file, line, col, path, message}`` of a problem (line and col are null for a ``--set`` argument)."""
    if isinstance(problem, Diagnostic):
        return problem.as_dict()
    return {"file": file, "line": None, "col": None, "path": "", "message": str(problem)}


def _escape(text: str, *, prop: bool = False) -> str:
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(":", "%3A").replace(",", "%2C") if prop else text


def github_annotation(problem: str, file: str) -> str:
    """``::error file=F,line=L,col=C::PATH: MESSAGE``, a GitHub Actions workflow command."""
    d = as_dict(problem, file)
    where = f"file={_escape(file, prop=True)}"
    if d["line"] is not None:
        where += f",line={d['line']},col={d['col']}"
    origin = "" if d["file"] == file else f"{d['file']}: "
    text = f"{origin}{d['path']}: {d['message']}" if d["path"] else f"{origin}{d['message']}"
    return f"::error {where}::{_escape(text)}"
