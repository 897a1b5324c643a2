"""CipherFile's deferred stream writes (the Sealer), on real files; the FUSE side of the same
is in test_fs.py."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from encfs import format as fmt
from encfs.cipherfile import STREAM_MIN, CipherFile, Sealer
from encfs.keys import VolumeKeys


def _file(tmp_path: Path) -> tuple[CipherFile, int, Path]:
    keys = VolumeKeys(bytearray(os.urandom(32)), volume_id=os.urandom(16), block_size=4096)
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    return CipherFile(keys, fmt.Geometry(4096), str(path), Sealer()), fd, path


def test_stream_writes_are_deferred_in_order_and_read_back(tmp_path: Path) -> None:
    cfile, fd, _ = _file(tmp_path)
    chunks = [os.urandom(STREAM_MIN * 2) for _ in range(40)]
    deferred = 0
    for i, chunk in enumerate(chunks):
        cfile.write(fd, i * len(chunk), chunk)
        deferred += cfile.pending > 0
    assert deferred > 0, "no write was deferred: the stream path is not exercised"
    whole = b"".join(chunks)
    assert cfile.read(fd, 0, len(whole)) == whole  # read() waits for the sealer
    assert cfile.pending == 0
    assert cfile.plain_size(fd) == len(whole)
    # A short write in the middle waits for the stream before it, then lands on top.
    cfile.write(fd, 5, b"hello")
    assert cfile.read(fd, 0, 10) == whole[:5] + b"hello"


def test_the_first_write_and_unaligned_writes_are_not_deferred(tmp_path: Path) -> None:
    cfile, fd, _ = _file(tmp_path)
    cfile.write(fd, 0, os.urandom(STREAM_MIN))  # no header yet: written at once
    assert cfile.pending == 0
    cfile.write(fd, STREAM_MIN + 1, os.urandom(STREAM_MIN))  # does not continue the stream
    assert cfile.pending == 0


def test_a_failed_deferred_write_is_raised_by_the_next_write_once(tmp_path: Path) -> None:
    cfile, fd, path = _file(tmp_path)
    chunk = os.urandom(STREAM_MIN)
    cfile.write(fd, 0, chunk)
    read_only = os.open(path, os.O_RDONLY)  # a deferred write through it must fail
    try:
        cfile.write(read_only, len(chunk), chunk)
        cfile.drain()
        with pytest.raises(OSError) as failed:
            cfile.write(fd, 5 * len(chunk), chunk)
        assert failed.value.errno == errno.EBADF
        cfile.write(fd, 0, b"again")  # reported once; the file works on
        assert cfile.read(fd, 0, 5) == b"again"
        assert cfile.plain_size(fd) == len(chunk)  # the failed write left nothing behind
    finally:
        os.close(read_only)


def test_near_a_full_disk_nothing_is_deferred_and_write_fails_itself(tmp_path: Path) -> None:
    """README: writes are queued only while the backing filesystem has room to spare, so a
    full disk fails the write(2) itself (here a 64 MiB tmpfs)."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)], check=True)
    try:
        cfile, fd, _ = _file(small)
        try:
            chunk = os.urandom(1 << 20)
            with pytest.raises(OSError) as full:
                for i in range(100):
                    cfile.write(fd, i * len(chunk), chunk)
                    assert cfile.pending == 0
            assert full.value.errno == errno.ENOSPC
        finally:
            cfile.drain()
            os.close(fd)
    finally:
        subprocess.run(["umount", "--lazy", str(small)], check=True)
