"""The README and docs/ stay true: every relative link resolves (file and anchor), and
every `specem-fast` subcommand and flag they show exists in the CLI's own parser."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from specem_fast.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
# flags of other tools that the docs show in inline code next to ours
FOREIGN_FLAGS = {"--benchmark-enable", "--no-deps", "--head", "--port=6379", "--address", "--dev", "--force-reinstall",
                 "--no-build-isolation", "--quick"}  # --quick: benchmarks/load_test.py


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


PARSER = build_parser()
COMMANDS = _subparsers(PARSER)


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    out = set(parser._option_string_actions)
    for sub in _subparsers(parser).values():
        out |= _flags(sub)
    return out


ALL_FLAGS = _flags(PARSER)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"(?ms)^```.*?^```", "", path.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"(?m)^#+ (.+)$", text)}


def _links(path: Path):
    text = re.sub(r"(?ms)^```.*?^```", "", path.read_text())
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
        target = m.group(1)
        if not re.match(r"[a-z]+:", target):
            yield target


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    bad = []
    for target in _links(doc):
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading with that anchor")
    assert not bad, f"{doc.name}: " + "; ".join(bad)


def _code(text: str):
    """The code a doc shows: fenced blocks (continuation lines joined) and inline spans."""
    for block in re.findall(r"(?ms)^```[^\n]*\n(.*?)^```", text):
        block = re.sub(r"\\\n", " ", block)  # a shell line continued with a backslash
        yield from re.sub(r"\n(?=[ \t]+\[)", " ", block).splitlines()  # usage lines: `    [--opt X]`
    yield from re.findall(r"`([^`\n]+)`", re.sub(r"(?ms)^```.*?^```", "", text))


def _commands(text: str):
    """Each `specem-fast SUB [WORD] rest` shown in code."""
    for line in _code(text):
        for part in line.split("specem-fast ")[1:]:
            m = re.match(r"([a-z]+)(?: ([a-z]+(?:\|[a-z]+)*))?(.*)", part)
            if m:
                yield m.group(1), m.group(2) or "", m.group(3)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_cli_commands_and_flags_exist(doc):
    bad = []
    for sub, word, rest in _commands(doc.read_text()):
        if sub not in COMMANDS:
            bad.append(f"specem-fast {sub}: no such subcommand")
            continue
        parser, nested = COMMANDS[sub], _subparsers(COMMANDS[sub])
        if nested:  # `models list|fetch|verify`
            for name in word.split("|"):
                if name not in nested:
                    bad.append(f"specem-fast {sub} {name}: no such subcommand")
            parser = nested.get(word.split("|")[0], parser)
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
            if flag not in _flags(parser):
                bad.append(f"specem-fast {sub}: no flag {flag}")
    assert not bad, f"{doc.name}: " + "; ".join(sorted(set(bad)))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_inline_flags_exist(doc):
    """A flag shown on its own in inline code (`--window 256`) is one of ours."""
    text = re.sub(r"(?ms)^```.*?^```", "", doc.read_text())
    bad = set()
    for span in re.findall(r"`([^`\n]+)`", text):
        if not span.startswith("--") or "specem-fast" in span:
            continue
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*(?:=\S+)?)", span):
            base = flag.split("=")[0]
            if base not in ALL_FLAGS and flag not in FOREIGN_FLAGS and base not in FOREIGN_FLAGS:
                bad.add(flag)
    assert not bad, f"{doc.name}: flags no subcommand has: {sorted(bad)}"


def test_the_checks_catch_a_bad_doc(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("See [there](nowhere.md) and [here](#nothing).\n\n## Real\n\n"
                   "```\nspecem-fast generate --no-such-flag\nspecem-fast frobnicate\n```\n")
    assert {t for t in _links(doc)} == {"nowhere.md", "#nothing"}
    shown = list(_commands(doc.read_text()))
    assert ("generate", "", " --no-such-flag") in shown and ("frobnicate", "", "") in shown
    assert "--window" in _flags(COMMANDS["generate"]) and "--no-such-flag" not in ALL_FLAGS
    assert _slug("Serve (OpenAI-compatible HTTP)") == "serve-openai-compatible-http"
