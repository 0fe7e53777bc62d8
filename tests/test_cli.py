"""The ``pachyderm`` command: the README's shell transcript, and the terminal commands."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import pachyderm
from pachyderm._cli import _module_name, find_type
from pachyderm._shell import show

REPO = Path(__file__).resolve().parents[1]
COUNTER = str(REPO / "examples" / "counter.py")

# The original README's transcript, in Python, and what it prints.
TRANSCRIPT = """\
counter = (Counter, "my_counter")
await activate(counter, "increment")
await activate(counter, "increment")
await follow(counter)
await activate(counter, "increment")
flush()
"""
PRINTED = ["1", "2", "2", "3", "((Counter, 'my_counter'), 3)"]


def run(
    *args: str, cwd: Path, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pachyderm ARGS`` in ``cwd``, without the caller's PACHYDERM_URL."""
    environ = {k: v for k, v in os.environ.items() if k != "PACHYDERM_URL"} | env
    return subprocess.run(
        [sys.executable, "-m", "pachyderm", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        env=environ,
    )


def printed(stdout: str) -> list[str]:
    """Return what the shell printed, without its prompts."""
    lines = []
    for line in stdout.splitlines():
        while line.startswith((">>> ", "... ")):
            line = line[4:]
        if line.strip():
            lines.append(line)
    return lines


# ---------------------------------------------------------------------- the shell


def test_shell_runs_the_readme_transcript_in_memory(tmp_path: Path) -> None:
    result = run("shell", COUNTER, "--db", "memory://", cwd=tmp_path, stdin=TRANSCRIPT)
    assert result.returncode == 0, result.stderr
    assert printed(result.stdout) == PRINTED
    assert "memory" in result.stderr  # the banner says where the data is
    assert "Counter (stored as 'Counter')" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "pachyderm.db").exists()


def test_shell_on_the_default_sqlite_file_survives_a_restart(tmp_path: Path) -> None:
    first = run("shell", COUNTER, cwd=tmp_path, stdin=TRANSCRIPT)
    assert first.returncode == 0, first.stderr
    assert printed(first.stdout) == PRINTED
    assert str(tmp_path / "pachyderm.db") in first.stderr
    again = 'counter = (Counter, "my_counter")\nawait activate(counter, "increment")\n'
    second = run("shell", COUNTER, cwd=tmp_path, stdin=again)
    assert second.returncode == 0, second.stderr
    assert printed(second.stdout) == ["4"]


def test_shell_shows_errors_and_goes_on(tmp_path: Path) -> None:
    lines = 'await activate((Counter, ""), 1)\n1 / 0\nawait read((Counter, "k"))\nexit()\n9\n'
    result = run("shell", COUNTER, "--db", "memory://", cwd=tmp_path, stdin=lines)
    assert result.returncode == 0
    assert "InvalidKey: a key cannot be empty" in result.stderr
    assert "ZeroDivisionError" in result.stderr
    assert "_shell.py" not in result.stderr  # tracebacks start in the user's code
    assert printed(result.stdout) == ["0"]  # nothing runs after exit()


# ---------------------------------------------------------------------- terminal commands


def test_activate_read_list_round_trip(tmp_path: Path) -> None:
    def ok(*args: str) -> str:
        result = run(*args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert ok("activate", COUNTER, "Counter", "my_counter", '"increment"') == "1\n"
    assert ok("activate", COUNTER, "Counter", "my_counter", '["a", {"b": null}]') == "2\n"
    assert ok("read", COUNTER, "Counter", "my_counter") == "2\n"
    assert ok("list", COUNTER, "Counter", "--prefix", "my_") == "my_counter\n"


def test_the_module_form_from_the_repo_root_with_the_console_script() -> None:
    script = Path(sys.executable).with_name("pachyderm")
    if not script.exists():
        pytest.skip(f"no console script at {script} (pip install -e . makes it)")
    result = subprocess.run(
        [str(script), "activate", "examples.counter", "Counter", "k", '"x"', "--db", "memory://"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (result.returncode, result.stdout) == (0, "1\n"), result.stderr


def test_pachyderm_url_chooses_the_backend(tmp_path: Path) -> None:
    result = run("read", COUNTER, "Counter", "k", cwd=tmp_path, PACHYDERM_URL="memory://")
    assert (result.returncode, result.stdout) == (0, "0\n"), result.stderr
    assert not (tmp_path / "pachyderm.db").exists()


def test_follow_prints_versions_until_ctrl_c(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "pachyderm", "follow", COUNTER, "Counter", "k", "--db", "memory://"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "0 0\n"  # version 0: the init() state
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130
    assert "Traceback" not in stderr


def test_an_invalid_key_is_an_error_without_traceback(tmp_path: Path) -> None:
    result = run(
        "activate", COUNTER, "Counter", "", '"increment"', "--db", "memory://", cwd=tmp_path
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: InvalidKey: ")
    assert "Traceback" not in result.stderr


def test_an_unknown_type_names_the_known_ones(tmp_path: Path) -> None:
    result = run("read", COUNTER, "Nope", "k", "--db", "memory://", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: UnknownEntityType: no entity type 'Nope'")
    assert "Counter (stored as 'Counter')" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["activate", COUNTER, "Counter", "k", "increment"], """'"increment"'"""),
        (["read", "missing.py", "Counter", "k"], "no such file"),
        (["read", "no_such_module", "Counter", "k"], "no module named 'no_such_module'"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = run(*args, "--db", "memory://", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------- the example


def test_the_counter_example_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, COUNTER], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "read after a restart: 4"
    assert list(tmp_path.iterdir()) == []  # it wrote in a temporary folder


# ---------------------------------------------------------------------- helpers, in process


class Thing(pachyderm.Entity):
    name = "tests.Thing"

    def activate(self, message: object, state: object) -> object:
        return message


def test_show_writes_entity_types_by_their_class_name() -> None:
    assert show(((Thing, "k"), 3)) == "((Thing, 'k'), 3)"
    assert show([Thing, {Thing: (Thing,)}, {Thing}, frozenset()]) == (
        "[Thing, {Thing: (Thing,)}, {Thing}, frozenset()]"
    )
    loop: list[object] = [Thing]
    loop.append(loop)
    assert show(loop) == "[Thing, [...]]"
    assert show({"a": (1, "b")}) == repr({"a": (1, "b")})
    assert show(int) == "<class 'int'>"


def test_find_type_by_stored_or_class_name() -> None:
    assert find_type([Thing], "tests.Thing", "app") is Thing
    assert find_type([Thing], "Thing", "app") is Thing
    with pytest.raises(pachyderm.UnknownEntityType, match="Thing"):
        find_type([Thing], "Other", "app")


def test_a_file_is_imported_under_its_dotted_path_from_the_current_folder() -> None:
    cwd = os.getcwd()
    assert _module_name(os.path.join(cwd, "examples", "counter.py")) == "examples.counter"
    assert _module_name(os.path.join(cwd, "my-app", "counter.py")) == "counter"
    assert _module_name(os.path.join(os.path.dirname(cwd), "elsewhere.py")) == "elsewhere"
