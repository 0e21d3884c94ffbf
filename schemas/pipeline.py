"""The root of a pipeline file: ``Pipeline``, its ``Settings`` and ``QueueSpec``.

Cross-field checks that need the whole file (unique names, references that exist, a topology that can
end) live here too, so an invalid file never reaches the runner.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field, PrivateAttr

from schemas.stages import BUILTIN_KWARGS, NAME_PATTERN, Consumer, Model, Pool, Producer, Source, Stage

DEFAULT_MAXSIZE = 10_000
DEFAULT_MAX_BYTES = 32 << 20  # 32 MiB (runner.topology.MAX_BYTES)


class Settings(Model):
    """Run-wide settings; every key optional."""

    start_method: Literal["fork", "spawn", "forkserver"] = Field(
        "forkserver", description="How processes are started: fork, spawn or forkserver."
    )
    backend: Literal["local", "ray"] = Field(
        "local",
        description="Where the pipeline runs: local (multiprocessing on this machine) or ray (Ray actors, on a local "
        "Ray instance or the cluster at --ray-address / RAY_ADDRESS; needs pip install 'mprun[ray]').",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Lowest level of records shown, in every process."
    )
    log_format: Literal["console", "json"] = Field("console", description="How stderr renders records.")
    log_file: str | None = Field(None, description="A path: every record also goes there as JSON lines.")
    shutdown_timeout: float = Field(
        10,
        ge=0,
        description="Seconds the chunks in flight get to finish after SIGINT/SIGTERM (queued items are left, and "
        "counted); past it every child is killed.",
    )


class QueueSpec(Model):
    """A queue between stages."""

    type: Literal["fifo", "lifo"] = Field(
        "fifo", description="fifo: first in first out; lifo: a stack served by a manager."
    )
    maxsize: int = Field(
        DEFAULT_MAXSIZE, ge=0, description="About how many items the queue holds before writers wait; 0 = unbounded."
    )
    max_bytes: int = Field(
        DEFAULT_MAX_BYTES,
        ge=0,
        description="Bytes (pickled) the queue holds before writers wait, besides maxsize; 0 = unbounded. "
        "A single batch larger than this still passes into an empty queue.",
    )


class TestCase(Model):
    """One case of ``mprun test``: replace producers' sources, then check the items that flowed through queues."""

    __test__: ClassVar[bool] = False  # not a pytest test class

    name: str = Field(min_length=1, description="What the case checks; shown as FILE::NAME in the report.")
    sources: dict[str, Source] = Field(
        default_factory=dict, description="Producer stage name -> the source it uses in this case instead of its own."
    )
    expect: dict[str, list[Any]] = Field(
        min_length=1, description="Queue name -> every item that must flow through that queue (all writers together)."
    )
    ordered: bool = Field(
        False, description="true: the items must come in this order (the order they were put); false: any order."
    )
    set_: dict[str, Any] = Field(
        default_factory=dict,
        alias="set",
        description="PATH -> value, applied in this case as `mprun run --set PATH=VALUE` would "
        "(stages.save.kwargs.path: out/test.jsonl).",
    )
    run_sinks: list[str] = Field(
        default_factory=list,
        description="Sink stages with a module:attribute function (consumers or pools without output) that run in "
        "this case; the other such sinks take their items and do nothing, so a case never touches real outputs.",
    )


class Pipeline(Model):
    """A whole pipeline file."""

    version: Literal[1] = Field(1, description="Format version; 1.")
    name: str | None = Field(None, description="Pipeline name (default: the file's stem).")
    description: str | None = Field(None, description="What the pipeline does.")
    settings: Settings = Field(default_factory=Settings, description="Run-wide settings.")
    queues: dict[str, QueueSpec] = Field(
        default_factory=dict, description="Queues by name; a queue a stage names but not declared here is FIFO."
    )
    stages: list[Stage] = Field(min_length=1, description="The stages, producers first by convention.")
    tests: list[TestCase] = Field(
        default_factory=list, description="Cases run by `mprun test`: sources replaced, items through queues checked."
    )

    # The folder of the pipeline file: tasks modules and relative paths are found there first.
    _base_dir: str = PrivateAttr(".")
    # Where each value was in the file (runner.diagnostics.Marks), so later checks can locate problems.
    _marks: Any = PrivateAttr(None)

    @property
    def base_dir(self) -> str:
        """The folder relative paths and tasks modules are resolved from."""
        return self._base_dir

    def stage(self, name: str) -> Producer | Consumer | Pool:
        """The stage called ``name``."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def queue(self, name: str) -> QueueSpec:
        """The spec of queue ``name`` (declared, or the FIFO default)."""
        return self.queues.get(name) or QueueSpec()

    def queue_names(self) -> list[str]:
        """Every queue, declared or named by a stage, in first-mention order."""
        names = dict.fromkeys(self.queues)
        for stage in self.stages:
            names.update(dict.fromkeys(stage.written + stage.inputs))
        return list(names)


def topology_problems(pipeline: Pipeline) -> list[tuple[tuple[str | int, ...], str]]:
    """Problems no single field shows, each with the location (a field path) it belongs to."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    seen: dict[str, int] = {}
    for i, stage in enumerate(pipeline.stages):
        if stage.name in seen:
            message = f"duplicate stage name {stage.name!r} (also stages[{seen[stage.name]}])"
            problems.append((("stages", i, "name"), message))
        seen.setdefault(stage.name, i)
    writers: dict[str, list[str]] = {}
    readers: dict[str, list[str]] = {}
    for stage in pipeline.stages:
        for q in stage.written:
            writers.setdefault(q, []).append(stage.name)
        for q in stage.inputs:
            readers.setdefault(q, []).append(stage.name)
    for i, stage in enumerate(pipeline.stages):
        for q in stage.inputs:
            if q not in writers:
                problems.append((("stages", i, "input"), f"queue {q!r} has readers but no stage writes to it"))
        for j, q in enumerate(stage.outputs):
            if q not in readers:
                problems.append((_output_loc(stage, i, j, q), f"queue {q!r} is written but no stage reads it"))
        dead = getattr(stage, "dead_letter", None)
        if dead and dead not in readers:
            message = f"dead-letter queue {dead!r} is written but no stage reads it"
            problems.append((("stages", i, "dead_letter"), message))
        if dead and dead in stage.inputs:
            problems.append((("stages", i, "dead_letter"), "a stage cannot dead-letter into its own input"))
        fed = next((q for q in stage.inputs if q in stage.outputs and q in pipeline.queues), None)
        if fed and pipeline.queues[fed].model_fields_set & {"maxsize", "max_bytes"}:
            problems.append((("queues", fed), f"queue {fed!r} is fed by its own reader ({stage.name}), so it "
                             "cannot be bounded (a full queue would wait for itself): remove maxsize/max_bytes"))
        for j, name in enumerate(stage.after):
            if name not in seen:
                problems.append((("stages", i, "after", j), f"unknown stage {name!r} in after"))
            elif name == stage.name:
                problems.append((("stages", i, "after", j), "a stage cannot wait for itself"))
        if getattr(stage, "daemon", False):
            for q in stage.outputs:
                known = [r for r in readers.get(q, []) if r in seen]
                blocked = [r for r in known if not getattr(pipeline.stages[seen[r]], "daemon", False)]
                if blocked:
                    message = (f"daemon stage writes to {q!r}, read by non-daemon stage {blocked[0]!r}, "
                               "which would never end")
                    problems.append((("stages", i, "output"), message))
    for name in pipeline.queues:
        if name not in writers and name not in readers:
            problems.append((("queues", name), f"queue {name!r} is declared but no stage uses it"))
        if not _valid_name(name):
            problems.append((("queues", name), f"queue name {name!r} must match {NAME_PATTERN}"))
    problems += _builtin_problems(pipeline)
    problems += _stdin_problems(pipeline)
    problems += _test_problems(pipeline, writers)
    cycle = _find_cycle(pipeline, writers)
    if cycle:
        i = seen[cycle[0]]
        problems.append((("stages", i, "name"), "cycle that can never end: " + " -> ".join([*cycle, cycle[0]])))
    return problems


def _output_loc(stage: Stage, i: int, j: int, queue: str) -> tuple[str | int, ...]:
    """Where output queue number ``j`` (``queue``) of stage ``i`` is written in the file."""
    if isinstance(stage.output, str):
        return ("stages", i, "output")
    if isinstance(stage.output, dict):
        return ("stages", i, "output", next(r for r, q in stage.output.items() if q == queue))
    return ("stages", i, "output", j)


def _stdin_problems(pipeline: Pipeline) -> list[tuple[tuple[str | int, ...], str]]:
    """Standard input (``file: {path: "-"}``) read by more than one process: each would take lines at random."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    first: str | None = None
    for i, stage in enumerate(pipeline.stages):
        source = getattr(stage, "source", None)
        if source is None or source.file is None or source.file.path != "-":
            continue
        loc = ("stages", i, "source", "file", "path")
        if stage.processes != 1:
            problems.append((loc, f"standard input is read by one process, not {stage.processes}: give processes: 1"))
        if first is not None:
            problems.append((loc, f"standard input is already read by stage {first!r}: one stage can read it"))
        first = first or stage.name
    return problems


def _builtin_problems(pipeline: Pipeline) -> list[tuple[tuple[str | int, ...], str]]:
    """Keyword arguments a built-in function does not take, or needs and is not given (``jsonl`` without ``path``)."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    for i, stage in enumerate(pipeline.stages):
        function = getattr(stage, "function", None)
        if function not in BUILTIN_KWARGS:
            continue
        known, needed = BUILTIN_KWARGS[function]
        if stage.routes and "default" not in stage.routes:
            message = (f"the built-in {function!r} picks no route, so every item goes to the route 'default', "
                       "which output does not declare")
            problems.append((("stages", i, "output"), message))
        kwargs = getattr(stage, "kwargs", None)
        if not isinstance(kwargs, dict):
            continue
        takes = f"it takes {', '.join(known)}" if known else "it takes none"
        for key in kwargs:
            if key not in known:
                message = f"the built-in {function!r} has no argument {key!r}; {takes}"
                problems.append((("stages", i, "kwargs", key), message))
        for key in needed:
            if key not in kwargs:
                problems.append((("stages", i, "function"), f"the built-in {function!r} needs kwargs.{key}"))
        path = kwargs.get("path")
        if "path" in known and "path" in kwargs and (not isinstance(path, str) or not path):
            message = f"the path of the built-in {function!r} must be a non-empty string, got {path!r}"
            problems.append((("stages", i, "kwargs", "path"), message))
        columns = kwargs.get("columns")
        if "columns" in kwargs and (not isinstance(columns, list) or not columns
                                    or not all(isinstance(c, str) and c for c in columns)):
            message = f"columns must be a non-empty list of column names, got {columns!r}"
            problems.append((("stages", i, "kwargs", "columns"), message))
        if function == "csv" and path == "-" and stage.processes != 1:
            why = ("a csv sink writing to standard output runs in one process: each process would write its own "
                   "header; give processes: 1, or a file path")
            problems.append((("stages", i, "processes"), why))
    return problems


def _test_problems(pipeline: Pipeline, writers: dict[str, list[str]]) -> list[tuple[tuple[str | int, ...], str]]:
    """Cases of ``tests:`` that name a stage that is not a producer, or a queue no stage writes."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    kinds = {s.name: s.kind for s in pipeline.stages}
    daemons = {s.name for s in pipeline.stages if getattr(s, "daemon", False)}
    sinks = [s.name for s in pipeline.stages if is_user_sink(s)]
    names = [case.name for case in pipeline.tests]
    for i, case in enumerate(pipeline.tests):
        if names.index(case.name) != i:
            problems.append((("tests", i, "name"), f"duplicate test name {case.name!r}"))
        for stage in case.sources:
            if stage not in kinds:
                producers = ", ".join(n for n, k in kinds.items() if k == "producer")
                problems.append((("tests", i, "sources", stage), f"unknown stage {stage!r}; producers: {producers}"))
            elif kinds[stage] != "producer":
                message = f"stage {stage!r} is a {kinds[stage]}, not a producer: only a producer has a source"
                problems.append((("tests", i, "sources", stage), message))
        for queue in case.expect:
            if queue not in writers:
                known = ", ".join(sorted(writers))
                problems.append((("tests", i, "expect", queue), f"no stage writes to queue {queue!r}; queues: {known}"))
            elif set(writers[queue]) & daemons:
                message = f"queue {queue!r} is written by a daemon stage, which never ends"
                problems.append((("tests", i, "expect", queue), message))
        for j, stage in enumerate(case.run_sinks):
            if stage not in sinks:
                what = (
                    f"stage {stage!r} is not a sink with a module:attribute function"
                    if stage in kinds
                    else f"unknown stage {stage!r}"
                )
                problems.append((("tests", i, "run_sinks", j), f"{what}; sinks: {', '.join(sinks) or 'none'}"))
    return problems


def is_user_sink(stage: Stage) -> bool:
    """Whether ``stage`` is a consumer or pool without output that calls a ``module:attribute`` function."""
    return stage.kind != "producer" and not stage.outputs and ":" in (getattr(stage, "function", None) or "")


def _valid_name(name: str) -> bool:
    return re.fullmatch(NAME_PATTERN, name) is not None


def _find_cycle(pipeline: Pipeline, writers: dict[str, list[str]]) -> list[str] | None:
    """A cycle of 'must finish before' edges (queue writer -> reader, after -> stage), if any.

    A stage writing to its own input is no such cycle: it feeds itself a work queue, whose stream ends when
    its other writers have finished, the queue is empty and none of its items is in flight.
    """
    upstream: dict[str, set[str]] = {s.name: set(s.after) for s in pipeline.stages}
    for stage in pipeline.stages:
        for q in stage.inputs:
            upstream[stage.name].update(w for w in writers.get(q, []) if w != stage.name)
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for up in sorted(upstream.get(name, ())):
            if up not in upstream:
                continue
            if state.get(up) == 1:
                return list(reversed(path[path.index(up):]))
            if up not in state:
                found = visit(up)
                if found:
                    return found
        path.pop()
        state[name] = 2
        return None

    for stage in pipeline.stages:
        if stage.name not in state:
            found = visit(stage.name)
            if found:
                return found
    return None
