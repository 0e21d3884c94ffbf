"""YAML text -> plain data with the (line, column) of every key and value -> a validated ``Pipeline``.

    file --read (UTF-8)--> text --parse (SafeLoader nodes)--> data + Marks
         --apply --set overrides--> --interpolate ${VAR}--> --Pydantic--> Pipeline --topology checks--> ok
    every step adds located problems; all of them are raised together as one ``PipelineInvalid``

Only ``yaml.SafeLoader`` is used, through ``runner.safeyaml.BoundedLoader``: the node tree is composed
safely, within limits (file size, nesting depth, values behind aliases; core tags only), then converted
to Python data while the start mark of each node is recorded by its path (``("stages", 1, "processes")``).
Duplicate keys, which PyYAML silently accepts (the last one wins), are reported.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from runner import diagnostics
from runner.diagnostics import Diagnostic, Marks, PathKey
from runner.errors import PipelineInvalid
from runner.limits import MAX_BYTES
from runner.safeyaml import BoundedLoader, LimitExceeded, too_large, too_large_message
from schemas import Pipeline, QueueSpec, topology_problems

__all__ = ["Marks", "PathKey", "check", "interpolate", "load_pipeline", "parse_yaml", "read_document"]

# The stage keys the topology checks are built from: when one of them is invalid, the topology is not
# checked (its findings would be guesses), otherwise topology problems are reported with schema errors.
STRUCTURAL = ("name", "kind", "input", "output", "after", "daemon", "dead_letter", "lock")


def _syntax_error(filename: str, line: int, col: int, message: str) -> PipelineInvalid:
    return PipelineInvalid([Diagnostic(filename, line, col, "YAML syntax", message)])


def parse_yaml(text: str, filename: str) -> tuple[Any, Marks]:
    """Parse one YAML document into data and the marks of its nodes.

    Raises:
        PipelineInvalid: a syntax error, located where the parser stopped.
    """
    marks = Marks(filename)
    loader = BoundedLoader(text)
    try:
        node = loader.get_single_node()
        data = _convert(loader, node, (), marks) if node is not None else None
    except LimitExceeded as e:
        mark = e.problem_mark
        raise PipelineInvalid([Diagnostic(filename, mark.line + 1, mark.column + 1, e.field, str(e.problem))]) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = " ".join(str(p) for p in (e.context, e.problem) if p)
        if "'\\t'" in problem:
            problem += " (YAML does not allow tabs for indentation: use spaces)"
        raise _syntax_error(filename, line, col, problem) from None
    except yaml.YAMLError as e:
        raise _syntax_error(filename, 1, 1, str(e)) from None
    finally:
        loader.dispose()
    return data, marks


def _convert(loader: BoundedLoader, node: yaml.Node, path: PathKey, marks: Marks) -> Any:
    marks.values[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        marks.containers.add(path)
        loader.flatten_mapping(node)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            where = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if isinstance(key, list | dict):
                line, col = where
                problem = "a mapping key must be a plain value, not a list or mapping"
                marks.problems.append(Diagnostic(marks.filename, line, col, diagnostics.format_path(path), problem))
                continue
            if key in result:
                first = marks.keys[(*path, key)][0]
                line, col = where
                problem = f"duplicate key {key!r} (first at line {first}; the last one would win)"
                field = diagnostics.format_path((*path, key))
                marks.problems.append(Diagnostic(marks.filename, line, col, field, problem))
                marks.bad.add((*path, key))
            marks.keys[(*path, key)] = where
            result[key] = _convert(loader, value_node, (*path, key), marks)
        return result
    if isinstance(node, yaml.SequenceNode):
        marks.containers.add(path)
        return [_convert(loader, child, (*path, i), marks) for i, child in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def read_document(path: str | Path) -> tuple[Any, Marks]:
    """Read and parse a pipeline file.

    Raises:
        PipelineInvalid: the file cannot be read, is not UTF-8, or is not valid YAML.
    """
    name = str(path)
    try:
        with Path(path).open("rb") as f:
            raw = f.read(MAX_BYTES + 1)  # never more than the limit in memory
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise PipelineInvalid([Diagnostic(name, 1, 1, "(file)", f"cannot read the file: {e.strerror or e}")]) from None
    where = too_large(raw)
    if where is not None:
        raise PipelineInvalid([Diagnostic(name, *where, "(file)", too_large_message(max(size, len(raw))))])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        before = raw[: e.start].decode("utf-8", errors="replace")
        line, col = before.count("\n") + 1, len(before) - before.rfind("\n")
        message = f"the file is not UTF-8: byte 0x{raw[e.start]:02x} ({e.reason}); save it as UTF-8"
        raise PipelineInvalid([Diagnostic(name, line, col, "(file)", message)]) from None
    return parse_yaml(text, name)


# ${VAR}, ${VAR:-default}, ${VAR:?message}; $${ is a literal ${.
_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_INNER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)(.*))?", re.DOTALL)


def interpolate(
    data: Any, marks: Marks, environ: Mapping[str, str] | None = None, path: PathKey = (), root: Any = None
) -> Any:
    """Replace ``${VAR}`` references in every string value from the environment.

    ``${VAR:-default}`` uses ``default`` when VAR is unset or empty; ``${VAR:?message}`` is an error with
    ``message`` then; ``$${`` stands for a literal ``${``.  A value that is exactly one reference takes the
    YAML type of its text where its field takes that type (``_typed``).  Problems go to ``marks.problems``.
    """
    env = os.environ if environ is None else environ
    root = data if root is None else root
    if isinstance(data, dict):
        return {k: interpolate(v, marks, env, (*path, k), root) for k, v in data.items()}
    if isinstance(data, list):
        return [interpolate(v, marks, env, (*path, i), root) for i, v in enumerate(data)]
    if not isinstance(data, str) or "${" not in data:
        return data
    if any(m.group(1) is not None for m in _REFERENCE.finditer(data)):
        marks.interpolated.add(path)

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        inner = _INNER.fullmatch(match.group(1))
        if inner is None:
            problem(
                f"invalid variable reference {match.group(0)!r}: "
                "expected ${NAME}, ${NAME:-default} or ${NAME:?message}"
            )
            return match.group(0)
        name, op, arg = inner.groups()
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == ":?" and not value:
            state = "empty" if value == "" else "not set"
            problem(f"environment variable {name!r} is {state}: {arg or 'it is required'}")
            return match.group(0)
        if value is None:
            problem(f"environment variable {name!r} is not set (set it, or write ${{{name}:-default}})")
            return match.group(0)
        return value

    def problem(message: str) -> None:
        marks.problems.append(marks.error(path, message))
        marks.bad.add(path)

    text = _REFERENCE.sub(replace, data)
    whole = _REFERENCE.fullmatch(data)
    if whole is None or whole.group(1) is None or path in marks.bad:
        return text
    return _typed(text, root, path)


def _typed(text: str, root: Any, path: PathKey) -> Any:
    """The YAML scalar ``text`` stands for (int, float, bool, null) if its field takes that, else ``text``.

    A value that is exactly one ``${VAR}`` reference gets the type of what VAR holds, as if written in the
    file (``n: ${N}`` with N=500 is the number 500); booleans are only ``true``/``false``, not ``yes``/``on``.
    """
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text
    if value is not None and not isinstance(value, int | float):
        return text
    return value if diagnostics.field_accepts(root, path, value) else text


def _structural(err: Mapping[str, Any]) -> bool:
    """Whether a schema error touches what the topology is built from (then it is not checked)."""
    loc = [p for p in err["loc"] if p not in ("producer", "consumer", "pool")]
    if not loc or loc[0] != "stages":
        return loc == ["queues"]
    if len(loc) < 2 or err["type"].startswith("union_tag"):
        return True
    if len(loc) == 2:
        return False
    name = str(loc[2])
    if err["type"] == "extra_forbidden":
        return bool(difflib.get_close_matches(name, STRUCTURAL, n=1, cutoff=0.6))
    return name in STRUCTURAL


def _structure_only(data: dict[str, Any]) -> Pipeline:
    """A ``Pipeline`` holding only the (valid) structural keys of ``data``, built without validation."""
    from runner.diagnostics import _KINDS

    stages = [
        _KINDS[s["kind"]].model_construct(**{k: v for k, v in s.items() if k in STRUCTURAL}) for s in data["stages"]
    ]
    queues = {name: QueueSpec.model_construct() for name in data.get("queues") or {}}
    return Pipeline.model_construct(stages=stages, queues=queues)


def check(data: Any, marks: Marks) -> tuple[Pipeline | None, list[Diagnostic]]:
    """Validate parsed data as a ``Pipeline`` and check its topology; every problem, sorted.

    The problems the loader found (duplicate keys, unset variables) come first in the list, then schema
    errors, then topology problems (also when the schema failed, if the structural keys are valid).
    """
    problems = list(marks.problems)
    if data is None:
        empty = "the file is empty; a pipeline needs at least 'stages'"
        problems.append(Diagnostic(marks.filename, 1, 1, "(root)", empty))
        return None, diagnostics.render(problems)
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a {type(data).__name__} value"
        message = f"a pipeline file must be a mapping with 'stages', not {kind}"
        problems.append(marks.error((), message))
        return None, diagnostics.render(problems)
    pipeline: Pipeline | None = None
    try:
        pipeline = Pipeline.model_validate(data)
        shape: Pipeline | None = pipeline
    except ValidationError as e:
        problems += diagnostics.from_validation_error(e, data, marks)
        structural = any(_structural(err) for err in e.errors(include_url=False))
        shape = None if structural else _structure_only(data)
    if shape is not None:
        problems += [marks.error(path, message) for path, message in topology_problems(shape)]
    if pipeline is not None and pipeline.name is None:
        pipeline.name = Path(marks.filename).stem
    return (pipeline if not problems else None), diagnostics.render(problems)


def validate(data: Any, marks: Marks) -> Pipeline:
    """Validate parsed data as a ``Pipeline``, then check its topology.

    Raises:
        PipelineInvalid: with every problem found, located.
    """
    pipeline, problems = check(data, marks)
    if pipeline is None:
        raise PipelineInvalid(problems)
    return pipeline


def load_document(path: str | Path, overrides: list[str] | None = None) -> tuple[Any, Marks]:
    """Read a file, apply ``--set`` overrides and interpolate ``${VAR}``: the data about to be validated.

    Raises:
        PipelineInvalid: the file cannot be read or parsed, or an override is malformed.
    """
    data, marks = read_document(path)
    if overrides:
        from runner.overrides import apply_overrides

        data = apply_overrides(data, overrides, marks)
    return interpolate(data, marks), marks


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    """Load, validate and check a pipeline file.

    Args:
        path: the YAML file.
        overrides: ``PATH=VALUE`` strings applied before validation (``stages.doubler.processes=2``).

    Raises:
        PipelineInvalid: every problem in the file, one located line each.
    """
    data, marks = load_document(path, overrides)
    pipeline = validate(data, marks)
    pipeline._base_dir = str(Path(path).resolve().parent)
    pipeline._marks = marks
    return pipeline
