"""mprun: run a YAML pipeline as a multiprocessing topology.

    pipelines/x.yaml --load--> data + line marks --validate--> schemas.Pipeline --compile--> Topology
          --supervise--> processes, pools, queues, manager --> RunResult (exit code, stats, collected)
    every process: structlog -> QueueHandler ~~~> QueueListener (main process) -> stderr / log_file

Entry points: ``load_pipeline(path, overrides=None)`` and ``run_pipeline(path_or_pipeline, ...)``; stage
functions send an item to a named route of their stage with ``route(name, item)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.errors import MprunError, PipelineInvalid, RunFailed, UsageError

if TYPE_CHECKING:
    from runner.loader import load_pipeline
    from runner.results import RunResult, StageStats
    from runner.topology import Topology
    from schemas import Pipeline

_LAZY = {"load_pipeline": "runner.loader", "RunResult": "runner.results", "StageStats": "runner.results"}


def __getattr__(name: str) -> Any:
    # Imported on first use: child processes import runner.worker without pydantic or the schemas.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)

__all__ = [
    "MprunError",
    "PipelineInvalid",
    "Route",
    "RunFailed",
    "RunResult",
    "StageStats",
    "UsageError",
    "load_pipeline",
    "route",
    "run_pipeline",
]


class Route:
    """An item sent to the named route of a stage whose ``output`` is a mapping (see ``route``)."""

    __slots__ = ("item", "name")

    def __init__(self, name: str, item: Any) -> None:
        self.name, self.item = name, item

    def __repr__(self) -> str:
        return f"route({self.name!r}, {self.item!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Route) and (self.name, self.item) == (other.name, other.item)

    __hash__ = None  # type: ignore[assignment]  # the item may be unhashable


def route(name: str, item: Any) -> Route:
    """Send ``item`` to the route ``name`` of the stage (``output: {name: queue, ...}``): return it, or yield
    several; an item returned without a route goes to the route named ``default``."""
    return Route(name, item)

_SETTING_OPTIONS = ("start_method", "log_level", "log_format", "log_file", "backend")


def prepare_pipeline(
    path_or_pipeline: str | Path | Pipeline, overrides: list[str] | None = None, **settings: Any
) -> Pipeline:
    """The pipeline to run: loaded (if given a path), with the settings given (not None) replacing the file's.

    Raises:
        PipelineInvalid: the file is invalid (exit code 2).
        UsageError: an unknown setting, or a bad value for one (exit code 2).
    """
    from pydantic import ValidationError

    from runner.loader import load_pipeline
    from schemas import Pipeline

    _check_setting_names(settings)
    if isinstance(path_or_pipeline, Pipeline):
        pipeline = path_or_pipeline
    else:
        pipeline = load_pipeline(path_or_pipeline, overrides)
    given = {k: v for k, v in settings.items() if v is not None}
    if not given:
        return pipeline
    try:
        new_settings = type(pipeline.settings).model_validate(pipeline.settings.model_dump() | given)
    except ValidationError as e:
        problem = e.errors(include_url=False)[0]
        msg = f"{problem['loc'][0]}: {problem['msg']}"
        raise UsageError(msg) from None
    return pipeline.model_copy(update={"settings": new_settings})


def _check_setting_names(settings: dict[str, Any]) -> None:
    unknown = set(settings) - set(_SETTING_OPTIONS)
    if unknown:
        msg = f"unknown option(s): {', '.join(sorted(unknown))}"
        raise UsageError(msg)


def plan_run(
    path_or_pipeline: str | Path | Pipeline, overrides: list[str] | None = None, *, limit: int | None = None,
    **settings: Any,
) -> Topology:
    """The compiled plan of a run, its functions import-checked in a fresh process.

    A file planned before with the same inputs comes from ``runner.cache`` without YAML or Pydantic.

    Raises:
        PipelineInvalid: the file is invalid, or a function cannot be imported by a fresh worker (exit code 2).
        UsageError: an unknown setting, or a bad value for one (exit code 2).
    """
    from runner import cache
    from runner.imports import import_problems, imports_structlog
    from runner.paths import plan_problems, prepare_outputs

    _check_setting_names(settings)
    name = cache.key(path_or_pipeline, overrides, limit, settings)
    hit = cache.load(name)
    if hit is not None:
        topology, refs, _ = hit
        if not plan_problems(topology) and not any(import_problems(refs, topology.base_dir, topology.start_method)):
            prepare_outputs(topology)
            return topology  # else the full path below reports the problem, located
    from runner.compiler import compile_pipeline
    from runner.validate import check_pipeline_environment

    pipeline = prepare_pipeline(path_or_pipeline, overrides, **settings)
    # A missing module, file source or unwritable output is refused (exit 2) before any stage starts.
    refs = check_pipeline_environment(pipeline, log_file_option=settings.get("log_file"))
    topology = compile_pipeline(pipeline, limit=limit)
    cache.store(name, (topology, refs, imports_structlog(refs)))
    prepare_outputs(topology)
    return topology


def run_pipeline(
    path_or_pipeline: str | Path | Pipeline,
    overrides: list[str] | None = None,
    *,
    limit: int | None = None,
    ray_address: str | None = None,
    progress: bool | None = None,
    **settings: Any,
) -> RunResult:
    """Load (if given a path), validate and run a pipeline on this machine.

    Args:
        path_or_pipeline: a pipeline file, or a ``Pipeline`` already loaded.
        overrides: ``PATH=VALUE`` strings, as ``--set`` on the command line.
        limit: each producer emits at most this many items.
        ray_address: with the ray backend, the cluster to run on (default: ``RAY_ADDRESS``, else a local instance).
        progress: show the live per-stage display on stderr (``runner.progress``); None: when stderr is a
            terminal (and no built-in ``print`` stage writes to the same terminal).
        **settings: any of start_method, log_level, log_format, log_file, backend, replacing the file's.

    Raises:
        PipelineInvalid: the file is invalid, or a function cannot be imported by a fresh worker (exit code 2).
        UsageError: a bad option, or ``start_method: fork`` in a process connected to Ray (exit code 2).
    """
    from runner import backends
    from runner.backends.local import driver  # noqa: F401 - imported while the forkserver starts (``cli._warm_up``)
    from runner.imports import ray_connected

    topology = plan_run(path_or_pipeline, overrides, limit=limit, **settings)
    if progress is None:
        import sys

        printing = any(s.function == "print" for s in topology.stages) and sys.stdout.isatty()
        progress = sys.stderr.isatty() and not printing
    backend: backends.Backend
    if topology.backend == "ray":
        backend = backends.Ray(ray_address, progress=progress)
    elif ray_address:
        msg = "--ray-address applies to the ray backend: add --backend ray (or settings.backend: ray)"
        raise UsageError(msg)
    elif topology.start_method == "fork" and ray_connected():
        msg = ("start_method fork cannot be used in a process connected to Ray (ray.init was called): a fork "
               "copies Ray's running threads and can hang; use forkserver or spawn")
        raise UsageError(msg)
    else:
        backend = backends.Local(progress)
    return backend.run(topology)
