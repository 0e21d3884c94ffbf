"""The ``mprun`` command line; the only place an error becomes an exit code.

Exit codes: 0 success, 1 the run failed, 2 invalid pipeline or usage, 130 SIGINT, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from runner.errors import MprunError, PipelineInvalid

COMMANDS = ("run", "validate", "schema", "test", "graph", "new")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mprun",
        description="Run a YAML pipeline of producers, consumers, pools and queues on multiprocessing.",
        epilog="`mprun FILE` is short for `mprun run FILE`.",
    )
    parser.add_argument("--version", action=_Version, help="print mprun's version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run a pipeline")
    run.add_argument("file", metavar="FILE")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                     help="override a value of the file (VALUE parsed as YAML); repeatable")
    run.add_argument("--start-method", choices=["fork", "spawn", "forkserver"], help="how processes are started")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", choices=["console", "json"])
    run.add_argument("--log-file", metavar="PATH", help="also write every record there as JSON lines")
    run.add_argument("--limit", type=_positive, metavar="N", help="each producer emits at most N items")
    run.add_argument("--no-summary", action="store_true", help="do not print the per-stage summary")
    run.add_argument("--metrics-json", metavar="PATH",
                     help="write per-stage counts, busy time, latency percentiles, queue high-water marks and "
                     "per-process exit codes and restarts there as JSON (schema: runner/metrics.py)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="live per-stage counts, rates, errors and queue depths on stderr "
                     "(default: on when stderr is a terminal)")
    run.add_argument("--backend", choices=["local", "ray"],
                     help="local: multiprocessing on this machine; ray: Ray actors (pip install 'mprun[ray]')")
    run.add_argument("--ray-address", metavar="ADDR",
                     help="with --backend ray: the Ray cluster to run on (default: RAY_ADDRESS, else a local instance)")
    run.add_argument("--inline", action="store_true",
                     help="run every stage in this process, one after another, so breakpoint() and pdb work")
    validate = sub.add_parser("validate", help="check pipeline files without running them")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.add_argument("--format", choices=["text", "json", "github"], default="text",
                          help="text: one line per problem; json: a list of {file, ok, errors}; "
                          "github: ::error annotations for GitHub Actions")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                          help="check the file as `mprun run --set` would run it; repeatable")
    schema = sub.add_parser("schema", help="print the JSON Schema of the pipeline format")
    schema.add_argument("--output", metavar="PATH",
                        help="write it to PATH (folders created) instead of stdout, e.g. beside your pipelines")
    test = sub.add_parser("test", help="run the tests: cases of pipeline files")
    test.add_argument("files", nargs="+", metavar="FILE")
    test.add_argument("--format", choices=["text", "json"], default="text",
                      help="text: a line per case; json: one document {passed, failed, cases, invalid, no_cases}")
    test.add_argument("--junit-xml", metavar="PATH", help="also write the results there as JUnit XML (for CI)")
    graph = sub.add_parser("graph", help="print the topology of a pipeline (Mermaid, dot or JSON)")
    graph.add_argument("file", metavar="FILE")
    graph.add_argument("--format", choices=["mermaid", "dot", "json"], default="mermaid")
    new = sub.add_parser("new", help="write pipelines/NAME.yaml and NAME.py, ready to run and test")
    new.add_argument("name", metavar="NAME")
    new.add_argument("--dir", default="pipelines", metavar="DIR", help="folder to write to (default: pipelines)")
    return parser


class _Version(argparse.Action):
    """``--version``: ``mprun VERSION (Python X.Y.Z)``, read from the installed package only when asked."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> NoReturn:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("mprun")
        except PackageNotFoundError:
            number = "unknown (not installed)"
        sys.stdout.write(f"mprun {number} (Python {sys.version.split()[0]})\n")
        parser.exit()


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"expected a whole number >= 1, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def console() -> NoReturn:
    """The ``mprun`` command itself: ``main()``, then, after a run, an exit without the interpreter's teardown.

    Tearing down a process that ran a pipeline takes ~35 ms (every object and module freed one by one) and
    frees nothing the system would not. So the last exit handler, registered here first so it runs after
    all the others (logging's flush and close, multiprocessing's finalizers that join children and queue
    threads), flushes stdout and stderr and ends the process. Only ``run`` (not ``--inline``), ``validate``
    and ``test``, which keep user code out of this process, leave this way, and not after using Ray.
    """
    import atexit

    atexit.register(_leave_quickly)
    for signum in (signal.SIGINT, signal.SIGTERM):  # until a run installs its own handlers (and after it)
        signal.signal(signum, _interrupted)
    sys.exit(main())


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside a run (while the file is read, the forkserver starts...): ends the command like Ctrl-C."""


def _interrupted(signum: int, frame: Any) -> None:
    """SIGINT or SIGTERM outside a run (while the file is read, the forkserver starts, between the cases of
    ``mprun test``...): the command ends here, with 130 or 143 and one line, and so do the processes it
    started. Not with an exception: a signal can land anywhere, and an exception raised inside Python's
    import machinery, a fork hook or a weakref callback is swallowed (the signal lost) or leaves a lock held
    (the next import, or log record, of another thread then waits for ever). A Ray driver is left to shut
    down the usual way: there it is an exception (``_Terminated`` for SIGTERM)."""
    if "ray" in sys.modules:
        raise _Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    name, code = ("SIGTERM", 143) if signum == signal.SIGTERM else ("SIGINT", 130)
    with contextlib.suppress(Exception):  # what was printed so far is kept (a flush the signal cut short cannot)
        sys.stdout.flush()
    with contextlib.suppress(OSError):
        os.write(2, f"mprun: error: stopped by {name}\n".encode())
    # No import here: the signal may have come in the middle of one. A forkserver and tracker started here
    # were started by runner.zygote (else there is none); they end with this process anyway, stop waits.
    zygote = sys.modules.get("runner.zygote")
    with contextlib.suppress(Exception):  # runner.zygote or multiprocessing only partly imported
        zygote.stop()  # type: ignore[union-attr]
    os._exit(code)


def _leave_quickly() -> None:
    if _QUICK_EXIT is None:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    from runner import zygote

    zygote.stop()
    os._exit(_QUICK_EXIT)


_QUICK_EXIT: int | None = None  # the exit code, once a command has ended that allows the quick exit


def _quick(code: int) -> int:
    """A command that ran no user code in this process ends with ``code``: ``console`` may leave quickly."""
    global _QUICK_EXIT
    if "ray" not in sys.modules:  # a Ray driver is left to shut down the usual way
        _QUICK_EXIT = code
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mprun`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in COMMANDS and not args[0].startswith("-"):
        args.insert(0, "run")
    try:  # from the start: a signal while the command line is parsed ends the command as cleanly
        parser = _parser()
        ns = parser.parse_args(args)
        if ns.command == "run":
            return _run(ns)
        if ns.command == "validate":
            _start_forkserver_for(ns.files, ns.overrides)
            return _quick(_validate(ns))
        if ns.command == "schema":
            from runner.schema import write_schema

            write_schema(ns.output)
            return 0
        if ns.command == "test":
            from functools import partial

            from runner.testing import run_tests

            start = partial(_start_forkserver_for, ns.files, [])  # run_tests starts it once stdout is captured
            return _quick(run_tests(ns.files, fmt=ns.format, junit_xml=ns.junit_xml, start=start))
        if ns.command == "graph":
            return _graph(ns)
        if ns.command == "new":
            return _new(ns)
        parser.print_help(sys.stderr)
        return 2
    except PipelineInvalid as e:
        for line in e.diagnostics:
            print(line, file=sys.stderr)
        return e.exit_code
    except MprunError as e:
        print(f"mprun: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        name, code = ("SIGTERM", 143) if isinstance(e, _Terminated) else ("SIGINT", 130)
        print(f"mprun: error: stopped by {name}", file=sys.stderr)
        return _quick(code)


def _warm_up(ns: argparse.Namespace, settings: dict[str, Any]) -> None:
    """Start the forkserver, then the import check, while this process reads the file's plan (or validates it).

    Only a head start, so it comes first: the start method is read from the command line or guessed from
    the file's text; the forkserver is forked from this process (``runner.zygote``) while it has one
    thread; the functions to check come from the file's plan in ``runner.cache`` (else from its YAML, in a
    thread), and the check's result is used only if the run's plan names the same functions.
    """
    from runner.limits import MAX_BYTES

    try:
        if Path(ns.file).stat().st_size > MAX_BYTES:
            return  # refused at its line by the loader
        text = Path(ns.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return
    method = _guess_start_method(text, ns.start_method, ns.overrides)
    if method != "forkserver" or ns.inline or ns.backend == "ray":
        return
    import threading

    from runner import cache
    from runner.imports import prefetch, references
    from runner.topology import FORKSERVER_PRELOAD

    hit = cache.load(cache.key(ns.file, ns.overrides, ns.limit, settings))  # memoized: the run reads it for free
    # structlog (~30 ms) only if the stage code imported it when this plan was checked; not on a first run;
    # runner.calls (asyncio, ~80 ms per worker otherwise) when a stage of the plan makes concurrent calls.
    preload = [m for m in FORKSERVER_PRELOAD if m != "structlog" or (hit is not None and hit[2])]
    if hit is not None and any(s.concurrency > 1 for s in hit[0].stages):
        preload.append("runner.calls")
    _start_forkserver(preload)
    if hit is not None:
        topology, refs, _ = hit
        prefetch(refs, topology.base_dir, topology.start_method)
        return

    def start() -> None:
        import yaml

        from runner.safeyaml import BoundedLoader

        try:
            data = yaml.load(text, Loader=BoundedLoader)
        except yaml.YAMLError:  # reported, located, by the loader
            return
        prefetch([ref for _, ref in references(data)], str(Path(ns.file).resolve().parent), method)

    threading.Thread(target=start, name="warm-up", daemon=True).start()


def _start_forkserver(preload: list[str]) -> None:
    """Start the forkserver now, forked from this process while it has one thread (``runner.zygote``)."""
    import multiprocessing
    from multiprocessing import forkserver

    import runner.worker  # noqa: F401 - needed here too; imported before the fork, the server has it
    from runner import zygote

    multiprocessing.get_context("forkserver").set_forkserver_preload(preload)
    if not zygote.start(preload):
        forkserver.ensure_running()


def _start_forkserver_for(files: list[str], overrides: list[str]) -> None:
    """``validate`` and ``test``: the forkserver first, if a file uses it (each file's import check does)."""
    from runner.limits import MAX_BYTES
    from runner.topology import FORKSERVER_PRELOAD

    for file in files:
        try:
            if Path(file).stat().st_size > MAX_BYTES:
                continue  # refused at its line by the loader
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if _guess_start_method(text, None, overrides) == "forkserver":
            _start_forkserver(FORKSERVER_PRELOAD)
            return


def _guess_start_method(text: str, start_method: str | None, overrides: list[str]) -> str:
    import re

    if start_method:
        return start_method
    for override in reversed(overrides):
        if override.startswith("settings.start_method="):
            return override.partition("=")[2].strip()
    found = re.search(r"^\s*start_method:\s*[\"']?(\w+)", text, re.MULTILINE)
    return found.group(1) if found else "forkserver"


def _run(ns: argparse.Namespace) -> int:
    settings = {"start_method": ns.start_method, "log_level": ns.log_level, "log_format": ns.log_format,
                "log_file": ns.log_file, "backend": ns.backend}
    if ns.log_level == "debug":  # why the compiled-pipeline cache was not used, if it was not (runner.cache)
        import logging

        note = logging.getLogger("mprun.cache")
        note.addHandler(logging.StreamHandler(sys.stderr))
        note.setLevel(logging.DEBUG)
    _warm_up(ns, settings)
    from runner import run_pipeline
    from runner.errors import UsageError

    if ns.inline and (ns.backend == "ray" or ns.ray_address):
        msg = "--inline runs every stage in this process: --backend ray and --ray-address do not apply"
        raise UsageError(msg)
    if ns.inline and ns.progress:
        msg = "--inline runs one stage after another in this process (for pdb): --progress does not apply"
        raise UsageError(msg)
    if ns.metrics_json:
        from runner.paths import cannot_write

        why = cannot_write(Path(ns.metrics_json))
        if why is not None:
            from runner.diagnostics import Diagnostic

            raise PipelineInvalid([Diagnostic(f"--metrics-json {ns.metrics_json}", None, None, "", why)])
    if ns.inline:
        result = _run_inline(ns)
    else:
        result = run_pipeline(
            ns.file, ns.overrides, limit=ns.limit, ray_address=ns.ray_address, progress=ns.progress, **settings
        )
    for items in result.collected.values():
        print(json.dumps(items, default=repr))
    sys.stdout.flush()
    exit_code, errors = result.exit_code, [result.error] if result.error else []
    if ns.metrics_json:
        from runner.metrics import write_metrics

        try:
            write_metrics(result, ns.metrics_json)
        except OSError as e:  # checked before the run, yet gone since: the summary still comes first
            errors.append(f"cannot write --metrics-json {ns.metrics_json}: {e.strerror or e}")
            exit_code = exit_code or 1
    if result.log_format == "json":
        record = summary_record(result, full=not ns.no_summary)
        if record is not None:
            print(json.dumps(record, default=repr), file=sys.stderr)
        for error in errors[1 if result.error else 0 :]:  # the run's own error is in the record
            record = {"level": "error", "logger": "mprun", "event": "run failed", "error": error}
            print(json.dumps(record), file=sys.stderr)
    else:
        if not ns.no_summary:
            print(summary_table(result), file=sys.stderr)
        for error in errors:
            print(f"mprun: error: {error}", file=sys.stderr)
    return _quick(exit_code) if not ns.inline else exit_code


def _run_inline(ns: argparse.Namespace) -> Any:
    """``run --inline``: the same run in this process; options about processes do not apply."""
    from runner.backends.inline import run_inline_pipeline
    from runner.errors import UsageError

    if ns.start_method:
        msg = "--inline starts no process: --start-method does not apply"
        raise UsageError(msg)
    return run_inline_pipeline(
        ns.file, ns.overrides, limit=ns.limit, log_level=ns.log_level, log_format=ns.log_format, log_file=ns.log_file
    )


def _graph(ns: argparse.Namespace) -> int:
    from runner import load_pipeline
    from runner.graph import render

    print(render(load_pipeline(ns.file), ns.format))
    return 0


def _new(ns: argparse.Namespace) -> int:
    from runner.scaffold import scaffold

    for path in scaffold(ns.name, ns.dir):
        print(f"wrote {path}")
    return 0


def summary_table(result: Any) -> str:
    """The per-stage summary: counts, restarts, seconds, items per second, utilisation; the slowest stage marked.

    The slowest stage (``*`` after its row) is the consumer or pool stage with the most busy seconds per process
    (``runner.metrics.slowest_stage``): the one to give more processes or a faster function.
    """
    from runner.metrics import busy_per_process, slowest_stage, utilisation

    slowest = slowest_stage(result.stats)
    head = (
        "stage", "procs", "in", "out", "skipped", "retried", "failed", "dead", "restarts", "seconds", "items/s", "util"
    )
    rows = [head]
    for name, st in result.stats.items():
        producer = st.kind == "producer"
        rows.append((
            name,
            str(st.processes),
            f"{st.items_in:,}",
            f"{st.items_out:,}",
            *(("-",) * 5 if producer else (f"{st.skipped:,}", f"{st.retried:,}", f"{st.failed:,}",
                                            f"{st.dead_lettered:,}", f"{st.restarts:,}")),
            f"{st.seconds:.3f}",
            f"{st.items_per_second:,.0f}",
            "-" if producer else f"{utilisation(st):.0%}",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False)))
        for r in rows
    ]
    lines = [
        f"{line}  *" if row[0] == slowest and n else line
        for n, (line, row) in enumerate(zip(lines, rows, strict=True))
    ]
    if slowest is not None:
        st = result.stats[slowest]
        lines.append(f"* slowest stage: {slowest} ({busy_per_process(st):.3f}s busy per process, "
                     f"{utilisation(st):.0%} utilised)")
    left = {name: q["left"] for name, q in result.queues.items() if q.get("left")}
    if left:
        lines.append("left in queues, not processed: " + ", ".join(f"{name} {n:,}" for name, n in left.items()))
    status = "ok" if result.exit_code == 0 else f"exit {result.exit_code}"
    return "\n".join(["", *lines, f"{status} in {result.seconds:.2f}s"])


def summary_record(result: Any, *, full: bool = True) -> dict[str, Any] | None:
    """The end of a run as one JSON log record (``--log-format json``): the summary, its error included.

    ``{"timestamp", "level", "logger": "mprun", "event": "run finished", **runner.metrics.metrics(result)}``;
    without ``full`` (``--no-summary``) only a failed run gets a record: ``event: "run failed"``, ``exit_code``
    and ``error``.
    """
    import datetime

    level = "info" if result.exit_code == 0 else "error"
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    head = {"timestamp": stamp, "level": level, "logger": "mprun"}
    if full:
        from runner.metrics import metrics

        return {**head, "event": "run finished", **metrics(result)}
    if result.error:
        return {**head, "event": "run failed", "exit_code": result.exit_code, "error": result.error}
    return None


def _validate(ns: argparse.Namespace) -> int:
    """Check each file in every tier (runner.validate); ``ok FILE`` or its problems on stdout; 2 if any is invalid."""
    from runner.validate import as_dict, github_annotation, validate_file

    worst = 0
    report = []
    for file in ns.files:
        problems = validate_file(file, ns.overrides)
        worst = 2 if problems else worst
        report.append({"file": file, "ok": not problems, "errors": [as_dict(p, file) for p in problems]})
        if ns.format != "json":
            for problem in problems:
                print(github_annotation(problem, file) if ns.format == "github" else problem)
            if not problems:
                print(f"ok {file}")
    if ns.format == "json":
        print(json.dumps(report, indent=2))
    return worst


if __name__ == "__main__":
    console()
