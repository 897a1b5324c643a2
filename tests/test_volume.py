"""encfs/volume.py: crash-safe header replacement, header lookup, create and unlock.

create/unlock run against the real OpenBao dev server (tests/openbao.py) where they need a
vault; the refusals run with a fake wrapper that fails the test if it is ever called.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from encfs import backing, names, volume
from encfs import format as fmt
from encfs.errors import (
    FormatError,
    HeaderAuthError,
    UnsupportedFormat,
    VaultError,
    VolumeExists,
    VolumeNotFound,
)
from encfs.keys import VolumeKeys
from encfs.vault import KeyWrapper, VaultSettings, VaultURL, connect, parse_vault_url
from tests.conftest import TransitKey

FAKE_KEY = bytes(range(32))


class FakeWrapper:
    """A KeyWrapper with a fixed key (offline tests); ``calls`` counts vault use."""

    def __init__(self, key: bytes = FAKE_KEY) -> None:
        self.key = key
        self.calls = 0

    @property
    def url(self) -> VaultURL:
        return parse_vault_url("transit+https://vault.example:8200/transit/fake")

    @property
    def serving(self) -> str:
        return self.url.base_url

    def new_volume_key(self) -> tuple[bytearray, str]:
        self.calls += 1
        return bytearray(self.key), "vault:v4:ZmFrZQ=="

    def unwrap(self, wrapped_key: str) -> bytearray:
        self.calls += 1
        assert wrapped_key == "vault:v4:ZmFrZQ=="
        return bytearray(self.key)

    def rewrap(self, wrapped_key: str) -> str:
        raise AssertionError("offline tests do not rewrap")

    def key_status(self) -> dict[str, Any]:
        raise AssertionError("offline tests do not ask for the key's status")

    def check_capabilities(self, purpose: str) -> None:
        raise AssertionError("offline tests do not preflight")

    def renew_identity(self) -> float | None:
        raise AssertionError("offline tests do not renew")

    def identity(self) -> dict[str, Any]:
        raise AssertionError("offline tests have no vault identity")

    def close(self) -> None:
        pass


def header_bytes(version: int = 1, url: str = "transit+https://v:8200/transit/k") -> bytes:
    header = fmt.VolumeHeader(
        format_version=version,
        feature_flags=0,
        cipher=fmt.CIPHER_AES256_GCM,
        block_size=4096,
        volume_id=bytes(16),
        slots=(fmt.KeySlot(url, 1, "vault:v1:AAAA"),),
    )
    return header.body() + bytes(32)


# --- write_header_atomic -----------------------------------------------------------------------


def test_write_header_atomic_first_write(tmp_path: Path) -> None:
    raw = header_bytes(url="first")
    volume.write_header_atomic(tmp_path, raw)
    assert (tmp_path / fmt.VOLUME_HEADER_NAME).read_bytes() == raw
    assert not (tmp_path / fmt.VOLUME_HEADER_PREV).exists()
    assert not (tmp_path / fmt.VOLUME_HEADER_TMP).exists()
    assert stat.S_IMODE((tmp_path / fmt.VOLUME_HEADER_NAME).stat().st_mode) == 0o600


def test_write_header_atomic_keeps_prev(tmp_path: Path) -> None:
    first, second, third = (header_bytes(url=u) for u in ("first", "second", "third"))
    volume.write_header_atomic(tmp_path, first)
    volume.write_header_atomic(tmp_path, second)
    assert (tmp_path / fmt.VOLUME_HEADER_NAME).read_bytes() == second
    assert (tmp_path / fmt.VOLUME_HEADER_PREV).read_bytes() == first
    volume.write_header_atomic(tmp_path, third)
    assert (tmp_path / fmt.VOLUME_HEADER_NAME).read_bytes() == third
    assert (tmp_path / fmt.VOLUME_HEADER_PREV).read_bytes() == second
    assert not (tmp_path / fmt.VOLUME_HEADER_TMP).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        fmt.VOLUME_HEADER_NAME,
        fmt.VOLUME_HEADER_PREV,
    ]


def test_write_header_atomic_replaces_stale_tmp(tmp_path: Path) -> None:
    """A crash may leave encfs.volume.tmp behind; the next write overwrites it."""
    (tmp_path / fmt.VOLUME_HEADER_TMP).write_bytes(b"half a header")
    raw = header_bytes()
    volume.write_header_atomic(tmp_path, raw)
    assert (tmp_path / fmt.VOLUME_HEADER_NAME).read_bytes() == raw
    assert not (tmp_path / fmt.VOLUME_HEADER_TMP).exists()


# --- read_header -------------------------------------------------------------------------------


def test_read_header_prefers_current(tmp_path: Path) -> None:
    volume.write_header_atomic(tmp_path, header_bytes(url="old"))
    volume.write_header_atomic(tmp_path, header_bytes(url="new"))
    hf = volume.read_header(tmp_path)
    assert hf.header.vault_url == "new"
    assert hf.path == tmp_path / fmt.VOLUME_HEADER_NAME
    assert hf.body + hf.tag == header_bytes(url="new")


def test_read_header_falls_back_to_prev(tmp_path: Path) -> None:
    """A crash between 'link .prev' and 'rename .tmp' leaves no encfs.volume."""
    volume.write_header_atomic(tmp_path, header_bytes(url="old"))
    volume.write_header_atomic(tmp_path, header_bytes(url="new"))
    (tmp_path / fmt.VOLUME_HEADER_NAME).unlink()
    hf = volume.read_header(tmp_path)
    assert hf.header.vault_url == "old"
    assert hf.path == tmp_path / fmt.VOLUME_HEADER_PREV


def test_read_header_does_not_hide_a_bad_current_header(tmp_path: Path) -> None:
    """Only a *missing* header falls back; a damaged one is an error naming the file."""
    volume.write_header_atomic(tmp_path, header_bytes(url="old"))
    volume.write_header_atomic(tmp_path, header_bytes(url="new"))
    (tmp_path / fmt.VOLUME_HEADER_NAME).write_bytes(b"garbage")
    with pytest.raises(
        FormatError, match=r"encfs\.volume is damaged: volume header truncated"
    ) as info:
        volume.read_header(tmp_path)
    assert "encfs header restore" in info.value.hint  # encfs.volume.prev parses: offered
    (tmp_path / fmt.VOLUME_HEADER_NAME).write_bytes(header_bytes(version=2))
    with pytest.raises(UnsupportedFormat, match=r"encfs\.volume: volume format version 2"):
        volume.read_header(tmp_path)


def test_read_header_unreadable(tmp_path: Path) -> None:
    (tmp_path / fmt.VOLUME_HEADER_NAME).mkdir()
    with pytest.raises(FormatError, match="cannot read volume header") as info:
        volume.read_header(tmp_path)
    assert not isinstance(info.value, VolumeNotFound)


def test_volume_not_found_messages(tmp_path: Path) -> None:
    with pytest.raises(
        VolumeNotFound,
        match=r"holds no encfs volume \(no encfs\.volume\); "
        r"create one with `encfs init`",
    ):
        volume.read_header(tmp_path)
    missing = tmp_path / "nope"
    with pytest.raises(VolumeNotFound, match="does not exist or is not a directory"):
        volume.read_header(missing)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(VolumeNotFound, match="does not exist or is not a directory"):
        volume.read_header(a_file)


# --- create: refusals (no vault call) ----------------------------------------------------------


def test_create_refuses_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "stray").write_text("x")
    fake = FakeWrapper()
    with pytest.raises(VolumeExists, match="is not empty"):
        volume.create(tmp_path, fake)
    assert fake.calls == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stray"]


def test_create_refuses_hidden_files_too(tmp_path: Path) -> None:
    (tmp_path / ".hidden").write_text("x")
    with pytest.raises(VolumeExists, match="is not empty"):
        volume.create(tmp_path, FakeWrapper())


def test_create_refuses_existing_volume(tmp_path: Path) -> None:
    volume.create(tmp_path / "c", FakeWrapper())
    fake = FakeWrapper()
    with pytest.raises(VolumeExists, match="already holds an encfs volume"):
        volume.create(tmp_path / "c", fake)
    assert fake.calls == 0


def test_create_refuses_a_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_text("x")
    with pytest.raises(VolumeExists, match="not a directory"):
        volume.create(target, FakeWrapper())


def test_create_refuses_bad_block_size(tmp_path: Path) -> None:
    fake = FakeWrapper()
    with pytest.raises(ValueError, match="multiple of 4096"):
        volume.create(tmp_path / "c", fake, block_size=5000)
    assert fake.calls == 0
    assert not (tmp_path / "c").exists()


# --- create/unlock offline (fixed key) ---------------------------------------------------------


def test_create_and_unlock_offline(tmp_path: Path) -> None:
    cipher = tmp_path / "new" / "cipher"
    header = volume.create(cipher, FakeWrapper(), block_size=8192)
    assert stat.S_IMODE(cipher.stat().st_mode) == 0o700
    assert sorted(p.name for p in cipher.iterdir()) == [fmt.DIRID_NAME, fmt.VOLUME_HEADER_NAME]
    assert len(names.read_dirid(backing.open_root(str(cipher)))) == fmt.DIRID_LEN
    assert (cipher / fmt.DIRID_NAME).is_symlink()  # new volumes: ids are links
    assert header.format_version == 1
    assert header.feature_flags == fmt.FEATURE_DIRID_LINKS
    assert header.cipher == fmt.CIPHER_AES256_GCM
    assert header.block_size == 8192
    assert header.kek_version == 4
    assert header.wrapped_key == "vault:v4:ZmFrZQ=="
    assert header.vault_url == "transit+https://vault.example:8200/transit/fake"
    hf = volume.read_header(cipher)
    assert hf.header == header
    keys = volume.unlock(hf, FakeWrapper())
    try:
        assert isinstance(keys, VolumeKeys)
        assert hf.tag == keys.header_tag(hf.body)
    finally:
        keys.close()


def test_unlock_refuses_edited_header(tmp_path: Path) -> None:
    volume.create(tmp_path, FakeWrapper())
    path = tmp_path / fmt.VOLUME_HEADER_NAME
    raw = bytearray(path.read_bytes())
    raw[20] ^= 1  # first byte of the volume id: still well-formed, no longer authentic
    path.write_bytes(bytes(raw))
    with pytest.raises(HeaderAuthError, match="header tag mismatch"):
        volume.unlock(volume.read_header(tmp_path), FakeWrapper())


def test_unlock_refuses_other_volume_key(tmp_path: Path) -> None:
    volume.create(tmp_path, FakeWrapper())
    with pytest.raises(HeaderAuthError):
        volume.unlock(volume.read_header(tmp_path), FakeWrapper(key=bytes(32)))


def test_create_wipes_the_plaintext_key(tmp_path: Path) -> None:
    returned: list[bytearray] = []

    class Recording(FakeWrapper):
        def new_volume_key(self) -> tuple[bytearray, str]:
            key, wrapped = super().new_volume_key()
            returned.append(key)
            return key, wrapped

    volume.create(tmp_path, Recording())
    assert returned == [bytearray(32)]


# --- create/unlock with the real vault ---------------------------------------------------------


@pytest.fixture
def vault(transit_key: TransitKey, monkeypatch: pytest.MonkeyPatch) -> Iterator[KeyWrapper]:
    for var in ("BAO_TOKEN", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("VAULT_TOKEN", transit_key.token)
    wrapper = connect(transit_key.url, VaultSettings(timeout=10))
    yield wrapper
    wrapper.close()


def test_create_and_unlock_with_openbao(
    tmp_path: Path, vault: KeyWrapper, transit_key: TransitKey
) -> None:
    cipher = tmp_path / "cipher"
    header = volume.create(cipher, vault)
    assert header.vault_url == transit_key.url
    assert header.wrapped_key.startswith("vault:v1:")
    assert header.kek_version == 1
    hf = volume.read_header(cipher)
    assert hf.header == header
    keys = volume.unlock(hf, vault)
    try:
        # The same key every unlock: a name encrypts the same way twice.
        dir_id = names.read_dirid(backing.open_root(str(cipher)))
        first = keys.names.encrypt(b"x", dir_id)
    finally:
        keys.close()
    keys = volume.unlock(volume.read_header(cipher), vault)
    try:
        assert keys.names.encrypt(b"x", dir_id) == first
    finally:
        keys.close()


def test_unlock_with_the_wrong_kek_fails(
    tmp_path: Path, vault: KeyWrapper, transit_key: TransitKey
) -> None:
    volume.create(tmp_path / "c", vault)
    other = transit_key.name + "-other"
    transit_key.bao.create_key(other)
    wrong = connect(transit_key.bao.url_for(other), VaultSettings(timeout=10))
    try:
        with pytest.raises(VaultError):
            volume.unlock(volume.read_header(tmp_path / "c"), wrong)
    finally:
        wrong.close()


def test_rewrapped_header_replaces_atomically(
    tmp_path: Path, vault: KeyWrapper, transit_key: TransitKey
) -> None:
    """KEK rotation the way the header is meant to change: new wrapped key, new tag,
    the old header kept as .prev, and both unlock."""
    cipher = tmp_path / "c"
    volume.create(cipher, vault)
    hf = volume.read_header(cipher)
    transit_key.bao.rotate_key(transit_key.name)
    rewrapped = transit_key.bao.admin.secrets.transit.rewrap_data(
        name=transit_key.name, ciphertext=hf.header.wrapped_key, mount_point=transit_key.bao.mount
    )["data"]["ciphertext"]
    assert rewrapped.startswith("vault:v2:")
    keys = volume.unlock(hf, vault)
    try:
        new = hf.header.with_slot(0, wrapped_key=rewrapped, kek_version=2)
        volume.write_header_atomic(cipher, volume.build_header_bytes(new, keys))
    finally:
        keys.close()
    assert volume.read_header(cipher).header.kek_version == 2
    os.unlink(cipher / fmt.VOLUME_HEADER_NAME)
    prev = volume.read_header(cipher)
    assert prev.header.kek_version == 1
    volume.unlock(prev, vault).close()
