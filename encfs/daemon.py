"""The life of one mount: unwrap the key, serve, watch the vault, suspend and resume, wipe.

``Daemon.run()`` blocks for the life of the mount (foreground). It reads the volume header,
unwraps the volume key (nothing is mounted if the vault refuses), mounts with libfuse 3,
reports readiness once the mount answers, and on unmount (``fusermount3 -u``, SIGTERM,
SIGINT) wipes every key before returning. Background operation is the CLI's business: it
runs this in a child process and waits for the readiness report.

While mounted, a ``KeyWatcher`` thread unwraps the volume key with the vault every
``check_interval`` seconds (a real unwrap: the authoritative answer to "may this host
still read the volume?") and renews the host token before it expires:

    active ──(refused: 403, key deleted/disabled, version retired)──▶ suspended
    active ──(unreachable, sealed)──▶ offline-grace ──(grace over)──▶ suspended
    suspended / offline-grace ──(unwrap works again)──▶ active

Suspending flushes what the kernel holds dirty, shuts the FUSE gate, wipes every key and
invalidates every inode the kernel may cache (``EncfsOperations.suspend``). Resuming
re-derives the keys from a fresh unwrap; handles opened before work again. A
``StatusServer`` answers ``encfs status`` on a root-only unix socket.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import logging
import math
import os
import re
import resource
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import setproctitle

from encfs import backing, names, pins, sdnotify, volume
from encfs import format as fmt
from encfs.audit import AuditLog, AuditSettings
from encfs.errors import EncfsError, FormatError, VaultError, VolumeRevoked
from encfs.fs import EncfsOperations, FsOptions, select_libfuse, serve
from encfs.keys import VolumeKeys, key_check_value
from encfs.vault import KeyWrapper, VaultSettings, connect, pin_vault_url, retry_unavailable

log = logging.getLogger(__name__)

RUN_DIR = Path("/run/encfs")
FUSE_MAIN_LOOP_ENDED = 8


@dataclass(frozen=True)
class MountConfig:
    """Everything one mount needs; built once by the CLI."""

    cipher_dir: Path
    mountpoint: Path
    vault: VaultSettings = field(default_factory=VaultSettings)
    vault_url: str | None = None
    """The vault the operator pinned (``--vault`` / ``VAULT=``): a full URL, or an address
    that takes the header's mount and key (``vault.pin_vault_url``)."""
    vault_addr: str | None = None
    """``VAULT_ADDR`` / ``BAO_ADDR`` of the host, used when ``vault_url`` is not given."""
    repin: bool = False
    """Accept and pin another volume than the one pinned for this cipher dir."""
    allow_other: bool = False
    default_permissions: bool = False
    read_only: bool = False
    fs: FsOptions = field(default_factory=FsOptions)
    debug: bool = False
    audit: AuditSettings = field(default_factory=AuditSettings)
    check_interval: float = 5.0
    """Seconds between the watcher's unwraps."""
    offline_grace: float = 300.0
    """Seconds to keep serving while the vault cannot be reached (0: suspend at once)."""
    on_revoke: str = "suspend"
    """``suspend`` (wait for access to come back) or ``unmount`` (unmount and exit 23)."""
    nonempty: bool = False
    """Mount even over a mount point that holds entries (they are hidden while mounted)."""
    ephemeral: bool = False
    """A crypto-erased scratch volume: a fresh random key, never stored (``vault_url``, if
    given, is only watched: revocation of the host's access erases the volume)."""


def runtime_file(mountpoint: Path) -> Path:
    """Where the daemon serving ``mountpoint`` records its pid (root-owned, /run/encfs)."""
    digest = hashlib.sha256(str(mountpoint.resolve()).encode()).hexdigest()[:16]
    return RUN_DIR / f"{digest}.json"


def is_mountpoint(path: Path) -> bool:
    """Whether ``path`` is a mount point, from /proc/self/mountinfo: ``os.path.ismount``
    stats the path, which a suspended encfs mount refuses (EACCES) — it would say no."""
    try:
        return mount_fstype(path) is not None
    except OSError:
        return os.path.ismount(path)


READ_AHEAD_KB = 1024
"""Readahead for the mount (the kernel starts a FUSE mount at 128 KiB, whatever
``max_readahead`` says): sequential reads then arrive as 1 MiB requests (``max_pages``)."""


def _raise_readahead(st_dev: int) -> None:
    """Set the mount's readahead in sysfs (root only; a failure only costs speed)."""
    knob = Path(f"/sys/class/bdi/{os.major(st_dev)}:{os.minor(st_dev)}/read_ahead_kb")
    try:
        if int(knob.read_text()) < READ_AHEAD_KB:
            knob.write_text(f"{READ_AHEAD_KB}\n")
    except (OSError, ValueError) as exc:
        log.debug("readahead stays at the kernel's default: %s", exc)


def fusermount(*args: str) -> subprocess.CompletedProcess[str]:
    """Run libfuse's ``fusermount3`` (or ``fusermount``) with ``args``; output captured."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
    return subprocess.run([tool, *args], capture_output=True, text=True, check=False)


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


def status_socket(mountpoint: Path) -> Path:
    """The unix socket where the daemon serving ``mountpoint`` answers ``encfs status``."""
    return runtime_file(mountpoint).with_suffix(".sock")


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


def _reusable_for_ephemeral(cipher_dir: Path) -> bool:
    """Whether an ephemeral mount would use (and erase) ``cipher_dir``: it is empty or holds
    an earlier ephemeral volume. Only then does its ownership and mode matter; anything
    else is refused as it is (``volume.start_ephemeral``)."""
    try:
        entries = os.listdir(cipher_dir)
    except OSError:
        return False
    return not entries or (
        fmt.EPHEMERAL_MARKER_NAME in entries
        and fmt.VOLUME_HEADER_NAME not in entries
        and fmt.VOLUME_HEADER_PREV not in entries
    )


def harden_process() -> None:
    """No core dumps: keys must never reach a disk through a crash."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        pr_set_dumpable = 4
        backing.LIBC.prctl(pr_set_dumpable, 0, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - Linux always has prctl
        log.warning("could not mark the process non-dumpable")


class MountState:
    """What the daemon is doing and why; every change is logged once, audited and shown in
    the process title. Thread-safe."""

    def __init__(self, mountpoint: Path, audit: AuditLog) -> None:
        self._lock = threading.Lock()
        self._mountpoint = mountpoint
        self._audit = audit
        self.name = "starting"
        self.reason = ""
        self.since = time.time()
        self.last_check: float | None = None
        self.last_error = ""
        self.vault_reachable: bool | None = None
        self.token: dict[str, Any] = {}
        self.token_expires: float | None = None

    def set(self, name: str, reason: str = "") -> bool:
        """Enter state ``name``; returns False (and does nothing) if already in it."""
        with self._lock:
            if name == self.name:
                self.reason = reason or self.reason
                return False
            self.name, self.reason, self.since = name, reason, time.time()
        suffix = f": {reason}" if reason else ""
        setproctitle.setproctitle(f"encfs {self._mountpoint} [{name}{suffix}]")
        sdnotify.notify(status=f"{name}{suffix}"[:400])
        return True

    def checked(self, *, reachable: bool, error: str = "") -> None:
        with self._lock:
            self.last_check = time.time()
            self.vault_reachable = reachable
            self.last_error = error

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            ttl = None
            if self.token_expires is not None:
                ttl = max(0, int(self.token_expires - time.time()))
            return {
                "state": self.name,
                "since": _iso(self.since),
                "reason": self.reason,
                "vault_reachable": self.vault_reachable,
                "last_check": _iso(self.last_check),
                "last_error": self.last_error,
                "token": {**self.token, "ttl": ttl},
            }


class Daemon:
    """Runs one mount in the foreground. Not reusable: one ``run()`` per instance."""

    def __init__(self, config: MountConfig) -> None:
        self.config = config
        self.keys: VolumeKeys | None = None
        self.ops: EncfsOperations | None = None
        self.started = time.time()
        self.revoked_unmount: str = ""
        self.volume_id = ""
        self._transition = threading.Lock()
        self._stopping = threading.Event()
        self.state: MountState | None = None
        self.header: volume.HeaderFile | None = None
        """The header as last checked: read at mount, replaced when a rotation is seen; the
        watcher unwraps its wrapped key when the file on disk is gone or unreadable."""
        self.check_value = b""
        """Check value of the volume key in use (``keys.key_check_value``)."""
        self.vault_url = ""
        """The vault this mount talks to (pinned; never the header's URL alone)."""

    def _check_mountpoint(self) -> None:
        from encfs.errors import MountError

        mp = self.config.mountpoint
        if is_mountpoint(mp) and not self._detach_dead_mount(mp):
            raise MountError(f"{mp} is already a mount point; unmount it first")
        if not mp.is_dir():
            raise MountError(f"mount point {mp} does not exist or is not a directory")
        if not self.config.nonempty and (entries := len(os.listdir(mp))):
            raise MountError(
                f"mount point {mp} is not empty ({entries} entries): the mount would hide them",
                hint="mount on an empty directory, or pass -o nonempty to hide them anyway",
            )
        if not os.path.exists("/dev/fuse"):
            raise MountError("/dev/fuse is missing: load the fuse module (modprobe fuse)")

    @staticmethod
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

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Unlock, mount and serve until unmounted. Raises ``EncfsError`` before mounting,
        and ``VolumeRevoked`` after an unmount forced by ``on_revoke="unmount"``.

        Every key is wiped before this returns.
        """
        harden_process()
        names.raise_fd_limit()  # before the operations size their directory cache by it
        select_libfuse()  # before any thread: writes the environment mfusepy reads in serve
        self._check_mountpoint()
        lock = self._lock_cipher_dir()
        try:
            self._run(on_ready)
        finally:
            os.close(lock)

    def _lock_cipher_dir(self) -> int:
        """Hold the cipher dir's lock (``backing.lock_volume``) for the daemon's life: a
        second mount of the same cipher dir fails (``VolumeBusy``) instead of interleaving
        writes. The lock goes with the process, however it dies."""
        cfg = self.config
        if cfg.ephemeral:
            volume.check_ephemeral_dir(cfg.cipher_dir)  # its refusal says more than unsafe
        volume.require_cipher_dir(cfg.cipher_dir)
        volume.check_cipher_dir_safe(cfg.cipher_dir)
        return backing.lock_volume(
            backing.open_root(str(cfg.cipher_dir)),
            f"the encfs mount at {cfg.mountpoint} (pid {os.getpid()})",
        )

    def _run(self, on_ready: Callable[[], None] | None) -> None:
        cfg = self.config
        if cfg.ephemeral:
            keys, vault, audit, renew_in = self._start_ephemeral()
            url = cfg.vault_url or ""
            block_size = fmt.DEFAULT_BLOCK_SIZE
            volume_id = audit.context.get("volume_id", "")
            kek_version = 0
            features = fmt.EPHEMERAL_FEATURES
        else:
            volume.check_cipher_dir_safe(cfg.cipher_dir)
            hf = volume.read_checked_header(cfg.cipher_dir)
            self.header = hf
            pinned = pin_vault_url(
                hf.header.vault_url, configured=cfg.vault_url, addr=cfg.vault_addr
            )
            if pinned.note:
                log.warning("%s", pinned.note)
            url = str(pinned.url)
            volume_id, kek_version = hf.header.volume_id.hex(), hf.header.kek_version
            audit = AuditLog(
                cfg.audit,
                volume_id=volume_id,
                cipher_dir=str(cfg.cipher_dir),
                mountpoint=str(cfg.mountpoint),
                vault=url,
                kek_version=kek_version,
            )
            self.state = MountState(cfg.mountpoint, audit)
            vault = connect(url, cfg.vault)
            try:
                keys, renew_in = self._unlock(hf, vault, audit)
            except BaseException:
                vault.close()
                raise
            block_size = hf.header.block_size
            features = hf.header.feature_flags
        state = self.state
        assert state is not None
        self.volume_id = volume_id
        self.vault_url = url
        self.keys = keys
        if not keys.memory_lock.mlocked:
            log.warning("key memory is not locked: %s", keys.memory_lock.detail)
        ops = self.ops = EncfsOperations(
            str(cfg.cipher_dir),
            keys,
            block_size,
            cfg.fs,
            on_init=lambda: self._announce_ready(on_ready),
            dirid_links=fmt.dirid_links(features),
        )
        options: dict[str, object] = {
            "foreground": True,
            "fsname": f"encfs:{cfg.cipher_dir.resolve()}",
            "subtype": "encfs",
        }
        if cfg.allow_other:
            options["allow_other"] = True
            if not cfg.default_permissions:
                log.warning(
                    "allow_other implies default_permissions: the kernel checks modes and "
                    "owners for every user (encfs itself does not)"
                )
        if cfg.default_permissions or cfg.allow_other:
            options["default_permissions"] = True
        if cfg.read_only:
            options["ro"] = True
        if cfg.debug:
            options["debug"] = True
        log.info(
            "mounting %s on %s (%svolume %s, KEK version %d)",
            cfg.cipher_dir,
            cfg.mountpoint,
            "ephemeral " if cfg.ephemeral else "",
            volume_id,
            kek_version,
        )
        state.set("active")
        watcher = KeyWatcher(self, vault, url, audit, renew_in)
        status = StatusServer(status_socket(cfg.mountpoint), self.status)
        health = threading.Thread(target=self._feed_watchdog, name="encfs-watchdog", daemon=True)
        try:
            watcher.start()
            status.start()
            if sdnotify.watchdog_interval() is not None:
                health.start()
            # Entries made for a caller get exactly the mode the kernel passes (already
            # masked by the caller's umask), as on a kernel filesystem; the daemon's own
            # files all have explicit modes.
            os.umask(0)
            serve(ops, str(cfg.mountpoint), **options)
        except RuntimeError as exc:
            # fuse_main answers 8 when its loop ended on SIGTERM/SIGINT/SIGHUP (libfuse's
            # own handlers unmount first): a requested stop, not a failure.
            if exc.args != (FUSE_MAIN_LOOP_ENDED,):
                audit.error("unmount", exc)
                raise
            log.info("stopped by signal")
        finally:
            sdnotify.notify(stopping=1)
            state.set("stopping")
            self._stopping.set()
            watcher.stop()
            status.stop()
            ops.aliases.stop()
            with self._transition:
                keys.close()
            self.keys = None
            if watcher.vault is not None:
                watcher.vault.close()
            self._remove_runtime_file()
            audit.event("unmount", forced_by_revocation=bool(self.revoked_unmount) or None)
            log.info("unmounted %s; keys wiped", cfg.mountpoint)
        if self.revoked_unmount:
            raise VolumeRevoked(
                f"unmounted {cfg.mountpoint} because the vault revoked access: "
                f"{self.revoked_unmount}"
            )

    def _start_ephemeral(
        self,
    ) -> tuple[VolumeKeys, KeyWrapper | None, AuditLog, float | None]:
        """A fresh ephemeral volume (``volume.start_ephemeral``); with a vault URL, first
        check that the host may still use that key (the mount then watches it)."""
        cfg = self.config
        audit = AuditLog(
            cfg.audit,
            cipher_dir=str(cfg.cipher_dir),
            mountpoint=str(cfg.mountpoint),
            vault=cfg.vault_url,
            ephemeral=True,
        )
        self.state = MountState(cfg.mountpoint, audit)
        if _reusable_for_ephemeral(cfg.cipher_dir):  # else start_ephemeral says why not
            volume.check_cipher_dir_safe(cfg.cipher_dir)
        vault: KeyWrapper | None = None
        renew_in: float | None = None
        if cfg.vault_url:
            vault = connect(cfg.vault_url, cfg.vault)
            try:
                retry_unavailable(vault.key_status, bound=cfg.vault.timeout)
            except VaultError as exc:
                vault.close()
                audit.error("mount", exc)
                raise
            renew_in = self.note_identity(vault, audit, warn=True)
        volume_id, keys = volume.start_ephemeral(cfg.cipher_dir)
        audit.bind(volume_id=volume_id.hex())
        audit.event("mount", read_only=cfg.read_only)
        return keys, vault, audit, renew_in

    def _unlock(
        self, hf: volume.HeaderFile, vault: KeyWrapper, audit: AuditLog
    ) -> tuple[VolumeKeys, float | None]:
        """Preflight, unwrap (retrying an unreachable or sealed vault within
        ``--vault-timeout``), identity. Returns the keys and when to renew the credential."""
        cfg = self.config

        def retrying(exc: VaultError, delay: float) -> None:
            log.warning("%s; retrying in %.2g s", exc, delay)

        def unwrap() -> VolumeKeys:
            vault.check_capabilities("mount")
            return volume.unlock(hf, vault)

        try:
            keys = retry_unavailable(unwrap, bound=cfg.vault.timeout, on_retry=retrying)
        except VaultError as exc:
            audit.error("unwrap", exc)
            raise
        try:
            pins.check_pin(
                cfg.cipher_dir,
                hf.header.volume_id,
                keys,
                create=True,
                repin=cfg.repin,
                vault_url=hf.header.vault_url,
                block_size=hf.header.block_size,
            )
            self.check_value = keys.check_value()
        except BaseException as exc:
            keys.close()
            if isinstance(exc, EncfsError):
                audit.error("mount", exc)
            raise
        renew_in = self.note_identity(vault, audit, warn=True)
        audit.event("unwrap")
        audit.event("mount", read_only=cfg.read_only)
        return keys, renew_in

    def note_identity(self, vault: KeyWrapper, audit: AuditLog, *, warn: bool) -> float | None:
        """Look up who we are to the vault (for audit and status); returns when to renew
        the credential, or None when it does not expire."""
        try:
            ident = vault.identity()
        except VaultError as exc:  # e.g. a policy without lookup-self: not fatal
            log.info("cannot look up the host's vault identity: %s", exc)
            ident = {}
        audit.bind(identity=ident.get("accessor") or ident.get("client_cert_subject"))
        renew_in: float | None = None
        ttl = ident.get("ttl")
        if self.state is not None:
            keep = ("accessor", "renewable", "policies", "display_name", "client_cert_subject")
            self.state.token = {k: ident[k] for k in keep if k in ident}
            self.state.token_expires = time.time() + ttl if isinstance(ttl, int) and ttl else None
        if isinstance(ttl, int) and ttl > 0:
            if ident.get("renewable"):
                renew_in = max(ttl / 2.0, 1.0)
            else:
                if warn:
                    log.warning(
                        "the vault token is not renewable and expires in %d s; after that "
                        "the vault will refuse this host (issue a renewable or periodic token)",
                        ttl,
                    )
                renew_in = float(ttl)
        return renew_in

    def _announce_ready(self, on_ready: Callable[[], None] | None) -> None:
        """Called from FUSE init: report readiness once the mount answers requests."""

        def wait_and_report() -> None:
            try:
                st = os.stat(self.config.mountpoint)  # served only after INIT completes
            except OSError as exc:
                log.error("mount did not come up: %s", exc)
                return
            _raise_readahead(st.st_dev)
            self._write_runtime_file()
            log.info("mount live at %s", self.config.mountpoint)
            sdnotify.notify(ready=1, status=f"active: {self.config.mountpoint} mounted")
            if on_ready is not None:
                on_ready()

        threading.Thread(target=wait_and_report, name="encfs-ready", daemon=True).start()

    def _write_runtime_file(self) -> None:
        try:
            RUN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = runtime_file(self.config.mountpoint)
            tmp = path.with_suffix(".tmp")
            record = {
                "pid": os.getpid(),
                "mountpoint": str(self.config.mountpoint.resolve()),
                "cipher_dir": str(self.config.cipher_dir.resolve()),
                "started": self.started,
            }
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:  # explicit mode: the daemon's umask is 0
                f.write(json.dumps(record))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write runtime file in %s: %s", RUN_DIR, exc)

    def _remove_runtime_file(self) -> None:
        with contextlib.suppress(OSError):
            runtime_file(self.config.mountpoint).unlink(missing_ok=True)

    def _feed_watchdog(self) -> None:
        """Tell systemd we are healthy every half ``WatchdogSec=``: only while the mount
        answers a statfs (any answer, EACCES when suspended included; a wedged FUSE loop
        blocks this thread, the pings stop, and systemd restarts the service)."""
        interval = sdnotify.watchdog_interval() or 10.0
        while not self._stopping.wait(interval):
            try:
                os.statvfs(self.config.mountpoint)  # a real request, never from a cache
            except PermissionError:
                pass  # suspended: refusing is the healthy answer
            except OSError as exc:
                log.error("mount does not answer (%s); not feeding the watchdog", exc)
                continue
            sdnotify.notify(watchdog=1)

    # --- suspend and resume (called by the watcher) -------------------------------------------

    def suspend(self, reason: str, audit: AuditLog, *, revoked: bool) -> None:
        """Flush, then wipe every key and every cached plaintext (see module docstring)."""
        ops, state = self.ops, self.state
        assert ops is not None and state is not None
        with self._transition:
            if ops.suspended or self.keys is None:
                return
            t0 = time.monotonic()
            self._flush()
            invalidated = ops.suspend()
            state.set("suspended", reason)
            took = time.monotonic() - t0
        log.error(
            "suspended: %s — keys wiped, %d cached inodes invalidated (%.0f ms); "
            "every operation fails with errno %d until access comes back",
            reason,
            invalidated,
            took * 1000,
            self.config.fs.suspended_errno,
        )
        audit.event("suspend", result="ok", reason=reason, revoked=revoked)
        if self.config.ephemeral:
            log.error("ephemeral volume erased: its key is gone for good; unmounting")
            self.revoked_unmount = reason
            self._unmount()
        elif revoked and self.config.on_revoke == "unmount":
            self.revoked_unmount = reason
            self._unmount()

    def resume(self, volume_key: bytearray, hf: volume.HeaderFile, audit: AuditLog) -> None:
        """Serve again with a freshly unwrapped volume key (the caller wipes its copy)."""
        ops, state = self.ops, self.state
        assert ops is not None and state is not None
        with self._transition:
            if not ops.suspended or self.keys is None:
                return
            ops.resume(volume_key, hf.body, hf.tag)
            state.set("active")
        log.warning("resumed: the vault unwraps the volume key again")
        audit.event("resume", kek_version=hf.header.kek_version)

    def _flush(self) -> None:
        """Make what the kernel holds dirty (mmap, writeback cache) and what we wrote
        durable while the keys still exist: syncfs(2) on the mount, then on the backing fs."""
        for path in (self.config.mountpoint, self.config.cipher_dir):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                log.warning("cannot open %s to flush it: %s", path, exc.strerror)
                continue
            try:
                backing.syncfs(fd)
            except OSError as exc:
                log.warning("syncfs %s failed: %s", path, exc.strerror)
            finally:
                os.close(fd)

    def _unmount(self) -> None:
        """Detach the mount (lazily: open files must not keep it); the FUSE loop then ends."""
        proc = fusermount("-u", "-z", str(self.config.mountpoint))
        if proc.returncode != 0:
            log.error("cannot unmount %s: %s", self.config.mountpoint, proc.stderr.strip())

    def status(self) -> dict[str, Any]:
        """What ``encfs status`` shows (no secrets)."""
        cfg, state, keys, ops, hf = self.config, self.state, self.keys, self.ops, self.header
        out: dict[str, Any] = {
            "mountpoint": str(cfg.mountpoint),
            "cipher_dir": str(cfg.cipher_dir),
            "pid": os.getpid(),
            "started": _iso(self.started),
        }
        if state is not None:
            out.update(state.snapshot())
        if hf is not None:
            with contextlib.suppress(FormatError, OSError):
                hf = volume.read_header(cfg.cipher_dir)  # rotation may have moved it on
            out["volume_id"] = hf.header.volume_id.hex()
            out["vault"] = self.vault_url
            out["key_name"] = out["vault"].rstrip("/").rsplit("/", 1)[-1]
            out["kek_version"] = hf.header.kek_version
        out["ephemeral"] = cfg.ephemeral
        if cfg.ephemeral and self.state is not None:
            out["volume_id"] = self.volume_id
            out["vault"] = cfg.vault_url
        out["check_interval"] = cfg.check_interval
        out["offline_grace"] = cfg.offline_grace
        out["on_revoke"] = cfg.on_revoke
        if keys is not None:
            lock = keys.memory_lock
            out["memory"] = {
                "locked": lock.mlocked,
                "dontdump": lock.dontdump,
                "detail": lock.detail,
            }
        if ops is not None:
            out["counters"] = asdict(ops.counters)
            out["libfuse"] = {"version": ops.libfuse_version, "killpriv_v2": ops.killpriv_v2}
            out["cached_paths"] = len(ops.seen)
        with contextlib.suppress(psutil.Error):
            out["rss"] = psutil.Process().memory_info().rss
        return out


class KeyWatcher:
    """Checks, every ``check_interval`` seconds, that the vault still unwraps the volume
    key, renews the host token, and drives suspend / offline grace / resume (module
    docstring). One thread; every transition is logged once, not at every poll."""

    def __init__(
        self,
        daemon: Daemon,
        vault: KeyWrapper | None,
        url: str,
        audit: AuditLog,
        renew_in: float | None,
    ) -> None:
        self.daemon = daemon
        self.vault = vault
        self._url = url
        self._audit = audit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="encfs-watcher", daemon=True)
        now = time.monotonic()
        self._next_renew = now + renew_in if renew_in is not None else math.inf
        self._unreachable_since: float | None = None
        self._last_error_kind = ""
        self._header_unreadable = False

    def start(self) -> None:
        if self.vault is not None:  # an ephemeral volume without a vault watches nothing
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        cfg = self.daemon.config
        next_check = time.monotonic() + cfg.check_interval
        while True:
            wait = min(next_check, self._next_renew) - time.monotonic()
            if self._stop.wait(max(wait, 0.0)):
                return
            try:
                now = time.monotonic()
                if now >= self._next_renew:
                    self._renew()
                if now >= next_check:
                    self._check()
                    next_check = time.monotonic() + cfg.check_interval
            except Exception:  # never let the watcher die silently
                log.exception("key watcher step failed")
                next_check = time.monotonic() + cfg.check_interval

    def _renew(self) -> None:
        assert self.vault is not None
        try:
            delay = self.vault.renew_identity()
        except VaultError as exc:
            self._next_renew = time.monotonic() + 10.0
            self._failed(exc, "token_renew")
            return
        self._audit.event("token_renew", next_in=delay)
        self._next_renew = time.monotonic() + delay if delay is not None else math.inf
        state = self.daemon.state
        if state is not None and delay is not None:
            state.token_expires = time.time() + 2 * delay

    def _check(self) -> None:
        daemon = self.daemon
        assert self.vault is not None
        if daemon.config.ephemeral:  # no wrapped key: may the host still use the KEK?
            try:
                self.vault.key_status()
            except VaultError as exc:
                self._failed(exc, "key_status")
                return
            self._succeeded()
            return
        ops = daemon.ops
        if ops is not None and ops.suspended:
            self._reconnect()  # a replaced token file or fixed policy counts from now
        held = daemon.header
        assert held is not None
        hf = self._header_to_check(held)
        try:
            volume_key = self.vault.unwrap(hf.header.wrapped_key)
        except VaultError as exc:
            self._failed(exc, "unwrap")
            return
        try:
            ours = hf.header.volume_id == held.header.volume_id and hmac.compare_digest(
                key_check_value(volume_key, held.header.volume_id), daemon.check_value
            )
            if not ours:
                # The header names a key the host may unwrap, but not the volume's: a
                # substituted header. Fail closed until the real one is back.
                self._audit.event("vault_error", result="error", error="VolumeMismatch")
                daemon.suspend(
                    f"the volume header at {hf.path} wraps another volume key than the one "
                    "in use (substituted header?)",
                    self._audit,
                    revoked=False,
                )
                return
            if ops is not None and ops.suspended:
                try:
                    daemon.resume(volume_key, hf, self._audit)
                except EncfsError as exc:
                    log.error("cannot resume: %s", exc)
                    return
                daemon.header = hf
                self._next_renew = time.monotonic()  # learn the (maybe new) token's TTL
                self._note_identity()
            elif hf is not held:
                keys = daemon.keys
                try:
                    if keys is not None:
                        keys.verify_header(hf.body, hf.tag)
                except EncfsError as exc:
                    log.error("the volume header on disk does not verify: %s", exc)
                else:
                    daemon.header = hf  # e.g. `encfs rotate`: the new wrapping is ours
        finally:
            volume_key[:] = bytes(len(volume_key))
        self._succeeded()

    def _header_to_check(self, held: volume.HeaderFile) -> volume.HeaderFile:
        """The header whose wrapped key this check unwraps: the one on disk when it differs
        from the one held (``encfs rotate`` moved it on), else the one held since mount —
        also when the file is gone or unreadable, so that hiding it skips no check."""
        try:
            disk = volume.read_header(self.daemon.config.cipher_dir)
        except (FormatError, OSError) as exc:
            if not self._header_unreadable:
                log.warning(
                    "cannot read the volume header (%s); checking the wrapped key held since mount",
                    exc,
                )
            self._header_unreadable = True
            return held
        self._header_unreadable = False
        if disk.body == held.body and disk.tag == held.tag:
            return held
        return disk

    def _note_identity(self) -> None:
        assert self.vault is not None
        renew_in = self.daemon.note_identity(self.vault, self._audit, warn=False)
        self._next_renew = time.monotonic() + renew_in if renew_in is not None else math.inf

    def _reconnect(self) -> None:
        try:
            fresh = connect(self._url, self.daemon.config.vault)
        except VaultError as exc:
            log.debug("cannot reconnect to the vault: %s", exc)
            return
        if self.vault is not None:
            self.vault.close()
        self.vault = fresh

    def _succeeded(self) -> None:
        state = self.daemon.state
        assert state is not None
        state.checked(reachable=True)
        if self._unreachable_since is not None:
            log.warning("vault reachable again")
        self._unreachable_since = None
        self._last_error_kind = ""
        if state.name == "offline-grace":
            state.set("active")

    def _failed(self, exc: VaultError, what: str) -> None:
        daemon, cfg = self.daemon, self.daemon.config
        state = daemon.state
        assert state is not None
        kind = type(exc).__name__
        if kind != self._last_error_kind:
            self._audit.error("vault_error", exc, during=what)
            self._last_error_kind = kind
        if exc.revoked:
            state.checked(reachable=True, error=str(exc))
            self._unreachable_since = None
            daemon.suspend(f"access revoked ({kind}): {exc}", self._audit, revoked=True)
            return
        state.checked(reachable=False, error=str(exc))
        now = time.monotonic()
        if self._unreachable_since is None:
            self._unreachable_since = now
            if cfg.offline_grace > 0 and state.name == "active":
                log.warning(
                    "%s; serving on for the offline grace of %.0f s", exc, cfg.offline_grace
                )
        if state.name == "suspended":
            return
        if now - self._unreachable_since >= cfg.offline_grace:
            daemon.suspend(
                f"vault unreachable for {now - self._unreachable_since:.0f} s "
                f"(offline grace {cfg.offline_grace:.0f} s): {exc}",
                self._audit,
                revoked=False,
            )
        else:
            state.set("offline-grace", f"vault unreachable: {exc}")


class StatusServer:
    """Answers each connection on a root-only unix socket with one JSON status object."""

    def __init__(self, path: Path, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._path = path
        self._snapshot = snapshot
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="encfs-status", daemon=True)

    def start(self) -> None:
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
        self._sock = sock
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
            with contextlib.suppress(OSError):
                self._path.unlink()

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(2)
                    payload = json.dumps(self._snapshot(), default=str).encode() + b"\n"
                    conn.sendall(payload)
                except Exception as exc:  # a status reader must never hurt the mount
                    log.debug("status request failed: %s", exc)
