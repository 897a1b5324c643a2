"""The connection lifecycle every vault client shares: one keep-alive connection per client.

A client holds at most one open connection, serialised by a lock (one request at a time).
It is opened on first use and kept open between requests; it is closed when a request fails
or the server says it will close it, and reopened once, transparently, when a request on a
connection that had already served one fails in a way that means "closed while idle" (a
server restart, a load balancer's or a firewall's idle timeout). The transport (HTTP for
transit, TLS + TTLV for KMIP) and the mapping of failures to ``VaultError`` are the
clients'.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Generic, Protocol, Self, TypeVar

from encfs.vault import VaultURL

__all__ = ["Closable", "KeepAlive", "KeepAliveClient", "KeyWrapperClient"]


class Closable(Protocol):
    def close(self) -> None: ...


_C = TypeVar("_C", bound=Closable)
_T = TypeVar("_T")


class KeepAlive(Generic[_C]):
    """One keep-alive connection of type ``_C``; thread-safe.

    ``stale`` are the exceptions that, raised on a connection that had served a request
    before, mean it was closed while idle: that request is sent once more on a new one.
    """

    def __init__(self, stale: tuple[type[BaseException], ...]) -> None:
        self._stale = stale
        self._lock = threading.Lock()
        self._conn: _C | None = None
        self._used = False  # the current connection has completed a request

    def run(self, connect: Callable[[], _C], step: Callable[[_C], tuple[_T, bool]]) -> _T:
        """Run ``step`` on the connection with the lock held, ``connect()`` making one when
        there is none; ``step`` returns (its result, whether to keep the connection open).
        Any exception closes the connection; a ``stale`` one on a reused connection runs
        ``step`` once more on a fresh one; every other (and a second) is re-raised as it is,
        for the client to map."""
        with self._lock:
            while True:
                reused = self._conn is not None and self._used
                try:
                    if self._conn is None:
                        self._conn = connect()
                        self._used = False
                    result, keep = step(self._conn)
                except BaseException as exc:  # e.g. KeyboardInterrupt mid-request: never reuse
                    self._drop()
                    if reused and isinstance(exc, self._stale):
                        continue  # the idle connection was closed: once more on a fresh one
                    raise
                self._used = True
                if not keep:
                    self._drop()
                return result

    def close(self) -> None:
        """Close the connection; idempotent. A later ``run`` opens a new one."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self._used = False
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()


class KeepAliveClient:
    """Base of the vault clients: ``close()`` and the context manager, over the client's
    connection ``_link`` (a ``KeepAlive``, or something that owns one)."""

    _link: Closable

    def close(self) -> None:
        """Close the keep-alive connection; idempotent. A later call opens a new one."""
        self._link.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KeyWrapperClient(KeepAliveClient):
    """Base of the key-wrapping clients (transit, KMIP): the vault URL they serve, and
    their connection."""

    _url: VaultURL

    @property
    def url(self) -> VaultURL:
        """The vault URL this client wraps with (its key is named in it)."""
        return self._url
