"""Where a compiled ``Topology`` runs: one ``Backend`` protocol, ``run(topology) -> RunResult``.

    local   runner.backends.local   multiprocessing on this machine (the default)
    ray     runner.backends.ray     actors on a Ray instance or cluster (the ``ray`` extra)
    inline  runner.backends.inline  every stage in this process, one after another (``--inline``, debugging)

All three take the same plan and give the same ``RunResult`` (``runner.results``); the local and Ray
drivers share their rules (``runner.backends.driver``, ``runner.backends.scheduler``). ``runner.run_pipeline``
picks one from ``settings.backend`` (or ``--backend``). Ray is imported only when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from runner.errors import UsageError

if TYPE_CHECKING:
    from runner.results import RunResult
    from runner.topology import Topology

RAY_MISSING = "the ray backend needs Ray, which is not installed: pip install -e '.[ray]' (or pip install 'mprun[ray]')"


class Backend(Protocol):
    """Runs a compiled plan to its end; a failing stage is a ``RunResult`` with an error, not an exception."""

    def run(self, topology: Topology) -> RunResult: ...


@dataclass
class Local:
    """multiprocessing on this machine; ``progress``: the live display on stderr."""

    progress: bool = False

    def run(self, topology: Topology) -> RunResult:
        from runner.backends.local.driver import Supervisor

        return Supervisor(topology, progress=self.progress).run()


@dataclass
class Ray:
    """A Ray instance: the cluster at ``address`` (default ``RAY_ADDRESS``), else a local one of its own."""

    address: str | None = None
    progress: bool = False

    def run(self, topology: Topology) -> RunResult:
        """Raises:
        UsageError: Ray is not installed, or the cluster at ``address`` cannot be reached (exit code 2).
        """
        try:
            import ray  # noqa: F401 - only to know whether it is there
        except ImportError:
            raise UsageError(RAY_MISSING) from None
        from runner.backends.ray.driver import RaySupervisor

        return RaySupervisor(topology, self.address, progress=self.progress).run()


class Inline:
    """Every stage in this process, one after another (``breakpoint()`` works)."""

    def run(self, topology: Topology) -> RunResult:
        from runner.backends.inline import run_inline

        return run_inline(topology)
