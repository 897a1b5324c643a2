"""The key watcher: every few seconds, may this host still read the volume? Suspend or resume.

While a volume is mounted, a ``KeyWatcher`` thread unwraps the volume key with the vault
every ``check_interval`` seconds (a real unwrap: the authoritative answer to "may this host
still read the volume?"; for an ephemeral volume, which has no wrapped key, the status of
the vault key) and renews the host token before it expires:

    active ──(refused: 403, key deleted/disabled, version retired)──▶ suspended
    active ──(unreachable, sealed)──▶ offline-grace ──(grace over)──▶ suspended
    suspended / offline-grace ──(unwrap works again)──▶ active

The watcher never touches keys, the FUSE operations or the daemon: it drives the mount
through a ``MountControl`` (suspend, resume, verify a rotated header) and records what it
sees in the ``MountState`` that ``encfs status``, the process title and systemd show.
"""

from __future__ import annotations

import hmac
import logging
import math
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import setproctitle

from encfs import sdnotify, volume
from encfs.audit import AuditLog
from encfs.errors import EncfsError, FormatError, VaultError
from encfs.keys import key_check_value
from encfs.mounts import iso_utc
from encfs.vault import KeyWrapper, VaultSettings, connect

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchSettings:
    """The key lifecycle while mounted; declared once (the CLI's defaults come from here)."""

    check_interval: float = 5.0
    """Seconds between the watcher's unwraps, at most (see ``jitter``)."""
    jitter: float = 0.2
    """Each wait is shortened by a random part of the interval up to this fraction, and
    the first one is random in (0, interval]: the checks of a fleet of hosts do not fall in
    step on the vault, and a check never comes later than ``check_interval`` after the
    one before (the revocation bound stays the interval + the check)."""
    offline_grace: float = 300.0
    """Seconds to keep serving while the vault cannot be reached (0: suspend at once)."""
    on_revoke: str = "suspend"
    """``suspend`` (wait for access to come back) or ``unmount`` (unmount and exit 23)."""


class MountControl(Protocol):
    """What the watcher may do to the mount it watches. Each call is safe from the
    watcher's thread while the mount serves; after the mount has wiped its keys for good
    (unmount) every call does nothing. Suspending and resuming also move the mount's
    ``MountState`` (to ``suspended``, to ``active``), in one step with the keys."""

    @property
    def suspended(self) -> bool:
        """Whether the mount holds no keys now (suspended)."""
        ...

    def suspend(self, reason: str, *, revoked: bool, unmount: bool) -> None:
        """Flush, wipe every key and cached plaintext, refuse every operation, enter
        ``suspended``; then, with ``unmount``, unmount. Nothing happens if the mount is
        suspended already."""
        ...

    def resume(
        self, volume_key: bytearray, hf: volume.HeaderFile, retiring: Sequence[bytearray] = ()
    ) -> None:
        """Serve again with ``volume_key`` (freshly unwrapped from ``hf``; the caller wipes
        its copy) and, while a rekey is under way, the retiring key(s) of ``hf``; enter
        ``active``. Raises ``EncfsError`` if ``hf``'s tag does not verify under them (the
        mount stays suspended)."""
        ...

    def verify_header(self, hf: volume.HeaderFile) -> None:
        """Raise ``EncfsError`` unless ``hf``'s tag verifies under the keys in use."""
        ...


class HeldHeader:
    """The wrapped key a mount checks: the header as last checked (read at mount, replaced
    by the watcher when a rotation is seen; it unwraps this one when the file on disk is
    gone or unreadable) and the check value of the volume key in use. The watcher
    replaces ``header`` when it sees a rotation; a rekey (``encfs rekey``) announces the
    new key's check value in ``coming`` before its header names that key, then installs
    both (``rekeyed``)."""

    def __init__(self, cipher_dir: Path, header: volume.HeaderFile, check_value: bytes) -> None:
        self.cipher_dir = cipher_dir
        self.header = header
        self.check_value = check_value
        """``keys.key_check_value`` of the volume key in use."""
        self.coming: bytes | None = None
        """The check value of the key a rekey is about to make current, until it does."""

    def ours(self, check_value: bytes) -> bool:
        """Whether ``check_value`` is the volume key's (in use, or coming from a rekey)."""
        return hmac.compare_digest(check_value, self.check_value) or (
            self.coming is not None and hmac.compare_digest(check_value, self.coming)
        )

    def announce(self, check_value: bytes) -> None:
        """A rekey is about to write a header naming the key of ``check_value``."""
        self.coming = check_value

    def rekeyed(self, header: volume.HeaderFile, check_value: bytes) -> None:
        """A rekey made ``header`` the one in place, and the key of ``check_value`` the one
        in use."""
        self.header = header
        self.check_value = check_value
        self.coming = None


class MountState:
    """What the mount is doing and why (``starting``, ``active``, ``offline-grace``,
    ``suspended``, ``stopping``) and what the watcher last saw of the vault; every change
    of state is shown in the process title and told to systemd. Thread-safe."""

    def __init__(self, mountpoint: Path) -> None:
        self._lock = threading.Lock()
        self._mountpoint = mountpoint
        self.name = "starting"
        self.reason = ""
        self.since = time.time()
        self.last_check: float | None = None
        self.last_error = ""
        self.vault_reachable: bool | None = None
        self.vault_node = ""
        """The vault address that answered the last successful check."""
        self.last_check_duration: float | None = None
        self.checks = 0
        self.check_failures = 0
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

    def checked(self, *, reachable: bool, error: str = "", node: str = "") -> None:
        """Record what the vault last said (a check, or a failed token renewal); ``node``
        is the address that answered a check that succeeded."""
        with self._lock:
            self.last_check = time.time()
            self.vault_reachable = reachable
            self.last_error = error
            if node:
                self.vault_node = node

    def check_done(self, duration: float, *, ok: bool) -> None:
        """Count one check of the watcher and how long it took (``ok``: the vault said
        the host may read the volume)."""
        with self._lock:
            self.checks += 1
            self.check_failures += not ok
            self.last_check_duration = duration

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            ttl = None
            if self.token_expires is not None:
                ttl = max(0, int(self.token_expires - time.time()))
            return {
                "state": self.name,
                "since": iso_utc(self.since),
                "since_time": self.since,
                "reason": self.reason,
                "vault_reachable": self.vault_reachable,
                "vault_node": self.vault_node,
                "last_check": iso_utc(self.last_check),
                "last_check_time": self.last_check,
                "last_check_duration": self.last_check_duration,
                "checks": self.checks,
                "check_failures": self.check_failures,
                "last_error": self.last_error,
                "token": {**self.token, "ttl": ttl},
            }


def note_identity(
    vault: KeyWrapper, audit: AuditLog, state: MountState, *, warn: bool
) -> float | None:
    """Look up who we are to the vault (for audit and status); returns when to renew
    the credential, or None when it does not expire. With ``warn``, a token that cannot be
    renewed is logged as a warning."""
    try:
        ident = vault.identity()
    except VaultError as exc:  # e.g. a policy without lookup-self: not fatal
        log.info("cannot look up the host's vault identity: %s", exc)
        ident = {}
    audit.bind(identity=ident.get("accessor") or ident.get("client_cert_subject"))
    renew_in: float | None = None
    ttl = ident.get("ttl")
    keep = ("accessor", "renewable", "policies", "display_name", "client_cert_subject")
    state.token = {k: ident[k] for k in keep if k in ident}
    state.token_expires = time.time() + ttl if isinstance(ttl, int) and ttl else None
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


class KeyWatcher:
    """Checks, every ``check_interval`` seconds, that the vault still unwraps the volume
    key (``held``; None for an ephemeral volume: then that the vault key may still be
    used), renews the host token, and drives suspend / offline grace / resume (module
    docstring). One thread; every transition is logged once, not at every poll. Owns
    ``vault`` from construction on (``close``)."""

    def __init__(
        self,
        control: MountControl,
        state: MountState,
        vault: KeyWrapper,
        *,
        url: str,
        vault_settings: VaultSettings,
        settings: WatchSettings,
        audit: AuditLog,
        held: HeldHeader | None,
        renew_in: float | None,
    ) -> None:
        self._control = control
        self._state = state
        self._vault = vault
        self._url = url
        self._vault_settings = vault_settings
        self._settings = settings
        self._audit = audit
        self._held = held
        self._stop = threading.Event()
        self._rng = random.Random()
        self._thread = threading.Thread(target=self._run, name="encfs-watcher", daemon=True)
        now = time.monotonic()
        self._next_renew = now + renew_in if renew_in is not None else math.inf
        self._unreachable_since: float | None = None
        self._last_error_kind = ""
        self._header_unreadable = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (waits up to 10 s for a check in flight)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def close(self) -> None:
        """Close the vault client (the one reconnected to last)."""
        self._vault.close()

    def _wait(self, *, first: bool = False) -> float:
        """Seconds until the next check: the interval shortened by up to ``jitter`` of it
        at random; the first one anywhere in (0, interval] (``WatchSettings.jitter``)."""
        interval, jitter = self._settings.check_interval, self._settings.jitter
        if first and jitter > 0:
            return interval * (1.0 - self._rng.random())
        return interval * (1.0 - jitter * self._rng.random())

    def _run(self) -> None:
        next_check = time.monotonic() + self._wait(first=True)
        while True:
            wait = min(next_check, self._next_renew) - time.monotonic()
            if self._stop.wait(max(wait, 0.0)):
                return
            try:
                now = time.monotonic()
                if now >= self._next_renew:
                    self._renew()
                if now >= next_check:
                    started = time.monotonic()
                    ok = self._check()
                    self._state.check_done(time.monotonic() - started, ok=ok)
                    next_check = time.monotonic() + self._wait()
            except Exception:  # never let the watcher die silently
                log.exception("key watcher step failed")
                next_check = time.monotonic() + self._wait()

    def _renew(self) -> None:
        try:
            delay = self._vault.renew_identity()
        except VaultError as exc:
            self._next_renew = time.monotonic() + 10.0
            self._failed(exc, "token_renew")
            return
        self._audit.event("token_renew", next_in=delay)
        self._next_renew = time.monotonic() + delay if delay is not None else math.inf
        if delay is not None:
            self._state.token_expires = time.time() + 2 * delay

    def _check(self) -> bool:
        """One check; True when the vault said the host may read the volume (and it is
        the volume in use)."""
        held = self._held
        if held is None:  # ephemeral, no wrapped key: may the host still use the KEK?
            try:
                self._vault.key_status()
            except VaultError as exc:
                self._failed(exc, "key_status")
                return False
            self._succeeded()
            return True
        control = self._control
        if control.suspended:
            self._reconnect()  # a replaced token file or fixed policy counts from now
        current = held.header
        hf = self._header_to_check(held)
        try:
            volume_key = self._vault.unwrap(hf.header.wrapped_key)
        except VaultError as exc:
            self._failed(exc, "unwrap")
            return False
        try:
            ours = hf.header.volume_id == current.header.volume_id and held.ours(
                key_check_value(volume_key, current.header.volume_id)
            )
            if not ours:
                # The header names a key the host may unwrap, but not the volume's: a
                # substituted header. Fail closed until the real one is back.
                self._audit.event("vault_error", result="error", error="VolumeMismatch")
                self._suspend(
                    f"the volume header at {hf.path} wraps another volume key than the one "
                    "in use (substituted header?)",
                    revoked=False,
                )
                return False
            if control.suspended:
                try:
                    self._resume(volume_key, hf)
                except VaultError as exc:
                    self._failed(exc, "unwrap")
                    return False
                except EncfsError as exc:
                    log.error("cannot resume: %s", exc)
                    return False
                held.header = hf
                self._next_renew = time.monotonic()  # learn the (maybe new) token's TTL
                self._note_identity()
            elif hf is not current:
                try:
                    control.verify_header(hf)
                except EncfsError as exc:
                    log.error("the volume header on disk does not verify: %s", exc)
                else:
                    held.header = hf  # e.g. `encfs rotate`: the new wrapping is ours
        finally:
            volume_key[:] = bytes(len(volume_key))
        self._succeeded()
        return True

    def _resume(self, volume_key: bytearray, hf: volume.HeaderFile) -> None:
        """Resume with ``volume_key`` and, while a rekey is under way, the retiring key(s)
        of ``hf`` (unwrapped here, wiped after). Raises ``EncfsError``."""
        retiring: list[bytearray] = []
        try:
            for slot in hf.header.retiring:
                retiring.append(self._vault.unwrap(slot.wrapped_key))
            self._control.resume(volume_key, hf, retiring)
        finally:
            for old_key in retiring:
                old_key[:] = bytes(len(old_key))

    def _header_to_check(self, held: HeldHeader) -> volume.HeaderFile:
        """The header whose wrapped key this check unwraps: the one on disk when it differs
        from the one held (``encfs rotate`` moved it on), else the one held since mount —
        also when the file is gone or unreadable, so that hiding it skips no check."""
        try:
            disk = volume.read_header(held.cipher_dir)
        except (FormatError, OSError) as exc:
            if not self._header_unreadable:
                log.warning(
                    "cannot read the volume header (%s); checking the wrapped key held since mount",
                    exc,
                )
            self._header_unreadable = True
            return held.header
        self._header_unreadable = False
        if disk.body == held.header.body and disk.tag == held.header.tag:
            return held.header
        return disk

    def _note_identity(self) -> None:
        renew_in = note_identity(self._vault, self._audit, self._state, warn=False)
        self._next_renew = time.monotonic() + renew_in if renew_in is not None else math.inf

    def _reconnect(self) -> None:
        try:
            fresh = connect(self._url, self._vault_settings)
        except VaultError as exc:
            log.debug("cannot reconnect to the vault: %s", exc)
            return
        self._vault.close()
        self._vault = fresh

    def _suspend(self, reason: str, *, revoked: bool) -> None:
        unmount = revoked and self._settings.on_revoke == "unmount"
        self._control.suspend(reason, revoked=revoked, unmount=unmount)

    def _succeeded(self) -> None:
        state = self._state
        state.checked(reachable=True, node=self._vault.serving)
        if self._unreachable_since is not None:
            log.warning("vault reachable again")
        self._unreachable_since = None
        self._last_error_kind = ""
        if state.name == "offline-grace":
            state.set("active")

    def _failed(self, exc: VaultError, what: str) -> None:
        state, grace = self._state, self._settings.offline_grace
        kind = type(exc).__name__
        if kind != self._last_error_kind:
            self._audit.error("vault_error", exc, during=what)
            self._last_error_kind = kind
        if exc.revoked:
            state.checked(reachable=True, error=str(exc))
            self._unreachable_since = None
            self._suspend(f"access revoked ({kind}): {exc}", revoked=True)
            return
        state.checked(reachable=False, error=str(exc))
        now = time.monotonic()
        if self._unreachable_since is None:
            self._unreachable_since = now
            if grace > 0 and state.name == "active":
                log.warning("%s; serving on for the offline grace of %.0f s", exc, grace)
        if state.name == "suspended":
            return
        if now - self._unreachable_since >= grace:
            self._suspend(
                f"vault unreachable for {now - self._unreachable_since:.0f} s "
                f"(offline grace {grace:.0f} s): {exc}",
                revoked=False,
            )
        else:
            state.set("offline-grace", f"vault unreachable: {exc}")
