"""The README and docs/reference.md are self-contained: they name every command, option and key users can write."""

from __future__ import annotations

import argparse
import re

import pytest

from runner.cli import _parser
from schemas import FileSource, Pipeline, Pool, Producer, QueueSpec, RangeSource, Settings, Source, TestCase
from schemas.stages import Consumer
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
REFERENCE = (ROOT / "docs" / "reference.md").read_text()


def _commands() -> dict[str, list[str]]:
    """Every subcommand and the long form of each of its options, from the real parser."""
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: [max(a.option_strings, key=len) for a in parser._actions if a.option_strings and a.dest != "help"]
        for name, parser in sub.choices.items()
    }


def _row(text: str, command: str) -> str:
    """The line of the README's Commands table that describes ``command``."""
    rows = [line for line in text.splitlines() if line.startswith(f"| `mprun {command}") or
            (command == "run" and line.startswith("| `mprun FILE`"))]
    assert len(rows) == 1, (command, rows)
    return rows[0]


def test_readme_refers_to_no_document_the_repository_lacks():
    """No "SPEC" (not shipped); every relative link of the README points at a file of the repository."""
    assert "SPEC" not in README and "SPEC" not in REFERENCE
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README)
    assert "docs/reference.md" in links
    assert [link for link in links if not (ROOT / link).exists()] == []


@pytest.mark.parametrize("command", sorted(_commands()))
def test_commands_table_lists_every_option(command):
    """The README's Commands table has a row per command naming each of its options; the reference, too."""
    row = _row(README, command)
    missing = [option for option in _commands()[command] if f"`{option}" not in row]
    assert missing == [], f"README Commands row of {command} lacks {missing}"
    assert [option for option in _commands()[command] if f"`{option}" not in REFERENCE] == []
    assert f"`mprun {command}" in REFERENCE or command == "run"


def test_reference_names_every_key_of_the_format():
    """Every key a pipeline file can hold (root, settings, queues, every stage kind, sources, tests) is in the reference."""
    models = (Pipeline, Settings, QueueSpec, Producer, Consumer, Pool, Source, RangeSource, FileSource, TestCase)
    keys = {field.alias or name for model in models for name, field in model.model_fields.items()}
    assert sorted(key for key in keys if f"`{key}" not in REFERENCE) == []
    assert "--version" in README and "python -m runner" in README
