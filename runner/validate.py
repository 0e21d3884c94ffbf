"""``mprun validate``: a pipeline file checked in tiers, every problem located.

    syntax (YAML, UTF-8, duplicate keys)
      -> schema (Pydantic: unknown keys, types, choices) + unset ${VAR}
      -> topology (queues read but never written or the reverse, unknown `after` stages, dead-letter
         queues nobody reads, duplicate names, cycles)
      -> environment: every module:attribute (function, init, source.function) imported in ONE fresh
         process started with the pipeline's start method, the pipeline's folder first on sys.path

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

from runner.diagnostics import Diagnostic, Marks, render
from runner.imports import import_problems, references


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
        problems += environment_problems(data, marks, str(Path(path).resolve().parent), _start_method(data))
    return render(problems)


def check_pipeline_environment(pipeline: Any) -> list[str]:
    """Before a run: refuse a pipeline whose functions a fresh worker could not import; its references if none.

    Raises:
        PipelineInvalid: one located line per reference that cannot be imported.
    """
    from runner.errors import PipelineInvalid

    marks = pipeline._marks or Marks(pipeline.name or "<pipeline>")
    data = pipeline.model_dump(include={"stages", "tests"})
    problems = environment_problems(data, marks, pipeline.base_dir, pipeline.settings.start_method)
    if problems:
        raise PipelineInvalid(render(problems))
    return [ref for _, ref in references(data)]


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
