"""Validation problems -> ``FILE:LINE:COL: error: FIELD_PATH: MESSAGE`` lines, sorted by position.

A Pydantic error location (``("stages", 1, "consumer", "processes")``) is walked through the data to the
path of the node that is wrong (union tags such as ``"consumer"`` are not in the data and are dropped),
then looked up in the loader's marks.  A value that came from ``--set`` is located at that argument
(``--set stages.x.processes=0: error: ...``) since it is nowhere in the file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from pydantic import BaseModel, ValidationError

from runner.imports import suggest
from schemas import Pipeline, QueueSpec, Settings, TestCase
from schemas.stages import Consumer, FileSource, Pool, Producer, RangeSource, Source

PathKey = tuple[str | int, ...]

_KINDS: dict[str, type[Producer | Consumer | Pool]] = {"producer": Producer, "consumer": Consumer, "pool": Pool}
_SOURCES: dict[PathKey, type[BaseModel]] = {(): Source, ("range",): RangeSource, ("file",): FileSource}


class Diagnostic(str):
    """One problem: its rendered line is the string itself; its parts are attributes (for json/github).

    ``line``/``col`` are ``None`` when the problem is not in the file (a ``--set`` argument): then ``file``
    is that argument and the line reads ``--set PATH=VALUE: error: FIELD_PATH: MESSAGE``.
    """

    file: str
    line: int | None
    col: int | None
    path: str
    message: str

    def __new__(cls, file: str, line: int | None, col: int | None, path: str, message: str) -> Self:
        where = f"{file}:{line}:{col}" if line is not None else file
        self = super().__new__(cls, f"{where}: error: {path}: {message}" if path else f"{where}: error: {message}")
        self.file, self.line, self.col, self.path, self.message = file, line, col, path, message
        return self

    def sort_key(self) -> tuple[int, int, int]:
        """Command-line problems first, then by position in the file."""
        return (0, 0, 0) if self.line is None else (1, self.line, self.col or 0)

    def as_dict(self) -> dict[str, Any]:
        """The machine-readable form used by ``validate --format json``."""
        return {"file": self.file, "line": self.line, "col": self.col, "path": self.path, "message": self.message}


@dataclass
class Marks:
    """Where each node of a document starts, by path: ``values``, ``keys`` of mappings, ``origins`` of overrides.

    ``problems`` collects what the loader found before validation (duplicate keys, unset variables);
    ``bad`` holds the paths of those values, so validation errors at the same place are not repeated;
    ``interpolated`` the paths of strings that held a ``${VAR}`` reference.
    """

    filename: str
    values: dict[PathKey, tuple[int, int]] = field(default_factory=dict)
    keys: dict[PathKey, tuple[int, int]] = field(default_factory=dict)
    containers: set[PathKey] = field(default_factory=set)
    origins: dict[PathKey, str] = field(default_factory=dict)
    problems: list[Diagnostic] = field(default_factory=list)
    bad: set[PathKey] = field(default_factory=set)
    interpolated: set[PathKey] = field(default_factory=set)

    def locate(self, path: PathKey, *, key: bool = False) -> tuple[int, int]:
        """The 1-based (line, col) of ``path``, or of its nearest located ancestor.

        A mapping or list is located at its key (``source:``) rather than at its first inner node.
        """
        while path:
            if (key or path in self.containers) and path in self.keys:
                return self.keys[path]
            if path in self.values:
                return self.values[path]
            if path in self.keys:
                return self.keys[path]
            path = path[:-1]
            key = False
        return self.values.get((), (1, 1))

    def origin(self, path: PathKey) -> str | None:
        """The ``--set`` argument that put the value at ``path`` (or an ancestor) there, if one did."""
        for n in range(len(path), 0, -1):
            if path[:n] in self.origins:
                return self.origins[path[:n]]
        return None

    def error(self, path: PathKey, message: str, *, key: bool = False, shown: PathKey | None = None) -> Diagnostic:
        """A problem located at ``path``, about the field ``shown`` (default: ``path`` itself)."""
        field_path = format_path(path if shown is None else shown)
        origin = self.origin(path)
        if origin is not None:
            return Diagnostic(origin, None, None, field_path, message)
        line, col = self.locate(path, key=key)
        return Diagnostic(self.filename, line, col, field_path, message)


def format_path(path: PathKey) -> str:
    """``("stages", 1, "processes")`` -> ``stages[1].processes``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(root)"


def render(problems: list[Diagnostic]) -> list[Diagnostic]:
    """Sort problems by position and drop repeats."""
    return list(dict.fromkeys(sorted(problems, key=Diagnostic.sort_key)))


def _data_path(data: Any, loc: tuple[str | int, ...]) -> PathKey:
    """The part of ``loc`` that exists in ``data`` (union member names and tags dropped)."""
    path: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict):
            inside = part in node
        else:
            inside = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if inside:
            node = node[part]
            path.append(part)
    return tuple(path)


def model_at(data: Any, path: PathKey) -> type[BaseModel] | None:
    """The model that validates the mapping at ``path``, for suggesting known keys."""
    if not path:
        return Pipeline
    head, rest = path[0], path[1:]
    if head == "settings" and not rest:
        return Settings
    if head == "queues" and len(rest) == 1:
        return QueueSpec
    if head == "stages" and rest and isinstance(rest[0], int):
        stage = data["stages"][rest[0]] if isinstance(data.get("stages"), list) else {}
        kind = stage.get("kind") if isinstance(stage, dict) else None
        model = _KINDS.get(kind) if isinstance(kind, str) else None
        tail = rest[1:]
        if not tail:
            return model
        if tail[0] == "source":
            return _SOURCES.get(tuple(tail[1:]))
    if head == "tests" and rest and isinstance(rest[0], int):
        tail = rest[1:]
        if not tail:
            return TestCase
        if tail[0] == "sources" and len(tail) >= 2:
            return _SOURCES.get(tuple(tail[2:]))
    return None


def field_accepts(data: Any, path: PathKey, value: Any) -> bool:
    """Whether the schema field holding ``path`` may take ``value`` as it is (its type, or ``Any``).

    The field is that of the nearest model above ``path`` (``kwargs`` for ``stages[0].kwargs.n``); a
    path under no known model accepts anything.
    """
    for k in range(len(path) - 1, -1, -1):
        model = model_at(data, path[:k]) if isinstance(data, dict) else None
        if model is None:
            continue
        found = [f for name, f in model.model_fields.items() if path[k] in (name, f.alias)]
        if not found:
            return True
        leaves = _leaf_types(found[0].annotation)
        return Any in leaves or type(value) in leaves or (type(value) is int and float in leaves)
    return True


def _leaf_types(annotation: Any) -> set[Any]:
    """The types a value of ``annotation`` may have at its leaves (unions, lists, dicts and Literals flattened)."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any or annotation is None or annotation is type(None):
        return {Any} if annotation is Any else {type(None)}
    if origin is typing.Literal:
        return {type(a) for a in args}
    if origin is typing.Annotated:
        return _leaf_types(args[0])
    if origin in (typing.Union, types.UnionType, list, dict, tuple, set):
        return set().union(*(_leaf_types(a) for a in args)) if args else {Any}
    return {annotation}


def unknown_key_message(data: Any, parent: PathKey, key: str) -> str:
    """``unknown key 'x'`` with the closest known key, or the list of known keys."""
    model = model_at(data, parent)
    message = f"unknown key {key!r}"
    if model is not None:
        known = list(model.model_fields)
        message += suggest(str(key), known) or f"; expected one of {', '.join(known)}"
    return message


def _with_value(message: str, err: Mapping[str, Any]) -> str:
    """Add what was found, and the closest allowed value for a choice (``literal_error``)."""
    value = err.get("input")
    if err["type"] == "value_error":  # a check of ours: its message already says what was found
        return message
    if not isinstance(value, str | int | float | bool) or value is None:
        return message
    if err["type"] == "literal_error":
        allowed = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
        hint = suggest(str(value), allowed) if isinstance(value, str) else ""
        return f"{message}, got {value!r}{hint}"
    return f"{message}, got {value!r}"


def from_validation_error(error: ValidationError, data: Any, marks: Marks) -> list[Diagnostic]:
    """Every error of a Pydantic validation, located in the file (one per node: union branches merged)."""
    by_path: dict[tuple[PathKey, PathKey, bool], list[str]] = {}
    for err in error.errors(include_url=False):
        loc = tuple(err["loc"])
        path = _data_path(data, loc)
        kind = err["type"]
        key = False
        shown = path  # the field path in the message; ``path`` is where it is located
        if kind == "extra_forbidden":
            message, key = unknown_key_message(data, path[:-1], str(path[-1])), True
        elif kind == "missing":
            missing = loc[-1]
            shown = (*path, missing)
            message = f"missing required key {missing!r}"
            model = model_at(data, path)
            if isinstance(missing, str) and model is not None and missing in model.model_fields:
                description = model.model_fields[missing].description
                message += f" ({description[0].lower()}{description[1:].rstrip('.')})" if description else ""
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            got = err.get("ctx", {}).get("tag")
            allowed = "producer, consumer, pool"
            if kind == "union_tag_invalid":
                path = shown = (*path, "kind")
                message = f"unknown kind {got!r}; expected one of {allowed}" + suggest(str(got), list(_KINDS))
            else:
                shown = (*path, "kind")
                message = f"missing required key 'kind'; expected one of {allowed}"
        else:
            message = _with_value(str(err["msg"]).removeprefix("Value error, "), err)
        if path in marks.bad:
            continue
        messages = by_path.setdefault((path, shown, key), [])
        if message not in messages:
            messages.append(message)
    return [
        marks.error(path, _merge(messages), key=key, shown=shown) for (path, shown, key), messages in by_path.items()
    ]


def _merge(messages: list[str]) -> str:
    """One message for the branches of a union that all failed at one node."""
    if len(messages) == 1:
        return messages[0]
    # "Input should be a valid string, got 5" + "Input should be a valid list, got 5"
    # -> "Input should be a valid string or a valid list, got 5"
    stems = [m.split(", got ")[0].removeprefix("Input should be ") for m in messages]
    got = messages[0].split(", got ", 1)[1] if ", got " in messages[0] else None
    if all(m.startswith("Input should be ") for m in messages):
        text = "Input should be " + " or ".join(stems)
        return f"{text}, got {got}" if got else text
    return "; ".join(messages)
