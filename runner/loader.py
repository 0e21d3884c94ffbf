"""YAML text -> plain data with the (line, column) of every key and value -> a validated ``Pipeline``.

Only ``yaml.SafeLoader`` is used: the node tree is composed safely, then converted to Python data while
the start mark of each node is recorded by its path (``("stages", 1, "processes")``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from runner.errors import PipelineInvalid
from schemas import Pipeline, topology_problems

PathKey = tuple[str | int, ...]


@dataclass
class Marks:
    """Where each node of a document starts: ``values`` by path, and ``keys`` for mapping keys."""

    filename: str
    values: dict[PathKey, tuple[int, int]] = field(default_factory=dict)
    keys: dict[PathKey, tuple[int, int]] = field(default_factory=dict)

    def locate(self, path: PathKey, *, key: bool = False) -> tuple[int, int]:
        """The 1-based (line, col) of ``path``, or of its nearest located ancestor."""
        table = self.keys if key else self.values
        while path:
            if path in table:
                return table[path]
            if not key and path in self.keys:
                return self.keys[path]
            path = path[:-1]
            table = self.values
        return self.values.get((), (1, 1))


def parse_yaml(text: str, filename: str) -> tuple[Any, Marks]:
    """Parse one YAML document into data and the marks of its nodes.

    Raises:
        PipelineInvalid: a syntax error, located where the parser stopped.
    """
    marks = Marks(filename)
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = _convert(loader, node, (), marks) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = " ".join(str(p) for p in (e.context, e.problem) if p)
        raise PipelineInvalid([f"{filename}:{line}:{col}: error: YAML syntax: {problem}"]) from None
    except yaml.YAMLError as e:
        raise PipelineInvalid([f"{filename}:1:1: error: YAML syntax: {e}"]) from None
    finally:
        loader.dispose()
    return data, marks


def _convert(loader: yaml.SafeLoader, node: yaml.Node, path: PathKey, marks: Marks) -> Any:
    marks.values[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                mark = key_node.start_mark
                msg = f"{marks.filename}:{mark.line + 1}:{mark.column + 1}: error: a mapping key must be a scalar"
                raise PipelineInvalid([msg])
            marks.keys[(*path, key)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            result[key] = _convert(loader, value_node, (*path, key), marks)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_convert(loader, child, (*path, i), marks) for i, child in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def read_document(path: str | Path) -> tuple[Any, Marks]:
    """Read and parse a pipeline file.

    Raises:
        PipelineInvalid: the file cannot be read or parsed.
    """
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise PipelineInvalid([f"{name}:1:1: error: cannot read the file: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise PipelineInvalid([f"{name}:1:1: error: the file is not UTF-8: {e.reason}"]) from None
    return parse_yaml(text, name)


def validate(data: Any, marks: Marks) -> Pipeline:
    """Validate parsed data as a ``Pipeline``, then check its topology.

    Raises:
        PipelineInvalid: with every problem found, located.
    """
    from pydantic import ValidationError

    from runner import diagnostics

    if not isinstance(data, dict):
        raise PipelineInvalid([f"{marks.filename}:1:1: error: (root): a pipeline file must be a mapping with 'stages'"])
    try:
        pipeline = Pipeline.model_validate(data)
    except ValidationError as e:
        raise PipelineInvalid(diagnostics.render(diagnostics.from_validation_error(e, data, marks))) from None
    problems = [diagnostics.diagnostic(marks, path, message) for path, message in topology_problems(pipeline)]
    if problems:
        raise PipelineInvalid(diagnostics.render(problems))
    if pipeline.name is None:
        pipeline.name = Path(marks.filename).stem
    return pipeline


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    """Load, validate and check a pipeline file.

    Args:
        path: the YAML file.
        overrides: ``PATH=VALUE`` strings applied before validation (``stages.doubler.processes=2``).

    Raises:
        PipelineInvalid: every problem in the file, one located line each.
    """
    data, marks = read_document(path)
    if overrides:
        from runner.overrides import apply_overrides

        data = apply_overrides(data, overrides, marks)
    pipeline = validate(data, marks)
    pipeline._base_dir = str(Path(path).resolve().parent)
    return pipeline
