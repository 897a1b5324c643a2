"""The filesystem on a live mount: every POSIX operation a program expects, checked
byte-exact against what a kernel filesystem would do, and persistence across remounts."""

from __future__ import annotations

import base64
import ctypes
import errno
import json
import mmap
import multiprocessing
import os
import random
import re
import secrets
import shutil
import socket
import stat
import string
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from encfs import format as fmt
from tests.harness import DirectFile, MakeVolume, Volume, as_user, encfs, mount_foreground

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
FALLOC_FL_KEEP_SIZE = 1


def renameat2(src: Path, dst: Path, flags: int) -> None:
    if libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
    if libc.fallocate(fd, mode, off, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# --- content ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 5000, 3 * 4096 + 17, 1 << 20])
def test_write_read_sizes(vol: Volume, size: int) -> None:
    data = os.urandom(size)
    f = vol.mountpoint / "f"
    f.write_bytes(data)
    assert f.stat().st_size == size
    assert f.read_bytes() == data
    backing = [p for p in vol.cipher_dir.iterdir() if not p.name.startswith((".", "encfs"))]
    assert backing[0].stat().st_size == fmt.Geometry(4096).cipher_size(size)
    vol.remount()
    assert f.read_bytes() == data


def test_empty_file_is_empty_on_disk(vol: Volume) -> None:
    (vol.mountpoint / "empty").touch()
    (backing,) = [p for p in vol.cipher_dir.iterdir() if not p.name.startswith((".", "encfs"))]
    assert backing.stat().st_size == 0


def test_random_writes_match_reference(vol: Volume) -> None:
    import random

    rng = random.Random(7)
    ref = bytearray()
    f = vol.mountpoint / "r"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for _ in range(300):
            off = rng.randrange(0, 40000)
            chunk = rng.randbytes(rng.randrange(1, 9000))
            os.pwrite(fd, chunk, off)
            if off > len(ref):
                ref.extend(bytes(off - len(ref)))
            ref[off : off + len(chunk)] = chunk
            if rng.random() < 0.1:
                new = rng.randrange(0, 50000)
                os.ftruncate(fd, new)
                del ref[new:]
                ref.extend(bytes(new - len(ref)))
            if rng.random() < 0.2:
                roff = rng.randrange(0, 50000)
                assert os.pread(fd, 5000, roff) == bytes(ref[roff : roff + 5000])
    finally:
        os.close(fd)
    assert f.read_bytes() == bytes(ref)
    vol.remount()
    assert f.read_bytes() == bytes(ref)


@pytest.mark.parametrize("new_size", [0, 1, 4095, 4096, 4097, 6000, 9000, 100000])
def test_truncate_grow_shrink(vol: Volume, new_size: int) -> None:
    f = vol.mountpoint / "t"
    data = os.urandom(8193)
    f.write_bytes(data)
    os.truncate(f, new_size)
    expect = data[:new_size] + bytes(max(0, new_size - len(data)))
    assert f.read_bytes() == expect
    with open(f, "r+b") as h:
        h.truncate(new_size // 2)
    assert f.read_bytes() == expect[: new_size // 2]
    vol.remount()
    assert f.read_bytes() == expect[: new_size // 2]


def test_sparse_file_and_holes(vol: Volume) -> None:
    f = vol.mountpoint / "sparse"
    with open(f, "wb") as h:
        h.seek(10 * 1024 * 1024)
        h.write(b"end")
    assert f.stat().st_size == 10 * 1024 * 1024 + 3
    with open(f, "rb") as h:
        assert h.read(1 << 20) == bytes(1 << 20)
        h.seek(10 * 1024 * 1024 - 2)
        assert h.read() == b"\0\0end"
    (backing,) = [p for p in vol.cipher_dir.iterdir() if not p.name.startswith((".", "encfs"))]
    assert backing.stat().st_blocks * 512 < 1 << 20  # the hole is not written out


def test_offsets_beyond_4gib(vol: Volume) -> None:
    f = vol.mountpoint / "huge"
    off = 5 * (1 << 30) + 12345
    with open(f, "wb") as h:
        h.seek(off)
        h.write(b"far away")
    assert f.stat().st_size == off + 8
    vol.remount()
    with open(f, "rb") as h:
        h.seek(off - 4)
        assert h.read() == b"\0\0\0\0far away"


def test_mmap_write_then_read_after_remount(vol: Volume) -> None:
    f = vol.mountpoint / "mm"
    with open(f, "wb") as h:
        h.truncate(3 * 4096 + 100)
    with open(f, "r+b") as rw, mmap.mmap(rw.fileno(), 0) as m:
        m[4090:4110] = b"x" * 20
        m[-5:] = b"tail!"
        m.flush()
    vol.remount()
    data = f.read_bytes()
    assert data[4090:4110] == b"x" * 20 and data[-5:] == b"tail!"
    assert data[:4090] == bytes(4090)


def test_fallocate_modes(vol: Volume) -> None:
    f = vol.mountpoint / "fa"
    f.write_bytes(b"abc")
    fd = os.open(f, os.O_RDWR)
    try:
        fallocate(fd, 0, 0, 10000)
        assert os.fstat(fd).st_size == 10000
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 50000)
        assert os.fstat(fd).st_size == 10000
        with pytest.raises(OSError) as info:
            fallocate(fd, 0x02 | FALLOC_FL_KEEP_SIZE, 0, 10)  # punch hole: not supported
        assert info.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    assert f.read_bytes() == b"abc" + bytes(9997)


# --- open flags -------------------------------------------------------------------------------


def test_open_flags(vol: Volume) -> None:
    f = vol.mountpoint / "flags"
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    os.write(fd, b"hello")
    os.close(fd)
    assert stat.S_IMODE(f.stat().st_mode) == 0o640
    with pytest.raises(FileExistsError):
        os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b" world")
    os.close(fd)
    assert f.read_bytes() == b"hello world"
    fd = os.open(f, os.O_RDWR | os.O_TRUNC)
    assert os.read(fd, 100) == b""
    os.write(fd, b"new")
    os.close(fd)
    assert f.read_bytes() == b"new"
    fd = os.open(f, os.O_WRONLY)  # write-only open of a partial block: RMW must work
    os.pwrite(fd, b"N", 0)
    os.close(fd)
    assert f.read_bytes() == b"New"


def _append_lines(path: str, tag: str, n: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for i in range(n):
        os.write(fd, f"{tag}-{i:05d}-{'x' * 50}\n".encode())
    os.close(fd)


def test_o_append_from_two_processes(vol: Volume) -> None:
    path = str(vol.mountpoint / "log")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_lines, args=(path, t, 2000)) for t in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    lines = Path(path).read_text().splitlines()
    assert len(lines) == 4000
    for tag in ("a", "b"):
        mine = [line for line in lines if line.startswith(tag + "-")]
        assert mine == [f"{tag}-{i:05d}-{'x' * 50}" for i in range(2000)]


def _write_slots(path: str, slot: int, slots: int, rounds: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    for r in range(rounds):
        for off in range(slot * 100, 64 * 1024, slots * 100):
            os.pwrite(fd, bytes([65 + slot]) * 100, off)
        if r % 2:
            os.fsync(fd)
    os.close(fd)


def test_concurrent_writers_never_lose_updates(vol: Volume) -> None:
    """Threads and processes write interleaved 100-byte slots that share 4 KiB blocks."""
    path = str(vol.mountpoint / "shared")
    with open(path, "wb") as h:
        h.truncate(64 * 1024)
    slots = 4
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_slots, args=(path, s, slots, 3)) for s in (0, 1)]
    threads = [threading.Thread(target=_write_slots, args=(path, s, slots, 3)) for s in (2, 3)]
    for p in procs:
        p.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    expect = bytearray(64 * 1024)
    for s in range(slots):
        for off in range(s * 100, 64 * 1024, slots * 100):
            expect[off : off + 100] = bytes([65 + s]) * 100
    assert Path(path).read_bytes() == bytes(expect)
    vol.remount()
    assert Path(path).read_bytes() == bytes(expect)


# --- namespace -------------------------------------------------------------------------------


def test_directories(vol: Volume) -> None:
    m = vol.mountpoint
    (m / "d" / "e").mkdir(parents=True)
    (m / "d" / "e" / "f").write_text("deep")
    with pytest.raises(OSError) as info:
        os.rmdir(m / "d")
    assert info.value.errno == errno.ENOTEMPTY
    names = [f"n{i:04d}" for i in range(500)] + ["with space", "ünïcødé", "x" * 255, ".hidden"]
    for n in names:
        (m / "d" / n).write_text(n)
    assert sorted(os.listdir(m / "d")) == sorted([*names, "e"])
    vol.remount()
    for n in names:
        assert (m / "d" / n).read_text() == n
    for n in names:
        (m / "d" / n).unlink()
    (m / "d" / "e" / "f").unlink()
    os.rmdir(m / "d" / "e")
    os.rmdir(m / "d")
    assert os.listdir(m) == []
    assert sorted(p.name for p in vol.cipher_dir.iterdir()) == sorted(
        [".encfs.dirid", "encfs.volume", "encfs.lock"]
    )


def test_new_directories_get_link_ids(vol: Volume) -> None:
    """A new volume (FEATURE_DIRID_LINKS) gives every directory its id as a link, made in
    one step with nothing to fsync; the names under it read back after a remount."""
    (vol.mountpoint / "a" / "b").mkdir(parents=True)
    (vol.mountpoint / "a" / "b" / "f").write_text("x")
    ids = [Path(d, ".encfs.dirid") for d, _dirs, _files in os.walk(vol.cipher_dir)]
    assert len(ids) == 3
    assert all(p.is_symlink() and len(os.readlink(p)) == 22 for p in ids)
    vol.remount()
    assert (vol.mountpoint / "a" / "b" / "f").read_text() == "x"


def test_name_too_long(vol: Volume) -> None:
    with pytest.raises(OSError) as info:
        (vol.mountpoint / ("y" * 256)).write_text("no")
    assert info.value.errno == errno.ENAMETOOLONG


def test_rename_semantics(vol: Volume) -> None:
    m = vol.mountpoint
    (m / "a").write_text("A")
    (m / "b").write_text("B")
    os.rename(m / "a", m / "b")  # over an existing file
    assert (m / "b").read_text() == "A" and not (m / "a").exists()
    (m / "dir1").mkdir()
    (m / "dir1" / "inner").write_text("in")
    (m / "dir2").mkdir()
    os.rename(m / "dir1", m / "dir2")  # over an empty directory
    assert (m / "dir2" / "inner").read_text() == "in"
    (m / "dir3").mkdir()
    (m / "dir3" / "x").write_text("x")
    with pytest.raises(OSError) as info:
        os.rename(m / "dir2", m / "dir3")  # over a non-empty directory
    assert info.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    os.rename(m / "dir2", m / "dir3" / "moved")  # into another directory
    assert (m / "dir3" / "moved" / "inner").read_text() == "in"
    os.rename(m / "b", m / "b")  # onto itself
    assert (m / "b").read_text() == "A"
    (m / "c").write_text("C")
    with pytest.raises(FileExistsError):
        renameat2(m / "c", m / "b", RENAME_NOREPLACE)
    renameat2(m / "c", m / "b", RENAME_EXCHANGE)
    assert (m / "b").read_text() == "C" and (m / "c").read_text() == "A"
    long_a, long_b = m / ("p" * 250), m / ("q" * 250)
    long_a.write_text("long")
    os.rename(long_a, long_b)
    vol.remount()
    assert long_b.read_text() == "long" and not long_a.exists()
    assert (m / "dir3" / "moved" / "inner").read_text() == "in"
    assert not list(vol.cipher_dir.glob("encfs.ln.*.name"))[1:]  # one companion, not two


def test_unlink_open_file_keeps_handle(vol: Volume) -> None:
    f = vol.mountpoint / "gone"
    f.write_bytes(b"still here" * 1000)
    with open(f, "r+b") as h:
        f.unlink()
        assert not f.exists()
        h.seek(0)
        assert h.read(10) == b"still here"
        h.write(b"more")
        h.flush()
        os.fsync(h.fileno())
        assert os.fstat(h.fileno()).st_size == 10000
    assert not f.exists()
    assert ".fuse_hidden" not in "".join(os.listdir(vol.mountpoint))  # gone after close


def test_hard_links(vol: Volume) -> None:
    m = vol.mountpoint
    (m / "orig").write_bytes(b"shared content")
    os.link(m / "orig", m / "alias")
    a, b = (m / "orig").stat(), (m / "alias").stat()
    assert a.st_ino == b.st_ino and a.st_nlink == 2
    with open(m / "alias", "r+b") as h:
        h.write(b"SHARED")
    assert (m / "orig").read_bytes() == b"SHARED content"
    (m / "sub").mkdir()
    os.rename(m / "alias", m / "sub" / "alias2")
    (m / "orig").unlink()
    vol.remount()
    assert (m / "sub" / "alias2").read_bytes() == b"SHARED content"
    assert (m / "sub" / "alias2").stat().st_nlink == 1


def test_symlinks(vol: Volume) -> None:
    m = vol.mountpoint
    (m / "target").write_text("t")
    os.symlink("target", m / "rel")
    os.symlink(str(m / "target"), m / "abs")
    os.symlink("does/not/exist", m / "dangling")
    long_target = "/".join(["segment"] * 300)[:2900]
    os.symlink(long_target, m / "long")
    assert os.readlink(m / "rel") == "target"
    assert (m / "rel").read_text() == "t" and (m / "abs").read_text() == "t"
    assert os.readlink(m / "long") == long_target
    assert os.lstat(m / "long").st_size == len(long_target)
    assert not (m / "dangling").exists() and (m / "dangling").is_symlink()
    with pytest.raises(OSError) as info:
        os.symlink("z" * 3500, m / "toolong")
    assert info.value.errno == errno.ENAMETOOLONG
    vol.remount()
    assert os.readlink(m / "abs") == str(m / "target")


def test_special_files(vol: Volume) -> None:
    m = vol.mountpoint
    os.mkfifo(m / "fifo", 0o600)
    assert stat.S_ISFIFO((m / "fifo").stat().st_mode)
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(m / "sock"))
        assert stat.S_ISSOCK((m / "sock").stat().st_mode)
    finally:
        sock.close()
    # Device nodes (root may make them; the kernel refuses CAP_MKNOD-less callers before
    # asking us): stored as device nodes, inert on the mount, which is nodev.
    os.mknod(m / "dev", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(m / "blk", 0o600 | stat.S_IFBLK, os.makedev(7, 200))
    st = (m / "dev").stat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert stat.S_ISBLK((m / "blk").stat().st_mode)
    assert (m / "blk").stat().st_rdev == os.makedev(7, 200)
    assert "nodev" in _mount_options(m)
    with pytest.raises(PermissionError):
        (m / "dev").open("rb")  # nodev: the kernel refuses, and never asks the daemon
    kinds = sorted(stat.S_IFMT(p.lstat().st_mode) for p in vol.backing_files())
    assert stat.S_IFCHR in kinds and stat.S_IFBLK in kinds


def _mount_options(mountpoint: Path) -> list[str]:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mountpoint):
            return fields[5].split(",")
    raise AssertionError(f"{mountpoint} is not mounted")


def test_metadata(vol: Volume) -> None:
    f = vol.mountpoint / "meta"
    f.write_text("m")
    os.chmod(f, 0o751)
    assert stat.S_IMODE(f.stat().st_mode) == 0o751
    os.chown(f, 1234, 5678)
    assert (f.stat().st_uid, f.stat().st_gid) == (1234, 5678)
    os.utime(f, ns=(1_000_000_001, 2_000_000_002))
    st = f.stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 2_000_000_002)
    subprocess.run(["touch", "-m", "-d", "2001-01-01 00:00:00 UTC", str(f)], check=True)
    st = f.stat()
    assert st.st_mtime == 978307200 and st.st_atime_ns == 1_000_000_001  # atime omitted
    assert os.access(f, os.R_OK)
    sv = os.statvfs(vol.mountpoint)
    assert sv.f_namemax == 255 and sv.f_blocks > 0
    vol.remount()
    assert f.stat().st_mtime == 978307200 and stat.S_IMODE(f.stat().st_mode) == 0o751


def test_fsync_and_fdatasync(vol: Volume) -> None:
    fd = os.open(vol.mountpoint / "s", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"durable")
    os.fsync(fd)
    os.fdatasync(fd)
    os.close(fd)
    assert (vol.mountpoint / "s").read_bytes() == b"durable"


def test_xattrs(vol: Volume) -> None:
    f = vol.mountpoint / "x"
    f.write_text("x")
    os.setxattr(f, "user.small", b"v")
    os.setxattr(f, "user.big", os.urandom(3000))  # ext4 caps a value at one block
    assert os.getxattr(f, "user.small") == b"v"
    assert set(os.listxattr(f)) == {"user.small", "user.big"}
    os.removexattr(f, "user.small")
    assert os.listxattr(f) == ["user.big"]
    with pytest.raises(OSError) as info:
        os.getxattr(f, "user.small")
    assert info.value.errno == errno.ENODATA
    with pytest.raises(OSError) as info:
        os.removexattr(f, "user.small")
    assert info.value.errno == errno.ENODATA
    # Only user.* exists: other namespaces are unsupported, as on a Linux filesystem
    # without them (getxattr answered on the adapter's fast path).
    for other in ("security.capability", "security.x", "trusted.x"):
        for call in (os.getxattr, os.removexattr):
            with pytest.raises(OSError) as info:
                call(f, other)
            assert info.value.errno == errno.EOPNOTSUPP, (call, other)
    with pytest.raises(OSError) as info:  # system.* too
        os.getxattr(f, "system.posix_acl_access")
    assert info.value.errno == errno.EOPNOTSUPP
    for other in ("security.x", "trusted.x"):  # the kernel checks a capability's value first
        with pytest.raises(OSError) as info:
            os.setxattr(f, other, b"1")
        assert info.value.errno == errno.EOPNOTSUPP, other
    with pytest.raises(FileNotFoundError):  # a negative lookup, also on a fast path
        os.stat(vol.mountpoint / "no-such-file")
    (vol.mountpoint / "d").mkdir()
    os.setxattr(vol.mountpoint / "d", "user.dir", b"on a directory")
    vol.remount()
    assert os.getxattr(vol.mountpoint / "d", "user.dir") == b"on a directory"


# --- mount options ---------------------------------------------------------------------------


def test_read_only_mount(make_volume: MakeVolume) -> None:
    vol: Volume = make_volume()
    (vol.mountpoint / "f").write_text("ro")
    vol.unmount()
    vol.options = ["ro"]
    vol.mount()
    assert (vol.mountpoint / "f").read_text() == "ro"
    for action in (
        lambda: (vol.mountpoint / "f").write_text("no"),
        lambda: (vol.mountpoint / "g").write_text("no"),
        lambda: (vol.mountpoint / "d").mkdir(),
        lambda: (vol.mountpoint / "f").unlink(),
    ):
        with pytest.raises(OSError) as info:
            action()
        assert info.value.errno == errno.EROFS


def test_foreground_mount_and_sigterm(make_volume: MakeVolume) -> None:
    import signal
    import time

    vol: Volume = make_volume(mount=False)
    proc = mount_foreground(vol.cipher_dir, vol.mountpoint, *vol.audit_args(), env=vol.env)
    deadline = time.monotonic() + 20
    while not os.path.ismount(vol.mountpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.path.ismount(vol.mountpoint)
    (vol.mountpoint / "fg").write_text("foreground")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert not os.path.ismount(vol.mountpoint)
    vol.mount()
    assert (vol.mountpoint / "fg").read_text() == "foreground"


def test_unknown_mount_option(make_volume: MakeVolume) -> None:
    vol: Volume = make_volume(mount=False)
    proc = encfs("mount", vol.cipher_dir, vol.mountpoint, "-o", "bogus", env=vol.env)
    assert proc.returncode == 2 and "unknown mount option 'bogus'" in proc.stderr


@pytest.mark.parametrize("block_size", [65536])
def test_large_block_size(make_volume: MakeVolume, block_size: int) -> None:
    vol: Volume = make_volume(block_size=block_size)
    data = os.urandom(3 * block_size + 123)
    f = vol.mountpoint / "big"
    f.write_bytes(data)
    with open(f, "r+b") as h:
        h.seek(block_size - 10)
        h.write(b"Z" * 20)
    expect = bytearray(data)
    expect[block_size - 10 : block_size + 10] = b"Z" * 20
    vol.remount()
    assert f.read_bytes() == bytes(expect)


# --- other users: allow_other, default_permissions -------------------------------------------
#
# The daemon runs as root. With ``-o allow_other,default_permissions`` other users get in, the
# kernel checks modes and owners against what encfs reports, and encfs must give every new
# entry to the user who made it, on disk. These tests act as nobody: uid and gid 65534, no
# supplementary groups.

NOBODY = 65534
MULTIUSER = ["allow_other", "default_permissions"]


@pytest.fixture
def reachable_tmp(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path`` with every directory from ``/`` down to it searchable by others (o+x):
    pytest makes its temporary directories 0700, so nobody could not reach a mount point in
    them. The old modes come back afterwards."""
    changed: list[tuple[Path, int]] = []
    for d in (*reversed(tmp_path.parents), tmp_path):
        mode = stat.S_IMODE(d.stat().st_mode)
        if not mode & stat.S_IXOTH:
            os.chmod(d, mode | stat.S_IXOTH)
            changed.append((d, mode))
    yield tmp_path
    for d, mode in reversed(changed):
        os.chmod(d, mode)


def as_nobody(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a forked child as uid/gid 65534 (``harness.as_user``)."""
    return as_user(fn, NOBODY)


def run_as_nobody(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def errno_of(fn: Callable[[], object]) -> int | None:
    """The errno ``fn()`` fails with, None if it succeeds."""
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return None


def _raise(exc: OSError) -> None:
    raise exc


def backing_of(vol: Volume, path: Path) -> Path:
    """The backing entry of a plaintext path: the one with its inode number (use_ino)."""
    ino = os.lstat(path).st_ino
    hits = [
        Path(dirpath, n)
        for dirpath, dirnames, filenames in os.walk(vol.cipher_dir, onerror=_raise)
        for n in (*dirnames, *filenames)
        if os.lstat(Path(dirpath, n)).st_ino == ino
    ]
    assert len(hits) == 1, (path, hits)
    return hits[0]


@pytest.fixture
def multiuser(make_volume: MakeVolume, reachable_tmp: Path) -> tuple[Volume, Path]:
    """A volume mounted with allow_other,default_permissions. Its root is root's and 0755; it
    holds ``shared``, root's sticky world-writable directory (1777), with two of root's files
    in it: ``secret`` (0600) and ``public`` (0644)."""
    vol: Volume = make_volume(options=MULTIUSER)
    os.chmod(vol.mountpoint, 0o755)
    shared = vol.mountpoint / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    for name, mode in (("secret", 0o600), ("public", 0o644)):
        (shared / name).write_text(f"root's {name}\n")
        os.chmod(shared / name, mode)
    return vol, shared


def test_entries_made_by_another_user_are_theirs(multiuser: tuple[Volume, Path]) -> None:
    vol, shared = multiuser
    long_name = "L" * 200

    def make() -> None:
        fd = os.open(shared / "file", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, b"nobody's data")
        os.close(fd)
        os.mkdir(shared / "dir", 0o750)
        (shared / "dir" / "nested").write_bytes(b"nested")
        os.symlink("file", shared / "link")
        os.mkfifo(shared / "fifo", 0o600)
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.bind(str(shared / "sock"))
        finally:
            sock.close()
        (shared / long_name).write_bytes(b"long name")

    as_nobody(make)
    expect = {
        "file": (stat.S_IFREG, 0o640),
        "dir": (stat.S_IFDIR, 0o750),
        "dir/nested": (stat.S_IFREG, 0o644),
        "link": (stat.S_IFLNK, 0o777),
        "fifo": (stat.S_IFIFO, 0o600),
        "sock": (stat.S_IFSOCK, 0o755),
        long_name: (stat.S_IFREG, 0o644),
    }

    def check() -> None:
        for rel, (kind, mode) in expect.items():
            st = os.lstat(shared / rel)
            assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), rel
            assert (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode)) == (kind, mode), rel
            backing = os.lstat(backing_of(vol, shared / rel))  # owned on disk, not just shown
            assert (backing.st_uid, backing.st_gid) == (NOBODY, NOBODY), rel
            assert stat.S_IFMT(backing.st_mode) == kind, rel
        for name in ("secret", "public"):
            st = os.stat(shared / name)
            assert (st.st_uid, st.st_gid) == (0, 0), name

    check()
    assert as_nobody(lambda: (shared / "file").read_bytes()) == b"nobody's data"
    assert as_nobody(lambda: os.readlink(shared / "link")) == "file"
    vol.remount()
    check()


def test_another_user_works_on_own_files(multiuser: tuple[Volume, Path]) -> None:
    vol, shared = multiuser
    data = os.urandom(10000)

    def work() -> dict[str, object]:
        f = shared / "mine"
        f.write_bytes(data)
        assert f.read_bytes() == data
        with open(f, "r+b") as h:  # a partial write across a block boundary
            h.seek(4090)
            h.write(b"Z" * 20)
        fd = os.open(f, os.O_WRONLY | os.O_APPEND)
        os.write(fd, b"tail")
        os.close(fd)
        os.truncate(f, 9000)  # by path
        with open(f, "r+b") as h:
            h.truncate(12000)  # by handle, growing
        os.rename(f, shared / "renamed")
        os.link(shared / "renamed", shared / "hardlink")
        os.chmod(shared / "renamed", 0o600)
        os.chown(shared / "renamed", -1, NOBODY)
        os.utime(shared / "renamed", ns=(1_000_000_000, 2_000_000_000))
        os.setxattr(shared / "renamed", "user.note", b"mine")
        os.mkdir(shared / "mydir")
        os.rename(shared / "hardlink", shared / "mydir" / "hardlink")
        st = os.stat(shared / "mydir" / "hardlink")
        return {
            "content": (shared / "mydir" / "hardlink").read_bytes(),
            "nlink": st.st_nlink,
            "same inode": st.st_ino == os.stat(shared / "renamed").st_ino,
            "xattr": os.getxattr(shared / "mydir" / "hardlink", "user.note"),
        }

    expect = bytearray(data)
    expect[4090:4110] = b"Z" * 20
    expect = (expect + b"tail")[:9000] + bytes(3000)
    facts = as_nobody(work)
    assert facts == {"content": expect, "nlink": 2, "same inode": True, "xattr": b"mine"}

    def check() -> None:
        for f in (shared / "renamed", shared / "mydir" / "hardlink"):
            st = os.stat(f)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o600)
            assert (st.st_nlink, st.st_mtime_ns) == (2, 2_000_000_000)
            assert f.read_bytes() == expect
            assert os.getxattr(f, "user.note") == b"mine"

    check()
    vol.remount()
    check()

    def clean_up() -> list[str]:
        os.unlink(shared / "mydir" / "hardlink")
        os.rmdir(shared / "mydir")
        os.unlink(shared / "renamed")
        return sorted(os.listdir(shared))

    assert as_nobody(clean_up) == ["public", "secret"]


def test_another_user_is_refused_what_is_not_theirs(multiuser: tuple[Volume, Path]) -> None:
    vol, shared = multiuser
    secret, public = shared / "secret", shared / "public"
    tries: dict[str, Callable[[], object]] = {
        "read 0600": lambda: secret.read_bytes(),
        "open 0644 for writing": lambda: os.close(os.open(public, os.O_WRONLY)),
        "open 0644 for appending": lambda: os.close(os.open(public, os.O_WRONLY | os.O_APPEND)),
        "truncate 0644": lambda: os.truncate(public, 0),
        "touch 0644": lambda: os.utime(public),
        "set times of 0644": lambda: os.utime(public, ns=(1, 1)),
        "chmod": lambda: os.chmod(public, 0o666),
        "chown": lambda: os.chown(public, NOBODY, NOBODY),
        "chgrp": lambda: os.chown(public, -1, NOBODY),
        "set a user xattr": lambda: os.setxattr(public, "user.x", b"1"),
        "unlink in sticky dir": lambda: os.unlink(public),
        "rename in sticky dir": lambda: os.rename(public, shared / "stolen"),
        "rename over in sticky dir": lambda: os.rename(shared / "mine", public),
        "create in root's 0755 dir": lambda: (vol.mountpoint / "intruder").write_text("x"),
        "mkdir in root's 0755 dir": lambda: os.mkdir(vol.mountpoint / "intruder-dir"),
    }
    expect = {
        "read 0600": errno.EACCES,
        "open 0644 for writing": errno.EACCES,
        "open 0644 for appending": errno.EACCES,
        "truncate 0644": errno.EACCES,
        "touch 0644": errno.EACCES,
        "set times of 0644": errno.EPERM,
        "chmod": errno.EPERM,
        "chown": errno.EPERM,
        "chgrp": errno.EPERM,
        "set a user xattr": errno.EACCES,
        "unlink in sticky dir": errno.EPERM,
        "rename in sticky dir": errno.EPERM,
        "rename over in sticky dir": errno.EPERM,
        "create in root's 0755 dir": errno.EACCES,
        "mkdir in root's 0755 dir": errno.EACCES,
    }
    if Path("/proc/sys/fs/protected_hardlinks").read_text().strip() == "1":
        tries["hard link to 0600"] = lambda: os.link(secret, shared / "hardlink")
        expect["hard link to 0600"] = errno.EPERM

    def attempt() -> dict[str, int | None]:
        (shared / "mine").write_text("mine")
        return {what: errno_of(fn) for what, fn in tries.items()}

    assert as_nobody(attempt) == expect
    assert as_nobody(lambda: public.read_text()) == "root's public\n"  # 0644 is readable
    for f, mode in ((secret, 0o600), (public, 0o644)):
        st = os.stat(f)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_nlink) == (0, 0, mode, 1)
        assert f.read_text() == f"root's {f.name}\n"
        assert os.listxattr(f) == []
    assert sorted(os.listdir(shared)) == ["mine", "public", "secret"]
    assert os.listdir(vol.mountpoint) == ["shared"]


def test_another_user_lists_and_stats(multiuser: tuple[Volume, Path]) -> None:
    _vol, shared = multiuser
    as_nobody(lambda: (shared / "mine").write_text("mine"))
    ls = run_as_nobody("ls", "-ln", shared)
    assert ls.returncode == 0, ls.stderr
    rows = {line.split()[-1]: line.split()[:5] for line in ls.stdout.splitlines()[1:]}
    assert rows == {
        "mine": ["-rw-r--r--", "1", str(NOBODY), str(NOBODY), "4"],
        "public": ["-rw-r--r--", "1", "0", "0", "14"],
        "secret": ["-rw-------", "1", "0", "0", "14"],
    }
    ls = run_as_nobody("ls", "-ld", shared, shared / "mine")
    assert ls.returncode == 0, ls.stderr
    assert [line.split()[:4] for line in ls.stdout.splitlines()] == [
        ["drwxrwxrwt", "2", "root", "root"],
        ["-rw-r--r--", "1", "nobody", "nogroup"],
    ]
    st = run_as_nobody("stat", "-c", "%n %F %u %g %a %s", shared / "mine", shared / "secret")
    assert st.returncode == 0, st.stderr
    assert st.stdout.splitlines() == [
        f"{shared / 'mine'} regular file {NOBODY} {NOBODY} 644 4",
        f"{shared / 'secret'} regular file 0 0 600 14",
    ]
    cat = run_as_nobody("cat", shared / "public", shared / "mine")
    assert (cat.returncode, cat.stdout) == (0, "root's public\nmine")
    cat = run_as_nobody("cat", shared / "secret")
    assert cat.returncode == 1 and "Permission denied" in cat.stderr and cat.stdout == ""


def test_without_allow_other_other_users_are_locked_out(
    make_volume: MakeVolume, reachable_tmp: Path
) -> None:
    vol: Volume = make_volume()
    os.chmod(vol.mountpoint, 0o755)
    (vol.mountpoint / "f").write_text("root's")
    os.chmod(vol.mountpoint / "f", 0o644)
    assert as_nobody(lambda: os.stat(reachable_tmp).st_uid) == 0  # the way there is open
    for fn in (
        lambda: os.stat(vol.mountpoint),
        lambda: os.listdir(vol.mountpoint),
        lambda: (vol.mountpoint / "f").read_text(),
    ):
        with pytest.raises(OSError) as info:
            as_nobody(fn)
        assert info.value.errno == errno.EACCES
    assert (vol.mountpoint / "f").read_text() == "root's"  # root still gets in


def test_setgid_directory_passes_its_group_on(
    multiuser: tuple[Volume, Path], reachable_tmp: Path
) -> None:
    """A setgid directory gives its group to what is made in it, and its setgid bit to
    subdirectories (shared project directories rely on it). The reference is the kernel
    filesystem tmp_path lives on."""
    vol, _shared = multiuser
    group = 4242
    ref, enc = reachable_tmp / "ref-team", vol.mountpoint / "team"
    for d in (ref, enc):
        d.mkdir()
        os.chown(d, 0, group)
        os.chmod(d, 0o2777)

    def make(d: Path) -> None:
        (d / "f").write_text("x")
        os.mkdir(d / "sub", 0o755)

    def facts(d: Path) -> list[tuple[int, int, int]]:
        return [
            (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
            for st in (os.lstat(d / "f"), os.lstat(d / "sub"))
        ]

    as_nobody(lambda: make(ref))
    as_nobody(lambda: make(enc))
    assert facts(ref) == [(NOBODY, group, 0o644), (NOBODY, group, 0o2755)]
    assert facts(enc) == facts(ref)
    for entry in (enc / "f", enc / "sub"):
        backing = os.lstat(backing_of(vol, entry))
        assert (backing.st_uid, backing.st_gid) == (NOBODY, group), entry


# --- nothing in the clear in the cipher dir ---------------------------------------------------

_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _marker() -> str:
    return "".join(secrets.choice(string.ascii_letters) for _ in range(16))


def _long_name(marker: str) -> str:
    return ((marker + "-") * 12)[:200]


def _leak_forms(marker: bytes) -> set[bytes]:
    """Every way ``marker`` could show up: raw, hex and, for each of the three alignments it
    can have inside a longer string, the base64 characters that depend on it alone (standard
    and URL-safe alphabets, padded or not)."""
    forms = {marker, marker.hex().encode(), marker.hex().upper().encode()}
    for shift in range(3):
        enc = base64.b64encode(bytes(shift) + marker)
        core = enc[(8 * shift + 5) // 6 : 4 * ((shift + len(marker)) // 3)]
        forms |= {core, core.translate(_URLSAFE)}
    return forms


def _everything_in(top: Path) -> tuple[list[tuple[str, bytes]], dict[str, int]]:
    """Every byte under ``top`` (itself included): entry names, regular files' contents,
    symlink targets, every xattr name and value; and a count of what was read."""
    seen: list[tuple[str, bytes]] = []
    counts = {"dir": 0, "undo dir": 0, "file": 0, "symlink": 0, "dirid link": 0, "other": 0}
    user_xattrs: set[tuple[int, str]] = set()  # (inode, name): hard links share them

    def visit(path: str) -> None:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            seen.append((f"{path} -> ", os.fsencode(os.readlink(path))))
            counts["dirid link" if path.endswith("/.encfs.dirid") else "symlink"] += 1
        elif stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                seen.append((path, f.read()))
            counts["file"] += 1
        elif stat.S_ISDIR(st.st_mode):  # encfs.undo/: not a volume directory, no id
            counts["undo dir" if path == os.path.join(top, fmt.UNDO_DIR_NAME) else "dir"] += 1
        else:
            counts["other"] += 1
        for name in os.listxattr(path, follow_symlinks=False):
            seen.append((f"{path} xattr name", os.fsencode(name)))
            seen.append((f"{path} xattr {name}", os.getxattr(path, name, follow_symlinks=False)))
            if name.startswith("user.") and name != fmt.ROOT_ATTRS_XATTR:  # the root's mode
                user_xattrs.add((st.st_ino, name))

    visit(str(top))
    for dirpath, dirnames, filenames in os.walk(top, onerror=_raise):
        for name in (*dirnames, *filenames):
            seen.append((f"name in {dirpath}", os.fsencode(name)))
            visit(os.path.join(dirpath, name))
    counts["user xattr"] = len(user_xattrs)
    return seen, counts


def test_leak_forms_find_embedded_encodings() -> None:
    """The detector itself: a marker inside a longer string is found however it is encoded."""
    marker = _marker().encode()
    forms = _leak_forms(marker)
    assert not any(f in _leak_forms(_marker().encode()) for f in forms)
    for pre in range(6):
        blob = os.urandom(pre) + marker + os.urandom(7)
        for encoded in (
            blob,
            blob.hex().encode(),
            blob.hex().upper().encode(),
            base64.b64encode(blob),
            base64.urlsafe_b64encode(blob).rstrip(b"="),
        ):
            assert any(f in encoded for f in forms), (pre, encoded)


def test_cipher_dir_holds_no_plaintext(make_volume: MakeVolume) -> None:
    """Names, contents, symlink targets, directory names, xattr names and values: none of
    them is in the cipher dir, raw, hex or base64, once everything is flushed."""
    vol: Volume = make_volume()
    m = vol.mountpoint
    mk = {
        key: _marker()
        for key in (
            "name", "tiny", "big name", "big", "long name", "long content", "dir", "inner",
            "inner content", "long dir", "deep", "twin", "edit name", "edit", "edit2",
            "link", "target", "long link", "long target", "fifo", "hard link", "old", "new",
            "moved content", "gone", "gone long", "xname", "xvalue", "long xname", "big xvalue",
            "dir xname", "dir xvalue", "root xname", "root xvalue", "repeat",
        )
    }  # fmt: skip
    big = bytearray(os.urandom(3 * 4096 + 100))
    for off in (0, 4090, 8192 + 7, len(big) - 16):  # the second one straddles two blocks
        big[off : off + 16] = mk["big"].encode()
    d = m / f"dir-{mk['dir']}"
    contents = {
        m / f"tiny-{mk['name']}": mk["tiny"].encode(),  # a file of 16 bytes
        m / f"big-{mk['big name']}": bytes(big),
        m / _long_name(mk["long name"]): mk["long content"].encode(),
        d / f"inner-{mk['inner']}": f"some text {mk['inner content']} more text\n".encode(),
        d / _long_name(mk["long dir"]) / "deep": mk["deep"].encode() * 3,
        m / f"twin-{mk['twin']}": b"",
        d / f"twin-{mk['twin']}": b"",
        m / "repeat": mk["repeat"].encode() * 1024,  # 4 blocks of one 16-byte pattern
    }
    (d / _long_name(mk["long dir"])).mkdir(parents=True)
    for path, data in contents.items():
        path.write_bytes(data)
    edited = m / f"edit-{mk['edit name']}"
    edit = bytearray(os.urandom(3 * 4096))
    edited.write_bytes(edit)
    with open(edited, "r+b") as h:  # rewrites in place: read-modify-write of sealed blocks
        for off, key in ((4090, "edit"), (100, "edit2")):
            h.seek(off)
            h.write(mk[key].encode())
            edit[off : off + 16] = mk[key].encode()
    contents[edited] = bytes(edit)
    links = {
        m / f"link-{mk['link']}": f"../target/{mk['target']}",
        m / f"longlink-{mk['long link']}": "/".join([mk["long target"]] * 120)[:2000],
    }
    for path, target in links.items():
        os.symlink(target, path)
    os.mkfifo(m / f"fifo-{mk['fifo']}")
    os.link(m / f"big-{mk['big name']}", m / f"hard-{mk['hard link']}")
    (m / f"old-{mk['old']}").write_text(mk["moved content"])
    os.rename(m / f"old-{mk['old']}", d / f"new-{mk['new']}")
    contents[d / f"new-{mk['new']}"] = mk["moved content"].encode()
    for gone in (m / f"gone-{mk['gone']}", m / _long_name(mk["gone long"])):
        gone.write_text(gone.name)
        gone.unlink()
    xattrs = {
        (m / f"tiny-{mk['name']}", f"user.{mk['xname']}"): mk["xvalue"].encode(),
        (m / f"big-{mk['big name']}", "user." + ((mk["long xname"] + ".") * 9)[:150]): (
            os.urandom(1000) + mk["big xvalue"].encode() + os.urandom(2000)
        ),
        (d, f"user.{mk['dir xname']}"): mk["dir xvalue"].encode(),
        (m, f"user.{mk['root xname']}"): mk["root xvalue"].encode(),
    }
    for (path, name), value in xattrs.items():
        os.setxattr(path, name, value)

    # everything reads back, so the plaintext did reach encfs
    for path, data in contents.items():
        assert path.read_bytes() == data, path
    for path, target in links.items():
        assert os.readlink(path) == target
    for (path, name), value in xattrs.items():
        assert os.getxattr(path, name) == value
    assert (m / f"hard-{mk['hard link']}").read_bytes() == bytes(big)
    twins = [backing_of(vol, p).name for p in (m / f"twin-{mk['twin']}", d / f"twin-{mk['twin']}")]
    assert twins[0] != twins[1]  # equal names in two directories encrypt differently
    repeat_backing = backing_of(vol, m / "repeat")
    vol.unmount()

    seen, counts = _everything_in(vol.cipher_dir)
    assert counts["symlink"] == len(links) and counts["other"] == 1  # the fifo
    assert counts["dirid link"] == counts["dir"]  # their targets were scanned too
    assert counts["user xattr"] == len(xattrs)
    plain_bytes = sum(map(len, contents.values())) - len(big)  # the hard link shares one inode
    assert sum(len(blob) for _, blob in seen) > plain_bytes
    leaks = [
        (where, key)
        for key, marker in mk.items()
        for form in _leak_forms(marker.encode())
        for where, blob in seen
        if form in blob
    ]
    assert leaks == []
    # identical plaintext blocks do not give identical ciphertext anywhere in the file
    raw = repeat_backing.read_bytes()
    windows = {raw[i : i + 16] for i in range(len(raw) - 15)}
    assert len(windows) == len(raw) - 15


# --- fio: its own checksums over real workloads -----------------------------------------------

MIB = 1 << 20
SEQ_JOB = (
    "--name=seq", "--filename=seq.dat", "--rw=write", "--bs=1M", "--size=64M",
    "--ioengine=psync", "--end_fsync=1",
)  # fmt: skip
MMAP_JOB = (
    "--name=mmap", "--filename=mmap.dat", "--rw=randwrite", "--bs=4k", "--size=16M",
    "--ioengine=mmap", "--do_verify=1",
)  # fmt: skip


def _fio(vol: Volume, out_dir: Path, *job: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run one fio job on the mount. Every block it writes carries a crc32c checksum, offset
    and sequence number, which its verify phase (or ``--verify_only``) checks on read."""
    out = out_dir / "fio.json"
    out.unlink(missing_ok=True)
    proc = subprocess.run(
        [
            "fio",
            f"--directory={vol.mountpoint}",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--output-format=json",
            f"--output={out}",
            *job,
        ],
        cwd=out_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, out.read_text() if out.exists() else ""


def run_fio(vol: Volume, out_dir: Path, *job: str) -> list[dict[str, Any]]:
    """``_fio``, asserting it succeeded and found nothing wrong; the per-job results."""
    proc, report = _fio(vol, out_dir, *job)
    text = proc.stdout + proc.stderr + report
    assert proc.returncode == 0, text
    assert "verify:" not in text and "bad magic" not in text, text
    jobs: list[dict[str, Any]] = json.loads(report)["jobs"]
    assert [j["error"] for j in jobs] == [0] * len(jobs), text
    return jobs


def test_fio_sequential_write_verifies_and_survives_remount(
    make_volume: MakeVolume, tmp_path: Path
) -> None:
    vol: Volume = make_volume()
    (job,) = run_fio(vol, tmp_path, *SEQ_JOB)
    assert (job["write"]["io_bytes"], job["read"]["io_bytes"]) == (64 * MIB, 64 * MIB)
    assert (vol.mountpoint / "seq.dat").stat().st_size == 64 * MIB
    vol.remount()
    (job,) = run_fio(vol, tmp_path, *SEQ_JOB, "--verify_only")
    assert job["read"]["io_bytes"] == 64 * MIB
    # the check is live: one changed 4 KiB inside a 1 MiB block is reported
    with open(vol.mountpoint / "seq.dat", "r+b") as h:
        h.seek(5 * MIB + 7 * 4096)
        h.write(bytes(4096))
    proc, report = _fio(vol, tmp_path, *SEQ_JOB, "--verify_only")
    assert proc.returncode != 0 and "verify" in proc.stdout + proc.stderr + report


def test_fio_random_4k_writes_verify(make_volume: MakeVolume, tmp_path: Path) -> None:
    vol: Volume = make_volume()
    (job,) = run_fio(
        vol, tmp_path, "--name=rand", "--filename=rand.dat", "--rw=randwrite", "--bs=4k",
        "--size=32M", "--ioengine=psync", "--direct=1", "--do_verify=1",
    )  # fmt: skip
    assert (job["write"]["io_bytes"], job["read"]["io_bytes"]) == (32 * MIB, 32 * MIB)


def test_fio_mixed_jobs_on_separate_files_verify(make_volume: MakeVolume, tmp_path: Path) -> None:
    """Two processes, each on its own file, mixing reads with writes of 512 B..64 KiB (most
    of them partial blocks), read back directly from encfs (O_DIRECT) and verified."""
    vol: Volume = make_volume()
    jobs = run_fio(
        vol, tmp_path, "--name=mixed", "--rw=randrw", "--bsrange=512-64k", "--size=16M",
        "--numjobs=2", "--ioengine=psync", "--direct=1", "--do_verify=1",
    )  # fmt: skip
    assert len(jobs) == 2
    for job in jobs:
        assert job["write"]["io_bytes"] > 4 * MIB
        assert job["read"]["io_bytes"] > job["write"]["io_bytes"]  # mixed reads + verify
    files = sorted(os.listdir(vol.mountpoint))
    assert files == ["mixed.0.0", "mixed.1.0"]
    assert [(vol.mountpoint / f).stat().st_size for f in files] == [16 * MIB] * 2


def test_fio_mmap_writes_verify_and_survive_remount(
    make_volume: MakeVolume, tmp_path: Path
) -> None:
    vol: Volume = make_volume()
    (job,) = run_fio(vol, tmp_path, *MMAP_JOB)
    assert (job["write"]["io_bytes"], job["read"]["io_bytes"]) == (16 * MIB, 16 * MIB)
    vol.remount()
    (job,) = run_fio(vol, tmp_path, *MMAP_JOB, "--verify_only")
    assert job["read"]["io_bytes"] == 16 * MIB


# --- the native path (encfs/fastpath.py): the same answers, counted ---------------------


def _native_workload(vol: Volume, seed: int) -> tuple[int, int, int, int]:
    """Random O_DIRECT I/O on one file against a model: aligned reads and whole-block
    overwrites (what the native path serves), unaligned reads and partial writes (what it
    hands to Python); every answer checked. Returns (reads, bytes read, writes, bytes
    written) as the mount must count them: O_DIRECT makes each call one request."""
    rnd = random.Random(seed)
    path = vol.mountpoint / f"native-{seed}"
    model = bytearray(rnd.randbytes(48 * 4096 + 1000))
    path.write_bytes(model)
    reads = read_bytes = writes = written = 0
    with DirectFile(path) as f:
        for _ in range(400):
            block, n = rnd.randrange(50), rnd.choice([1, 1, 2, 8])
            off, size = block * 4096, n * 4096
            if rnd.random() < 0.2:
                off, size = off + rnd.randrange(1, 4096), rnd.randrange(1, 9000)
            if rnd.random() < 0.35 and off + size <= 48 * 4096:
                data = rnd.randbytes(size)
                assert f.pwrite(data, off) == size
                model[off : off + size] = data
                writes, written = writes + 1, written + size
            else:
                got = f.pread(size, off)
                assert got == bytes(model[off : off + size]), (off, size)
                if off < len(model):  # (at the end of the file the kernel asks nothing)
                    reads, read_bytes = reads + 1, read_bytes + len(got)
    assert path.read_bytes() == bytes(model)
    return reads, read_bytes, writes, written


def _counted(vol: Volume, seed: int) -> tuple[dict[str, int], tuple[int, int, int, int]]:
    before = vol.status()["counters"]
    done = _native_workload(vol, seed)
    after = vol.status()["counters"]
    delta = {k: after[k] - before.get(k, 0) for k in after}
    reads, read_bytes, writes, written = done
    # The final read_bytes() through the page cache adds reads; writes are exact.
    assert (delta["writes"], delta["bytes_written"]) == (writes + 1, written + 48 * 4096 + 1000)
    assert delta["reads"] >= reads and delta["bytes_read"] >= read_bytes
    return delta, done


@pytest.mark.parametrize("double", [False, True], ids=["single", "double"])
def test_the_native_path_serves_aligned_io_and_counts_it(
    make_volume: MakeVolume, double: bool
) -> None:
    """On a double volume too: both layers sealed and opened natively, and what the
    native path wrote reads back in Python after a remount."""
    vol = make_volume(double=double)
    status = vol.status()
    if not status["io_path"].startswith("native"):
        pytest.skip(f"no native path here: {status['io_path']}")
    delta, (reads, _rb, writes, _wb) = _counted(vol, 1)
    assert delta["native_reads"] > reads // 2, delta  # most reads are aligned: native
    assert delta["native_writes"] > writes // 3, delta
    assert delta["native_fallbacks"] > 0, delta  # the unaligned ones went to Python
    text = encfs("status", vol.mountpoint).stdout
    assert "I/O path     native (" in text
    # A stream of large writes: the Sealer's jobs are sealed natively once the file is
    # keyed (at its second job's write), but for those Python sealed ahead meanwhile (at
    # most Sealer.MAX_PENDING, 8 MiB).
    sealed_before = vol.status()["counters"]["native_bytes_sealed"]
    stream = os.urandom(32 << 20)
    with open(vol.mountpoint / "stream", "wb") as f:
        for off in range(0, len(stream), 1 << 20):
            f.write(stream[off : off + (1 << 20)])
        f.flush()
        os.fsync(f.fileno())
    sealed = vol.status()["counters"]["native_bytes_sealed"] - sealed_before
    assert (16 << 20) <= sealed <= len(stream), sealed
    vol.remount()  # what the native path wrote is the file
    assert (vol.mountpoint / "stream").read_bytes() == stream
    _counted(vol, 1)


@pytest.mark.parametrize(
    ("env", "io_path", "warned"),
    [
        ({"ENCFS_NATIVE": "0"}, "Python: disabled (ENCFS_NATIVE=0)", False),
        (
            {"ENCFS_FASTPATH_LIBRARY": "/nonexistent/libencfs_fastpath.so"},
            "Python: /nonexistent/libencfs_fastpath.so is not built (scripts/install builds it)",
            True,
        ),
    ],
)
def test_without_the_native_path_python_serves_everything(
    make_volume: MakeVolume, env: dict[str, str], io_path: str, warned: bool
) -> None:
    """Disabled, or its library missing: every request is served in Python, as before;
    ``encfs status`` says so, and the log warns when the library should have been there."""
    vol: Volume = make_volume(mount=False)
    vol.env.update(env)
    mounted = vol.mount()
    status = vol.status()
    assert status["io_path"] == io_path
    assert "native_reads" not in status["counters"]
    _counted(vol, 2)
    assert (f"encfs: WARNING: I/O path: {io_path}" in mounted.stderr) == warned, mounted.stderr
    assert f"I/O path     {io_path}" in encfs("status", vol.mountpoint).stdout


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (scripts/install)")
@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_block_rewrites_ask_for_their_partial_backing_pages_first(
    make_volume: MakeVolume, native: bool
) -> None:
    """Every whole-block rewrite, served natively or in Python, asks the backing
    filesystem for the two pages the cipher block covers in part (one
    ``posix_fadvise(WILLNEED)``) before it writes, so a cold rewrite waits for one disk
    request rather than two in a row (docs/BENCHMARKS.md: ~110 -> ~65 us)."""
    vol: Volume = make_volume(mount=False)
    if not native:
        vol.env["ENCFS_NATIVE"] = "0"
    vol.mount()
    path = vol.mountpoint / "f"
    path.write_bytes(os.urandom(12 * 4096))
    page = os.sysconf("SC_PAGESIZE")
    cipher_off = vol.geometry.block_cipher_off(3)
    cipher_end = cipher_off + vol.geometry.cipher_block_size
    head, tail = cipher_off - cipher_off % page, cipher_end - cipher_end % page
    assert cipher_off != head and cipher_end != tail and tail == head + page  # two edges
    wanted = re.compile(rf"fadvise64\(\d+, {head}, {2 * page}, POSIX_FADV_WILLNEED\)")
    trace = vol.mountpoint.parent / "fadvise.trace"
    rewrites = 4  # the native entry is made at the second request Python serves
    with DirectFile(path) as f:
        tracer = subprocess.Popen(
            ["strace", "-qq", "-f", "-p", str(vol.daemon_pid()), "-o", str(trace),
             "-e", "trace=fadvise64"],
        )  # fmt: skip
        try:
            time.sleep(1.0)  # strace attached to every thread
            for _ in range(rewrites):
                assert f.pwrite(os.urandom(4096), 3 * 4096) == 4096
        finally:
            tracer.terminate()
            tracer.wait(timeout=30)
    asked = [line for line in trace.read_text().splitlines() if "fadvise64(" in line]
    assert len([line for line in asked if wanted.search(line)]) == rewrites, asked
    assert len(asked) == rewrites, asked  # and nothing else
    counters = vol.status()["counters"]
    assert (counters.get("native_writes", 0) > 0) == native, counters


def test_direct_reads_racing_writes_see_one_write_or_the_other(vol: Volume) -> None:
    """64 KiB rewritten whole (natively) and 256 KiB (in Python) again and again while
    another thread reads 64 KiB of it: every read holds one version of it."""
    path = vol.mountpoint / "raced"
    path.write_bytes(bytes(64 * 4096))
    stop = threading.Event()

    def writer() -> None:
        with DirectFile(path) as f:
            version = 1
            while not stop.is_set():
                f.pwrite(bytes([version]) * 16 * 4096, 0)
                if version % 5 == 0:
                    f.pwrite(bytes([version]) * 64 * 4096, 0)
                version = version % 250 + 1

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    mixed = seen = 0
    try:
        with DirectFile(path, os.O_RDONLY) as f:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                got = f.pread(16 * 4096, 0)
                seen += 1
                mixed += got != got[:1] * len(got)
    finally:
        stop.set()
        t.join(10)
    assert mixed == 0, f"{mixed} of {seen} reads held two writes"
    assert seen > 100


# --- caches: hard-link names, large listings, set-ID bits -------------------------------


def test_hard_link_names_see_each_others_changes(vol: Volume) -> None:
    """libfuse gives each name its own kernel inode; a change through one name must show
    at once through the others (size, content, mode, link count), not after a timeout."""
    a, b = vol.mountpoint / "a", vol.mountpoint / "b"
    a.write_bytes(b"x")
    os.link(a, b)
    assert b.stat().st_size == 1 and b.read_bytes() == b"x"  # both names now cached
    with open(a, "r+b") as f:
        f.seek(7979)
        f.write(b"tail")
    assert b.stat().st_size == 7983
    assert b.read_bytes() == b"x" + bytes(7978) + b"tail"
    os.truncate(b, 3)
    assert a.stat().st_size == 3 and a.read_bytes() == b"x\0\0"
    os.chmod(a, 0o600)
    assert stat.S_IMODE(b.stat().st_mode) == 0o600
    c = vol.mountpoint / "c"
    os.link(b, c)
    assert a.stat().st_nlink == 3
    os.unlink(c)
    assert a.stat().st_nlink == 2 and b.stat().st_nlink == 2


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_hard_linked_special_files_show_one_set_of_attributes(vol: Volume, kind: str) -> None:
    """Every name of one FIFO or socket shows the same link count, mode and ctime at once
    (a POSIX conformance suite checks exactly this on link/unlink/chmod/chown)."""
    a, b, c = (vol.mountpoint / n for n in "abc")
    if kind == "fifo":
        os.mkfifo(a, 0o644)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(a))
        sock.close()
    os.link(a, b)
    assert a.lstat().st_nlink == b.lstat().st_nlink == 2  # both names now cached
    os.link(b, c)
    assert a.lstat().st_nlink == 3
    before = a.lstat().st_ctime_ns
    time.sleep(0.01)
    os.chmod(b, 0o600)
    os.chown(c, 4321, 8765)
    for name in (a, b, c):
        st = name.lstat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and (st.st_uid, st.st_gid) == (4321, 8765)
        assert st.st_ctime_ns > before
    os.unlink(c)
    assert a.lstat().st_nlink == b.lstat().st_nlink == 1 + 1


def test_large_directory_listing(vol: Volume) -> None:
    """Listings that span many kernel buffers come back whole, once each, with attributes."""
    d = vol.mountpoint / "big"
    d.mkdir()
    names = {f"{i:05d}-" + "n" * 150 for i in range(1500)}
    for i, name in enumerate(sorted(names)):
        (d / name).write_bytes(b"z" * (i % 7))
    vol.remount()
    listed = os.listdir(d)
    assert len(listed) == len(names) and set(listed) == names
    sizes = {e.name: e.stat().st_size for e in os.scandir(d)}
    assert all(sizes[name] == i % 7 for i, name in enumerate(sorted(names)))


def test_write_and_truncate_by_other_user_clear_setid_bits(
    multiuser: tuple[Volume, Path],
) -> None:
    """As on a kernel filesystem: a write or truncation by a user without CAP_FSETID clears
    set-user-ID and (on group-executable files) set-group-ID; root's own writes keep them."""
    _vol, root = multiuser
    nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    # Written first without the bits: with HANDLE_KILLPRIV_V2 the kernel then stops asking
    # about this inode (S_NOSEC); the bits set afterwards must still be cleared by us.
    (root / "s").write_bytes(b"")
    os.chmod(root / "s", 0o777)
    subprocess.run([*nobody, "sh", "-c", f"echo first >> {root / 's'}"], check=True)
    for name in ("w", "t", "r", "s"):
        if name != "s":
            (root / name).write_bytes(b"hi\n")
        os.chmod(root / name, 0o6777)
    subprocess.run([*nobody, "sh", "-c", f"echo again >> {root / 's'}"], check=True)
    subprocess.run([*nobody, "sh", "-c", f"echo more >> {root / 'w'}"], check=True)
    subprocess.run([*nobody, "truncate", "-s", "1", str(root / "t")], check=True)
    with open(root / "r", "ab") as f:
        f.write(b"root\n")
    assert stat.S_IMODE(os.stat(root / "w").st_mode) == 0o777
    assert stat.S_IMODE(os.stat(root / "t").st_mode) == 0o777
    assert stat.S_IMODE(os.stat(root / "r").st_mode) == 0o6777
    assert stat.S_IMODE(os.stat(root / "s").st_mode) == 0o777
    assert (root / "w").read_bytes() == b"hi\nmore\n"
    assert (root / "s").read_bytes() == b"first\nagain\n"


def test_writes_cost_no_capability_round_trip(make_volume: MakeVolume) -> None:
    """scripts/install builds libfuse 3.17 into the venv; with it the mount negotiates
    HANDLE_KILLPRIV_V2 and the kernel stops asking for ``security.capability`` before every
    write(2) (bookworm's libfuse 3.14 cannot: one more round trip per write)."""
    vol: Volume = make_volume()
    before = json.loads(encfs("status", vol.mountpoint, "--json", check=True).stdout)
    assert before["libfuse"] == {"version": "3.17", "killpriv_v2": True}, (
        "the mount is not on the libfuse 3.17 that scripts/build-libfuse installs"
    )
    probes = before["counters"]["security_probes"]
    fd = os.open(vol.mountpoint / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for i in range(200):
            os.pwrite(fd, b"x" * 4096, i * 4096)
    finally:
        os.close(fd)
    after = json.loads(encfs("status", vol.mountpoint, "--json", check=True).stdout)
    assert after["counters"]["security_probes"] - probes <= 2  # the first write asks once
    assert after["counters"]["writes"] - before["counters"]["writes"] >= 200
    assert "HANDLE_KILLPRIV_V2" in encfs("status", vol.mountpoint, check=True).stdout


def test_writeback_cache_option(make_volume: MakeVolume) -> None:
    """-o writeback_cache mounts and keeps data byte-exact through small unaligned writes."""
    vol: Volume = make_volume(options=["writeback_cache"])
    p = vol.mountpoint / "f"
    ref = bytearray()
    with open(p, "wb") as f:
        for i in range(300):
            chunk = bytes([i % 251]) * (i * 37 % 5000 + 1)
            f.write(chunk)
            ref += chunk
    vol.remount()
    assert p.read_bytes() == bytes(ref)


def test_stream_writes_are_seen_by_every_other_view(make_volume: MakeVolume) -> None:
    """Long sequential writes are sealed in the background (cipherfile.Sealer); a second
    handle, stat, a directory listing, a hard link and fsync all see every byte, and so
    does the volume after a remount."""
    vol: Volume = make_volume()
    p = vol.mountpoint / "big"
    mib = 1 << 20
    data = os.urandom(12 * mib)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for i in range(12):
            assert os.pwrite(fd, data[i * mib : (i + 1) * mib], i * mib) == mib
            if i in (3, 8):
                assert os.stat(p).st_size == (i + 1) * mib
                with open(p, "rb", buffering=0) as f:
                    assert f.read() == data[: (i + 1) * mib]
        os.link(p, vol.mountpoint / "alias")
        assert os.stat(vol.mountpoint / "alias").st_size == len(data)
        assert {e.name: e.stat().st_size for e in os.scandir(vol.mountpoint)}["big"] == len(data)
        os.fsync(fd)
        os.ftruncate(fd, 5 * mib + 7)
    finally:
        os.close(fd)
    assert p.read_bytes() == data[: 5 * mib + 7]
    vol.remount()
    assert p.read_bytes() == data[: 5 * mib + 7]
    assert (vol.mountpoint / "alias").read_bytes() == data[: 5 * mib + 7]


def test_mount_reads_ahead_a_mebibyte(make_volume: MakeVolume) -> None:
    """The kernel starts every FUSE mount at 128 KiB of readahead; the daemon (root) raises
    its mount's to 1 MiB, so sequential reads arrive as 1 MiB requests."""
    vol: Volume = make_volume()
    dev = os.stat(vol.mountpoint).st_dev
    knob = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    assert int(knob.read_text()) == 1024
    data = os.urandom(3 << 20)
    (vol.mountpoint / "f").write_bytes(data)
    vol.remount()
    assert (vol.mountpoint / "f").read_bytes() == data


# --- deferred stream writes at the operations layer (no mount: the queue is observed) ------


def _ops(tmp_path: Path) -> tuple[Any, int, int]:
    """EncfsOperations over a fresh cipher dir, with a stream begun on ``/s`` (one long
    write, so the next contiguous ones are queued); returns (ops, rw fh, ro fh)."""
    from encfs import backing, names
    from encfs.fs import EncfsOperations, FsOptions
    from encfs.keys import VolumeKeys

    keys = VolumeKeys(bytearray(os.urandom(32)), volume_id=os.urandom(16), block_size=4096)
    names.write_dirid(backing.open_root(str(tmp_path)), link=False)
    ops = EncfsOperations(str(tmp_path), keys, 4096, FsOptions())
    fh = ops.create("/s", 0o644, os.O_RDWR | os.O_CREAT)
    ops.write(None, os.urandom(1 << 20), 0, fh)
    return ops, fh, ops.open("/s", os.O_RDONLY)


def test_fsync_waits_for_queued_stream_writes(tmp_path: Path) -> None:
    ops, fh, _ro = _ops(tmp_path)
    mib = 1 << 20
    data = os.urandom(8 * mib)  # made first: queuing outpaces sealing
    for i in range(1, 9):
        ops.write(None, data[(i - 1) * mib : i * mib], i * mib, fh)
    ops.fsync(None, 0, fh)
    assert os.fstat(fh).st_size == ops.geo.cipher_size(9 * mib)  # all of it, sealed


def test_a_failed_queued_write_is_reported_by_fsync(tmp_path: Path) -> None:
    """README: an I/O error in a queued write is returned by the file's next fsync."""
    ops, fh, ro = _ops(tmp_path)
    mib = 1 << 20
    ops.write(None, os.urandom(mib), mib, ro)  # queued; its fd cannot write
    with pytest.raises(OSError) as failed:
        ops.fsync(None, 0, fh)
    assert failed.value.errno == errno.EBADF
    ops.fsync(None, 0, fh)  # reported once


def test_suspension_seals_queued_writes_before_the_keys_go(tmp_path: Path) -> None:
    """SECURITY.md: suspension drains the queue before it wipes the keys; nothing queued is
    dropped."""
    ops, fh, _ro = _ops(tmp_path)
    mib = 1 << 20
    data = os.urandom(8 * mib)  # made first: queuing outpaces sealing
    for i in range(1, 9):
        ops.write(None, data[(i - 1) * mib : i * mib], i * mib, fh)
    ops.suspend()
    cfile = ops.files[fh]
    assert cfile.pending == 0 and cfile.deferred_error is None
    assert os.fstat(fh).st_size == ops.geo.cipher_size(9 * mib)


def test_xattr_errors_agree_on_the_fast_path_and_in_the_operations(tmp_path: Path) -> None:
    """A name outside user.* is an unsupported namespace (EOPNOTSUPP) for get, set and
    remove, and the adapter's fast path for getxattr (``foreign_xattr``) answers the same;
    a missing user.* attribute is ENODATA; while suspended, the suspended errno."""
    ops, _fh, _ro = _ops(tmp_path)

    def errno_of(call: Callable[..., object], *args: object) -> int | None:
        with pytest.raises(OSError) as info:
            call("/s", *args)
        return info.value.errno

    for name in ("security.capability", "trusted.x", "system.posix_acl_access", "bogus"):
        assert errno_of(ops.getxattr, name) == errno.EOPNOTSUPP, name
        assert errno_of(ops.setxattr, name, b"1", 0) == errno.EOPNOTSUPP, name
        assert errno_of(ops.removexattr, name) == errno.EOPNOTSUPP, name
    assert ops.foreign_xattr() == errno.EOPNOTSUPP
    assert errno_of(ops.getxattr, "user.none") == errno.ENODATA
    assert errno_of(ops.removexattr, "user.none") == errno.ENODATA
    ops.suspend()
    assert ops.foreign_xattr() == errno.EACCES
    assert errno_of(ops.getxattr, "security.capability") == errno.EACCES
    assert ops.counters.security_probes == 2


def test_suspension_drops_the_blocks_kept_for_appends(tmp_path: Path) -> None:
    """No plaintext outlives the keys: the partial block an append would continue from
    memory (``CipherFile._tail``) goes at suspension, with every open file's."""
    ops, fh, _ro = _ops(tmp_path)
    ops.write(None, b"x" * 5000, 2 << 20, fh)  # ends mid-block: the block is kept
    cfile = ops.files[fh]
    assert cfile._tail is not None
    ops.suspend()
    assert cfile._tail is None


def test_session_end_seals_queued_writes(tmp_path: Path) -> None:
    """SECURITY.md: unmount (libfuse's destroy, also on SIGTERM with files still open)
    drains the queue like suspension does; nothing queued is dropped."""
    ops, fh, _ro = _ops(tmp_path)
    mib = 1 << 20
    data = os.urandom(8 * mib)  # made first: queuing outpaces sealing
    for i in range(1, 9):
        ops.write(None, data[(i - 1) * mib : i * mib], i * mib, fh)
    assert ops.files[fh].pending, "nothing was queued: the test exercises nothing"
    ops.destroy(None)
    assert ops.files[fh].pending == 0
    assert os.fstat(fh).st_size == ops.geo.cipher_size(9 * mib)


def test_system_libfuse_still_works_without_killpriv_v2(make_volume: MakeVolume) -> None:
    """README: if the libfuse 3.17 build is missing, encfs runs on the system libfuse 3
    (FUSE_LIBRARY_PATH picks it here) — correct, one round trip more per write."""
    system = Path("/usr/lib/x86_64-linux-gnu/libfuse3.so.3")
    if not system.exists():
        pytest.skip("no system libfuse3 at the Debian path")
    vol: Volume = make_volume(mount=False)
    vol.env["FUSE_LIBRARY_PATH"] = str(system)
    vol.mount()
    status = json.loads(encfs("status", vol.mountpoint, "--json", check=True).stdout)
    assert status["libfuse"]["killpriv_v2"] is False
    assert status["libfuse"]["version"] != "3.17"
    assert status["libfuse"]["version"].startswith("3.")
    data = os.urandom(300_000)
    (vol.mountpoint / "f").write_bytes(data)
    vol.remount()
    assert (vol.mountpoint / "f").read_bytes() == data


def test_importing_encfs_loads_no_fuse_library_and_writes_no_environment() -> None:
    """mfusepy picks its libfuse when imported, from the environment: only ``fs.serve``
    imports it, after ``select_libfuse``; importing the package, the daemon or the CLI
    does neither."""
    code = (
        "import os, sys; before = dict(os.environ); "
        "import encfs.cli, encfs.daemon, encfs.fs, encfs.fs.ops, encfs.fs.kcache; "
        "assert 'mfusepy' not in sys.modules, 'mfusepy imported'; "
        "assert dict(os.environ) == before, 'environment written'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_select_libfuse_prefers_the_set_path_then_the_build_then_libfuse3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from encfs.fs import select_libfuse

    env = {"FUSE_LIBRARY_PATH": "/chosen/libfuse3.so"}
    select_libfuse(env)
    assert env == {"FUSE_LIBRARY_PATH": "/chosen/libfuse3.so", "FUSE_LIBRARY_NAME": "fuse3"}
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    env = {}
    select_libfuse(env)
    assert env == {"FUSE_LIBRARY_NAME": "fuse3"}  # mfusepy would find libfuse 2 first
    built = tmp_path / "lib" / "encfs" / "libfuse3.so.4"
    built.parent.mkdir(parents=True)
    built.touch()
    select_libfuse(env)
    assert env == {"FUSE_LIBRARY_PATH": str(built), "FUSE_LIBRARY_NAME": "fuse3"}
    select_libfuse(env)  # a second call changes nothing
    assert env == {"FUSE_LIBRARY_PATH": str(built), "FUSE_LIBRARY_NAME": "fuse3"}


def test_new_entries_get_the_callers_mode_not_the_daemons_umask(vol: Volume) -> None:
    """A file created 0620 under umask 0 is 0620 (a conformance suite checks this for
    files, directories, FIFOs and sockets): the kernel applies the caller's umask; the
    daemon adds none of its own."""
    m = vol.mountpoint
    script = textwrap.dedent(f"""
        import os, socket
        os.umask(0)
        os.close(os.open({str(m / "f")!r}, os.O_CREAT | os.O_WRONLY, 0o620))
        os.mkdir({str(m / "d")!r}, 0o777)
        os.mkfifo({str(m / "p")!r}, 0o666)
        s = socket.socket(socket.AF_UNIX); s.bind({str(m / "s")!r})
        os.umask(0o027)
        os.mkdir({str(m / "d2")!r}, 0o777)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    modes = {n: stat.S_IMODE((m / n).lstat().st_mode) for n in ("f", "d", "p", "d2")}
    assert modes == {"f": 0o620, "d": 0o777, "p": 0o666, "d2": 0o750}
    assert stat.S_IMODE((m / "s").lstat().st_mode) == 0o777


def test_the_mount_root_has_its_own_mode_and_owner(
    make_volume: MakeVolume, reachable_tmp: Path
) -> None:
    """The cipher dir stays root's 0700 (a root daemon refuses anything else), yet the
    mount's root is a directory like any other: 0755 root's when new, and chmod/chown of
    it are kept (on the cipher dir, FORMAT.md §6.2) across remounts without opening the
    cipher dir to anyone."""
    vol: Volume = make_volume(options=MULTIUSER)
    m = vol.mountpoint
    st = m.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0)
    os.chmod(m, 0o1777)
    os.chown(m, 4321, 8765)
    vol.remount()
    st = m.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o1777, 4321, 8765)
    assert os.listdir(m) == []  # and readdir's "." agrees
    cipher = vol.cipher_dir.stat()
    assert (stat.S_IMODE(cipher.st_mode), cipher.st_uid) == (0o700, 0)
    as_nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    proc = subprocess.run([*as_nobody, "touch", str(m / "by-nobody")], capture_output=True)
    assert proc.returncode == 0, proc.stderr  # 1777: anyone may create
    assert (m / "by-nobody").stat().st_uid == 65534
    os.chmod(m, 0o700)
    proc = subprocess.run([*as_nobody, "ls", str(m)], capture_output=True)
    assert proc.returncode != 0  # 0700 and not nobody's: the kernel says no


def test_a_directory_made_again_is_a_new_directory(vol: Volume) -> None:
    """rmdir keeps the name cache but marks the removed directory dead: a directory made
    again under the same name is resolved afresh, so its entries land in it (and survive a
    remount), never in the removed one."""
    m = vol.mountpoint
    d = m / "a" / "b"
    d.mkdir(parents=True)
    (d / "c").mkdir()
    (d / "f").write_text("old")
    (d / "c" / "g").write_text("old")
    (d / "f").unlink()
    (d / "c" / "g").unlink()
    (d / "c").rmdir()
    d.rmdir()
    d.mkdir()
    (d / "c").mkdir()
    (d / "f").write_text("new")
    (d / "c" / "g").write_text("new too")
    assert sorted(os.listdir(d)) == ["c", "f"]
    vol.remount()
    assert (d / "f").read_text() == "new" and (d / "c" / "g").read_text() == "new too"
    assert sorted(os.listdir(d)) == ["c", "f"]
