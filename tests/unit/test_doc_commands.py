"""Every `vmattach ...` command line that README.md and the operator's docs
show in their code blocks is accepted by the real command-line parser, as
written (what a newcomer copies must not end in "unrecognized arguments").
Running them is tests/integration/test_readme_service.py's job."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from vmattach.clients import cli

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/operations.md", "docs/deployment.md", "docs/security.md")


def code_lines(text: str) -> list[str]:
    """The command lines of the indented code blocks, continuations joined."""
    lines, pending = [], ""
    for raw in text.splitlines():
        if not raw.startswith("    ") and not pending:
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        lines.append(line)
    return lines


def vmattach_commands(text: str) -> list[str]:
    """`vmattach ...` as typed: alone, after `export X=$(`, before `&` or a
    comment; placeholders ([optional], a | b, ...) are not commands."""
    found = []
    for line in code_lines(text):
        m = re.match(r"^(?:export \w+=\$\()?(vmattach\s.*)$", line)
        if not m:
            continue
        command = m.group(1).split(" # ", 1)[0].strip().rstrip("&").strip()
        if command.endswith(")") and line.startswith("export"):
            command = command[:-1]
        if re.search(r"\[|\s\|\s|\.\.\.", command):
            continue
        found.append(command)
    return found


COMMANDS = [(doc, command) for doc in DOCS
            for command in vmattach_commands((ROOT / doc).read_text())]


def test_the_docs_show_commands():
    docs = {doc for doc, _ in COMMANDS}
    assert {"README.md", "docs/operations.md", "docs/security.md"} <= docs
    assert any("--db-upgrade false" in c for _, c in COMMANDS)


@pytest.mark.parametrize(("doc", "command"), COMMANDS)
def test_the_parser_accepts_the_command_as_written(doc, command):
    argv = shlex.split(command)[1:]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = cli.parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{doc}: `{command}`: {err.getvalue().strip()}")
    assert callable(args.func)


def test_a_boolean_setting_takes_a_value_or_none():
    p = cli.parser()
    assert p.parse_args(["serve", "--db-upgrade", "false"]).db_upgrade is False
    assert p.parse_args(["serve", "--db-upgrade", "no"]).db_upgrade is False
    assert p.parse_args(["serve", "--db-upgrade"]).db_upgrade is True
    assert p.parse_args(["serve", "--insecure", "--listen", "0.0.0.0:0"]).insecure is True
    assert p.parse_args(["serve"]).insecure is None  # unset: the file, environment or default
