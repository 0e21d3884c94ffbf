"""Every error mprun shows a user, under one root; ``cli.main`` is the only place one becomes an exit code.

    MprunError                 exit_code 1
    ├── PipelineInvalid        exit_code 2: the file cannot run (syntax, schema, topology); carries diagnostics
    ├── UsageError             exit_code 2: a bad command line (unknown option value, missing file)
    └── RunFailed              exit_code 1: a stage function raised, or a worker process died
"""

from __future__ import annotations

from collections.abc import Sequence


class MprunError(Exception):
    """Root of mprun's errors; ``exit_code`` is what the command line exits with."""

    exit_code = 1


class PipelineInvalid(MprunError):
    """The pipeline file is invalid; ``diagnostics`` holds one ``FILE:LINE:COL: error: ...`` line per problem."""

    exit_code = 2

    def __init__(self, diagnostics: Sequence[str]) -> None:
        self.diagnostics = list(diagnostics)
        super().__init__("\n".join(diagnostics))


class UsageError(MprunError):
    """A bad command line or argument."""

    exit_code = 2


class RunFailed(MprunError):
    """The run failed: a function raised under ``on_error: fail`` or a process died."""

    exit_code = 1
