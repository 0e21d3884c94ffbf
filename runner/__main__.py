"""``python -m runner``: the ``mprun`` command, for when its script is not on PATH."""

from __future__ import annotations

if __name__ == "__main__":  # not when a spawned child re-imports the main module as __mp_main__
    from runner.cli import console

    console()
