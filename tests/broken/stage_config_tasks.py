"""Classes and functions the stage-configuration pipelines of this folder refer to (SPEC 1b)."""

from __future__ import annotations

import runner


class NoCall:
    """A class whose instances cannot be called."""

    def __init__(self, factor: int = 2) -> None:
        self.factor = factor


class BadClose:
    """Callable instances, but ``close`` is a value."""

    close = 5

    def __call__(self, item: int) -> int:
        return item


class Scale:
    """A correct class stage: made with ``factor``, called with each item."""

    def __init__(self, factor: int = 2) -> None:
        self.factor = factor

    def __call__(self, item: int) -> object:
        if item < 0:
            return runner.route("negative", item)
        return item * self.factor


def triage(item: int) -> object:
    """Sends items to routes 'small', 'big' and (a typo) 'hgue'."""
    from runner import route

    if item < 10:
        return route("small", item)
    if item < 100:
        return runner.route("big", item)
    return runner.route("hgue", item)
