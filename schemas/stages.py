"""The three stage kinds of a pipeline file, a discriminated union on ``kind``.

Pure Pydantic v2: nothing here imports from ``runner``.  Every field carries a description, which
``mprun schema`` turns into hover documentation in editors.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]*$"
FUNCTION_PATTERN = r"^[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?$"
BUILTINS = ("print", "collect", "jsonl", "identity")
# The keyword arguments each built-in takes, and which of them it needs.
BUILTIN_KWARGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "print": ((), ()), "collect": ((), ()), "identity": ((), ()), "jsonl": (("path",), ("path",)),
}
# Processes of one stage. Each is a whole interpreter (~15-30 MB) and holds two descriptors in the main
# process (its pipe and its sentinel), whose default limit is 1,024 open files: hundreds of processes
# exhaust memory or descriptors long before they add speed on any machine mprun targets.
MAX_PROCESSES = 256


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


class StageBase(Model):
    """Keys every stage kind has."""

    # Only the three kinds validate: building this base (and Worker) would cost a cold start ~10 ms for nothing.
    model_config = ConfigDict(defer_build=True)

    name: str = Field(pattern=NAME_PATTERN, description="Unique stage name; processes are named <name>-<i>.")
    processes: int = Field(
        1, ge=1, json_schema_extra={"maximum": MAX_PROCESSES},
        description=f"How many processes run this stage (at most {MAX_PROCESSES}).",
    )
    process_names: list[str] | None = Field(None, description="Explicit process names, one per process.")
    output: Outputs = Field(
        None, description="Queue name or list of queue names; every item goes to each. Absent: the stage is a sink."
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments passed to every call.")
    after: list[str] = Field(
        default_factory=list, description="Stages that must have finished before this stage starts."
    )

    @field_validator("processes")
    @classmethod
    def _processes_bounded(cls, value: int) -> int:
        if value > MAX_PROCESSES:
            msg = (f"at most {MAX_PROCESSES} processes per stage, got {value}: each process is a whole Python "
                   "interpreter and holds file descriptors in the main process, so more exhaust memory or the "
                   "open-file limit before they add speed")
            raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _names_match_processes(self) -> StageBase:
        if self.process_names is not None and len(self.process_names) != self.processes:
            msg = f"process_names lists {len(self.process_names)} names for {self.processes} processes"
            raise ValueError(msg)
        return self

    @property
    def outputs(self) -> list[str]:
        """The output queues as a list."""
        if self.output is None:
            return []
        return [self.output] if isinstance(self.output, str) else list(self.output)

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
    daemon: bool = Field(
        False, description="Runs until the rest of the pipeline finishes, then is stopped; never holds the run open."
    )


class Worker(StageBase):
    """Keys shared by consumers and pools."""

    input: str = Field(pattern=NAME_PATTERN, description="The queue this stage reads.")
    function: str = Field(
        pattern=FUNCTION_PATTERN,
        description="module:attribute called with each item (and kwargs), "
        "or a built-in: print, collect, jsonl, identity.",
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
    ordered: bool = Field(False, description="true: results leave in input order; false: as they finish.")
    chunksize: int | None = Field(
        None,
        ge=1,
        description="Items per task sent to a pool worker (default: about 50 ms of work each, at most 4096).",
    )
    maxtasksperchild: int | None = Field(None, ge=1, description="Replace a worker after this many tasks.")


Stage = Annotated[Producer | Consumer | Pool, Field(discriminator="kind")]
