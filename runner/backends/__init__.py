"""Where a compiled ``Topology`` runs: ``local`` (multiprocessing, ``runner.supervisor``) or ``ray``.

Both take the same plan and give the same ``RunResult``; ``runner.run_pipeline`` picks one from
``settings.backend`` (or ``--backend``).  Ray is an optional extra, imported only when asked for.
"""

from __future__ import annotations

from typing import Any

from runner.errors import UsageError

RAY_MISSING = "the ray backend needs Ray, which is not installed: pip install -e '.[ray]' (or pip install 'mprun[ray]')"


def run_on_ray(topology: Any, address: str | None = None) -> Any:
    """Run ``topology`` on Ray (``runner.backends.ray``); a one-line ``UsageError`` if Ray is missing.

    Raises:
        UsageError: Ray is not installed, or the cluster at ``address`` cannot be reached (exit code 2).
    """
    try:
        import ray  # noqa: F401 - only to know whether it is there
    except ImportError:
        raise UsageError(RAY_MISSING) from None
    from runner.backends.ray import RaySupervisor

    return RaySupervisor(topology, address).run()
