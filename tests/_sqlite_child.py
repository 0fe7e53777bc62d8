"""A child process for tests/test_sqlite.py: ``python _sqlite_child.py MODE PATH``.

Modes:

- ``lock``: try to open the file; print ``LOCKED <message>`` or ``OPENED``.
- ``writer``: commit forever from 20 concurrent tasks (one key each) and print ``key version``
  after each acknowledged commit (flushed at once), until killed.
- ``noclose``: commit once, leave a second commit in flight, and return without ``aclose``
  (the interpreter must still exit promptly).
"""

from __future__ import annotations

import asyncio
import sys

from pachyderm import StorageLocked
from pachyderm.backends import SQLite, Write


async def lock(path: str) -> None:
    backend = SQLite(path)
    try:
        await backend.open("default")
    except StorageLocked as e:
        print("LOCKED", e, flush=True)
        return
    print("OPENED", flush=True)
    await backend.aclose()


async def writer(path: str) -> None:
    backend = SQLite(path)
    await backend.open("default")

    async def loop(key: str) -> None:
        version = 0
        while True:
            (ok,) = await backend.commit(
                [Write("T", key, version, version + 1, 1, str(version + 1).encode())]
            )
            assert ok
            version += 1
            print(key, version, flush=True)

    await asyncio.gather(*(loop(f"k{i}") for i in range(20)))


async def noclose(path: str) -> None:
    backend = SQLite(path)
    await backend.open("default")
    await backend.commit([Write("T", "a", 0, 1, 1, b"one")])
    # Left in flight: asyncio.run cancels it and closes the loop while the writer thread may
    # still be working on it.
    in_flight = asyncio.ensure_future(backend.commit([Write("T", "b", 0, 1, 1, b"two")]))
    await asyncio.sleep(0)
    print("DONE", flush=True)
    del in_flight  # never awaited on purpose


if __name__ == "__main__":
    mode, path = sys.argv[1], sys.argv[2]
    asyncio.run({"lock": lock, "writer": writer, "noclose": noclose}[mode](path))
