"""The node-to-node transport: authenticated, bounded msgspec frames over asyncio streams.

A connection starts with a handshake that proves both ends know the cluster's secret, without
sending it: the server sends a random nonce; the client answers with its node id, a nonce of its
own and an HMAC-SHA256 of both nonces and its id under the secret; the server checks it (in
constant time) and answers with its own HMAC, which the client checks. Both then derive a
session key from the secret and the two nonces.

Every frame after that is ``length (4 bytes, big-endian) | mac (16 bytes) | payload``: the MAC is
keyed BLAKE2b-128 under the session key of the direction, of the frame's sequence number and
the payload, so a frame that is altered, replayed, reordered or sent from another session closes
the connection. A payload is MessagePack, decoded by msgspec into builtin values only: nothing
from the network is ever unpickled, and no type is ever looked up by name. A frame above
``max_frame`` bytes, a bad MAC or a malformed payload closes that connection (the server goes on
serving the others). Frames written in one turn of the event loop go out in one write.

Requests are pipelined: ``[id, kind, body]`` one way, ``[id, ok, body]`` the other, answered as
they finish, in any order; a connection holds at most ``max_in_flight`` requests of a client.
There is no confidentiality: run the cluster on a private network, or (later) TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec

from . import _errors
from ._errors import InvalidOptions, PachydermError, Timeout, Unavailable

__all__ = ["DEFAULT_MAX_FRAME", "ConnectionLost", "Handler", "NoAnswer", "Peer", "Server"]

log = logging.getLogger("pachyderm.transport")

#: The largest frame accepted by default (payload bytes).
DEFAULT_MAX_FRAME: Final = 4 << 20
_NONCE: Final = 32
_MAC: Final = 16
_MAGIC: Final = b"pachyderm-transport-1"
_HANDSHAKE_TIMEOUT: Final = 10.0
#: The server's goodbye: no more requests on this connection (answers still come).
_BYE: Final = [0, "bye", None]
#: ``handler(kind, body)`` answers one request; it raises a ``PachydermError`` to refuse it.
Handler = Callable[[str, Any], Awaitable[Any]]

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


class _Closed(Exception):
    """The connection must close (a bad frame, a bad MAC, the peer left)."""


class _Left(_Closed):
    """The peer closed the connection between two frames (not an error)."""


def _check_secret(secret: object) -> bytes:
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, bytes) or len(secret) < 16:
        raise InvalidOptions("a cluster secret is at least 16 bytes (a str or bytes)")
    return secret


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.digest(key, b"".join(parts), hashlib.sha256)


def _frame_mac(key: bytes, seq: int, payload: bytes) -> bytes:
    """A frame's MAC: keyed BLAKE2b (a MAC by design, and cheaper per frame than HMAC)."""
    mac = hashlib.blake2b(seq.to_bytes(8, "big"), key=key, digest_size=_MAC)
    mac.update(payload)
    return mac.digest()


class _Framing:
    """One connection's framing and MACs.

    Frames written in one turn of the event loop leave in one write (one system call for many
    pipelined requests or answers). Mutable state: the two sequence counters, ``_out``.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        max_frame: int,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.max_frame = max_frame
        self.send_key = self.receive_key = b""
        self.sent = self.received = 0
        self._out: list[bytes] = []

    async def read_raw(self) -> bytes:
        try:
            header = await self.reader.readexactly(4)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise _Left(f"the peer left: {exc!r}") from None
        try:
            size = int.from_bytes(header, "big")
            if size > self.max_frame + _MAC:
                raise _Closed(f"a frame of {size} bytes, over the limit of {self.max_frame}")
            return await self.reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise _Closed(f"the peer left: {exc!r}") from None

    def write_raw(self, data: bytes) -> None:
        self.writer.write(len(data).to_bytes(4, "big") + data)

    async def read(self) -> Any:
        frame = await self.read_raw()
        if len(frame) < _MAC:
            raise _Closed("a frame without its MAC")
        mac, payload = frame[:_MAC], frame[_MAC:]
        expected = _frame_mac(self.receive_key, self.received, payload)
        if not hmac.compare_digest(mac, expected):
            raise _Closed("a frame whose MAC does not match (altered, replayed or foreign)")
        self.received += 1
        try:
            return _decode(payload)
        except msgspec.DecodeError as exc:
            raise _Closed(f"a malformed payload: {exc}") from None

    def write(self, message: Any) -> None:
        payload = _encode(message)
        if len(payload) > self.max_frame:
            raise PayloadTooLarge(len(payload), self.max_frame)
        mac = _frame_mac(self.send_key, self.sent, payload)
        self.sent += 1
        out = self._out
        out.append((len(payload) + _MAC).to_bytes(4, "big") + mac + payload)
        if len(out) == 1:
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write the frames of this turn, in one write."""
        out = self._out
        if out:
            if not self.writer.is_closing():
                self.writer.write(b"".join(out))
            out.clear()

    def keys(self, secret: bytes, server_nonce: bytes, client_nonce: bytes, server: bool) -> None:
        base = _mac(secret, _MAGIC, b"session", server_nonce, client_nonce)
        to_client, to_server = _mac(base, b"to-client"), _mac(base, b"to-server")
        self.send_key, self.receive_key = (
            (to_client, to_server) if server else (to_server, to_client)
        )

    async def close(self) -> None:
        self.flush()
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


class ConnectionLost(Unavailable):
    """The connection closed with this request sent and unanswered: it may have run there."""


class NoAnswer(Timeout):
    """A request's answer did not come back in time: it may have run there, or may still."""


class PayloadTooLarge(_errors.TooLarge):
    """A message over the transport's frame limit (nothing was sent)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a message of {size} bytes is over the transport's limit of {limit}")


def _error_body(exc: BaseException) -> list[str]:
    """An error as an answer: the name of its nearest class of the error tree, and its text.

    An exception that is not one of ours is a failure of the peer: ``Unavailable``.
    """
    return [_errors.name_of(exc), str(exc)[:1000]]


def _error_of(body: Any) -> PachydermError:
    if isinstance(body, list) and len(body) == 2 and all(isinstance(x, str) for x in body):
        return _errors.named(body[0], body[1])  # the same text as on the node that raised it
    return Unavailable(f"the peer answered a malformed error: {body!r:.80}")


class Server:
    """Accepts authenticated connections and answers their requests with ``handler``.

    Binds to loopback unless told otherwise. ``close()`` stops listening, says goodbye on every
    connection (its client sends no more requests there, and closes it once the ones sent are
    answered), waits for that, then drops what is left. Mutable state: ``connections`` (the
    open ones), ``_framings`` (those past the handshake) and ``refused`` (connections closed
    for a bad handshake or frame), on the event loop.
    """

    def __init__(
        self,
        secret: str | bytes,
        handler: Handler,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_in_flight: int = 1024,
    ) -> None:
        self.secret = _check_secret(secret)
        self.handler = handler
        self.max_frame = max_frame
        self.max_in_flight = max_in_flight
        self.connections: set[asyncio.Task[None]] = set()
        self._framings: dict[asyncio.Task[None], _Framing] = {}
        self.refused = 0
        self._server: asyncio.base_events.Server | None = None
        self._closing = False

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen; return the address actually bound (``port=0``: a free one)."""
        self._server = await asyncio.start_server(self._accept, host, port)
        address = self._server.sockets[0].getsockname()
        return address[0], address[1]

    async def close(self, grace: float = 2.0) -> None:
        """Stop serving. A request whose answer could not be sent within ``grace`` seconds is
        dropped (its client sees ``ConnectionLost``)."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for framing in list(self._framings.values()):
            with contextlib.suppress(Exception):
                framing.write(_BYE)
                framing.flush()
        if self.connections:
            await asyncio.wait(set(self.connections), timeout=grace)
        for task in list(self.connections):
            task.cancel()
        for task in list(self.connections):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        framing = _Framing(reader, writer, self.max_frame)
        try:
            peer = await asyncio.wait_for(self._handshake(framing), _HANDSHAKE_TIMEOUT)
            self._framings[task] = framing
            if self._closing:  # accepted before close() and past the handshake after its goodbye
                framing.write(_BYE)
            await self._serve(framing, peer)
        except _Left:
            pass
        except (TimeoutError, _Closed) as exc:
            self.refused += 1
            log.warning("closed a connection from %s: %s", writer.get_extra_info("peername"), exc)
        except asyncio.CancelledError:
            pass  # the server closes: this connection ends here
        finally:
            self.connections.discard(task)
            self._framings.pop(task, None)
            await framing.close()

    async def _handshake(self, framing: _Framing) -> str:
        server_nonce = os.urandom(_NONCE)
        framing.write_raw(_MAGIC + server_nonce)
        hello = await framing.read_raw()
        if len(hello) < _NONCE + 32 + 1 or len(hello) > _NONCE + 32 + 256:
            raise _Closed("a malformed handshake")
        client_nonce, proof, node = (
            hello[:_NONCE],
            hello[_NONCE : _NONCE + 32],
            hello[_NONCE + 32 :],
        )
        expected = _mac(self.secret, _MAGIC, b"client", server_nonce, client_nonce, node)
        if not hmac.compare_digest(proof, expected):
            raise _Closed("the client does not know the cluster secret")
        framing.write_raw(_mac(self.secret, _MAGIC, b"server", client_nonce, server_nonce))
        framing.keys(self.secret, server_nonce, client_nonce, server=True)
        return node.decode(errors="replace")

    async def _serve(self, framing: _Framing, peer: str) -> None:
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                message = await framing.read()
                if not (
                    isinstance(message, list)
                    and len(message) == 3
                    and type(message[0]) is int
                    and isinstance(message[1], str)
                ):
                    raise _Closed(f"a malformed request from {peer!r}")
                id, kind, body = message
                if len(running) >= self.max_in_flight:
                    framing.write([id, False, ["Overloaded", "too many requests in flight"]])
                    continue
                task = asyncio.ensure_future(self._answer(framing, id, kind, body))
                running.add(task)
                task.add_done_callback(running.discard)
        finally:
            for task in running:
                task.cancel()

    async def _answer(self, framing: _Framing, id: int, kind: str, body: Any) -> None:
        try:
            result = await self.handler(kind, body)
            answer = [id, True, result]
            if framing.writer.is_closing():
                return
            try:
                framing.write(answer)
            except (PayloadTooLarge, TypeError) as exc:  # an answer it cannot send
                framing.write([id, False, _error_body(exc)])
        except Exception as exc:
            if framing.writer.is_closing():
                return
            framing.write([id, False, _error_body(exc)])
        with contextlib.suppress(ConnectionError):
            await framing.writer.drain()


class Peer:
    """A client connection to one node: ``await call(kind, body)``, pipelined.

    Mutable state: ``_waiting`` (request id -> future), ``_next``, ``closed``, on the event loop.
    Cancelling a ``call`` forgets its answer; the request may still run on the peer.
    """

    def __init__(self, framing: _Framing, node: str) -> None:
        self._framing = framing
        self.node = node
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        # Deadlines of the requests that have one (loop time), checked by one watchdog task:
        # cheaper than a timer per request.
        self._deadlines: dict[int, float] = {}
        self._watchdog: asyncio.Task[None] | None = None
        self._next = 0
        self.closed = False
        self._bye = False  # the server said goodbye
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        secret: str | bytes,
        node: str,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        timeout: float = _HANDSHAKE_TIMEOUT,
    ) -> Peer:
        """Connect and authenticate, both ways. Raises ``Unavailable`` if it cannot."""
        key = _check_secret(secret)
        name = node.encode()
        if not 0 < len(name) <= 256:
            raise InvalidOptions("a node id is 1 to 256 bytes of UTF-8")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (TimeoutError, OSError) as exc:
            raise Unavailable(f"cannot connect to {host}:{port}: {exc!r}") from exc
        framing = _Framing(reader, writer, max_frame)
        try:
            hello = await asyncio.wait_for(framing.read_raw(), timeout)
            if len(hello) != len(_MAGIC) + _NONCE or not hello.startswith(_MAGIC):
                raise _Closed("the peer is not a Pachyderm node")
            server_nonce = hello[len(_MAGIC) :]
            client_nonce = os.urandom(_NONCE)
            proof = _mac(key, _MAGIC, b"client", server_nonce, client_nonce, name)
            framing.write_raw(client_nonce + proof + name)
            answer = await asyncio.wait_for(framing.read_raw(), timeout)
            expected = _mac(key, _MAGIC, b"server", client_nonce, server_nonce)
            if not hmac.compare_digest(answer, expected):
                raise _Closed("the peer does not know the cluster secret")
        except (TimeoutError, _Closed) as exc:
            await framing.close()
            raise Unavailable(f"the handshake with {host}:{port} failed: {exc}") from exc
        framing.keys(key, server_nonce, client_nonce, server=False)
        return cls(framing, node)

    async def call(self, kind: str, body: Any, *, timeout: float | None = None) -> Any:
        """Send a request; return the peer's answer, or raise the error it named.

        Raises ``Unavailable`` when the connection is (or was) closed before the request was
        sent, ``ConnectionLost`` (an ``Unavailable``) when it closes with the request
        unanswered, ``NoAnswer`` (a ``Timeout``) after ``timeout`` seconds (checked every
        0.1 s), ``TooLarge`` for a request over the frame limit, or the error the peer named.
        """
        if self.closed:
            raise Unavailable(f"the connection to {self.node} is closed")
        self._next += 1
        id = self._next
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._framing.write([id, kind, body])
        self._waiting[id] = future
        if timeout is not None:
            self._deadlines[id] = loop.time() + timeout
            if self._watchdog is None:
                self._watchdog = loop.create_task(self._watch())
        try:
            with contextlib.suppress(ConnectionError):
                await self._framing.writer.drain()  # backpressure: the peer reads slower
            return await future
        finally:
            self._waiting.pop(id, None)
            self._deadlines.pop(id, None)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._deadlines:
                await asyncio.sleep(0.1)
                now = loop.time()
                for id, deadline in list(self._deadlines.items()):
                    if deadline <= now:
                        del self._deadlines[id]
                        future = self._waiting.get(id)
                        if future is not None and not future.done():
                            future.set_exception(NoAnswer(f"no answer from {self.node} in time"))
        finally:
            self._watchdog = None

    async def _read(self) -> None:
        error: BaseException = ConnectionLost(f"the connection to {self.node} closed")
        try:
            while True:
                message = await self._framing.read()
                if not (isinstance(message, list) and len(message) == 3):
                    raise _Closed("a malformed answer")
                id, ok, body = message
                if id == 0 and ok == "bye":  # the server closes: send nothing more here
                    self.closed = self._bye = True
                else:
                    future = self._waiting.get(id)
                    if future is not None and not future.done():
                        if ok:
                            future.set_result(body)
                        else:
                            future.set_exception(_error_of(body))
                if self._bye and all(f.done() for f in self._waiting.values()):
                    return  # every request sent here is answered: close our side
        except _Closed as exc:
            error = ConnectionLost(f"the connection to {self.node} closed: {exc}")
        finally:
            self.closed = True
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(error)
            await self._framing.close()

    async def retire(self) -> None:
        """Send nothing more here; close once every request already sent has its answer (or
        its ``NoAnswer`` at its deadline). A request sent may have run on the peer, so cutting
        it off would make its caller's outcome unknown. Cancellation closes at once."""
        self.closed = True
        try:
            waiting = [f for f in self._waiting.values() if not f.done()]
            if waiting:
                await asyncio.wait(waiting)
        finally:
            await self.close()

    async def close(self) -> None:
        """Close now: a request still unanswered fails with ``ConnectionLost``."""
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader
