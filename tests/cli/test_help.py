"""Every flag is described once, in one place: argparse's help for `serve` and `bench`,
and the README's flag table lists every `serve` flag without disagreeing with it."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from fireside.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def options(name: str) -> list[argparse.Action]:
    return [a for a in subcommands()[name]._actions if not isinstance(a, argparse._HelpAction)]


def rendered_help(name: str, action: argparse.Action) -> str:
    """The option's help as `--help` prints it, with the default the formatter adds."""
    formatter = subcommands()[name]._get_formatter()
    return " ".join(formatter._expand_help(action).split())


@pytest.mark.parametrize("name", ["serve", "bench"])
def test_every_option_has_a_description(name):
    for action in options(name):
        assert action.help and action.help.strip(), action.option_strings


@pytest.mark.parametrize("name", ["serve", "bench"])
def test_no_help_shows_its_default_twice_or_an_empty_one(name):
    for action in options(name):
        text = rendered_help(name, action)
        assert text.lower().count("default") <= 1, (action.option_strings, text)
        assert "(default: None)" not in text, (action.option_strings, text)
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            # A switch's default is that it is off; `--no-x (default: True)` misleads.
            assert "default" not in text.lower(), (action.option_strings, text)


def test_bench_help_describes_its_flags():
    text = subcommands()["bench"].format_help()
    assert "--no-ignore-eos (default: True)" not in " ".join(text.split())
    for flag in ("--concurrency", "--prompt-tokens", "--ignore-eos", "--no-ignore-eos"):
        assert flag in text


def readme_flag_rows() -> list[list[str]]:
    """The cells of each row of the README's flag table (pipes escaped as \\| kept)."""
    text = README.read_text()
    section = text[text.index("## Flags") :]
    section = section[: section.index("\n## ", 1)]
    rows = []
    for line in section.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells[0] == "flag" or set(cells[0]) <= {"-", ":"}:
            continue  # the header and its rule
        rows.append(cells)
    return rows


def flags_in(cell: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", cell))


def test_the_readme_table_lists_every_serve_flag_and_no_other():
    documented = set().union(*(flags_in(row[0]) for row in readme_flag_rows()))
    flags = {flag for action in options("serve") for flag in action.option_strings}
    assert flags - documented == set(), "serve flags missing from README's table"
    assert documented - flags == set(), "README's table lists flags serve does not have"


def shown(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def test_the_readme_table_agrees_with_serve_on_defaults_and_choices():
    rows = readme_flag_rows()
    for action in options("serve"):
        row = next((r for r in rows if set(action.option_strings) & flags_in(r[0])), None)
        assert row is not None, f"{action.option_strings} missing from README's table"
        if action.default is not None:
            expected = re.escape(shown(action.default))
            assert re.search(rf"(?<![\w.]){expected}(?![\w.])", row[1]), (
                action.option_strings,
                row[1],
            )
        for choice in action.choices or ():
            assert choice in row[0] + row[2], (action.option_strings, choice)
