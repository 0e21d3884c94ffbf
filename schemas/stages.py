"""The three stage kinds of a pipeline file, a discriminated union on ``kind``.

Pure Pydantic v2: nothing here imports from ``runner``.  Every field carries a description, which
``mprun schema`` turns into hover documentation in editors.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]*$"
FUNCTION_PATTERN = r"^[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?$"
BUILTINS = ("print", "collect", "jsonl", "csv", "lines", "identity")
# The keyword arguments each built-in takes, and which of them it needs.
BUILTIN_KWARGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "print": ((), ()), "collect": ((), ()), "identity": ((), ()), "jsonl": (("path",), ("path",)),
    "csv": (("path", "columns"), ("path",)), "lines": (("path",), ("path",)),
}
FILE_SINKS = ("jsonl", "csv", "lines")  # the built-ins that write kwargs.path ("-": standard output)
# Processes of one stage. Each is a whole interpreter (~15-30 MB) and holds two descriptors in the main
# process (its pipe and its sentinel), whose default limit is 1,024 open files: hundreds of processes
# exhaust memory or descriptors long before they add speed on any machine mprun targets.
MAX_PROCESSES = 256
# Calls at once in one process. A plain function gets a thread per concurrent call (its stack, and every
# thread contends for the one GIL); an async function's calls share one event loop, but each usually holds
# a socket, and a process may open 1,024 files by default: past this, more processes serve better.
MAX_CONCURRENCY = 1000


class Model(BaseModel):
    """Base of every model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class RangeSource(Model):
    """``range(start, stop, step)`` as a source."""

    start: int = Field(0, description="First number.")
    stop: int = Field(description="Numbers stop before this one.")
    step: int = Field(1, description="Distance between numbers (not 0).")

    @model_validator(mode="after")
    def _step_not_zero(self) -> RangeSource:
        if self.step == 0:
            msg = "step must not be 0"
            raise ValueError(msg)
        return self


class FileSource(Model):
    """Lines, JSON lines or CSV rows of a file (a path relative to the pipeline file)."""

    path: str = Field(description="File to read; relative paths start at the pipeline file's folder.")
    format: Literal["lines", "jsonl", "csv"] = Field(
        "lines", description="lines: each line without its newline; jsonl: one JSON value a line; csv: a dict a row."
    )


class Source(Model):
    """Where a producer's items come from: exactly one of the four keys."""

    items: list[Any] | None = Field(None, description="A literal list of items.")
    range: RangeSource | None = Field(None, description="A range of integers.")
    function: str | None = Field(
        None,
        pattern=FUNCTION_PATTERN,
        description="module:attribute of a function returning an iterable (or a generator); "
        "the stage's kwargs are passed.",
    )
    file: FileSource | None = Field(None, description="Read items from a file.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        given = [k for k in ("items", "range", "function", "file") if getattr(self, k) is not None]
        if len(given) != 1:
            msg = f"give exactly one of items, range, function, file (got {', '.join(given) or 'none'})"
            raise ValueError(msg)
        return self


Outputs = str | list[str] | None
# A consumer's or pool's output may also name routes: route name -> queue.
RoutedOutputs = str | list[str] | dict[str, str] | None
Processes = Annotated[int, Field(ge=1, le=MAX_PROCESSES)] | Literal["auto"]


def _route_names(schema: dict[str, Any]) -> None:
    """In the JSON Schema, a mapping of routes has at least one route, each named like a stage."""
    for branch in schema.get("anyOf", []):
        if branch.get("type") == "object":
            branch.update(minProperties=1, propertyNames={"pattern": NAME_PATTERN})


class StageBase(Model):
    """Keys every stage kind has."""

    # Only the three kinds validate: building this base (and Worker) would cost a cold start ~10 ms for nothing.
    model_config = ConfigDict(defer_build=True)

    name: str = Field(pattern=NAME_PATTERN, description="Unique stage name; processes are named <name>-<i>.")
    processes: Processes = Field(
        1, description=f"How many processes run this stage (at most {MAX_PROCESSES}), or auto: one per CPU this "
        "process may use.",
    )
    process_names: list[str] | None = Field(None, description="Explicit process names, one per process.")
    output: RoutedOutputs = Field(
        None, description="Queue name or list of queue names; every item goes to each. Absent: the stage is a sink."
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments passed to every call.")
    after: list[str] = Field(
        default_factory=list, description="Stages that must have finished before this stage starts."
    )

    @field_validator("processes", mode="wrap")
    @classmethod
    def _processes_bounded(cls, value: Any, handler: Any) -> Any:
        # Pydantic's own error types, one error each (not one per branch of the union); "got ..." is added
        # where errors are rendered (runner.diagnostics).
        if isinstance(value, str) and value != "auto" and not value.strip().isdigit():
            raise PydanticCustomError("int_or_auto", "Input should be a whole number or 'auto'")
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise PydanticCustomError("greater_than_equal", "Input should be greater than or equal to {ge}", {"ge": 1})
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_PROCESSES:
            msg = (f"at most {MAX_PROCESSES} processes per stage, got {value}: each process is a whole Python "
                   "interpreter and holds file descriptors in the main process, so more exhaust memory or the "
                   "open-file limit before they add speed")
            raise ValueError(msg)
        return handler(value)

    @model_validator(mode="after")
    def _names_match_processes(self) -> StageBase:
        # With processes: auto, the names say how many.
        if self.process_names is not None and self.processes != "auto" and len(self.process_names) != self.processes:
            msg = f"process_names lists {len(self.process_names)} names for {self.processes} processes"
            raise ValueError(msg)
        return self

    @property
    def outputs(self) -> list[str]:
        """The output queues as a list (of routes: the distinct queues, in order)."""
        if self.output is None:
            return []
        if isinstance(self.output, dict):
            return list(dict.fromkeys(self.output.values()))
        return [self.output] if isinstance(self.output, str) else list(self.output)

    @property
    def routes(self) -> dict[str, str]:
        """Route name -> queue, when ``output`` is a mapping; else empty."""
        return dict(self.output) if isinstance(self.output, dict) else {}

    @property
    def written(self) -> list[str]:
        """Every queue the stage writes: its outputs and its dead-letter queue."""
        dead = getattr(self, "dead_letter", None)
        return self.outputs + ([dead] if dead and dead not in self.outputs else [])

    @property
    def inputs(self) -> list[str]:
        """The input queues as a list (empty for producers)."""
        value = getattr(self, "input", None)
        return [value] if value else []


class Producer(StageBase):
    """Emits the items of its source; no input."""

    model_config = ConfigDict(defer_build=False)

    kind: Literal["producer"] = Field(description="producer: emits items from a source.")
    source: Source = Field(description="Where the items come from.")
    output: Outputs = Field(
        None, description="Queue name or list of queue names; every item goes to each. Absent: the stage is a sink."
    )

    @field_validator("output", mode="before")
    @classmethod
    def _no_routes(cls, value: Any) -> Any:
        if isinstance(value, dict):
            msg = ("named routes (a mapping) are for consumer and pool stages, whose function picks the route; "
                   "a producer's output is a queue or a list of queues")
            raise ValueError(msg)
        return value
    daemon: bool = Field(
        False, description="Runs until the rest of the pipeline finishes, then is stopped; never holds the run open."
    )


class Worker(StageBase):
    """Keys shared by consumers and pools."""

    input: str = Field(pattern=NAME_PATTERN, description="The queue this stage reads.")
    function: str = Field(
        pattern=FUNCTION_PATTERN,
        description="module:attribute called with each item (and kwargs), a module:Class instantiated once per "
        "process with kwargs and called with each item, or a built-in: print, collect, jsonl, csv, lines, identity.",
    )
    init: str | None = Field(
        None, pattern=FUNCTION_PATTERN, description="module:attribute called once in each worker process first."
    )
    lock: str | None = Field(
        None, pattern=NAME_PATTERN, description="Name of a lock shared across processes, held around each call."
    )
    timeout: float | None = Field(
        None, gt=0, description="Seconds one call may take; past it the call fails and the worker is replaced."
    )
    on_error: Literal["fail", "skip", "retry"] = Field(
        "fail",
        description="When a call fails: fail (stop the run, exit 1), skip (drop the item, counted), retry (try again).",
    )
    retries: int = Field(3, ge=0, description="Attempts after the first, with on_error: retry.")
    retry_backoff: float = Field(0.1, ge=0, description="Seconds before the first retry, doubling after each.")
    dead_letter: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description='Queue receiving {"item", "error", "stage", "attempts"} for every item given up on.',
    )
    restart: bool = Field(
        True,
        description="true: a worker process that dies is replaced and its item counts as a failed attempt; "
        "false: the run fails.",
    )
    output: RoutedOutputs = Field(
        None,
        json_schema_extra=_route_names,
        description="Queue name or list of queue names: every item goes to each; or a mapping route -> queue: the "
        "function picks a route with runner.route(NAME, item), an item without one goes to the route 'default'. "
        "Absent: the stage is a sink.",
    )
    batch: int | None = Field(
        None, ge=1,
        description="The function gets a list of up to this many items per call and returns an iterable of outputs "
        "(or None).",
    )
    batch_timeout: float = Field(
        0.1, gt=0, description="Seconds a partial batch waits for more items before it is passed on."
    )
    concurrency: int = Field(
        1, ge=1, json_schema_extra={"maximum": MAX_CONCURRENCY},
        description=f"Calls each process runs at once (at most {MAX_CONCURRENCY}): threads for a plain function, "
        "one asyncio loop for an async one.",
    )

    @field_validator("concurrency")
    @classmethod
    def _concurrency_bounded(cls, value: int) -> int:
        if value > MAX_CONCURRENCY:
            msg = (f"at most {MAX_CONCURRENCY} calls at once per process, got {value}: each concurrent call of a plain "
                   "function is a thread, and each usually holds a connection against the open-file limit "
                   "(1,024 by default); use more processes instead")
            raise ValueError(msg)
        return value

    @field_validator("output")
    @classmethod
    def _routes_named(cls, value: Any) -> Any:
        if isinstance(value, dict):
            if not value:
                msg = "a mapping of routes needs at least one route: ROUTE: queue"
                raise ValueError(msg)
            bad = [name for name in value if not re.fullmatch(NAME_PATTERN, name)]
            if bad:
                msg = f"route name {bad[0]!r} must match {NAME_PATTERN}"
                raise ValueError(msg)
        return value

    @field_validator("function")
    @classmethod
    def _function_is_ref_or_builtin(cls, value: str) -> str:
        # A field validator, so the error is located at the value in the file.
        if ":" not in value and value not in BUILTINS:
            msg = f"function must be module:attribute or one of {', '.join(BUILTINS)}, not {value!r}"
            raise ValueError(msg)
        return value


class Consumer(Worker):
    """N dedicated processes, each: get -> function -> put."""

    model_config = ConfigDict(defer_build=False)

    kind: Literal["consumer"] = Field(description="consumer: N processes, each get -> call -> put.")
    daemon: bool = Field(
        False, description="Runs until the rest of the pipeline finishes, then is stopped; never holds the run open."
    )


class Pool(Worker):
    """A multiprocessing.Pool fed from the input queue."""

    model_config = ConfigDict(defer_build=False)

    kind: Literal["pool"] = Field(description="pool: a process pool fed from the input queue.")
    processes: Processes = Field(
        "auto", description=f"How many processes run this stage (at most {MAX_PROCESSES}), or auto (the default): one "
        "per CPU this process may use.",
    )
    ordered: bool = Field(False, description="true: results leave in input order; false: as they finish.")
    chunksize: int | None = Field(
        None,
        ge=1,
        description="Items per task sent to a pool worker (default: about 50 ms of work each, at most 4096).",
    )
    maxtasksperchild: int | None = Field(None, ge=1, description="Replace a worker after this many tasks.")


Stage = Annotated[Producer | Consumer | Pool, Field(discriminator="kind")]
