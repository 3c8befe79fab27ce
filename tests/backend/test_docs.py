"""The README's CLI section parses: every flag it shows exists, with the choices it names."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from asymkd import cli

README = Path(__file__).resolve().parents[2] / "README.md"


def _cli_lines() -> list[tuple[str, str]]:
    """(command, text) of every `asymkd COMMAND ...` entry in the README's CLI block,
    continuation lines joined, comments dropped."""
    text = README.read_text(encoding="utf-8")
    block = text.split("## The engine CLI", 1)[1].split("```", 2)[1]
    entries: list[list[str]] = []
    for line in block.splitlines():
        line = line.split("#", 1)[0].rstrip()
        if line.startswith("asymkd "):
            entries.append([line])
        elif line.strip() and entries:
            entries[-1].append(line.strip())
    out = []
    for entry in entries:
        for part in " ".join(entry).split("|  asymkd"):  # "a  |  asymkd b": two examples
            words = part.replace("asymkd ", "", 1).split()
            out.append((words[0], " ".join(words[1:])))
    return out


def _parser(command: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cli._module(command).add_arguments(sub.choices[command])
    return sub.choices[command]


@pytest.mark.parametrize("command,text", _cli_lines())
def test_every_flag_in_the_readme_exists(command, text):
    assert command in cli.COMMANDS, f"README shows `asymkd {command}`, which does not exist"
    parser = _parser(command)
    if command == "bench":  # subcommands, each with its own flags
        return
    known = {opt: action for action in parser._actions for opt in action.option_strings}
    for flag, value in re.findall(r"(--[a-z][a-z0-9-]*)(?:\s+([^\s\[\]]+))?", text):
        assert flag in known, f"README: `asymkd {command} {flag}` is not a flag of {command}"
        choices = known[flag].choices
        if choices and value and "|" in value:
            shown = set(value.split("|"))
            assert shown <= set(choices), f"README lists {shown - set(choices)} for {command} {flag}"
