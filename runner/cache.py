"""Compiled pipelines kept between runs, so running a file seen before skips YAML and Pydantic.

    key = sha256(mprun's own sources (name, size, mtime), the Python version, the file's resolved path
          and bytes, the working directory, the --set overrides, --limit, the settings given on the
          command line or in code, the value of every ${VAR} the file or the overrides name, and how
          many CPUs this process may use: `processes: auto`)
    $MPRUN_CACHE_DIR or $XDG_CACHE_HOME/mprun or ~/.cache/mprun / <key>.pickle
          = (Topology, the module:attribute references to import-check)

Only a pipeline that validated and passed the import check is stored, so a hit stands for a file known
valid with exactly these inputs. The import check still runs on every hit (a module can disappear);
if it finds a problem the run takes the full path, which reports it located. ``MPRUN_NO_CACHE=1``
turns the cache off. A cache that cannot be read or written is ignored: it is only ever a shortcut.

Trust: an entry is a pickle, which can run code when loaded, and it decides what the run does. So an
entry is read only when the folder and the entry are both owned by this user (uid) and writable by no
one else, and neither is a symlink: the folder is opened with ``O_NOFOLLOW`` and checked with ``fstat``,
then the entry is opened through that descriptor, ``O_NOFOLLOW`` too, and checked the same way, so a
rename between the check and the read changes nothing.  A folder that fails the check is neither read
nor written; a foreign or corrupt entry is ignored (a debug record on the ``mprun.cache`` logger) and
the run proceeds uncached.  The folder is created with mode 0o700.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import stat
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
    from runner.limits import MAX_BYTES

    try:
        if Path(path).stat().st_size > MAX_BYTES:
            return None  # refused by the loader; never read whole
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
    # The CPUs this process may use decide `processes: auto` (runner.compiler.cpu_count).
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    inputs = (sys.version, resolved, os.getcwd(), overrides or [], limit, sorted(settings.items()),
              [(n, os.environ.get(n)) for n in names], cpus)
    h.update(repr(inputs).encode())
    h.update(raw)
    return h.hexdigest()


def _untrusted(st: os.stat_result, kind: str) -> str | None:
    """Why a folder or entry with this ``fstat`` must not be trusted, or None when it may be."""
    want = stat.S_ISDIR if kind == "folder" else stat.S_ISREG
    if not want(st.st_mode):
        return f"the {kind} is not a {'directory' if kind == 'folder' else 'regular file'}"
    if st.st_uid != os.getuid():
        return f"the {kind} is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"the {kind} is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _open_folder(folder: Path) -> int | None:
    """A descriptor of ``folder`` if it is trusted (this user's, writable by no one else, not a symlink)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if not isinstance(e, FileNotFoundError):
            _note(folder, f"cannot open the folder: {e.strerror or e}")
        return None
    problem = _untrusted(os.fstat(fd), "folder")
    if problem is not None:
        os.close(fd)
        _note(folder, problem)
        return None
    return fd


def _note(where: Path, problem: str) -> None:
    log = logging.getLogger("mprun.cache")
    log.debug("compiled-pipeline cache not used (%s): %s; running uncached", where, problem)


def _read_trusted(folder: Path, entry: str) -> bytes | None:
    """The bytes of ``folder/entry`` if both are trusted, else None (a debug record says why)."""
    dir_fd = _open_folder(folder)
    if dir_fd is None:
        return None
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        _note(folder / entry, f"cannot open the entry: {e.strerror or e}")
        return None
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "rb") as f:
        problem = _untrusted(os.fstat(f.fileno()), "entry")
        if problem is not None:
            _note(folder / entry, problem)
            return None
        return f.read()


def load(name: str | None) -> Any:
    """The entry stored under ``name``, or None (no entry, or one that is not trusted or cannot be read)."""
    folder = directory()
    if name is None or folder is None:
        return None
    if name not in _loaded:
        try:
            raw = _read_trusted(folder, f"{name}.pickle")
            if raw is None:
                return None
            _loaded[name] = pickle.loads(raw)
        except Exception as e:  # noqa: BLE001 - truncated or from another version: a miss
            _note(folder / f"{name}.pickle", f"unreadable entry ({type(e).__name__})")
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
        dir_fd = _open_folder(folder)
        if dir_fd is None:  # a folder someone else could write: never store there either
            return
        os.close(dir_fd)
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
