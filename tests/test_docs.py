"""The README and docs/ stay true: links and anchors resolve, named paths exist, shown commands parse, the site builds.

Commands are read from fenced shell blocks and inline code: `align ...`, `python recipes/<x>.py ...`
(also after `accelerate launch` / `torchrun`), `-m align ...` and `align-data ...`. A stage or workflow
command whose --config names a file of this repository is loaded with --print-config (config and
overrides checked, nothing run); any other shown command must accept --keys (stages, workflows) or
--help.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
from conftest import REPO

PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
README_LIMIT = 250
# A path a page names is checked when it starts with one of these (outputs such as runs/ are not).
TOP_LEVEL = ("align/", "recipes/", "data_tools/", "tests/", "docs/", ".ci/")
TOP_FILES = ("Makefile", "pyproject.toml", "mkdocs.yml", "README.md")
PLACEHOLDER = re.compile(r"[<>*{}\[\]$]|\.\.\.")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
INLINE = re.compile(r"`([^`\n]+)`")


def page_id(path: Path) -> str:
    return str(path.relative_to(REPO))


def slug(heading: str) -> str:
    """The anchor of a heading, as GitHub and mkdocs' toc write it."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return re.sub(r"\s", "-", text)


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def prose(path: Path) -> str:
    return FENCE.sub("", path.read_text())


def test_the_readme_is_short():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_LIMIT


def test_every_docs_page_is_in_the_site_navigation():
    nav = (REPO / "mkdocs.yml").read_text()
    assert sorted(p.name for p in (REPO / "docs").glob("*.md")) == sorted(set(re.findall(r"([\w-]+\.md)", nav)))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_and_anchor_resolves(page):
    for target in LINK.findall(prose(page)):
        if re.match(r"^[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        assert resolved.exists(), f"{page_id(page)}: link to {target}: no such file"
        if anchor:
            assert resolved.suffix == ".md", f"{page_id(page)}: {target}: an anchor into a file that is not a page"
            assert anchor in anchors(resolved), f"{page_id(page)}: link to {target}: no such heading"


def named_paths(page: Path) -> set[str]:
    """Repository paths a page names in code (inline or fenced): align/..., recipes/..., Makefile, ..."""
    text = page.read_text()
    tokens = set()
    for code in INLINE.findall(prose(page)) + [m.group(2) for m in FENCE.finditer(text)]:
        for token in re.split(r"[\s,;()'\"=|]+", code):
            token = token.rstrip(".:`").split(":")[0]
            if (token.startswith(TOP_LEVEL) or token in TOP_FILES) and not PLACEHOLDER.search(token):
                tokens.add(token)
    return tokens


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_named_path_exists(page):
    missing = sorted(p for p in named_paths(page) if not (REPO / p).exists())
    assert not missing, f"{page_id(page)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_named_module_exists(page):
    """Dotted names in code (`align.evaluation.judges.FormatJudge`) are a module of align and attributes it has."""
    import importlib

    missing = []
    for name in sorted(set(re.findall(r"\balign(?:\.\w+)+", " ".join(INLINE.findall(prose(page)))))):
        parts = name.split(".")
        depth = max(i for i in range(1, len(parts) + 1)
                    if REPO.joinpath(*parts[:i]).with_suffix(".py").is_file() or (REPO.joinpath(*parts[:i]) / "__init__.py").is_file())
        target = importlib.import_module(".".join(parts[:depth]))
        for attribute in parts[depth:]:
            target = getattr(target, attribute, None)
        if target is None:
            missing.append(name)
    assert not missing, f"{page_id(page)} names modules or attributes that do not exist: {missing}"


# --------------------------------------------------------------------------- commands


def shell_lines(page: Path) -> list[str]:
    """Shell command lines of a page: fenced shell blocks (continuations joined) and inline code."""
    text = page.read_text()
    lines = []
    for lang, body in FENCE.findall(text):
        if lang not in ("", "bash", "sh", "shell", "console"):
            continue
        joined = re.sub(r"\\\n\s*", " ", body)
        lines += [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    lines += [code for code in INLINE.findall(prose(page)) if re.match(r"(align|python recipes/|accelerate launch|torchrun)\b", code)]
    return lines


def commands(line: str) -> list[list[str]]:
    """The align / recipes commands of one shell line, each as [program, args...]: program is `align`,
    `align-data` or `recipes/<x>.py`."""
    found = []
    for segment in re.split(r"&&|;|\|", line.split(" #")[0]):
        try:
            words = shlex.split(segment)
        except ValueError:
            words = segment.split()
        for i, word in enumerate(words):
            if word in ("align", "align-data") and (i == 0 or "=" in words[i - 1] or words[i - 1] in ("-m", "exec")):
                found.append(words[i:])
                break
            if re.fullmatch(r"recipes/\w+\.py", word):
                found.append(words[i:])
                break
    return found


ALL = sorted({(page_id(page), tuple(cmd)) for page in PAGES for line in shell_lines(page) for cmd in commands(line)})


def test_the_docs_show_commands():
    programs = {cmd[0] for _, cmd in ALL}
    assert {"align", "align-data"} <= programs and any(p.startswith("recipes/") for p in programs)
    assert len(ALL) > 50


@lru_cache(maxsize=None)
def script_help(script: str) -> int:
    """A checkout-only script (benchmarks, the GPU report) answers --help."""
    return subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=REPO, capture_output=True, timeout=300).returncode


def parse(program: str, args: list[str]) -> int:
    from align.cli import main
    from align.stages.registry import all_stages

    if program == "align-data":
        from data_tools.cli import main as align_data

        return exit_code(lambda: align_data([*args[:1], "--help"]))
    if program.startswith("recipes/"):
        command = main.command_for_script(Path(program).stem)
        if command is None:
            return script_help(program)
        args = [command, *args]
    if not args or PLACEHOLDER.search(args[0]):  # `align <stage> ...`: the command list itself
        return exit_code(lambda: main.main(["--help"]))
    name, rest = args[0], args[1:]
    configurable = main.canonical(name) in all_stages() or name in ("pipeline", "sweep", "compare-methods")
    config = rest[rest.index("--config") + 1] if "--config" in rest[:-1] else None
    if configurable and config and (REPO / config).is_file():
        return exit_code(lambda: main.main([name, *rest, "--print-config"]))
    if configurable:
        return exit_code(lambda: main.main([name, "--keys"]))
    return exit_code(lambda: main.main([name, *rest, "--help"]))


def exit_code(call) -> int:
    try:
        return call()
    except SystemExit as exc:
        return exc.code or 0


@pytest.mark.parametrize("page, command", ALL, ids=[f"{p}: {' '.join(c)[:80]}" for p, c in ALL])
def test_every_shown_command_parses(page, command, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = parse(command[0], list(command[1:]))
    assert code == 0, f"{page}: `{' '.join(command)}` exits {code}: {capsys.readouterr().err[-500:]}"


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
