"""A ``yaml.SafeLoader`` that bounds what a document may cost and refuses tags the format does not define.

    text --(at most MAX_BYTES)--> BoundedLoader.compose_node, for every event:
        a tag other than the core ones (str, int, float, bool, null, seq, map) -> LimitExceeded at the tag
        nesting deeper than MAX_DEPTH                                         -> LimitExceeded there
        an alias: the values it stands for are added to a count; past MAX_ALIAS_VALUES -> LimitExceeded there
        an alias inside the node it names (a structure that contains itself)  -> LimitExceeded there

Pipeline files are read by CI jobs from pull requests, so a file must not be able to take unbounded time
or memory (a "billion laughs" alias bomb expands 9 aliases of 9 aliases... into 387 million values; 500
nested lists exhaust Python's recursion) nor smuggle a tag such as ``!!python/object`` past validation.
Everything is counted while the node tree is composed, before any value is built, so a refused file costs
about the time it takes to parse it.  Kept free of pydantic: ``mprun run`` parses with it in a warm-up
thread before the schemas are imported.
"""

from __future__ import annotations

from typing import Any

import yaml

from runner.limits import MAX_ALIAS_VALUES, MAX_BYTES, MAX_DEPTH

_CORE = "tag:yaml.org,2002:"
ALLOWED_TAGS = frozenset({None, "!", *(_CORE + t for t in ("str", "int", "float", "bool", "null", "seq", "map"))})


class LimitExceeded(yaml.MarkedYAMLError):
    """The document passed one of the limits, or carries a tag the format does not define; ``problem_mark`` is where.

    ``field`` is the FIELD_PATH part of its diagnostic line: ``(file)`` for a limit, ``YAML syntax`` for a tag.
    """

    problem_mark: Any  # always given

    def __init__(self, problem: str, mark: Any, field: str = "(file)") -> None:
        super().__init__(problem=problem, problem_mark=mark)
        self.field = field


def shown_tag(tag: str) -> str:
    """A tag as it is written in a file: ``!!python/object:os.system`` rather than its long form."""
    return "!!" + tag.removeprefix(_CORE) if tag.startswith(_CORE) else tag


class BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with the limits above checked as the node tree is composed."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        self._count = 0  # values composed so far, an alias counting as every value it stands for
        self._aliased = 0  # of which through aliases
        self._sizes: dict[str, int] = {}  # anchor -> values of its node
        self._open: set[str] = set()  # anchors whose node is being composed

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                msg = (f"alias *{event.anchor} is inside the node it names: "
                       "a structure that contains itself cannot be loaded")
                raise LimitExceeded(msg, event.start_mark)
            node = super().compose_node(parent, index)
            size = self._sizes.get(str(event.anchor), 1)
            self._count += size
            self._aliased += size
            if self._aliased > MAX_ALIAS_VALUES:
                msg = (f"aliases stand for more than {MAX_ALIAS_VALUES:,} values once expanded (alias *{event.anchor} "
                       f"adds {size:,}): the limit of a pipeline file, against alias bombs")
                raise LimitExceeded(msg, event.start_mark)
            return node
        tag = getattr(event, "tag", None)
        if tag not in ALLOWED_TAGS:
            msg = (f"tag {shown_tag(str(tag))!r} is not part of the pipeline format: a pipeline file holds "
                   "plain values (strings, numbers, booleans, null, lists, mappings); remove the tag")
            raise LimitExceeded(msg, event.start_mark, "YAML syntax")
        if self._depth >= MAX_DEPTH:
            msg = f"lists and mappings are nested more than {MAX_DEPTH} levels deep: the limit of a pipeline file"
            raise LimitExceeded(msg, event.start_mark)
        anchor = getattr(event, "anchor", None)
        before = self._count
        self._depth += 1
        if anchor is not None:
            self._open.add(anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open.discard(anchor)
        self._count += 1
        if anchor is not None:
            self._sizes[anchor] = self._count - before
        return node


def too_large(raw: bytes) -> tuple[int, int] | None:
    """The (line, column) where a file passes ``MAX_BYTES``, or None when it is within the limit."""
    if len(raw) <= MAX_BYTES:
        return None
    head = raw[:MAX_BYTES]
    return head.count(b"\n") + 1, MAX_BYTES - head.rfind(b"\n")


def too_large_message(size: int) -> str:
    """What a file larger than ``MAX_BYTES`` is told."""
    return (f"the file is {size:,} bytes, more than the {MAX_BYTES:,} a pipeline file may have; "
            "put data in a file source (source: {file: {path: ...}}) rather than in the pipeline")
