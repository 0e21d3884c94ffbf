"""Compiled pipelines kept between runs, so running a file seen before skips YAML and Pydantic.

    key = sha256(mprun's own sources (name, size, mtime), the Python version, the file's resolved path
          and bytes, the working directory, the --set overrides, --limit, the settings given on the
          command line or in code, and the value of every ${VAR} the file or the overrides name)
    $MPRUN_CACHE_DIR or $XDG_CACHE_HOME/mprun or ~/.cache/mprun / <key>.pickle
          = (Topology, the module:attribute references to import-check)

Only a pipeline that validated and passed the import check is stored, so a hit stands for a file known
valid with exactly these inputs. The import check still runs on every hit (a module can disappear);
if it finds a problem the run takes the full path, which reports it located. ``MPRUN_NO_CACHE=1``
turns the cache off. A cache that cannot be read or written is ignored: it is only ever a shortcut.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any

# ${NAME...} in the text: the loader's syntax (runner.loader._REFERENCE), names only.
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")
_SOURCES = (Path(__file__).parent, Path(__file__).parent.parent / "schemas")
KEEP = 500  # entries kept; the oldest go when there are more

_loaded: dict[str, Any] = {}


def directory() -> Path | None:
    """Where entries are kept, or None when the cache is turned off."""
    if os.environ.get("MPRUN_NO_CACHE", "") not in ("", "0"):
        return None
    if os.environ.get("MPRUN_CACHE_DIR"):
        return Path(os.environ["MPRUN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mprun"


def key(path: Any, overrides: list[str] | None, limit: int | None, settings: dict[str, Any]) -> str | None:
    """The entry name for running ``path`` with these inputs; None if it is not a readable file."""
    if not isinstance(path, str | os.PathLike):
        return None
    try:
        raw = Path(path).read_bytes()
        resolved = str(Path(path).resolve())
    except OSError:
        return None
    h = hashlib.sha256()
    for folder in _SOURCES:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.endswith(".py"):
                st = entry.stat()
                h.update(f"{entry.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    text = raw.decode("utf-8", errors="replace") + "\n".join(overrides or ())
    names = sorted(set(_VARIABLE.findall(text)))
    inputs = (sys.version, resolved, os.getcwd(), overrides or [], limit, sorted(settings.items()),
              [(n, os.environ.get(n)) for n in names])
    h.update(repr(inputs).encode())
    h.update(raw)
    return h.hexdigest()


def load(name: str | None) -> Any:
    """The entry stored under ``name``, or None."""
    folder = directory()
    if name is None or folder is None:
        return None
    if name not in _loaded:
        try:
            _loaded[name] = pickle.loads((folder / f"{name}.pickle").read_bytes())
        except Exception:  # noqa: BLE001 - missing, truncated or from another version: a miss
            return None
    return _loaded[name]


def store(name: str | None, entry: Any) -> None:
    """Keep ``entry`` under ``name`` (written whole, then renamed into place), dropping the oldest entries."""
    folder = directory()
    if name is None or folder is None:
        return
    import tempfile  # only here: a miss already paid for YAML and Pydantic

    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                pickle.dump(entry, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, folder / f"{name}.pickle")
        finally:
            Path(tmp).unlink(missing_ok=True)  # left only if writing failed
        entries = sorted(folder.glob("*.pickle"), key=lambda p: p.stat().st_mtime)
        for old in entries[:-KEEP]:
            old.unlink(missing_ok=True)
    except OSError:
        return
    _loaded[name] = entry
