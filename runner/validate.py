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

import importlib
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any

from runner.diagnostics import Diagnostic, Marks, PathKey, render, suggest

CHECK_TIMEOUT = 60.0  # seconds the checker child gets to import everything


def references(data: Any) -> list[tuple[PathKey, str]]:
    """Every ``module:attribute`` of a document (functions, inits, source functions, test sources)."""
    found: list[tuple[PathKey, str]] = []

    def add(path: PathKey, value: Any) -> None:
        if isinstance(value, str) and ":" in value:
            found.append((path, value))

    def source(path: PathKey, value: Any) -> None:
        if isinstance(value, dict):
            add((*path, "function"), value.get("function"))

    if not isinstance(data, dict):
        return found
    stages = data.get("stages")
    for i, stage in enumerate(stages if isinstance(stages, list) else []):
        if isinstance(stage, dict):
            add(("stages", i, "function"), stage.get("function"))
            add(("stages", i, "init"), stage.get("init"))
            source(("stages", i, "source"), stage.get("source"))
    tests = data.get("tests")
    for i, case in enumerate(tests if isinstance(tests, list) else []):
        sources = case.get("sources") if isinstance(case, dict) else None
        for name, spec in (sources if isinstance(sources, dict) else {}).items():
            source(("tests", i, "sources", name), spec)
    return found


def check_reference(ref: str) -> str | None:
    """Import ``module:attribute`` here and say what is wrong with it, or ``None``.  Runs in the child."""
    module_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            return f"cannot import {ref!r}: no module named {e.name!r} beside the pipeline file or on sys.path"
        return f"cannot import {ref!r}: importing {module_name!r} failed: {type(e).__name__}: {e}"
    except BaseException as e:  # noqa: BLE001 - any failure while running user code at import is the finding
        return f"cannot import {ref!r}: importing {module_name!r} failed: {type(e).__name__}: {e}"
    where = module_name
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            return f"cannot import {ref!r}: {where!r} has no attribute {part!r}" + suggest(part, names)
        obj = getattr(obj, part)
        where = f"{where}.{part}"
    if not callable(obj):
        return f"{ref!r} is not callable: it is a value of type {type(obj).__name__}"
    qualname = str(getattr(obj, "__qualname__", ""))
    if "<lambda>" in qualname:
        return f"{ref!r} is a lambda: define it with def at module level so every process can import it by name"
    if "<locals>" in qualname:
        return f"{ref!r} is defined inside another function ({qualname}): define it at module level"
    return None


def _checker(conn: Any, base_dir: str, refs: list[str]) -> None:
    """Child side: output of imported user code goes to stderr, never into a report on stdout."""
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    sys.path.insert(0, base_dir)
    conn.send([check_reference(ref) for ref in refs])
    conn.close()


def import_problems(refs: list[str], base_dir: str, start_method: str) -> list[str | None]:
    """Check ``refs`` in one fresh process; one problem (or ``None``) per reference.

    If the child dies or hangs while importing, every reference gets that as its problem.
    """
    if not refs:
        return []
    ctx = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        # The same preload as the supervisor's: the server started here is the one the run then reuses.
        ctx.set_forkserver_preload(["runner.worker"])
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_checker, args=(writer, base_dir, refs), name="mprun-import-check", daemon=True)
    child.start()
    writer.close()
    try:
        if reader.poll(CHECK_TIMEOUT):
            try:
                return list(reader.recv())
            except EOFError:
                pass
        else:
            child.terminate()
            return [f"cannot import {refs[0]!r}: importing did not finish within {CHECK_TIMEOUT:.0f}s"] + [None] * (len(refs) - 1)
    finally:
        child.join(CHECK_TIMEOUT)
        if child.is_alive():
            child.kill()
            child.join()
        reader.close()
    message = f"importing the functions of this file ended the checking process (exit code {child.exitcode})"
    return [f"cannot import {refs[0]!r}: {message}"] + [None] * (len(refs) - 1)


def environment_problems(data: Any, marks: Marks, base_dir: str, start_method: str) -> list[Diagnostic]:
    """Every reference of ``data`` that a fresh worker process could not import, located."""
    refs = references(data)
    found = import_problems([ref for _, ref in refs], base_dir, start_method)
    return [marks.error(path, problem) for (path, _), problem in zip(refs, found, strict=True) if problem]


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
    _, problems = check(data, marks)
    if not any(p.path == "(root)" for p in problems):
        problems += environment_problems(data, marks, str(Path(path).resolve().parent), _start_method(data))
    return render(problems)


def check_pipeline_environment(pipeline: Any) -> None:
    """Before a run: refuse a pipeline whose functions a fresh worker could not import.

    Raises:
        PipelineInvalid: one located line per reference that cannot be imported.
    """
    from runner.errors import PipelineInvalid

    marks = pipeline._marks or Marks(pipeline.name or "<pipeline>")
    data = pipeline.model_dump(include={"stages", "tests"})
    problems = environment_problems(data, marks, pipeline.base_dir, pipeline.settings.start_method)
    if problems:
        raise PipelineInvalid(render(problems))


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
