"""The only door to the cipher dir: every operation relative to a directory fd, no link followed.

The daemon runs as root over a directory that anyone with write access to the backing
store may have changed (an offline disk, a restored backup, a shared volume). So nothing
here ever resolves a path: a backing directory is reached one component at a time
(``openat`` with ``O_NOFOLLOW | O_DIRECTORY``) from the cipher dir's own fd, and every
operation names one entry *inside* an open directory with ``AT_SYMLINK_NOFOLLOW`` or its
equivalent. Consequences callers rely on:

- a symbolic link planted anywhere in the cipher dir is never followed: as a directory
  component the lookup fails with ``ELOOP``/``ENOTDIR``; as the entry itself, metadata
  changes apply to the link (or fail), opens fail with ``ELOOP``;
- new files are created with ``O_EXCL``: a planted link or file is never written through;
- special files (FIFOs, sockets, devices) are never opened: ``open_file`` checks the
  entry's type before and after its ``O_NONBLOCK | O_NOFOLLOW`` open, and refuses
  anything that is not a regular file with ``EIO`` (``SpecialFile``);
- mode and extended-attribute changes go through an ``O_PATH`` fd of the entry and its
  ``/proc/self/fd`` link, which names exactly the inode found without following links;
- a backing path is never built whole, so plaintext paths up to PATH_MAX work although
  their encrypted form is longer.

``Dir`` objects are shared and cached by ``names``; a ``Dir``'s fd is closed when the last
reference to it goes, so no operation can see its fd closed (or reused) under it.
``display`` strings are for messages only and are never opened.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
from collections.abc import Iterator

from encfs import format as fmt
from encfs.errors import VolumeBusy

PAGE_SIZE = os.sysconf("SC_PAGESIZE")  # the page cache's unit (prefetch_edges)
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_O_FILE = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC

RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
_AT_FDCWD = -100


class SpecialFile(OSError):
    """A backing entry the daemon must not open (not a regular file) was asked to be one."""

    def __init__(self, display: str) -> None:
        super().__init__(errno.EIO, "not a regular file in the cipher dir (never opened)", display)


class Dir:
    """An open backing directory. Thread-safe: every method is one or a few syscalls on
    names inside it; none follows a symbolic link. Raises ``OSError`` as the syscalls do."""

    __slots__ = ("dead", "display", "fd")

    def __init__(self, fd: int, display: str) -> None:
        self.fd = fd
        self.display = display
        self.dead = False
        """Set once the directory was removed: caches holding it must resolve again."""

    def __del__(self) -> None:
        with contextlib.suppress(OSError, TypeError):
            os.close(self.fd)

    def __repr__(self) -> str:
        return f"Dir({self.display!r})"

    def path(self, name: str) -> str:
        """``name`` inside this directory, for messages (never opened)."""
        return self.display.rstrip("/") + "/" + name

    # --- this directory --------------------------------------------------------------------

    def fstat(self) -> os.stat_result:
        return os.fstat(self.fd)

    def fsync(self) -> None:
        os.fsync(self.fd)

    def statvfs(self) -> os.statvfs_result:
        return os.fstatvfs(self.fd)

    def scandir(self) -> Iterator[os.DirEntry[str]]:
        """The entries; each ``DirEntry.stat(follow_symlinks=False)`` is an ``fstatat`` here."""
        with os.scandir(self.fd) as it:
            yield from it

    def names(self) -> list[str]:
        return os.listdir(self.fd)

    # --- entries ---------------------------------------------------------------------------

    def lstat(self, name: str) -> os.stat_result:
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False)

    def exists(self, name: str) -> bool:
        try:
            self.lstat(name)
        except FileNotFoundError:
            return False
        return True

    def opendir(self, name: str) -> Dir:
        """The subdirectory ``name``; ``ELOOP``/``ENOTDIR`` if it is a link or not a dir."""
        fd = os.open(name, _O_DIR, dir_fd=self.fd)
        return Dir(fd, self.path(name))

    def open_file(self, name: str, flags: int) -> int:
        """Open the existing regular file ``name`` (``flags``: access mode and O_SYNC-like
        bits; ``O_CREAT``/``O_TRUNC``/``O_APPEND`` are not passed). Raises ``SpecialFile``
        for anything else, without opening it (checked again on the fd: the entry may
        change between the two)."""
        if not stat.S_ISREG(self.lstat(name).st_mode):
            raise SpecialFile(self.path(name))
        keep = flags & (os.O_ACCMODE | os.O_SYNC | os.O_DSYNC)
        fd = os.open(name, keep | _O_FILE, dir_fd=self.fd)
        return _regular_or_close(fd, self.path(name))

    def create_file(self, name: str, flags: int, mode: int) -> int:
        """Create the regular file ``name`` (never an existing entry: ``FileExistsError``)."""
        keep = flags & (os.O_ACCMODE | os.O_SYNC | os.O_DSYNC)
        return os.open(name, keep | _O_FILE | os.O_CREAT | os.O_EXCL, mode, dir_fd=self.fd)

    def read_small(self, name: str, limit: int) -> bytes:
        """Up to ``limit`` bytes of the small regular file ``name`` (ids, companions)."""
        fd = self.open_file(name, os.O_RDONLY)
        try:
            return os.read(fd, limit)
        finally:
            os.close(fd)

    def write_new(self, name: str, data: bytes, mode: int = 0o440, *, sync: bool = True) -> None:
        """Create ``name`` holding ``data`` (fsynced unless ``sync`` is False); raises
        ``FileExistsError`` if it exists, and leaves no partial file on failure."""
        fd = self.create_file(name, os.O_WRONLY, mode)
        try:
            os.write(fd, data)
            if sync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                self.unlink(name)
            raise
        os.close(fd)

    def mkdir(self, name: str, mode: int) -> None:
        os.mkdir(name, mode, dir_fd=self.fd)

    def rmdir(self, name: str) -> None:
        os.rmdir(name, dir_fd=self.fd)

    def unlink(self, name: str) -> None:
        os.unlink(name, dir_fd=self.fd)

    def mknod(self, name: str, mode: int, device: int) -> None:
        os.mknod(name, mode, device, dir_fd=self.fd)

    def symlink(self, target: str, name: str) -> None:
        os.symlink(target, name, dir_fd=self.fd)

    def readlink(self, name: str) -> str:
        """The target of the link ``name`` (``EINVAL`` if it is not a link); never followed."""
        return os.readlink(name, dir_fd=self.fd)

    def chown(self, name: str, uid: int, gid: int) -> None:
        os.chown(name, uid, gid, dir_fd=self.fd, follow_symlinks=False)

    def utime(self, name: str, ns: tuple[int, int] | None) -> None:
        if ns is None:
            os.utime(name, dir_fd=self.fd, follow_symlinks=False)
        else:
            os.utime(name, ns=ns, dir_fd=self.fd, follow_symlinks=False)

    def access(self, name: str, amode: int) -> bool:
        return os.access(name, amode, dir_fd=self.fd, follow_symlinks=False)

    def chmod(self, name: str, mode: int) -> None:
        """Change the mode of ``name`` itself; ``EOPNOTSUPP`` for a symbolic link (Linux
        keeps no mode on links). One ``fchmodat2(AT_SYMLINK_NOFOLLOW)`` (Linux >= 6.6);
        on older kernels an ``O_PATH`` fd and its ``/proc/self/fd`` link (four calls)."""
        res = LIBC.syscall(
            _SYS_FCHMODAT2, self.fd, os.fsencode(name), ctypes.c_uint(mode), _AT_SYMLINK_NOFOLLOW
        )
        if res == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), self.path(name))
        with self._pinned(name) as (proc, st):
            if stat.S_ISLNK(st.st_mode):
                raise OSError(errno.EOPNOTSUPP, "symbolic links have no mode")
            os.chmod(proc, mode)

    def getxattr(self, name: str, attr: str) -> bytes:
        with self._pinned(name) as (proc, _st):
            return os.getxattr(proc, attr)

    def setxattr(self, name: str, attr: str, value: bytes, flags: int) -> None:
        with self._pinned(name) as (proc, _st):
            os.setxattr(proc, attr, value, flags)

    def listxattr(self, name: str) -> list[str]:
        with self._pinned(name) as (proc, _st):
            return os.listxattr(proc)

    def removexattr(self, name: str, attr: str) -> None:
        with self._pinned(name) as (proc, _st):
            os.removexattr(proc, attr)

    @contextlib.contextmanager
    def _pinned(self, name: str) -> Iterator[tuple[str, os.stat_result]]:
        """An ``O_PATH`` fd of the entry ``name`` itself (a link stays a link; nothing is
        opened for I/O, so a FIFO or device is harmless) as its ``/proc/self/fd`` path,
        which resolves to exactly that inode, and its stat."""
        fd = os.open(name, _O_PATH, dir_fd=self.fd)
        try:
            yield f"/proc/self/fd/{fd}", os.fstat(fd)
        finally:
            os.close(fd)


def _regular_or_close(fd: int, display: str) -> int:
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SpecialFile(display)
    return fd


def open_root(path: str) -> Dir:
    """The cipher dir itself. Its own path is the operator's (links in it are theirs to
    make), so it is resolved normally; everything below it never is."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return Dir(fd, os.path.abspath(path))


def lock_volume(root: Dir, holder: str) -> int:
    """Take the cipher dir's exclusive lock (``fmt.LOCK_NAME``) and write ``holder`` (who
    holds it, for the next one's message) into it; returns the fd that holds the lock.
    Closing the fd or the process's death, even by SIGKILL, releases it. Raises
    ``VolumeBusy`` naming the current holder if another process has it."""
    name = fmt.LOCK_NAME
    if root.exists(name) and not stat.S_ISREG(root.lstat(name).st_mode):
        raise SpecialFile(root.path(name))
    fd = _regular_or_close(
        os.open(name, os.O_RDWR | os.O_CREAT | _O_FILE, 0o600, dir_fd=root.fd), root.path(name)
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = os.pread(fd, 1024, 0).decode("utf-8", "replace").strip()
        os.close(fd)
        raise VolumeBusy(
            f"{root.display} is in use by {who or 'another encfs process'}",
            hint="unmount it first (encfs unmount MOUNTPOINT): two encfs processes writing "
            "one cipher dir lose data",
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode("utf-8", "replace"), 0)
    return fd


def volume_holder(root: Dir) -> str | None:
    """Who holds the cipher dir's lock now (its description), or None if nobody does."""
    try:
        fd = root.open_file(fmt.LOCK_NAME, os.O_RDONLY)
    except (FileNotFoundError, SpecialFile):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 1024, 0).decode("utf-8", "replace").strip() or "encfs"
        return None
    finally:
        os.close(fd)


def rename(src: Dir, src_name: str, dst: Dir, dst_name: str, flags: int = 0) -> None:
    """``renameat2`` between two open directories (``flags``: RENAME_NOREPLACE or
    RENAME_EXCHANGE); links are renamed, never followed."""
    if not flags:
        os.rename(src_name, dst_name, src_dir_fd=src.fd, dst_dir_fd=dst.fd)
        return
    res = LIBC.renameat2(
        src.fd, os.fsencode(src_name), dst.fd, os.fsencode(dst_name), ctypes.c_uint(flags)
    )
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dst.path(dst_name))


def link(src: Dir, src_name: str, dst: Dir, dst_name: str) -> None:
    """A new hard link ``dst_name`` to the entry ``src_name`` itself (never its target)."""
    os.link(src_name, dst_name, src_dir_fd=src.fd, dst_dir_fd=dst.fd, follow_symlinks=False)


LIBC = ctypes.CDLL(None, use_errno=True)
"""The process's libc, for the calls ``os`` lacks: the one handle encfs loads (keys use it
for ``mlock``, the daemon for ``prctl`` and ``syncfs``)."""
LIBC.syscall.restype = ctypes.c_long
_SYS_FCHMODAT2 = 452
"""fchmodat2(2): the same number on every architecture (added in Linux 6.6)."""
_AT_SYMLINK_NOFOLLOW = 0x100
LIBC.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
LIBC.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_uint)
_SYNC_FILE_RANGE_WRITE = 2


def _check(res: int) -> None:
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """``pwrite`` all of ``data`` at ``offset`` (a short write is continued; a write of
    nothing is ``EIO``). Raises ``OSError``."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, "short write to backing file")
        view = view[written:]
        offset += written


def prefetch_edges(fd: int, cipher_off: int, cipher_len: int) -> None:
    """Start reading the backing pages a ``pwrite`` of ``cipher_len`` bytes at
    ``cipher_off`` covers only in part. The filesystem must read such a page before it can
    change part of it, and does so inside the ``pwrite``, one page after the other; asked
    for before the write (and before its blocks are sealed), both edges of a block come in
    one request while the CPU works. Cipher blocks straddle pages, so every cold block
    rewrite has two such edges. A cached page costs a lookup. Never raises: a filesystem
    that cannot read ahead makes the ``pwrite`` read what it needs, as without this. The
    native path's ``prefetch_edges`` does the same."""
    end = cipher_off + cipher_len
    head, tail = cipher_off - cipher_off % PAGE_SIZE, end - end % PAGE_SIZE
    partial_head, partial_tail = cipher_off != head, end != tail
    with contextlib.suppress(OSError):
        if partial_head and partial_tail and tail - head <= PAGE_SIZE:  # one page, or two adjacent
            os.posix_fadvise(fd, head, tail + PAGE_SIZE - head, os.POSIX_FADV_WILLNEED)
        else:
            if partial_head:
                os.posix_fadvise(fd, head, PAGE_SIZE, os.POSIX_FADV_WILLNEED)
            if partial_tail:
                os.posix_fadvise(fd, tail, PAGE_SIZE, os.POSIX_FADV_WILLNEED)


def fallocate(fd: int, mode: int, cipher_off: int, cipher_len: int) -> None:
    """fallocate(2) on a backing file's fd. Raises ``OSError``."""
    _check(LIBC.fallocate(fd, mode, cipher_off, cipher_len))


def start_writeback(fd: int, cipher_off: int, cipher_len: int) -> None:
    """Queue the disk write of a range (``sync_file_range(SYNC_FILE_RANGE_WRITE)``: it
    does not wait). Best effort: errors are left for fsync to report."""
    LIBC.sync_file_range(fd, cipher_off, cipher_len, _SYNC_FILE_RANGE_WRITE)


def syncfs(fd: int) -> None:
    """syncfs(2) of the filesystem holding ``fd``. Raises ``OSError``."""
    _check(LIBC.syncfs(fd))
