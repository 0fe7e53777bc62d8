"""``pachyderm shell``: an asyncio REPL with a world started, where top-level ``await`` works.

The event loop runs on the main thread and owns the world; the console reads lines on a second
thread and runs each statement on the loop (as ``python -m asyncio`` does), so user code and the
world never touch each other from two threads.

Entity types are shown by their class name (``(Counter, 'my_counter')``, not
``(<class 'app.Counter'>, 'my_counter')``) by the shell's display hook and by ``flush()``,
through ``show()``: the classes themselves are left alone, so ``repr(Counter)`` is unchanged
everywhere else.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import code
import concurrent.futures
import inspect
import signal
import sys
import threading
import types
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from os.path import abspath
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import pachyderm

from . import backends
from ._entity import Entity
from ._follower import Follower
from ._world import World

__all__ = ["run", "show"]

#: The most follow messages the inbox keeps; older ones are dropped (and counted) beyond it.
INBOX_SIZE: Final = 10_000
# Loop iterations run before each statement. A follow push happens before the `activate` that
# committed it returns, and a woken consumer empties its follower in one step, so one or two
# iterations suffice; the rest is slack for backends that answer through chained futures.
_DRAIN_ITERATIONS: Final = 8

Ref = tuple[type[Entity], Any]


def show(value: object) -> str:
    """Return ``repr(value)``, with every entity type in it written by its class name.

    Tuples, lists, dicts, sets and frozensets are looked into; other objects keep their ``repr``.
    """
    text = repr(value)
    if "<class '" not in text:  # the common case: nothing to rewrite, at C speed
        return text
    return _show(value, set())


def _show(value: object, seen: set[int]) -> str:
    if isinstance(value, type) and issubclass(value, Entity):
        return value.__name__
    kind = type(value)
    if kind not in (tuple, list, dict, set, frozenset):
        return repr(value)
    if id(value) in seen:
        return "[...]" if kind is list else "{...}" if kind is dict else "..."
    seen.add(id(value))
    try:
        if isinstance(value, dict):
            return (
                "{"
                + ", ".join(f"{_show(k, seen)}: {_show(v, seen)}" for k, v in value.items())
                + "}"
            )
        assert isinstance(value, tuple | list | set | frozenset)
        items = ", ".join(_show(item, seen) for item in value)
        if isinstance(value, tuple):
            return f"({items},)" if len(value) == 1 else f"({items})"
        if isinstance(value, list):
            return f"[{items}]"
        body = f"{{{items}}}" if value else ""
        return f"frozenset({body})" if isinstance(value, frozenset) else body or "set()"
    finally:
        seen.discard(id(value))


@dataclass(frozen=True, slots=True)
class _Note:
    """A line for ``flush()`` that is not a state, e.g. a follow that stopped."""

    text: str


@dataclass(frozen=True, slots=True)
class _Outcome:
    """How a statement ended, handed from the loop thread to the console thread."""

    error: BaseException | None = None
    exit: SystemExit | None = None
    interrupted: bool = False


class Shell:
    """The world, the inbox and the helpers bound in the shell's namespace.

    Mutable state, all touched on the loop thread except where said: ``inbox`` and ``dropped``
    (appended by follow consumers, emptied by ``flush``), ``_consumers`` (follow tasks),
    ``_statement`` and ``_phase`` (the statement running now; also read by the SIGINT handler,
    which runs on the main thread, that is the loop's thread, between two bytecodes).
    """

    def __init__(
        self, url: str, *, world_name: str, types: Sequence[type[Entity]], apps: Sequence[str]
    ) -> None:
        self.url = url
        self.world_name = world_name
        self.types = list(types)
        self.apps = list(apps)
        self.inbox: deque[tuple[Ref, Any] | _Note] = deque(maxlen=INBOX_SIZE)
        self.dropped = 0
        self._consumers: dict[asyncio.Task[None], Ref] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._world: World | None = None
        self._statement: asyncio.Task[_Outcome] | None = None
        self._cancelled = False  # Ctrl-C asked to cancel `_statement`
        # "start" | "prompt" | "sync" (user code running without await) | "async" | "stop"
        self._phase = "start"
        #: The argument of ``exit()``, if the user called it.
        self.exit_code: object = None

    # ------------------------------------------------------------------ lifecycle

    async def serve(self) -> None:
        """Start the world, run the console until it ends, then close the world.

        When this returns, every activation acknowledged in the shell is durable.
        """
        loop = self._loop = asyncio.get_running_loop()
        async with World(
            backends.open(self.url), entities=self.types, name=self.world_name
        ) as world:
            self._world = world
            namespace = self._namespace(world)
            console = _Console(namespace, self)
            banner = self._banner(namespace)
            done: asyncio.Future[None] = loop.create_future()

            def finished() -> None:
                if not done.done():
                    done.set_result(None)

            def read_lines() -> None:
                try:
                    console.serve(banner)
                finally:
                    loop.call_soon_threadsafe(finished)

            self._phase = "prompt"
            threading.Thread(target=read_lines, name="pachyderm-shell", daemon=True).start()
            try:
                await done
            finally:
                self._phase = "stop"
                await self._stop_following()

    def on_sigint(self, signum: int, frame: types.FrameType | None) -> None:
        """Handle Ctrl-C: cancel the running statement, or interrupt code that does not await.

        At the prompt it does nothing (Ctrl-D or ``exit()`` leave). A second Ctrl-C while a
        cancelled statement still runs, or one while the world starts or closes, raises
        ``KeyboardInterrupt`` wherever the main thread is.
        """
        if self._phase == "prompt":
            return
        statement = self._statement
        if self._phase == "async" and statement is not None and not self._cancelled:
            self._cancelled = True
            assert self._loop is not None
            # Not `statement.cancel()` here: this handler may run in the middle of the loop.
            self._loop.call_soon_threadsafe(statement.cancel)
            return
        raise KeyboardInterrupt

    async def _stop_following(self) -> None:
        tasks = list(self._consumers)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ statements

    async def run_statement(self, func: Callable[[], object]) -> _Outcome:
        """Run one compiled statement on the loop; return how it ended (never raise)."""
        for _ in range(_DRAIN_ITERATIONS):  # let follow consumers take what already committed
            await asyncio.sleep(0)
        self._statement = asyncio.current_task()
        self._cancelled = False
        try:
            self._phase = "sync"
            try:
                result = func()
            finally:
                self._phase = "async"
            if inspect.iscoroutine(result):
                await result
        except SystemExit as exc:
            return _Outcome(exit=exc)
        except KeyboardInterrupt as exc:
            return _Outcome(error=_user_traceback(exc), interrupted=True)
        except asyncio.CancelledError as exc:
            return _Outcome(error=_user_traceback(exc), interrupted=self._cancelled)
        except BaseException as exc:  # the user's error, shown as a traceback
            return _Outcome(error=_user_traceback(exc))
        finally:
            self._statement = None
            self._phase = "prompt"
        return _Outcome()

    # ------------------------------------------------------------------ helpers in the namespace

    async def follow(self, ref: Ref) -> Any:
        """Follow ``ref``: return its current state; collect each later state for ``flush()``.

        Each state committed after the current one is put in the inbox as ``(ref, state)``,
        in version order, until the shell exits or ``unfollow(ref)`` is called.
        Cancelled (Ctrl-C) before it returns, nothing is followed.
        """
        assert self._world is not None
        follower = self._world.follow(ref)
        try:
            state = await anext(follower)
        except BaseException:
            await follower.aclose()
            raise
        task = asyncio.get_running_loop().create_task(self._collect(ref, follower))
        self._consumers[task] = ref
        task.add_done_callback(self._consumers.pop)
        return state

    async def _collect(self, ref: Ref, follower: Follower) -> None:
        try:
            async for state in follower:
                self._put((ref, state))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._put(_Note(f"# follow({show(ref)}) stopped: {type(exc).__name__}: {exc}"))
        finally:
            await follower.aclose()

    def _put(self, item: tuple[Ref, Any] | _Note) -> None:
        if len(self.inbox) == self.inbox.maxlen:
            self.dropped += 1
        self.inbox.append(item)

    def unfollow(self, ref: Ref) -> int:
        """Stop every follow of ``ref`` started with ``follow(ref)``; return how many stopped."""
        tasks = [task for task, followed in self._consumers.items() if followed == ref]
        for task in tasks:
            task.cancel()
        return len(tasks)

    def flush(self) -> None:
        """Print every collected follow message, ``(ref, state)``, one per line; empty the inbox.

        Before each statement the shell lets the follow consumers run, so every state committed
        by an ``activate`` that already returned is here.
        """
        if self.dropped:
            print(f"# {self.dropped} older messages were dropped (the inbox keeps {INBOX_SIZE})")
            self.dropped = 0
        while self.inbox:
            item = self.inbox.popleft()
            print(item.text if isinstance(item, _Note) else show(item))

    async def list_keys(self, entity_type: type[Entity], *, prefix: str = "") -> list[str]:
        """Return the keys of the stored entities of ``entity_type`` (starting with ``prefix``)."""
        assert self._world is not None
        return [key async for key in self._world.list(entity_type, prefix=prefix)]

    def _namespace(self, world: World) -> dict[str, object]:
        namespace: dict[str, object] = {
            "__name__": "__console__",
            "__doc__": None,
            "__builtins__": builtins,
            "asyncio": asyncio,
            "pachyderm": pachyderm,
            "world": world,
            "activate": world.activate,
            "read": world.read,
            "follow": self.follow,
            "unfollow": self.unfollow,
            "flush": self.flush,
            "list_keys": self.list_keys,
        }
        for cls in self.types:
            namespace.setdefault(cls.__name__, cls)  # a name already taken is not rebound
        return namespace

    def _banner(self, namespace: dict[str, object]) -> str:
        loaded = ", ".join(
            f"{cls.__name__} (stored as {cls.name!r})"
            + ("" if namespace[cls.__name__] is cls else " [not bound: the name is taken]")
            for cls in self.types
        )
        source = f" from {', '.join(self.apps)}" if self.apps else ""
        example = self.types[0].__name__ if self.types else "Counter"
        return (
            f"Pachyderm {pachyderm.__version__} shell, Python {sys.version.split()[0]}\n"
            f"World {self.world_name!r} on {describe_url(self.url)}\n"
            f"Entity types{source}: {loaded or 'none'}\n"
            f'Use await at the top level: await activate(({example}, "key"), message), '
            f"await read(ref),\nawait follow(ref) then flush(), await list_keys({example}); "
            f"also world, unfollow(ref), pachyderm.\n"
            f"Ctrl-C cancels the running statement; Ctrl-D or exit() closes the world and exits."
        )


def _user_traceback(exc: BaseException) -> BaseException:
    # Drop the shell's own frame (run_statement): the traceback starts in the user's code.
    if exc.__traceback__ is not None:
        exc.__traceback__ = exc.__traceback__.tb_next
    return exc


class _Console(code.InteractiveConsole):
    """A console whose statements run on the shell's event loop (top-level ``await`` allowed)."""

    def __init__(self, namespace: dict[str, object], shell: Shell) -> None:
        super().__init__(namespace)
        self.compile.compiler.flags |= ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        self.shell = shell
        self.namespace = namespace

    def serve(self, banner: str) -> None:
        """Read and run statements until end of input or ``exit()`` (on this, non-loop, thread)."""
        if sys.stdin.isatty():
            _enable_line_editing(self.namespace)
        try:
            self.interact(banner=banner, exitmsg="")
        except SystemExit as exc:  # exit(): leave as at the end of input, with its status
            self.shell.exit_code = exc.code

    def runcode(self, code: types.CodeType) -> None:
        func = types.FunctionType(code, self.locals)
        assert self.shell._loop is not None
        try:
            future: concurrent.futures.Future[_Outcome] = asyncio.run_coroutine_threadsafe(
                self.shell.run_statement(func), self.shell._loop
            )
        except RuntimeError:  # the loop is closed: the shell was stopped from the main thread
            raise SystemExit(1) from None
        outcome = future.result()
        if outcome.exit is not None:
            raise outcome.exit
        if outcome.interrupted:
            self.write("\nKeyboardInterrupt\n")
        elif outcome.error is not None:
            try:
                raise outcome.error
            except BaseException:
                self.showtraceback()


def _enable_line_editing(namespace: dict[str, object]) -> None:
    try:
        import readline
        import rlcompleter
    except ImportError:  # no readline on this platform: plain input still works
        return
    readline.set_completer(rlcompleter.Completer(namespace).complete)
    readline.parse_and_bind("tab: complete")


def describe_url(url: str) -> str:
    """Return where a backend URL keeps the data, for people (no password is shown)."""
    parts = urlsplit(url)
    if parts.scheme == "memory":
        return "memory (nothing is kept after exit)"
    if parts.scheme == "sqlite":
        path = unquote(parts.path)
        return f"the SQLite file {abspath(path[1:] if path.startswith('/') else path)}"
    if parts.password:
        url = url.replace(f":{parts.password}@", ":***@", 1)
    return url


def _display(value: object) -> None:
    # sys.displayhook of the shell: the default one, with `show` instead of `repr`.
    if value is None:
        return
    builtins._ = None  # type: ignore[attr-defined]
    sys.stdout.write(show(value) + "\n")
    builtins._ = value  # type: ignore[attr-defined]


def run(
    url: str, *, world_name: str, types: Sequence[type[Entity]], apps: Sequence[str] = ()
) -> int:
    """Run the shell on the backend ``url`` with ``types`` registered, until Ctrl-D or ``exit()``.

    Ctrl-C cancels the running statement (a cancelled ``activate`` that had not started is
    withdrawn; one running or committing may still commit); at the prompt it does nothing.
    On exit the world is closed: every acknowledged activation is durable.

    Returns:
        The exit status: 0, or what ``exit(status)`` was given (1 for a message, printed).

    Raises:
        PachydermError: the world cannot start (for example ``StorageLocked``).
    """
    shell = Shell(url, world_name=world_name, types=types, apps=apps)
    main_thread = threading.current_thread() is threading.main_thread()
    # Our handler replaces asyncio.run's, which would cancel the whole shell on Ctrl-C.
    previous = signal.signal(signal.SIGINT, shell.on_sigint) if main_thread else None
    previous_hook = sys.displayhook
    sys.displayhook = _display
    try:
        asyncio.run(shell.serve())
    finally:
        sys.displayhook = previous_hook
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    code = shell.exit_code
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1
