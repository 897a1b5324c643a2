"""The life of one mount: a key source (the header, or a fresh ephemeral key), FUSE, teardown.

``Daemon.run()`` blocks for the life of the mount (foreground). It takes the volume's keys
from its key source — the volume header's wrapped key unwrapped by the vault (nothing is
mounted if the vault refuses), or a fresh random key for an ephemeral volume — mounts with
libfuse 3, reports readiness once the mount answers, and on unmount (``fusermount3 -u``,
SIGTERM, SIGINT) wipes every key before returning. Background operation is the CLI's
business: it runs this in a child process and waits for the readiness report.

While mounted, the ``watcher.KeyWatcher`` asks the vault whether the host may still read
the volume and drives the ``LiveMount`` (this module's ``watcher.MountControl``): suspending
flushes what the kernel holds dirty, shuts the FUSE gate, wipes every key and invalidates
every inode the kernel may cache (``EncfsOperations.suspend``); resuming re-derives the keys
from a fresh unwrap, and handles opened before work again. ``mounts.StatusServer`` answers
``encfs status`` with ``LiveMount.status``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from encfs import backing, metrics, mounts, names, pins, rekey, sdnotify, volume
from encfs import format as fmt
from encfs.audit import AuditLog, AuditSettings
from encfs.cipherfile import CipherFile
from encfs.errors import EncfsError, FormatError, VaultError, VolumeRevoked, VolumeSuspended
from encfs.fs import EncfsOperations, FsOptions, load_native, select_libfuse, serve
from encfs.hostfiles import write_file_atomic
from encfs.keys import VolumeKeys
from encfs.vault import (
    KeyWrapper,
    VaultSettings,
    connect,
    pin_vault_url,
    retry_unavailable,
    second_vault_settings,
)
from encfs.watcher import (
    HeldHeader,
    KeyWatcher,
    MountState,
    VaultLink,
    WatchSettings,
    note_identity,
)

log = logging.getLogger(__name__)

FUSE_MAIN_LOOP_ENDED = 8


@dataclass(frozen=True)
class MountConfig:
    """Everything one mount needs; built once by the CLI."""

    cipher_dir: Path
    mountpoint: Path
    vault: VaultSettings = field(default_factory=VaultSettings)
    vault_url: str | None = None
    """The vault the operator pinned (``--vault`` / ``VAULT=``): a full URL, or an address
    that takes the header's mount and key, or a space-separated list of either, the nodes
    of a cluster (``vault.pin_vault_url``)."""
    vault_addr: str | None = None
    """``VAULT_ADDR`` / ``BAO_ADDR`` of the host, used when ``vault_url`` is not given."""
    vault2: VaultSettings = field(
        default_factory=lambda: second_vault_settings(
            VaultSettings(), token_file=None, ca_file=None, client_cert=None, client_key=None
        )
    )
    """How to reach the second vault of a double-encrypted volume (its own credential)."""
    vault2_url: str | None = None
    """The second vault the operator pinned (``--vault2`` / ``VAULT2=``), for key slot 1 of
    a double-encrypted volume; a double volume without it is not mounted (exit 9)."""
    repin: bool = False
    """Accept and pin another volume than the one pinned for this cipher dir."""
    allow_other: bool = False
    default_permissions: bool = False
    read_only: bool = False
    fs: FsOptions = field(default_factory=FsOptions)
    debug: bool = False
    audit: AuditSettings = field(default_factory=AuditSettings)
    watch: WatchSettings = field(default_factory=WatchSettings)
    """Check interval, offline grace, what a revocation ends in."""
    nonempty: bool = False
    """Mount even over a mount point that holds entries (they are hidden while mounted)."""
    ephemeral: bool = False
    """A crypto-erased scratch volume: a fresh random key, never stored (``vault_url``, if
    given, is only watched: revocation of the host's access erases the volume)."""
    metrics_file: Path | None = None
    """Where to keep the mount's Prometheus metrics (``encfs.metrics``) for a textfile
    collector: rewritten atomically after every check interval, removed at unmount."""


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


@dataclass(frozen=True)
class Unlocked:
    """A volume whose keys are in memory, as a key source hands it to the mount, which
    owns ``keys`` (and the watcher ``vault``) from then on."""

    keys: VolumeKeys
    vault: KeyWrapper | None
    """The vault to watch; None only for an ephemeral volume mounted without one."""
    url: str
    """The vault this mount talks to (pinned; never the header's URL alone): the URL of
    each of its addresses, space-separated (``str(VaultURL)``); "" if none."""
    audit: AuditLog
    renew_in: float | None
    """Seconds until the host's credential needs renewing; None if it does not expire."""
    second: VaultLink | None
    """The vault of KEK 2 of a double-encrypted volume (the mount owns it); else None."""
    volume_id: str
    kek_version: int
    block_size: int
    features: int
    held: HeldHeader | None
    """The header and key check value the watcher checks; None for an ephemeral volume."""


def _fuse_options(cfg: MountConfig) -> dict[str, object]:
    """The libfuse mount options for ``cfg``."""
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
    return options


class Daemon:
    """Runs one mount in the foreground. Not reusable: one ``run()`` per instance."""

    def __init__(self, config: MountConfig) -> None:
        self.config = config
        self.started = time.time()
        self.state = MountState(config.mountpoint)
        self._stopping = threading.Event()

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Unlock, mount and serve until unmounted. Raises ``EncfsError`` before mounting,
        and ``VolumeRevoked`` after an unmount forced by ``on_revoke="unmount"``.

        Every key is wiped before this returns.
        """
        cfg = self.config
        harden_process()
        names.raise_fd_limit()  # before the operations size their directory cache by it
        select_libfuse()  # before any thread: writes the environment mfusepy reads in serve
        mounts.check_mountpoint(cfg.mountpoint, nonempty=cfg.nonempty)
        lock = self._lock_cipher_dir()
        try:
            unlocked = self._start_ephemeral() if cfg.ephemeral else self._unlock_header()
            self._serve(unlocked, on_ready)
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

    # --- key sources ------------------------------------------------------------------------

    def _unlock_header(self) -> Unlocked:
        """The volume header's key(s): read and check the header, pin the vault(s), unwrap
        (``_unwrap``). Raises ``EncfsError`` (nothing is mounted)."""
        cfg = self.config
        volume.check_cipher_dir_safe(cfg.cipher_dir)
        hf = volume.read_checked_header(cfg.cipher_dir)
        header = hf.header
        pinned = pin_vault_url(header.vault_url, configured=cfg.vault_url, addr=cfg.vault_addr)
        if pinned.note:
            log.warning("%s", pinned.note)
        urls = [str(pinned.url)]
        if header.double:
            pinned2 = pin_vault_url(
                header.slots[1].vault_url, configured=cfg.vault2_url, addr=None, slot=1
            )
            if pinned2.note:
                log.warning("KEK 2: %s", pinned2.note)
            urls.append(str(pinned2.url))
        elif cfg.vault2_url:
            log.warning("%s is not double-encrypted: --vault2 is not used", cfg.cipher_dir)
        context: dict[str, object] = {}
        if header.double:
            context = {"vault2": urls[1], "kek_version2": header.slots[1].kek_version}
        audit = AuditLog(
            cfg.audit,
            volume_id=header.volume_id.hex(),
            cipher_dir=str(cfg.cipher_dir),
            mountpoint=str(cfg.mountpoint),
            vault=urls[0],
            kek_version=header.kek_version,
            **context,
        )
        settings = [cfg.vault, cfg.vault2][: len(urls)]
        vaults: list[KeyWrapper] = []
        try:
            for url, vault_settings in zip(urls, settings, strict=True):
                vaults.append(connect(url, vault_settings))
            keys, check_values, renews = self._unwrap(hf, vaults, audit)
        except BaseException:
            for vault in vaults:
                vault.close()
            raise
        second = None
        if header.double:
            second = VaultLink(vaults[1], urls[1], cfg.vault2, renews[1])
        return Unlocked(
            keys=keys,
            vault=vaults[0],
            url=urls[0],
            audit=audit,
            renew_in=renews[0],
            second=second,
            volume_id=header.volume_id.hex(),
            kek_version=header.kek_version,
            block_size=header.block_size,
            features=header.feature_flags,
            held=HeldHeader(cfg.cipher_dir, hf, check_values),
        )

    def _unwrap(
        self, hf: volume.HeaderFile, vaults: list[KeyWrapper], audit: AuditLog
    ) -> tuple[VolumeKeys, tuple[bytes, ...], list[float | None]]:
        """Preflight, unwrap (retrying an unreachable or sealed vault within
        ``--vault-timeout``), pin check, identity — with every vault (one per volume key).
        Returns the keys, each volume key's check value and, per vault, when to renew the
        credential."""
        cfg = self.config
        double = hf.header.double

        def retrying(exc: VaultError, delay: float) -> None:
            log.warning("%s; retrying in %.2g s", exc, delay)

        def unwrap() -> VolumeKeys:
            for number, vault in enumerate(vaults, 1):
                try:
                    vault.check_capabilities("mount")
                except VaultError as exc:
                    if double:
                        exc.for_kek(number)
                    raise
            return volume.unlock(hf, *vaults)

        try:
            keys = retry_unavailable(unwrap, bound=cfg.vault.timeout, on_retry=retrying)
        except VaultError as exc:
            audit.error("unwrap", exc, kek=exc.kek)
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
                vault_url2=hf.header.slots[1].vault_url if double else "",
            )
            check_values = keys.check_values()
        except BaseException as exc:
            keys.close()
            if isinstance(exc, EncfsError):
                audit.error("mount", exc)
            raise
        renews: list[float | None] = []
        for number, vault in enumerate(vaults, 1):
            renews.append(note_identity(vault, audit, self.state, warn=True, kek=number))
            if double:
                slot = hf.header.slots[number - 1]
                audit.event(
                    "unwrap", kek=number, vault=str(vault.url), kek_version=slot.kek_version
                )
            else:
                audit.event("unwrap")
        audit.event("mount", read_only=cfg.read_only)
        return keys, check_values, renews

    def _start_ephemeral(self) -> Unlocked:
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
            renew_in = note_identity(vault, audit, self.state, warn=True)
        volume_id, keys = volume.start_ephemeral(cfg.cipher_dir)
        audit.bind(volume_id=volume_id.hex())
        audit.event("mount", read_only=cfg.read_only)
        return Unlocked(
            keys=keys,
            vault=vault,
            url=cfg.vault_url or "",
            audit=audit,
            renew_in=renew_in,
            second=None,
            volume_id=volume_id.hex(),
            kek_version=0,
            block_size=fmt.DEFAULT_BLOCK_SIZE,
            features=fmt.EPHEMERAL_FEATURES,
            held=None,
        )

    # --- serving ----------------------------------------------------------------------------

    def _serve(self, unlocked: Unlocked, on_ready: Callable[[], None] | None) -> None:
        """Mount ``unlocked`` and serve until unmounted; then stop the watcher and the
        status socket and wipe every key. Raises ``VolumeRevoked`` if a revocation forced
        the unmount."""
        cfg, state, keys, audit = self.config, self.state, unlocked.keys, unlocked.audit
        if not keys.memory_lock.mlocked:
            log.warning("key memory is not locked: %s", keys.memory_lock.detail)
        io = load_native(unlocked.block_size, unlocked.features, cfg.fs)
        log.log(logging.WARNING if io.degraded else logging.INFO, "I/O path: %s", io.reason)
        ops = EncfsOperations(
            str(cfg.cipher_dir),
            keys,
            unlocked.block_size,
            cfg.fs,
            on_init=lambda: self._announce_ready(on_ready),
            dirid_links=fmt.dirid_links(unlocked.features),
            io=io,
        )
        options = _fuse_options(cfg)
        log.info(
            "mounting %s on %s (%svolume %s, KEK version %d)",
            cfg.cipher_dir,
            cfg.mountpoint,
            "ephemeral " if cfg.ephemeral else "",
            unlocked.volume_id,
            unlocked.kek_version,
        )
        mount = LiveMount(cfg, unlocked, ops, state, started=self.started)
        if unlocked.vault is not None:
            state.add_kek(1, unlocked.url, unlocked.kek_version)
        if unlocked.second is not None and unlocked.held is not None:
            state.add_kek(2, unlocked.second.url, unlocked.held.header.header.slots[1].kek_version)
        state.set("active")
        watcher: KeyWatcher | None = None
        if unlocked.vault is not None:  # an ephemeral volume without a vault watches nothing
            watcher = KeyWatcher(
                mount,
                state,
                unlocked.vault,
                url=unlocked.url,
                vault_settings=cfg.vault,
                settings=cfg.watch,
                audit=audit,
                held=unlocked.held,
                renew_in=unlocked.renew_in,
                second=unlocked.second,
            )
        status = mounts.StatusServer(
            mounts.status_socket(cfg.mountpoint), mount.status, {"rekey": mount.start_rekey}
        )
        health = threading.Thread(target=self._feed_watchdog, name="encfs-watchdog", daemon=True)
        exporter = threading.Thread(
            target=self._write_metrics, args=(mount,), name="encfs-metrics", daemon=True
        )
        try:
            if watcher is not None:
                watcher.start()
            status.start()
            if sdnotify.watchdog_interval() is not None:
                health.start()
            if cfg.metrics_file is not None:
                exporter.start()
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
            if watcher is not None:
                watcher.stop()
            status.stop()
            if exporter.is_alive():
                exporter.join(timeout=10)
            ops.aliases.stop()
            mount.close()
            if watcher is not None:
                watcher.close()
            elif unlocked.second is not None:  # pragma: no cover - a double volume watches
                unlocked.second.vault.close()
            mounts.remove_runtime_file(cfg.mountpoint)
            audit.event("unmount", forced_by_revocation=bool(mount.revoked_unmount) or None)
            log.info("unmounted %s; keys wiped", cfg.mountpoint)
        if mount.revoked_unmount:
            raise VolumeRevoked(
                f"unmounted {cfg.mountpoint} because the vault revoked access: "
                f"{mount.revoked_unmount}"
            )

    def _announce_ready(self, on_ready: Callable[[], None] | None) -> None:
        """Called from FUSE init: report readiness once the mount answers requests."""
        cfg = self.config

        def wait_and_report() -> None:
            try:
                st = os.stat(cfg.mountpoint)  # served only after INIT completes
            except OSError as exc:
                log.error("mount did not come up: %s", exc)
                return
            mounts.raise_readahead(st.st_dev)
            mounts.write_runtime_file(cfg.mountpoint, cfg.cipher_dir, self.started)
            log.info("mount live at %s", cfg.mountpoint)
            sdnotify.notify(ready=1, status=f"active: {cfg.mountpoint} mounted")
            if on_ready is not None:
                on_ready()

        threading.Thread(target=wait_and_report, name="encfs-ready", daemon=True).start()

    def _write_metrics(self, mount: LiveMount) -> None:
        """Keep ``--metrics-file`` current (``encfs.metrics``, written atomically, mode
        0644: it holds no secret) every check interval until the mount stops; then remove
        it, so that a textfile collector stops reporting a mount that is gone."""
        path = self.config.metrics_file
        assert path is not None
        every = max(1.0, self.config.watch.check_interval)
        failing = False
        while True:
            try:
                text = metrics.render([mount.status()])
                write_file_atomic(path, text.encode(), 0o644, sync=False)
                failing = False
            except OSError as exc:
                if not failing:
                    log.warning("cannot write the metrics file %s: %s", path, exc.strerror)
                failing = True
            if self._stopping.wait(every):
                break
        with contextlib.suppress(OSError):
            path.unlink()

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


class MountedAccess:
    """``rekey.VolumeAccess`` of a mounted volume: its operations' keys and names, their
    gate for quiet moments, their open-file table (a file the rekey re-seals shares its
    ``CipherFile`` and lock with every handle on it), and the header the watcher holds."""

    def __init__(self, cipher_dir: Path, ops: EncfsOperations, held: HeldHeader) -> None:
        self.cipher_dir = cipher_dir
        self._ops = ops
        self._held = held

    @property
    def keys(self) -> VolumeKeys:
        return self._ops.keys

    @property
    def names(self) -> names.Names:
        return self._ops.names

    def quiet(self) -> contextlib.AbstractContextManager[None]:
        return self._ops.quiet()

    def open_file(self, directory: backing.Dir, name: str) -> tuple[int, CipherFile]:
        fd = directory.open_file(name, os.O_RDWR | os.O_CLOEXEC)
        return fd, self._ops.files.attach(fd, directory.path(name))

    def close_file(self, fd: int) -> None:
        self._ops.files.release(fd)

    def tree_changes(self) -> int:
        return self._ops.tree.moves

    def installed(self, hf: volume.HeaderFile, check_values: tuple[bytes, ...]) -> None:
        self._held.rekeyed(hf, check_values)


class LiveMount:
    """A mount that is up: its keys, its FUSE operations and its state, made once the keys
    are in memory and the operations exist. The watcher's ``MountControl`` (suspend,
    resume, verify a header) and the source of ``encfs status``. Suspend, resume and
    ``close`` hold one lock, so a transition never races the final wipe."""

    def __init__(
        self,
        config: MountConfig,
        unlocked: Unlocked,
        ops: EncfsOperations,
        state: MountState,
        *,
        started: float,
    ) -> None:
        self._config = config
        self._unlocked = unlocked
        self._keys = unlocked.keys
        self._audit = unlocked.audit
        self._ops = ops
        self._state = state
        self._started = started
        self._transition = threading.Lock()
        self._closed = False
        self._rekey_lock = threading.Lock()
        self._rekey_thread: threading.Thread | None = None
        self._rekey_progress = rekey.RekeyProgress(state="none")
        self._rekey_stop = threading.Event()
        self.revoked_unmount = ""
        """Why a revocation unmounted the volume ("" unless it did)."""

    @property
    def suspended(self) -> bool:
        return self._ops.suspended

    def suspend(self, reason: str, *, revoked: bool, unmount: bool) -> None:
        """Flush, then wipe every key and every cached plaintext (module docstring); then,
        with ``unmount`` or for an ephemeral volume (its key is gone for good), unmount.
        Does nothing if suspended already or closed."""
        cfg = self._config
        with self._transition:
            if self._ops.suspended or self._closed:
                return
            t0 = time.monotonic()
            self._flush()
            invalidated = self._ops.suspend()
            self._state.set("suspended", reason)
            took = time.monotonic() - t0
        log.error(
            "suspended: %s — keys wiped, %d cached inodes invalidated (%.0f ms); "
            "every operation fails with errno %d until access comes back",
            reason,
            invalidated,
            took * 1000,
            cfg.fs.suspended_errno,
        )
        self._audit.event("suspend", result="ok", reason=reason, revoked=revoked)
        if cfg.ephemeral:
            log.error("ephemeral volume erased: its key is gone for good; unmounting")
            self.revoked_unmount = reason
            mounts.detach(cfg.mountpoint)
        elif unmount:
            self.revoked_unmount = reason
            mounts.detach(cfg.mountpoint)

    def resume(
        self,
        volume_keys: Sequence[bytearray],
        hf: volume.HeaderFile,
        retiring: Sequence[bytearray] = (),
    ) -> None:
        """Serve again with freshly unwrapped volume keys (key slot order) and, during a
        rekey, the retiring ones (the caller wipes its copies). Raises ``HeaderAuthError``
        if ``hf``'s tag does not verify (still suspended)."""
        with self._transition:
            if not self._ops.suspended or self._closed:
                return
            self._ops.resume(volume_keys, hf.body, hf.tag, retiring)
            self._state.set("active")
        log.warning(
            "resumed: the vault%s the volume key%s again",
            "s unwrap" if len(volume_keys) > 1 else " unwraps",
            "s" if len(volume_keys) > 1 else "",
        )
        fields: dict[str, Any] = {}
        if hf.header.double:
            fields = {"kek_version2": hf.header.slots[1].kek_version}
        self._audit.event("resume", kek_version=hf.header.kek_version, **fields)

    def verify_header(self, hf: volume.HeaderFile) -> None:
        """Raises ``HeaderAuthError`` unless ``hf``'s tag verifies under the keys in use
        (nothing to check once closed)."""
        with self._transition:
            if not self._closed:
                self._keys.verify_header(hf.body, hf.tag)

    def close(self) -> None:
        """Stop a rekey in progress (it stays resumable), then wipe every key for good
        (waits for a transition in flight)."""
        self._rekey_stop.set()
        thread = self._rekey_thread
        if thread is not None:
            thread.join(timeout=30)
        with self._transition:
            self._keys.close()
            self._closed = True

    # --- rekey (``encfs rekey`` of the mounted volume) ---------------------------------------

    def start_rekey(self) -> dict[str, Any]:
        """Start re-encrypting the volume under a new volume key on a thread of its own
        (``encfs.rekey``), or report the one running. Answers the status socket's ``rekey``
        command: ``{"started": bool, "rekey": progress}`` or ``{"error": why}``."""
        cfg, unlocked = self._config, self._unlocked
        with self._rekey_lock:
            thread = self._rekey_thread
            if thread is not None and thread.is_alive():
                return {"started": False, "rekey": self._rekey_progress.as_dict()}
            if cfg.ephemeral or unlocked.held is None:
                return {"error": "an ephemeral volume has no volume key to replace"}
            if cfg.read_only:
                return {"error": "the volume is mounted read-only; remount it read-write"}
            if self._closed:
                return {"error": "the volume is being unmounted"}
            self._rekey_progress = rekey.RekeyProgress()
            thread = threading.Thread(target=self._rekey_main, name="encfs-rekey", daemon=True)
            self._rekey_thread = thread
            thread.start()
            return {"started": True, "rekey": self._rekey_progress.as_dict()}

    def _rekey_main(self) -> None:
        """The rekey thread: runs ``rekey.run`` with a vault client of its own; waits while
        the volume is suspended (the keys it re-seals with are wiped) and goes on after."""
        cfg, unlocked = self._config, self._unlocked
        held = unlocked.held
        assert held is not None  # start_rekey refuses an ephemeral volume
        progress, stop = self._rekey_progress, self._rekey_stop
        access = MountedAccess(cfg.cipher_dir, self._ops, held)
        vaults: list[KeyWrapper] = []
        try:
            vaults.append(connect(unlocked.url, cfg.vault))
            if unlocked.second is not None:
                vaults.append(connect(unlocked.second.url, unlocked.second.settings))
        except VaultError as exc:
            for vault in vaults:
                vault.close()
            progress.state, progress.error = "failed", str(exc)
            self._audit.error("rekey", exc)
            return
        try:
            while not stop.is_set():
                if self._ops.suspended:
                    stop.wait(0.5)
                    continue
                hf = volume.read_header(cfg.cipher_dir)
                if not hf.header.rekeying:
                    self._audit.event("rekey_begin", kek_version=hf.header.kek_version)
                try:
                    final = rekey.run(access, hf, vaults, progress, stop, accept=held.announce)
                except VolumeSuspended:
                    log.warning("rekey waits: the volume is suspended")
                    continue
                self._audit.event(
                    "rekey", kek_version=final.header.kek_version, **progress.summary()
                )
                return
        except rekey.RekeyStopped:
            log.warning("rekey stopped (unmount); `encfs rekey` after the next mount finishes it")
        except Exception as exc:
            log.error("rekey failed: %s", exc)
            if isinstance(exc, EncfsError):
                self._audit.error("rekey", exc, **progress.summary())
        finally:
            for vault in vaults:
                vault.close()

    def _flush(self) -> None:
        """Make what the kernel holds dirty (mmap, writeback cache) and what we wrote
        durable while the keys still exist: syncfs(2) on the mount, then on the backing fs."""
        for path in (self._config.mountpoint, self._config.cipher_dir):
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

    def status(self) -> dict[str, Any]:
        """What ``encfs status`` shows (no secrets)."""
        cfg, unlocked, ops = self._config, self._unlocked, self._ops
        out: dict[str, Any] = {
            "mountpoint": str(cfg.mountpoint),
            "cipher_dir": str(cfg.cipher_dir),
            "pid": os.getpid(),
            "started": mounts.iso_utc(self._started),
            "started_time": self._started,
        }
        out.update(self._state.snapshot())
        if unlocked.held is not None:
            hf = unlocked.held.header
            with contextlib.suppress(FormatError, OSError):
                hf = volume.read_header(cfg.cipher_dir)  # rotation may have moved it on
            out["volume_id"] = hf.header.volume_id.hex()
            out["vault"] = unlocked.url
            out["key_name"] = unlocked.url.rstrip("/").rsplit("/", 1)[-1]
            out["kek_version"] = hf.header.kek_version
            out["double"] = unlocked.held.header.header.double
            if out["double"]:
                out["outer_cipher"] = fmt.OUTER_CIPHER_NAMES[hf.header.outer_cipher]
            for number, kek in enumerate(out.get("keks", []), 1):
                if number <= len(hf.header.slots):
                    kek["kek_version"] = hf.header.slots[number - 1].kek_version
                    kek["key_name"] = kek["vault"].rstrip("/").rsplit("/", 1)[-1]
        if unlocked.vault is not None:
            out["vault_addresses"] = list(unlocked.vault.url.origins)
        out["ephemeral"] = cfg.ephemeral
        if cfg.ephemeral:
            out["volume_id"] = unlocked.volume_id
            out["vault"] = cfg.vault_url
        out["check_interval"] = cfg.watch.check_interval
        out["offline_grace"] = cfg.watch.offline_grace
        out["on_revoke"] = cfg.watch.on_revoke
        lock = self._keys.memory_lock
        out["memory"] = {"locked": lock.mlocked, "dontdump": lock.dontdump, "detail": lock.detail}
        out["counters"] = ops.counter_values()
        out["io_path"] = ops.io_path
        out["libfuse"] = {"version": ops.libfuse_version, "killpriv_v2": ops.killpriv_v2}
        out["cached_paths"] = len(ops.seen)
        if self._rekey_progress.state != "none":
            out["rekey"] = self._rekey_progress.as_dict()
        elif unlocked.held is not None and unlocked.held.header.header.rekeying:
            out["rekey"] = {"state": "interrupted"}  # `encfs rekey` finishes it
        with contextlib.suppress(psutil.Error):
            out["rss"] = psutil.Process().memory_info().rss
        return out
