"""The files a run reads and writes, checked before any stage starts; free of pydantic (a cache hit uses it).

    log file (relative to the working directory)   must be creatable: cannot_write
    file sinks' kwargs.path (jsonl, csv, lines;    must be creatable: cannot_write; ``-`` (standard output) is
      relative to base_dir)                        not checked; prepare_outputs makes their folders, empties them
    file sources' path (relative to base_dir)      must exist and be readable: cannot_read, unless a file sink of
                                                   the run writes it; ``-`` (standard input) is not checked; a
                                                   glob pattern must match a file: cannot_match
"""

from __future__ import annotations

import fnmatch
import glob
import os
from pathlib import Path
from typing import Any

Where = Any  # whatever the caller locates a problem with (a field path)
FILE_SINKS = ("jsonl", "csv", "lines")  # built-ins writing kwargs.path (schemas.stages.FILE_SINKS; no pydantic here)
STDIO = "-"  # a path meaning standard input (a source) or standard output (a sink)


def cannot_write(target: Path) -> str | None:
    """Why a run could not write the file ``target`` (creating the folders it lacks), or None if it can."""
    if target.is_dir():
        return f"{target} is a folder, not a file"
    if target.exists():
        return None if os.access(target, os.W_OK) else f"cannot write {target}: permission denied"
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"cannot create {target}: {folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot create {target}: the folder {folder} is not writable"
    return None


def cannot_read(source: Path) -> str | None:
    """Why a run could not read the file ``source``, or None if it can."""
    if source.is_dir():
        return f"{source} is a folder, not a file"
    if not source.exists():
        return f"no such file: {source} (a relative path starts at the pipeline file's folder)"
    if not os.access(source, os.R_OK):
        return f"cannot read {source}: permission denied"
    return None


def cannot_match(base_dir: str, pattern: str, written: set[str]) -> str | None:
    """Why the glob ``pattern`` of a file source would read nothing (no file matches, and no sink of the run
    writes one that would), or None."""
    if any(Path(base_dir, f).is_file() for f in glob.iglob(pattern, root_dir=base_dir, recursive=True)):
        return None
    full = os.path.normpath(Path(base_dir, pattern))
    if any(fnmatch.fnmatch(path, full) for path in written):
        return None
    return f"no file matches {pattern} (a relative pattern starts at the pipeline file's folder)"


def file_problems(
    base_dir: str, log_file: tuple[Where, str] | None, sinks: list[tuple[Where, str]], sources: list[tuple[Where, str]]
) -> list[tuple[Where, str]]:
    """``(where, why)`` for each file of a run that cannot be written (log file, sinks) or read (sources)."""
    found: list[tuple[Where, str]] = []
    if log_file is not None:
        why = cannot_write(Path(log_file[1]))
        if why is not None:
            found.append((log_file[0], why))
    sinks = [(where, path) for where, path in sinks if path != STDIO]
    written = {os.path.normpath(Path(base_dir, path)) for _, path in sinks}
    for where, path in sinks:
        why = cannot_write(Path(base_dir, path))
        if why is not None:
            found.append((where, why))
    for where, path in sources:
        if path == STDIO or os.path.normpath(Path(base_dir, path)) in written:
            continue
        why = cannot_match(base_dir, path, written) if glob.has_magic(path) else cannot_read(Path(base_dir, path))
        if why is not None:
            found.append((where, why))
    return found


def plan_problems(topology: Any) -> list[tuple[Where, str]]:
    """``file_problems`` of a compiled plan (a cache hit: the files may have changed since it was stored)."""
    stages = topology.stages
    return file_problems(
        topology.base_dir,
        ("log_file", topology.log_file) if topology.log_file else None,
        [(s.name, str(s.kwargs["path"])) for s in stages if s.function in FILE_SINKS],
        [(s.name, s.source["file"]["path"]) for s in stages if s.source and "file" in s.source],
    )


def prepare_outputs(topology: Any) -> None:
    """Create the folders the file sinks of a plan write into (checked creatable before), and empty the files:
    each run writes its own (the sink's processes then append to it)."""
    for stage in topology.stages:
        if stage.function in FILE_SINKS and str(stage.kwargs["path"]) != STDIO:
            target = Path(topology.base_dir, str(stage.kwargs["path"]))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"")
