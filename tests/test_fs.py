"""The filesystem on a live mount: every POSIX operation a program expects, checked
byte-exact against what a kernel filesystem would do, and persistence across remounts."""

from __future__ import annotations

import ctypes
import errno
import mmap
import multiprocessing
import os
import socket
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from encfs import format as fmt
from tests.harness import Volume, encfs

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
            ref[off:off + len(chunk)] = chunk
            if rng.random() < 0.1:
                new = rng.randrange(0, 50000)
                os.ftruncate(fd, new)
                del ref[new:]
                ref.extend(bytes(new - len(ref)))
            if rng.random() < 0.2:
                roff = rng.randrange(0, 50000)
                assert os.pread(fd, 5000, roff) == bytes(ref[roff:roff + 5000])
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
    with open(f, "r+b") as h, mmap.mmap(h.fileno(), 0) as m:
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
    for w in (*procs, *threads):
        w.start()
    for t in threads:
        t.join()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    expect = bytearray(64 * 1024)
    for s in range(slots):
        for off in range(s * 100, 64 * 1024, slots * 100):
            expect[off:off + 100] = bytes([65 + s]) * 100
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
        [".encfs.dirid", "encfs.volume"]
    )


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
    with pytest.raises(PermissionError):
        os.mknod(m / "dev", 0o600 | stat.S_IFCHR, os.makedev(1, 3))


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
        os.setxattr(f, "trusted.x", b"1")
    assert info.value.errno in (errno.EOPNOTSUPP, errno.EPERM)
    (vol.mountpoint / "d").mkdir()
    os.setxattr(vol.mountpoint / "d", "user.dir", b"on a directory")
    vol.remount()
    assert os.getxattr(vol.mountpoint / "d", "user.dir") == b"on a directory"


# --- mount options ---------------------------------------------------------------------------


def test_read_only_mount(make_volume) -> None:  # type: ignore[no-untyped-def]
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


def test_foreground_mount_and_sigterm(make_volume) -> None:  # type: ignore[no-untyped-def]
    import signal
    import sys
    import time

    vol: Volume = make_volume(mount=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "encfs", "mount", "--foreground", str(vol.cipher_dir),
         str(vol.mountpoint)], env=vol.env, stderr=subprocess.PIPE, text=True,
    )
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


def test_unknown_mount_option(make_volume) -> None:  # type: ignore[no-untyped-def]
    vol: Volume = make_volume(mount=False)
    proc = encfs("mount", vol.cipher_dir, vol.mountpoint, "-o", "bogus", env=vol.env)
    assert proc.returncode == 2 and "unknown mount option 'bogus'" in proc.stderr


@pytest.mark.parametrize("block_size", [65536])
def test_large_block_size(make_volume, block_size: int) -> None:  # type: ignore[no-untyped-def]
    vol: Volume = make_volume(block_size=block_size)
    data = os.urandom(3 * block_size + 123)
    f = vol.mountpoint / "big"
    f.write_bytes(data)
    with open(f, "r+b") as h:
        h.seek(block_size - 10)
        h.write(b"Z" * 20)
    expect = bytearray(data)
    expect[block_size - 10:block_size + 10] = b"Z" * 20
    vol.remount()
    assert f.read_bytes() == bytes(expect)
