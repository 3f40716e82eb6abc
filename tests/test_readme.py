"""README stays true: its set-up commands are what CI runs, its examples are real CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(text: str, languages: tuple[str, ...] = ("sh", "bash", "console", "")) -> list[str]:
    """The bodies of fenced code blocks in these languages (fences paired line by line)."""
    blocks, body, lang = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            if body is None:
                body, lang = [], line[3:].strip()
            else:
                if lang in languages:
                    blocks.append("\n".join(body) + "\n")
                body = None
        elif body is not None:
            body.append(line)
    return blocks


def test_ci_runs_the_readme_test_command():
    setup = README.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    blocks = _blocks(setup)
    assert len(blocks) == 2, "Set-up must show exactly two commands"
    install_and_run, install_and_test = (b.strip() for b in blocks)
    assert "bnaudit run --dtype float32" in install_and_run
    assert "pytest" in install_and_test
    ci = (ROOT / ".ci" / "run").read_text()
    assert install_and_test in ci.splitlines(), ".ci/run must run README's test command verbatim"


def _example_commands() -> list[list[str]]:
    commands = []
    for block in _blocks(README):
        for line in block.splitlines():
            line = line.strip()
            for part in re.split(r"&&|\|", line):
                part = part.strip()
                if part.startswith("bnaudit "):
                    commands.append(shlex.split(part, comments=True)[1:])
    return commands


COMMANDS = _example_commands()


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_examples_use_real_commands_and_options(cli, argv):
    words = [w for w in argv if not w.startswith("-")]
    # The subcommand path: leading words that are commands (stop at the first argument).
    path: list[str] = []
    for word in words:
        code, out, err = cli(*path, word, "--help")
        if code != 0:
            break
        path.append(word)
        if "Commands:" not in out:
            break
    assert path, f"README example 'bnaudit {' '.join(argv)}' names no bnaudit command"
    code, help_text, err = cli(*path, "--help")
    assert code == 0, err
    for option in (a.split("=")[0] for a in argv if a.startswith("--")):
        assert option in help_text, f"README uses {option}, which `bnaudit {' '.join(path)} --help` does not list"
