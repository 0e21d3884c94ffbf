"""``mprun new NAME``: write a pipeline file and its tasks module that validate, run and pass ``mprun test``.

    DIR/NAME.yaml   producer (range 1..5) --numbers--> square (consumer, 2 processes) --squares--> results (collect)
                    with the schema modeline, a header comment and a ``tests:`` case
    DIR/NAME.py     the stage function ``square``, imported as ``NAME:square``
    schemas/pipeline.schema.json   the JSON Schema the modeline points at, written when none is found

The modeline points at the nearest ``schemas/pipeline.schema.json`` in DIR or a folder above it; when there
is none, ``mprun new`` writes one (``mprun schema`` output) into the current folder (the project's root) if
DIR is inside it, else into DIR, so the editor finds the schema wherever the pipeline is written.
"""

from __future__ import annotations

import importlib.util
import keyword
import os
import re
import sys
from pathlib import Path

import yaml

from runner.errors import UsageError

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SCHEMA = Path("schemas", "pipeline.schema.json")  # where the modeline points, from a folder holding the project

PIPELINE = """\
# yaml-language-server: $schema={schema}
# {name}: numbers -> square (2 processes) -> collect. A starting point: edit the stages and {name}.py, then
#   mprun validate {yaml_path}    check it (every mistake located, nothing started)
#   mprun test {yaml_path}        run the tests: cases below
#   mprun {yaml_path}             run it: prints the collected squares as one JSON array
version: 1
name: {name_value}
description: Square numbers in two processes and collect the results.

queues:
  numbers: {{type: fifo, maxsize: 1000}}   # producer -> square

stages:
  - name: numbers
    kind: producer
    source: {{range: {{start: 1, stop: 6}}}}   # or items: [...], function: module:attr, file: {{path: ...}}
    output: numbers

  - name: square
    kind: consumer                 # N processes, each: get -> function -> put
    processes: 2
    input: numbers
    function: {module}:square
    output: squares

  - name: results
    kind: consumer
    input: squares
    function: collect              # built-in: the items are printed as one JSON array at the end

tests:
  - name: squares three numbers
    sources: {{numbers: {{items: [1, 2, 3]}}}}   # replaces the producer's source in this case
    expect: {{squares: [1, 4, 9]}}              # every item that flowed through queue 'squares', any order
"""

TASKS = '''\
"""Stage functions of the {name} pipeline ({yaml_name}).

A function gets one item (plus the stage's kwargs) and returns the item to emit: return None to emit
nothing, or yield to emit several. It runs in a child process: keep it a module-level function.
"""

from __future__ import annotations


def square(number: int) -> int:
    """Square a number."""
    return number * number
'''


def check_name(name: str) -> None:
    """Raise ``UsageError`` unless ``name`` can name a pipeline and an importable tasks module."""
    if not NAME_RE.fullmatch(name) or keyword.iskeyword(name):
        msg = f"invalid name {name!r}: use letters, digits and _, not starting with a digit (it names a Python module)"
        raise UsageError(msg)
    if name in sys.stdlib_module_names or name in sys.builtin_module_names or importlib.util.find_spec(name):
        msg = f"invalid name {name!r}: {name}.py would shadow the installed module {name!r}; pick another name"
        raise UsageError(msg)


def scaffold(name: str, directory: str | Path = "pipelines") -> list[Path]:
    """Write ``DIR/NAME.yaml`` and ``DIR/NAME.py``; return their paths.

    Raises:
        UsageError: a bad name, or one of the files exists already (nothing is written then).
    """
    check_name(name)
    folder = Path(directory)
    yaml_path, py_path = folder / f"{name}.yaml", folder / f"{name}.py"
    existing = [str(p) for p in (yaml_path, py_path) if p.exists()]
    if existing:
        msg = f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: not overwriting"
        raise UsageError(msg)
    schema_path = _find_schema(folder)
    schema = Path(os.path.relpath(schema_path.resolve(), folder.resolve())).as_posix()
    name_value = name if yaml.safe_load(name) == name else f"'{name}'"
    written = [yaml_path, py_path]
    try:
        if not schema_path.exists():
            from runner.schema import schema_json

            schema_path.parent.mkdir(parents=True, exist_ok=True)
            schema_path.write_text(schema_json(), encoding="utf-8")
            written.append(schema_path)
        folder.mkdir(parents=True, exist_ok=True)
        yaml_path.write_text(
            PIPELINE.format(
                schema=schema, name=name, name_value=name_value, module=name, yaml_path=yaml_path.as_posix()
            ),
            encoding="utf-8",
        )
        py_path.write_text(TASKS.format(name=name, yaml_name=yaml_path.name), encoding="utf-8")
    except OSError as e:
        msg = f"cannot write {e.filename or folder}: {e.strerror or e}"
        raise UsageError(msg) from None
    return written


def _find_schema(folder: Path) -> Path:
    """The nearest ``schemas/pipeline.schema.json`` in ``folder`` or above; else where to write one."""
    absolute = folder.resolve()
    for parent in (absolute, *absolute.parents):
        if (parent / SCHEMA).is_file():
            return parent / SCHEMA
    here = Path.cwd().resolve()
    return SCHEMA if absolute == here or here in absolute.parents else folder / SCHEMA
