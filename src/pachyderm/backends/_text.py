"""Text bounds shared by the SQL backends: keys that a database cannot bind, and prefix ranges.

Keys, type names and ids are Unicode without lone surrogates once checked, but the backends
also answer reads of any ``str``: one holding a lone surrogate cannot be encoded for the
database, and was never stored.
"""

from __future__ import annotations

__all__ = ["is_unicode", "key_range", "successor", "valid_floor"]


def is_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def valid_floor(after: str) -> tuple[str, bool]:
    """``(low, strict)`` such that the valid keys > ``after`` are those > or >= ``low``.

    ``after`` may hold a lone surrogate (which SQLite cannot bind); no stored key holds one, so
    the keys above ``after`` are those at or above its part before the surrogate + U+E000.
    """
    for i, char in enumerate(after):
        if "\ud800" <= char <= "\udfff":
            return after[:i] + "\ue000", False
    return after, True


def successor(prefix: str) -> str | None:
    """The least string above every string starting with ``prefix`` (None: there is none)."""
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            nxt = last + 1
            if 0xD800 <= nxt <= 0xDFFF:
                nxt = 0xE000
            return prefix[:-1] + chr(nxt)
        prefix = prefix[:-1]
    return None


def key_range(prefix: str, after: str | None) -> tuple[str, bool, str | None]:
    """The keys of a listing as ``(low, strict, high)``: above (``strict``) or from ``low``, below
    ``high`` (``None``: no bound).

    Keys start with ``prefix`` exactly when ``prefix <= key < successor(prefix)``, in code point
    order (SQLite's binary collation and PostgreSQL's ``"C"`` order UTF-8 that way).
    """
    if after is not None and after >= prefix:
        low, strict = valid_floor(after)
    else:
        low, strict = prefix, False
    return low, strict, successor(prefix)
