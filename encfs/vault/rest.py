"""The HTTP wire to a Vault / OpenBao server, for the transit client and the admin client.

Standard library only (``http.client``, ``ssl``), one keep-alive connection per client
(``encfs.vault.connection``), no proxies, no redirects. What it does for the secrets that
cross it:

- the token is sent, never shown: each request is built once, in a buffer of its final size
  that holds the ``X-Vault-Token`` header and is zeroed as soon as it is sent (``http.client``
  would leave immutable ``bytes`` copies of the header line behind);
- the answer is read straight from the socket (``_UnbufferedResponse``: no 8 KiB buffered
  reader that would keep the base64 volume key of an unwrap) into a ``bytearray`` the
  caller zeroes; over TLS, OpenSSL zeroes each decrypted record once read
  (``SSL_OP_CLEANSE_PLAINTEXT``);
- on ``/v1/auth/token/`` paths (whose answers repeat the token) the token is blanked in the
  answer before anything makes a ``str`` of it.

Transport failures become ``VaultError`` types: refused / reset / timeout / DNS
``VaultUnreachable``; certificate verification, handshake, https to a plain port
``VaultTLSError``; a malformed or oversized answer ``VaultProtocolError``. So do the answers
by which a node says it *cannot serve* rather than answering (Vault's HA protocol, seen on
OpenBao 2.7.2 Raft clusters): 503 sealed ``VaultSealed``; a redirect (a standby that has no
active node to forward to, or does not forward: never followed, the token would go to an
address the host did not pin), 429 / 472 / 473 (standby, rate limit), any other 5xx
("local node not active but active cluster node not found" during an election)
``VaultUnreachable``. Each of these moves a request on to the vault's next address
(``encfs.vault.connection``). What any other HTTP status means (a refusal: 403, 400, 404)
is the caller's to say, and it is never failed over.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from encfs import errors
from encfs.keys import LockedSecret
from encfs.vault import Endpoint
from encfs.vault.connection import KeepAlive

__all__ = ["MAX_BODY", "VaultHTTP", "tls_context", "zero"]

MAX_BODY = 1 << 20  # a vault answer is a few hundred bytes; refuse anything absurd
_MAX_DETAIL = 300  # characters of the vault's own error text kept in a message
_SSL_OP_CLEANSE_PLAINTEXT = 1 << 1  # OpenSSL >= 3.0 (ssl.h); the ssl module has no name for it

# Exceptions that mean "the idle keep-alive connection was closed under us": retry once.
_STALE_CONNECTION = (
    ConnectionResetError,  # includes http.client.RemoteDisconnected
    ConnectionAbortedError,
    BrokenPipeError,
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
)


def tls_context(
    ca_file: Path | None,
    *,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    what: str = "",
) -> ssl.SSLContext:
    """A client TLS context (TLS 1.2 or newer, host name checked) trusting ``ca_file`` (default:
    the system CAs), with the client certificate for mutual TLS if given. ``what`` ends the
    error messages (e.g. `` for vault URL``). Raises ``VaultTLSError`` for an unreadable CA
    file, ``VaultCredentialsError`` for an unreadable client certificate or key."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise errors.VaultTLSError(f"cannot load CA file {ca_file}{what}: {reason}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # OpenSSL >= 3.0: zero each decrypted record once read (it holds the base64 key).
    ctx.options |= _SSL_OP_CLEANSE_PLAINTEXT
    if client_cert is not None:
        try:
            ctx.load_cert_chain(
                str(client_cert), str(client_key) if client_key is not None else None
            )
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise errors.VaultCredentialsError(
                f"cannot load client certificate {client_cert} "
                f"(key {client_key or 'in the same file'}): {reason}"
            ) from None
    return ctx


class VaultHTTP:
    """HTTP/1.1 to a vault at one or more addresses (``endpoints``: the nodes of one
    cluster, tried in order, ``encfs.vault.connection``) on a keep-alive connection;
    thread-safe. ``token`` (kept by the caller, in locked memory) is sent with every
    request when given."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        tls: ssl.SSLContext | None,
        token: LockedSecret | None,
        timeout: float,
    ) -> None:
        self._scheme = "https" if tls is not None else "http"
        self._tls = tls
        self._token = token
        self._timeout = timeout
        self._link: KeepAlive[http.client.HTTPConnection] = KeepAlive(endpoints, _STALE_CONNECTION)
        self.base_url = endpoints[0].origin(self._scheme)
        """``http(s)://HOST:PORT`` of the first address (IPv6 hosts in brackets)."""

    @property
    def serving(self) -> Endpoint:
        """The address that answered the last request (the first one before any did)."""
        return self._link.serving

    def close(self) -> None:
        """Close the keep-alive connection; idempotent."""
        self._link.close()

    def exchange(
        self, method: str, path: str, body: dict[str, Any] | None, *, any_status: bool = False
    ) -> tuple[int, bytearray]:
        """Send one request; returns (HTTP status, the body in a buffer the caller zeroes).

        An answer by which the node says it cannot serve (module docstring) is not
        returned: the request goes to the next address, and when none is left the error
        it stands for is raised — unless ``any_status`` (``sys/health``, an operator's
        requests to one node), which returns every status but a redirect. Raises
        ``VaultUnreachable``, ``VaultSealed``, ``VaultTLSError`` or ``VaultProtocolError``
        when no usable answer came."""
        payload = json.dumps(body).encode() if body is not None else None

        def step(conn: http.client.HTTPConnection) -> tuple[tuple[int, str, bytearray], bool]:
            resp = self._send(conn, method, path, payload)
            status = resp.status
            location = resp.getheader("Location", "")
            raw = _read_body(resp)
            # lookup-self and renew-self answer with the token itself (``id``,
            # ``client_token``): blank it before json makes a str of it. Only there:
            # elsewhere a short token could match an answer's own words.
            if self._token is not None and path.startswith("/v1/auth/token/"):
                self._token.blank_in(raw)
            if not any_status and _cannot_serve(status):
                raise _CannotServe(status, location, raw)  # zeroed by _failure
            return (status, location, raw), not resp.will_close

        def failed(exc: BaseException, endpoint: Endpoint) -> errors.VaultError | None:
            return self._failure(exc, endpoint, method, path)

        status, location, raw = self._link.run(self._connection, step, failed)
        if 300 <= status < 400:
            zero(raw)
            raise errors.VaultProtocolError(
                f"vault {self._link.serving.origin(self._scheme)} ({method} {path}): "
                f"redirected (HTTP {status}) to {location or '?'}; not followed"
            )
        return status, raw

    def _failure(
        self, exc: BaseException, endpoint: Endpoint, method: str, path: str
    ) -> errors.VaultError | None:
        """The ``VaultError`` that ``exc``, raised while asking ``endpoint``, stands for;
        None for an exception that is not about the vault (re-raised as it is)."""
        origin = endpoint.origin(self._scheme)
        where = f"vault {origin} ({method} {path})"
        if isinstance(exc, _CannotServe):
            try:
                return exc.error(origin, method, path, self._token)
            finally:
                zero(exc.raw)
        if isinstance(exc, _STALE_CONNECTION):
            return errors.VaultUnreachable(f"cannot reach {where}: connection closed by the server")
        if isinstance(exc, ssl.SSLCertVerificationError):
            return errors.VaultTLSError(
                f"{where}: certificate verification failed: {exc.verify_message or exc.reason}"
            )
        if isinstance(exc, ssl.SSLError):
            return errors.VaultTLSError(f"{where}: TLS failed: {exc.reason or exc}")
        if isinstance(exc, TimeoutError):
            return errors.VaultUnreachable(
                f"cannot reach {where}: no answer within {self._timeout:g} s"
            )
        if isinstance(exc, OSError):  # refused, unreachable network, DNS (socket.gaierror)
            return errors.VaultUnreachable(f"cannot reach {where}: {exc.strerror or exc}")
        if isinstance(exc, _BodyTooLarge):
            return errors.VaultProtocolError(f"{where}: answer larger than {MAX_BODY} bytes")
        if isinstance(exc, http.client.HTTPException):  # garbage status line, short body
            return errors.VaultProtocolError(
                f"{where}: malformed HTTP answer ({type(exc).__name__})"
            )
        return None

    def _send(
        self, conn: http.client.HTTPConnection, method: str, path: str, payload: bytes | None
    ) -> http.client.HTTPResponse:
        """Write one request straight to the socket and read the answer's head.

        ``http.client`` would turn the token header into several immutable ``bytes``
        objects (the header line, the joined request), freed without being zeroed: the
        request is built here, once, in a buffer of its final size that is zeroed as soon
        as it is sent."""
        if conn.sock is None:
            conn.connect()
        sock = conn.sock
        assert sock is not None
        request = self._request_bytes(conn, method, path, payload)
        try:
            sock.sendall(request)
        finally:
            zero(request)
        resp = conn.response_class(sock, method=method)
        resp.begin()
        return resp

    def _request_bytes(
        self, conn: http.client.HTTPConnection, method: str, path: str, payload: bytes | None
    ) -> bytearray:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {_url_host(conn.host)}:{conn.port}\r\n"
            "Accept: application/json\r\nAccept-Encoding: identity\r\n"
        )
        if payload is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        elif method in ("POST", "PUT"):
            head += "Content-Length: 0\r\n"
        body = payload or b""
        if self._token is None:
            return bytearray(head.encode("ascii") + b"\r\n" + body)
        head_bytes = head.encode("ascii") + b"X-Vault-Token: "
        token = self._token.view()
        try:
            size = len(head_bytes) + len(token) + 4 + len(body)
            request = bytearray(size)  # one allocation: no copy left behind by growth
            i = len(head_bytes)
            request[:i] = head_bytes
            request[i : i + len(token)] = token
            i += len(token)
            request[i : i + 4] = b"\r\n\r\n"
            request[i + 4 :] = body
        finally:
            token.release()
        return request

    def _connection(self, endpoint: Endpoint) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        host, port = endpoint.host, endpoint.port
        if self._tls is not None:
            conn = http.client.HTTPSConnection(host, port, timeout=self._timeout, context=self._tls)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self._timeout)
        conn.response_class = _UnbufferedResponse
        return conn


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class _BodyTooLarge(Exception):
    pass


def _cannot_serve(status: int) -> bool:
    """Whether an HTTP status says the node cannot serve the request (module docstring)."""
    return 300 <= status < 400 or status in (429, 472, 473) or status >= 500


class _CannotServe(Exception):
    """A node answered that it cannot serve (``_cannot_serve``); carries the answer's body,
    which ``VaultHTTP._failure`` zeroes."""

    def __init__(self, status: int, location: str, raw: bytearray) -> None:
        super().__init__(status)
        self.status = status
        self.location = location
        self.raw = raw

    def error(
        self, origin: str, method: str, path: str, token: LockedSecret | None
    ) -> errors.VaultError:
        status = self.status
        if 300 <= status < 400:
            return errors.VaultUnreachable(
                f"vault {origin} cannot serve {method} {path}: redirected (HTTP {status}) to "
                f"{self.location or '?'}, not followed: a standby node without an active node "
                "to forward to (or with request forwarding off)",
                hint="the vault cluster has no active node, or list the active node's address "
                "too (--vault repeated, or VAULT=ADDR1 ADDR2 ...)",
            )
        detail = _detail(self.raw, token)
        what = f"vault {origin} refused {method} {path}: HTTP {status}" + (
            f" {detail}" if detail else ""
        )
        if status == 503:
            return errors.VaultSealed(what)
        return errors.VaultUnreachable(what)


def _detail(raw: bytearray, token: LockedSecret | None) -> str:
    """The vault's own error text in ``raw`` (``{"errors": [...]}``, else the raw text),
    on one line and shortened; not shown at all if it holds the token."""
    try:
        doc = json.loads(raw) if raw.strip() else None
    except ValueError:  # includes UnicodeDecodeError
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("errors"), list):
        detail = "; ".join(str(e) for e in doc["errors"])
    else:
        detail = raw[:_MAX_DETAIL].decode("utf-8", errors="replace")
    detail = " ".join(detail.split())
    if token is not None and token.within(detail.encode("utf-8", errors="replace")) >= 0:
        return "(the vault's message is not shown: it contained the token)"
    return detail[:_MAX_DETAIL]


class _UnbufferedResponse(http.client.HTTPResponse):
    """An HTTP response read straight from the socket, without the 8 KiB ``BufferedReader``
    http.client puts in between: that buffer would hold the base64 volume key of every
    unwrap until overwritten, and is freed without being zeroed. Headers are read a byte
    per call (a few hundred calls per request: fine for a call every few seconds); the body
    goes straight into our own buffer (``_read_body``), which we zero."""

    def __init__(
        self,
        sock: socket.socket,
        debuglevel: int = 0,
        method: str | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(sock, debuglevel, method, url)
        self.fp.close()  # the buffered reader made by super(); nothing was read through it
        self.fp = sock.makefile("rb", buffering=0)  # type: ignore[assignment]


def _read_body(resp: http.client.HTTPResponse) -> bytearray:
    """Read the whole body into a fresh bytearray with ``readinto`` (no ``bytes`` copy)."""
    length = resp.length  # None when chunked / unknown
    if length is not None:
        if length > MAX_BODY:
            raise _BodyTooLarge
        buf = bytearray(length)
        with memoryview(buf) as view:
            got = 0
            while got < length:
                n = resp.readinto(view[got:])
                if not n:
                    zero(buf)
                    raise http.client.IncompleteRead(b"", length - got)
                got += n
        return buf
    # Chunked: grow a buffer. Reallocation may leave earlier copies in freed memory; the
    # vault's small JSON answers come with Content-Length, so this path is the exception.
    out = bytearray()
    chunk = bytearray(16384)
    try:
        with memoryview(chunk) as view:
            while True:
                n = resp.readinto(chunk)
                if not n:
                    break
                out += view[:n]
                if len(out) > MAX_BODY:
                    zero(out)
                    raise _BodyTooLarge
    finally:
        zero(chunk)
    return out


def zero(buf: bytearray) -> None:
    """Overwrite ``buf`` with zero bytes in place."""
    buf[:] = bytes(len(buf))
