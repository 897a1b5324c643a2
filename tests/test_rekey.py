"""``encfs rekey`` against a real OpenBao and real mounts: every name, block, symlink target
and xattr re-sealed under a new volume key, the tree unchanged, the old key opening nothing
in the volume afterwards, and every interruption (``kill -9`` at any point) leaving a
volume that mounts and reads whole, which the next ``encfs rekey`` finishes."""

from __future__ import annotations

import base64
import dataclasses
import errno
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from encfs import backing, crypto, names
from encfs import format as fmt
from encfs.cli import ExitCode
from encfs.errors import IntegrityError
from encfs.fs import xattrs
from encfs.fs.kcache import Gate
from encfs.keys import VolumeKeys
from tests.conftest import SecondKey, TransitKey
from tests.harness import MakeVolume, Volume, encfs, force_unmount, wait_until
from tests.make_frozen_volume import snapshot

LONG = "L" * 200  # a long name: its encoding exceeds 255 bytes (FORMAT.md §7)


def populate(mnt: Path, *, big: int = 1 << 20) -> None:
    """A tree with every kind of thing a rekey re-seals."""
    rng = random.Random(7)
    (mnt / "empty").write_bytes(b"")
    (mnt / "one").write_bytes(b"x")
    (mnt / "block").write_bytes(rng.randbytes(4096))
    (mnt / "five").write_bytes(rng.randbytes(5000))
    with open(mnt / "big", "wb") as f:
        for _ in range(0, big, 1 << 20):
            f.write(rng.randbytes(min(1 << 20, big)))
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
    geo = keys.geometry

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


class Workload:
    """What a volume in use sees during an online rekey: appends, block rewrites, renames
    between directories and reads, each checked against what was written, on threads,
    until stopped. Any failed operation is kept and fails the test."""

    def __init__(self, mnt: Path) -> None:
        self.mnt = mnt
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.ops = 0
        self.log = b""
        self.blocks = bytearray(os.urandom(64 * 4096))
        (mnt / "work").mkdir()
        (mnt / "work" / "a").mkdir()
        (mnt / "work" / "b").mkdir()
        (mnt / "work" / "blocks").write_bytes(self.blocks)
        self.moving = {f"m{i}": os.urandom(5000 + i) for i in range(20)}
        for name, data in self.moving.items():
            (mnt / "work" / "a" / name).write_bytes(data)
        self.threads = [
            threading.Thread(target=self._guard, args=(fn,), daemon=True)
            for fn in (self._append, self._rewrite, self._move)
        ]

    def __enter__(self) -> Workload:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def _guard(self, fn: Callable[[random.Random], None]) -> None:
        rng = random.Random(fn.__name__)
        while not self.stop.is_set():
            try:
                fn(rng)
                self.ops += 1
            except Exception as exc:
                self.errors.append(f"{fn.__name__}: {exc!r}")
                return

    def _append(self, rng: random.Random) -> None:
        chunk = os.urandom(rng.randrange(1, 3000))
        with open(self.mnt / "work" / "log", "ab") as f:
            f.write(chunk)
        self.log += chunk
        if (self.mnt / "work" / "log").read_bytes() != self.log:
            raise AssertionError("the log reads back wrong")

    def _rewrite(self, rng: random.Random) -> None:
        at = rng.randrange(0, len(self.blocks) - 5000)
        data = os.urandom(rng.randrange(1, 5000))
        with open(self.mnt / "work" / "blocks", "r+b") as f:
            f.seek(at)
            f.write(data)
            self.blocks[at : at + len(data)] = data
            f.seek(0)
            if f.read() != self.blocks:
                raise AssertionError("the rewritten file reads back wrong")

    def _move(self, rng: random.Random) -> None:
        name = rng.choice(sorted(self.moving))
        src, dst = ("a", "b") if (self.mnt / "work" / "a" / name).exists() else ("b", "a")
        os.rename(self.mnt / "work" / src / name, self.mnt / "work" / dst / name)
        if (self.mnt / "work" / dst / name).read_bytes() != self.moving[name]:
            raise AssertionError("a moved file reads back wrong")
        time.sleep(0.01)

    def check(self) -> None:
        assert not self.errors, self.errors
        assert (self.mnt / "work" / "log").read_bytes() == self.log
        assert (self.mnt / "work" / "blocks").read_bytes() == self.blocks
        for name, data in self.moving.items():
            where = [d for d in ("a", "b") if (self.mnt / "work" / d / name).exists()]
            assert len(where) == 1 and (self.mnt / "work" / where[0] / name).read_bytes() == data


def test_online_rekey_while_the_volume_is_in_use(
    make_volume: MakeVolume, transit_key: TransitKey
) -> None:
    vol = make_volume()
    populate(vol.mountpoint, big=16 << 20)
    before = snapshot(vol.mountpoint)
    h0 = header(vol)
    with Workload(vol.mountpoint) as work:
        time.sleep(0.5)
        proc = rekey(vol, "--json")
        assert proc.returncode == 0, proc.stderr
        ops_during = work.ops
        time.sleep(0.5)  # and after it: everything sealed under the new key alone
    work.check()
    assert ops_during > 20, "the workload did not run during the rekey"
    result = json.loads(proc.stdout)
    assert result["state"] == "done" and result["blocks_resealed"] > 4000
    h1 = header(vol)
    assert not h1.rekeying and h1.wrapped_key != h0.wrapped_key
    status = json.loads(encfs("status", vol.mountpoint, "--json", env=vol.env).stdout)
    assert status["rekey"]["state"] == "done" and status["state"] == "active"
    assert status["kek_version"] == h1.kek_version
    after = snapshot(vol.mountpoint)
    assert {k: v for k, v in after.items() if not k.startswith("/work")} == before
    vol.unmount()
    old = VolumeKeys(old_key(transit_key, h0.wrapped_key), volume_id=h0.volume_id, block_size=4096)
    try:
        assert opens_under(old, vol.cipher_dir) == []
    finally:
        old.close()
    vol.mount()
    work.check()
    assert [e["event"] for e in vol.audit_events()].count("rekey") == 1


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
    torn_file = next(  # (the first of its names, if it has hard links)
        path
        for top, _dirs, files in os.walk(vol.cipher_dir)
        for path in (Path(top) / name for name in files)
        if stat.S_ISREG(path.lstat().st_mode)
        and path.lstat().st_size > fmt.FILE_HEADER_LEN
        and path.read_bytes()[2 : fmt.FILE_HEADER_LEN] == file_id
    )
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


def _status(vol: Volume) -> dict[str, Any]:
    proc = encfs("status", vol.mountpoint, "--json", env=vol.env)
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def _start_rekey(vol: Volume) -> subprocess.Popen[str]:
    """``encfs rekey`` in the background, returned once the daemon's rekey is walking."""
    return _start_rekey_with(vol)


def _start_rekey_with(vol: Volume, *extra: str) -> subprocess.Popen[str]:
    env = vol.env | {"ENCFS_AUDIT_LOG": "none", "ENCFS_PIN_DIR": os.environ["ENCFS_PIN_DIR"]}
    proc = subprocess.Popen(
        [sys.executable, "-m", "encfs", "rekey", str(vol.cipher_dir), "--vault", vol.vault_url,
         *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert wait_until(
        lambda: _status(vol).get("rekey", {}).get("bytes", 0) > 0, timeout=30, interval=0.02
    ), _status(vol)
    return proc


def test_a_killed_rekey_command_leaves_the_daemon_rekeying(make_volume: MakeVolume) -> None:
    vol = make_volume()
    populate(vol.mountpoint, big=96 << 20)
    before = snapshot(vol.mountpoint)
    proc = _start_rekey(vol)
    proc.kill()
    proc.communicate()
    assert wait_until(lambda: _status(vol)["rekey"]["state"] == "done", timeout=120)
    assert not header(vol).rekeying
    assert snapshot(vol.mountpoint) == before
    again = rekey(vol)  # a new rekey, from the start: the last one is done
    assert again.returncode == 0, again.stderr


def test_rekey_goes_on_after_the_daemon_is_killed(
    make_volume: MakeVolume, transit_key: TransitKey
) -> None:
    vol = make_volume()
    populate(vol.mountpoint, big=96 << 20)
    before = snapshot(vol.mountpoint)
    h0 = header(vol)
    proc = _start_rekey(vol)
    os.kill(vol.daemon_pid(), signal.SIGKILL)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "went away" in err, err
    force_unmount(vol.mountpoint)
    assert header(vol).rekeying  # killed mid-walk: the header names both keys
    vol.mount()
    assert snapshot(vol.mountpoint) == before  # every entry reads, whichever key sealed it
    assert _status(vol)["rekey"] == {"state": "interrupted"}
    proc2 = rekey(vol)
    assert proc2.returncode == 0, proc2.stderr
    assert snapshot(vol.mountpoint) == before
    vol.unmount()
    old = VolumeKeys(old_key(transit_key, h0.wrapped_key), volume_id=h0.volume_id, block_size=4096)
    try:
        assert opens_under(old, vol.cipher_dir) == []
    finally:
        old.close()
    check = encfs("fsck", vol.cipher_dir, "--vault", vol.vault_url, env=vol.env)
    assert check.returncode == 0, check.stdout + check.stderr


# --- the pieces a rekey relies on, without a mount ----------------------------------------


def test_names_and_xattrs_see_both_keys_while_a_rekey_runs(tmp_path: Path) -> None:
    root = backing.open_root(str(tmp_path))
    dir_id = names.write_dirid(root, link=True)
    keys = VolumeKeys(bytearray(32), volume_id=bytes(16), block_size=4096)
    try:
        tree = names.Names(root, keys, dirid_links=True)
        old = tree.child(root, dir_id, "f")
        os.close(root.create_file(old.name, os.O_RDWR, 0o600))
        xattrs.set_(keys, old, "user.a", b"1", 0)
        keys.retire(VolumeKeys(bytearray(range(32)), volume_id=bytes(16), block_size=4096))
        found = tree.child(root, dir_id, "f")
        assert found.name == old.name  # not renamed yet: found under its old name
        fresh = tree.child(root, dir_id, "g")  # nothing there: the new key's name
        assert fresh.encoded == keys.names_own().encrypt(b"g", dir_id)
        assert keys.retiring is not None
        assert fresh.encoded != keys.retiring.names_own().encrypt(b"g", dir_id)
        assert xattrs.get(keys, found, "user.a") == b"1"
        with pytest.raises(FileExistsError):
            xattrs.set_(keys, found, "user.a", b"x", os.XATTR_CREATE)
        xattrs.set_(keys, found, "user.a", b"2", os.XATTR_REPLACE)
        assert xattrs.listed(keys, found) == ["user.a"]
        assert len([a for a in root.listxattr(found.name) if a.startswith("user.encfs.")]) == 1
        assert xattrs.get(keys, found, "user.a") == b"2"
        xattrs.remove(keys, found, "user.a")
        with pytest.raises(OSError) as err:
            xattrs.get(keys, found, "user.a")
        assert err.value.errno == errno.ENODATA
    finally:
        keys.close()


def test_a_paused_gate_holds_operations_back_and_a_suspension_fails_them() -> None:
    gate = Gate()
    assert gate.enter()
    done: list[bool] = []
    waiter = threading.Thread(target=lambda: done.append(gate.enter()))
    pauser = threading.Thread(target=lambda: done.append(gate.pause(5)))
    pauser.start()
    time.sleep(0.2)
    assert pauser.is_alive()  # waits for the operation inside
    gate.leave()
    pauser.join(5)
    assert done == [True]
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive() and not gate.suspended  # held back, not refused
    gate.unpause()
    waiter.join(5)
    assert done == [True, True]
    gate.leave()
    assert gate.pause(1)
    refused = threading.Thread(target=lambda: done.append(gate.enter()))
    refused.start()
    assert gate.close(1)  # a suspension while paused: those waiting are refused
    refused.join(5)
    assert done[-1] is False
    gate.unpause()
    assert not gate.open  # still suspended
    gate.reopen()
    assert gate.open and gate.enter()


def test_a_suspension_pauses_the_rekey_and_resuming_finishes_it(
    make_volume: MakeVolume, transit_key: TransitKey
) -> None:
    """Revoked mid-rekey: the volume suspends (both keys wiped), the rekey waits; a new
    token resumes the volume — the watcher unwraps both keys of the header — and the
    rekey goes on to the end."""
    bao = transit_key.bao
    vol = make_volume(mount=False)
    policy = bao.write_host_policy(transit_key.name)
    token_file = vol.cipher_dir.parent / "host.token"

    def new_token() -> str:
        token = bao.make_token([policy])
        tmp = token_file.with_suffix(".new")
        tmp.write_text(token + "\n")
        tmp.chmod(0o600)
        os.replace(tmp, token_file)
        return token

    token = new_token()
    env = {k: v for k, v in vol.env.items() if k != "VAULT_TOKEN"}
    vol.env = env
    vol.mount("--token-file", str(token_file), "--check-interval", "0.25")
    # Seconds of work at any speed this machine has shown (~300 MB/s at best), against a
    # revocation noticed within a quarter second: the suspension lands in the walk.
    populate(vol.mountpoint, big=640 << 20)
    before = snapshot(vol.mountpoint)
    h0 = header(vol)
    proc = _start_rekey_with(vol, "--token-file", str(token_file))
    bao.revoke_token(token)
    assert wait_until(lambda: _status(vol)["state"] == "suspended", timeout=15), _status(vol)
    assert wait_until(lambda: _status(vol)["rekey"]["state"] == "suspended", timeout=15), _status(
        vol
    )["rekey"]
    assert header(vol).rekeying
    new_token()
    assert wait_until(lambda: _status(vol)["state"] == "active", timeout=15), _status(vol)
    _out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert not header(vol).rekeying
    assert snapshot(vol.mountpoint) == before
    vol.unmount()
    old = VolumeKeys(old_key(transit_key, h0.wrapped_key), volume_id=h0.volume_id, block_size=4096)
    try:
        assert opens_under(old, vol.cipher_dir) == []
    finally:
        old.close()


def test_progress_is_json_lines_off_a_terminal(make_volume: MakeVolume) -> None:
    vol = make_volume(mount=False)
    proc = rekey(vol)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert lines and lines[-1]["kind"] == "progress" and lines[-1]["state"] == "done"
    assert lines[-1]["files"] == lines[-1]["files_total"]
    assert "rekeyed" in proc.stdout and "MB/s" in proc.stdout
    quiet = rekey(vol, "--no-progress")
    assert quiet.returncode == 0 and not quiet.stderr.strip(), quiet.stderr


def test_a_substituted_rekeying_header_is_refused(
    make_volume: MakeVolume, transit_key: TransitKey
) -> None:
    """Someone who may ask the KEK for data keys builds a 'rekey under way' header around a
    key of their own, copying the real wrapped key as the retiring one: the second tag,
    which only the real key can make, fails; nothing is mounted and the pin stays."""
    vol = make_volume()
    (vol.mountpoint / "f").write_bytes(b"the owner's data")
    vol.unmount()
    path = vol.cipher_dir / fmt.VOLUME_HEADER_NAME
    real = fmt.parse_volume_header(path.read_bytes())[0]
    answer = transit_key.bao.admin.secrets.transit.generate_data_key(
        name=transit_key.name, key_type="plaintext", mount_point=transit_key.bao.mount
    )["data"]
    forged_key = bytearray(base64.b64decode(answer["plaintext"]))
    forged = dataclasses.replace(
        real.with_slot(
            0,
            wrapped_key=answer["ciphertext"],
            kek_version=int(answer["ciphertext"].split(":")[1][1:]),
        ),
        feature_flags=real.feature_flags | fmt.FEATURE_REKEYING,
        retiring=real.slots,
    )
    mine = VolumeKeys(forged_key, volume_id=real.volume_id, block_size=real.block_size)
    try:
        body = forged.body()
        path.write_bytes(body + mine.header_tag(body) + bytes(32))
    finally:
        mine.close()
    proc = encfs("mount", vol.cipher_dir, vol.mountpoint, "--vault", vol.vault_url, env=vol.env)
    assert proc.returncode == ExitCode.HEADER_AUTH, proc.stderr
    assert not os.path.ismount(vol.mountpoint)
    assert rekey(vol).returncode == ExitCode.HEADER_AUTH


def test_rekey_refuses_an_ephemeral_volume(tmp_path: Path, transit_key: TransitKey) -> None:
    cipher, mnt = tmp_path / "eph", tmp_path / "mnt"
    mnt.mkdir()
    proc = encfs("mount", "--ephemeral", cipher, mnt, env=transit_key.env)
    assert proc.returncode == 0, proc.stderr
    try:
        out = encfs("rekey", cipher, env=transit_key.env)
        assert out.returncode == ExitCode.VOLUME_IN_USE and "ephemeral" in out.stderr, out.stderr
    finally:
        force_unmount(mnt)


def test_online_rekey_of_a_double_volume_replaces_both_keys(
    make_volume: MakeVolume, transit_key: TransitKey, second_key: SecondKey
) -> None:
    """Two new volume keys, one from each vault; afterwards the old pair opens nothing."""
    vol = make_volume(double=True)
    populate(vol.mountpoint, big=4 << 20)
    before = snapshot(vol.mountpoint)
    h0 = header(vol)
    with Workload(vol.mountpoint) as work:
        proc = encfs(
            "rekey", vol.cipher_dir, "--vault", vol.vault_url, *vol.vault2_args(), "--json",
            env=vol.env, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    work.check()
    h1 = header(vol)
    assert h1.double and not h1.rekeying
    assert h1.slots[0].wrapped_key != h0.slots[0].wrapped_key
    assert h1.slots[1].wrapped_key != h0.slots[1].wrapped_key
    assert {
        k: v for k, v in snapshot(vol.mountpoint).items() if not k.startswith("/work")
    } == before
    vol.unmount()
    outer = old_key(
        TransitKey(second_key.name, second_key.url, transit_key.token, transit_key.bao),
        h0.slots[1].wrapped_key,
    )
    old = VolumeKeys(
        old_key(transit_key, h0.wrapped_key),
        volume_id=h0.volume_id,
        block_size=4096,
        outer_key=outer,
    )
    try:
        assert opens_under(old, vol.cipher_dir) == []
    finally:
        old.close()
    vol.mount()
    work.check()
