"""The FUSE operations of an encfs mount (``EncfsOperations``); the one place exceptions
become errno values.

Every operation is thin: resolve the plaintext path (``names``), delegate (content to the
file's ``CipherFile``, found in ``handles``; structure changes to ``tree``; attributes to
``attrs``; extended attributes to ``xattrs``), translate the result. ``@fuse_op`` (and
``@fuse_write`` for changes, refused on a read-only mount) maps every exception to an
errno (tampering -> EIO with one log line naming file and block; a wiped key -> the
suspended errno), so nothing falls through to the binding, which would answer EINVAL.
libfuse is seen only as a ``Session``. Handles (``fh``) are the backing file descriptors
(``fd``) of opened files.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from encfs import backing, fastpath, names
from encfs import format as fmt
from encfs.cipherfile import Sealer
from encfs.errors import FormatError, IntegrityError, VolumeSuspended
from encfs.fs import xattrs
from encfs.fs.attrs import Attributes
from encfs.fs.handles import Listing, OpenFiles
from encfs.fs.kcache import Aliases, Gate, SeenPaths
from encfs.fs.tree import Tree
from encfs.keys import VolumeKeys
from encfs.undo import UndoLog

log = logging.getLogger(__name__)


class Session(Protocol):
    """The FUSE session serving the operations, as they use it (``binding.LibfuseSession``
    is the real one; without one, as in tests that call the operations directly, the
    caller is root and nothing is invalidated)."""

    @property
    def libfuse_version(self) -> str: ...

    @property
    def killpriv_v2(self) -> bool:
        """Whether HANDLE_KILLPRIV_V2 was negotiated (no capability probe per write)."""
        ...

    def caller(self) -> tuple[int, int]:
        """(uid, gid) of the process whose request the calling thread serves."""
        ...

    def invalidate(self, path: str) -> int:
        """``kcache.Invalidate``: drop what the kernel caches of mount path ``path``."""
        ...


P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class FsOptions:
    """Settings of one mount that the operations need.

    Attribute and entry timeouts can be long because every change reaches the backing
    directory through this mount (changing the cipher dir behind a live mount is not
    supported), and the kernel drops what a change through the mount makes stale; the
    other names of hard-linked files are invalidated explicitly (``Aliases``).
    """

    read_only: bool = False
    suspended_errno: int = errno.EACCES
    attr_timeout: float = 10.0
    entry_timeout: float = 10.0
    writeback_cache: bool = False


@dataclass
class Counters:
    """Operation counters shown by ``encfs status``. Updated without a lock (approximate)."""

    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    integrity_errors: int = 0
    security_probes: int = 0  # getxattr of names outside user.* (the kernel's capability probe)


_UNGATED = frozenset({"release", "releasedir"})


def load_native(block_size: int, features: int, options: FsOptions) -> fastpath.Choice:
    """The native path (``fastpath.load``) for a mount of a volume with ``block_size``
    and feature flags ``features``, answering as these operations do, or why not."""
    return fastpath.load(
        block_size,
        features,
        read_only=options.read_only,
        foreign_errno=xattrs.UNSUPPORTED,
    )


def fuse_op(method: Callable[P, R]) -> Callable[P, R]:
    """Map every exception of a FUSE operation to an ``OSError`` with an errno, and pass
    the operation through the suspension gate (``EncfsOperations.gate``): while the volume
    is suspended every operation but closing a handle fails with ``suspended_errno``."""
    return _operation(method, writes=False)


def fuse_write(method: Callable[P, R]) -> Callable[P, R]:
    """``fuse_op`` for an operation that changes the volume: on a read-only mount it
    fails with EROFS, once inside the gate and before anything else."""
    return _operation(method, writes=True)


def _operation(method: Callable[P, R], writes: bool) -> Callable[P, R]:
    gated = method.__name__ not in _UNGATED

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        gate: Gate = args[0].gate  # type: ignore[attr-defined]
        if gated and not gate.enter():
            raise OSError(args[0].options.suspended_errno, "volume suspended")  # type: ignore[attr-defined]
        try:
            if writes and args[0].options.read_only:  # type: ignore[attr-defined]
                raise OSError(errno.EROFS, "read-only mount")
            return method(*args, **kwargs)
        except OSError as exc:
            if isinstance(exc.errno, int) and exc.errno > 0:
                raise
            log.error("%s: %s", method.__name__, exc)
            raise OSError(errno.EIO, "I/O error") from None
        except IntegrityError as exc:
            self = args[0]
            assert isinstance(self, EncfsOperations)
            self.counters.integrity_errors += 1
            log.error("%s: %s", method.__name__, exc)
            raise OSError(errno.EIO, "integrity check failed") from None
        except VolumeSuspended:
            self = args[0]
            assert isinstance(self, EncfsOperations)
            raise OSError(self.options.suspended_errno, "volume suspended") from None
        except FormatError as exc:
            log.error("%s: %s", method.__name__, exc)
            raise OSError(errno.EIO, "format error") from None
        except Exception:
            log.exception("%s failed unexpectedly", method.__name__)
            raise OSError(errno.EIO, "internal error") from None
        finally:
            if gated:
                gate.leave()

    return wrapper


def _tree_change(
    method: Callable[Concatenate[Tree, P], None],
) -> Callable[Concatenate[EncfsOperations, P], int]:
    """The FUSE operation that is the structure change ``method`` of the mount's ``tree``
    (a ``fuse_write``: gated, refused on a read-only mount, errors mapped; answers 0)."""

    @functools.wraps(method)
    def operation(self: EncfsOperations, /, *args: P.args, **kwargs: P.kwargs) -> int:
        method(self.tree, *args, **kwargs)
        return 0

    return fuse_write(operation)


class EncfsOperations:
    """FUSE operations over one unlocked volume. Thread-safe (libfuse's multi-threaded loop).

    Locks: each ``CipherFile`` has its own reader/writer lock for content; ``files`` (the
    open-file table) and ``names`` guard their own tables.
    """

    use_ns = True
    """mfusepy's switch: times in nanoseconds."""

    def __init__(
        self,
        cipher_dir: str,
        keys: VolumeKeys,
        block_size: int,
        options: FsOptions,
        on_init: Callable[[], None] | None = None,
        *,
        dirid_links: bool = False,
        io: fastpath.Choice | None = None,
    ) -> None:
        if block_size != keys.geometry.block_size:
            raise ValueError("block size differs from the keys' block size")
        root = backing.open_root(cipher_dir)
        self.keys = keys
        native = self.native = None if io is None else io.native
        """The native path (``encfs.fastpath``) the binding puts in front of ``read``,
        ``write``, ``getattr`` and ``getxattr``, or None: every request is served here."""
        self.io_path = "Python" if io is None else io.reason
        """Which path serves the hot requests, and why (``encfs status``)."""
        if native is not None:
            keys.attach_native(native)
        self.geo = keys.geometry
        self.options = options
        self.names = names.Names(root, keys, dirid_links=dirid_links)
        self.counters = Counters()
        self._on_init = on_init
        self.session: Session | None = None
        self.aliases = Aliases(None if native is None else native.set_aliases)
        self.gate = Gate(native)
        self.seen = SeenPaths()
        self.sealer = Sealer()
        self.undo = UndoLog(root)
        self.files = OpenFiles(keys, self.geo, self.sealer, self.undo, native)
        self.tree = Tree(self.names, keys, self.files, self.aliases, self.seen, self._caller)
        self.attrs = Attributes(self.names, self.files, self.aliases)

    # --- life cycle ------------------------------------------------------------------------

    def started(self, session: Session) -> None:
        """The mount is up (libfuse's init, before any request): serve through ``session``
        from now on, and announce readiness (``on_init``)."""
        self.session = session
        self.aliases.start(session.invalidate)
        if self._on_init is not None:
            self._on_init()

    def counter_values(self) -> dict[str, int]:
        """``counters`` with what the native path served added in; with it, also how many
        reads and writes it served (``native_reads``, ``native_writes``), how many
        requests it handed to Python (``native_fallbacks``) and how many bytes of stream
        writes it sealed (``native_bytes_sealed``)."""
        values = asdict(self.counters)
        if self.native is not None:
            native = self.native.counters()
            for name in ("reads", "bytes_read", "writes", "bytes_written", "security_probes"):
                values[name] += native[name]
            values["native_reads"] = native["reads"]
            values["native_writes"] = native["writes"]
            values["native_fallbacks"] = native["fallbacks"]
            values["native_bytes_sealed"] = native["bytes_sealed"]
        return values

    @property
    def libfuse_version(self) -> str | None:
        return None if self.session is None else self.session.libfuse_version

    @property
    def killpriv_v2(self) -> bool:
        return self.session is not None and self.session.killpriv_v2

    def _caller(self) -> tuple[int, int]:
        """(uid, gid) of the calling process; root without a session."""
        return (0, 0) if self.session is None else self.session.caller()

    # --- suspension ------------------------------------------------------------------------

    @property
    def suspended(self) -> bool:
        return self.gate.suspended

    def suspend(self, drain_timeout: float = 5.0) -> int:
        """Stop serving and forget every key and every plaintext the kernel caches.

        Order matters: shut the gate (new operations fail with ``suspended_errno``) and wait
        for those inside to finish, wipe the keys and our plaintext caches (names, listings,
        the partial blocks kept for appends),
        then invalidate every path the kernel may cache, so cached pages — including pages
        mapped by an earlier ``mmap`` — must be read again, which the gate refuses (a read
        fails, an mmap access raises SIGBUS). The caller flushes dirty data *before* (it
        needs the keys). Returns how many kernel inodes were invalidated. Never call from a
        FUSE request thread.
        """
        if not self.gate.close(drain_timeout):
            log.warning("operations still running after %.0f s; suspending anyway", drain_timeout)
        self.sealer.drain()  # deferred writes need the keys
        self.keys.wipe()
        self.names.invalidate()
        self.files.forget_plaintext()
        return self.seen.invalidate_all(None if self.session is None else self.session.invalidate)

    def resume(
        self,
        volume_keys: Sequence[bytearray],
        header_body: bytes,
        header_tag: bytes,
        retiring: Sequence[bytearray] = (),
    ) -> None:
        """Serve again with the volume key(s) (key slot order; copied, the caller wipes its
        own) and, for a volume whose rekey is under way, the retiring ones (same order).
        The header tag(s) must verify under them (``HeaderAuthError`` otherwise, and the
        keys stay wiped). Handles opened before the suspension work again."""
        self.keys.load(volume_keys[0], volume_keys[1] if len(volume_keys) > 1 else None)
        try:
            if retiring:
                self.keys.load_retiring(retiring[0], retiring[1] if len(retiring) > 1 else None)
            self.keys.verify_header(header_body, header_tag)
        except BaseException:
            self.keys.wipe()
            raise
        self.gate.reopen()

    @contextlib.contextmanager
    def quiet(self, timeout: float = 60.0) -> Iterator[None]:
        """While held, no FUSE operation runs (``Gate.paused``: new ones wait) and deferred
        writes are on the backing file: ``encfs rekey`` changes a directory's names or the
        keys in use meanwhile. Raises ``TimeoutError``. Never call from a FUSE thread."""
        with self.gate.paused(timeout):
            self.sealer.drain()
            yield

    # --- helpers ---------------------------------------------------------------------------

    def _attrs(self, st: os.stat_result) -> dict[str, int]:
        mode = st.st_mode
        size = self._plain_size(st)
        return {
            "st_mode": mode,
            "st_ino": st.st_ino,
            "st_nlink": st.st_nlink,
            "st_uid": st.st_uid,
            "st_gid": st.st_gid,
            "st_size": size,
            "st_atime": st.st_atime_ns,
            "st_mtime": st.st_mtime_ns,
            "st_ctime": st.st_ctime_ns,
            "st_blocks": st.st_blocks,
            "st_blksize": st.st_blksize,
            "st_rdev": st.st_rdev,
        }

    @staticmethod
    def _backing_flags(flags: int) -> int:
        """Flags for our own fd of a backing file: always readable (partial-block writes
        read first), never O_APPEND (the kernel resolves appends with writeback cache),
        never O_TRUNC (truncation runs under the file lock)."""
        acc = flags & os.O_ACCMODE
        return (flags & (os.O_SYNC | os.O_DSYNC)) | (
            os.O_RDONLY if acc == os.O_RDONLY else os.O_RDWR
        )

    # --- attributes ------------------------------------------------------------------------

    @fuse_op
    def stat(self, path: str | None, fh: int | None = None) -> tuple[os.stat_result, int]:
        """The backing stat and the plaintext size (EncfsFUSE.getattr_fuse_3's fast path)."""
        if fh is not None:
            self.keys.names  # noqa: B018 - raises VolumeSuspended when keys are wiped
            cfile = self.files.get(fh)
            if cfile is not None and cfile.pending:
                cfile.drain()  # the size must include deferred writes
            st = os.fstat(fh)
        elif path is None:
            raise OSError(errno.EBADF, "no path and no handle")
        else:
            entry = self.names.entry(path)
            st = entry.parent.lstat(entry.name)
            cfile = self.files.of_inode((st.st_dev, st.st_ino))
            if cfile is not None and cfile.pending:
                cfile.drain()
                st = entry.parent.lstat(entry.name)
            self.seen.note(path)
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                self.aliases.note((st.st_dev, st.st_ino), path)
            elif path == "/" and self.attrs.root_attrs is not None:
                st = names.with_root_attrs(st, self.attrs.root_attrs)
        return st, self._plain_size(st)

    def _plain_size(self, st: os.stat_result) -> int:
        return self.geo.entry_plain_size(st.st_mode, st.st_size)

    @fuse_op
    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        st, _size = self.stat(path, fh)
        return self._attrs(st)

    @fuse_op
    def access(self, path: str, amode: int) -> int:
        entry = self.names.entry(path)
        if amode == os.F_OK:
            entry.parent.lstat(entry.name)
            return 0
        if amode & os.W_OK and self.options.read_only:
            raise OSError(errno.EROFS, "read-only mount")
        if not entry.parent.access(entry.name, amode):
            raise OSError(errno.EACCES, "access denied")
        return 0

    @fuse_write
    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> int:
        self.attrs.chmod(path, mode, fh)
        return 0

    @fuse_write
    def chown(self, path: str | None, uid: int, gid: int, fh: int | None = None) -> int:
        self.attrs.chown(path, uid, gid, fh)
        return 0

    @fuse_write
    def utimens(
        self,
        path: str | None,
        times: tuple[tuple[int, int], tuple[int, int]] | None = None,
        fh: int | None = None,
    ) -> int:
        self.attrs.utimens(path, times, fh)
        return 0

    @fuse_op
    def statfs(self, path: str) -> dict[str, int]:
        sv = self.names.root.statvfs()
        return {
            "f_bsize": sv.f_bsize,
            "f_frsize": sv.f_frsize,
            "f_blocks": sv.f_blocks,
            "f_bfree": sv.f_bfree,
            "f_bavail": sv.f_bavail,
            "f_files": sv.f_files,
            "f_ffree": sv.f_ffree,
            "f_favail": sv.f_favail,
            "f_namemax": fmt.MAX_PLAIN_NAME,
        }

    # --- directories -----------------------------------------------------------------------

    @fuse_op
    def opendir(self, path: str) -> int:
        self.names.directory(path)
        return self.files.open_dir(path)

    def destroy(self, path: str | None) -> None:
        """The session ends (unmount or signal): finish the deferred writes."""
        self.sealer.drain()

    @fuse_op
    def releasedir(self, path: str | None, fh: int) -> int:
        self.files.release_dir(fh)
        return 0

    @fuse_op
    def readdir(self, path: str | None, fh: int, offset: int = 0) -> Listing:
        """The whole listing with each entry's backing stat and plaintext size (None for
        ``..``). Read once per handle, at ``offset`` 0; later
        offsets (the kernel's next buffer) reuse it, so ``ls`` stays linear in large dirs."""
        if offset:
            cached = self.files.listing(fh)
            if cached is not None:
                return cached
        if self.sealer.busy:
            self.sealer.drain()  # the listing's sizes must include deferred writes
        path = self.files.dir_path(fh) or path
        if path is None:
            raise OSError(errno.EBADF, "unknown directory handle")
        directory, _dir_id = self.names.directory(path)
        dot = directory.fstat()
        if path == "/" and self.attrs.root_attrs is not None:
            dot = names.with_root_attrs(dot, self.attrs.root_attrs)
        entries: Listing = [
            (".", (dot, dot.st_size), 0),
            ("..", None, 0),
        ]
        prefix = path.rstrip("/") + "/"
        note = self.seen.note
        for name, dent in self.names.listdir(path):
            try:
                st = dent.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            note(prefix + name)
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                self.aliases.note((st.st_dev, st.st_ino), prefix + name)
            entries.append((name, (st, self._plain_size(st)), 0))
        self.files.keep_listing(fh, entries)
        return entries

    # --- entries ---------------------------------------------------------------------------

    @fuse_write
    def create(self, path: str, mode: int, flags: int = os.O_RDWR) -> int:
        entry = self.names.entry(path)
        exclusive = bool(flags & os.O_EXCL)
        fd = self.tree.create_file(entry, self._backing_flags(flags), mode, exclusive)
        return self._opened(fd, entry, path, flags)

    @fuse_op
    def open(self, path: str, flags: int) -> int:
        if self.options.read_only and flags & (os.O_ACCMODE | os.O_TRUNC) not in (os.O_RDONLY,):
            raise OSError(errno.EROFS, "read-only mount")
        entry = self.names.entry(path)
        try:
            fd = entry.parent.open_file(entry.name, self._backing_flags(flags))
        except PermissionError:
            if flags & os.O_ACCMODE != os.O_WRONLY:
                raise
            fd = entry.parent.open_file(entry.name, os.O_WRONLY)
        return self._opened(fd, entry, path, flags)

    def _opened(self, fd: int, entry: names.Entry, path: str, flags: int) -> int:
        """Make the new fd of ``entry`` a handle (truncated for O_TRUNC); it is closed
        again if that fails."""
        try:
            cfile = self.files.attach(fd, entry.display, path)
            if flags & os.O_TRUNC:
                cfile.truncate(fd, 0)
                self._truncated(fd, path)
        except BaseException:
            self.files.release(fd)
            raise
        return fd

    @fuse_op
    def release(self, path: str | None, fh: int) -> int:
        self.files.release(fh)
        return 0

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        """mfusepy's form of ``read_into`` (EncfsFUSE.read calls ``read_into`` itself)."""
        out = bytearray(max(size, 0))
        length = self.read_into(path, memoryview(out), offset, fh)
        del out[length:]
        return bytes(out)

    @fuse_op
    def read_into(self, path: str | None, out: memoryview, offset: int, fh: int) -> int:
        """Read into the caller's buffer (libfuse's reply buffer); returns the length."""
        length = self.files[fh].read_into(fh, offset, out)
        counters = self.counters
        counters.reads += 1
        counters.bytes_read += length
        return length

    @fuse_write
    def write(self, path: str | None, data: bytes | memoryview, offset: int, fh: int) -> int:
        cfile = self.files[fh]
        written = cfile.write(fh, offset, data)
        if cfile.setid:
            cfile.setid = self._kill_setid(fh)
        if self.aliases:
            self.attrs.changed(fh, None)
        counters = self.counters
        counters.writes += 1
        counters.bytes_written += written
        return written

    @fuse_write
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        if fh is not None and fh in self.files:
            self.files[fh].truncate(fh, length)
            self._truncated(fh, path)
            return 0
        if path is None:
            raise OSError(errno.EBADF, "no path and no handle")
        entry = self.names.entry(path)
        fd = entry.parent.open_file(entry.name, os.O_RDWR)
        try:
            cfile = self.files.attach(fd, entry.display)
            cfile.truncate(fd, length)
            self._truncated(fd, path)
        finally:
            self.files.release(fd)
        return 0

    def _truncated(self, fd: int, path: str | None) -> None:
        self._kill_setid(fd)
        self.attrs.changed(fd, path)

    def _kill_setid(self, fd: int) -> bool:
        """After a write or truncation by a caller other than root, clear set-user-ID (and
        set-group-ID on group-executable files), as the kernel does on local filesystems;
        with HANDLE_KILLPRIV it leaves that to us. Returns whether bits may remain (root
        wrote, so nothing was cleared)."""
        uid, _gid = self._caller()
        if uid == 0:
            return True
        mode = os.fstat(fd).st_mode
        kill = mode & stat.S_ISUID
        if mode & stat.S_IXGRP:
            kill |= mode & stat.S_ISGID
        if kill:
            os.fchmod(fd, stat.S_IMODE(mode) & ~kill)
        return bool(stat.S_IMODE(mode) & ~kill & (stat.S_ISUID | stat.S_ISGID))

    @fuse_write
    def fallocate(self, path: str | None, mode: int, offset: int, size: int, fh: int) -> int:
        self.files[fh].allocate(fh, mode, offset, size)
        self.attrs.changed(fh, path)
        return 0

    @fuse_op
    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        self.files[fh].sync(fh, bool(datasync))
        return 0

    # --- structure changes (``tree``) -----------------------------------------------------

    mkdir = _tree_change(Tree.mkdir)
    rmdir = _tree_change(Tree.rmdir)
    unlink = _tree_change(Tree.unlink)
    mknod = _tree_change(Tree.mknod)
    symlink = _tree_change(Tree.symlink)
    link = _tree_change(Tree.link)
    rename = _tree_change(Tree.rename)

    @fuse_op
    def readlink(self, path: str) -> str:
        return self.tree.readlink(path)

    # --- extended attributes (``xattrs``) ------------------------------------------------

    def foreign_xattr(self) -> int:
        """The errno of a getxattr outside ``user.*`` (above all the kernel's
        ``security.capability`` probe before every write without HANDLE_KILLPRIV_V2), for
        the adapter's fast path: what ``getxattr`` answers (``xattrs.UNSUPPORTED``; the
        suspended errno while suspended), without an exception or the gate. Counted."""
        self.counters.security_probes += 1
        return self.options.suspended_errno if self.gate.suspended else xattrs.UNSUPPORTED

    @fuse_op
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        """A ``user.*`` attribute's value; ENODATA if it has none, ``xattrs.UNSUPPORTED``
        outside ``user.*`` (what ``foreign_xattr`` answers on the adapter's fast path)."""
        xattrs.plain_name(name)  # an unsupported name is refused before the path resolves
        return xattrs.get(self.keys, self.names.entry(path), name)

    @fuse_write
    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        xattrs.plain_name(name)
        xattrs.set_(self.keys, self.names.entry(path), name, value, options)
        return 0

    @fuse_op
    def listxattr(self, path: str) -> list[str]:
        return xattrs.listed(self.keys, self.names.entry(path))

    @fuse_write
    def removexattr(self, path: str, name: str) -> int:
        xattrs.plain_name(name)
        xattrs.remove(self.keys, self.names.entry(path), name)
        return 0
