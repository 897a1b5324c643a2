"""Changes to the tree of one mount: entries made, linked, renamed and removed in the backing
dir, each with its long-name companion, directory id and owner, and what the kernel caches
of the paths involved kept in step.

Every method takes plaintext mount paths, raises ``OSError`` (and what ``names`` raises) and
leaves errno mapping and the gate to the operations (``ops.fuse_op``). A long name's
companion is written before its entry and removed again if the entry is not made
(``creating``, the one place that rollback is written).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from encfs import backing, crypto
from encfs import format as fmt
from encfs import names as nm
from encfs.errors import FormatError, IntegrityError
from encfs.fs.handles import OpenFiles
from encfs.fs.kcache import Aliases, SeenPaths
from encfs.keys import VolumeKeys

RENAME_NOREPLACE = backing.RENAME_NOREPLACE
RENAME_EXCHANGE = backing.RENAME_EXCHANGE
_MKNOD_KINDS = (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK)
_DEVICES = (stat.S_IFCHR, stat.S_IFBLK)


@dataclass(eq=False, repr=False)  # no repr: it holds the keys
class Tree:
    """The structure changes of one mount (see the module docstring). Thread-safe as far
    as ``names`` and the backing filesystem are: no lock of its own."""

    names: nm.Names
    keys: VolumeKeys
    files: OpenFiles
    """Whose handles' mount paths follow renames."""
    aliases: Aliases
    seen: SeenPaths
    caller: Callable[[], tuple[int, int]]
    """The (uid, gid) of the process a request comes from; new entries are given to it
    when the daemon runs as root."""
    as_root: bool = field(default_factory=lambda: os.geteuid() == 0)
    moves: int = 0
    """Renames and hard links made so far (a rekey walks again after any: ``encfs.rekey``)."""

    def own(self, entry: nm.Entry, fd: int | None = None) -> None:
        """Give a new entry to the calling user, as a kernel filesystem would (root only).
        ``fd``: the entry's own open fd, if we have one."""
        if not self.as_root:
            return
        uid, gid = self.caller()
        if uid == 0 and gid == 0:
            return
        if entry.parent.fstat().st_mode & stat.S_ISGID:
            gid = -1  # a set-group-ID directory gives its group (the backing fs applied it)
        if fd is not None:
            os.fchown(fd, uid, gid)
        else:
            entry.parent.chown(entry.name, uid, gid)

    @contextlib.contextmanager
    def creating(self, entry: nm.Entry) -> Iterator[None]:
        """Create ``entry`` inside: its long-name companion first, removed again if the
        creation fails (unless the entry exists after all)."""
        self.names.add_companion(entry)
        try:
            yield
        except BaseException:
            self.names.rollback_companion(entry)
            raise

    # --- making entries --------------------------------------------------------------------

    def create_file(self, entry: nm.Entry, bflags: int, mode: int, exclusive: bool) -> int:
        """Create the regular file ``entry`` (or, not ``exclusive``, open the one there)
        with backing flags ``bflags``; returns its fd, owned by the caller if new."""
        with self.creating(entry):
            try:
                fd = entry.parent.create_file(entry.name, bflags, stat.S_IMODE(mode))
            except FileExistsError:
                if exclusive:
                    raise
                # A stale negative entry in the kernel: open what is there (a regular file
                # only; never through a link).
                return entry.parent.open_file(entry.name, bflags)
        try:
            self.own(entry, fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def mkdir(self, path: str, mode: int) -> None:
        entry = self.names.entry(path)
        with self.creating(entry):
            entry.parent.mkdir(entry.name, mode)
            try:
                child = entry.opendir()
                dir_id = nm.write_dirid(child, link=self.names.dirid_links)
                self.own(entry, child.fd)
            except BaseException:
                _remove_new_dir(entry)
                raise
        self.names.made(path, child, dir_id)

    def mknod(self, path: str, mode: int, dev: int) -> None:
        """Regular files, FIFOs, sockets and (the kernel lets only CAP_MKNOD callers ask)
        device nodes. The daemon never opens any of them but regular files; the mount is
        ``nodev``, so a device node is inert there."""
        kind = stat.S_IFMT(mode)
        if kind not in _MKNOD_KINDS:
            raise OSError(errno.EINVAL, "unknown file type")
        entry = self.names.entry(path)
        with self.creating(entry):
            entry.parent.mknod(entry.name, mode, dev if kind in _DEVICES else 0)
            self.own(entry)

    def symlink(self, target: str, source: str) -> None:
        """Create the symlink ``target`` (a path in the mount) pointing at ``source``, its
        target sealed (FORMAT.md §8)."""
        raw = os.fsencode(source)
        if len(raw) > fmt.MAX_SYMLINK_TARGET:
            raise OSError(errno.ENAMETOOLONG, "symlink target too long for encfs")
        entry = self.names.entry(target)
        sealed = crypto.b64encode(self.keys.meta.seal(raw, fmt.SYMLINK_AD))
        with self.creating(entry):
            entry.parent.symlink(sealed, entry.name)
            self.own(entry)

    def readlink(self, path: str) -> str:
        """The plaintext target of symlink ``path``; ``IntegrityError`` naming it if its
        seal does not open."""
        entry = self.names.entry(path)
        sealed = crypto.b64decode(entry.parent.readlink(entry.name))
        try:
            raw = self.keys.meta.open(sealed, fmt.SYMLINK_AD, "symlink target")
        except IntegrityError as exc:
            raise IntegrityError(exc.what, backing_path=entry.display) from None
        return os.fsdecode(raw)

    def link(self, target: str, source: str) -> None:
        """Create the hard link ``target`` to the existing ``source`` (both mount paths)."""
        self.moves += 1
        src = self.names.entry(source)
        entry = self.names.entry(target)
        with self.creating(entry):
            backing.link(src.parent, src.name, entry.parent, entry.name)
        st = src.parent.lstat(src.name)
        if not stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            self.aliases.note(key, source)
            self.aliases.note(key, target)
            self.aliases.changed(key, target)  # the others' link count

    # --- removing and moving entries -------------------------------------------------------

    def unlink(self, path: str) -> None:
        entry = self.names.entry(path)
        entry.parent.unlink(entry.name)
        self.names.remove_companion(entry)
        if self.aliases:
            self.aliases.changed(self.aliases.forget(path))  # the others' link count

    def rmdir(self, path: str) -> None:
        entry = self.names.entry(path)
        self._rmdir_backing(path, entry)
        self.names.remove_companion(entry)

    def _rmdir_backing(self, path: str, entry: nm.Entry) -> None:
        """Remove the empty backing directory of ``path`` and its id (restored, in its
        form, if rmdir fails); what ``names`` caches under it is then resolved again."""
        if not stat.S_ISDIR(entry.parent.lstat(entry.name).st_mode):
            raise OSError(errno.ENOTDIR, "not a directory")
        directory = entry.opendir()
        if any(name != fmt.DIRID_NAME for name in directory.names()):
            raise OSError(errno.ENOTEMPTY, "directory not empty")
        try:
            dir_id: bytes | None
            dir_id, was_link = nm.read_dirid_form(directory)
        except FormatError:
            dir_id = None
        if dir_id is not None:
            directory.unlink(fmt.DIRID_NAME)
        try:
            entry.parent.rmdir(entry.name)
        except OSError:
            if dir_id is not None:
                nm.write_dirid(directory, link=was_link, dir_id=dir_id)
            raise
        cached = self.names.cached_directory(path)
        self.names.removed(path, directory if cached is None else cached)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        """rename(2) with ``RENAME_NOREPLACE`` and ``RENAME_EXCHANGE``; an empty directory
        in the way goes with its id (the kernel would call it non-empty)."""
        self.moves += 1
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
            return
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
            self._rmdir_backing(new, dst)
        with self.creating(dst):
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

    def _renamed_paths(self, old: str, new: str, exchange: bool = False) -> None:
        """Keep the mount paths we hold (open handles, aliases) in step with a rename."""
        self.aliases.renamed(old, new, exchange)
        self.files.renamed(old, new, exchange)


def _remove_new_dir(entry: nm.Entry) -> None:
    """Undo a mkdir that failed after the directory was made (best effort)."""
    with contextlib.suppress(OSError):
        entry.opendir().unlink(fmt.DIRID_NAME)
    with contextlib.suppress(OSError):
        entry.parent.rmdir(entry.name)
