"""The documentation works: its runnable examples run, its links resolve, its command table is true.

Convention (README.md, "Tests"): a fenced block whose info string is ``bash doctest`` is executed; any
other block is documentation only. GitHub reads the first word of the info string, so runnable
blocks are still highlighted as bash. For every page with runnable blocks, one test runs them in
order, in one scratch folder (a later block may use what an earlier one wrote), each line a
``landmarks ...`` command called in-process through ``cli.main.main``, and asserts exit status 0.
The scratch folder has ``experiments/`` linked in, so the lines read as they would be typed in the
repository root. As OpenMetricLearning tests its README: an example that stops working fails CI.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import unicodedata
from pathlib import Path

import pytest

from cli.main import LIGHTNING_COMMANDS, TOOL_COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = ("bash", "doctest")
# Pages whose runnable blocks take more than ~15 s on a 2-core CPU (they train or run several
# models); measured with `pytest tests/test_docs.py --durations=0`.
SLOW_PAGES = {"training.md", "sweeps.md"}
SHELL_SYNTAX = re.compile(r"[|&;<>$`*?]|^~")


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """``(info string, line number of the opening fence, lines)`` of every fenced code block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^(\s*)(`{3,}|~{3,})(.*)$", lines[i])
        if not opening:
            i += 1
            continue
        fence, info, start = opening.group(2), opening.group(3).strip(), i + 1
        body, i = [], i + 1
        while i < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        blocks.append((info, start, body))
        i += 1
    return blocks


def _commands(page: Path) -> list[tuple[int, str]]:
    """``(line number, command)`` of the page's runnable blocks, continuation lines joined."""
    out = []
    for info, start, body in _fenced_blocks(page.read_text(encoding="utf-8")):
        if tuple(info.split()) != RUNNABLE:
            continue
        pending, first = "", None
        for offset, line in enumerate(body, start=1):
            if first is None:
                first = start + offset
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            command = (pending + line).strip()
            pending = ""
            if command and not command.startswith("#"):
                out.append((first, command))
            first = None
        assert not pending, f"{_rel(page)}:{start}: a runnable block ends with a line continuation"
    return out


def _pages_with_commands():
    params = []
    for page in PAGES:
        if not _commands(page):
            continue
        marks = [pytest.mark.slow] if page.name in SLOW_PAGES else []
        params.append(pytest.param(page, id=_rel(page), marks=marks))
    return params


def _run(argv: list[str]) -> int:
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse, LightningCLI's --print_config, user errors
        code = stop.code
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    # An in-process fit leaves its wandb run open, and the next WandbLogger would reuse it.
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
    return int(code or 0)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("page", _pages_with_commands())
def test_runnable_blocks(page, tmp_path, monkeypatch, capfd):
    """Every ``bash doctest`` line of the page, in order, in one scratch folder, exits with 0."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / "experiments").symlink_to(ROOT / "experiments", target_is_directory=True)
    for line_no, command in _commands(page):
        where = f"{_rel(page)}:{line_no}: {command}"
        argv = shlex.split(command, comments=True)
        assert argv[0] == "landmarks", f"{where}: a runnable block holds only `landmarks ...` commands"
        unsupported = [arg for arg in argv if SHELL_SYNTAX.search(arg)]
        assert not unsupported, f"{where}: shell syntax {unsupported} cannot run in-process; use a plain bash block"
        code = _run(argv[1:])
        output = capfd.readouterr()
        assert code == 0, f"{where}\nexit status {code}\n--- stdout\n{output.out[-3000:]}\n--- stderr\n{output.err[-5000:]}"


def test_the_runnable_examples_exist():
    """The convention is in use: guards against a renamed info string silently running nothing."""
    runnable = {page.name for page in PAGES if _commands(page)}
    assert {"data.md", "cleaning.md", "inference.md"} <= runnable, runnable


# ---------------------------------------------------------------------------------------------
# links and the command table

LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The page without its fenced blocks and inline code spans (links there are not links)."""
    kept, fenced = [], False
    for line in text.splitlines():
        if re.match(r"^\s*(`{3,}|~{3,})", line):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def _anchor(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    headings = [line.lstrip("#").strip() for line in _prose_with_code(page).splitlines()
                if re.match(r"^#{1,6}\s", line)]
    seen: dict[str, int] = {}
    out = set()
    for heading in headings:
        base = _anchor(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_point_to_existing_files(page):
    broken = []
    for match in LINK.finditer(_prose(page.read_text(encoding="utf-8"))):
        target = match.group(1) or match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no {os.path.relpath(file, ROOT)})")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {os.path.relpath(file, ROOT)})")
    assert not broken, f"{_rel(page)}: broken links: {broken}"


PACKAGES = ("core", "datamodules", "losses", "lightning_modules", "retrieval", "recognition", "cleaning",
            "callbacks", "sweeps", "cli")
REPO_PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(PACKAGES)}|experiments|bench|tests|docs|\.ci)/[\w.*/-]*[\w*])")
DOTTED_NAME = re.compile(rf"^(?:{'|'.join(PACKAGES)})(?:\.[A-Za-z_]\w*)+$")
FILE_NAME = re.compile(r"\.(?:ya?ml|py|csv|json|md|txt|html|npy|png|pt|onnx)$")


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_named_repository_files_exist(page):
    """A file of this repository named anywhere on the page (`datamodules/images.py`,
    `experiments/demo.yaml`) exists, so a moved file cannot leave the docs pointing at nothing."""
    missing = sorted({path for path in REPO_PATH.findall(page.read_text(encoding="utf-8"))
                      if not (list(ROOT.glob(path)) if "*" in path else (ROOT / path).exists())})
    assert not missing, f"{_rel(page)} names files that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_named_python_objects_exist(page):
    """A project module or object named in inline code (`cleaning.algorithm.CleaningParams`) imports."""
    import importlib

    names = {span for span in re.findall(r"`([^`\s]+)`", _prose_with_code(page)) if DOTTED_NAME.match(span) and not FILE_NAME.search(span)}
    missing = []
    for name in sorted(names):
        parts = name.split(".")
        for split in range(len(parts), 0, -1):  # the longest importable module prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            try:
                for attribute in parts[split:]:
                    obj = getattr(obj, attribute)
            except AttributeError:
                missing.append(name)
            break
        else:
            missing.append(name)
    assert not missing, f"{_rel(page)} names modules or objects that do not exist: {missing}"


def _prose_with_code(page: Path) -> str:
    """The page without its fenced blocks, inline code kept."""
    kept, fenced = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if re.match(r"^\s*(`{3,}|~{3,})", line):
            fenced = not fenced
        elif not fenced:
            kept.append(line)
    return "\n".join(kept)


def _command_table() -> list[str]:
    """The ``landmarks <command>`` names in the first column of README's "Commands" table."""
    section = re.search(r"^## Commands\n(.*?)(?=^## )", README.read_text(encoding="utf-8"), re.M | re.S)
    assert section, "README.md has no '## Commands' section"
    rows = [line for line in section.group(1).splitlines() if line.startswith("|")][2:]  # header, rule
    names = []
    for row in rows:
        first = row.strip("|").split("|")[0]
        found = re.findall(r"`landmarks ([a-z0-9_-]+)[^`]*`", first)
        assert found, f"README.md command table row without a `landmarks <command>`: {row}"
        names += found
    return names


def test_command_table_names_every_real_command_once():
    names = _command_table()
    real = set(TOOL_COMMANDS) | set(LIGHTNING_COMMANDS)
    assert not set(names) - real, f"README.md names commands that do not exist: {sorted(set(names) - real)}"
    assert not real - set(names), f"commands missing from README.md's command table: {sorted(real - set(names))}"
    assert len(names) == len(set(names)), f"a command is listed twice: {names}"


def test_readme_first_screen_is_the_two_commands_and_what_the_project_is():
    text = README.read_text(encoding="utf-8")
    info, _, body = _fenced_blocks(text)[0]
    assert text.startswith("```bash\n") and info == "bash"
    assert [line.split()[:2] for line in body] == [["./dev.sh", "demo"], ["./dev.sh", "test"]]
    assert text.split("\n```\n", 1)[1].lstrip().startswith("# Landmark recognition")
