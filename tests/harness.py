"""Test harness for real volumes: init, mount and unmount through the real ``encfs`` CLI."""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


def encfs(
    *args: str | Path, env: dict[str, str] | None = None, check: bool = False, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m encfs ARGS``; returns the completed process (text output)."""
    env = dict(os.environ if env is None else env)
    env.setdefault("ENCFS_AUDIT_LOG", "none")  # tests never write the machine's audit log
    if "ENCFS_PIN_DIR" in os.environ:  # nor its volume pins (conftest's host_pins)
        env.setdefault("ENCFS_PIN_DIR", os.environ["ENCFS_PIN_DIR"])
    proc = subprocess.run(
        [sys.executable, "-m", "encfs", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"encfs {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}"
        )
    return proc


def mount_foreground(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``python -m encfs mount --foreground ARGS`` and return at once (stderr piped,
    text): for tests that watch the daemon's exit code, signals or notify messages."""
    return subprocess.Popen(
        [sys.executable, "-m", "encfs", "mount", "--foreground", *map(str, args)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )


def is_mounted(path: Path) -> bool:
    """From /proc/self/mountinfo (``os.path.ismount`` cannot stat a suspended mount)."""
    from encfs.mounts import is_mountpoint

    return is_mountpoint(path)


def force_unmount(path: Path) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)


@dataclass
class Volume:
    """A volume created with ``encfs init`` and mounted with ``encfs mount``.

    ``env`` carries the vault token (VAULT_TOKEN); ``options`` are ``-o`` mount options.
    """

    cipher_dir: Path
    mountpoint: Path
    vault_url: str
    env: dict[str, str]
    options: list[str] = field(default_factory=list)
    log_file: Path | None = None
    block_size: int = 4096
    audit_log: Path | None = None
    vault2_url: str = ""
    """A double-encrypted volume's second vault key (KEK 2); "" for a single-layer one."""
    vault2_token_file: Path | None = None
    """The host's token for the second vault (``--vault2-token-file``)."""

    @property
    def double(self) -> bool:
        return bool(self.vault2_url)

    def vault2_args(self) -> list[str | Path]:
        """``--vault2 URL --vault2-token-file F`` for a double volume, else nothing."""
        if not self.double:
            return []
        assert self.vault2_token_file is not None
        return ["--vault2", self.vault2_url, "--vault2-token-file", self.vault2_token_file]

    @property
    def geometry(self) -> Any:
        """The volume's ``format.Geometry`` (block size, and the overhead of its layers)."""
        from encfs import format as fmt

        return fmt.Geometry.of(self.block_size, fmt.FEATURE_DOUBLE if self.double else 0)

    def audit_args(self) -> list[str]:
        """``--audit-log`` into the test's tmp dir (never the machine's /var/log)."""
        return ["--audit-log", str(self.audit_log) if self.audit_log else "none"]

    def audit_events(self) -> list[dict[str, object]]:
        import json

        if self.audit_log is None or not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines()]

    def init(self) -> None:
        encfs(
            "init",
            self.cipher_dir,
            "--vault",
            self.vault_url,
            *(["--double"] if self.double else []),
            *self.vault2_args(),
            "--block-size",
            str(self.block_size),
            *self.audit_args(),
            env=self.env,
            check=True,
        )

    def mount(self, *extra: str) -> subprocess.CompletedProcess[str]:
        """``encfs mount`` (what it printed is returned: its stderr has the daemon's
        messages up to the moment the mount was live)."""
        args: list[str | Path] = [
            "mount",
            self.cipher_dir,
            self.mountpoint,
            "--vault",
            self.vault_url,
            *self.vault2_args(),
        ]
        if self.options:
            args += ["-o", ",".join(self.options)]
        if self.log_file is not None:
            args += ["--log-file", self.log_file]
        proc = encfs(*args, *self.audit_args(), *extra, env=self.env, check=True)
        assert is_mounted(self.mountpoint)
        return proc

    def unmount(self) -> None:
        proc = encfs("unmount", self.mountpoint, env=self.env)
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(self.mountpoint)

    def remount(self) -> None:
        self.unmount()
        self.mount()

    def status(self) -> dict[str, Any]:
        """``encfs status --json`` of this mount."""
        import json

        proc = encfs("status", self.mountpoint, "--json", env=self.env)
        assert proc.returncode == 0, proc.stderr
        out: dict[str, Any] = json.loads(proc.stdout)
        return out

    def daemon_pid(self) -> int:
        """PID of the daemon serving this mount (from its runtime file)."""
        import json

        from encfs.mounts import runtime_file

        data = json.loads(runtime_file(self.mountpoint).read_text())
        return int(data["pid"])

    def backing_files(self) -> list[Path]:
        return [p for p in self.cipher_dir.rglob("*")]

    def raw_bytes(self) -> bytes:
        """Every byte the cipher dir holds: names, symlink targets, contents, xattrs."""
        chunks: list[bytes] = []
        for p in self.cipher_dir.rglob("*"):
            chunks.append(p.name.encode())
            if p.is_symlink():
                chunks.append(os.readlink(p).encode())
            elif p.is_file():
                chunks.append(p.read_bytes())
            try:
                for name in os.listxattr(p, follow_symlinks=False):
                    chunks.append(name.encode())
                    chunks.append(os.getxattr(p, name, follow_symlinks=False))
            except OSError:
                pass
        return b"\0".join(chunks)


class DirectFile:
    """A file of a mount opened with O_DIRECT: every ``pread``/``pwrite`` is one FUSE
    request, the page cache out of the way (buffers are page-aligned mmaps)."""

    def __init__(self, path: Path, flags: int = os.O_RDWR) -> None:
        self.fd = os.open(path, flags | os.O_DIRECT)

    def pread(self, size: int, offset: int) -> bytes:
        import mmap

        with mmap.mmap(-1, max(size, 1)) as buf:
            n = os.preadv(self.fd, [memoryview(buf)[:size]], offset)
            return buf[:n]

    def pwrite(self, data: bytes, offset: int) -> int:
        import mmap

        with mmap.mmap(-1, max(len(data), 1)) as buf:
            buf[: len(data)] = data
            return os.pwritev(self.fd, [memoryview(buf)[: len(data)]], offset)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MakeVolume(Protocol):
    """The ``make_volume`` fixture (conftest): a fresh volume, initialised and by default
    mounted; torn down with the test."""

    def __call__(
        self,
        options: list[str] | None = None,
        block_size: int = 4096,
        mount: bool = True,
        name: str = "",
        double: bool = False,
    ) -> Volume: ...


def wait_until(cond: object, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return True
        time.sleep(interval)
    return False


def scan_memory(pid: int, needles: dict[str, bytes]) -> dict[str, int]:
    """Occurrences of each needle in the readable memory of process ``pid`` (every mapping,
    read through /proc/PID/mem); only needles found at least once are returned."""
    found = dict.fromkeys(needles, 0)
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue
            for name, needle in needles.items():
                found[name] += chunk.count(needle)
    return {k: v for k, v in found.items() if v}


def count_in_memory(pid: int, needle: bytes) -> int:
    """How often ``needle`` occurs in the readable memory of process ``pid``."""
    return scan_memory(pid, {"n": needle}).get("n", 0)


def kill_process_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the process group led by ``proc``, wait up to ``timeout`` for the leader,
    then SIGKILL whatever is left of the group (servers' children can outlive their
    leader) and reap the leader. Safe on a group that is already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class Hung(AssertionError):
    """An operation through the mount did not return within its deadline."""


def as_user(
    fn: Callable[[], Any],
    uid: int = 65534,
    timeout: float = 60.0,
    on_hang: Callable[[], None] | None = None,
) -> Any:
    """Run ``fn()`` in a forked child as ``uid`` (and gid ``uid``, no supplementary groups,
    umask 022) — or as root with ``uid`` 0. Returns what it returns; raises OSError with the
    child's errno if it raised one, ``Hung`` if it did not finish within ``timeout`` (after
    calling ``on_hang``, which may free what the child waits for, and killing it)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 1
        try:
            os.close(r)
            if uid != 0:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            os.umask(0o022)
            out: tuple[str, Any]
            try:
                out = ("ok", fn())
            except OSError as exc:
                out = ("oserror", (exc.errno, str(exc)))
            except BaseException as exc:
                out = ("error", repr(exc))
            with os.fdopen(w, "wb") as f:
                pickle.dump(out, f)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], timeout)
        if not ready:
            if on_hang is not None:
                on_hang()
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise Hung(f"{getattr(fn, '__name__', fn)} did not return within {timeout} s")
        with os.fdopen(r, "rb", closefd=False) as f:
            data = f.read()
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, f"the child running as {uid} died"
    kind, value = pickle.loads(data)
    if kind == "oserror":
        raise OSError(*value)
    if kind == "error":
        raise AssertionError(f"as uid {uid}: {value}")
    return value
