"""The code in the README and in docs/*.md runs, and so do the examples.

The conventions, for whoever writes the docs:

- A ```python block is a complete program, as a reader would paste it into a file: it runs as a
  script (``python -W error block.py``) in a fresh, empty temporary folder, so it may write files
  there, and it must exit with status 0. There is no top-level ``await`` in a python block: async
  code ends with ``asyncio.run(main())``. A block checks what it claims with ``assert``.
- A ```pycon block is a transcript of ``pachyderm shell examples/counter.py``: lines starting with
  ``>>> `` or ``... `` are typed in, every other line is printed by the shell. It runs in a fresh
  shell on ``--db memory://`` from the repository's root, and the printed lines must be the
  transcript's, in order (blank lines aside).
- ```python no-run opts a block out of running; say why next to it. There should be almost none.
- ```sh, ```bash, ```console and ```text blocks are not run. A fence without a language, or with
  any other one (```py, say), fails ``test_every_fence_is_known``, so that no code hides from these
  tests.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
EXAMPLES = sorted((REPO / "examples").glob("*.py"))
KNOWN_FENCES = {"python", "python no-run", "pycon", "sh", "bash", "console", "text"}
MAX_NO_RUN = 1
TIMEOUT = 60

# The original README's transcript (issue 2), in Python: what is typed, and what is printed.
ORIGINAL_TYPED = [
    'counter = (Counter, "my_counter")',
    'await activate(counter, "increment")',
    'await activate(counter, "increment")',
    "await follow(counter)",
    'await activate(counter, "increment")',
    "flush()",
]
ORIGINAL_PRINTED = ["1", "2", "2", "3", "((Counter, 'my_counter'), 3)"]

MAIN_JOB = (
    "python3 -m venv .venv && .venv/bin/pip install -e . && "
    ".venv/bin/pachyderm shell examples/counter.py"
)
TESTS = "make check"


@dataclass(frozen=True)
class Block:
    """One fenced block of a Markdown file."""

    path: Path
    line: int  # of the opening fence, from 1
    info: str  # what follows the opening backticks, e.g. "python" or "python no-run"
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


_FENCE = re.compile(r"^(```+)(.*)$")


def blocks(path: Path) -> list[Block]:
    """Return the fenced blocks of ``path``; a fence must start its line."""
    found: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        ticks, info = opening.group(1), opening.group(2).strip()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != ticks:
            body.append(lines[j])
            j += 1
        if j == len(lines):
            raise AssertionError(f"{path.relative_to(REPO)}:{i + 1}: the fence is never closed")
        found.append(Block(path, i + 1, info, "\n".join(body) + "\n"))
        i = j + 1
    return found


ALL_BLOCKS = [block for path in DOCS for block in blocks(path)]
PYTHON = [b for b in ALL_BLOCKS if b.info == "python"]
PYCON = [b for b in ALL_BLOCKS if b.info == "pycon"]


def _environ() -> dict[str, str]:
    """The environment of a run: this one, without a backend chosen from outside."""
    return {k: v for k, v in os.environ.items() if k != "PACHYDERM_URL"}


def transcript(block: Block) -> tuple[str, list[str]]:
    """Split a pycon block into what is typed (one string) and what is printed (lines)."""
    typed: list[str] = []
    printed: list[str] = []
    for line in block.code.splitlines():
        if line.startswith((">>> ", "... ")) or line in (">>>", "..."):
            typed.append(line[4:])
        elif line.strip():
            printed.append(line)
    return "".join(f"{line}\n" for line in typed), printed


def shell_output(stdout: str) -> list[str]:
    """The non-blank lines the shell printed, without its prompts."""
    lines = []
    for line in stdout.splitlines():
        while line.startswith((">>> ", "... ")):
            line = line[4:]
        if line.strip() and line not in (">>>", "..."):
            lines.append(line)
    return lines


def _report(result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"exit status {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )


# ---------------------------------------------------------------------- the blocks


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_block_runs(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(block.code, encoding="utf-8")
    result = _python(script, cwd=tmp_path)
    assert result.returncode == 0, f"{block.id}: {_report(result)}"


@pytest.mark.parametrize("block", PYCON, ids=[b.id for b in PYCON])
def test_pycon_block_matches_the_shell(block: Block) -> None:
    typed, expected = transcript(block)
    result = subprocess.run(
        [sys.executable, "-m", "pachyderm", "shell", "examples/counter.py", "--db", "memory://"],
        cwd=REPO,
        input=typed,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_environ(),
    )
    assert result.returncode == 0, f"{block.id}: {_report(result)}"
    assert "Traceback" not in result.stderr, f"{block.id}: {_report(result)}"
    assert shell_output(result.stdout) == expected, f"{block.id}: {_report(result)}"


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(example: Path, tmp_path: Path) -> None:
    result = _python(example, cwd=tmp_path)
    assert result.returncode == 0, f"{example.name}: {_report(result)}"


def _python(script: Path, *, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a Python file as a program, with warnings as errors."""
    return subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_environ(),
    )


# ---------------------------------------------------------------------- the rules of the docs


def test_every_fence_is_known() -> None:
    unknown = [f"{b.id}: ```{b.info}" for b in ALL_BLOCKS if b.info not in KNOWN_FENCES]
    assert not unknown, f"fences these tests do not know (see the module docstring): {unknown}"


def test_almost_no_block_opts_out() -> None:
    opted_out = [b.id for b in ALL_BLOCKS if b.info == "python no-run"]
    assert len(opted_out) <= MAX_NO_RUN, opted_out


def test_there_is_code_to_run() -> None:
    assert EXAMPLES, "examples/ has no example"
    assert len(PYTHON) >= 5, [b.id for b in PYTHON]


def test_the_readme_has_the_original_transcript() -> None:
    readme = [b for b in PYCON if b.path.name == "README.md"]
    assert len(readme) == 1, "the README has one shell transcript"
    typed, printed = transcript(readme[0])
    assert typed.splitlines() == ORIGINAL_TYPED
    assert printed == ORIGINAL_PRINTED


def test_the_readme_has_the_two_commands_and_ci_runs_the_second() -> None:
    commands = [
        line
        for b in ALL_BLOCKS
        if b.path.name == "README.md" and b.info == "sh"
        for line in b.code.splitlines()
    ]
    assert commands == [MAIN_JOB, TESTS]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert TESTS in ci, ".ci/run must run exactly the README's test command"


_LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(REPO)) for p in DOCS])
def test_relative_links_resolve(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor in this page
        file = (path.parent / target.split("#", 1)[0]).resolve()
        if not file.exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(REPO)}: links to missing files: {broken}"
