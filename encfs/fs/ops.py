"""The FUSE operations of an encfs mount; the one place exceptions become errno values.

Every operation is thin: resolve the plaintext path (``names``), take the file's lock and
delegate (``cipherfile``), translate the result. ``@fuse_op`` maps every exception to an
errno (tampering -> EIO with one log line naming file and block; a wiped key -> the
suspended errno), so nothing falls through to the binding, which would answer EINVAL.
Handles (``fh``) are the backing file descriptors (``fd``) of opened files.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ParamSpec, Protocol, TypeVar

from encfs import backing, crypto, names
from encfs import format as fmt
from encfs.cipherfile import CipherFile, Sealer
from encfs.errors import FormatError, IntegrityError, VolumeSuspended
from encfs.fs.kcache import Aliases, Gate, SeenPaths, moved
from encfs.keys import VolumeKeys

log = logging.getLogger(__name__)

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
RENAME_NOREPLACE = backing.RENAME_NOREPLACE
RENAME_EXCHANGE = backing.RENAME_EXCHANGE
XATTR_UNSUPPORTED = errno.EOPNOTSUPP
"""The answer for an extended attribute outside ``user.*`` (get, set, remove), as Linux
filesystems answer for a namespace they do not support; a missing ``user.*`` attribute is
ENODATA (the backing filesystem's answer)."""


Listing = list[tuple[str, tuple[os.stat_result, int] | None, int]]
"""A directory listing: (name, (backing stat, plaintext size) or None, offset)."""


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


def fuse_op(method: Callable[P, R]) -> Callable[P, R]:
    """Map every exception of a FUSE operation to an ``OSError`` with an errno, and pass
    the operation through the suspension gate (``EncfsOperations.gate``): while the volume
    is suspended every operation but closing a handle fails with ``suspended_errno``."""
    gated = method.__name__ not in _UNGATED

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        gate: Gate = args[0].gate  # type: ignore[attr-defined]
        if gated and not gate.enter():
            raise OSError(args[0].options.suspended_errno, "volume suspended")  # type: ignore[attr-defined]
        try:
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


class EncfsOperations:
    """FUSE operations over one unlocked volume. Thread-safe (libfuse's multi-threaded loop).

    Locks: ``_table_lock`` guards the open-inode table; each ``CipherFile`` has its own
    reader/writer lock for content. Directory structure changes invalidate the name cache.
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
    ) -> None:
        root = backing.open_root(cipher_dir)
        self.keys = keys
        self.geo = fmt.Geometry(block_size)
        self.options = options
        self.names = names.Names(root, keys, dirid_links=dirid_links)
        self._root_attrs = names.read_root_attrs(root)
        """The plaintext root's mode and owner (None: the cipher dir's own are shown)."""
        self.counters = Counters()
        self._on_init = on_init
        self._table_lock = threading.Lock()
        self._inodes: dict[tuple[int, int], CipherFile] = {}
        self._handles: dict[int, CipherFile] = {}
        self._dir_handles: dict[int, str] = {}
        self._dir_listings: dict[int, Listing] = {}
        self._next_dir_fh = 0
        self._as_root = os.geteuid() == 0
        self.session: Session | None = None
        self.aliases = Aliases()
        self._fh_paths: dict[int, str] = {}
        self.gate = Gate()
        self.seen = SeenPaths()
        self.sealer = Sealer()

    # --- life cycle ------------------------------------------------------------------------

    def started(self, session: Session) -> None:
        """The mount is up (libfuse's init, before any request): serve through ``session``
        from now on, and announce readiness (``on_init``)."""
        self.session = session
        self.aliases.start(session.invalidate)
        if self._on_init is not None:
            self._on_init()

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
        return not self.gate.open

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
        with self._table_lock:
            self._dir_listings.clear()
            for cfile in self._inodes.values():
                cfile.forget_plaintext()
        return self.seen.invalidate_all(None if self.session is None else self.session.invalidate)

    def resume(self, volume_key: bytearray, header_body: bytes, header_tag: bytes) -> None:
        """Serve again with the volume key (copied; the caller wipes its own). The header
        tag must verify under it (``HeaderAuthError`` otherwise, and the keys stay wiped).
        Handles opened before the suspension work again."""
        self.keys.load(volume_key)
        try:
            self.keys.verify_header(header_body, header_tag)
        except BaseException:
            self.keys.wipe()
            raise
        self.gate.reopen()

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

    def _check_writable(self) -> None:
        if self.options.read_only:
            raise OSError(errno.EROFS, "read-only mount")

    def _own(self, entry: names.Entry, fd: int | None = None) -> None:
        """Give a new entry to the calling user, as a kernel filesystem would (root only).
        ``fd``: the entry's own open fd, if we have one."""
        if not self._as_root:
            return
        uid, gid = self._caller()
        if uid == 0 and gid == 0:
            return
        if entry.parent.fstat().st_mode & stat.S_ISGID:
            gid = -1  # a set-group-ID directory gives its group (the backing fs applied it)
        if fd is not None:
            os.fchown(fd, uid, gid)
        else:
            entry.parent.chown(entry.name, uid, gid)

    def _attach(self, fd: int, display: str) -> CipherFile:
        """Register ``fd`` as a handle on its inode's shared ``CipherFile``."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        with self._table_lock:
            cfile = self._inodes.get(key)
            if cfile is None:
                cfile = CipherFile(self.keys, self.geo, display, self.sealer)
                cfile.inode_key = key
                self._inodes[key] = cfile
            if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                cfile.setid = True
            cfile.refs += 1
            self._handles[fd] = cfile
        return cfile

    def _detach(self, fd: int) -> None:
        with self._table_lock:
            cfile = self._handles.pop(fd, None)
            if cfile is not None:
                cfile.refs -= 1
                if cfile.refs <= 0 and cfile.inode_key is not None:
                    self._inodes.pop(cfile.inode_key, None)

    def _cfile(self, fh: int) -> CipherFile:
        cfile = self._handles.get(fh)
        if cfile is None:
            raise OSError(errno.EBADF, "unknown file handle")
        return cfile

    @staticmethod
    def _backing_flags(flags: int) -> int:
        """Flags for our own fd of a backing file: always readable (partial-block writes
        read first), never O_APPEND (the kernel resolves appends with writeback cache),
        never O_TRUNC (truncation runs under the file lock)."""
        acc = flags & os.O_ACCMODE
        return (flags & (os.O_SYNC | os.O_DSYNC)) | (
            os.O_RDONLY if acc == os.O_RDONLY else os.O_RDWR
        )

    @contextlib.contextmanager
    def _creating(self, entry: names.Entry) -> Iterator[None]:
        """Create ``entry`` inside: its long-name companion first, removed again if the
        creation fails (unless the entry exists after all)."""
        self.names.add_companion(entry)
        try:
            yield
        except BaseException:
            self.names.rollback_companion(entry)
            raise

    # --- attributes ------------------------------------------------------------------------

    @fuse_op
    def stat(self, path: str | None, fh: int | None = None) -> tuple[os.stat_result, int]:
        """The backing stat and the plaintext size (EncfsFUSE.getattr_fuse_3's fast path)."""
        if fh is not None:
            self.keys.names  # noqa: B018 - raises VolumeSuspended when keys are wiped
            cfile = self._handles.get(fh)
            if cfile is not None and cfile.pending:
                cfile.drain()  # the size must include deferred writes
            st = os.fstat(fh)
        elif path is None:
            raise OSError(errno.EBADF, "no path and no handle")
        else:
            entry = self.names.entry(path)
            st = entry.parent.lstat(entry.name)
            cfile = self._inodes.get((st.st_dev, st.st_ino))
            if cfile is not None and cfile.pending:
                cfile.drain()
                st = entry.parent.lstat(entry.name)
            self.seen.note(path)
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                self.aliases.note((st.st_dev, st.st_ino), path)
            elif path == "/" and self._root_attrs is not None:
                st = names.with_root_attrs(st, self._root_attrs)
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

    def _target(self, path: str | None, fh: int | None) -> int | names.Entry:
        """What a metadata change applies to: the handle's fd when libfuse gives one (it then
        gives no path), else the backing entry (never followed)."""
        if fh is not None and fh in self._handles:
            return fh
        if path is None:
            raise OSError(errno.EBADF, "operation needs a path or a file handle")
        return self.names.entry(path)

    @staticmethod
    def _lstat(target: int | names.Entry) -> os.stat_result:
        if isinstance(target, int):
            return os.fstat(target)
        return target.parent.lstat(target.name)

    def _changed(self, target: int | names.Entry, path: str | None) -> None:
        """Tell the other names of a multiply-linked file that ``target`` changed."""
        if not self.aliases:
            return
        if isinstance(target, int):
            cfile = self._handles.get(target)
            key = cfile.inode_key if cfile is not None else None
            self.aliases.changed(key, self._fh_paths.get(target))
        else:
            st = self._lstat(target)
            if st.st_nlink > 1:
                self.aliases.changed((st.st_dev, st.st_ino), path)

    def _set_root_attrs(self, mode: int = -1, uid: int = -1, gid: int = -1) -> None:
        """chmod/chown of the mount's root: recorded on the cipher dir (FORMAT.md §6.2),
        which itself stays as it is (root's 0700)."""
        root = self.names.root
        if self._root_attrs is not None:
            old_mode, old_uid, old_gid = self._root_attrs
        else:
            st = root.fstat()
            old_mode, old_uid, old_gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
        new = (
            stat.S_IMODE(mode) if mode != -1 else old_mode,
            uid if uid != -1 else old_uid,
            gid if gid != -1 else old_gid,
        )
        names.write_root_attrs(root, *new)
        self._root_attrs = new

    @fuse_op
    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> int:
        self._check_writable()
        if path == "/" and fh is None:
            self._set_root_attrs(mode=mode)
            return 0
        target = self._target(path, fh)
        if isinstance(target, int):
            os.fchmod(target, stat.S_IMODE(mode))
        else:
            target.parent.chmod(target.name, stat.S_IMODE(mode))
        if mode & (stat.S_ISUID | stat.S_ISGID):
            if isinstance(target, int):
                cfile = self._handles.get(target)
            else:
                st = self._lstat(target)
                cfile = self._inodes.get((st.st_dev, st.st_ino))
            if cfile is not None:
                cfile.setid = True
        self._changed(target, path)
        return 0

    @fuse_op
    def chown(self, path: str | None, uid: int, gid: int, fh: int | None = None) -> int:
        self._check_writable()
        if path == "/" and fh is None:
            self._set_root_attrs(uid=uid, gid=gid)
            return 0
        target = self._target(path, fh)
        if isinstance(target, int):
            os.fchown(target, uid, gid)
        else:
            target.parent.chown(target.name, uid, gid)
        self._changed(target, path)
        return 0

    @fuse_op
    def utimens(
        self,
        path: str | None,
        times: tuple[tuple[int, int], tuple[int, int]] | None = None,
        fh: int | None = None,
    ) -> int:
        self._check_writable()
        target = self._target(path, fh)
        ns: tuple[int, int] | None = None
        if times is not None:
            now = time.time_ns()
            st: os.stat_result | None = None
            result = []
            for index, (sec, nsec) in enumerate(times):
                if nsec == UTIME_NOW:
                    result.append(now)
                elif nsec == UTIME_OMIT:
                    st = st or self._lstat(target)
                    result.append(st.st_atime_ns if index == 0 else st.st_mtime_ns)
                else:
                    result.append(sec * 10**9 + nsec)
            ns = (result[0], result[1])
        if isinstance(target, int):
            if ns is None:
                os.utime(target)
            else:
                os.utime(target, ns=ns)
        else:
            target.parent.utime(target.name, ns)
        self._changed(target, path)
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
        """Directory handles carry the plaintext path: with nullpath_ok, readdir gets none."""
        self.names.directory(path)
        with self._table_lock:
            self._next_dir_fh += 1
            fh = self._next_dir_fh
            self._dir_handles[fh] = path
        return fh

    def destroy(self, path: str | None) -> None:
        """The session ends (unmount or signal): finish the deferred writes."""
        self.sealer.drain()

    @fuse_op
    def releasedir(self, path: str | None, fh: int) -> int:
        with self._table_lock:
            self._dir_handles.pop(fh, None)
            self._dir_listings.pop(fh, None)
        return 0

    @fuse_op
    def readdir(self, path: str | None, fh: int, offset: int = 0) -> Listing:
        """The whole listing with each entry's backing stat and plaintext size (None for
        ``..``). Read once per handle, at ``offset`` 0; later
        offsets (the kernel's next buffer) reuse it, so ``ls`` stays linear in large dirs."""
        if offset:
            cached = self._dir_listings.get(fh)
            if cached is not None:
                return cached
        if self.sealer.busy:
            self.sealer.drain()  # the listing's sizes must include deferred writes
        path = self._dir_handles.get(fh, path)
        if path is None:
            raise OSError(errno.EBADF, "unknown directory handle")
        directory, _dir_id = self.names.directory(path)
        dot = directory.fstat()
        if path == "/" and self._root_attrs is not None:
            dot = names.with_root_attrs(dot, self._root_attrs)
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
        if fh in self._dir_handles:
            self._dir_listings[fh] = entries
        return entries

    @fuse_op
    def mkdir(self, path: str, mode: int) -> int:
        self._check_writable()
        entry = self.names.entry(path)
        with self._creating(entry):
            entry.parent.mkdir(entry.name, mode)
            try:
                child = entry.opendir()
                dir_id = names.write_dirid(child, link=self.names.dirid_links)
                self._own(entry, child.fd)
            except BaseException:
                self._remove_new_dir(entry)
                raise
        self.names.made(path, child, dir_id)
        return 0

    def _remove_new_dir(self, entry: names.Entry) -> None:
        """Undo a mkdir that failed after the directory was made (best effort)."""
        with contextlib.suppress(OSError):
            entry.opendir().unlink(fmt.DIRID_NAME)
        with contextlib.suppress(OSError):
            entry.parent.rmdir(entry.name)

    @fuse_op
    def rmdir(self, path: str) -> int:
        self._check_writable()
        entry = self.names.entry(path)
        self._rmdir_backing(path, entry)
        self.names.remove_companion(entry)
        return 0

    def _rmdir_backing(self, path: str, entry: names.Entry) -> None:
        """Remove the empty backing directory of ``path`` and its id (restored, in its
        form, if rmdir fails); what ``names`` caches under it is then resolved again."""
        if not stat.S_ISDIR(entry.parent.lstat(entry.name).st_mode):
            raise OSError(errno.ENOTDIR, "not a directory")
        directory = entry.opendir()
        if any(name != fmt.DIRID_NAME for name in directory.names()):
            raise OSError(errno.ENOTEMPTY, "directory not empty")
        try:
            dir_id: bytes | None
            dir_id, was_link = names.read_dirid_form(directory)
        except FormatError:
            dir_id = None
        if dir_id is not None:
            directory.unlink(fmt.DIRID_NAME)
        try:
            entry.parent.rmdir(entry.name)
        except OSError:
            if dir_id is not None:
                names.write_dirid(directory, link=was_link, dir_id=dir_id)
            raise
        cached = self.names.cached_directory(path)
        self.names.removed(path, directory if cached is None else cached)

    # --- entries ---------------------------------------------------------------------------

    @fuse_op
    def create(self, path: str, mode: int, flags: int = os.O_RDWR) -> int:
        self._check_writable()
        entry = self.names.entry(path)
        bflags = self._backing_flags(flags)
        with self._creating(entry):
            try:
                fd = entry.parent.create_file(entry.name, bflags, stat.S_IMODE(mode))
                created = True
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
                # A stale negative entry in the kernel: open what is there (a regular file
                # only; never through a link).
                fd = entry.parent.open_file(entry.name, bflags)
                created = False
        try:
            if created:
                self._own(entry, fd)
            cfile = self._attach(fd, entry.display)
            self._fh_paths[fd] = path
            if flags & os.O_TRUNC:
                cfile.truncate(fd, 0)
                self._truncated(fd, path)
        except BaseException:
            self._release_fd(fd)
            raise
        return fd

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
        try:
            cfile = self._attach(fd, entry.display)
            self._fh_paths[fd] = path
            if flags & os.O_TRUNC:
                cfile.truncate(fd, 0)
                self._truncated(fd, path)
        except BaseException:
            self._release_fd(fd)
            raise
        return fd

    def _release_fd(self, fd: int) -> None:
        try:
            cfile = self._handles.get(fd)
            if cfile is not None:
                cfile.drain()  # deferred writes use this fd
            self._fh_paths.pop(fd, None)
            self._detach(fd)
        finally:
            os.close(fd)

    @fuse_op
    def release(self, path: str | None, fh: int) -> int:
        self._release_fd(fh)
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
        length = self._cfile(fh).read_into(fh, offset, out)
        counters = self.counters
        counters.reads += 1
        counters.bytes_read += length
        return length

    @fuse_op
    def write(self, path: str | None, data: bytes | memoryview, offset: int, fh: int) -> int:
        self._check_writable()
        cfile = self._cfile(fh)
        written = cfile.write(fh, offset, data)
        if cfile.setid:
            cfile.setid = self._kill_setid(fh)
        if self.aliases:
            self._changed(fh, None)
        counters = self.counters
        counters.writes += 1
        counters.bytes_written += written
        return written

    @fuse_op
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        self._check_writable()
        if fh is not None and fh in self._handles:
            self._cfile(fh).truncate(fh, length)
            self._truncated(fh, path)
            return 0
        if path is None:
            raise OSError(errno.EBADF, "no path and no handle")
        entry = self.names.entry(path)
        fd = entry.parent.open_file(entry.name, os.O_RDWR)
        try:
            cfile = self._attach(fd, entry.display)
            cfile.truncate(fd, length)
            self._truncated(fd, path)
        finally:
            self._release_fd(fd)
        return 0

    def _truncated(self, fd: int, path: str | None) -> None:
        self._kill_setid(fd)
        self._changed(fd, path)

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

    @fuse_op
    def fallocate(self, path: str | None, mode: int, offset: int, size: int, fh: int) -> int:
        self._check_writable()
        self._cfile(fh).allocate(fh, mode, offset, size)
        self._changed(fh, path)
        return 0

    @fuse_op
    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        cfile = self._cfile(fh)
        cfile.drain()
        cfile.raise_deferred()
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)
        return 0

    @fuse_op
    def unlink(self, path: str) -> int:
        self._check_writable()
        entry = self.names.entry(path)
        entry.parent.unlink(entry.name)
        self.names.remove_companion(entry)
        if self.aliases:
            self.aliases.changed(self.aliases.forget(path))  # the others' link count
        return 0

    @fuse_op
    def mknod(self, path: str, mode: int, dev: int) -> int:
        """Regular files, FIFOs, sockets and (the kernel lets only CAP_MKNOD callers ask)
        device nodes. The daemon never opens any of them but regular files; the mount is
        ``nodev``, so a device node is inert there."""
        self._check_writable()
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK):
            raise OSError(errno.EINVAL, "unknown file type")
        entry = self.names.entry(path)
        with self._creating(entry):
            entry.parent.mknod(entry.name, mode, dev if kind in _DEVICES else 0)
            self._own(entry)
        return 0

    @fuse_op
    def symlink(self, target: str, source: str) -> int:
        """Create the symlink ``target`` (a path in the mount) pointing at ``source``."""
        self._check_writable()
        raw = os.fsencode(source)
        if len(raw) > fmt.MAX_SYMLINK_TARGET:
            raise OSError(errno.ENAMETOOLONG, "symlink target too long for encfs")
        entry = self.names.entry(target)
        sealed = crypto.b64encode(self.keys.meta.seal(raw, fmt.SYMLINK_AD))
        with self._creating(entry):
            entry.parent.symlink(sealed, entry.name)
            self._own(entry)
        return 0

    @fuse_op
    def readlink(self, path: str) -> str:
        entry = self.names.entry(path)
        sealed = crypto.b64decode(entry.parent.readlink(entry.name))
        try:
            raw = self.keys.meta.open(sealed, fmt.SYMLINK_AD, "symlink target")
        except IntegrityError as exc:
            raise IntegrityError(exc.what, backing_path=entry.display) from None
        return os.fsdecode(raw)

    @fuse_op
    def link(self, target: str, source: str) -> int:
        """Create the hard link ``target`` to the existing ``source`` (both mount paths)."""
        self._check_writable()
        src = self.names.entry(source)
        entry = self.names.entry(target)
        with self._creating(entry):
            backing.link(src.parent, src.name, entry.parent, entry.name)
        st = src.parent.lstat(src.name)
        if not stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            self.aliases.note(key, source)
            self.aliases.note(key, target)
            self.aliases.changed(key, target)  # the others' link count
        return 0

    @fuse_op
    def rename(self, old: str, new: str, flags: int = 0) -> int:
        self._check_writable()
        src = self.names.entry(old)
        dst = self.names.entry(new)
        src_st = src.parent.lstat(src.name)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, "unsupported rename flags")
        if flags & RENAME_EXCHANGE:
            backing.rename(src.parent, src.name, dst.parent, dst.name, RENAME_EXCHANGE)
            self._renamed_paths(old, new, exchange=True)
            self.seen.renamed(old, new, exchange=True, is_dir=True)
            if src.is_long or dst.is_long:
                # Each companion holds the encoding of its own name; both names still exist.
                self.names.add_companion(src)
                self.names.add_companion(dst)
            self.names.invalidate()
            return 0
        try:
            dst_st: os.stat_result | None = dst.parent.lstat(dst.name)
        except FileNotFoundError:
            dst_st = None
        if dst_st is not None and flags & RENAME_NOREPLACE:
            raise OSError(errno.EEXIST, "destination exists")
        if (
            dst_st is not None
            and stat.S_ISDIR(dst_st.st_mode)
            and stat.S_ISDIR(src_st.st_mode)
            and (dst_st.st_dev, dst_st.st_ino) != (src_st.st_dev, src_st.st_ino)
        ):
            # The backing directory holds its id, so the kernel would call it non-empty.
            self._rmdir_backing(new, dst)
        with self._creating(dst):
            backing.rename(src.parent, src.name, dst.parent, dst.name, flags & RENAME_NOREPLACE)
        if dst_st is not None and dst_st.st_nlink > 1 and self.aliases:
            self.aliases.forget(new)
            self.aliases.changed((dst_st.st_dev, dst_st.st_ino))  # the others' link count
        self._renamed_paths(old, new)
        self.seen.renamed(old, new, exchange=False, is_dir=stat.S_ISDIR(src_st.st_mode))
        if (src.parent.fd, src.name) != (dst.parent.fd, dst.name):
            self.names.remove_companion(src)
        if stat.S_ISDIR(src_st.st_mode):
            self.names.invalidate()
        return 0

    def _renamed_paths(self, old: str, new: str, exchange: bool = False) -> None:
        """Keep the mount paths we hold (open handles, aliases) in step with a rename."""
        self.aliases.renamed(old, new, exchange)
        for fh, path in list(self._fh_paths.items()):
            self._fh_paths[fh] = moved(path, old, new, exchange)

    # --- extended attributes ---------------------------------------------------------------

    def _xattr_backing_name(self, name: str) -> str:
        if not name.startswith(fmt.XATTR_PREFIX):
            raise OSError(XATTR_UNSUPPORTED, "only user.* extended attributes are supported")
        plain = os.fsencode(name[len(fmt.XATTR_PREFIX) :])
        if len(plain) > fmt.MAX_PLAIN_XATTR_NAME:
            raise OSError(errno.ERANGE, "extended attribute name too long for encfs")
        return fmt.XATTR_BACKING_PREFIX + self.keys.names.encrypt(plain, fmt.XATTR_NAME_AD)

    def foreign_xattr(self) -> int:
        """The errno of a getxattr outside ``user.*`` (above all the kernel's
        ``security.capability`` probe before every write without HANDLE_KILLPRIV_V2), for
        the adapter's fast path: what ``getxattr`` answers (``XATTR_UNSUPPORTED``; the
        suspended errno while suspended), without an exception or the gate. Counted."""
        self.counters.security_probes += 1
        return XATTR_UNSUPPORTED if self.gate.open else self.options.suspended_errno

    @fuse_op
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        """A ``user.*`` attribute's value; ENODATA if it has none, ``XATTR_UNSUPPORTED``
        outside ``user.*`` (what ``foreign_xattr`` answers on the adapter's fast path)."""
        bname = self._xattr_backing_name(name)
        entry = self.names.entry(path)
        sealed = entry.parent.getxattr(entry.name, bname)
        try:
            return self.keys.meta.open(sealed, bname.encode(), "xattr value")
        except IntegrityError as exc:
            raise IntegrityError(exc.what, backing_path=entry.display) from None

    @fuse_op
    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        self._check_writable()
        entry = self.names.entry(path)
        bname = self._xattr_backing_name(name)
        sealed = self.keys.meta.seal(value, bname.encode())
        entry.parent.setxattr(entry.name, bname, sealed, options)
        return 0

    @fuse_op
    def listxattr(self, path: str) -> list[str]:
        entry = self.names.entry(path)
        result = []
        for bname in entry.parent.listxattr(entry.name):
            if not bname.startswith(fmt.XATTR_BACKING_PREFIX):
                continue
            try:
                plain = self.keys.names.decrypt(
                    bname[len(fmt.XATTR_BACKING_PREFIX) :], fmt.XATTR_NAME_AD
                )
            except IntegrityError:
                log.error("xattr name authentication failed on %s; attribute hidden", entry.display)
                continue
            result.append(fmt.XATTR_PREFIX + os.fsdecode(plain))
        return result

    @fuse_op
    def removexattr(self, path: str, name: str) -> int:
        self._check_writable()
        entry = self.names.entry(path)
        entry.parent.removexattr(entry.name, self._xattr_backing_name(name))
        return 0


_DEVICES = (stat.S_IFCHR, stat.S_IFBLK)
