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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from encfs import volume
from encfs.audit import AuditLog, AuditSettings
from encfs.errors import VolumeSuspended
from encfs.keys import VolumeKeys
from encfs.vault import VaultSettings, connect
from encfs.watcher import HeldHeader, KeyWatcher, MountState, WatchSettings
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

    def resume(self, volume_keys: Sequence[bytearray], hf: volume.HeaderFile) -> None:
        self.keys.load(volume_keys[0], volume_keys[1] if len(volume_keys) > 1 else None)
        try:
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

    def new_token(self) -> None:
        self.token = self.bao.make_token([self.policy])
        _write_token(self.token_file, self.token)

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
    """``watch(bao, key, settings, ephemeral=False)``: a volume made with a host token
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
    ) -> Watched:
        policy = bao.write_host_policy(key)
        token = bao.make_token([policy])
        token_file = tmp_path / f"host-{len(started)}.token"
        _write_token(token_file, token)
        url = bao.url_for(key)
        vault_settings = VaultSettings(token_file=token_file, timeout=5)
        vault = connect(url, vault_settings)
        cipher_dir = tmp_path / f"cipher-{len(started)}"
        held: HeldHeader | None = None
        if ephemeral:
            _, keys = volume.start_ephemeral(cipher_dir)
        else:
            volume.create(cipher_dir, vault)
            hf = volume.read_header(cipher_dir)
            keys = volume.unlock(hf, vault)
            held = HeldHeader(cipher_dir, hf, keys.check_values())
        state = MountState(tmp_path / "mnt")
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
        )
        w = Watched(bao, key, cipher_dir, token_file, policy, token, control, state, held, watcher)
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
