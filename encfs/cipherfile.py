"""Plaintext read/write/truncate/allocate over one backing file of encrypted blocks.

One ``CipherFile`` exists per backing inode while it is open (hard links share it), so
every handle on the file serialises partial-block read-modify-write under the same lock.
Readers share the lock; writers and truncation hold it exclusively. Long sequential
writes may be deferred to the volume's ``Sealer`` thread; every other access to the file
waits for them first (``CipherFile.drain``). All offsets are plaintext (``plain_off``)
unless named ``cipher_off``; ``format.Geometry`` converts.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import threading
from collections.abc import Callable, Collection, Iterator

from encfs import backing, crypto
from encfs import format as fmt
from encfs.errors import IntegrityError, VolumeSuspended
from encfs.fastpath import NativeFile, NativeIO
from encfs.keys import VolumeKeys
from encfs.undo import UndoFile, UndoLog

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 0x01
STREAM_MIN = 128 << 10
"""Writes at least this long, each starting where the previous one ended, are a stream."""
WRITE_BEHIND = 8 << 20
"""A stream's ciphertext is handed to the disk every this many bytes (see ``_written``)."""
DEFER_HEADROOM = 256 << 20
"""Writes are deferred only while the backing filesystem has this much room besides."""
NATIVE_KEY_AFTER = 2
"""The native path gets a file's key once Python served this many requests it could
have served (``CipherFile._native_missed``)."""
REKEY_CHUNK = 256
"""Blocks a rekey reads and re-seals per hold of a file's write lock (1 MiB at 4 KiB)."""


class RWLock:
    """Many readers or one writer. Not reentrant; writers may starve under endless reads.

    Uncontended, each acquire and release is one plain lock round trip: the condition
    variable is made on the first wait and notified only while someone waits (a
    ``threading.Condition`` per file and a ``notify_all`` per release cost ~4 µs a write).
    """

    __slots__ = ("_cond", "_lock", "_readers", "_waiting", "_writer")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond: threading.Condition | None = None
        self._readers = 0
        self._writer = False
        self._waiting = 0  # threads inside _wait (guarded by _lock)

    def _wait(self) -> None:
        """Caller holds ``_lock``; returns after a notification (recheck the predicate)."""
        cond = self._cond
        if cond is None:
            cond = self._cond = threading.Condition(self._lock)
        self._waiting += 1
        try:
            cond.wait()
        finally:
            self._waiting -= 1

    def acquire_read(self) -> None:
        with self._lock:
            while self._writer:
                self._wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._lock:
            self._readers -= 1
            if not self._readers and self._waiting:
                assert self._cond is not None
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._lock:
            while self._writer or self._readers:
                self._wait()
            self._writer = True

    def release_write(self) -> None:
        with self._lock:
            self._writer = False
            if self._waiting:
                assert self._cond is not None
                self._cond.notify_all()


class _Job:
    """One deferred stream write: plaintext for ``cfile`` at ``plain_off`` through ``fd``,
    and once the sealing thread has done it, its ciphertext (``CipherFile.preseal``)."""

    __slots__ = ("cfile", "data", "fd", "plain_off", "sealed")

    def __init__(self, cfile: CipherFile, fd: int, plain_off: int, data: bytes) -> None:
        self.cfile = cfile
        self.fd = fd
        self.plain_off = plain_off
        self.data = data
        self.sealed: tuple[bytes, bytearray] | None = None


class Sealer:
    """Seals and writes deferred stream writes, in submission order, on two threads: one
    encrypts job after job (``CipherFile.preseal``), the other writes each sealed job to
    its file (``CipherFile.write_now``), so that a job's encryption overlaps the previous
    job's ``pwrite`` (which may wait for the disk under dirty-page throttling) instead of
    following it. A sequential writer's next request arrives meanwhile: the kernel's copy
    of the caller's data, our AES work and the backing write all overlap, as the kernel's
    own writeback would (``CipherFile.write`` decides what may be deferred). Errors are
    kept on the file and raised by its next write or fsync, as a local filesystem reports
    writeback errors; each is also logged.

    Locks: ``_cond`` guards both queues, the byte count and every file's ``pending``
    count; never held while a job is sealed or written. At most ``MAX_PENDING`` bytes of
    plaintext wait (submitters block).
    """

    MAX_PENDING = 8 << 20

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._jobs: collections.deque[_Job] = collections.deque()  # submitted, not sealed
        self._sealed: collections.deque[_Job] = collections.deque()  # sealed, not written
        self._bytes = 0
        self._started = False

    def submit(self, cfile: CipherFile, fd: int, plain_off: int, data: bytes) -> None:
        with self._cond:
            while (self._jobs or self._sealed) and self._bytes + len(data) > self.MAX_PENDING:
                self._cond.wait()
            self._jobs.append(_Job(cfile, fd, plain_off, data))
            self._bytes += len(data)
            cfile.pending += 1
            cfile.mirror_pending()
            if not self._started:
                self._started = True
                for target, name in ((self._seal, "encfs-sealer"), (self._write, "encfs-writer")):
                    threading.Thread(target=target, name=name, daemon=True).start()
            self._cond.notify_all()

    def drain(self, cfile: CipherFile | None = None) -> None:
        """Wait until ``cfile``'s jobs (every job, for None) are written."""
        with self._cond:
            while cfile.pending if cfile is not None else (self._jobs or self._sealed):
                self._cond.wait()

    @property
    def busy(self) -> bool:
        return bool(self._jobs or self._sealed)

    def mirror(self, cfile: CipherFile) -> None:
        """``cfile.mirror_pending()`` under the lock that guards ``pending``."""
        with self._cond:
            cfile.mirror_pending()

    def _seal(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                job = self._jobs[0]
            try:
                job.sealed = job.cfile.preseal(job.plain_off, job.data)
            except Exception:  # write_now seals again, and reports the error
                job.sealed = None
            with self._cond:
                self._jobs.popleft()
                self._sealed.append(job)
                self._cond.notify_all()

    def _write(self) -> None:
        while True:
            with self._cond:
                while not self._sealed:
                    self._cond.wait()
                job = self._sealed[0]  # stays queued until written
            cfile = job.cfile
            try:
                cfile.write_now(job.fd, job.plain_off, job.data, presealed=job.sealed)
            except BaseException as exc:  # kept for the file's next write or fsync
                log.error("deferred write to %s failed: %s", cfile.backing_path, exc)
                cfile.keep_deferred_error(
                    exc if isinstance(exc, OSError) else OSError(errno.EIO, str(exc))
                )
            job.sealed = None
            with self._cond:
                self._sealed.popleft()
                self._bytes -= len(job.data)
                cfile.pending -= 1
                cfile.mirror_pending()
                self._cond.notify_all()


class CipherFile:
    """Encrypted content of one backing inode.

    ``file_id`` is None while the backing file is empty (no header yet). Every method takes
    the backing ``fd`` to use (any open fd of this inode; writes need one opened O_RDWR).
    Raises ``IntegrityError`` for tampered data and ``OSError`` from the backing fs.
    """

    def __init__(
        self,
        keys: VolumeKeys,
        geometry: fmt.Geometry,
        backing_path: str,
        sealer: Sealer | None = None,
        undo: UndoLog | None = None,
        native: NativeIO | None = None,
    ) -> None:
        self.keys = keys
        self.native = native
        self._nfile: NativeFile | None = None
        """This inode's entry in the native path (``encfs.fastpath``), made once it pays
        off (``_native_missed``) and kept until the last close. Made, and set to None at
        the last close, only under the write lock: a locked section finds the same value
        at its end as at its start."""
        self._native_lock = threading.Lock()
        """Guards ``_fds`` and the words mirrored into the entry (``setid``, the deferred
        error) against the entry being made meanwhile."""
        self._fds: set[int] = set()  # the handles open on this inode (for the entry)
        self._native_misses = 0
        self._native_wanted = False
        self.undo = undo
        self._undo_slot: tuple[bytes, UndoFile | None] | None = None
        """(file id, its undo file or None if it has none) once a block was rewritten."""
        self.geo = geometry
        self.backing_path = backing_path
        self.sealer = sealer
        self.pending = 0  # deferred writes not yet written (guarded by the sealer's lock)
        self.deferred_error: OSError | None = None  # set by keep_deferred_error
        self._stream_plain_end = -1  # where the last long aligned write ended (plain side)
        self.lock = RWLock()
        self.refs = 0
        self.inode_key: tuple[int, int] | None = None  # (st_dev, st_ino) of the backing file
        self._setid = False
        self._file_id: bytes | None = None
        self._behind = 0  # cipher offset from which the disk write is not yet started
        self._tail: tuple[int, int, bytes, bytes] | None = None
        """(block_no, cipher size, plaintext, sealed) of the partial last block as the last
        ``write_now`` left it (guarded by the write lock): an append that continues that
        block takes it from here instead of reading and decrypting it back, as long as the
        backing file still has that size. Anything else that changes content drops it."""

    # --- header -------------------------------------------------------------------------

    def _file_id_for(self, fd: int) -> bytes | None:
        """The file id, read from the header on first use; None for an empty file."""
        file_id = self._file_id
        if file_id is None:
            raw = os.pread(fd, fmt.FILE_HEADER_LEN, 0)
            if not raw:
                return None
            try:
                file_id = fmt.parse_file_header(raw)
            except Exception:
                raise IntegrityError(
                    "file header damaged", backing_path=self.backing_path
                ) from None
            self._set_file_id(file_id)
        return file_id

    def _ensure_header(self, fd: int) -> bytes:
        """File id, writing a fresh header if the file is empty. Caller holds the write lock."""
        file_id = self._file_id_for(fd)
        if file_id is None:
            file_id = crypto.random_bytes(fmt.FILE_ID_LEN)
            backing.pwrite_all(fd, fmt.pack_file_header(file_id), 0)
            self._set_file_id(file_id)
        return file_id

    # --- the native path (encfs.fastpath) ---------------------------------------------------
    #
    # A file gets its native entry once Python served it a second request the native path
    # would have served (an aligned read, an overwrite of whole blocks): a file read once,
    # like most of a source tree, never pays for one. From then on native requests never
    # take ``lock``: native reads use the entry's change count (a seqlock: every change
    # below runs between ``changing`` and ``changed``), native writes try the entry's C
    # lock, which every locked section here holds too.

    def _lock_read(self) -> None:
        self.lock.acquire_read()
        if self._nfile is not None:
            self._nfile.lock()  # keeps native writes out, as the read lock keeps ours

    def _unlock_read(self) -> None:
        if self._nfile is not None:
            self._nfile.unlock()
        self.lock.release_read()
        if self._native_wanted:
            self._go_native()

    def _lock_write(self) -> None:
        """The write lock, and native requests kept off the file until ``_unlock_write``."""
        self.lock.acquire_write()
        nfile = self._nfile
        if nfile is not None:
            nfile.lock()
            nfile.changing()

    def _unlock_write(self) -> None:
        nfile = self._nfile
        if nfile is not None:
            nfile.changed()
            nfile.unlock()
        self.lock.release_write()
        if self._native_wanted:
            self._go_native()

    def _set_file_id(self, file_id: bytes | None) -> None:
        """Caller holds a lock (``_lock_read`` or ``_lock_write``)."""
        self._file_id = file_id
        if self._nfile is not None:
            self._nfile.set_id(file_id)

    @property
    def setid(self) -> bool:
        """The mode may have set-user/group-ID bits that a write must clear (writes then
        go through Python, which clears them: ``EncfsOperations.write``)."""
        return self._setid

    @setid.setter
    def setid(self, value: bool) -> None:
        with self._native_lock:
            self._setid = value
            if self._nfile is not None:
                self._nfile.set_python_writes(setid=value)

    def keep_deferred_error(self, err: OSError) -> None:
        """A deferred write failed: the next write or fsync raises ``err``."""
        with self._native_lock:
            self.deferred_error = err
            if self._nfile is not None:
                self._nfile.set_python_writes(error=True)

    def mirror_pending(self) -> None:
        """Show the native entry how many deferred writes wait (caller holds the Sealer's
        lock, which guards ``pending``): the native path serves nothing while any do."""
        if self._nfile is not None:
            self._nfile.set_queued(self.pending)

    def attach_fd(self, fd: int) -> None:
        """Handle ``fd`` of this inode is open: the native path may serve it."""
        with self._native_lock:
            self._fds.add(fd)
            if self._nfile is not None:
                self._nfile.map(fd)

    def forget_fd(self, fd: int) -> None:
        """Handle ``fd`` is being closed (no request of it in flight): no longer native."""
        with self._native_lock:
            self._fds.discard(fd)
            if self._nfile is not None:
                self._nfile.unmap(fd)

    def _native_missed(self, file_id: bytes) -> None:
        """Python served a request the native path serves (an aligned read, a whole-block
        overwrite): from the second on, get the native path ready for the next ones — an
        entry (made by ``_go_native`` once the caller lets go of its lock) with
        ``file_id``'s key (keys are wiped on suspension: ``NativeIO.generation``). Keying
        costs a key derivation (~7 us). Caller holds a lock. Best effort: without an entry
        and key, requests stay Python's."""
        native = self.native
        if native is None:
            return
        nfile = self._nfile
        if nfile is not None and nfile.keyed == native.generation:
            return
        self._native_misses += 1
        if self._native_misses < NATIVE_KEY_AFTER:
            return
        if nfile is None:
            self._native_wanted = True  # needs the write lock: after this one is let go
        else:
            self._key_native(nfile, file_id)

    def _key_native(self, nfile: NativeFile, file_id: bytes) -> None:
        """Lend ``nfile`` the key of ``file_id`` (the id it has). Caller holds a lock."""
        assert self.native is not None
        generation = self.native.generation
        try:
            done = self.keys.lend_file_key(file_id, lambda key: nfile.set_key(file_id, key))
        except (VolumeSuspended, OSError) as exc:
            log.debug("native path not keyed for %s: %s", self.backing_path, exc)
            return
        if done:
            nfile.keyed = generation

    def _go_native(self) -> None:
        """Make the native entry (``_native_missed`` asked for it): under the write lock,
        so that no Python reader or writer is inside without holding the entry's C lock;
        the entry learns the file's id, key, queued writes and reasons to leave writes to
        Python, and then its handles. Best effort."""
        self._native_wanted = False
        native = self.native
        assert native is not None
        self.lock.acquire_write()
        try:
            file_id = self._file_id
            if self._nfile is not None or file_id is None:
                return
            try:
                nfile = native.new_file()
            except MemoryError:
                return
            nfile.set_id(file_id)
            with self._native_lock:
                nfile.set_python_writes(setid=self._setid, error=self.deferred_error is not None)
                self._nfile = nfile
                if self.sealer is not None:
                    self.sealer.mirror(self)
                self._key_native(nfile, file_id)
                for fd in self._fds:
                    nfile.map(fd)
        finally:
            self.lock.release_write()

    def forget_plaintext(self) -> None:
        """Drop the plaintext kept for appends (``_tail``): at suspension, nothing of the
        content may stay readable without the keys."""
        self._tail = None

    def plain_size(self, fd: int) -> int:
        return self.geo.plain_size(os.fstat(fd).st_size)

    # --- block helpers (caller holds the lock) -------------------------------------------

    def _read_blocks(
        self, fd: int, file_id: bytes, first: int, end: int, plain_size: int
    ) -> bytearray:
        """Decrypt blocks [first, end) as far as they exist below ``plain_size``."""
        raw = self._pread_blocks(fd, first, end, plain_size)
        return self.keys.file_cipher(file_id).open(first, raw, self.backing_path)

    def _read_block(
        self, fd: int, file_id: bytes, block_no: int, plain_size: int
    ) -> tuple[bytearray, bytes]:
        """One block's plaintext and its sealed form as on disk (its undo record)."""
        raw = self._pread_blocks(fd, block_no, block_no + 1, plain_size)
        return self.keys.file_cipher(file_id).open(block_no, raw, self.backing_path), raw

    def _pread_blocks(self, fd: int, first: int, end: int, plain_size: int) -> bytes:
        """The ciphertext of blocks [first, end) as far as they exist below ``plain_size``.
        Raises ``IntegrityError`` if the backing file is shorter."""
        geo = self.geo
        end = min(end, -(-plain_size // geo.block_size))
        if end <= first:
            return b""
        cipher_off = geo.block_cipher_off(first)
        cipher_len = geo.cipher_size(plain_size) - cipher_off
        cipher_len = min(cipher_len, (end - first) * geo.cipher_block_size)
        raw = os.pread(fd, cipher_len, cipher_off)
        if len(raw) != cipher_len:
            raise IntegrityError("file shorter than its size", backing_path=self.backing_path)
        return raw

    def _rewrite_block(
        self, fd: int, file_id: bytes, block_no: int, plain: bytes | bytearray, old: bytes
    ) -> None:
        """Replace block ``block_no``, sealed ``old`` on disk until now, in place."""
        self._save_undo(fd, file_id, [(block_no, old)])
        sealed = self.keys.file_cipher(file_id).seal(block_no, plain)
        backing.pwrite_all(fd, sealed, self.geo.block_cipher_off(block_no))

    def _pad_last_block(self, fd: int, file_id: bytes, plain_size: int, to_len: int) -> None:
        """Re-seal the partial last block zero-padded to ``to_len`` bytes (growing the file)."""
        geo = self.geo
        last = geo.block_no(plain_size)
        data, old = self._read_block(fd, file_id, last, plain_size)
        data.extend(bytes(to_len - len(data)))
        self._rewrite_block(fd, file_id, last, data, old)

    def _save_undo(self, fd: int, file_id: bytes, old: list[tuple[int, bytes]]) -> None:
        """Keep the old content of blocks about to be rewritten in place (``undo``): each
        block's number and its sealed form as on disk. Caller holds the write lock. Raises
        ``OSError``."""
        if self.undo is None:
            return
        slot = self._undo_slot
        if slot is None or slot[0] != file_id:
            if slot is not None and slot[1] is not None:
                slot[1].close()  # the file was emptied: its old id is gone
            undo_file = self.undo.open(
                file_id,
                lambda block_nos: self._blocks_intact(fd, file_id, block_nos),
                self.geo.cipher_block_size,
            )
            slot = self._undo_slot = (file_id, undo_file)
        undo_file = slot[1]
        if undo_file is not None:
            undo_file.save(old)

    def _blocks_intact(self, fd: int, file_id: bytes, block_nos: Collection[int]) -> bool:
        """Whether each of these blocks authenticates (or no longer exists)."""
        plain_size = self.plain_size(fd)
        for block_no in block_nos:
            try:
                self._read_blocks(fd, file_id, block_no, block_no + 1, plain_size)
            except IntegrityError:
                return False
        return True

    def sync(self, fd: int, datasync: bool) -> None:
        """fsync(2)/fdatasync(2): deferred writes first (and their error), then the backing
        file; then the undo record is dropped, its blocks being safe on the disk."""
        self.drain()
        self.raise_deferred()
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)
        slot = self._undo_slot
        if slot is not None and slot[1] is not None:
            self._lock_write()
            try:
                slot[1].clear()
            finally:
                self._unlock_write()

    def close(self) -> None:
        """At the last close of the inode (no request of it in flight): free its native
        entry, remove its undo file."""
        nfile, self._nfile = self._nfile, None
        if nfile is not None:
            nfile.free()
        slot, self._undo_slot = self._undo_slot, None
        if slot is not None and slot[1] is not None:
            try:
                slot[1].close()
            except OSError as exc:  # a leftover undo file costs nothing but fsck's time
                log.warning("cannot remove the undo file of %s: %s", self.backing_path, exc)

    # --- deferred stream writes ------------------------------------------------------------

    def drain(self) -> None:
        """Wait until this file's deferred writes are on the backing file. Everything that
        reads content or size, or changes them out of order, calls this first."""
        if self.pending and self.sealer is not None:
            self.sealer.drain(self)

    def raise_deferred(self) -> None:
        """Raise (once) the error of a deferred write that failed."""
        err = self.deferred_error
        if err is not None:
            self.deferred_error = None
            if self._nfile is not None:
                self._nfile.set_python_writes(error=False)
            raise err

    def _may_defer(self, fd: int, plain_off: int, length: int) -> bool:
        """A write may be deferred when it continues a stream of long, block-aligned writes
        into a file that already has its header (so it needs nothing from the file), and
        the backing filesystem has room to spare (so ENOSPC still surfaces at write(2))."""
        bs = self.geo.block_size
        if (
            self.sealer is None
            or length < STREAM_MIN
            or plain_off != self._stream_plain_end
            or plain_off % bs
            or length % bs
            or self._file_id is None
            or self.deferred_error is not None
        ):
            return False
        vfs = os.fstatvfs(fd)
        return vfs.f_bavail * vfs.f_frsize > DEFER_HEADROOM + Sealer.MAX_PENDING + 2 * length

    # --- public operations -----------------------------------------------------------------

    def read(self, fd: int, plain_off: int, size: int) -> bytes:
        out = bytearray(max(size, 0))
        length = self.read_into(fd, plain_off, memoryview(out))
        del out[length:]
        return bytes(out)

    def read_into(self, fd: int, plain_off: int, out: memoryview) -> int:
        """Read up to ``len(out)`` bytes at ``plain_off`` into ``out``; returns how many.

        A read that starts on a block boundary and ends on one (or at the end of the file),
        as the kernel's page-sized reads do, is decrypted straight into ``out`` (for FUSE:
        libfuse's reply buffer); any other is decrypted whole-block and copied once.
        Raises ``IntegrityError`` for tampered data; ``out`` may then hold part of the
        plaintext and must not be sent.
        """
        geo = self.geo
        bs = geo.block_size
        self.drain()
        self._lock_read()
        try:
            plain_size = self.plain_size(fd)
            size = min(len(out), plain_size - plain_off)
            if size <= 0:
                return 0
            file_id = self._file_id_for(fd)
            if file_id is None:
                return 0
            first, end = geo.block_range(plain_off, size)
            if plain_off % bs or (size % bs and plain_off + size != plain_size):
                plain = self._read_blocks(fd, file_id, first, end, plain_size)
                skip = plain_off - geo.block_plain_off(first)
                out[:size] = memoryview(plain)[skip : skip + size]
                return size
            raw = self._pread_blocks(fd, first, end, plain_size)
            self.keys.file_cipher(file_id).open_into(first, raw, out[:size], self.backing_path)
            if self.native is not None:
                self._native_missed(file_id)
            return size
        finally:
            self._unlock_read()

    def write(self, fd: int, plain_off: int, data: bytes | memoryview) -> int:
        """Write now, or hand a stream write to the sealer (``_may_defer``). Raises the
        error of an earlier deferred write first (``_may_defer`` refuses while one waits)."""
        length = len(data)
        if self._may_defer(fd, plain_off, length):
            self._stream_plain_end = plain_off + length
            assert self.sealer is not None
            self.sealer.submit(self, fd, plain_off, bytes(data))
            return length
        self.drain()
        self.raise_deferred()
        if length >= STREAM_MIN:
            self._stream_plain_end = plain_off + length
        return self.write_now(fd, plain_off, data)

    def preseal(self, plain_off: int, data: bytes) -> tuple[bytes, bytearray] | None:
        """The ciphertext of a whole-block write at ``plain_off``, sealed now, without the
        lock, for ``write_now(..., presealed=)``: a write that needs nothing from the file
        but its id. (file id, sealed blocks); None if the file has no id yet."""
        file_id = self._file_id
        geo = self.geo
        if file_id is None or plain_off % geo.block_size or len(data) % geo.block_size:
            return None
        first = geo.block_no(plain_off)
        nfile, native = self._nfile, self.native
        if nfile is not None and native is not None and nfile.keyed == native.generation:
            # Keyed (write_now counts stream writes as the native path's: _native_missed):
            # both layers in C, the GIL released for the whole job, not once per block.
            # (The entry outlives every queued job: the last close drains the Sealer.)
            out = bytearray(len(data) // geo.block_size * geo.cipher_block_size)
            if nfile.seal_into(file_id, first, data, out):
                return file_id, out
        return file_id, self.keys.file_cipher(file_id).seal(first, data)

    def write_now(
        self,
        fd: int,
        plain_off: int,
        data: bytes | memoryview,
        presealed: tuple[bytes, bytearray] | None = None,
    ) -> int:
        """Write ``data`` at ``plain_off`` now. ``presealed`` is ``preseal``'s answer for
        exactly this write, used if the file id is still the one it was sealed for."""
        length = len(data)
        if not length:
            return 0
        geo = self.geo
        bs = geo.block_size
        first, end = geo.block_range(plain_off, length)
        # Whole-block writes need nothing from the file but its id: seal them before taking
        # the lock, so one thread encrypts while another writes (the GIL is released in both).
        early_id = self._file_id
        early: bytearray | None = None
        if presealed is not None:
            early_id, early = presealed
        elif early_id is not None and not plain_off % bs and not length % bs:
            # Ask for the pages the write covers in part now; they arrive while we seal.
            cipher_off = geo.block_cipher_off(first)
            backing.prefetch_edges(fd, cipher_off, geo.block_cipher_off(end) - cipher_off)
            early = self.keys.file_cipher(early_id).seal(first, data)
        self._lock_write()
        try:
            cipher_size_before = os.fstat(fd).st_size
            plain_size = geo.plain_size(cipher_size_before)
            header = b""  # a new file's header, written together with its first blocks
            if self._file_id is None and not cipher_size_before:
                file_id = crypto.random_bytes(fmt.FILE_ID_LEN)
                header = fmt.pack_file_header(file_id)
            else:
                file_id = self._ensure_header(fd)
            try:
                tail, self._tail = self._tail, None
                if plain_off > plain_size and plain_size % bs and geo.block_no(plain_size) < first:
                    self._pad_last_block(fd, file_id, plain_size, bs)
                if early is not None and file_id == early_id:
                    if self.native is not None and (
                        presealed is not None or plain_off + length <= geo.whole_end(plain_size)
                    ):  # a stream write it could have sealed, an overwrite it could have served
                        self._native_missed(file_id)
                    backing.pwrite_all(fd, early, geo.block_cipher_off(first))
                    self._written(fd, geo.block_cipher_off(first), len(early))
                    return length
                start = geo.block_plain_off(first)
                write_end = plain_off + length
                range_end = min(geo.block_plain_off(end), max(write_end, plain_size))
                head = plain_off - start
                rewritten: list[tuple[int, bytes]] = []  # blocks whose old content stays
                if head == 0 and range_end == write_end:
                    plain: bytes | bytearray | memoryview = data
                else:
                    buf = bytearray(range_end - start)
                    if head and start < plain_size:
                        if tail is not None and tail[:2] == (first, cipher_size_before):
                            old: bytes | bytearray = tail[2]
                            old_sealed = tail[3]
                        else:
                            old, old_sealed = self._read_block(fd, file_id, first, plain_size)
                        buf[: len(old)] = old
                        rewritten.append((first, old_sealed))
                    last = end - 1
                    if range_end > write_end and (last != first or not head):
                        old, old_sealed = self._read_block(fd, file_id, last, plain_size)
                        off = geo.block_plain_off(last) - start
                        buf[off : off + len(old)] = old
                        rewritten.append((last, old_sealed))
                    buf[head : head + length] = data
                    plain = buf
                if rewritten:
                    self._save_undo(fd, file_id, rewritten)
                cipher_off = geo.block_cipher_off(first)
                if plain is data and cipher_off < cipher_size_before:
                    # Whole blocks over existing ones, not sealed early (the file's id was
                    # not known yet: the first write after an open): as above. (Partial
                    # blocks read theirs in _read_block.)
                    backing.prefetch_edges(fd, cipher_off, geo.cipher_size(write_end) - cipher_off)
                sealed = self.keys.file_cipher(file_id).seal(first, plain)
                if header and cipher_off == len(header):
                    _pwritev_all(fd, [header, sealed], 0)  # one syscall for a new file
                else:
                    if header:
                        backing.pwrite_all(fd, header, 0)
                    backing.pwrite_all(fd, sealed, cipher_off)
                if header:
                    self._set_file_id(file_id)
                self._written(fd, cipher_off, len(sealed))
                new_size = max(plain_size, write_end)
                if new_size % bs and new_size <= geo.block_plain_off(end):  # ends in our block
                    last_start = geo.block_plain_off(end - 1) - start
                    self._tail = (
                        end - 1,
                        geo.cipher_size(new_size),
                        bytes(plain[last_start : new_size - start]),
                        bytes(sealed[geo.block_cipher_off(end - 1) - cipher_off :]),
                    )
            except OSError:
                # Never leave a half-written extension behind (e.g. ENOSPC mid-block).
                if os.fstat(fd).st_size > cipher_size_before:
                    os.ftruncate(fd, cipher_size_before)
                raise
            return length
        finally:
            self._unlock_write()

    def _written(self, fd: int, cipher_off: int, cipher_len: int) -> None:
        """Write-behind for streams (caller holds the write lock): once a sequential writer
        is ``WRITE_BEHIND`` bytes past where the disk write was last started, start it for
        that range (``sync_file_range(WRITE)`` queues the I/O, it does not wait for it).
        The disk then works while the next requests are encrypted, and the writer's final
        fsync finds little left to do, where otherwise the whole file would wait in the page
        cache until then. Best effort: errors are left for fsync to report."""
        if cipher_len < STREAM_MIN:
            return
        end = cipher_off + cipher_len
        if not self._behind <= cipher_off <= self._behind + WRITE_BEHIND:
            self._behind = cipher_off  # not where the stream was: a new stream starts here
        if end - self._behind >= WRITE_BEHIND:
            backing.start_writeback(fd, self._behind, end - self._behind)
            self._behind = end

    def truncate(self, fd: int, new_size: int) -> None:
        self.drain()
        self._stream_plain_end = -1
        geo = self.geo
        bs = geo.block_size
        self._lock_write()
        try:
            self._tail = None
            plain_size = self.plain_size(fd)
            if new_size == plain_size:
                return
            if new_size == 0:
                os.ftruncate(fd, 0)
                self._set_file_id(None)
                return
            file_id = self._ensure_header(fd)
            if new_size < plain_size:
                if new_size % bs:
                    block_no = geo.block_no(new_size)
                    data, old = self._read_block(fd, file_id, block_no, plain_size)
                    keep = new_size - geo.block_plain_off(block_no)
                    self._rewrite_block(fd, file_id, block_no, data[:keep], old)
                os.ftruncate(fd, geo.cipher_size(new_size))
                return
            if plain_size % bs:
                last = geo.block_no(plain_size)
                if last == geo.block_no(new_size - 1):
                    self._pad_last_block(
                        fd, file_id, plain_size, new_size - geo.block_plain_off(last)
                    )
                    return
                self._pad_last_block(fd, file_id, plain_size, bs)
            # The new tail stays a hole: all-zero cipher blocks read as zeros.
            os.ftruncate(fd, geo.cipher_size(new_size))
        finally:
            self._unlock_write()

    def rekey(self, fd: int, on_chunk: Callable[[int], None] | None = None) -> int:
        """Re-seal under the new key every block that only the retiring key opens (``encfs
        rekey``; the volume's keys must be re-keying: ``VolumeKeys.retire``); returns how
        many blocks it re-sealed. Works ``REKEY_CHUNK`` blocks at a time under the write
        lock, so readers and writers of the file wait at most one chunk; before a run of
        blocks is rewritten in place their old sealed forms go to the undo record (FORMAT.md
        §10b), so a crash mid-rewrite loses nothing (``fsck --repair``). ``on_chunk(n)`` is
        told the cipher bytes of each chunk done. Raises ``IntegrityError`` for a block
        neither key opens (the blocks before it are done; the rest untouched), ``OSError``.
        """
        geo = self.geo
        resealed = 0
        block_no = 0
        while True:
            self.drain()
            self._lock_write()  # a change, as far as native readers know
            try:
                plain_size = self.plain_size(fd)
                file_id = self._file_id_for(fd)
                end = min(block_no + REKEY_CHUNK, -(-plain_size // geo.block_size))
                if file_id is None or block_no >= end:
                    return resealed
                cipher = self.keys.file_cipher(file_id)
                if not isinstance(cipher, crypto.RekeyingBlockCipher):
                    raise ValueError("the volume's keys are not being re-keyed")
                old = self._pread_blocks(fd, block_no, end, plain_size)
                raw = bytearray(old)
                changed = cipher.reseal(block_no, raw, self.backing_path)
                if changed:
                    self._tail = None  # its sealed copy is the old one
                cbs = geo.cipher_block_size
                for run in _runs(changed, fmt.UNDO_REKEY_RECORDS):
                    at, end_at = (run[0] - block_no) * cbs, (run[-1] - block_no + 1) * cbs
                    records = [
                        (n, old[(n - block_no) * cbs : (n - block_no + 1) * cbs]) for n in run
                    ]
                    self._save_undo(fd, file_id, records)
                    backing.pwrite_all(fd, memoryview(raw)[at:end_at], geo.block_cipher_off(run[0]))
                resealed += len(changed)
            finally:
                self._unlock_write()
            if on_chunk is not None:
                on_chunk(len(old))
            block_no = end

    def allocate(self, fd: int, mode: int, plain_off: int, length: int) -> None:
        """fallocate(2) modes 0 and FALLOC_FL_KEEP_SIZE; others raise EOPNOTSUPP."""
        if mode & ~FALLOC_FL_KEEP_SIZE:
            raise OSError(errno.EOPNOTSUPP, "fallocate mode not supported")
        self.drain()
        end = plain_off + length
        if not mode & FALLOC_FL_KEEP_SIZE and end > self.plain_size(fd):
            self.truncate(fd, end)
        geo = self.geo
        first, last_end = geo.block_range(plain_off, length)
        cipher_off = geo.block_cipher_off(first)
        cipher_len = geo.block_cipher_off(last_end) - cipher_off
        if not mode & FALLOC_FL_KEEP_SIZE:
            cipher_len = min(cipher_len, max(os.fstat(fd).st_size - cipher_off, 0))
        if cipher_len > 0:
            self._lock_write()  # a change of the file, as far as native readers know
            try:
                backing.fallocate(fd, mode, cipher_off, cipher_len)
            finally:
                self._unlock_write()


def _runs(block_nos: list[int], most: int) -> Iterator[list[int]]:
    """``block_nos`` (ascending) cut into runs of consecutive numbers, ``most`` at most."""
    run: list[int] = []
    for n in block_nos:
        if run and (n != run[-1] + 1 or len(run) == most):
            yield run
            run = []
        run.append(n)
    if run:
        yield run


def _pwritev_all(fd: int, bufs: list[bytes | bytearray], cipher_off: int) -> None:
    written = os.pwritev(fd, bufs, cipher_off)
    for buf in bufs:  # rare: a short vectored write; finish buffer by buffer
        if written >= len(buf):
            written -= len(buf)
        else:
            backing.pwrite_all(fd, memoryview(buf)[written:], cipher_off + written)
            written = 0
        cipher_off += len(buf)
