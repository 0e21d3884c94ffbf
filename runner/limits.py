"""What a pipeline file may cost to load (``runner.safeyaml`` enforces them); no imports, so anything may read them.

``MAX_PROCESSES`` (per stage) is a rule of the format and lives with the schema (``schemas.stages``).
"""

from __future__ import annotations

MAX_BYTES = 1024 * 1024  # a pipeline file describes a run; data belongs in a file source
MAX_DEPTH = 100  # nesting levels of lists and mappings
MAX_ALIAS_VALUES = 100_000  # values that aliases (``*name``, ``<<: *name``) may stand for, in all
