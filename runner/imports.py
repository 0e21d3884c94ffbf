"""Whether every ``module:attribute`` of a pipeline imports in a fresh worker process.

Kept free of pydantic and the schemas: the checker child imports only this module (the forkserver has
it preloaded with ``runner.worker``), and ``prefetch`` lets ``mprun run`` start the check on the raw
YAML while the main process is still importing pydantic and validating the file.

    main process --Process(start_method)--> checker child: import each module, getattr, callable?
                 <-------- Pipe: [problem or None, ...], whether they imported structlog --------

Whether the functions' modules import structlog is kept for ``runner.cache``: the next run's forkserver
preloads it then (``cli._warm_up``), and not otherwise, since importing it costs ~30 ms (asyncio).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import multiprocessing
import os
import sys
import threading
from typing import Any

from runner.topology import FORKSERVER_PRELOAD

PathKey = tuple[str | int, ...]

CHECK_TIMEOUT = 60.0  # seconds the checker child gets to import everything


# A keyword argument of a call is checked as the reference "module:attr?item-kwarg=KEY" (a stage function,
# called with the item first, or a class, made with the kwargs) or "module:attr?kwarg=KEY" (a source
# function, called with kwargs only).  A stage's function is "module:attr?stage" (a class must make callable
# instances), and the routes a mapping `output` declares are "module:attr?routes=A,B" (the names the
# function's source sends items to must be among them).
ITEM_KWARG, KWARG, STAGE, ROUTES = "?item-kwarg=", "?kwarg=", "?stage", "?routes="


def references(data: Any) -> list[tuple[PathKey, str]]:
    """Every ``module:attribute`` of a document (functions, inits, source functions, test sources), and every
    keyword argument of ``kwargs`` as ``module:attr?kwarg=KEY`` (checked against the function's signature)."""
    found: list[tuple[PathKey, str]] = []

    def add(path: PathKey, value: Any) -> None:
        if isinstance(value, str) and ":" in value:
            found.append((path, value))

    def source(path: PathKey, value: Any) -> None:
        if isinstance(value, dict):
            add((*path, "function"), value.get("function"))

    def keywords(path: PathKey, ref: Any, kwargs: Any, call: str) -> None:
        if isinstance(ref, str) and ":" in ref and isinstance(kwargs, dict):
            found.extend(((*path, "kwargs", key), f"{ref}{call}{key}") for key in kwargs if isinstance(key, str))

    if not isinstance(data, dict):
        return found
    stages = data.get("stages")
    for i, stage in enumerate(stages if isinstance(stages, list) else []):
        if isinstance(stage, dict):
            function, output = stage.get("function"), stage.get("output")
            add(("stages", i, "function"), f"{function}{STAGE}" if isinstance(function, str) else function)
            if isinstance(function, str) and isinstance(output, dict) and all(isinstance(k, str) for k in output):
                add(("stages", i, "output"), f"{function}{ROUTES}{','.join(output)}")
            add(("stages", i, "init"), stage.get("init"))
            source(("stages", i, "source"), stage.get("source"))
            src = stage.get("source")
            keywords(("stages", i), stage.get("function"), stage.get("kwargs"), ITEM_KWARG)
            keywords(("stages", i), src.get("function") if isinstance(src, dict) else None, stage.get("kwargs"), KWARG)
    tests = data.get("tests")
    for i, case in enumerate(tests if isinstance(tests, list) else []):
        sources = case.get("sources") if isinstance(case, dict) else None
        for name, spec in (sources if isinstance(sources, dict) else {}).items():
            source(("tests", i, "sources", name), spec)
    return found


def suggest(word: str, choices: list[str]) -> str:
    """``; did you mean 'x'?`` when a choice is close to ``word``, else ``""``."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_reference(ref: str) -> str | None:
    """Import ``module:attribute`` here and say what is wrong with it, or ``None``.  Runs in the child."""
    for call in (ITEM_KWARG, KWARG):
        if call in ref:
            target, _, key = ref.partition(call)
            return None if check_reference(target) else _keyword_problem(target, key, item=call == ITEM_KWARG)
    if ref.endswith(STAGE):
        target = ref.removesuffix(STAGE)
        return check_reference(target) or _class_problem(target, _attribute(target))
    if ROUTES in ref:
        target, _, declared = ref.partition(ROUTES)
        return None if check_reference(target) else _route_problem(target, _attribute(target), declared.split(","))
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


def _attribute(ref: str) -> Any:
    """The object ``module:attribute`` names (imported already by ``check_reference``)."""
    module_name, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _class_problem(ref: str, obj: Any) -> str | None:
    """What keeps the class ``obj`` from being a stage function: instances that cannot be called, a ``close``
    that is not a method."""
    if not isinstance(obj, type):
        return None
    if not any("__call__" in vars(k) for k in obj.__mro__ if k is not object):
        return (f"{ref} is a class without __call__: the stage calls one instance per process with each item, "
                "so define __call__(self, item)")
    close = getattr(obj, "close", None)
    if close is not None and not callable(close):
        return (f"{ref}.close must be a method (close() is called once in each process when the input ends), "
                f"not a value of type {type(close).__name__}")
    return None


def routes_used(obj: Any) -> list[tuple[str, str, int]]:
    """``(route, file, line)`` for each ``route("NAME", ...)`` / ``runner.route("NAME", ...)`` call in the
    source of the function or class ``obj`` whose first argument is a string literal."""
    import ast
    import inspect
    import textwrap

    if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismethod(obj)):
        return []
    try:
        lines, start = inspect.getsourcelines(obj)
        tree = ast.parse(textwrap.dedent("".join(lines)))
        file = inspect.getsourcefile(obj) or "?"
    except (OSError, TypeError, SyntaxError):
        return []  # no source to read (a C function, a class made at run time): nothing seen, nothing said
    module = sys.modules.get(getattr(obj, "__module__", ""), None)
    names = vars(module) if module is not None else {}

    def is_route(func: ast.expr) -> bool:
        if isinstance(func, ast.Name) and func.id == "route":
            found = names.get("route")  # not a global: imported inside the function
            return found is None or str(getattr(found, "__module__", "")).split(".")[0] in ("runner", "mprun")
        if isinstance(func, ast.Attribute) and func.attr == "route" and isinstance(func.value, ast.Name):
            found = names.get(func.value.id)
            if found is None:
                return func.value.id in ("runner", "mprun")
            return str(getattr(found, "__name__", "")).split(".")[0] in ("runner", "mprun")
        return False

    shown = os.path.relpath(file, sys.path[0]) if sys.path and file.startswith(sys.path[0] + os.sep) else file
    return [
        (node.args[0].value, shown, start + node.lineno - 1)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and is_route(node.func) and node.args
        and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
    ]


def _route_problem(ref: str, obj: Any, declared: list[str]) -> str | None:
    """A route that ``ref`` sends items to (as its source shows) and the stage's ``output`` does not declare."""
    for name, file, line in sorted(routes_used(obj), key=lambda r: r[2]):
        if name not in declared:
            return (f"{ref} sends items to route {name!r} ({file}:{line}), which output does not declare; "
                    f"its routes: {', '.join(declared)}" + suggest(name, declared))
    return None


def _keyword_problem(ref: str, key: str, *, item: bool) -> str | None:
    """Whether ``ref`` (imported already) accepts the keyword argument ``key``; the problem if not.

    A class gets its kwargs when it is made: they are checked against ``Class.__init__`` (no item there).
    """
    import inspect

    fn = _attribute(ref)
    item = item and not isinstance(fn, type)
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature to check (a builtin written in C)
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    if item and inspect.isclass(fn):  # a class stage: kwargs go to the constructor, the item to the instance
        item = False
    if item and params and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        if params[0].name == key:
            return f"{ref} gets the item as {key!r}: a keyword argument of that name would be a second value for it"
        params = params[1:]
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if key in names:
        return None
    takes = f"; it takes {', '.join(names)}" if names else "; it takes none"
    return f"unknown keyword argument {key!r} for {ref}" + (suggest(key, names) or takes)


def _checker(conn: Any, base_dir: str, refs: list[str], parent_pid: int) -> None:
    """Child side: output of imported user code goes to stderr, never into a report on stdout."""
    from runner.worker import _watch_parent

    # A module that hangs while importing must not outlive the mprun that asked.
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    sys.path.insert(0, base_dir)
    problems = [check_reference(ref) for ref in refs]
    # nobody may wait for the answer any more (the file turned out invalid): nothing to say then
    with contextlib.suppress(OSError):
        conn.send((problems, "structlog" in sys.modules))
    conn.close()


_structlog_used: dict[tuple[str, ...], bool] = {}


def imports_structlog(refs: list[str]) -> bool:
    """Whether importing ``refs`` imported structlog, as the last check of exactly these found (else True)."""
    return bool(refs) and _structlog_used.get(tuple(refs), True)


_prefetched: dict[tuple[tuple[str, ...], str, str], tuple[threading.Event, list[Any]]] = {}


def prefetch(refs: list[str], base_dir: str, start_method: str) -> None:
    """Start checking ``refs`` in a background thread; ``import_problems`` with the same arguments waits for it."""
    done = threading.Event()
    box: list[Any] = []

    def check() -> None:
        try:
            box.append(_import_problems(refs, base_dir, start_method))
        finally:
            done.set()

    _prefetched[(tuple(refs), base_dir, start_method)] = (done, box)  # before the thread starts: no race
    threading.Thread(target=check, name="import-check", daemon=True).start()


def import_problems(refs: list[str], base_dir: str, start_method: str) -> list[str | None]:
    """Check ``refs`` in one fresh process; one problem (or ``None``) per reference.

    If the child dies or hangs while importing, every reference gets that as its problem.
    """
    early = _prefetched.pop((tuple(refs), base_dir, start_method), None)
    if early is not None:
        early[0].wait()
        if early[1]:
            return list(early[1][0])
    return _import_problems(refs, base_dir, start_method)


def ray_connected() -> bool:
    """Whether this process is connected to Ray: a ``fork`` of it copies the state of Ray's running gRPC
    threads, after which Ray's own requests can be lost and wait for ever."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())


def _import_problems(refs: list[str], base_dir: str, start_method: str) -> list[str | None]:
    if not refs:
        return []
    if start_method == "fork" and ray_connected():
        start_method = "forkserver"  # the check only needs a process that imports them afresh
    ctx: Any = multiprocessing.get_context(start_method)  # typeshed: a BaseContext has no Process
    if start_method == "forkserver":
        # The same preload as the supervisor's: the server started here is the one the run then reuses.
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(
        target=_checker, args=(writer, base_dir, refs, os.getpid()), name="mprun-import-check", daemon=True
    )
    child.start()
    writer.close()
    try:
        if reader.poll(CHECK_TIMEOUT):
            try:
                problems, _structlog_used[tuple(refs)] = reader.recv()
                return list(problems)
            except EOFError:
                pass
        else:
            child.terminate()
            late = f"cannot import {refs[0]!r}: importing did not finish within {CHECK_TIMEOUT:.0f}s"
            return [late] + [None] * (len(refs) - 1)
    finally:
        child.join(CHECK_TIMEOUT)
        if child.is_alive():
            child.kill()
            child.join()
        reader.close()
    message = f"importing the functions of this file ended the checking process (exit code {child.exitcode})"
    return [f"cannot import {refs[0]!r}: {message}"] + [None] * (len(refs) - 1)


