"""CipherFile's per-file lock, reads into a caller's buffer, and deferred stream writes
(the Sealer), on real files; the FUSE side of the same is in test_fs.py."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from encfs import format as fmt
from encfs.cipherfile import STREAM_MIN, CipherFile, RWLock, Sealer
from encfs.errors import IntegrityError
from encfs.keys import VolumeKeys


def test_rwlock_readers_share_writers_exclude_and_waiters_wake() -> None:
    lock = RWLock()
    lock.acquire_read()
    lock.acquire_read()  # two readers at once
    wrote = threading.Event()

    def writer() -> None:
        lock.acquire_write()
        wrote.set()
        lock.release_write()

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    assert not wrote.wait(0.2), "a writer got in beside readers"
    lock.release_read()
    assert not wrote.wait(0.1), "a writer got in beside a reader"
    lock.release_read()
    assert wrote.wait(5), "the last reader did not wake the waiting writer"
    t.join(5)

    lock.acquire_write()
    entered = threading.Semaphore(0)

    def reader() -> None:
        lock.acquire_read()
        entered.release()
        time.sleep(0.05)
        lock.release_read()

    readers = [threading.Thread(target=reader, daemon=True) for _ in range(3)]
    for r in readers:
        r.start()
    assert not entered.acquire(timeout=0.2), "a reader got in beside the writer"
    lock.release_write()
    for _ in readers:
        assert entered.acquire(timeout=5), "releasing the writer did not wake every reader"
    for r in readers:
        r.join(5)


def test_rwlock_serialises_writers_under_contention() -> None:
    lock = RWLock()
    state = {"n": 0, "inside": 0, "overlap": 0}

    def work() -> None:
        for _ in range(300):
            lock.acquire_write()
            state["inside"] += 1
            if state["inside"] != 1:
                state["overlap"] += 1
            n = state["n"]
            time.sleep(0)  # invite another thread in
            state["n"] = n + 1
            state["inside"] -= 1
            lock.release_write()
            lock.acquire_read()
            lock.release_read()

    threads = [threading.Thread(target=work, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a waiter was never woken"
    assert state == {"n": 1800, "inside": 0, "overlap": 0}


def _file(tmp_path: Path, double: bool = False) -> tuple[CipherFile, int, Path]:
    """A CipherFile on a new backing file, of a single-layer or double-encrypted volume."""
    keys = VolumeKeys(
        bytearray(os.urandom(32)),
        volume_id=os.urandom(16),
        block_size=4096,
        outer_key=bytearray(os.urandom(32)) if double else None,
    )
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    return CipherFile(keys, keys.geometry, str(path), Sealer()), fd, path


LAYERS = pytest.mark.parametrize("double", [False, True], ids=["single", "double"])


@LAYERS
def test_read_into_returns_what_read_returns_for_every_shape(tmp_path: Path, double: bool) -> None:
    """Block-aligned reads are decrypted straight into the buffer, others through ``read``;
    both must give the same bytes, up to the end of the file and no further."""
    cfile, fd, _ = _file(tmp_path, double)
    data = os.urandom(5 * 4096 + 1234)  # a partial last block
    cfile.write(fd, 0, data)
    cases = [(0, 4096), (0, 8192), (4096, 3 * 4096), (0, len(data)), (0, 1 << 20),
             (5 * 4096, 4096), (5 * 4096, 1234), (4 * 4096, 2 * 4096), (1, 4096),
             (100, 50), (4095, 2), (5 * 4096 + 1000, 4096), (len(data), 4096),
             (len(data) + 10, 10), (8192, 0)]  # fmt: skip
    for off, size in cases:
        buf = bytearray(b"\xee" * (size + 7))
        n = cfile.read_into(fd, off, memoryview(buf)[:size])
        assert n == len(data[off : off + size]), (off, size)
        assert bytes(buf[:n]) == data[off : off + size] == cfile.read(fd, off, size), (off, size)
        assert bytes(buf[n:]) == b"\xee" * (size + 7 - n), (off, size)  # nothing past n


@LAYERS
def test_read_into_reads_holes_as_zeros_and_refuses_tampered_blocks(
    tmp_path: Path, double: bool
) -> None:
    cfile, fd, path = _file(tmp_path, double)
    cfile.write(fd, 0, b"a" * 4096)
    cfile.write(fd, 3 * 4096, b"b" * 4096)  # blocks 1 and 2 are a hole
    buf = bytearray(4 * 4096)
    assert cfile.read_into(fd, 0, memoryview(buf)) == 4 * 4096
    assert bytes(buf) == b"a" * 4096 + bytes(2 * 4096) + b"b" * 4096
    raw = bytearray(path.read_bytes())
    raw[fmt.FILE_HEADER_LEN + 3 * cfile.geo.cipher_block_size + 100] ^= 1  # in block 3
    os.pwrite(fd, bytes(raw), 0)
    with pytest.raises(IntegrityError) as err:
        cfile.read_into(fd, 0, memoryview(bytearray(4 * 4096)))
    assert err.value.block_no == 3


def _counting_reads(cfile: CipherFile, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the first block of every block read-back a write makes."""
    reads: list[int] = []
    real = cfile._read_blocks

    def counted(fd: int, file_id: bytes, first: int, end: int, plain_size: int) -> bytearray:
        reads.append(first)
        return real(fd, file_id, first, end, plain_size)

    monkeypatch.setattr(cfile, "_read_blocks", counted)
    real_one = cfile._read_block

    def counted_one(
        fd: int, file_id: bytes, block_no: int, plain_size: int
    ) -> tuple[bytearray, bytes]:
        reads.append(block_no)
        return real_one(fd, file_id, block_no, plain_size)

    monkeypatch.setattr(cfile, "_read_block", counted_one)
    return reads


@LAYERS
def test_appends_continue_the_last_block_without_reading_it_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, double: bool
) -> None:
    """tar's pattern (9216 then 10240-byte writes, each ending mid-block): every append
    after the first write takes the partial block it continues from memory."""
    cfile, fd, _ = _file(tmp_path, double)
    reads = _counting_reads(cfile, monkeypatch)
    model = bytearray()
    for size in (9216, 10240, 10240, 1, 4095, 3, 10240):
        chunk = os.urandom(size)
        assert cfile.write(fd, len(model), chunk) == size
        model += chunk
    assert reads == []
    assert cfile.read(fd, 0, len(model) + 1) == bytes(model)


@LAYERS
def test_what_changes_the_file_otherwise_drops_the_kept_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, double: bool
) -> None:
    """Truncation, a write elsewhere and a gap make the next append read the block back,
    and the content is always what a plain file would hold."""
    cfile, fd, _ = _file(tmp_path, double)
    reads = _counting_reads(cfile, monkeypatch)
    model = bytearray(os.urandom(5000))
    cfile.write(fd, 0, bytes(model))

    def append(data: bytes) -> None:
        cfile.write(fd, len(model), data)
        model.extend(data)

    cfile.truncate(fd, 4500)  # inside the kept block: its end is gone
    del model[4500:]
    reads.clear()
    append(os.urandom(100))
    assert reads == [1]
    reads.clear()
    patch = os.urandom(50)  # a write inside the last block: the next append sees it
    cfile.write(fd, 4200, patch)
    model[4200:4250] = patch
    append(os.urandom(10))
    assert cfile.read(fd, 0, len(model) + 1) == bytes(model)
    cfile.truncate(fd, 9000)  # grown: zeros, and a different last block
    model.extend(bytes(9000 - len(model)))
    append(os.urandom(20))
    cfile.write(fd, len(model) + 5000, b"z")  # a gap: the old last block is padded
    model.extend(bytes(5000) + b"z")
    append(os.urandom(7))
    assert cfile.read(fd, 0, len(model) + 1) == bytes(model)
    cfile.forget_plaintext()  # suspension drops it: the next append reads the block back
    reads.clear()
    append(os.urandom(7))
    assert reads == [len(model) // 4096]
    assert cfile.read(fd, 0, len(model) + 1) == bytes(model)


@LAYERS
def test_stream_writes_are_deferred_in_order_and_read_back(tmp_path: Path, double: bool) -> None:
    cfile, fd, _ = _file(tmp_path, double)
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
    assert os.fstat(fd).st_size == cfile.geo.cipher_size(len(whole))


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
