"""The README and docs/ stay true to the tree: relative links resolve, results files they name
exist, and every ``bitscale ...`` command in a code block parses with the real CLI parser.

Commands are parsed in-process with :func:`bitscale.cli.build_parser`, one subcommand's parser
at a time, so the check takes well under a second and spawns no process.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from bitscale.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted([REPO / "README.md", REPO / "bench" / "README.md", *(REPO / "docs").glob("*.md")])

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_RESULTS_FILE = re.compile(r"bench/results/[\w.+-]+\.(?:json|txt)")
_PREFIXES = ("$ ", ".venv/bin/", "python -m ")


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _without_code(text: str) -> str:
    """Markdown with fenced blocks and inline code removed (links inside code are not links)."""
    return re.sub(r"`[^`\n]*`", "", _FENCE.sub("", text))


def relative_links(text: str) -> list[str]:
    """Targets of the Markdown links and images in ``text`` that point into the repository."""
    return [
        target
        for target in _LINK.findall(_without_code(text))
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target) and not target.startswith("#")
    ]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", _FENCE.sub("", text), re.MULTILINE)}


def broken_links(path: Path) -> list[str]:
    """The relative links of ``path`` whose file (or heading anchor) does not exist."""
    broken = []
    for target in relative_links(_text(path)):
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        missing_anchor = (
            resolved.suffix == ".md" and bool(anchor) and anchor not in anchors(_text(resolved))
        )
        if not resolved.exists() or missing_anchor:
            broken.append(target)
    return broken


def bitscale_commands(text: str) -> list[str]:
    """Every ``bitscale ...`` command line in the fenced code blocks of ``text``, with
    backslash continuations joined and the prompt or venv prefix removed."""
    commands = []
    for block in _FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            for prefix in _PREFIXES:
                line = line.removeprefix(prefix)
            if line.startswith("bitscale "):
                commands.append(" ".join(line.split()))
    return commands


def _subcommand_path(parser: argparse.ArgumentParser, words: list[str]) -> list[str]:
    """The leading words of ``words`` that name (nested) subcommands."""
    path: list[str] = []
    for word in words:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or word not in actions[0].choices:
            break
        path.append(word)
        parser = actions[0].choices[word]
    return path


def _exit_status(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[int | None, str]:
    """``parser.parse_args(argv)``'s exit status (None: it returned) and what it printed."""
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0), output.getvalue()
    return None, output.getvalue()


def command_problem(command: str) -> str | None:
    """Why ``command`` (a ``bitscale ...`` line) does not parse, or its subcommand's
    ``--help`` fails; None when both work."""
    words = shlex.split(command, comments=True)[1:]
    if not words:
        return "no subcommand"
    parser = build_parser(only=words[0])
    status, output = _exit_status(parser, words)
    if status is not None:
        return output.strip() or f"exit status {status}"
    help_argv = [*_subcommand_path(parser, words), "--help"]
    status, output = _exit_status(parser, help_argv)
    if status != 0 or "usage:" not in output:
        return f"`bitscale {' '.join(help_argv)}` failed: {output.strip()}"
    return None


def help_examples(path: list[str]) -> list[str]:
    """The ``bitscale ...`` example lines of a (nested) subcommand's ``--help`` epilog."""
    parser = build_parser(only=path[0])
    status, output = _exit_status(parser, [*path, "--help"])
    assert status == 0, output
    examples = re.split(r"\nexamples?:\n", output, maxsplit=1)[-1] if "xample" in output else ""
    lines = examples.replace("\\\n", " ").splitlines()
    return [" ".join(line.split()) for line in lines if line.strip()]


def _help_paths() -> list[list[str]]:
    """Every subcommand and nested action of ``bitscale``."""
    paths = []
    for name in _subcommand_names(build_parser()):
        paths.append([name])
        paths += [[name, action] for action in _subcommand_names(build_parser(only=name), name)]
    return paths


def _subcommand_names(parser: argparse.ArgumentParser, *path: str) -> list[str]:
    for word in path:
        parser = next(
            a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
        ).choices[word]
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(actions[0].choices) if actions else []


def test_the_docs_exist_and_the_readme_keeps_its_two_commands() -> None:
    names = {path.relative_to(REPO).as_posix() for path in DOCS}
    expected = {"docs/kernels.md", "docs/hdp.md", "docs/checkpoint.md", "docs/benchmarks.md"}
    assert expected <= names
    readme = _text(REPO / "README.md")
    assert "make demo" in readme and "make test" in readme
    makefile = _text(REPO / "Makefile")
    assert re.search(r"^demo:", makefile, re.MULTILINE)
    assert re.search(r"^test:", makefile, re.MULTILINE)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(path: Path) -> None:
    assert broken_links(path) == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_named_results_files_exist(path: Path) -> None:
    named = set(_RESULTS_FILE.findall(_text(path)))
    assert sorted(n for n in named if not (REPO / n).is_file()) == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_bitscale_commands_parse(path: Path) -> None:
    problems = {c: p for c in bitscale_commands(_text(path)) if (p := command_problem(c))}
    assert problems == {}


def test_help_examples_parse() -> None:
    """Every example in a ``--help`` parses; each top-level subcommand and each ckpt action
    shows at least one."""
    paths = _help_paths()
    assert ["ckpt", "export-hf"] in paths and ["bench", "run"] in paths
    for path in paths:
        examples = help_examples(path)
        if len(path) == 1 or path[0] == "ckpt":
            assert examples, f"`bitscale {' '.join(path)} --help` shows no example"
        assert all(e.startswith(f"bitscale {' '.join(path)}") for e in examples), examples
        assert {e: p for e in examples if (p := command_problem(e))} == {}


def test_the_readme_and_docs_show_bitscale_commands() -> None:
    """The parse check above covers something: the docs show the main commands."""
    shown = {c.split()[1] for path in DOCS for c in bitscale_commands(_text(path))}
    assert {"simulate", "ckpt", "bench"} <= shown


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# A heading, with `code`\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md) [ok](there.md#a-heading-with-code) [web](https://example.com)\n"
        "[gone](missing.md) [bad anchor](there.md#nowhere) ![img](pics/none.png)\n"
        "`[not a link](nowhere.md)`\n"
    )
    assert broken_links(page) == ["missing.md", "there.md#nowhere", "pics/none.png"]

    block = (
        "```bash\nbitscale ckpt ls ROOT   # list\n.venv/bin/bitscale bench run \\\n  --quick\n```"
    )
    assert bitscale_commands(block) == [
        "bitscale ckpt ls ROOT # list",
        "bitscale bench run --quick",
    ]
    assert command_problem("bitscale ckpt ls ROOT # list") is None
    assert command_problem("bitscale bench run --quick -- -k lazy") is None
    assert "unrecognized arguments: --no-such-flag" in command_problem(
        "bitscale train --no-such-flag"
    )
    assert "invalid choice" in command_problem("bitscale ckpt explode ROOT")
    assert "invalid choice" in command_problem("bitscale nope")
