"""Validated ``Pipeline`` -> ``Topology``: name processes, size queues, count end-of-stream markers."""

from __future__ import annotations

import os

from runner.topology import MAX_BATCH, QueuePlan, StagePlan, Topology
from schemas import Pipeline, Stage
from schemas.stages import MAX_PROCESSES


def process_names(name: str, processes: int, explicit: list[str] | None) -> tuple[str, ...]:
    """``<name>`` for one process, ``<name>-1..N`` for several, unless names are given."""
    if explicit:
        return tuple(explicit)
    return (name,) if processes == 1 else tuple(f"{name}-{i}" for i in range(1, processes + 1))


def cpu_count() -> int:
    """The CPUs this process may run on (``processes: auto``): its affinity mask, like ``os.process_cpu_count``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform (macOS)
        return os.cpu_count() or 1


def process_count(stage: Stage) -> int:
    """How many processes ``stage`` runs: its ``processes``, or for ``auto`` its names' count or ``cpu_count()``
    (at most ``MAX_PROCESSES``, the bound of the file)."""
    if stage.processes != "auto":
        return stage.processes
    return len(stage.process_names) if stage.process_names else min(cpu_count(), MAX_PROCESSES)


def compile_pipeline(pipeline: Pipeline, *, limit: int | None = None) -> Topology:
    """Build the plain-data plan of ``pipeline`` (already validated and topology-checked)."""
    stages = []
    for s in pipeline.stages:
        plan = StagePlan(
            name=s.name,
            kind=s.kind,
            process_names=process_names(s.name, process_count(s), s.process_names),
            inputs=tuple(s.inputs),
            outputs=tuple(s.outputs),
            function=getattr(s, "function", None),
            kwargs=dict(s.kwargs),
            source=s.source.model_dump(exclude_none=True) if s.kind == "producer" else None,
            init=getattr(s, "init", None),
            lock=getattr(s, "lock", None),
            daemon=getattr(s, "daemon", False),
            after=tuple(s.after),
            ordered=getattr(s, "ordered", False),
            chunksize=getattr(s, "chunksize", None),
            maxtasksperchild=getattr(s, "maxtasksperchild", None),
            timeout=getattr(s, "timeout", None),
            on_error=getattr(s, "on_error", "fail"),
            retries=getattr(s, "retries", 3),
            retry_backoff=getattr(s, "retry_backoff", 0.1),
            dead_letter=getattr(s, "dead_letter", None),
            restart=getattr(s, "restart", True),
            batch=getattr(s, "batch", None),
            batch_timeout=getattr(s, "batch_timeout", 0.1),
            concurrency=getattr(s, "concurrency", 1),
            routes=s.routes,
        )
        stages.append(plan)
    queues = {}
    for name in pipeline.queue_names():
        spec = pipeline.queue(name)
        readers = [s for s in stages if name in s.inputs]
        # A queue a stage feeds itself is unbounded: a full one would have its only reader wait for itself.
        self_fed = any(s.self_fed for s in readers)
        maxsize, max_bytes = (0, 0) if self_fed else (spec.maxsize, spec.max_bytes)
        queues[name] = QueuePlan(
            name=name,
            type=spec.type,
            maxsize=maxsize,
            max_bytes=max_bytes,
            batch=min(MAX_BATCH, maxsize) if maxsize else MAX_BATCH,
            writers=tuple(s.name for s in stages if name in s.outputs or name == s.dead_letter),
            # Consumer and pool stages read their input in one thread of the main process each.
            reader_processes=len(readers),
        )
    settings = pipeline.settings
    log_file = settings.log_file
    if log_file and not os.path.isabs(log_file):
        log_file = os.path.join(os.getcwd(), log_file)
    return Topology(
        name=pipeline.name or "pipeline",
        base_dir=pipeline.base_dir,
        start_method=settings.start_method,
        log_level=settings.log_level,
        log_format=settings.log_format,
        log_file=log_file,
        queues=queues,
        stages=tuple(stages),
        limit=limit,
        shutdown_timeout=settings.shutdown_timeout,
        backend=settings.backend,
    )
