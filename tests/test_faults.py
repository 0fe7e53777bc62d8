"""Storage faults: lost writes rerun, failed commits change nothing, doubtful ones emit nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

import pachyderm
from pachyderm import backends
from pachyderm.backends import Stored, Write

from .test_events import Account
from .test_world import ALL, Counter, Log


class Faulty(backends.Memory):
    """A memory backend that fails the next commits on demand, or lets a rival write first."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_next: list[BaseException] = []
        self.rival: list[Write] = []
        self.loads: list[tuple[str, str]] = []

    async def commit(self, writes: Sequence[Write]) -> list[bool]:
        if self.rival:
            await super().commit([self.rival.pop()])
        if self.fail_next:
            exc = self.fail_next.pop(0)
            if isinstance(exc, pachyderm.Indeterminate):
                await super().commit(writes)  # it did commit, but nobody can know
            raise exc
        return await super().commit(writes)

    async def load_many(self, refs: Sequence[tuple[str, str]]) -> list[Stored | None]:
        self.loads.extend(refs)
        return await super().load_many(refs)


async def test_a_lost_write_reruns_on_the_reloaded_state() -> None:
    backend = Faulty()
    codec_int = b"\x0a"  # msgpack for 10
    async with pachyderm.World(backend, entities=ALL) as w:
        ref = (Counter, "c")
        assert await w.activate(ref, 1) == 1
        # Another writer (another node, say) committed version 2 = 10 meanwhile.
        backend.rival.append(Write(Counter.name, "c", 1, 2, 1, codec_int))
        assert await w.activate(ref, 1) == 11
        assert await w.read(ref) == 11
        assert w.statistics()["conflicts"] == 1


async def test_a_follower_sees_the_rival_version_and_no_fork() -> None:
    backend = Faulty()
    async with pachyderm.World(backend, entities=ALL) as w:
        ref = (Counter, "f")
        follower = w.follow(ref, versions=True)
        assert await follower.__anext__() == (0, 0)
        backend.rival.append(Write(Counter.name, "f", 0, 1, 1, b"\x05"))
        assert await w.activate(ref, 1) == 6
        assert await follower.__anext__() == (1, 5)
        assert await follower.__anext__() == (2, 6)
        await follower.aclose()


async def test_unavailable_commit_fails_calls_and_keeps_state() -> None:
    backend = Faulty()
    async with pachyderm.World(backend, entities=ALL) as w:
        ref = (Log, "u")
        assert await w.activate(ref, "a") == ["a"]
        follower = w.follow(ref, versions=True)
        assert await follower.__anext__() == (1, ["a"])
        backend.fail_next.append(pachyderm.Unavailable("disk full"))
        with pytest.raises(pachyderm.Unavailable):
            await w.activate(ref, "lost")
        assert await w.read(ref) == ["a"]
        assert await w.activate(ref, "b") == ["a", "b"]
        assert await follower.__anext__() == (2, ["a", "b"])  # "lost" was never pushed
        await follower.aclose()


async def test_indeterminate_commit_emits_nothing_and_reloads() -> None:
    backend = Faulty()
    async with pachyderm.World(backend, entities=ALL) as w:
        ref = (Counter, "i")
        assert await w.activate(ref, 1, idempotency_key="k1") == 1
        follower = w.follow(ref, versions=True)
        assert await follower.__anext__() == (1, 1)
        backend.fail_next.append(pachyderm.Indeterminate("connection lost during COMMIT"))
        with pytest.raises(pachyderm.Indeterminate):
            await w.activate(ref, 1, idempotency_key="k2")
        loads_before = len(backend.loads)
        # Retrying with the same key learns that it did commit, and runs nothing again.
        assert await w.activate(ref, 1, idempotency_key="k2") == 2
        assert await w.activate(ref, 1) == 3
        assert len(backend.loads) > loads_before  # the doubtful cache was dropped and reloaded
        assert await follower.__anext__() == (2, 2)  # told only after it was re-read
        assert await follower.__anext__() == (3, 3)
        await follower.aclose()


async def test_a_backend_bug_is_indeterminate_and_does_not_kill_the_world() -> None:
    backend = Faulty()
    async with pachyderm.World(backend, entities=ALL) as w:
        backend.fail_next.append(RuntimeError("driver bug"))
        with pytest.raises(pachyderm.Indeterminate):  # nobody knows whether it committed
            await w.activate((Counter, "b"), 1)
        assert await w.activate((Counter, "b"), 1) == 1


async def test_load_failure_fails_waiting_calls_then_recovers() -> None:
    class FailingLoad(backends.Memory):
        fail = True

        async def load_many(self, refs: Sequence[tuple[str, str]]) -> list[Stored | None]:
            if self.fail:
                self.fail = False
                raise pachyderm.Unavailable("cannot read")
            return await super().load_many(refs)

    async with pachyderm.World(FailingLoad(), entities=ALL) as w:
        results: list[Any] = await asyncio.gather(
            w.activate((Counter, "x"), 1), w.activate((Counter, "x"), 1), return_exceptions=True
        )
        assert all(isinstance(r, pachyderm.Unavailable) for r in results)
        assert await w.activate((Counter, "x"), 1) == 1


async def test_idempotent_retry_racing_the_first_commit_runs_once() -> None:
    """The retry's receipt look-up overlaps the first call's commit: still one run."""

    class SlowReceipts(backends.Memory):
        async def receipt(self, type_name: str, key: str, id: str) -> Any:
            found = await super().receipt(type_name, key, id)  # read before the commit lands
            await asyncio.sleep(0.02)
            return found

    async with pachyderm.World(SlowReceipts(), entities=ALL) as w:
        ref = (Counter, "race")
        first = asyncio.ensure_future(w.activate(ref, 1, idempotency_key="once"))
        await asyncio.sleep(0.005)  # the first is committed and answered while the retry looks
        second = asyncio.ensure_future(w.activate(ref, 1, idempotency_key="once"))
        assert await asyncio.gather(first, second) == [1, 1]
        assert await w.read(ref) == 1


async def test_a_cancelled_idempotent_call_does_not_block_its_retry() -> None:
    """A caller cancelled while its keyed call waits: a retry with the key runs it (no spin)."""
    gate = asyncio.Event()

    class Slow(pachyderm.Entity):
        name = "tests.faults.Slow"

        def init(self) -> int:
            return 0

        async def activate(self, message: Any, state: int) -> int:
            if message == "wait":
                await gate.wait()
            return state + 1

    async with pachyderm.World(backends.Memory(), entities=[Slow]) as w:
        ref = (Slow, "s")
        blocker = asyncio.create_task(w.activate(ref, "wait"))
        await asyncio.sleep(0.01)
        first = asyncio.create_task(w.activate(ref, "x", idempotency_key="k"))
        await asyncio.sleep(0.01)
        first.cancel()  # withdrawn from the mailbox: it never runs
        await asyncio.gather(first, return_exceptions=True)
        retry = asyncio.create_task(w.activate(ref, "x", idempotency_key="k"))
        await asyncio.sleep(0.01)
        gate.set()
        assert await asyncio.wait_for(blocker, 5) == 1
        assert await asyncio.wait_for(retry, 5) == 2
        assert await w.activate(ref, "x", idempotency_key="k") == 2  # from the receipt


@pytest.mark.parametrize(
    ("kind", "message", "result"),
    [(Counter, 1, 1), (Account, ("deposit", 1), {"balance": 1, "open": False})],
)
async def test_a_call_given_up_on_the_tip_of_a_failed_commit_leaves_nothing_behind(
    kind: type[pachyderm.Entity], message: Any, result: Any
) -> None:
    """A call runs on the tip of a write in flight, its caller gives up, and the write fails.

    The lost write puts the call back in the mailbox, where the runner skips it (nobody waits
    for it). The entity is then idle (it may be passivated), the world closes, and a retry with
    the call's idempotency key runs it.
    """
    gate = asyncio.Event()

    class Held(Faulty):
        async def commit(self, writes: Sequence[Write]) -> list[bool]:
            await gate.wait()
            return await super().commit(writes)

    backend = Held()
    w = pachyderm.World(backend, entities=[*ALL, Account])
    await w.start()
    try:
        for key in (None, "k"):
            gate.clear()
            ref = (kind, f"c-{key}")
            first = asyncio.ensure_future(w.activate(ref, message))
            while (resident := w._engine.residents.get((kind.name, ref[1]))) is None or (
                resident.inflight is None
            ):
                await asyncio.sleep(0)
            second = asyncio.ensure_future(w.activate(ref, message, idempotency_key=key))
            while not resident.pending:  # run on the tip, waiting for the write in flight
                await asyncio.sleep(0)
            second.cancel()
            backend.fail_next.append(pachyderm.Unavailable("disk full"))
            gate.set()
            results = await asyncio.gather(first, second, return_exceptions=True)
            assert isinstance(results[0], pachyderm.Unavailable)
            assert isinstance(results[1], asyncio.CancelledError)
            for _ in range(5):  # the runner's turn that skips the call
                await asyncio.sleep(0)
            assert resident.pending is None
            assert resident.queued == 0
            assert resident.quiescent()  # so it may be passivated
            assert resident.idempotent is None  # no entry left for the key
            if key is not None:  # a retry with the key runs it, and does not wait forever
                retry = w.activate(ref, message, idempotency_key=key)
                assert await asyncio.wait_for(retry, 5) == result
    finally:
        # `aclose` waits for every call in progress: none is left that nobody waits for.
        await asyncio.wait_for(w.aclose(), 5)
