"""The key watcher against a real OpenBao, without FUSE: a revoked token suspends and a
fresh one resumes, ``--on-revoke unmount`` asks for the unmount (a lost vault does not), a
rotated header is adopted, a substituted header fails closed, an unreachable vault gets its
grace, and an ephemeral volume watches the status of its key.

The watcher drives a ``MountControl``; here that is ``KeysOnly``, which suspends by wiping
real ``VolumeKeys`` and resumes by loading the freshly unwrapped key and verifying the
header under it — what the mount does, minus the kernel.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from encfs import volume
from encfs.audit import AuditLog, AuditSettings
from encfs.errors import VolumeSuspended
from encfs.keys import VolumeKeys
from encfs.vault import VaultSettings, connect, second_vault_settings
from encfs.watcher import HeldHeader, KeyWatcher, MountState, VaultLink, WatchSettings
from tests.conftest import TransitKey
from tests.harness import wait_until
from tests.openbao import OpenBao

INTERVAL = 0.2
WATCH = WatchSettings(check_interval=INTERVAL)


class KeysOnly:
    """A ``MountControl`` over real keys and no FUSE; records every call."""

    def __init__(self, keys: VolumeKeys, state: MountState) -> None:
        self.keys = keys
        self._state = state
        self._suspended = False
        self.calls: list[tuple[object, ...]] = []

    @property
    def suspended(self) -> bool:
        return self._suspended

    def suspend(self, reason: str, *, revoked: bool, unmount: bool) -> None:
        if self._suspended:
            return
        self.keys.wipe()
        self._suspended = True
        self._state.set("suspended", reason)
        self.calls.append(("suspend", reason, revoked, unmount))

    def resume(
        self,
        volume_keys: Sequence[bytearray],
        hf: volume.HeaderFile,
        retiring: Sequence[bytearray] = (),
    ) -> None:
        self.keys.load(volume_keys[0], volume_keys[1] if len(volume_keys) > 1 else None)
        try:
            if retiring:
                self.keys.load_retiring(retiring[0], retiring[1] if len(retiring) > 1 else None)
            self.keys.verify_header(hf.body, hf.tag)
        except BaseException:
            self.keys.wipe()
            raise
        self._suspended = False
        self._state.set("active")
        self.calls.append(("resume", hf.header.kek_version))

    def verify_header(self, hf: volume.HeaderFile) -> None:
        self.keys.verify_header(hf.body, hf.tag)
        self.calls.append(("verify", hf.header.kek_version))


@dataclass
class Kek2:
    """KEK 2 of a watched double volume: its vault, key, token file, policy and token."""

    bao: OpenBao
    key: str
    token_file: Path
    policy: str
    token: str

    def new_token(self) -> None:
        self.token = self.bao.make_token([self.policy])
        _write_token(self.token_file, self.token)


@dataclass
class Watched:
    """A volume in ``cipher_dir`` whose keys a running ``KeyWatcher`` checks."""

    bao: OpenBao
    key: str
    cipher_dir: Path
    token_file: Path
    policy: str
    token: str
    control: KeysOnly
    state: MountState
    held: HeldHeader | None
    watcher: KeyWatcher
    kek2: Kek2 | None = None

    def new_token(self) -> None:
        self.token = self.bao.make_token([self.policy])
        _write_token(self.token_file, self.token)

    def kek_states(self) -> list[object]:
        return [k["state"] for k in self.state.snapshot()["keks"]]

    def suspensions(self) -> list[tuple[object, ...]]:
        return [call for call in self.control.calls if call[0] == "suspend"]


def _write_token(path: Path, token: str) -> None:
    tmp = path.with_suffix(".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)


WatchFactory = Callable[..., Watched]


@pytest.fixture
def watch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WatchFactory]:
    """``watch(bao, key, settings, ephemeral=False, state=None)``: a volume made with a host token
    (least privilege), unlocked, and a watcher started on it; stopped at teardown."""
    for var in ("VAULT_TOKEN", "BAO_TOKEN", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    started: list[Watched] = []

    def make(
        bao: OpenBao,
        key: str,
        settings: WatchSettings = WATCH,
        *,
        ephemeral: bool = False,
        second: tuple[OpenBao, str] | None = None,
        state: MountState | None = None,
    ) -> Watched:
        """``second``: make a double-encrypted volume, KEK 2 that (vault, key), with its own
        least-privilege token."""
        policy = bao.write_host_policy(key)
        token = bao.make_token([policy])
        token_file = tmp_path / f"host-{len(started)}.token"
        _write_token(token_file, token)
        url = bao.url_for(key)
        vault_settings = VaultSettings(token_file=token_file, timeout=5)
        vault = connect(url, vault_settings)
        kek2: Kek2 | None = None
        link: VaultLink | None = None
        if second is not None:
            bao2, key2 = second
            bao2.create_key(key2)  # idempotent
            policy2 = bao2.write_host_policy(key2)
            kek2 = Kek2(bao2, key2, tmp_path / f"host2-{len(started)}.token", policy2, "")
            kek2.new_token()
            settings2 = second_vault_settings(
                vault_settings,
                token_file=kek2.token_file,
                ca_file=None,
                client_cert=None,
                client_key=None,
            )
            link = VaultLink(
                connect(bao2.url_for(key2), settings2), bao2.url_for(key2), settings2, None
            )
        cipher_dir = tmp_path / f"cipher-{len(started)}"
        held: HeldHeader | None = None
        if ephemeral:
            _, keys = volume.start_ephemeral(cipher_dir)
        else:
            outer = link.vault if link is not None else None
            volume.create(cipher_dir, vault, outer_vault=outer)
            hf = volume.read_header(cipher_dir)
            keys = volume.unlock(hf, vault, *([outer] if outer is not None else []))
            held = HeldHeader(cipher_dir, hf, keys.check_values())
        state = state or MountState(tmp_path / "mnt")
        state.set("active")
        control = KeysOnly(keys, state)
        watcher = KeyWatcher(
            control,
            state,
            vault,
            url=url,
            vault_settings=vault_settings,
            settings=settings,
            audit=AuditLog(AuditSettings()),
            held=held,
            renew_in=None,
            second=link,
        )
        w = Watched(
            bao, key, cipher_dir, token_file, policy, token, control, state, held, watcher, kek2
        )
        started.append(w)
        watcher.start()
        return w

    yield make
    for w in started:
        w.watcher.stop()
        w.watcher.close()
        w.control.keys.close()


def _wait(w: Watched, state: str, timeout: float = 10.0) -> None:
    assert wait_until(lambda: w.state.name == state, timeout=timeout), (
        f"not {state} after {timeout} s: {w.state.snapshot()}"
    )


@pytest.mark.parametrize("on_revoke", ["suspend", "unmount"])
def test_a_revoked_token_suspends_and_a_fresh_one_resumes(
    watch: WatchFactory, transit_key: TransitKey, on_revoke: str
) -> None:
    w = watch(transit_key.bao, transit_key.name, WatchSettings(INTERVAL, on_revoke=on_revoke))
    assert w.held is not None
    check_value = w.held.check_value
    w.bao.revoke_token(w.token)
    _wait(w, "suspended")
    [(_, reason, revoked, unmount)] = w.suspensions()
    assert "access revoked" in str(reason)
    assert revoked is True
    assert unmount is (on_revoke == "unmount")
    with pytest.raises(VolumeSuspended):
        w.control.keys.check_value()  # wiped
    if on_revoke == "unmount":
        return  # the mount would be gone now
    w.new_token()  # re-read while suspended: the watcher reconnects with it
    _wait(w, "active")
    assert ("resume", 1) in w.control.calls
    assert w.control.keys.check_value() == check_value
    assert len(w.suspensions()) == 1  # logged and acted on once, not at every poll


def test_a_rotated_header_is_adopted_while_serving(
    watch: WatchFactory, transit_key: TransitKey
) -> None:
    w = watch(transit_key.bao, transit_key.name)
    assert w.held is not None
    held = w.held
    w.bao.rotate_key(w.key)
    vault = connect(w.bao.url_for(w.key), VaultSettings(token_file=w.token_file, timeout=5))
    try:
        rotation = volume.rotate(w.cipher_dir, vault)
    finally:
        vault.close()
    assert rotation.changed and rotation.new_version == 2
    assert wait_until(lambda: held.header.header.kek_version == 2), "rotation not adopted"
    assert ("verify", 2) in w.control.calls
    assert not w.control.suspended
    assert w.state.name == "active"


def test_a_substituted_header_fails_closed_until_the_real_one_is_back(
    watch: WatchFactory, transit_key: TransitKey, tmp_path: Path
) -> None:
    """Another volume's header under the same key: the host may unwrap it, but it is not
    the key in use."""
    w = watch(transit_key.bao, transit_key.name)
    other = tmp_path / "other"
    vault = connect(w.bao.url_for(w.key), VaultSettings(token_file=w.token_file, timeout=5))
    try:
        volume.create(other, vault)
    finally:
        vault.close()
    header = volume.header_path(w.cipher_dir)
    real = header.read_bytes()
    shutil.copyfile(volume.header_path(other), header)
    _wait(w, "suspended")
    [(_, reason, revoked, unmount)] = w.suspensions()
    assert "substituted header" in str(reason)
    assert (revoked, unmount) == (False, False)
    header.write_bytes(real)
    _wait(w, "active")


def test_an_unreachable_vault_gets_its_grace_then_suspends_without_unmounting(
    watch: WatchFactory,
) -> None:
    with OpenBao() as bao:
        bao.create_key("k")
        w = watch(bao, "k", WatchSettings(INTERVAL, offline_grace=1.0, on_revoke="unmount"))
        bao.stop()
        _wait(w, "offline-grace")
        assert not w.control.suspended
        assert w.state.snapshot()["vault_reachable"] is False
        _wait(w, "suspended")
        [(_, reason, revoked, unmount)] = w.suspensions()
        assert "vault unreachable" in str(reason)
        assert (revoked, unmount) == (False, False)  # not a revocation: never unmounts


def test_an_ephemeral_volume_watches_its_key(watch: WatchFactory, transit_key: TransitKey) -> None:
    w = watch(transit_key.bao, transit_key.name, ephemeral=True)
    assert wait_until(lambda: w.state.last_check is not None), "never checked"
    assert not w.control.suspended
    w.bao.delete_key(w.key)
    _wait(w, "suspended")
    [(_, reason, revoked, _)] = w.suspensions()
    assert "access revoked" in str(reason)
    assert revoked is True


# --- double encryption: two KEKs, each checked every interval ------------------------------------


@pytest.mark.parametrize("kek", [1, 2])
def test_double_either_revoked_token_suspends_and_a_fresh_one_resumes(
    watch: WatchFactory, transit_key: TransitKey, kek: int
) -> None:
    w = watch(transit_key.bao, transit_key.name, second=(transit_key.bao, "kek2-" + str(kek)))
    assert w.held is not None and w.kek2 is not None
    assert wait_until(lambda: w.kek_states() == ["ok", "ok"]), w.state.snapshot()
    checks = w.held.check_values
    assert len(checks) == 2
    w.bao.revoke_token(w.token if kek == 1 else w.kek2.token)
    _wait(w, "suspended")
    [(_, reason, revoked, _)] = w.suspensions()
    assert f"KEK {kek}:" in str(reason) and revoked is True
    states = w.kek_states()
    assert states[kek - 1] == "revoked" and states[2 - kek] == "ok", states
    with pytest.raises(VolumeSuspended):
        w.control.keys.check_values()  # both keys wiped
    (w.new_token if kek == 1 else w.kek2.new_token)()
    _wait(w, "active")
    assert w.control.keys.check_values() == checks
    assert w.kek_states() == ["ok", "ok"]
    assert len(w.suspensions()) == 1


def test_double_resumes_only_when_both_keks_unwrap(
    watch: WatchFactory, transit_key: TransitKey
) -> None:
    w = watch(transit_key.bao, transit_key.name, second=(transit_key.bao, "kek2-both"))
    assert w.kek2 is not None
    w.bao.revoke_token(w.token)
    w.bao.revoke_token(w.kek2.token)
    _wait(w, "suspended")
    w.new_token()  # KEK 1 back, KEK 2 still refused
    assert wait_until(lambda: w.kek_states() == ["ok", "revoked"]), w.state.snapshot()
    time.sleep(3 * INTERVAL)
    assert w.state.name == "suspended" and w.control.suspended
    w.kek2.new_token()
    _wait(w, "active")


def test_double_second_vault_unreachable_gets_its_grace(
    watch: WatchFactory, transit_key: TransitKey
) -> None:
    """KEK 2 in a second OpenBao server: sealed, it is unreachable (not revoked): the
    grace, then a suspension that is no revocation; unsealed, both unwrap and it resumes."""
    with OpenBao() as bao2:
        bao2.create_key("outer")
        w = watch(
            transit_key.bao,
            transit_key.name,
            WatchSettings(INTERVAL, offline_grace=1.5, on_revoke="unmount"),
            second=(bao2, "outer"),
        )
        assert wait_until(lambda: w.kek_states() == ["ok", "ok"]), w.state.snapshot()
        bao2.seal()
        _wait(w, "offline-grace")
        assert w.kek_states() == ["ok", "unreachable"]
        assert w.state.snapshot()["vault_reachable"] is False
        assert not w.control.suspended
        _wait(w, "suspended")
        [(_, reason, revoked, unmount)] = w.suspensions()
        assert "vault unreachable" in str(reason) and "KEK 2" in str(reason)
        assert (revoked, unmount) == (False, False)
        bao2.unseal()
        _wait(w, "active")
        assert w.kek_states() == ["ok", "ok"]


def test_double_rotation_of_either_kek_is_adopted(
    watch: WatchFactory, transit_key: TransitKey
) -> None:
    w = watch(transit_key.bao, transit_key.name, second=(transit_key.bao, "kek2-rot"))
    assert w.held is not None and w.kek2 is not None
    held = w.held
    w.bao.rotate_key("kek2-rot")
    settings = VaultSettings(token_file=w.token_file, timeout=5)
    vaults = [
        connect(w.bao.url_for(w.key), settings),
        connect(
            w.bao.url_for("kek2-rot"),
            second_vault_settings(
                settings,
                token_file=w.kek2.token_file,
                ca_file=None,
                client_cert=None,
                client_key=None,
            ),
        ),
    ]
    try:
        rotation = volume.rotate(w.cipher_dir, *vaults, slots=[1])
    finally:
        for vault in vaults:
            vault.close()
    assert rotation.changed and rotation.header.slots[1].kek_version == 2
    assert wait_until(lambda: held.header.header.slots[1].kek_version == 2), "not adopted"
    assert not w.control.suspended
    assert [k["kek_version"] for k in w.state.snapshot()["keks"]] == [1, 2]


def test_double_slot_substituted_while_watched_fails_closed(
    watch: WatchFactory, transit_key: TransitKey, tmp_path: Path
) -> None:
    """Another double volume's header (the same two KEKs): slot by slot it unwraps, but
    neither key is the one in use."""
    w = watch(transit_key.bao, transit_key.name, second=(transit_key.bao, "kek2-sub"))
    assert w.kek2 is not None
    other = tmp_path / "other"
    settings = VaultSettings(token_file=w.token_file, timeout=5)
    vaults = [
        connect(w.bao.url_for(w.key), settings),
        connect(
            w.bao.url_for("kek2-sub"),
            second_vault_settings(
                settings,
                token_file=w.kek2.token_file,
                ca_file=None,
                client_cert=None,
                client_key=None,
            ),
        ),
    ]
    try:
        volume.create(other, vaults[0], outer_vault=vaults[1])
    finally:
        for vault in vaults:
            vault.close()
    header = volume.header_path(w.cipher_dir)
    real = header.read_bytes()
    shutil.copyfile(volume.header_path(other), header)
    _wait(w, "suspended")
    [(_, reason, revoked, _)] = w.suspensions()
    assert "substituted header" in str(reason) and revoked is False
    header.write_bytes(real)
    _wait(w, "active")


class Timed(MountState):
    """A ``MountState`` that notes when each check ended."""

    def __init__(self, mountpoint: Path) -> None:
        super().__init__(mountpoint)
        self.ends: list[float] = []

    def check_done(self, duration: float, *, ok: bool) -> None:
        super().check_done(duration, ok=ok)
        self.ends.append(time.monotonic())


def test_checks_are_jittered_and_never_later_than_the_interval(
    watch: WatchFactory, transit_key: TransitKey, tmp_path: Path
) -> None:
    """A fleet's checks must not fall in step on the vault, and the revocation bound (the
    interval + one check) must hold: each wait is the interval shortened at random by up
    to ``jitter`` of it, the first one anywhere in (0, interval]."""
    interval, jitter = 0.4, 0.5
    state = Timed(tmp_path / "mnt")
    started = time.monotonic()
    w = watch(
        transit_key.bao, transit_key.name, WatchSettings(interval, jitter=jitter), state=state
    )
    assert wait_until(lambda: len(state.ends) >= 14, timeout=20), state.ends
    slack = 0.25  # the check itself (an unwrap) and thread scheduling on a loaded machine
    assert state.ends[0] - started <= interval + slack
    gaps = [b - a for a, b in zip(state.ends, state.ends[1:], strict=False)]
    assert max(gaps) <= interval + slack, gaps
    assert min(gaps) >= interval * (1 - jitter) - 0.05, gaps
    assert max(gaps) - min(gaps) > 0.1, f"no spread: {gaps}"
    snap = w.state.snapshot()
    assert snap["checks"] >= 14 and snap["check_failures"] == 0
    assert snap["vault_node"] == transit_key.bao.addr
    assert 0 < snap["last_check_duration"] < 1
