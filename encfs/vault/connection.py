"""The connection lifecycle every vault client shares: one keep-alive connection to one of
a vault's addresses, and failover among them.

A client holds at most one open connection, serialised by a lock (one request at a time).
It is opened on first use and kept open between requests; it is closed when a request fails
or the server says it will close it, and reopened once, transparently, when a request on a
connection that had already served one fails in a way that means "closed while idle" (a
server restart, a load balancer's or a firewall's idle timeout). The transport (HTTP for
transit, TLS + TTLV for KMIP) and the mapping of failures to ``VaultError`` are the
clients'.

A vault may have several addresses (``VaultURL.endpoints``: the nodes of a cluster, every
one pinned by the host and trusted alike). A request that the node it went to *cannot
serve* — the node cannot be reached, the handshake fails, or it answers that it is sealed,
a standby without an active node, overloaded (the client's mapping says which: a
``VaultError`` that is not ``revoked``) — goes to the next address, in order. The address
that served last is where the next request starts; after ``FAILBACK_AFTER`` seconds there,
the addresses before it are tried again first (the operator's order is a preference).
An *answer* is never sent elsewhere: a refusal (403, a key error) is the cluster's
answer, and a revoked host must not go looking for a node that says yes, so an error that
means revocation is raised at once, from whichever address gave it. When every address
failed, one error names each (``unavailable``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, Self, TypeVar

from encfs.errors import VaultError, VaultUnreachable
from encfs.vault import Endpoint, VaultURL

__all__ = [
    "FAILBACK_AFTER",
    "Closable",
    "KeepAlive",
    "KeepAliveClient",
    "KeyWrapperClient",
    "Link",
    "unavailable",
]

FAILBACK_AFTER = 60.0
"""Seconds a client stays on an address that is not its first before trying the first
ones again."""


class Closable(Protocol):
    def close(self) -> None: ...


class Link(Closable, Protocol):
    """A client's connection to its vault: closable, and it knows which address served."""

    @property
    def serving(self) -> Endpoint: ...


_C = TypeVar("_C", bound=Closable)
_T = TypeVar("_T")


class KeepAlive(Generic[_C]):
    """One keep-alive connection of type ``_C`` to one of ``endpoints``; thread-safe.

    ``stale`` are the exceptions that, raised on a connection that had served a request
    before, mean it was closed while idle: that request is sent once more on a new one to
    the same address.
    """

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        stale: tuple[type[BaseException], ...],
        *,
        failback_after: float = FAILBACK_AFTER,
    ) -> None:
        if not endpoints:
            raise ValueError("a vault needs at least one address")
        self._endpoints = tuple(endpoints)
        self._stale = stale
        self._failback_after = failback_after
        self._lock = threading.Lock()
        self._conn: _C | None = None
        self._conn_at = 0  # the address ``_conn`` goes to
        self._used = False  # the current connection has completed a request
        self._at = 0  # the address that served last: where the next request starts
        self._since = 0.0  # monotonic time of the last move (or failback attempt)

    @property
    def serving(self) -> Endpoint:
        """The address that served the last request (the first one before any did)."""
        return self._endpoints[self._at]

    def run(
        self,
        connect: Callable[[Endpoint], _C],
        step: Callable[[_C], tuple[_T, bool]],
        failed: Callable[[BaseException, Endpoint], VaultError | None],
    ) -> _T:
        """Run ``step`` on a connection with the lock held, ``connect(endpoint)`` making
        one when there is none; ``step`` returns (its result, whether to keep the
        connection open). Any exception closes the connection; a ``stale`` one on a reused
        connection runs ``step`` once more on a fresh one to the same address.

        Every other exception from ``connect`` or ``step`` is given to ``failed(exc,
        endpoint)``, which maps it to the ``VaultError`` it stands for (a ``VaultError``
        raised by ``connect`` or ``step`` is taken as it is), or returns None for one to
        re-raise unchanged (a bug, ``KeyboardInterrupt``). A ``revoked`` error is raised at
        once; any other moves on to the next address (module docstring). Raises the one
        address's error for a vault at one address, ``unavailable(...)`` when every one of
        several failed."""
        with self._lock:
            now = time.monotonic()
            start = self._at
            if start and now - self._since >= self._failback_after:
                start = 0  # back to the operator's order
            order = [start, *(i for i in range(len(self._endpoints)) if i != start)]
            failures: list[VaultError] = []
            for i in order:
                endpoint = self._endpoints[i]
                try:
                    result = self._run_at(i, connect, step)
                except BaseException as exc:
                    err = exc if isinstance(exc, VaultError) else failed(exc, endpoint)
                    if err is None:
                        raise
                    if err.revoked:  # the cluster's answer: never asked again elsewhere
                        if err is exc:
                            raise
                        raise err from None
                    failures.append(err)
                    continue
                if i != self._at or start != self._at:
                    self._since = now
                self._at = i
                return result
            if len(failures) == 1:
                raise failures[0] from None
            raise unavailable(failures) from None

    def _run_at(
        self, i: int, connect: Callable[[Endpoint], _C], step: Callable[[_C], tuple[_T, bool]]
    ) -> _T:
        """``step`` on a connection to address ``i`` (lock held)."""
        if self._conn is not None and self._conn_at != i:
            self._drop()
        while True:
            reused = self._conn is not None and self._used
            try:
                if self._conn is None:
                    self._conn = connect(self._endpoints[i])
                    self._conn_at = i
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


def unavailable(failures: Sequence[VaultError]) -> VaultError:
    """The one error for a request that no address of a vault could serve: of the type
    every address failed with when they agree (all sealed, all refusing the TLS
    handshake), else ``VaultUnreachable``; its message names each address's failure, in
    the order they were tried."""
    kinds = {type(err) for err in failures}
    kind: type[VaultError] = kinds.pop() if len(kinds) == 1 else VaultUnreachable
    first = failures[0]
    message = f"no address of the vault could serve the request ({len(failures)} tried): " + (
        "; then ".join(str(err) for err in failures)
    )
    return kind(message, hint=first.hint if isinstance(first, kind) else kind.hint)


class KeepAliveClient:
    """Base of the vault clients: ``close()`` and the context manager, over the client's
    connection ``_link`` (a ``KeepAlive``, or something that owns one)."""

    _link: Link

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

    @property
    def serving(self) -> str:
        """The address (``PROTO://HOST:PORT``) that answered the last request."""
        return self._link.serving.origin(self._url.scheme)
