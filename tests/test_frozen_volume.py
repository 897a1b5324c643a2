"""The frozen format-v1 volumes (tests/data/frozen-v1*) must stay readable by every encfs.

One per format variant: ``frozen-v1`` (no feature flags: directory ids are files),
``frozen-v1-dirid-links`` (``DIRID_LINKS``: ids are links) and ``frozen-v1-double``
(``DIRID_LINKS | DOUBLE``: two volume keys, two KEKs, two layers), with the same plaintext
tree. Each KEK is a published TEST-ONLY key, imported into the session's fresh OpenBao with
the transit BYOK API (tests/make_frozen_volume.py ``import_kek``). The volume is read three
ways: offline straight from the format (names + cipherfile, key unwrapped locally), through
``volume.unlock`` + ``fsck`` with the real vault, and mounted with the real CLI
(``encfs mount --vault URL`` on a copy), comparing the whole tree with EXPECTED.json.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from encfs import backing, crypto, fsck, names, volume
from encfs import format as fmt
from encfs.cipherfile import CipherFile
from encfs.keys import VolumeKeys
from encfs.names import Names
from encfs.vault import VaultSettings, connect, second_vault_settings
from tests.harness import encfs, force_unmount, is_mounted
from tests.make_frozen_volume import import_kek, read_test_kek, snapshot
from tests.openbao import OpenBao

DATA = Path(__file__).parent / "data"
Tree = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Frozen:
    """One frozen volume: its directory, what it holds, the feature flags it was made with."""

    path: Path
    flags: int

    @property
    def double(self) -> bool:
        return bool(self.flags & fmt.FEATURE_DOUBLE)

    @property
    def kek_files(self) -> list[str]:
        """The TEST-ONLY KEK of each key slot."""
        return ["TEST-KEK.b64", "TEST-KEK2.b64"] if self.double else ["TEST-KEK.b64"]

    @property
    def expected(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads((self.path / "EXPECTED.json").read_text())
        return result


VOLUMES = [
    Frozen(DATA / "frozen-v1", 0),
    Frozen(DATA / "frozen-v1-dirid-links", fmt.FEATURE_DIRID_LINKS),
    Frozen(DATA / "frozen-v1-double", fmt.FEATURE_DIRID_LINKS | fmt.FEATURE_DOUBLE),
]


@pytest.fixture(params=VOLUMES, ids=lambda v: v.path.name)
def frozen(request: pytest.FixtureRequest) -> Frozen:
    result: Frozen = request.param
    return result


@pytest.fixture
def frozen_copy(frozen: Frozen, tmp_path: Path) -> Path:
    """A private copy of the cipher dir, with the backing xattrs git cannot store."""
    copy = tmp_path / "cipher"
    shutil.copytree(frozen.path / "cipher", copy, symlinks=True)
    xattrs: dict[str, dict[str, str]] = json.loads((frozen.path / "cipher-xattrs.json").read_text())
    for rel, attrs in xattrs.items():
        for name, value in attrs.items():
            os.setxattr(copy / rel, name, base64.b64decode(value), follow_symlinks=False)
    os.chmod(copy, 0o700)  # a root daemon refuses a cipher dir others may enter
    return copy


@pytest.fixture
def frozen_kek_urls(frozen: Frozen, openbao: OpenBao) -> list[str]:
    """The volume's TEST-ONLY KEK(s) imported into the session's OpenBao; their URLs, in
    key slot order."""
    urls = []
    for file in frozen.kek_files:
        name = "frozen-v1-" + secrets.token_hex(4)
        import_kek(openbao, name, read_test_kek(frozen.path, file))
        urls.append(openbao.url_for(name))
    return urls


def unwrap_offline(frozen: Frozen, wrapped_key: str, slot: int = 0) -> bytearray:
    """Unwrap without a vault: a transit ``vault:v1:`` ciphertext of an aes256-gcm96 key is
    base64(nonce(12) || AES-256-GCM(KEK, nonce, plaintext, no AD))."""
    prefix, version, payload = wrapped_key.split(":", 2)
    assert (prefix, version) == ("vault", "v1")
    raw = base64.b64decode(payload)
    kek = read_test_kek(frozen.path, frozen.kek_files[slot])
    return bytearray(AESGCM(kek).decrypt(raw[:12], raw[12:], None))


def read_tree_offline(cipher_dir: Path, keys: VolumeKeys, block_size: int) -> Tree:
    """The plaintext tree read straight from the backing files with names + cipherfile,
    in the shape of ``make_frozen_volume.snapshot``."""
    geo = keys.geometry
    assert geo.block_size == block_size
    nm = Names(str(cipher_dir), keys)
    tree: Tree = {}

    def xattrs(backing: str) -> dict[str, str]:
        out = {}
        for bname in os.listxattr(backing, follow_symlinks=False):
            if not bname.startswith(fmt.XATTR_BACKING_PREFIX):
                continue
            plain = keys.names.decrypt(bname[len(fmt.XATTR_BACKING_PREFIX) :], fmt.XATTR_NAME_AD)
            sealed = os.getxattr(backing, bname, follow_symlinks=False)
            value = keys.meta.open(sealed, bname.encode(), "xattr value")
            out[fmt.XATTR_PREFIX + os.fsdecode(plain)] = base64.b64encode(value).decode()
        return dict(sorted(out.items()))

    def walk(plain_dir: str) -> None:
        backing_dir, _dir_id = nm.directory(plain_dir)
        tree[plain_dir] = {"kind": "dir", "xattrs": xattrs(backing_dir.display)}
        for name, dent in sorted(nm.listdir(plain_dir)):
            where = os.path.join(backing_dir.display, dent.name)
            plain = plain_dir.rstrip("/") + "/" + name
            st = dent.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                walk(plain)
            elif stat.S_ISLNK(st.st_mode):
                sealed = crypto.b64decode(os.readlink(where))
                target = keys.meta.open(sealed, fmt.SYMLINK_AD, "symlink target")
                tree[plain] = {
                    "kind": "symlink",
                    "target": os.fsdecode(target),
                    "size": len(target),
                }
            else:
                cfile = CipherFile(keys, geo, where)
                fd = os.open(where, os.O_RDONLY)
                try:
                    size = cfile.plain_size(fd)
                    data = cfile.read(fd, 0, size + 1)
                finally:
                    os.close(fd)
                tree[plain] = {
                    "kind": "file",
                    "size": size,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "xattrs": xattrs(where),
                }

    walk("/")
    return tree


# --- no vault needed ---------------------------------------------------------------------------


def test_frozen_header_is_untouched(frozen: Frozen) -> None:
    expected = frozen.expected
    raw = (frozen.path / "cipher" / fmt.VOLUME_HEADER_NAME).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == expected["header_sha256"]
    header, _body, _tag = fmt.parse_volume_header(raw)
    assert header.format_version == 1
    assert header.feature_flags == frozen.flags
    assert header.cipher == fmt.CIPHER_AES256_GCM
    assert header.block_size == expected["block_size"]
    assert header.wrapped_key.startswith("vault:v1:")
    assert header.vault_url.endswith("/transit/" + expected["kek_name_at_creation"])
    assert len(header.slots) == len(frozen.kek_files)
    if frozen.double:
        assert header.outer_cipher == fmt.OUTER_CIPHER_CHACHA20_POLY1305
        assert header.slots[1].wrapped_key.startswith("vault:v1:")
        assert header.slots[1].vault_url.endswith("/transit/" + expected["kek2_name_at_creation"])


def test_frozen_ids_have_their_volumes_form(frozen: Frozen) -> None:
    """Every directory id is a link in the links volume and a file in the other (git keeps
    links as links; a checkout that turned them into files would test nothing)."""
    ids = [Path(d, fmt.DIRID_NAME) for d, _dirs, _files in os.walk(frozen.path / "cipher")]
    assert len(ids) == 4
    links = bool(frozen.flags & fmt.FEATURE_DIRID_LINKS)
    assert [p.is_symlink() for p in ids] == [links] * len(ids)


def test_frozen_volumes_hold_the_same_tree() -> None:
    for other in VOLUMES[1:]:
        assert VOLUMES[0].expected["tree"] == other.expected["tree"], other.path.name


def test_frozen_double_volume_has_two_layers() -> None:
    """Its backing files have the double geometry (56 bytes per block): 1 byte -> 75,
    4096 -> 4170, 5000 -> 5130."""
    frozen = VOLUMES[-1]
    assert frozen.double
    sizes = {p.stat().st_size for p in (frozen.path / "cipher").iterdir() if p.is_file()}
    assert {75, 4170, 5130} <= sizes
    assert not {47, 4142, 5074} & sizes  # the single-layer sizes of the same files


def test_frozen_expected_tree_covers_the_format(frozen: Frozen) -> None:
    """EXPECTED.json holds what the fixture promises: 0/1/5000-byte and multi-block files,
    a hole, a subdirectory, symlinks, a 255-byte name and xattrs."""
    tree = frozen.expected["tree"]
    sizes = {v["size"] for v in tree.values() if v["kind"] == "file"}
    assert {0, 1, 5000, 4096, 3 * 4096 + 100} <= sizes
    assert any(v["kind"] == "symlink" for v in tree.values())
    assert any(k != "/" and v["kind"] == "dir" for k, v in tree.items())
    assert any(len(os.fsencode(k.rsplit("/", 1)[1])) == 255 for k in tree)
    assert any(v.get("xattrs") for v in tree.values())


def test_frozen_volume_offline(frozen: Frozen, frozen_copy: Path) -> None:
    """Straight from the format: unwrap with the test KEK, verify the header tag, read every
    name, block, symlink and xattr with names + cipherfile."""
    hf = volume.read_header(frozen_copy)
    volume_keys = [unwrap_offline(frozen, s.wrapped_key, i) for i, s in enumerate(hf.header.slots)]
    try:
        keys = VolumeKeys(
            volume_keys[0],
            volume_id=hf.header.volume_id,
            block_size=hf.header.block_size,
            outer_key=volume_keys[1] if frozen.double else None,
        )
    finally:
        for key in volume_keys:
            key[:] = bytes(len(key))
    try:
        keys.verify_header(hf.body, hf.tag)
        tree = read_tree_offline(frozen_copy, keys, hf.header.block_size)
        assert tree == frozen.expected["tree"]
    finally:
        keys.close()


# --- with the real vault -----------------------------------------------------------------------


def test_frozen_volume_unlocks_and_is_clean(
    frozen: Frozen,
    frozen_copy: Path,
    frozen_kek_urls: list[str],
    openbao: OpenBao,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    for var in ("BAO_TOKEN", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("VAULT_TOKEN", openbao.root_token)
    hf = volume.read_header(frozen_copy)
    settings = VaultSettings(timeout=10)
    token2 = _token_file(tmp_path, openbao.root_token)
    second = second_vault_settings(
        settings, token_file=token2, ca_file=None, client_cert=None, client_key=None
    )
    vaults = [connect(url, s) for url, s in zip(frozen_kek_urls, (settings, second), strict=False)]
    try:
        keys = volume.unlock(hf, *vaults)
    finally:
        for vault in vaults:
            vault.close()
    try:
        report = fsck.check(frozen_copy, keys, hf.header.block_size)
    finally:
        keys.close()
    assert report.problems == []
    tree = frozen.expected["tree"]
    assert report.files == sum(1 for v in tree.values() if v["kind"] == "file")
    assert report.symlinks == sum(1 for v in tree.values() if v["kind"] == "symlink")
    assert report.xattrs == sum(len(v.get("xattrs", {})) for v in tree.values())


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    mp = tmp_path / "plain"
    mp.mkdir()
    yield mp
    force_unmount(mp)


def _token_file(tmp_path: Path, token: str) -> Path:
    path = tmp_path / "vault2.token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    return path


def test_frozen_volume_mounts_with_the_cli(
    frozen: Frozen,
    frozen_copy: Path,
    frozen_kek_urls: list[str],
    openbao: OpenBao,
    mountpoint: Path,
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env.pop("CREDENTIALS_DIRECTORY", None)
    env["VAULT_TOKEN"] = openbao.root_token
    second: list[str | Path] = []
    if frozen.double:
        token2 = _token_file(tmp_path, openbao.root_token)
        second = ["--vault2", frozen_kek_urls[1], "--vault2-token-file", token2]
    proc = encfs("mount", frozen_copy, mountpoint, "--vault", frozen_kek_urls[0], *second, env=env)
    assert proc.returncode == 0, proc.stderr
    assert is_mounted(mountpoint)
    before = {p for p in frozen_copy.rglob("*") if p.is_dir()}
    try:
        assert snapshot(mountpoint) == frozen.expected["tree"]
        # New directories get ids in the volume's form (file ids keep a volume without
        # DIRID_LINKS readable by the encfs that made it).
        (mountpoint / "new-dir").mkdir()
        (mountpoint / "new-dir" / "f").write_bytes(b"new")
    finally:
        proc = encfs("unmount", mountpoint, env=env)
    assert proc.returncode == 0, proc.stderr
    assert not is_mounted(mountpoint)
    (new_dir,) = {p for p in frozen_copy.rglob("*") if p.is_dir()} - before
    dirid = new_dir / fmt.DIRID_NAME
    assert dirid.is_symlink() is bool(frozen.flags & fmt.FEATURE_DIRID_LINKS)
    assert len(names.read_dirid(backing.open_root(str(new_dir)))) == fmt.DIRID_LEN
    assert volume.read_header(frozen_copy).header.feature_flags == frozen.flags
