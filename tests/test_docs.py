"""The docs stay honest: links resolve, the README stays short, named keys, flags and files exist,
and the committed notebooks are the generated ones, with their outputs. No Ray, about a second."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
import typing
from pathlib import Path

import nbformat
import pytest

from pipeline.cli import build_parser
from pipeline.config import Config

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [
    README,
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "cluster" / "README.md",
    REPO / "benchmarks" / "README.md",
]
MAX_README_LINES = 250

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\s*$")
SECTIONS = {f.name for f in dataclasses.fields(Config)}
# a dotted key: a Config section, then names; not part of a path, a URL or another dotted name, not a call
KEY = re.compile(r"(?<![\w./-])(" + "|".join(sorted(SECTIONS)) + r")((?:\.[A-Za-z_*][\w*]*)+)(?![\w(])")
NOT_CONFIG = {"ray.io", "ray.init", "ray.train", "ray.cluster_utils"}  # Ray's names that look like keys
REPO_PATH = re.compile(
    r"(?<![\w/.-])((?:jobs|benchmarks|scripts|tests|notebooks|cluster|pipeline|docs)/[\w./-]*\w\.(?:py|yaml|ipynb|sh|md|txt|jsonl|png))"
)
FILE_NAME = re.compile(r"\.(?:md|py|txt|yaml|yml|json|jsonl|png|ipynb|sh|csv|parquet|tar|db|safetensors)$")
# `abpipe CMD args` where a command is shown: in a code block or an inline code span
COMMAND = re.compile(r"(?:^|[\s`/])abpipe (\w+)((?: +[^\s|`]+)*)")


def prose_and_code(path: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """(lines outside fences, [(fence language, block text)]) of a markdown file."""
    prose, blocks, lang, block = [], [], None, []
    for line in path.read_text().splitlines():
        fence = FENCE.match(line.strip())
        if fence and lang is None:
            lang, block = fence.group(1), []
        elif line.strip() == "```" and lang is not None:
            blocks.append((lang, "\n".join(block)))
            lang = None
        elif lang is not None:
            block.append(line)
        else:
            prose.append(line)
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = prose_and_code(path)
    return {slug(line.lstrip("#")) for line in prose if re.match(r"#{1,6} ", line)}


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_shows_the_command_ci_runs():
    """.ci/run runs 'the README's test command': the two must be the same line."""
    ci = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if "-m pytest" in line and not line.lstrip().startswith("#")
    ]
    assert ci, ".ci/run runs no pytest command"
    _, blocks = prose_and_code(README)
    shown = "\n".join(text for _, text in blocks)
    for command in ci:
        assert command in shown, f"README.md does not show CI's test command {command!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    prose, _ = prose_and_code(page)
    broken = []
    for target in LINK.findall("\n".join(prose)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def _known_key(dotted: str) -> bool:
    """True if `section.name[.name...]` names a Config field (anything below a mapping or a `*` goes)."""
    node: typing.Any = Config
    for part in dotted.split("."):
        if part == "*":
            return True
        if not dataclasses.is_dataclass(node):
            return False
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return False
        value = getattr(node(), part) if isinstance(node, type) else getattr(node, part)
        if isinstance(value, dict):
            return True
        node = value
    return True


def test_every_config_key_named_exists():
    unknown = []
    for page in PAGES:
        prose, blocks = prose_and_code(page)
        text = "\n".join(prose + [code for lang, code in blocks if lang != "python"])
        for section, rest in KEY.findall(text):
            dotted = section + rest
            if ".".join(dotted.split(".")[:2]) in NOT_CONFIG or FILE_NAME.search(dotted):
                continue
            if not _known_key(dotted):
                unknown.append(f"{page.relative_to(REPO)}: {dotted}")
    assert not unknown, "config keys the docs name but pipeline/config.py lacks: " + ", ".join(sorted(set(unknown)))


def test_every_abpipe_command_and_flag_named_exists():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    wrong = []
    for page in PAGES:
        prose, blocks = prose_and_code(page)
        shown = [code for lang, code in blocks if lang in ("", "bash", "sh")]
        shown += re.findall(r"`([^`\n]*abpipe [^`\n]*)`", "\n".join(prose))
        text = re.sub(r"\\\n\s*", " ", "\n".join(shown))  # join shell continuations
        for name, args in COMMAND.findall(text):
            if name not in commands:
                wrong.append(f"{page.relative_to(REPO)}: abpipe {name} is not a command")
                continue
            flags = {f for f in re.findall(r"(?<!\S)(--?[A-Za-z][\w-]*)", args)}
            wrong += [
                f"{page.relative_to(REPO)}: abpipe {name} {f}"
                for f in flags
                if f not in commands[name]._option_string_actions
            ]
    assert not wrong, "documented but not in pipeline/cli.py: " + "; ".join(sorted(set(wrong)))


def test_every_repository_file_named_exists():
    missing = [
        f"{page.relative_to(REPO)}: {p}"
        for page in PAGES
        for p in REPO_PATH.findall(page.read_text())
        if not (REPO / p).exists()
    ]
    assert not missing, "files the docs name that do not exist: " + ", ".join(sorted(set(missing)))


def test_the_fast_tiers_longest_first_list_names_tests_that_exist():
    """tests/conftest.py's LONGEST_FIRST (the xdist order) is node ids by hand: a renamed test would drop out of
    it silently, so each entry must still name a test function in its file (read with ast, not imported:
    importing the conftest a second time would run its set-up again)."""
    conftest = ast.parse((REPO / "tests" / "conftest.py").read_text())
    (entries,) = [
        ast.literal_eval(node.value)
        for node in conftest.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "LONGEST_FIRST" for t in node.targets)
    ]
    assert len(entries) >= 3
    missing = []
    for entry in entries:
        path, name = entry.split("::")
        tree = ast.parse((REPO / path).read_text())
        if not any(isinstance(n, ast.FunctionDef) and n.name == name for n in tree.body):
            missing.append(entry)
    assert not missing, f"LONGEST_FIRST names tests that do not exist: {missing}"


def _build_notebooks():
    spec = importlib.util.spec_from_file_location("build_notebooks", REPO / "notebooks" / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["quickstart.ipynb", "results.ipynb"])
def test_committed_notebook_is_the_generated_one_with_outputs(name):
    """Edited cells must be re-generated and re-executed (`build_notebooks.py --execute`) before commit."""
    build = _build_notebooks()
    committed = nbformat.read(REPO / "notebooks" / name, as_version=4)
    expected = build.build(build.NOTEBOOKS[name])
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in expected.cells], (
        f"notebooks/{name} differs from build_notebooks.py: run `python notebooks/build_notebooks.py --execute`"
    )
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), f"notebooks/{name} has unexecuted cells"
    assert all(c.outputs for c in code), f"notebooks/{name} has cells without outputs"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"notebooks/{name} was committed with an error: {errors[0].get('ename')}"
    if name == "quickstart.ipynb":
        images = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
        assert images >= 2, "the quickstart should show the crops and the curves"
