"""The ``pachyderm`` command: a shell, and one-shot commands for the terminal.

Every command opens the world, does one thing and closes it (so every activation it acknowledged
is durable). The backend is ``--db URL``, else the environment variable ``PACHYDERM_URL``, else
the SQLite file ``pachyderm.db`` in the current folder. Only the CLI reads the environment: the
library never picks a backend by itself.

Exit status: 0 on success, 1 for an error of Pachyderm (printed as ``error: <Class>: message``),
2 for a usage error, 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import itertools
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from types import ModuleType
from typing import Any, Final, TextIO

import msgspec

from . import __version__, _history, backends
from ._entity import Entity
from ._errors import PachydermError, SerializationError, UnknownEntityType
from ._world import World

__all__ = ["main"]

DEFAULT_URL: Final = "sqlite:///pachyderm.db"
URL_VARIABLE: Final = "PACHYDERM_URL"

_APP_HELP: Final = (
    "APP is a file (examples/counter.py) or a module importable from the current folder "
    "(examples.counter); every pachyderm.Entity subclass defined in it that has an activate "
    "method is registered. TYPE is the class name of one of them, or its stored name."
)
_JSON_HELP: Final = (
    "MESSAGE_JSON is JSON: a string is quoted ('\"increment\"'), an array arrives as a Python "
    "list, an object as a dict. States are printed as JSON, one per line."
)
_HISTORY_HELP: Final = (
    "TYPE is an event-sourced type of APP. A history file is JSON lines: a header, "
    "one line per event, the stored snapshot, the final state (see docs/events.md). "
    "Exit status: 0 when the replay agrees, 1 when it diverges (the reason is printed) or for "
    "an error of Pachyderm, 2 for a usage error."
)


class UsageError(Exception):
    """A command line that cannot be run: exit status 2, with the usage."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pachyderm`` command line; return the exit status.

    Ctrl-C stops a terminal command: it is cancelled (an ``activate`` not yet started is
    withdrawn; one running or committing may still commit), the world is closed so every
    acknowledged activation stays durable, and the status is 130.
    In the shell, Ctrl-C cancels the running statement only (see ``pachyderm._shell.run``).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except UsageError as exc:
        args.parser.error(str(exc))  # exits with status 2
    except PachydermError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `pachyderm follow ... | head -1`: the reader left
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db",
        metavar="URL",
        help=f"the backend: memory://, sqlite:///relative.db, sqlite:////absolute.db, "
        f"postgresql://user@host/database (default: ${URL_VARIABLE}, else {DEFAULT_URL})",
    )
    common.add_argument(
        "--world", metavar="NAME", default="default", help="the world's name (default: default)"
    )
    parser = argparse.ArgumentParser(
        prog="pachyderm",
        description="Immortal entities (virtual actors): a shell and terminal commands.",
        epilog="Run `pachyderm COMMAND --help` for one command.",
    )
    parser.add_argument("--version", action="version", version=f"pachyderm {__version__}")
    commands = parser.add_subparsers(metavar="COMMAND", required=True)

    def add(name: str, run: Callable[[argparse.Namespace], int], help: str) -> Any:
        sub = commands.add_parser(
            name, parents=[common], help=help, description=help, epilog=f"{_APP_HELP} {_JSON_HELP}"
        )
        sub.set_defaults(command=run, parser=sub)
        return sub

    shell = add("shell", _run_shell, "an asyncio REPL with the world started (top-level await)")
    shell.add_argument("apps", nargs="*", metavar="APP", help="entity types to load")
    activate = add("activate", _run_activate, "send one message; print the new state")
    _add_ref(activate)
    activate.add_argument("message", metavar="MESSAGE_JSON", type=_json, help="the message")
    read = add("read", _run_read, "print the latest state (no activation)")
    _add_ref(read)
    follow = add(
        "follow", _run_follow, "print `version state` lines: the current, then each new one"
    )
    _add_ref(follow)
    follow.add_argument("--since", type=int, metavar="N", help="start after version N")
    list_ = add("list", _run_list, "print the keys of the stored entities of a type, one per line")
    _add_ref(list_, key=False)
    list_.add_argument("--prefix", default="", help="only keys starting with this")
    _add_history(commands, common)
    about = (
        "show a cluster: its nodes, partitions, owners and epochs (and, with the cluster's "
        "secret in $PACHYDERM_SECRET, each node's resident entities)"
    )
    status = commands.add_parser("status", parents=[common], help=about, description=about)
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    status.set_defaults(command=_run_status, parser=status)
    about = "create or migrate the backend's tables (PostgreSQL; SQLite does it when opened)"
    migrate = commands.add_parser("migrate", parents=[common], help=about, description=about)
    migrate.set_defaults(command=_run_migrate, parser=migrate)
    return parser


def _run_status(args: argparse.Namespace) -> int:
    """``pachyderm status``: a cluster's nodes and partitions (see ``pachyderm._status``)."""
    from . import _status

    backend = backends.open(_url(args))
    if not isinstance(backend, backends.Postgres):
        raise UsageError("status shows a cluster: give a PostgreSQL --db (postgresql://...)")
    result = asyncio.run(_status.gather(backend, args.world))
    print(json.dumps(result, indent=2) if args.json else _status.render(result))
    return 0


def _run_migrate(args: argparse.Namespace) -> int:
    """``pachyderm migrate``: create or migrate the tables of the backend at ``--db``."""
    backend = backends.open(_url(args))
    if isinstance(backend, backends.Postgres):
        version = asyncio.run(backend.migrate())
        print(f"schema {backend.schema!r} is at version {version}")
        return 0

    async def touch() -> None:  # SQLite and Memory create and migrate their tables on open
        await backend.open(args.world)
        await backend.aclose()

    asyncio.run(touch())
    print(f"{type(backend).__name__}: the tables are at this version")
    return 0


def _add_history(commands: Any, common: argparse.ArgumentParser) -> None:
    """``pachyderm history export|replay|check``: the history of an event-sourced entity."""
    about = "export an event-sourced entity's history as JSON lines; replay or check it"
    history = commands.add_parser("history", help=about, description=about, epilog=_HISTORY_HELP)
    actions = history.add_subparsers(metavar="ACTION", required=True)

    def add(name: str, run: Callable[[argparse.Namespace], int], help: str, db: bool) -> Any:
        sub = actions.add_parser(
            name,
            parents=[common] if db else [],
            help=help,
            description=help,
            epilog=f"{_APP_HELP} {_HISTORY_HELP}",
        )
        sub.set_defaults(command=run, parser=sub)
        if db:
            _add_ref(sub)  # APP TYPE KEY, as for activate
        else:
            sub.add_argument("app", metavar="APP", help="the file or module of the entity types")
        return sub

    export = add("export", _run_history_export, "write an entity's history as JSON lines", True)
    export.add_argument("-o", "--output", metavar="FILE", help="write to FILE (default: stdout)")
    replay = add(
        "replay",
        _run_history_replay,
        "fold a history file twice with APP's apply(); say where it diverges",
        False,
    )
    replay.add_argument("file", metavar="FILE", help="a file written by export (- for stdin)")
    replay.add_argument(
        "--type", metavar="NAME", help="the entity type (default: the one the header names)"
    )
    add(
        "check",
        _run_history_check,
        "fold the stored events twice; compare with the stored snapshot and state",
        True,
    )


def _add_ref(parser: argparse.ArgumentParser, *, key: bool = True) -> None:
    parser.add_argument("app", metavar="APP", help="the file or module of the entity types")
    parser.add_argument("type", metavar="TYPE", help="an entity type's class or stored name")
    if key:
        parser.add_argument("key", metavar="KEY", help="the entity's key")


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"not JSON ({exc}); a string is written in quotes: '\"{text}\"'"
        ) from None


# ---------------------------------------------------------------------- commands


def _run_shell(args: argparse.Namespace) -> int:
    from ._shell import run

    types: list[type[Entity]] = []
    for app in args.apps:
        types.extend(cls for cls in entity_types(load_app(app)) if cls not in types)
    return run(_url(args), world_name=args.world, types=types, apps=args.apps)


def _run_activate(args: argparse.Namespace) -> int:
    async def run(world: World, cls: type[Entity]) -> None:
        state = await world.activate((cls, args.key), args.message)
        print(_to_json(state, "the activation committed, but its new state"))

    return _one_shot(args, run)


def _run_read(args: argparse.Namespace) -> int:
    async def run(world: World, cls: type[Entity]) -> None:
        print(_to_json(await world.read((cls, args.key)), "the state"))

    return _one_shot(args, run)


def _run_follow(args: argparse.Namespace) -> int:
    async def run(world: World, cls: type[Entity]) -> None:
        async for version, state in world.follow((cls, args.key), since=args.since, versions=True):
            print(version, _to_json(state, f"version {version}"), flush=True)

    return _one_shot(args, run)


def _run_list(args: argparse.Namespace) -> int:
    async def run(world: World, cls: type[Entity]) -> None:
        async for key in world.list(cls, prefix=args.prefix):
            print(key)

    return _one_shot(args, run)


def _run_history_export(args: argparse.Namespace) -> int:
    types = entity_types(load_app(args.app))
    cls = find_type(types, args.type, args.app)
    out = sys.stdout if args.output is None else _open(args.output, write=True)

    async def run(world: World) -> int:
        count = await _history.export(world, (cls, args.key), out)
        if out is not sys.stdout:
            print(
                f"{count} events of {args.type} {args.key!r} written to {args.output}",
                file=sys.stderr,
            )
        return 0

    try:
        return _with_world(args, types, run)
    finally:
        if out is not sys.stdout:
            out.close()


def _run_history_replay(args: argparse.Namespace) -> int:
    types = entity_types(load_app(args.app))
    file = sys.stdin if args.file == "-" else _open(args.file, write=False)
    try:
        lines = iter(file)
        first = next(lines, "")
        name = args.type if args.type is not None else _history.read_header(first).type
        cls = find_type(types, name, args.app)
        result = _history.replay(cls, itertools.chain([first], lines))  # type: ignore[arg-type]
    finally:
        if file is not sys.stdin:
            file.close()
    return _verdict(result)


def _run_history_check(args: argparse.Namespace) -> int:
    types = entity_types(load_app(args.app))
    cls = find_type(types, args.type, args.app)

    async def run(world: World) -> int:
        return _verdict(await _history.check(world, (cls, args.key)))

    return _with_world(args, types, run)


def _open(path: str, *, write: bool) -> TextIO:
    """Open a history file (UTF-8); an OS error is a usage error."""
    try:
        if write:
            return open(path, "w", encoding="utf-8", newline="\n")
        return open(path, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"FILE {path!r}: {exc.strerror or exc}") from None


def _verdict(result: _history.Replay) -> int:
    """Print a replay's reason: ``ok: ...`` (status 0) or ``diverged: ...`` (status 1)."""
    print(f"{'ok' if result.ok else 'diverged'}: {result.reason}")
    return 0 if result.ok else 1


def _with_world(
    args: argparse.Namespace,
    types: list[type[Entity]],
    run: Callable[[World], Awaitable[int]],
) -> int:
    """Open the world of ``--db`` with ``types``, ``return await run(world)``, close it."""

    async def main() -> int:
        async with World(backends.open(_url(args)), entities=types, name=args.world) as world:
            return await run(world)

    return asyncio.run(main())


def _one_shot(
    args: argparse.Namespace, run: Callable[[World, type[Entity]], Awaitable[None]]
) -> int:
    """Load APP, find TYPE, open the world, ``await run(world, TYPE)``, close the world."""
    types = entity_types(load_app(args.app))
    cls = find_type(types, args.type, args.app)

    async def main() -> None:
        async with World(backends.open(_url(args)), entities=types, name=args.world) as world:
            await run(world, cls)

    asyncio.run(main())
    return 0


def _url(args: argparse.Namespace) -> str:
    url: str | None = args.db or os.environ.get(URL_VARIABLE)
    return url or DEFAULT_URL


def _to_json(value: object, what: str) -> str:
    try:
        return msgspec.json.encode(value).decode()
    except (TypeError, ValueError, OverflowError) as exc:
        raise SerializationError(f"{what} cannot be printed as JSON: {exc}") from exc


# ---------------------------------------------------------------------- apps and types


def load_app(app: str) -> ModuleType:
    """Import APP: a file path (it ends with ``.py`` or has a ``/``) or a module name.

    The current folder is put on ``sys.path`` first, as ``python -m`` does.
    A file is imported under its dotted path from the current folder when it has one
    (``examples/counter.py`` is the module ``examples.counter``), else under its file name, so
    the default stored type names (``module.qualname``) are the same either way.

    Raises:
        UsageError: the file or module does not exist, or its name is taken.
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    if app.endswith(".py") or "/" in app or (os.altsep is not None and os.altsep in app):
        return _load_file(app)
    try:
        return importlib.import_module(app)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (app == exc.name or app.startswith(exc.name + ".")):
            raise  # the app itself imports something missing: the traceback says what
        raise UsageError(
            f"APP {app!r}: no module named {exc.name!r} in {cwd} or on sys.path "
            "(a file path such as path/to/app.py works too)"
        ) from None


def _load_file(app: str) -> ModuleType:
    path = os.path.abspath(app)
    if not os.path.isfile(path):
        raise UsageError(f"APP {app!r}: no such file")
    name = _module_name(path)
    existing = sys.modules.get(name)
    if existing is not None:
        if os.path.abspath(getattr(existing, "__file__", None) or "") == path:
            return existing
        raise UsageError(f"APP {app!r} would be the module {name!r}, which is another module")
    if name in sys.stdlib_module_names:
        raise UsageError(f"APP {app!r} would hide the standard module {name!r}; rename the file")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"APP {app!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses, pickle and typing look classes up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _module_name(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    try:
        relative = os.path.relpath(os.path.splitext(path)[0], os.getcwd())
    except ValueError:  # another drive
        return stem
    parts = relative.split(os.sep)
    if all(part.isidentifier() for part in parts):
        return ".".join(parts)
    return stem


def entity_types(module: ModuleType) -> list[type[Entity]]:
    """Return the entity types defined in ``module`` (bases without ``activate`` are left out)."""
    return [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, Entity)
        and obj.__module__ == module.__name__
        and obj.activate is not Entity.activate
    ]


def find_type(types: Sequence[type[Entity]], name: str, app: str) -> type[Entity]:
    """Return the type whose stored name, else whose class name, is ``name``.

    Raises:
        UnknownEntityType: none of ``types`` has that name, or two have that class name.
    """
    for cls in types:
        if cls.name == name:
            return cls
    matches = [cls for cls in types if cls.__name__ == name]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(f"{cls.__name__} (stored as {cls.name!r})" for cls in types) or "none"
    if matches:
        raise UnknownEntityType(f"{name!r} is ambiguous in {app}; use a stored name: {known}")
    raise UnknownEntityType(f"no entity type {name!r} in {app}; its entity types: {known}")
