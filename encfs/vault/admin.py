"""An administration client for a Vault / OpenBao HTTP API: requests with an admin token.

What ``encfs vault`` needs to run and provision a vault (health, init, unseal, mounts,
policies, token roles, tokens), not a key wrapper: it returns the vault's answers as
parsed JSON and leaves their meaning to the caller (``encfs.bao``). It shares the transit
client's wire (``encfs.vault.rest``: one keep-alive connection, no proxies, no redirects,
the request buffer zeroed once sent). The token is sent, never shown: a vault message that
contains it is not repeated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from encfs import errors
from encfs.keys import LockedSecret
from encfs.vault import TRANSIT_DEFAULT_PORT, Endpoint, is_loopback
from encfs.vault.connection import KeepAliveClient
from encfs.vault.rest import VaultHTTP, tls_context, zero

__all__ = ["AdminClient"]

_MAX_DETAIL = 300  # characters of the vault's own error text kept in a message


class AdminClient(KeepAliveClient):
    """Requests to the vault at ``addr`` (``http(s)://HOST:PORT``; plain HTTP on loopback
    only) with ``token`` (or none: health, init, unseal). Thread-safe. Raises
    ``VaultConfigError`` for a bad address, ``VaultTLSError`` for an unreadable CA file."""

    def __init__(
        self,
        addr: str,
        token: str | None = None,
        *,
        ca_file: Path | None = None,
        timeout: float = 10.0,
    ) -> None:
        parts = urlsplit(addr)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise errors.VaultConfigError(
                f"vault address {addr!r} is not http(s)://HOST:PORT",
                hint="e.g. https://127.0.0.1:8200",
            )
        if parts.scheme == "http" and not is_loopback(parts.hostname):
            raise errors.VaultConfigError(
                f"refusing plain HTTP to non-loopback vault host {parts.hostname!r}",
                hint="use https:// (and --ca-file if the vault has its own CA)",
            )
        try:
            port = parts.port or TRANSIT_DEFAULT_PORT
        except ValueError:
            raise errors.VaultConfigError(f"vault address {addr!r} has an invalid port") from None
        tls = tls_context(ca_file) if parts.scheme == "https" else None
        self._token = LockedSecret(token.encode()) if token else None
        self._link = self._http = VaultHTTP(
            [Endpoint(parts.hostname, port)], tls=tls, token=self._token, timeout=timeout
        )
        self.addr = self._http.base_url
        """``http(s)://HOST:PORT`` (IPv6 hosts in brackets)."""

    def __repr__(self) -> str:
        return f"<AdminClient {self.addr}>"

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, Any]:
        """One request; returns (HTTP status, parsed JSON or None), whatever the status
        (a sealed or standby node's too: health, unseal). Raises ``VaultUnreachable`` /
        ``VaultTLSError`` / ``VaultProtocolError`` when no usable HTTP answer came."""
        status, raw = self._http.exchange(method, path, body, any_status=True)
        try:
            doc = json.loads(raw) if raw.strip() else None
        except ValueError:  # includes UnicodeDecodeError
            doc = None
        finally:
            zero(raw)
        return status, doc

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, what: str = ""
    ) -> Any:
        """A request that must succeed (2xx); returns the parsed answer. Non-2xx raises the
        ``VaultError`` it stands for, with the vault's own one-line reason."""
        status, doc = self.request(method, path, body)
        if 200 <= status < 300:
            return doc
        raise self.error(status, doc, method, path, what)

    def error(
        self, status: int, doc: Any, method: str, path: str, what: str = ""
    ) -> errors.VaultError:
        """The ``VaultError`` for a refused request: 403 ``VaultPermissionDenied`` (the
        admin token), 503 ``VaultSealed``, anything else ``VaultProtocolError``."""
        detail = ""
        if isinstance(doc, dict) and isinstance(doc.get("errors"), list):
            detail = "; ".join(str(e) for e in doc["errors"])
        detail = " ".join(detail.split())
        if self._token is not None and self._token.within(detail.encode()) >= 0:
            detail = "(the vault's message is not shown: it contained the token)"
        msg = f"vault {self.addr} refused {method} {path}" + (f" ({what})" if what else "")
        msg += f": HTTP {status}" + (f" {detail[:_MAX_DETAIL]}" if detail else "")
        if status == 403:
            return errors.VaultPermissionDenied(
                msg, hint="the admin token is invalid or lacks this capability"
            )
        if status == 503:
            return errors.VaultSealed(msg)
        return errors.VaultProtocolError(msg)

    def health(self) -> int:
        """``/v1/sys/health`` status: 200 active, 429 standby, 501 not initialised,
        503 sealed, 0 no answer (yet)."""
        try:
            status, _ = self.request("GET", "/v1/sys/health")
        except errors.VaultError:
            return 0
        return status
