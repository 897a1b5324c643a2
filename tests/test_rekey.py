"""``encfs rekey`` against a real OpenBao and real mounts: every name, block, symlink target
and xattr re-sealed under a new volume key, the tree unchanged, the old key opening nothing
in the volume afterwards, and every interruption (``kill -9`` at any point) leaving a
volume that mounts and reads whole, which the next ``encfs rekey`` finishes."""

from __future__ import annotations

import base64
import errno
import os
import random
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from encfs import backing, crypto, names
from encfs import format as fmt
from encfs.cli import ExitCode
from encfs.errors import IntegrityError
from encfs.keys import VolumeKeys
from tests.conftest import TransitKey
from tests.harness import MakeVolume, Volume, encfs
from tests.make_frozen_volume import snapshot

LONG = "L" * 200  # a long name: its encoding exceeds 255 bytes (FORMAT.md §7)


def populate(mnt: Path, *, big: int = 1 << 20) -> None:
    """A tree with every kind of thing a rekey re-seals."""
    rng = random.Random(7)
    (mnt / "empty").write_bytes(b"")
    (mnt / "one").write_bytes(b"x")
    (mnt / "block").write_bytes(rng.randbytes(4096))
    (mnt / "five").write_bytes(rng.randbytes(5000))
    (mnt / "big").write_bytes(rng.randbytes(big))
    with open(mnt / "sparse", "wb") as f:
        f.seek(3 << 20)
        f.write(b"tail")
    (mnt / LONG).write_bytes(b"long-named content")
    d = mnt / "dir" / "sub" / ("D" * 180)
    d.mkdir(parents=True)
    (d / "deep").write_bytes(rng.randbytes(70000))
    for i in range(30):
        (mnt / "dir" / f"f{i:02d}").write_bytes(rng.randbytes(rng.randrange(0, 20000)))
    os.symlink("dir/f01", mnt / "link")
    os.symlink("T" * 2000, mnt / "dir" / "longtarget")
    os.link(mnt / "five", mnt / "dir" / "hardlink")
    os.setxattr(mnt / "five", "user.color", b"blue")
    os.setxattr(mnt / "dir", "user.dir-attr", b"on a directory")
    os.setxattr(mnt, "user.root-attr", b"on the root")
    os.mkfifo(mnt / "fifo")


def old_key(key: TransitKey, wrapped: str) -> bytearray:
    """The plaintext volume key of ``wrapped``, from the vault (test-only: the tests must
    know the old key to show it opens nothing afterwards)."""
    answer = key.bao.admin.secrets.transit.decrypt_data(
        name=key.name, ciphertext=wrapped, mount_point=key.bao.mount
    )
    return bytearray(base64.b64decode(answer["data"]["plaintext"]))


def opens_under(keys: VolumeKeys, cipher_dir: Path) -> list[str]:
    """Everything in ``cipher_dir`` that ``keys`` (alone) opens: names, symlink targets,
    xattr names and values, non-hole blocks. Empty for a key the volume no longer uses."""
    found: list[str] = []
    names_c, meta = keys.names_own(), keys.meta_own()
    geo = fmt.Geometry(4096)

    def xattrs(directory: backing.Dir, name: str) -> None:
        for bname in directory.listxattr(name):
            if not bname.startswith(fmt.XATTR_BACKING_PREFIX):
                continue
            try:
                names_c.decrypt(bname[len(fmt.XATTR_BACKING_PREFIX) :], fmt.XATTR_NAME_AD)
                found.append(f"xattr name {directory.path(name)} {bname}")
            except IntegrityError:
                pass
            try:
                meta.open(directory.getxattr(name, bname), bname.encode())
                found.append(f"xattr value {directory.path(name)} {bname}")
            except IntegrityError:
                pass

    stack = [backing.open_root(str(cipher_dir))]
    while stack:  # not a recursive closure: that cycle would keep the ciphers (and keys) alive
        directory = stack.pop()
        dir_id = names.read_dirid(directory)
        xattrs(directory, ".")
        for name in directory.names():
            if fmt.is_reserved_backing_name(name) and not fmt.is_longname(name):
                continue
            encoded = name
            if fmt.is_longname(name):
                encoded = directory.read_small(name + fmt.LONGNAME_SUFFIX, 4096).decode()
            try:
                names_c.decrypt(encoded, dir_id)
                found.append(f"name {directory.path(name)}")
            except IntegrityError:
                pass
            st = directory.lstat(name)
            if stat.S_ISDIR(st.st_mode):
                stack.append(directory.opendir(name))
            elif stat.S_ISLNK(st.st_mode):
                try:
                    meta.open(crypto.b64decode(directory.readlink(name)), fmt.SYMLINK_AD)
                    found.append(f"symlink {directory.path(name)}")
                except IntegrityError:
                    pass
            elif stat.S_ISREG(st.st_mode) and st.st_size > fmt.FILE_HEADER_LEN:
                xattrs(directory, name)
                fd = directory.open_file(name, os.O_RDONLY)
                try:
                    file_id = fmt.parse_file_header(os.pread(fd, fmt.FILE_HEADER_LEN, 0))
                    cipher = keys.own_file_cipher(file_id)
                    for block_no in range(geo.block_count(st.st_size)):
                        raw = os.pread(fd, geo.cipher_block_size, geo.block_cipher_off(block_no))
                        if raw.count(0) == len(raw):
                            continue  # a hole: no key opens or refuses it
                        try:
                            cipher.open(block_no, raw)
                            found.append(f"block {block_no} of {directory.path(name)}")
                        except IntegrityError:
                            pass
                finally:
                    os.close(fd)
    return found


def header(vol: Volume) -> fmt.VolumeHeader:
    parsed, _body, _tag = fmt.parse_volume_header(
        (vol.cipher_dir / fmt.VOLUME_HEADER_NAME).read_bytes()
    )
    return parsed


def rekey(vol: Volume, *extra: str) -> subprocess.CompletedProcess[str]:
    return encfs(
        "rekey", vol.cipher_dir, "--vault", vol.vault_url, *extra, env=vol.env, timeout=300
    )


def test_offline_rekey_reseals_everything_and_the_old_key_opens_nothing(
    make_volume: MakeVolume, transit_key: TransitKey
) -> None:
    vol = make_volume()
    populate(vol.mountpoint)
    before = snapshot(vol.mountpoint)
    vol.unmount()
    h0 = header(vol)
    old = VolumeKeys(old_key(transit_key, h0.wrapped_key), volume_id=h0.volume_id, block_size=4096)
    try:
        assert len(opens_under(old, vol.cipher_dir)) > 40  # the check itself finds things

        proc = rekey(vol, "--json")
        assert proc.returncode == 0, proc.stderr
        h1 = header(vol)
        assert not h1.rekeying and h1.retiring == ()
        assert h1.wrapped_key != h0.wrapped_key and h1.volume_id == h0.volume_id
        prev = (vol.cipher_dir / fmt.VOLUME_HEADER_PREV).read_bytes()
        assert prev == (vol.cipher_dir / fmt.VOLUME_HEADER_NAME).read_bytes()
        assert h0.wrapped_key.encode() not in vol.raw_bytes()
        assert opens_under(old, vol.cipher_dir) == []
    finally:
        old.close()

    vol.mount()
    assert snapshot(vol.mountpoint) == before
    assert (
        os.stat(vol.mountpoint / "five").st_ino == os.stat(vol.mountpoint / "dir/hardlink").st_ino
    )
    (vol.mountpoint / "after").write_bytes(b"written under the new key")
    vol.unmount()
    check = encfs("fsck", vol.cipher_dir, "--vault", vol.vault_url, env=vol.env)
    assert check.returncode == 0, check.stdout + check.stderr


def test_rekey_refuses_a_mounted_volume_for_now(make_volume: MakeVolume) -> None:
    vol = make_volume()
    proc = rekey(vol)
    assert proc.returncode == ExitCode.VOLUME_IN_USE, proc.stderr


# Where a rekey is killed (strace injects SIGKILL as the Nth such call starts), in the
# order a fresh rekey reaches them: the new header (fsync of its .tmp, the link keeping the
# old one, the rename), entry renames, a symlink made aside and renamed over, an xattr set
# anew and the old one removed, undo records and re-sealed blocks (pwrite64, alternating),
# the final syncfs, the two final header writes. Each round resumes the rekey the previous
# one left (or, past its end, starts another).
KILL_POINTS = [
    ("fsync", 1),
    ("linkat", 1),
    ("renameat", 1),
    ("renameat2", 1),
    ("renameat2", 20),
    ("symlinkat", 1),
    ("renameat", 1),
    ("setxattr", 1),
    ("removexattr", 1),
    ("pwrite64", 1),
    ("pwrite64", 2),
    ("pwrite64", 3),
    ("pwrite64", 300),
    ("syncfs", 1),
    ("fsync", 4),
    ("renameat", 3),
]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (scripts/install)")
def test_offline_rekey_killed_at_each_step_reads_whole_and_finishes(
    make_volume: MakeVolume, transit_key: TransitKey
) -> None:
    vol = make_volume()
    populate(vol.mountpoint, big=2 << 20)
    before = snapshot(vol.mountpoint)
    vol.unmount()
    h0 = header(vol)
    env = vol.env | {"ENCFS_AUDIT_LOG": "none", "ENCFS_PIN_DIR": os.environ["ENCFS_PIN_DIR"]}
    killed = []
    for syscall, when in KILL_POINTS:
        proc = subprocess.run(
            ["strace", "-qq", "-f", "-o", "/dev/null", "-e", f"trace={syscall}",
             "-e", f"inject={syscall}:signal=KILL:when={when}",
             sys.executable, "-m", "encfs", "rekey", str(vol.cipher_dir), "--vault", vol.vault_url],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode in (0, -9, 137), (syscall, when, proc.returncode, proc.stderr)
        if proc.returncode != 0:
            killed.append((syscall, when, header(vol).rekeying))
        # Wherever it died: the volume mounts and reads exactly as before, fsck finds nothing.
        vol.mount()
        assert snapshot(vol.mountpoint) == before, (syscall, when)
        vol.unmount()
        check = encfs("fsck", vol.cipher_dir, "--vault", vol.vault_url, env=vol.env)
        assert check.returncode == 0, (syscall, when, check.stdout + check.stderr)
    assert len(killed) >= len(KILL_POINTS) - 3, killed
    assert any(rekeying for _, _, rekeying in killed)  # some died mid-rekey, not before it
    proc = rekey(vol)  # and the next run finishes whatever was left
    assert proc.returncode == 0, proc.stderr
    h1 = header(vol)
    assert not h1.rekeying and h1.wrapped_key != h0.wrapped_key
    old = VolumeKeys(old_key(transit_key, h0.wrapped_key), volume_id=h0.volume_id, block_size=4096)
    try:
        assert opens_under(old, vol.cipher_dir) == []
    finally:
        old.close()
    vol.mount()
    assert snapshot(vol.mountpoint) == before


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (scripts/install)")
def test_a_block_torn_mid_reseal_reads_as_eio_and_repair_restores_it(
    make_volume: MakeVolume,
) -> None:
    vol = make_volume()
    populate(vol.mountpoint)
    before = snapshot(vol.mountpoint)
    vol.unmount()
    env = vol.env | {"ENCFS_AUDIT_LOG": "none", "ENCFS_PIN_DIR": os.environ["ENCFS_PIN_DIR"]}
    # Killed as it starts rewriting the first block it re-seals (pwrite 1 is the lock's
    # holder note, 2 the undo record): the record holds the block as it was.
    proc = subprocess.run(
        ["strace", "-qq", "-f", "-o", "/dev/null", "-e", "trace=pwrite64",
         "-e", "inject=pwrite64:signal=KILL:when=3",
         sys.executable, "-m", "encfs", "rekey", str(vol.cipher_dir), "--vault", vol.vault_url],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode in (-9, 137), proc.stderr
    undo_dir = vol.cipher_dir / fmt.UNDO_DIR_NAME
    (undo_name,) = os.listdir(undo_dir)
    geo = fmt.Geometry(4096)
    raw_undo = (undo_dir / undo_name).read_bytes()
    records = fmt.parse_undo(raw_undo, geo.cipher_block_size)
    assert records, (len(raw_undo), raw_undo[:16])
    file_id = bytes.fromhex(undo_name)
    (torn_file,) = [
        path
        for top, _dirs, files in os.walk(vol.cipher_dir)
        for path in (Path(top) / name for name in files)
        if stat.S_ISREG(path.lstat().st_mode)
        and path.lstat().st_size > fmt.FILE_HEADER_LEN
        and path.read_bytes()[2 : fmt.FILE_HEADER_LEN] == file_id
    ]
    # The tear: the block rewritten half way (new bytes over the old in its second half).
    block_no = min(records)
    with open(torn_file, "r+b") as f:
        at = geo.block_cipher_off(block_no) + geo.cipher_block_size // 2
        f.seek(at)
        f.write(os.urandom(64))
    vol.mount()
    plain_path = next(
        path
        for path, entry in before.items()
        if entry["kind"] == "file" and entry["size"] > block_no * 4096
        and _reads_eio(vol.mountpoint / path.lstrip("/"))
    )  # fmt: skip
    assert plain_path  # a torn block reads as EIO, never as wrong bytes
    vol.unmount()
    repair = encfs("fsck", vol.cipher_dir, "--repair", "--vault", vol.vault_url, env=vol.env)
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert "restored from its undo record" in repair.stdout
    vol.mount()
    assert snapshot(vol.mountpoint) == before
    vol.unmount()
    assert rekey(vol).returncode == 0
    vol.mount()
    assert snapshot(vol.mountpoint) == before


def _reads_eio(path: Path) -> bool:
    try:
        path.read_bytes()
    except OSError as exc:
        return exc.errno == errno.EIO
    return False
