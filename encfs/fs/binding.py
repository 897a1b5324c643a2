"""The libfuse adapter: mfusepy's ``FUSE`` with the libfuse 3 features and the fast paths
encfs needs, the capability negotiation, and the session the operations are served through.

The only importer of mfusepy, which loads its libfuse when imported: this module is imported
by ``encfs.fs.serve`` after ``encfs.fs.select_libfuse`` chose the library. The adapter calls
the operations only through ``Served`` and mfusepy's generic callbacks; the operations see
libfuse only through ``LibfuseSession``.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import struct
import threading
from collections.abc import Callable
from typing import Any, Protocol

import mfusepy

from encfs import fastpath
from encfs import format as fmt
from encfs.fastpath import NativeIO
from encfs.fs.handles import Listing
from encfs.fs.ops import FsOptions, Session

log = logging.getLogger(__name__)

FUSE_CAP_ASYNC_READ = 1 << 0
FUSE_CAP_HANDLE_KILLPRIV = 1 << 20
FUSE_CAP_HANDLE_KILLPRIV_V2 = 1 << 21
FUSE_CAP_READDIRPLUS = 1 << 13
FUSE_CAP_WRITEBACK_CACHE = 1 << 16
FUSE_CAP_PARALLEL_DIROPS = 1 << 18
FUSE_READDIR_PLUS = 1 << 0
FUSE_FILL_DIR_PLUS = 1 << 1
MAX_WRITE = 1 << 20
_USER_XATTR = os.fsencode(fmt.XATTR_PREFIX)


class Served(Protocol):
    """What the adapter calls on the operations itself (``ops.EncfsOperations`` is the one);
    every other callback goes through mfusepy's generic ones, by operation name."""

    @property
    def options(self) -> FsOptions: ...

    @property
    def native(self) -> NativeIO | None:
        """The native path to put in front of ``read``, ``write``, ``getattr`` and
        ``getxattr``, if any."""
        ...

    def started(self, session: Session) -> None: ...

    def foreign_xattr(self) -> int: ...

    def stat(self, path: str | None, fh: int | None = None) -> tuple[os.stat_result, int]: ...

    def readdir(self, path: str | None, fh: int, offset: int = 0) -> Listing: ...

    def read_into(self, path: str | None, out: memoryview, offset: int, fh: int) -> int: ...

    def write(self, path: str | None, data: bytes | memoryview, offset: int, fh: int) -> int: ...

    def create(self, path: str, mode: int, flags: int = ...) -> int: ...

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int: ...

    def rename(self, old: str, new: str, flags: int = 0) -> int: ...

    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> int: ...

    def chown(self, path: str | None, uid: int, gid: int, fh: int | None = None) -> int: ...

    def utimens(
        self,
        path: str | None,
        times: tuple[tuple[int, int], tuple[int, int]] | None = None,
        fh: int | None = None,
    ) -> int: ...


class LibfuseSession:
    """The mount's libfuse session as the operations use it (``ops.Session``). Made in
    libfuse's init callback, where the ``struct fuse *`` of the mount is known."""

    def __init__(self, killpriv_v2: bool) -> None:
        self.libfuse_version = f"{mfusepy.fuse_version_major}.{mfusepy.fuse_version_minor}"
        self.killpriv_v2 = killpriv_v2
        libfuse = mfusepy._libfuse
        self._fuse_ptr: int = libfuse.fuse_get_context().contents.fuse
        self._invalidate_path = libfuse.fuse_invalidate_path
        self._invalidate_path.argtypes = (ctypes.c_void_p, ctypes.c_char_p)
        self._invalidate_path.restype = ctypes.c_int

    def caller(self) -> tuple[int, int]:
        uid, gid, _pid = mfusepy.fuse_get_context()
        return uid, gid

    def invalidate(self, path: str) -> int:
        result: int = self._invalidate_path(self._fuse_ptr, os.fsencode(path))
        return result


def negotiate(conn: Any, config: Any, options: FsOptions) -> bool:
    """Ask the kernel (``conn``) and libfuse (``config``) for what encfs wants of them;
    returns whether HANDLE_KILLPRIV_V2 was granted (no capability probe before writes)."""
    killpriv_v2 = False
    if conn is not None:
        conn.want |= conn.capable & (
            (FUSE_CAP_WRITEBACK_CACHE if options.writeback_cache else 0)
            | FUSE_CAP_READDIRPLUS
            | FUSE_CAP_PARALLEL_DIROPS
            | FUSE_CAP_ASYNC_READ
            # The operations clear set-user/group-ID bits on chown (the backing filesystem
            # does) and on truncate (``EncfsOperations._truncated``); the kernel then skips
            # a GETATTR before every chown and truncate.
            # (not with the writeback cache: its writes reach us as root, too late).
            | (0 if options.writeback_cache else FUSE_CAP_HANDLE_KILLPRIV)
            | (0 if options.writeback_cache else FUSE_CAP_HANDLE_KILLPRIV_V2)
        )
        conn.max_write = MAX_WRITE
        conn.max_readahead = MAX_WRITE
        killpriv_v2 = bool(conn.want & FUSE_CAP_HANDLE_KILLPRIV_V2)
        log.info(
            "libfuse %s.%s, %s",
            mfusepy.fuse_version_major,
            mfusepy.fuse_version_minor,
            "HANDLE_KILLPRIV_V2"
            if killpriv_v2
            else "no HANDLE_KILLPRIV_V2 (one more round trip per write; see scripts/build-libfuse)",
        )
    if config is not None:
        # auto_cache, not kernel_cache: the page cache survives opens unless the file's
        # mtime or size changed. libfuse gives each *path* its own kernel inode, so a
        # write through one hard link must invalidate the other names' caches at open.
        config.auto_cache = 1
        config.use_ino = 1
        # hard_remove stays off: libfuse then hides unlinked-but-open files (renames
        # them to .fuse_hidden*) so fstat() on their handles keeps working.
        config.nullpath_ok = 1
        config.entry_timeout = options.entry_timeout
        config.attr_timeout = options.attr_timeout
        config.negative_timeout = options.entry_timeout
    return killpriv_v2


class EncfsFUSE(mfusepy.FUSE):  # type: ignore[misc]
    """mfusepy's FUSE with three adaptations encfs needs from libfuse 3:

    - readdir fills whole attributes with FUSE_FILL_DIR_PLUS when the kernel asks for
      READDIRPLUS, so ``ls -l`` and ``find`` need no lookup per entry. It passes real
      offsets: libfuse 3.14 drops the entries' node ids in its offset-0 buffering mode,
      and the kernel then looks every entry up again;
    - utimens passes raw (sec, nsec) pairs so UTIME_NOW / UTIME_OMIT survive;
    - rename passes its flags (RENAME_NOREPLACE, RENAME_EXCHANGE);
    - truncate, chmod, chown and utimens pass the file handle when libfuse has one (with
      nullpath_ok it then passes no path; the kernel sends mtime updates this way);
    - getattr, create, write and getxattr of non-``user.*`` names skip per-call overheads
      of the generic binding;
    - every libfuse worker thread keeps its Python thread state (see ``_wrapper``);
    - libfuse's init negotiates (``negotiate``) and hands the operations their session.

    Constructing it mounts ``mountpoint`` and serves until unmounted (mfusepy's ``FUSE``).
    """

    def __init__(self, operations: Served, mountpoint: str, **kwargs: Any) -> None:
        self._thread_state_kept = threading.local()
        self.ops = operations
        native = operations.native
        if native is None:
            super().__init__(operations, mountpoint, **kwargs)
            return
        # mfusepy builds libfuse's operations table and passes it to fuse_main_real in one
        # go; the one way to put the native callbacks in front of its own is to see the
        # table on its way there (for this call only).
        real_main = mfusepy.fuse_main_real

        def main_with_native(argc: int, argv: Any, ops_p: Any, size: int, ctx: Any) -> int:
            self._plug_native(ops_p.contents, native)
            result: int = real_main(argc, argv, ops_p, size, ctx)
            return result

        mfusepy.fuse_main_real = main_with_native
        try:
            super().__init__(operations, mountpoint, **kwargs)
        finally:
            mfusepy.fuse_main_real = real_main

    def _plug_native(self, table: Any, native: NativeIO) -> None:
        """Make ``native`` libfuse's callback for each operation it serves, handing what it
        does not serve to a callback of our own into the same adapter method mfusepy would
        call (kept alive here: mfusepy's are dropped with the table entries replaced)."""
        protos = {f[0]: f[1] for f in mfusepy.fuse_operations._fields_}
        fh_offset = mfusepy.fuse_file_info.fh.offset
        self._python_callbacks = []
        for op in fastpath.OPS:
            if not getattr(table, op):
                continue  # not registered: nothing to serve
            method = getattr(self, op + "_fuse_3", None) or getattr(self, op)
            python = protos[op](functools.partial(self._wrapper, method))
            self._python_callbacks.append(python)
            fallback = ctypes.cast(python, ctypes.c_void_p).value
            assert fallback is not None
            setattr(table, op, protos[op](native.plug(op, fallback, fh_offset)))

    def init_fuse_3(self, conn: Any, config: Any) -> None:
        """libfuse's init (once, before any request): mfusepy's own (mount options libfuse
        3 moved into ``config``), then ours; the operations get their session last."""
        super().init_fuse_3(conn, config)
        killpriv_v2 = negotiate(
            conn.contents if conn else None, config.contents if config else None, self.ops.options
        )
        self.ops.started(LibfuseSession(killpriv_v2))

    def _wrapper(self, func: Callable[..., int], *args: Any, **kwargs: Any) -> int:
        """Every callback enters here, on one of libfuse's worker threads.

        ctypes gives a foreign thread a fresh Python thread state for each callback and
        destroys it on return — about 28 µs of every request here (a `getxattr` round trip:
        67 µs, 39 µs with this). One extra ``PyGILState_Ensure`` on a thread's first
        callback keeps its state for the thread's life. libfuse (>= 3.12) never retires
        idle workers (max_idle_threads defaults to unlimited, at most 10 threads), so this
        costs one thread state per worker. A ``threading.local`` lives in the thread state,
        so it is empty exactly when the state is new.
        """
        kept = self._thread_state_kept
        if not kept.__dict__:
            kept.yes = True
            ctypes.pythonapi.PyGILState_Ensure()
        try:
            return func(*args, **kwargs) or 0
        except OSError as exc:
            if isinstance(exc.errno, int) and exc.errno > 0:
                return -exc.errno
            caught: BaseException = exc
        except BaseException as exc:
            caught = exc
        # Anything else (a bug in an adapter here, init failing, SystemExit) gets the
        # binding's own handling: logged, and the loop stopped where it must be.

        def reraise(*_args: Any, **_kwargs: Any) -> int:
            raise caught

        reraise.__name__ = func.__name__
        result: int = super()._wrapper(reraise)
        return result

    def readdir_fuse_3(
        self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int
    ) -> int:
        decoded = None if path is None else path.decode(self.encoding, self.errors)
        items: Listing = self.ops.readdir(decoded, fip.contents.fh, offset)
        plus = flags & FUSE_READDIR_PLUS
        for index in range(offset, len(items)):
            name, attrs, _off = items[index]
            st = None
            fill_flags = 0
            if attrs is not None:
                st = mfusepy.c_stat()
                _fill_stat(st, *attrs)
                if plus and name not in (".", ".."):
                    fill_flags = FUSE_FILL_DIR_PLUS
            name_b = name.encode(self.encoding, self.errors)
            if filler(buf, name_b, st, index + 1, fill_flags) != 0:
                break
        return 0

    def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        times = None
        if buf:
            times = (
                (buf.contents.actime.tv_sec, buf.contents.actime.tv_nsec),
                (buf.contents.modtime.tv_sec, buf.contents.modtime.tv_nsec),
            )
        return self.ops.utimens(self._decode(path), times, _fh(fip))

    def chmod_fuse_3(self, path: bytes | None, mode: int, fip: Any) -> int:
        return self.ops.chmod(self._decode(path), mode, _fh(fip))

    def chown_fuse_3(self, path: bytes | None, uid: int, gid: int, fip: Any) -> int:
        if ctypes.c_uint32(uid + 1).value == 0:
            uid = -1
        if ctypes.c_uint32(gid + 1).value == 0:
            gid = -1
        return self.ops.chown(self._decode(path), uid, gid, _fh(fip))

    def _decode(self, path: bytes | None) -> str | None:
        return None if path is None else path.decode(self.encoding, self.errors)

    def getxattr(self, path: bytes, name: bytes, value: Any, size: int, *args: Any) -> int:
        """Only ``user.*`` attributes exist on encfs; answer any other name (above all the
        kernel's ``security.capability`` probe before every write, see docs/BENCHMARKS.md)
        here, without a Python exception on the way."""
        if not name.startswith(_USER_XATTR):
            return -self.ops.foreign_xattr()
        result: int = super().getxattr(path, name, value, size, *args)
        return result

    def getattr_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        """Fill the stat buffer straight from os.stat_result (no dict: this is the hottest
        call of all; every lookup, create and setattr reply goes through it). Errors (ENOENT
        of every negative lookup) return as -errno, not through the binding's exception
        handler and its logging."""
        try:
            st, size = self.ops.stat(self._decode(path), _fh(fip))
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        _fill_stat(buf.contents, st, size)
        return 0

    def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        """Decrypt into libfuse's reply buffer through a writable view of it, valid only
        during this call (mfusepy's own callback copies the returned bytes into it)."""
        out = _view(ctypes.addressof(buf.contents), size, _PYBUF_WRITE)
        return self.ops.read_into(self._decode(path), out, offset, fip.contents.fh)

    def write(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        """Pass a read-only view of libfuse's request buffer, not a copy of it (1 MiB per
        sequential write). The view is valid only during this call; ``CipherFile.write``
        keeps nothing of it. (A ctypes array type per size cost ~10 µs a write.)"""
        data = _view(ctypes.addressof(buf.contents), size, _PYBUF_READ)
        return self.ops.write(self._decode(path), data, offset, fip.contents.fh)

    def create(self, path: bytes, mode: int, fip: Any) -> int:
        """mfusepy inspects the create() signature on every call (~30 µs); we know it."""
        fi = fip.contents
        fi.fh = self.ops.create(path.decode(self.encoding, self.errors), mode, fi.flags)
        return 0

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        return self.ops.truncate(self._decode(path), length, _fh(fip))

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.ops.rename(
            old.decode(self.encoding, self.errors), new.decode(self.encoding, self.errors), flags
        )


# A memoryview over foreign memory, format "B" (what pyca wants), in one C call.
_view = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)(
    ("PyMemoryView_FromMemory", ctypes.pythonapi)
)
_PYBUF_READ = 0x100
_PYBUF_WRITE = 0x200

# struct stat as mfusepy declares it on LP64 Linux (x86-64): packed in one call instead of
# a dozen ctypes attribute stores (1.3 µs instead of 6.5 µs per getattr, measured here).
# Other layouts (e.g. aarch64) take the field-by-field path.
_STAT = struct.Struct("=QQQIIIiQqqq" + "qq" * 3 + "24x")
_STAT_FAST = ctypes.sizeof(mfusepy.c_stat) == _STAT.size and [
    (f[0], getattr(mfusepy.c_stat, f[0]).offset) for f in mfusepy.c_stat._fields_
] == [
    ("st_dev", 0), ("st_ino", 8), ("st_nlink", 16), ("st_mode", 24), ("st_uid", 28),
    ("st_gid", 32), ("__pad0", 36), ("st_rdev", 40), ("st_size", 48), ("st_blksize", 56),
    ("st_blocks", 64), ("st_atimespec", 72), ("st_mtimespec", 88), ("st_ctimespec", 104),
    ("reserved", 120),
]  # fmt: skip
_NS = 10**9


def _fill_stat(out: Any, st: os.stat_result, size: int) -> None:
    """Write ``st`` with the plaintext ``size`` into the ``c_stat`` ``out`` (st_dev 0)."""
    if _STAT_FAST:
        a, m, c = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        _STAT.pack_into(
            out, 0, 0, st.st_ino, st.st_nlink, st.st_mode, st.st_uid, st.st_gid, 0,
            st.st_rdev, size, st.st_blksize, st.st_blocks,
            a // _NS, a % _NS, m // _NS, m % _NS, c // _NS, c % _NS,
        )  # fmt: skip
        return
    ctypes.memset(ctypes.addressof(out), 0, ctypes.sizeof(out))
    out.st_mode = st.st_mode
    out.st_ino = st.st_ino
    out.st_nlink = st.st_nlink
    out.st_uid = st.st_uid
    out.st_gid = st.st_gid
    out.st_size = size
    out.st_blocks = st.st_blocks
    out.st_blksize = st.st_blksize
    out.st_rdev = st.st_rdev
    out.st_atimespec.tv_sec, out.st_atimespec.tv_nsec = divmod(st.st_atime_ns, _NS)
    out.st_mtimespec.tv_sec, out.st_mtimespec.tv_nsec = divmod(st.st_mtime_ns, _NS)
    out.st_ctimespec.tv_sec, out.st_ctimespec.tv_nsec = divmod(st.st_ctime_ns, _NS)


def _fh(fip: Any) -> int | None:
    return int(fip.contents.fh) if fip else None
