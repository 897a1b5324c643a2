"""A mount's presence on this host: mountinfo, fusermount, /run/encfs files, the status socket.

Everything here is about a mount as the rest of the host sees it, not about its keys: is a
path mounted and by what (``/proc/self/mountinfo``), detaching a mount (``fusermount3``),
the runtime file that names the daemon serving a mount point, and the root-only unix socket
where that daemon answers ``encfs status`` (``StatusServer``). Imports no FUSE binding: the
CLI uses it for ``unmount`` and ``status`` without loading libfuse.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from encfs import hostfiles
from encfs.errors import MountError

log = logging.getLogger(__name__)

RUN_DIR = Path("/run/encfs")

READ_AHEAD_KB = 1024
"""Readahead for the mount (the kernel starts a FUSE mount at 128 KiB, whatever
``max_readahead`` says): sequential reads then arrive as 1 MiB requests (``max_pages``)."""


def runtime_file(mountpoint: Path) -> Path:
    """Where the daemon serving ``mountpoint`` records its pid (root-owned, /run/encfs)."""
    digest = hashlib.sha256(str(mountpoint.resolve()).encode()).hexdigest()[:16]
    return RUN_DIR / f"{digest}.json"


def status_socket(mountpoint: Path) -> Path:
    """The unix socket where the daemon serving ``mountpoint`` answers ``encfs status``."""
    return runtime_file(mountpoint).with_suffix(".sock")


def iso_utc(wall: float | None) -> str | None:
    """A wall-clock time as ``encfs status`` shows it (ISO 8601, UTC), None as None."""
    if wall is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


def is_mountpoint(path: Path) -> bool:
    """Whether ``path`` is a mount point, from /proc/self/mountinfo: ``os.path.ismount``
    stats the path, which a suspended encfs mount refuses (EACCES) — it would say no."""
    try:
        return mount_fstype(path) is not None
    except OSError:
        return os.path.ismount(path)


def mount_fstype(path: Path) -> str | None:
    """The filesystem type mounted at ``path`` (``fuse.encfs``, ...), None if none is.
    Raises ``OSError`` if /proc/self/mountinfo cannot be read."""
    target = os.fsencode(os.path.abspath(path))
    fstype: str | None = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            if len(fields) > 4 and _unescape_mount_path(fields[4]) == target:
                sep = fields.index(b"-") if b"-" in fields else -1
                fstype = fields[sep + 1].decode(errors="replace") if sep > 0 else "?"
    return fstype  # the last one: mounts stack


def _unescape_mount_path(raw: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040 ...)."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), raw)


def fusermount(*args: str) -> subprocess.CompletedProcess[str]:
    """Run libfuse's ``fusermount3`` (or ``fusermount``) with ``args``; output captured."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
    return subprocess.run([tool, *args], capture_output=True, text=True, check=False)


def detach(mountpoint: Path) -> None:
    """Detach the mount at ``mountpoint`` lazily (open files must not keep it); its FUSE
    loop then ends. A failure is logged, not raised."""
    proc = fusermount("-u", "-z", str(mountpoint))
    if proc.returncode != 0:
        log.error("cannot unmount %s: %s", mountpoint, proc.stderr.strip())


def check_mountpoint(mountpoint: Path, *, nonempty: bool) -> None:
    """Raise ``MountError`` unless ``mountpoint`` can take a new mount: an existing
    directory, not mounted on (a dead encfs mount is detached first), empty unless
    ``nonempty``, and /dev/fuse present."""
    mp = mountpoint
    if is_mountpoint(mp) and not _detach_dead_mount(mp):
        raise MountError(f"{mp} is already a mount point; unmount it first")
    if not mp.is_dir():
        raise MountError(f"mount point {mp} does not exist or is not a directory")
    if not nonempty and (entries := len(os.listdir(mp))):
        raise MountError(
            f"mount point {mp} is not empty ({entries} entries): the mount would hide them",
            hint="mount on an empty directory, or pass -o nonempty to hide them anyway",
        )
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: load the fuse module (modprobe fuse)")


def _detach_dead_mount(mp: Path) -> bool:
    """After a crash (kill -9) the kernel keeps the dead encfs mount ("transport endpoint
    is not connected"): detach it so that a restart (systemd's Restart=) can mount again.
    Only an encfs mount whose daemon is gone; returns whether it was detached."""
    try:
        if mount_fstype(mp) != "fuse.encfs":
            return False
        os.statvfs(mp)  # always a request (a stat may come from the attribute cache)
        return False  # it answers: a live mount, not ours to take
    except PermissionError:
        return False  # suspended, but alive
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            return False
    log.warning("%s: a crashed encfs daemon left its mount behind; detaching it", mp)
    fusermount("-u", "-z", str(mp))
    return not is_mountpoint(mp)


def raise_readahead(st_dev: int) -> None:
    """Set the readahead of the mount on device ``st_dev`` in sysfs to ``READ_AHEAD_KB``
    (root only; a failure only costs speed and is logged at debug level)."""
    knob = Path(f"/sys/class/bdi/{os.major(st_dev)}:{os.minor(st_dev)}/read_ahead_kb")
    try:
        if int(knob.read_text()) < READ_AHEAD_KB:
            knob.write_text(f"{READ_AHEAD_KB}\n")
    except (OSError, ValueError) as exc:
        log.debug("readahead stays at the kernel's default: %s", exc)


def write_runtime_file(mountpoint: Path, cipher_dir: Path, started: float) -> None:
    """Record this process as the daemon serving ``mountpoint`` (atomically, mode 0600);
    a failure is logged, not raised."""
    try:
        RUN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        record = {
            "pid": os.getpid(),
            "mountpoint": str(mountpoint.resolve()),
            "cipher_dir": str(cipher_dir.resolve()),
            "started": started,
        }
        hostfiles.write_file_atomic(runtime_file(mountpoint), json.dumps(record).encode())
    except OSError as exc:
        log.warning("cannot write runtime file in %s: %s", RUN_DIR, exc)


def mountpoint_of(cipher_dir: Path) -> Path | None:
    """The mount point of the daemon serving ``cipher_dir`` on this host (from the runtime
    files in ``RUN_DIR``), None if none records it."""
    want = str(cipher_dir.resolve())
    for path in sorted(RUN_DIR.glob("*.json")) if RUN_DIR.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("cipher_dir") == want:
            return Path(str(record.get("mountpoint")))
    return None


def remove_runtime_file(mountpoint: Path) -> None:
    """Remove the runtime file of ``mountpoint``, if any (errors ignored)."""
    with contextlib.suppress(OSError):
        runtime_file(mountpoint).unlink(missing_ok=True)


class StatusServer:
    """Answers each connection on a root-only unix socket with one JSON object: the status,
    or what a command the client names answers.

    The client may send one line of JSON, ``{"command": NAME}``, and shut its side down;
    ``status`` (also what a client that sends nothing gets) answers ``snapshot()``, any
    other of ``commands`` its own answer. The socket is root's (0700 directory, 0600
    socket): a command is as privileged as the daemon."""

    def __init__(
        self,
        path: Path,
        snapshot: Callable[[], dict[str, Any]],
        commands: Mapping[str, Callable[[], dict[str, Any]]] | None = None,
    ) -> None:
        self._path = path
        self._snapshot = snapshot
        self._commands = dict(commands or {})
        self._stop = threading.Event()
        self._serving: tuple[socket.socket, threading.Thread] | None = None

    def start(self) -> None:
        """Bind the socket and serve it from a thread; without a socket (logged), none."""
        try:
            RUN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._path.unlink(missing_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o077)
            try:
                sock.bind(str(self._path))
            finally:
                os.umask(old)
            sock.listen(8)
            sock.settimeout(0.5)
        except OSError as exc:
            log.warning("no status socket at %s: %s", self._path, exc.strerror or exc)
            return
        thread = threading.Thread(
            target=self._serve, args=(sock,), name="encfs-status", daemon=True
        )
        self._serving = (sock, thread)
        thread.start()

    def stop(self) -> None:
        """Stop serving and remove the socket (nothing to do if ``start`` bound none)."""
        self._stop.set()
        serving, self._serving = self._serving, None
        if serving is None:
            return
        sock, thread = serving
        thread.join(timeout=5)
        sock.close()
        with contextlib.suppress(OSError):
            self._path.unlink()

    def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        name = request.get("command", "status")
        if name == "status":
            return self._snapshot()
        command = self._commands.get(str(name))
        if command is None:
            return {"error": f"unknown command {name!r}"}
        return command()

    def _serve(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(2)
                    answer = self._answer(_read_request(conn))
                    payload = json.dumps(answer, default=str).encode() + b"\n"
                    conn.sendall(payload)
                except Exception as exc:  # a status reader must never hurt the mount
                    log.debug("status request failed: %s", exc)


_REQUEST_MAX = 4096


def _read_request(conn: socket.socket) -> dict[str, Any]:
    """The client's request line, parsed; ``{}`` when it sent none (it only reads)."""
    raw = b""
    try:
        while b"\n" not in raw and len(raw) < _REQUEST_MAX:
            chunk = conn.recv(_REQUEST_MAX)
            if not chunk:
                break
            raw += chunk
    except TimeoutError:
        return {}
    try:
        request = json.loads(raw.split(b"\n", 1)[0] or b"{}")
    except ValueError:
        return {}
    return request if isinstance(request, dict) else {}


def ask(sock_path: Path, command: str = "status", timeout: float = 5.0) -> dict[str, Any]:
    """Ask the daemon listening on ``sock_path`` (``status_socket``; ``StatusServer``).
    Raises ``OSError`` (no daemon answers) or ``ValueError`` (not JSON)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(sock_path))
        sock.sendall(json.dumps({"command": command}).encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    answer = json.loads(raw)
    if not isinstance(answer, dict):
        raise ValueError("the daemon's answer is not a JSON object")
    return answer
