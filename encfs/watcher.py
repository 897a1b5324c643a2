"""The key watcher: every few seconds, may this host still read the volume? Suspend or resume.

While a volume is mounted, a ``KeyWatcher`` thread unwraps the volume key with the vault
every ``check_interval`` seconds (a real unwrap: the authoritative answer to "may this host
still read the volume?"; for an ephemeral volume, which has no wrapped key, the status of
the vault key) and renews the host token before it expires:

    active ──(refused: 403, key deleted/disabled, version retired)──▶ suspended
    active ──(unreachable, sealed)──▶ offline-grace ──(grace over)──▶ suspended
    suspended / offline-grace ──(unwrap works again)──▶ active

A double-encrypted volume has two KEKs, each in its own vault with its own credential:
every check unwraps both. Either refused suspends; either unreachable (and neither
refused) starts the offline grace; the mount is active again only once both unwrap.

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
        self,
        volume_keys: Sequence[bytearray],
        hf: volume.HeaderFile,
        retiring: Sequence[bytearray] = (),
    ) -> None:
        """Serve again with ``volume_keys`` (freshly unwrapped from ``hf``, in key slot
        order: one, or two for a double volume; the caller wipes its copies) and, while a
        rekey is under way, the retiring keys of ``hf`` (same order); enter
        ``active``. Raises ``EncfsError`` if ``hf``'s tag does not verify under them (the
        mount stays suspended)."""
        ...

    def verify_header(self, hf: volume.HeaderFile) -> None:
        """Raise ``EncfsError`` unless ``hf``'s tag verifies under the keys in use."""
        ...


class HeldHeader:
    """The wrapped key(s) a mount checks: the header as last checked (read at mount,
    replaced by the watcher when a rotation is seen; it unwraps this one when the file on
    disk is gone or unreadable) and the check value of each volume key in use. The
    watcher replaces ``header`` when it sees a rotation; a rekey (``encfs rekey``)
    announces the new keys' check values in ``coming`` before its header names them, then
    installs both (``rekeyed``)."""

    def __init__(
        self, cipher_dir: Path, header: volume.HeaderFile, check_values: tuple[bytes, ...]
    ) -> None:
        self.cipher_dir = cipher_dir
        self.header = header
        self.check_values = check_values
        """``keys.key_check_value`` of each volume key in use, in key slot order."""
        self.coming: tuple[bytes, ...] | None = None
        """The check values of the keys a rekey is about to make current, until it does."""

    @property
    def check_value(self) -> bytes:
        """Key slot 0's check value."""
        return self.check_values[0]

    def ours(self, check_values: tuple[bytes, ...]) -> bool:
        """Whether ``check_values`` (slot order) are the volume keys' (in use, or coming
        from a rekey)."""
        return _same(check_values, self.check_values) or (
            self.coming is not None and _same(check_values, self.coming)
        )

    def announce(self, check_values: tuple[bytes, ...]) -> None:
        """A rekey is about to write a header naming the keys of ``check_values``."""
        self.coming = check_values

    def rekeyed(self, header: volume.HeaderFile, check_values: tuple[bytes, ...]) -> None:
        """A rekey made ``header`` the one in place, and the keys of ``check_values`` the
        ones in use."""
        self.header = header
        self.check_values = check_values
        self.coming = None


def _same(a: tuple[bytes, ...], b: tuple[bytes, ...]) -> bool:
    return len(a) == len(b) and all(hmac.compare_digest(x, y) for x, y in zip(a, b, strict=True))


class MountState:
    """What the mount is doing and why (``starting``, ``active``, ``offline-grace``,
    ``suspended``, ``stopping``) and what the watcher last saw of each vault key (KEK);
    every change of state — of the mount, or of one KEK of a double volume — is shown in
    the process title and told to systemd (``STATUS=``). Thread-safe."""

    def __init__(self, mountpoint: Path) -> None:
        self._lock = threading.Lock()
        self._mountpoint = mountpoint
        self.name = "starting"
        self.reason = ""
        self.since = time.time()
        self.last_check: float | None = None
        self.keks: list[dict[str, Any]] = []
        """Per KEK (key slot order) of a volume with a vault: ``kek`` (1, 2), ``vault``,
        ``kek_version``, ``state`` (``ok``, ``revoked``, ``unreachable`` or None before
        the first check), ``reachable``, ``last_error``, ``token``."""
        self.vault_node = ""
        """The vault address that answered KEK 1's last successful check."""
        self.last_check_duration: float | None = None
        self.checks = 0
        self.check_failures = 0
        self.token: dict[str, Any] = {}
        self.token_expires: float | None = None

    def add_kek(self, kek: int, vault: str, kek_version: int) -> None:
        """Declare KEK ``kek`` (1, or 2 for a double volume) the mount depends on: its
        vault and the KEK version that wraps its volume key."""
        with self._lock:
            self._entry(kek).update(vault=vault, kek_version=kek_version)

    def _entry(self, kek: int) -> dict[str, Any]:
        """Caller holds ``_lock``: KEK ``kek``'s entry, made (undeclared) if missing."""
        while len(self.keks) < kek:
            self.keks.append(
                {
                    "kek": len(self.keks) + 1,
                    "vault": "",
                    "kek_version": 0,
                    "state": None,
                    "reachable": None,
                    "last_error": "",
                    "token": {},
                    "token_expires": None,
                }
            )
        return self.keks[kek - 1]

    def set(self, name: str, reason: str = "") -> bool:
        """Enter state ``name``; returns False (and does nothing) if already in it."""
        with self._lock:
            if name == self.name:
                self.reason = reason or self.reason
                return False
            self.name, self.reason, self.since = name, reason, time.time()
        self._announce()
        return True

    def _announce(self) -> None:
        """The process title (``encfs MOUNTPOINT [state: reason]``) and systemd's
        ``STATUS=`` line, which for a double volume starts with each KEK's version and
        state (``[KEK 1 v3 ok, KEK 2 v1 revoked] suspended: ...``)."""
        with self._lock:
            suffix = f": {self.reason}" if self.reason else ""
            line = f"{self.name}{suffix}"
            status = f"[{self._kek_summary()}] {line}" if len(self.keks) > 1 else line
        setproctitle.setproctitle(f"encfs {self._mountpoint} [{line}]")
        sdnotify.notify(status=status[:400])

    def _kek_summary(self) -> str:
        """Caller holds ``_lock``: e.g. ``KEK 1 v3 ok, KEK 2 v1 revoked``."""
        return ", ".join(
            f"KEK {k['kek']} v{k['kek_version']} {k['state'] or 'unchecked'}" for k in self.keks
        )

    def checked(
        self,
        *,
        reachable: bool,
        error: str = "",
        kek: int = 1,
        state: str = "",
        node: str = "",
    ) -> None:
        """Record the outcome of one check of KEK ``kek``: ``state`` ``ok``, ``revoked`` or
        ``unreachable`` (derived from ``reachable`` and ``error`` when not given); ``node``
        is the address that answered a check that succeeded."""
        state = state or (
            "ok" if reachable and not error else "revoked" if reachable else "unreachable"
        )
        changed = False
        with self._lock:
            self.last_check = time.time()
            if node and kek == 1:
                self.vault_node = node
            entry = self._entry(kek)
            changed = entry["state"] != state
            entry.update(reachable=reachable, last_error=error, state=state)
        if changed and len(self.keks) > 1:
            self._announce()

    def kek_version(self, kek: int, version: int) -> None:
        """KEK ``kek`` now wraps the volume key at ``version`` (a rotation was adopted)."""
        with self._lock:
            entry = self._entry(kek)
            changed = entry["kek_version"] != version
            entry["kek_version"] = version
        if changed and len(self.keks) > 1:
            self._announce()

    def kek_token(self, kek: int, token: dict[str, Any], expires: float | None) -> None:
        """What the vault of KEK ``kek`` says about the host's identity (``note_identity``)."""
        with self._lock:
            if kek == 1:
                self.token, self.token_expires = token, expires
            self._entry(kek).update(token=token, token_expires=expires)

    def token_renewed(self, kek: int, expires: float) -> None:
        """The credential of KEK ``kek`` was renewed and now expires at ``expires``."""
        with self._lock:
            if kek == 1:
                self.token_expires = expires
            self._entry(kek)["token_expires"] = expires

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
            keks = []
            for k in self.keks:
                entry = {key: value for key, value in k.items() if key != "token_expires"}
                expires = k.get("token_expires")
                entry["token"] = {
                    **k["token"],
                    "ttl": None if expires is None else max(0, int(expires - time.time())),
                }
                keks.append(entry)
            reach = [k["reachable"] for k in self.keks]
            errors = [
                k["last_error"] if len(self.keks) == 1 else f"KEK {k['kek']}: {k['last_error']}"
                for k in self.keks
                if k["last_error"]
            ]
            return {
                "state": self.name,
                "since": iso_utc(self.since),
                "since_time": self.since,
                "reason": self.reason,
                "vault_reachable": None if None in reach or not reach else all(reach),
                "vault_node": self.vault_node,
                "last_check": iso_utc(self.last_check),
                "last_check_time": self.last_check,
                "last_check_duration": self.last_check_duration,
                "checks": self.checks,
                "check_failures": self.check_failures,
                "last_error": "; ".join(errors),
                "token": {**self.token, "ttl": ttl},
                "keks": keks,
            }


def note_identity(
    vault: KeyWrapper, audit: AuditLog, state: MountState, *, warn: bool, kek: int = 1
) -> float | None:
    """Look up who we are to the vault of KEK ``kek`` (for audit and status); returns when
    to renew the credential, or None when it does not expire. With ``warn``, a token that
    cannot be renewed is logged as a warning. KEK 1's identity is carried by every audit
    event (``identity``), KEK 2's as ``identity2``."""
    try:
        ident = vault.identity()
    except VaultError as exc:  # e.g. a policy without lookup-self: not fatal
        log.info("cannot look up the host's vault identity: %s", exc)
        ident = {}
    who = ident.get("accessor") or ident.get("client_cert_subject")
    audit.bind(**{"identity" if kek == 1 else f"identity{kek}": who})
    renew_in: float | None = None
    ttl = ident.get("ttl")
    keep = ("accessor", "renewable", "policies", "display_name", "client_cert_subject")
    state.kek_token(
        kek,
        {k: ident[k] for k in keep if k in ident},
        time.time() + ttl if isinstance(ttl, int) and ttl else None,
    )
    if isinstance(ttl, int) and ttl > 0:
        if ident.get("renewable"):
            renew_in = max(ttl / 2.0, 1.0)
        else:
            if warn:
                log.warning(
                    "the vault token%s is not renewable and expires in %d s; after that "
                    "the vault will refuse this host (issue a renewable or periodic token)",
                    f" of KEK {kek}" if kek > 1 else "",
                    ttl,
                )
            renew_in = float(ttl)
    return renew_in


@dataclass(frozen=True)
class VaultLink:
    """How the watcher reaches the vault of one KEK: the client in use (the watcher owns
    it from then on), the URL and settings to reconnect with, and seconds until its
    credential needs renewing (None: it does not expire)."""

    vault: KeyWrapper
    url: str
    settings: VaultSettings
    renew_in: float | None


def _detached(exc: VaultError) -> VaultError:
    """``exc`` without its traceback and chained exceptions: kept past its ``except``
    block, they would hold the frames of the call — and the vault client in them, with
    its host token in a locked page — alive in a reference cycle until the garbage
    collector ran, where a replaced client must be freed (and its page unmapped) at once."""
    exc.__traceback__ = None
    exc.__context__ = None
    exc.__cause__ = None
    return exc


class _Kek:
    """The watcher's view of one KEK: its vault client (replaced on reconnect), when its
    credential is renewed next, the last error kind audited. Watcher thread only."""

    def __init__(self, number: int, link: VaultLink, now: float) -> None:
        self.number = number
        """1 for key slot 0, 2 for key slot 1."""
        self.vault = link.vault
        self.url = link.url
        self.settings = link.settings
        self.next_renew = now + link.renew_in if link.renew_in is not None else math.inf
        self.last_error_kind = ""


class KeyWatcher:
    """Checks, every ``check_interval`` seconds, that the vault still unwraps the volume
    key (``held``; None for an ephemeral volume: then that the vault key may still be
    used) — and with ``second``, that the second vault unwraps the outer key of a double
    volume too —, renews each host credential, and drives suspend / offline grace /
    resume (module docstring). One thread; every transition is logged once, not at every
    poll. Owns every vault client from construction on (``close``)."""

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
        second: VaultLink | None = None,
    ) -> None:
        self._control = control
        self._state = state
        self._settings = settings
        self._audit = audit
        self._held = held
        self._stop = threading.Event()
        self._rng = random.Random()
        self._thread = threading.Thread(target=self._run, name="encfs-watcher", daemon=True)
        now = time.monotonic()
        self._keks = [_Kek(1, VaultLink(vault, url, vault_settings, renew_in), now)]
        if second is not None:
            self._keks.append(_Kek(2, second, now))
        self._unreachable_since: float | None = None
        self._header_unreadable = False

    @property
    def _double(self) -> bool:
        return len(self._keks) > 1

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (waits up to 10 s for a check in flight)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def close(self) -> None:
        """Close the vault clients (the ones reconnected to last)."""
        for kek in self._keks:
            kek.vault.close()

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
            next_renew = min(kek.next_renew for kek in self._keks)
            wait = min(next_check, next_renew) - time.monotonic()
            if self._stop.wait(max(wait, 0.0)):
                return
            try:
                now = time.monotonic()
                for kek in self._keks:
                    if now >= kek.next_renew:
                        self._renew(kek)
                if now >= next_check:
                    started = time.monotonic()
                    ok = self._check()
                    self._state.check_done(time.monotonic() - started, ok=ok)
                    next_check = time.monotonic() + self._wait()
            except Exception:  # never let the watcher die silently
                log.exception("key watcher step failed")
                next_check = time.monotonic() + self._wait()

    def _kek_fields(self, kek: _Kek) -> dict[str, Any]:
        """What audit events about one KEK of a double volume add (nothing for a single)."""
        return {"kek": kek.number, "vault": kek.url} if self._double else {}

    def _renew(self, kek: _Kek) -> None:
        try:
            delay = kek.vault.renew_identity()
        except VaultError as exc:
            kek.next_renew = time.monotonic() + 10.0
            self._failed({kek.number: self._marked(_detached(exc), kek)}, "token_renew")
            return
        self._audit.event("token_renew", next_in=delay, **self._kek_fields(kek))
        kek.next_renew = time.monotonic() + delay if delay is not None else math.inf
        if delay is not None:
            self._state.token_renewed(kek.number, time.time() + 2 * delay)

    def _marked(self, exc: VaultError, kek: _Kek) -> VaultError:
        """``exc`` marked with its KEK when the volume has two."""
        return exc.for_kek(kek.number) if self._double else exc

    def _check(self) -> bool:
        """One check; True when the vault said the host may read the volume (and it is
        the volume in use)."""
        held = self._held
        if held is None:  # ephemeral, no wrapped key: may the host still use the KEK?
            kek = self._keks[0]
            try:
                kek.vault.key_status()
            except VaultError as exc:
                self._failed({1: _detached(exc)}, "key_status")
                return False
            self._succeeded()
            return True
        control = self._control
        if control.suspended:
            for kek in self._keks:
                self._reconnect(kek)  # a replaced token file or fixed policy counts from now
        current = held.header
        hf = self._header_to_check(held)
        volume_keys: dict[int, bytearray] = {}
        failures: dict[int, VaultError] = {}
        try:
            slots = hf.header.slots
            for kek in self._keks:
                if kek.number > len(slots):  # a header without this KEK's slot: not ours
                    continue
                try:
                    volume_keys[kek.number] = kek.vault.unwrap(slots[kek.number - 1].wrapped_key)
                except VaultError as exc:
                    failures[kek.number] = self._marked(_detached(exc), kek)
            if failures:
                self._failed(failures, "unwrap")
                return False
            for kek in self._keks:  # every KEK answered: shown before any transition
                self._state.checked(reachable=True, kek=kek.number)
            ours = hf.header.volume_id == current.header.volume_id and held.ours(
                tuple(
                    key_check_value(volume_keys[n], current.header.volume_id, slot=n - 1)
                    for n in sorted(volume_keys)
                )
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
                    self._resume([volume_keys[n] for n in sorted(volume_keys)], hf)
                except VaultError as exc:
                    self._failed({1: _detached(exc)}, "unwrap")
                    return False
                except EncfsError as exc:
                    log.error("cannot resume: %s", exc)
                    return False
                held.header = hf
                self._adopted(hf)
                for kek in self._keks:
                    kek.next_renew = time.monotonic()  # learn the (maybe new) token's TTL
                    self._note_identity(kek)
            elif hf is not current:
                try:
                    control.verify_header(hf)
                except EncfsError as exc:
                    log.error("the volume header on disk does not verify: %s", exc)
                else:
                    held.header = hf  # e.g. `encfs rotate`: the new wrapping is ours
                    self._adopted(hf)
        finally:
            for key in volume_keys.values():
                key[:] = bytes(len(key))
        self._succeeded()
        return True

    def _resume(self, volume_keys: list[bytearray], hf: volume.HeaderFile) -> None:
        """Resume with ``volume_keys`` and, while a rekey is under way, the retiring keys of
        ``hf`` (unwrapped here by each KEK's vault, wiped after). Raises ``EncfsError``."""
        retiring: list[bytearray] = []
        try:
            for kek, slot in zip(self._keks, hf.header.retiring, strict=False):
                retiring.append(kek.vault.unwrap(slot.wrapped_key))
            self._control.resume(volume_keys, hf, retiring)
        finally:
            for old_key in retiring:
                old_key[:] = bytes(len(old_key))

    def _adopted(self, hf: volume.HeaderFile) -> None:
        """Show the KEK versions of the header now held."""
        for index, slot in enumerate(hf.header.slots[: len(self._keks)]):
            self._state.kek_version(index + 1, slot.kek_version)

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

    def _note_identity(self, kek: _Kek) -> None:
        renew_in = note_identity(kek.vault, self._audit, self._state, warn=False, kek=kek.number)
        kek.next_renew = time.monotonic() + renew_in if renew_in is not None else math.inf

    def _reconnect(self, kek: _Kek) -> None:
        try:
            fresh = connect(kek.url, kek.settings)
        except VaultError as exc:
            log.debug("cannot reconnect to the vault of KEK %d: %s", kek.number, exc)
            return
        kek.vault.close()
        kek.vault = fresh

    def _suspend(self, reason: str, *, revoked: bool) -> None:
        unmount = revoked and self._settings.on_revoke == "unmount"
        self._control.suspend(reason, revoked=revoked, unmount=unmount)

    def _succeeded(self) -> None:
        state = self._state
        for kek in self._keks:
            state.checked(reachable=True, kek=kek.number, node=kek.vault.serving)
            kek.last_error_kind = ""
        if self._unreachable_since is not None:
            log.warning("vault reachable again")
        self._unreachable_since = None
        if state.name == "offline-grace":
            state.set("active")

    def _failed(self, failures: dict[int, VaultError], what: str) -> None:
        """React to the errors of this check, by KEK number: any revocation suspends; else
        the KEKs that cannot be reached start or continue the offline grace. A KEK that
        answered is recorded as fine."""
        state, grace = self._state, self._settings.offline_grace
        for kek in self._keks:
            exc = failures.get(kek.number)
            if exc is None:
                state.checked(reachable=True, kek=kek.number)
                kek.last_error_kind = ""
                continue
            kind = type(exc).__name__
            if kind != kek.last_error_kind:
                self._audit.error("vault_error", exc, during=what, **self._kek_fields(kek))
                kek.last_error_kind = kind
            state.checked(reachable=exc.revoked, error=str(exc), kek=kek.number)
        revoked = [exc for exc in failures.values() if exc.revoked]
        if revoked:
            self._unreachable_since = None
            exc = revoked[0]
            self._suspend(f"access revoked ({type(exc).__name__}): {exc}", revoked=True)
            return
        exc = next(iter(failures.values()))
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
