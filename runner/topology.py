"""The compiled plan of a run: frozen, picklable plain data, no processes or queues yet.

``compiler.compile_pipeline`` builds it from a validated ``schemas.Pipeline``; the supervisor turns it
into processes, pools and queues; ``worker`` receives the parts of it a child needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

QueueType = Literal["fifo", "lifo"]
StageKind = Literal["producer", "consumer", "pool"]
OnError = Literal["fail", "skip", "retry"]

MAX_BATCH = 4096  # most items one queue message carries
BATCH_BYTES = 1 << 20  # about the most bytes one queue message or one chunk of a worker carries
MAX_BYTES = 32 << 20  # default byte bound of a queue (settings: queues.NAME.max_bytes)
LINGER = 0.05  # seconds a buffered item may wait before it is sent anyway
# What the forkserver imports once for every process it forks: the worker code, the module of the `mprun`
# command, which each child re-runs as its __mp_main__ (multiprocessing's rule for a main script), and
# structlog for stage code that logs with it. `mprun run` forks its server (runner.zygote) without
# structlog unless the plan's functions import it (runner.imports.imports_structlog): mprun's own code
# does not need it (runner.logs).
FORKSERVER_PRELOAD = ["runner.worker", "runner.cli", "structlog"]


@dataclass(frozen=True)
class QueuePlan:
    """A queue: what it is, how big, and who is on each end."""

    name: str
    type: QueueType
    maxsize: int  # items; 0 = unbounded
    batch: int  # most items per message on this queue
    writers: tuple[str, ...]  # stage names
    reader_processes: int  # how many readers it has (one per reading stage; each needs one end marker)
    max_bytes: int = MAX_BYTES  # bytes of pickled batches the queue holds before writers wait; 0 = unbounded

    @property
    def slots(self) -> int:
        """Messages (batches) the queue holds before writers wait; 0 = unbounded."""
        return 0 if self.maxsize == 0 else max(1, self.maxsize // self.batch)


@dataclass(frozen=True)
class StagePlan:
    """One stage, with every reference still a ``module:attribute`` string."""

    name: str
    kind: StageKind
    process_names: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    function: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] | None = None
    init: str | None = None
    lock: str | None = None
    daemon: bool = False
    after: tuple[str, ...] = ()
    ordered: bool = False
    chunksize: int | None = None
    maxtasksperchild: int | None = None
    timeout: float | None = None
    on_error: OnError = "fail"
    retries: int = 3
    retry_backoff: float = 0.1
    dead_letter: str | None = None
    restart: bool = True
    # Stages for real work (SPEC 1b)
    batch: int | None = None  # items per call, passed as a list (None: one item per call)
    batch_timeout: float = 0.1  # seconds a partial batch waits for more items before it is passed on
    concurrency: int = 1  # calls at once in each process (threads, or one asyncio loop for async functions)
    # Named routes (`output:` given as a mapping): route name -> output queue. Empty: every output goes to
    # every queue of `outputs`. With routes, `outputs` holds the distinct queues of the routes, in order.
    routes: dict[str, str] = field(default_factory=dict)

    @property
    def self_fed(self) -> bool:
        """The stage writes to its own input queue (a work queue or stack it feeds itself)."""
        return bool(self.inputs) and self.inputs[0] in self.outputs

    @property
    def processes(self) -> int:
        """How many processes run the stage."""
        return len(self.process_names)


@dataclass(frozen=True)
class Topology:
    """A whole run: settings, queues and stages (in file order)."""

    name: str
    base_dir: str
    start_method: str
    log_level: str
    log_format: str
    log_file: str | None
    queues: dict[str, QueuePlan]
    stages: tuple[StagePlan, ...]
    limit: int | None = None  # each producer emits at most this many items
    shutdown_timeout: float = 10.0
    backend: Literal["local", "ray"] = "local"

    def stage(self, name: str) -> StagePlan:
        """The stage called ``name``."""
        return next(s for s in self.stages if s.name == name)

    def writers_of(self, queue: str) -> list[StagePlan]:
        """Stages that write to ``queue`` (as an output or as their dead-letter queue)."""
        return [s for s in self.stages if queue in s.outputs or queue == s.dead_letter]

    def readers_of(self, queue: str) -> list[StagePlan]:
        """Stages that read ``queue``."""
        return [s for s in self.stages if queue in s.inputs]

    @property
    def locks(self) -> list[str]:
        """Names of the shared locks."""
        return sorted({s.lock for s in self.stages if s.lock})
