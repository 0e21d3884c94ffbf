"""Validation problems -> ``FILE:LINE:COL: error: FIELD_PATH: MESSAGE`` lines, sorted by position.

A Pydantic error location (``("stages", 1, "consumer", "processes")``) is walked through the data to the
path of the node that is wrong (union tags such as ``"consumer"`` are not in the data and are dropped),
then looked up in the loader's marks.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

from runner.loader import Marks, PathKey
from schemas import Pipeline, QueueSpec, Settings
from schemas.stages import Consumer, FileSource, Pool, Producer, RangeSource, Source

_KINDS: dict[str, type[BaseModel]] = {"producer": Producer, "consumer": Consumer, "pool": Pool}


def format_path(path: PathKey) -> str:
    """``("stages", 1, "processes")`` -> ``stages[1].processes``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(root)"


def diagnostic(marks: Marks, path: PathKey, message: str, *, key: bool = False) -> tuple[int, int, str]:
    """One located problem as (line, col, text)."""
    line, col = marks.locate(path, key=key)
    return line, col, f"{marks.filename}:{line}:{col}: error: {format_path(path)}: {message}"


def render(problems: list[tuple[int, int, str]]) -> list[str]:
    """Sort located problems by position and drop repeats."""
    return list(dict.fromkeys(text for _, _, text in sorted(problems, key=lambda p: (p[0], p[1]))))


def _data_path(data: Any, loc: tuple[str | int, ...]) -> tuple[PathKey, bool]:
    """The part of ``loc`` that exists in ``data``, and whether the whole of it did."""
    path: list[str | int] = []
    node = data
    found = True
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
            path.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            path.append(part)
        else:
            found = False
    return tuple(path), found


def _model_at(data: Any, path: PathKey) -> type[BaseModel] | None:
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
            return {(): Source, ("range",): RangeSource, ("file",): FileSource}.get(tuple(tail[1:]))
    return None


def _unknown_key(data: Any, parent: PathKey, key: str) -> str:
    model = _model_at(data, parent)
    message = f"unknown key {key!r}"
    if model is not None:
        known = list(model.model_fields)
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        if close:
            message += f"; did you mean {close[0]!r}?"
        else:
            message += f"; expected one of {', '.join(known)}"
    return message


def from_validation_error(error: ValidationError, data: Any, marks: Marks) -> list[tuple[int, int, str]]:
    """Every error of a Pydantic validation, located in the file."""
    problems = []
    for err in error.errors(include_url=False):
        path, found = _data_path(data, tuple(err["loc"]))
        kind = err["type"]
        if kind == "extra_forbidden":
            problems.append(diagnostic(marks, path, _unknown_key(data, path[:-1], str(path[-1])), key=True))
        elif kind == "missing":
            missing = err["loc"][-1]
            problems.append(diagnostic(marks, (*path, missing), f"missing required key {missing!r}"))
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            where = (*path, "kind") if kind == "union_tag_invalid" else path
            allowed = "producer, consumer, pool"
            got = err.get("ctx", {}).get("tag")
            text = f"unknown kind {got!r}; expected one of {allowed}" if got else f"missing 'kind'; expected one of {allowed}"
            problems.append(diagnostic(marks, where, text))
        else:
            message = str(err["msg"]).removeprefix("Value error, ")
            problems.append(diagnostic(marks, path, message))
        del found
    return problems
