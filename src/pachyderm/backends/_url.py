"""``backends.open(url)``: a backend from a URL."""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlencode, urlsplit, urlunsplit

from .._errors import InvalidOptions
from ._base import Backend
from ._memory import Memory
from ._postgres import Postgres
from ._sqlite import SQLite

__all__ = ["open"]


def open(url: str) -> Backend:
    """Return the backend a URL names.

    ``memory://``; ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``, with the
    optional ``synchronous=NORMAL`` and ``writer=thread`` (``?synchronous=NORMAL&writer=thread``);
    ``postgresql://user:password@host:port/database`` (or ``postgres://``), with an optional
    ``?schema=name``; its other options go to asyncpg.

    Raises:
        InvalidOptions: the URL's scheme or options are not known.
    """
    if not isinstance(url, str):
        raise InvalidOptions(f"a backend URL is a str; got {type(url).__qualname__}")
    parts = urlsplit(url)
    options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if parts.scheme == "memory":
        if options:
            raise InvalidOptions(f"memory:// takes no options; got {sorted(options)}")
        return Memory()
    if parts.scheme == "sqlite":
        path = unquote(parts.path)
        if parts.netloc:
            raise InvalidOptions("write sqlite:///relative.db or sqlite:////absolute.db")
        path = path[1:] if path.startswith("/") else path
        if not path:
            raise InvalidOptions("sqlite:// needs a path: sqlite:///app.db")
        synchronous = options.pop("synchronous", "FULL")
        writer = options.pop("writer", "process")
        if options:
            raise InvalidOptions(f"unknown sqlite:// options: {sorted(options)}")
        return SQLite(path, synchronous=synchronous, writer=writer)
    if parts.scheme in ("postgresql", "postgres"):
        schema = options.pop("schema", "pachyderm")
        query = urlencode(options)
        return Postgres(
            urlunsplit((parts.scheme, parts.netloc, parts.path, query, "")), schema=schema
        )
    raise InvalidOptions(f"unknown backend URL scheme {parts.scheme!r} in {url!r}")
