"""History tools: export an event-sourced entity's history as JSON lines, replay it, check it."""

from __future__ import annotations

import base64
import io
import itertools
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

import pachyderm
from pachyderm import EventSourced, backends, history

from .test_cli import run

MakeBackend = Callable[[], backends.Backend]
NAME = "tests.history.Account"


class Account(EventSourced):
    """("deposit", n), ("note", value), ("many", k); a snapshot every 3 events."""

    name = NAME
    snapshot_every = 3

    def init(self) -> dict[str, Any]:
        return {"balance": 0, "memo": []}

    def handle(self, command: Any, state: dict[str, Any]) -> list[Any]:
        kind, arg = command
        if kind == "deposit":
            return [("deposited", arg)]
        if kind == "note":
            return [("noted", arg)]
        assert kind == "many"
        return [("deposited", 1)] * arg

    def apply(self, event: Any, state: dict[str, Any]) -> dict[str, Any]:
        if event[0] == "deposited":
            return {**state, "balance": state["balance"] + event[1]}
        if event[0] == "noted":
            return {**state, "memo": [*state["memo"], event[1]]}
        raise ValueError(f"cannot apply {event!r}")


# Versions of Account that a later deploy might bring: the same stored name, another apply.

COUNTER = itertools.count()
SHARED: list[Any] = []


class Clocked(Account):
    """Notes a counter instead of the note: not deterministic."""

    name = NAME

    def apply(self, event: Any, state: dict[str, Any]) -> dict[str, Any]:
        if event[0] == "noted":
            return {**state, "memo": [*state["memo"], next(COUNTER)]}
        return super().apply(event, state)


class Dice(Account):
    """Notes a random number: not deterministic."""

    name = NAME

    def apply(self, event: Any, state: dict[str, Any]) -> dict[str, Any]:
        if event[0] == "noted":
            return {**state, "memo": [*state["memo"], random.random()]}
        return super().apply(event, state)


class Shared(Account):
    """Keeps its notes in a module-level list: state shared between folds."""

    name = NAME

    def apply(self, event: Any, state: dict[str, Any]) -> dict[str, Any]:
        if event[0] == "noted":
            SHARED.append(event[1])
            return {**state, "memo": SHARED}
        return super().apply(event, state)


class Picky(Account):
    """Refuses notes: its apply raises."""

    name = NAME

    def apply(self, event: Any, state: dict[str, Any]) -> dict[str, Any]:
        if event[0] == "noted":
            raise ValueError("no notes")
        return super().apply(event, state)


class Doubling(Account):
    """Counts deposits twice: apply changed without a new version."""

    name = NAME

    def apply(self, event: Any, state: dict[str, Any]) -> dict[str, Any]:
        if event[0] == "deposited":
            return {**state, "balance": state["balance"] + 2 * event[1]}
        return super().apply(event, state)


class Money(msgspec.Struct, frozen=True):
    cents: int


class Till(EventSourced):
    """Typed events and state."""

    name = "tests.history.Till"
    event_type = Money
    state_type = int

    def init(self) -> int:
        return 0

    def handle(self, command: Any, state: int) -> list[Money]:
        return [Money(command)]

    def apply(self, event: Money, state: int) -> int:
        return state + event.cents


class Plain(pachyderm.Entity):
    name = "tests.history.Plain"

    def activate(self, message: Any, state: Any) -> Any:
        return message


ALICE = (Account, "alice")
# Five events: a snapshot at 3, a note at 4 (where the variants above misbehave).
COMMANDS = [("deposit", 1), ("deposit", 2), ("deposit", 3), ("note", "x"), ("deposit", 4)]
FINAL = {"balance": 10, "memo": ["x"]}


async def export_of(
    backend: backends.Backend, commands: list[Any] = COMMANDS, ref: Any = ALICE
) -> list[str]:
    """Run ``commands`` on ``ref``; return its exported history, as lines."""
    async with pachyderm.World(backend, entities=[ref[0]]) as world:
        for command in commands:
            await world.activate(ref, command)
        out = io.StringIO()
        assert await history.export(world, ref, out) == await count_events(world, ref)
    return out.getvalue().splitlines()


async def count_events(world: pachyderm.World, ref: Any) -> int:
    info, key = world._registry.resolve(ref)
    return len(await world.backend.read_events(info.name, key, limit=10**9))


def parsed(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines]


def encoded(rows: list[dict[str, Any]]) -> list[str]:
    return [json.dumps(row) for row in rows]


# ---------------------------------------------------------------------- export, then replay


async def test_export_writes_the_documented_format(make_backend: MakeBackend) -> None:
    commands = [("deposit", 5), ("note", b"\x00hi"), ("deposit", 2), ("note", (1, "t"))]
    lines = await export_of(make_backend(), commands)
    note = base64.b64encode(b"\x00hi").decode()
    state_3 = {"balance": 7, "memo": [note]}
    final = {"balance": 7, "memo": [note, [1, "t"]]}
    assert parsed(lines) == [
        {
            "pachyderm": "history",
            "format": 1,
            "type": NAME,
            "key": "alice",
            "world": "default",
            "type_version": 1,
        },
        {"seq": 1, "type_version": 1, "event": ["deposited", 5]},
        {"seq": 2, "type_version": 1, "event": ["noted", note]},
        {"seq": 3, "type_version": 1, "event": ["deposited", 2]},
        {"snapshot": 3, "state": state_3},  # right after the event of its seq
        {"seq": 4, "type_version": 1, "event": ["noted", [1, "t"]]},
        {"state": final, "seq": 4},
    ]
    result = history.replay(Account, lines)
    assert result == history.Replay(True, 4, None, result.reason, final)
    assert "snapshot at seq 3" in result.reason
    assert "final state" in result.reason


async def test_export_to_a_path_and_replay_from_it(
    make_backend: MakeBackend, tmp_path: Path
) -> None:
    backend = make_backend()
    lines = await export_of(backend)
    path = tmp_path / "alice.jsonl"
    async with pachyderm.World(make_backend(), entities=[Account]) as world:
        assert await history.export(world, ALICE, path) == 5
        assert await history.export(world, ALICE, str(path)) == 5
    assert path.read_text(encoding="utf-8") == "".join(f"{line}\n" for line in lines)
    for source in (path, str(path)):
        result = history.replay(Account, source)
        assert (result.ok, result.events, result.state) == (True, 5, FINAL), result.reason


async def test_export_reads_the_log_page_by_page(
    make_backend: MakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pachyderm._history._PAGE", 4)
    backend = make_backend()
    async with pachyderm.World(backend, entities=[Account]) as world:
        await world.activate(ALICE, ("many", 10))
        limits: list[int] = []
        read_events = world.backend.read_events

        async def spy(type_name: str, key: str, *, after: int = 0, limit: int = 1000) -> Any:
            limits.append(limit)
            return await read_events(type_name, key, after=after, limit=limit)

        monkeypatch.setattr(world.backend, "read_events", spy)
        out = io.StringIO()
        assert await history.export(world, ALICE, out) == 10
        assert limits == [4, 4, 2]  # never more than a page, never past the state's seq
        limits.clear()
        assert (await history.check(world, ALICE)).ok
        assert limits == [4, 4, 2]
    result = history.replay(Account, out.getvalue().splitlines())
    assert (result.ok, result.events, result.state["balance"]) == (True, 10, 10), result.reason


async def test_an_entity_without_events(make_backend: MakeBackend) -> None:
    lines = await export_of(make_backend(), [])
    assert parsed(lines)[1:] == [{"state": {"balance": 0, "memo": []}, "seq": 0}]
    result = history.replay(Account, lines)
    assert (result.ok, result.events, result.diverged_at) == (True, 0, None)
    async with pachyderm.World(make_backend(), entities=[Account]) as world:
        assert (await history.check(world, ALICE)).ok


async def test_typed_events_are_decoded_with_event_type(make_backend: MakeBackend) -> None:
    till = (Till, "t")
    lines = await export_of(make_backend(), [5, 3], till)
    assert parsed(lines)[1] == {"seq": 1, "type_version": 1, "event": {"cents": 5}}
    result = history.replay(Till, lines)
    assert (result.ok, result.state) == (True, 8), result.reason
    rows = parsed(lines)
    rows[2]["event"] = {"cents": "three"}
    with pytest.raises(pachyderm.SerializationError, match="event 2"):
        history.replay(Till, encoded(rows))


# ---------------------------------------------------------------------- what replay catches


@pytest.mark.parametrize("variant", [Clocked, Dice, Shared])
async def test_a_non_deterministic_apply_is_caught_at_its_event(variant: type[Account]) -> None:
    lines = await export_of(backends.Memory())
    assert history.replay(Account, lines).ok
    SHARED.clear()
    result = history.replay(variant, lines)
    assert (result.ok, result.diverged_at, result.events) == (False, 4, 4)
    assert result.reason.startswith("event 4: apply is not deterministic"), result.reason


async def test_an_apply_that_raises_is_a_divergence_not_an_exception() -> None:
    lines = await export_of(backends.Memory())
    result = history.replay(Picky, lines)
    assert (result.ok, result.diverged_at) == (False, 4)
    assert "event 4: apply raised ValueError: no notes" in result.reason
    assert result.state == {"balance": 6, "memo": []}  # the state before event 4


async def test_an_edited_snapshot_is_caught_at_its_seq() -> None:
    lines = await export_of(backends.Memory())
    rows = parsed(lines)
    (at,) = [i for i, row in enumerate(rows) if "snapshot" in row]
    assert rows[at] == {"snapshot": 3, "state": {"balance": 6, "memo": []}}
    rows[at]["state"]["balance"] = 7
    result = history.replay(Account, encoded(rows))
    assert (result.ok, result.diverged_at) == (False, 3)
    assert "event 3: the folded state is not the snapshot at seq 3" in result.reason
    # A snapshot line may come before its event, too (it waits for its seq).
    rows.insert(1, rows.pop(at))
    assert history.replay(Account, encoded(rows)).diverged_at == 3
    rows[1]["state"]["balance"] = 6
    assert history.replay(Account, encoded(rows)).ok


async def test_an_edited_event_is_caught_by_the_next_stored_state() -> None:
    rows = parsed(await export_of(backends.Memory()))
    assert rows[-2] == {"seq": 5, "type_version": 1, "event": ["deposited", 4]}
    rows[-2]["event"] = ["deposited", 40]
    result = history.replay(Account, encoded(rows))
    assert (result.ok, result.diverged_at, result.events) == (False, 5, 5)
    assert "the folded state is not the final state" in result.reason
    assert result.state == {"balance": 46, "memo": ["x"]}
    # An event before the snapshot is caught at the snapshot.
    rows = parsed(await export_of(backends.Memory()))
    rows[2]["event"] = ["deposited", 20]
    assert history.replay(Account, encoded(rows)).diverged_at == 3


def test_states_are_compared_as_json_values() -> None:
    header = {"pachyderm": "history", "format": 1, "type": NAME, "key": "k", "world": "w"}
    rows = [
        {**header, "type_version": 1},
        {"seq": 1, "type_version": 1, "event": ["noted", {"b": 1, "a": [1.5, None]}]},
        {"state": {"memo": [{"a": [1.5, None], "b": 1}], "balance": 0}, "seq": 1},
    ]
    lines = [json.dumps(rows[0]), "", json.dumps(rows[1], indent=None), "  ", json.dumps(rows[2])]
    result = history.replay(Account, lines)  # key order and blank lines do not matter
    assert result.ok, result.reason
    rows[2]["state"]["balance"] = False  # JSON false is not 0
    assert history.replay(Account, encoded(rows)).diverged_at == 1


# ---------------------------------------------------------------------- malformed histories


def _set(index: int, **fields: Any) -> Callable[[list[dict[str, Any]]], None]:
    def edit(rows: list[dict[str, Any]]) -> None:
        rows[index].update(fields)

    return edit


def _drop(*fields: str, index: int = 0) -> Callable[[list[dict[str, Any]]], None]:
    def edit(rows: list[dict[str, Any]]) -> None:
        for name in fields:
            del rows[index][name]

    return edit


def _delete(index: int) -> Callable[[list[dict[str, Any]]], None]:
    def edit(rows: list[dict[str, Any]]) -> None:
        del rows[index]

    return edit


def _snapshot_last(rows: list[dict[str, Any]]) -> None:
    rows.insert(-1, rows.pop(4))


# The rows of COMMANDS: 0 header, 1-3 events, 4 snapshot, 5-6 events, 7 final.
MALFORMED: list[tuple[str, Any, type[Exception], str]] = [
    ("empty", lambda rows: rows.clear(), pachyderm.InvalidOptions, "no header"),
    ("not a header", _set(0, pachyderm="other"), pachyderm.InvalidOptions, "not the header"),
    ("format 2", _set(0, format=2), pachyderm.InvalidOptions, "format 2"),
    ("another type", _set(0, type="tests.Other"), pachyderm.InvalidOptions, "tests.Other"),
    ("another version", _set(0, type_version=2), pachyderm.IncompatibleVersion, "version 2"),
    ("no world", _drop("world"), pachyderm.InvalidOptions, "world"),
    ("a bad key", _set(0, key=""), pachyderm.InvalidKey, "empty"),
    ("a gap", _delete(2), pachyderm.InvalidOptions, "event 3 after event 1: the seqs"),
    ("not from 1", _delete(1), pachyderm.InvalidOptions, "event 2 after event 0"),
    ("a seq twice", _set(2, seq=1), pachyderm.InvalidOptions, "contiguous"),
    ("truncated", _delete(7), pachyderm.InvalidOptions, "truncated after event 5"),
    ("after the end", lambda rows: rows.append(rows[1]), pachyderm.InvalidOptions, "goes on"),
    ("final seq", _set(7, seq=4), pachyderm.InvalidOptions, "final state is at seq 4"),
    ("a late snapshot", _snapshot_last, pachyderm.InvalidOptions, "snapshot at seq 3 after"),
    ("no event", _drop("event", index=1), pachyderm.InvalidOptions, "neither"),
    ("no type_version", _drop("type_version", index=1), pachyderm.InvalidOptions, "line 2"),
    ("an extra field", _set(1, extra=1), pachyderm.InvalidOptions, "unknown field"),
    ("a bool seq", _set(1, seq=True), pachyderm.InvalidOptions, "line 2"),
    ("event and state", _set(1, state=0), pachyderm.InvalidOptions, "neither"),
]


@pytest.mark.parametrize(
    ("edit", "error", "match"), [case[1:] for case in MALFORMED], ids=[c[0] for c in MALFORMED]
)
async def test_a_malformed_history_is_a_named_error(
    edit: Callable[[list[dict[str, Any]]], None], error: type[Exception], match: str
) -> None:
    rows = parsed(await export_of(backends.Memory()))
    assert history.replay(Account, encoded(rows)).ok
    edit(rows)
    with pytest.raises(error, match=match):
        history.replay(Account, encoded(rows))


async def test_lines_that_are_not_json_and_inputs_that_are_not_lines() -> None:
    lines = await export_of(backends.Memory())
    with pytest.raises(pachyderm.SerializationError, match="line 1 is not JSON"):
        history.replay(Account, ["{nope", *lines[1:]])
    with pytest.raises(pachyderm.SerializationError, match="line 3 is not JSON"):
        history.replay(Account, [*lines[:2], '{"seq": 2,', *lines[3:]])
    with pytest.raises(pachyderm.InvalidOptions, match="not bytes"):
        history.replay(Account, "\n".join(lines).encode())  # type: ignore[arg-type]
    with pytest.raises(pachyderm.InvalidOptions, match="line 2 is a int"):
        history.replay(Account, [lines[0], 7])  # type: ignore[list-item]
    with pytest.raises(pachyderm.InvalidOptions, match="not event-sourced"):
        history.replay(Plain, lines)  # type: ignore[arg-type]
    with pytest.raises(pachyderm.UnknownEntityType):
        history.replay(int, lines)  # type: ignore[arg-type]
    with pytest.raises(pachyderm.InvalidKey):
        history.replay(Account, lines, key="")
    with pytest.raises(pachyderm.InvalidOptions, match="cannot read") as missing:
        history.replay(Account, "no-such-history.jsonl")
    assert isinstance(missing.value.__cause__, FileNotFoundError)


async def test_export_and_check_refuse_a_state_entity() -> None:
    async with pachyderm.World(backends.Memory(), entities=[Plain, Account]) as world:
        with pytest.raises(pachyderm.InvalidOptions, match="not event-sourced"):
            await history.export(world, (Plain, "p"), io.StringIO())
        with pytest.raises(pachyderm.InvalidOptions, match="not event-sourced"):
            await history.check(world, (Plain, "p"))
        with pytest.raises(pachyderm.InvalidKey):
            await history.check(world, (Account, ""))
        with pytest.raises(pachyderm.InvalidOptions, match="a path or a text file"):
            await history.export(world, (Account, "a"), 3)  # type: ignore[arg-type]


async def test_export_to_a_path_that_cannot_be_written(tmp_path: Path) -> None:
    async with pachyderm.World(backends.Memory(), entities=[Account]) as world:
        await world.activate((Account, "a"), ("deposit", 5))
        for bad in (tmp_path, tmp_path / "no-such-folder" / "a.jsonl"):
            with pytest.raises(pachyderm.InvalidOptions, match="cannot write") as caught:
                await history.export(world, (Account, "a"), bad)
            assert isinstance(caught.value.__cause__, OSError)


# ---------------------------------------------------------------------- check, on the live log


async def test_check_agrees_with_the_stored_log(make_backend: MakeBackend) -> None:
    await export_of(make_backend())
    async with pachyderm.World(make_backend(), entities=[Account]) as world:
        result = await history.check(world, ALICE)
    assert (result.ok, result.events, result.diverged_at, result.state) == (True, 5, None, FINAL)
    assert "the stored snapshot at seq 3" in result.reason
    assert "the state the world reads" in result.reason


async def test_check_names_the_event_of_a_non_deterministic_apply(
    make_backend: MakeBackend,
) -> None:
    await export_of(make_backend())
    async with pachyderm.World(make_backend(), entities=[Clocked]) as world:
        result = await history.check(world, (Clocked, "alice"))
    assert (result.ok, result.diverged_at) == (False, 4), result.reason
    assert "apply is not deterministic" in result.reason


async def test_check_catches_an_apply_changed_without_a_new_version(
    make_backend: MakeBackend,
) -> None:
    await export_of(make_backend())
    async with pachyderm.World(make_backend(), entities=[Doubling]) as world:
        # Loading starts from the snapshot, so the world reads 6 + 2 * 4: the change is silent.
        assert (await world.read((Doubling, "alice")))["balance"] == 14
        result = await history.check(world, (Doubling, "alice"))
    assert (result.ok, result.diverged_at) == (False, 3)
    assert "event 3: the folded state is not the stored snapshot at seq 3" in result.reason


async def test_check_of_a_broken_entity_names_the_event(make_backend: MakeBackend) -> None:
    await export_of(make_backend())
    async with pachyderm.World(make_backend(), entities=[Picky]) as world:
        with pytest.raises(pachyderm.EntityBroken):
            await world.read((Picky, "alice"))
        result = await history.check(world, (Picky, "alice"))
    assert (result.ok, result.diverged_at) == (False, 4)
    assert "event 4: apply raised ValueError: no notes" in result.reason


# ---------------------------------------------------------------------- the command line

APP = """\
import pachyderm


class Tally(pachyderm.EventSourced):
    name = "app.Tally"
    snapshot_every = 2

    def init(self):
        return 0

    def handle(self, command, state):
        return [command]

    def apply(self, event, state):
        return state + event
"""
# The same type, deployed with an apply that reads a counter.
APP_CLOCKED = APP.replace(
    "import pachyderm\n", "import itertools\nimport pachyderm\n\nN = itertools.count()\n"
).replace("return state + event", "return state + event + next(N)")


def test_the_command_line_round_trip_through_a_sqlite_file(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(APP, encoding="utf-8")
    (tmp_path / "clocked.py").write_text(APP_CLOCKED, encoding="utf-8")
    db = ("--db", "sqlite:///world.db")

    def cli(*args: str) -> tuple[int, str, str]:
        result = run(*args, cwd=tmp_path)
        assert "Traceback" not in result.stderr, result.stderr
        return result.returncode, result.stdout, result.stderr

    for n in (3, 4, 5):
        assert cli("activate", "app.py", "Tally", "k:1", str(n), *db)[0] == 0
    status, _, stderr = cli("history", "export", "app.py", "Tally", "k:1", "-o", "h.jsonl", *db)
    assert (status, stderr) == (0, "3 events of Tally 'k:1' written to h.jsonl\n")
    text = (tmp_path / "h.jsonl").read_text(encoding="utf-8")
    assert parsed(text.splitlines())[1:] == [
        {"seq": 1, "type_version": 1, "event": 3},
        {"seq": 2, "type_version": 1, "event": 4},
        {"snapshot": 2, "state": 7},
        {"seq": 3, "type_version": 1, "event": 5},
        {"state": 12, "seq": 3},
    ]
    assert cli("history", "export", "app.py", "app.Tally", "k:1", *db) == (0, text, "")
    status, stdout, _ = cli("history", "replay", "app.py", "h.jsonl")
    assert (status, stdout.startswith("ok: 3 events of app.Tally:'k:1'")) == (0, True), stdout
    status, stdout, _ = cli("history", "check", "app.py", "Tally", "k:1", *db)
    assert (status, "and with the stored snapshot at seq 2 and the state the world reads") == (
        0,
        stdout.rstrip().split(" every event, ")[1],
    ), stdout

    # Diverging: exit status 1, and the reason.
    (tmp_path / "edited.jsonl").write_text(text.replace('"state":12', '"state":13'), "utf-8")
    status, stdout, _ = cli("history", "replay", "app.py", "edited.jsonl")
    assert (status, stdout) == (
        1,
        "diverged: event 3: the folded state is not the final state: folded 12, stored 13\n",
    )
    status, stdout, _ = cli("history", "replay", "clocked.py", "h.jsonl", "--type", "Tally")
    assert (status, stdout.startswith("diverged: event 1: apply is not deterministic")) == (
        1,
        True,
    ), stdout
    status, stdout, _ = cli("history", "check", "clocked.py", "Tally", "k:1", *db)
    assert (status, stdout.startswith("diverged: event 1: apply is not")) == (1, True), stdout

    # Errors of Pachyderm: exit status 1; usage errors: 2.
    (tmp_path / "bad.jsonl").write_text("nope\n", encoding="utf-8")
    status, _, stderr = cli("history", "replay", "app.py", "bad.jsonl")
    assert (status, stderr.startswith("error: SerializationError: line 1")) == (1, True), stderr
    status, _, stderr = cli("history", "replay", "app.py", "h.jsonl", "--type", "Nope")
    assert (status, stderr.startswith("error: UnknownEntityType")) == (1, True), stderr
    status, _, stderr = cli("history", "export", "app.py", "Tally", *db)
    assert (status, "the following arguments are required: KEY" in stderr) == (2, True), stderr
    status, _, stderr = cli("history", "replay", "app.py", "missing.jsonl")
    assert (status, "FILE 'missing.jsonl'" in stderr) == (2, True), stderr
    assert cli("history", "export", "app.py", "Tally", "k:1", "-o", "no/such/h.jsonl", *db)[0] == 2
    assert cli("history", *db)[0] == 2
