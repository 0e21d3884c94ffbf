"""Functions the broken pipelines of this folder refer to: some fine, some that a worker cannot use."""

from __future__ import annotations

LIMIT = 3  # not callable


def doubler(x: int) -> int:
    """A correct stage function."""
    return x * 2


def _make() -> object:
    def inner(x: int) -> int:
        return x

    return inner


shout = lambda x: str(x).upper()  # noqa: E731 - a lambda on purpose: it cannot be pickled by name
closure = _make()
