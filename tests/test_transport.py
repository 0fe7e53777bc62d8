"""The node-to-node transport: the handshake, pipelining, bounds, and what it refuses."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import pachyderm
from pachyderm._transport import ConnectionLost, NoAnswer, Peer, Server

SECRET = "a cluster secret of 32 bytes...."


async def handler(kind: str, body: Any) -> Any:
    if kind == "echo":
        return body
    if kind == "sleep":  # answered after `body` seconds: later requests may finish first
        await asyncio.sleep(body)
        return body
    if kind == "reject":
        raise pachyderm.Rejected("no, on purpose")
    if kind == "big":
        return b"x" * body
    raise ValueError("a bug of the handler")


async def _server(**options: Any) -> tuple[Server, int]:
    server = Server(SECRET, handler, **options)
    host, port = await server.start()
    assert host == "127.0.0.1"  # loopback unless told otherwise
    return server, port


async def test_calls_are_pipelined_and_answered_in_any_order() -> None:
    server, port = await _server()
    peer = await Peer.connect("127.0.0.1", port, SECRET, "n1")
    try:
        assert await peer.call("echo", {"a": [1, 2.5, "three", b"4", None, True]}) == {
            "a": [1, 2.5, "three", b"4", None, True]
        }
        finished: list[float] = []

        async def one(seconds: float) -> None:
            finished.append(await peer.call("sleep", seconds))

        await asyncio.gather(*(one(s) for s in (0.2, 0.1, 0.0)))
        assert finished == [0.0, 0.1, 0.2]  # all in flight at once on one connection
        results = await asyncio.gather(*(peer.call("echo", i) for i in range(500)))
        assert results == list(range(500))
    finally:
        await peer.close()
        await server.close()


async def test_errors_come_back_named() -> None:
    server, port = await _server()
    peer = await Peer.connect("127.0.0.1", port, SECRET, "n1")
    try:
        with pytest.raises(pachyderm.Rejected, match="on purpose"):
            await peer.call("reject", None)
        with pytest.raises(pachyderm.Unavailable, match="a bug of the handler"):
            await peer.call("boom", None)
        with pytest.raises(pachyderm.Timeout):
            await peer.call("sleep", 5, timeout=0.05)
        assert await peer.call("echo", "still serving") == "still serving"
    finally:
        await peer.close()
        await server.close()


async def test_a_wrong_secret_is_refused_both_ways() -> None:
    server, port = await _server()
    try:
        with pytest.raises(pachyderm.Unavailable, match="handshake"):
            await Peer.connect("127.0.0.1", port, "another secret, 32 bytes long..", "intruder")
        assert server.refused == 1
        # A server with another secret refuses the client; one that pretends (answers anything
        # to the client's proof) is refused by the client: authentication is mutual.
        other = Server("another secret, 32 bytes long..", handler)
        _, other_port = await other.start()
        with pytest.raises(pachyderm.Unavailable, match="handshake"):
            await Peer.connect("127.0.0.1", other_port, SECRET, "n1")
        await other.close()

        async def pretender(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            hello = b"pachyderm-transport-1" + b"\x00" * 32
            writer.write(len(hello).to_bytes(4, "big") + hello)
            await reader.readexactly(4 + 32 + 32 + 2)  # the client's nonce, proof and id
            writer.write((32).to_bytes(4, "big") + b"\x01" * 32)  # a proof it cannot make
            await writer.drain()
            await reader.read()
            writer.close()

        fake = await asyncio.start_server(pretender, "127.0.0.1", 0)
        fake_port = fake.sockets[0].getsockname()[1]
        with pytest.raises(pachyderm.Unavailable, match="does not know the cluster secret"):
            await Peer.connect("127.0.0.1", fake_port, SECRET, "n1")
        fake.close()
        peer = await Peer.connect("127.0.0.1", port, SECRET, "n1")
        assert await peer.call("echo", 1) == 1  # the node keeps serving
        await peer.close()
    finally:
        await server.close()
    with pytest.raises(pachyderm.InvalidOptions):
        Server("short", handler)


async def _raw(port: int, data: bytes) -> bytes:
    """Send raw bytes to the server; return what it sent until it closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    got = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return got


async def test_malformed_oversized_and_tampered_frames_close_the_connection() -> None:
    server, port = await _server(max_frame=1024)
    try:
        await _raw(port, b"\x00\x00\x00\x05hello")  # not a handshake
        await _raw(port, (10**6).to_bytes(4, "big"))  # an oversized frame: not even read
        assert server.refused == 2
        peer = await Peer.connect("127.0.0.1", port, SECRET, "n1")
        # A frame whose bytes were changed on the way: its MAC fails, the connection closes.
        framing = peer._framing
        framing.write_raw(b"\x00" * 16 + b"\x93\x01\xa4echo\x01")
        with pytest.raises(pachyderm.Unavailable, match="closed"):
            await peer.call("echo", 2, timeout=5)
        assert server.refused == 3
        # A request over the frame limit is refused before it is sent; an answer over it too.
        fresh = await Peer.connect("127.0.0.1", port, SECRET, "n2", max_frame=1024)
        with pytest.raises(pachyderm.TooLarge):
            await fresh.call("echo", b"x" * 2000)
        with pytest.raises(pachyderm.TooLarge):
            await fresh.call("big", 5000)
        assert await fresh.call("echo", "fine") == "fine"  # and the node keeps serving
        await fresh.close()
        await peer.close()
    finally:
        await server.close()


async def test_a_closed_server_fails_its_callers_at_once() -> None:
    server, port = await _server()
    peer = await Peer.connect("127.0.0.1", port, SECRET, "n1")
    pending = asyncio.create_task(peer.call("sleep", 30))
    await asyncio.sleep(0.05)
    await server.close()
    with pytest.raises(pachyderm.Unavailable):
        await asyncio.wait_for(pending, 10)
    with pytest.raises(pachyderm.Unavailable):
        await peer.call("echo", 1)
    await peer.close()
    with pytest.raises(pachyderm.Unavailable, match="cannot connect"):
        await Peer.connect("127.0.0.1", port, SECRET, "n1", timeout=2)


@pytest.mark.parametrize("side", ["the server closes", "the client retires"])
async def test_a_closing_connection_answers_what_was_sent_and_takes_nothing_new(side: str) -> None:
    server, port = await _server()
    peer = await Peer.connect("127.0.0.1", port, SECRET, "n1")
    try:
        slow = asyncio.ensure_future(peer.call("sleep", 0.3))
        await asyncio.sleep(0.05)  # the request is running on the server
        if side == "the server closes":
            closing = asyncio.ensure_future(server.close(grace=30.0))
        else:
            closing = asyncio.ensure_future(peer.retire())
        assert await slow == 0.3  # answered, not cut off
        with pytest.raises(pachyderm.Unavailable) as refused:
            await peer.call("echo", 1)  # after the goodbye or the retirement: not sent at all
        assert not isinstance(refused.value, ConnectionLost)
        await asyncio.wait_for(closing, 10)  # the client closed its side: no need to wait more
        assert peer.closed
        await asyncio.wait_for(server.close(grace=30.0), 10)
    finally:
        await peer.close()
        await server.close()


async def test_requests_cut_off_by_a_lost_connection_say_so() -> None:
    server, port = await _server()
    peer = await Peer.connect("127.0.0.1", port, SECRET, "n1")
    try:
        slow = asyncio.ensure_future(peer.call("sleep", 5.0))
        await asyncio.sleep(0.05)
        await server.close(grace=0.1)  # it could not answer in time
        with pytest.raises(ConnectionLost):
            await slow
    finally:
        await peer.close()
        await server.close()


async def test_a_request_without_an_answer_in_time_gets_no_answer() -> None:
    server, port = await _server()
    peer = await Peer.connect("127.0.0.1", port, SECRET, "n1")
    try:
        with pytest.raises(NoAnswer):  # a Timeout: it may still run there
            await peer.call("sleep", 1.0, timeout=0.2)
        assert await peer.call("echo", 2) == 2  # the connection is still good
    finally:
        await peer.close()
        await server.close()


async def test_a_connection_past_its_handshake_during_close_gets_the_goodbye() -> None:
    server, port = await _server()
    connecting = asyncio.ensure_future(Peer.connect("127.0.0.1", port, SECRET, "n1"))
    while not server.connections:  # accepted, its handshake not done yet
        await asyncio.sleep(0)
    closing = asyncio.ensure_future(server.close(grace=30.0))
    peer = await connecting
    try:
        # It is told goodbye, so it closes its side and the server need not wait out its grace.
        await asyncio.wait_for(closing, 10)
        assert peer.closed
    finally:
        await peer.close()
        await server.close()
