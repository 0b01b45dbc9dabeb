"""The README is the user's manual: every flag it shows must be accepted by its command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from camcli.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
FLAG = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")


def accepted(command: str) -> set[str]:
    group = typer.main.get_command(app)
    cmd = group.commands[command]  # type: ignore[attr-defined]
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}


def shown() -> list[tuple[str, str, str]]:
    """(command, flag, where) for every flag on a `camcli CMD ...` line and in each command's option table."""
    text = README.read_text(encoding="utf-8")
    found: list[tuple[str, str, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        for m in re.finditer(r"camcli (explain|check|evaluate|summary|merge|layers|methods|models)\b([^`|#\n]*)", line):
            for flag in FLAG.findall(m.group(2)):
                found.append((m.group(1), flag, f"README.md:{n}"))
    section, prose = None, False
    for n, line in enumerate(text.splitlines(), 1):
        head = re.match(r"#+ `camcli (\w+)", line)
        if head:
            section = head.group(1)
        elif line.startswith("## "):
            section = None
        prose = bool(section) and (line.startswith("Options:") or (prose and line.strip() != ""))
        if section and line.startswith("| `-"):
            for flag in FLAG.findall(line.split("|")[1]):
                found.append((section, flag, f"README.md:{n}"))
        if prose:  # "Options: `--method`, `--metric` ..." paragraphs
            for flag in re.findall(r"`(--?[a-zA-Z][\w-]*)", line):
                found.append((section, flag, f"README.md:{n}"))
    return found


def test_readme_shows_flags() -> None:
    flags = shown()
    assert len(flags) > 60
    assert ("evaluate", "--score-channels", ) in {(c, f) for c, f, _ in flags}


@pytest.mark.parametrize("command,flag,where", shown())
def test_every_flag_in_the_readme_is_accepted(command: str, flag: str, where: str) -> None:
    assert flag in accepted(command), f"{where}: `camcli {command}` does not accept {flag}"
