"""``--set PATH=VALUE``: change a value of the parsed file before it is validated.

PATH is dotted; a stage is addressed by its name (``stages.doubler.processes=2``) or its index
(``stages.0.processes=2``), a list item by its index, a mapping entry by its key; missing mappings on
the way are created (``queues.numbers.maxsize=10`` with no ``queues:`` in the file).  VALUE is parsed
as YAML (safely): ``2`` is a number, ``[1, 2]`` a list, ``debug`` a string.  The new value is
validated like the file; problems with it are located at the ``--set`` argument.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from runner.diagnostics import Diagnostic, Marks, PathKey, suggest
from runner.errors import PipelineInvalid
from runner.safeyaml import BoundedLoader


class _BadPath(ValueError):
    """An override whose PATH does not lead anywhere; the message says why."""


def apply_overrides(data: Any, overrides: list[str], marks: Marks) -> Any:
    """Return a copy of ``data`` with every ``PATH=VALUE`` override applied, in order.

    Raises:
        PipelineInvalid: an override is not ``PATH=VALUE``, its VALUE is not YAML, or its PATH leads
            nowhere (``--set stages.nope.processes=2: error: no stage named 'nope'``); all of them at once.
    """
    data = copy.deepcopy(data) if data is not None else {}
    problems: list[Diagnostic] = []
    for override in overrides:
        label = f"--set {override}"
        dotted, sep, text = override.partition("=")
        if not sep or not dotted.strip():
            problems.append(Diagnostic(label, None, None, "", "expected PATH=VALUE, e.g. stages.doubler.processes=2"))
            continue
        try:
            value = yaml.load(text, Loader=BoundedLoader)
        except yaml.YAMLError as e:
            problems.append(Diagnostic(label, None, None, "", f"VALUE is not valid YAML: {_first_line(e)}"))
            continue
        try:
            path = _set(data, [p.strip() for p in dotted.split(".")], value)
        except _BadPath as e:
            problems.append(Diagnostic(label, None, None, "", str(e)))
            continue
        marks.origins[path] = label
    if problems:
        raise PipelineInvalid(problems)
    return data


def set_path(data: Any, dotted: str, value: Any) -> PathKey:
    """Put ``value`` at the dotted PATH of ``data`` in place, as ``--set`` does; the path it resolved to.

    Raises:
        ValueError: the PATH leads nowhere; the message says why.
    """
    return _set(data, [p.strip() for p in dotted.split(".")], value)


def _first_line(error: yaml.YAMLError) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _set(data: Any, parts: list[str], value: Any) -> PathKey:
    """Put ``value`` at the dotted ``parts`` of ``data``.

    Returns the resolved path (stage names -> indexes), cut at the first mapping the override created:
    what comes from the command line, where problems with it are located.
    """
    if not isinstance(data, dict):
        msg = "the file is not a mapping, so there is nothing to set"
        raise _BadPath(msg)
    node: Any = data
    path: list[str | int] = []
    created: PathKey | None = None
    for n, part in enumerate(parts):
        last = n == len(parts) - 1
        where = ".".join(map(str, parts[:n])) or "the file"
        if not part:
            msg = f"empty name in PATH {'.'.join(parts)!r}"
            raise _BadPath(msg)
        if isinstance(node, list):
            index = _index(node, part, path)
            path.append(index)
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            msg = f"{where} is a {type(node).__name__}, not a mapping, so it has no {part!r}"
            raise _BadPath(msg)
        path.append(part)
        if part not in node:
            created = created or tuple(path)
        if last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
    return created or tuple(path)


def _index(items: list[Any], part: str, path: list[str | int]) -> int:
    """The list index ``part`` names: a number, or (in ``stages``) a stage name."""
    if part.lstrip("-").isdigit():
        index = int(part)
        if not -len(items) <= index < len(items):
            msg = f"index {index} is out of range: {'.'.join(map(str, path))} has {len(items)} items"
            raise _BadPath(msg)
        return index % len(items)
    if path == ["stages"]:
        names = [s.get("name") for s in items if isinstance(s, dict)]
        if part in names:
            return names.index(part)
        known = [str(n) for n in names if n is not None]
        msg = f"no stage named {part!r}" + (suggest(part, known) or f"; stages: {', '.join(known)}")
        raise _BadPath(msg)
    msg = f"{'.'.join(map(str, path))} is a list: address its items by index, not {part!r}"
    raise _BadPath(msg)
