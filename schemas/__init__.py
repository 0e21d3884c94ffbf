"""Pydantic v2 models of the mprun pipeline file (format version 1).

The models are built without pydantic's plugin discovery: it imports ``importlib.metadata`` (with
``email`` and ``zipfile``) and scans every installed package's entry points, ~15 ms of a cold
``mprun run`` (no cached plan), for plugins that only observe validation and have nothing to do with
mprun's own file format. A stand-in for ``pydantic.plugin._loader`` is in ``sys.modules`` only while
this package builds its models; any other use of pydantic (user code under ``--inline``) discovers
plugins as usual.
"""

from __future__ import annotations

import sys
import types

_LOADER = "pydantic.plugin._loader"
_stub = None
if _LOADER not in sys.modules:
    _stub = types.ModuleType(_LOADER)
    _stub.get_plugins = tuple  # type: ignore[attr-defined]  # no plugins: get_plugins() == ()
    sys.modules[_LOADER] = _stub
try:
    from schemas.pipeline import Pipeline, QueueSpec, Settings, TestCase, topology_problems
    from schemas.stages import Consumer, FileSource, Pool, Producer, RangeSource, Source, Stage
finally:
    if _stub is not None and sys.modules.get(_LOADER) is _stub:
        del sys.modules[_LOADER]
    del _stub

__all__ = [
    "Consumer",
    "FileSource",
    "Pipeline",
    "Pool",
    "Producer",
    "QueueSpec",
    "RangeSource",
    "Settings",
    "Source",
    "Stage",
    "TestCase",
    "topology_problems",
]
