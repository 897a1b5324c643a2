"""The life of one mount: unwrap the key with the vault, run FUSE, wipe keys on the way out.

``Daemon.run()`` blocks for the life of the mount (foreground). It reads the volume header,
unwraps the volume key (nothing is mounted if the vault refuses), mounts with libfuse 3,
reports readiness once the mount answers, and on unmount (``fusermount3 -u``, SIGTERM,
SIGINT) wipes every key before returning. Background operation is the CLI's business: it
runs this in a child process and waits for the readiness report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from encfs import volume
from encfs.audit import AuditLog, AuditSettings
from encfs.errors import VaultError
from encfs.fs import EncfsFUSE, EncfsOperations, FsOptions
from encfs.keys import VolumeKeys
from encfs.vault import KeyWrapper, VaultSettings, connect, retry_unavailable

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
    """Override of the vault URL stored in the volume header (same key, other address)."""
    allow_other: bool = False
    default_permissions: bool = False
    read_only: bool = False
    fs: FsOptions = field(default_factory=FsOptions)
    debug: bool = False
    audit: AuditSettings = field(default_factory=AuditSettings)


def runtime_file(mountpoint: Path) -> Path:
    """Where the daemon serving ``mountpoint`` records its pid (root-owned, /run/encfs)."""
    digest = hashlib.sha256(str(mountpoint.resolve()).encode()).hexdigest()[:16]
    return RUN_DIR / f"{digest}.json"


def harden_process() -> None:
    """No core dumps: keys must never reach a disk through a crash."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        import ctypes

        pr_set_dumpable = 4
        ctypes.CDLL(None).prctl(pr_set_dumpable, 0, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - Linux always has prctl
        log.warning("could not mark the process non-dumpable")


class Daemon:
    """Runs one mount in the foreground. Not reusable: one ``run()`` per instance."""

    def __init__(self, config: MountConfig) -> None:
        self.config = config
        self.keys: VolumeKeys | None = None
        self.started = time.time()

    def _check_mountpoint(self) -> None:
        from encfs.errors import MountError

        mp = self.config.mountpoint
        if not mp.is_dir():
            raise MountError(f"mount point {mp} does not exist or is not a directory")
        if os.path.ismount(mp):
            raise MountError(f"{mp} is already a mount point; unmount it first")
        if not os.path.exists("/dev/fuse"):
            raise MountError("/dev/fuse is missing: load the fuse module (modprobe fuse)")

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Unlock, mount and serve until unmounted. Raises ``EncfsError`` before mounting.

        The vault client stays open for the life of the mount: a keeper thread renews the
        host token before it expires. Every key is wiped before this returns.
        """
        cfg = self.config
        harden_process()
        self._check_mountpoint()
        hf = volume.read_header(cfg.cipher_dir)
        url = cfg.vault_url or hf.header.vault_url
        audit = AuditLog(
            cfg.audit,
            volume_id=hf.header.volume_id.hex(),
            cipher_dir=str(cfg.cipher_dir),
            mountpoint=str(cfg.mountpoint),
            vault=url,
            kek_version=hf.header.kek_version,
        )
        vault = connect(url, cfg.vault)
        try:
            keys, renew_in = self._unlock(hf, vault, audit)
        except BaseException:
            vault.close()
            raise
        self.keys = keys
        if not keys.memory_lock.mlocked:
            log.warning("key memory is not locked: %s", keys.memory_lock.detail)
        ops = EncfsOperations(
            str(cfg.cipher_dir),
            keys,
            hf.header.block_size,
            cfg.fs,
            on_init=lambda: self._announce_ready(on_ready),
        )
        options: dict[str, object] = {
            "foreground": True,
            "fsname": f"encfs:{cfg.cipher_dir.resolve()}",
            "subtype": "encfs",
        }
        if cfg.allow_other:
            options["allow_other"] = True
        if cfg.default_permissions:
            options["default_permissions"] = True
        if cfg.read_only:
            options["ro"] = True
        if cfg.debug:
            options["debug"] = True
        log.info(
            "mounting %s on %s (volume %s, KEK version %d)",
            cfg.cipher_dir,
            cfg.mountpoint,
            hf.header.volume_id.hex(),
            hf.header.kek_version,
        )
        stop_keeper = threading.Event()
        keeper: threading.Thread | None = None
        if renew_in is not None:
            keeper = threading.Thread(
                target=self._keep_identity,
                args=(vault, audit, stop_keeper, renew_in),
                name="encfs-token",
                daemon=True,
            )
            keeper.start()
        try:
            EncfsFUSE(ops, str(cfg.mountpoint), **options)
        except RuntimeError as exc:
            # fuse_main answers 8 when its loop ended on SIGTERM/SIGINT/SIGHUP (libfuse's
            # own handlers unmount first): a requested stop, not a failure.
            if exc.args != (FUSE_MAIN_LOOP_ENDED,):
                audit.error("unmount", exc)
                raise
            log.info("stopped by signal")
        finally:
            stop_keeper.set()
            if keeper is not None:
                keeper.join(timeout=5)
            vault.close()
            ops.aliases.stop()
            keys.close()
            self.keys = None
            self._remove_runtime_file()
            audit.event("unmount")
            log.info("unmounted %s; keys wiped", cfg.mountpoint)

    def _unlock(
        self, hf: volume.HeaderFile, vault: KeyWrapper, audit: AuditLog
    ) -> tuple[VolumeKeys, float | None]:
        """Preflight, identity, unwrap (retrying an unreachable or sealed vault within
        ``--vault-timeout``). Returns the keys and when to renew the host's credential."""
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
        renew_in: float | None = None
        try:
            ident = vault.identity()
        except VaultError as exc:  # e.g. a policy without lookup-self: not fatal
            log.info("cannot look up the host's vault identity: %s", exc)
            ident = {}
        audit.bind(identity=ident.get("accessor") or ident.get("client_cert_subject"))
        ttl = ident.get("ttl")
        if isinstance(ttl, int) and ttl > 0:
            if ident.get("renewable"):
                renew_in = max(ttl / 2.0, 1.0)
            else:
                log.warning(
                    "the vault token is not renewable and expires in %d s; after that the "
                    "vault will refuse this host (issue a renewable or periodic token)",
                    ttl,
                )
                renew_in = float(ttl)
        audit.event("unwrap")
        audit.event("mount", read_only=cfg.read_only)
        return keys, renew_in

    def _keep_identity(
        self, vault: KeyWrapper, audit: AuditLog, stop: threading.Event, first: float
    ) -> None:
        """Renew the host token before it expires until ``stop`` is set. Failures are
        logged and audited once per kind; an unreachable vault is retried every 10 s."""
        delay: float | None = first
        last_error = ""
        while delay is not None and not stop.wait(delay):
            try:
                delay = vault.renew_identity()
                audit.event("token_renew", next_in=delay)
                last_error = ""
            except VaultError as exc:
                kind = type(exc).__name__
                if kind != last_error:
                    log.error("cannot renew the vault token: %s", exc)
                    audit.error("token_renew", exc)
                    last_error = kind
                delay = 10.0

    def _announce_ready(self, on_ready: Callable[[], None] | None) -> None:
        """Called from FUSE init: report readiness once the mount answers requests."""

        def wait_and_report() -> None:
            try:
                os.stat(self.config.mountpoint)  # served only after INIT completes
            except OSError as exc:
                log.error("mount did not come up: %s", exc)
                return
            self._write_runtime_file()
            log.info("mount live at %s", self.config.mountpoint)
            if on_ready is not None:
                on_ready()

        threading.Thread(target=wait_and_report, name="encfs-ready", daemon=True).start()

    def _write_runtime_file(self) -> None:
        try:
            RUN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = runtime_file(self.config.mountpoint)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(
                json.dumps(
                    {
                        "pid": os.getpid(),
                        "mountpoint": str(self.config.mountpoint.resolve()),
                        "cipher_dir": str(self.config.cipher_dir.resolve()),
                        "started": self.started,
                    }
                )
            )
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write runtime file in %s: %s", RUN_DIR, exc)

    def _remove_runtime_file(self) -> None:
        with contextlib.suppress(OSError):
            runtime_file(self.config.mountpoint).unlink(missing_ok=True)
