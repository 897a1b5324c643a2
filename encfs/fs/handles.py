"""The open files of a mount: each handle (``fh``, the backing fd) on its inode's one shared
``CipherFile``, the mount path it was opened under, and directory handles with their
listings.

Locks: ``_lock`` guards the tables; it is held while an inode's last handle closes its
file (removing its undo file: a new open of the inode waits for that), never while a file
drains its deferred writes or an fd is closed.
"""

from __future__ import annotations

import errno
import os
import stat
import threading

from encfs import format as fmt
from encfs.cipherfile import CipherFile, Sealer
from encfs.fastpath import NativeIO
from encfs.fs.kcache import moved
from encfs.keys import VolumeKeys
from encfs.undo import UndoLog

Listing = list[tuple[str, tuple[os.stat_result, int] | None, int]]
"""A directory listing: (name, (backing stat, plaintext size) or None, offset)."""


class OpenFiles:
    """The handle tables of one mount (see the module docstring). Thread-safe."""

    def __init__(
        self,
        keys: VolumeKeys,
        geo: fmt.Geometry,
        sealer: Sealer,
        undo: UndoLog,
        native: NativeIO | None = None,
    ) -> None:
        self._keys = keys
        self._geo = geo
        self._sealer = sealer
        self._undo = undo
        self._native = native
        self._lock = threading.Lock()
        self._inodes: dict[tuple[int, int], CipherFile] = {}
        self._handles: dict[int, CipherFile] = {}
        self._paths: dict[int, str] = {}
        self._dirs: dict[int, str] = {}
        self._listings: dict[int, Listing] = {}
        self._next_dir_fh = 0

    # --- files -----------------------------------------------------------------------------

    def attach(self, fd: int, display: str, path: str | None = None) -> CipherFile:
        """Register ``fd`` as a handle on its inode's shared ``CipherFile`` (``display``
        names the file in errors), opened under mount path ``path`` if given."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        with self._lock:
            cfile = self._inodes.get(key)
            if cfile is None:
                cfile = CipherFile(
                    self._keys, self._geo, display, self._sealer, self._undo, self._native
                )
                cfile.inode_key = key
                self._inodes[key] = cfile
            if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                cfile.setid = True
            cfile.refs += 1
            self._handles[fd] = cfile
            cfile.attach_fd(fd)
            if path is not None:
                self._paths[fd] = path
        return cfile

    def release(self, fd: int) -> None:
        """Let go of handle ``fd`` once its deferred writes are on the backing file, and
        close it (no read of it is in flight: the kernel releases a handle last)."""
        try:
            cfile = self._handles.get(fd)
            if cfile is not None:
                cfile.drain()  # deferred writes use this fd
        finally:
            with self._lock:
                self._paths.pop(fd, None)
                cfile = self._handles.pop(fd, None)
                if cfile is not None:
                    cfile.forget_fd(fd)
                    cfile.refs -= 1
                    if cfile.refs <= 0 and cfile.inode_key is not None:
                        self._inodes.pop(cfile.inode_key, None)
                        cfile.close()
            os.close(fd)

    def __getitem__(self, fh: int) -> CipherFile:
        """The file of handle ``fh``; ``OSError(EBADF)`` if it is none of ours."""
        cfile = self._handles.get(fh)
        if cfile is None:
            raise OSError(errno.EBADF, "unknown file handle")
        return cfile

    def __contains__(self, fh: object) -> bool:
        return fh in self._handles

    def get(self, fh: int) -> CipherFile | None:
        return self._handles.get(fh)

    def of_inode(self, key: tuple[int, int]) -> CipherFile | None:
        """The open file of backing inode ``key`` (st_dev, st_ino), if any."""
        return self._inodes.get(key)

    def path(self, fh: int) -> str | None:
        """The mount path handle ``fh`` was opened under (kept in step with renames)."""
        return self._paths.get(fh)

    def renamed(self, old: str, new: str, exchange: bool = False) -> None:
        with self._lock:
            for fh, path in self._paths.items():
                self._paths[fh] = moved(path, old, new, exchange)

    # --- directories -----------------------------------------------------------------------

    def open_dir(self, path: str) -> int:
        """A new directory handle; it carries the plaintext ``path`` (with nullpath_ok,
        readdir gets none)."""
        with self._lock:
            self._next_dir_fh += 1
            fh = self._next_dir_fh
            self._dirs[fh] = path
        return fh

    def dir_path(self, fh: int) -> str | None:
        return self._dirs.get(fh)

    def listing(self, fh: int) -> Listing | None:
        """The listing kept for directory handle ``fh``, if any."""
        return self._listings.get(fh)

    def keep_listing(self, fh: int, entries: Listing) -> None:
        """Keep ``entries`` for the next reads of directory handle ``fh`` (if it is open)."""
        if fh in self._dirs:
            self._listings[fh] = entries

    def release_dir(self, fh: int) -> None:
        with self._lock:
            self._dirs.pop(fh, None)
            self._listings.pop(fh, None)

    def forget_plaintext(self) -> None:
        """Drop every kept listing and what each open file keeps of its plaintext (the
        partial blocks kept for appends): the keys are going."""
        with self._lock:
            self._listings.clear()
            for cfile in self._inodes.values():
                cfile.forget_plaintext()
