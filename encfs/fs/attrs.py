"""Attribute changes of one mount: chmod, chown and utimens on a path or a handle, the
mount root's own mode and owner (FORMAT.md §6.2), and the other names of a hard-linked
file told of a change (``Aliases``).

Methods raise ``OSError`` and leave errno mapping and the gate to the operations
(``ops.fuse_op``). No lock of its own: the root's attributes are replaced whole.
"""

from __future__ import annotations

import errno
import os
import stat
import time

from encfs import names
from encfs.fs.handles import OpenFiles
from encfs.fs.kcache import Aliases

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

Target = int | names.Entry
"""What a change applies to: an open handle's fd, or a backing entry (never followed)."""


class Attributes:
    """The attribute changes of one mount (see the module docstring)."""

    def __init__(self, names_: names.Names, files: OpenFiles, aliases: Aliases) -> None:
        self._names = names_
        self._files = files
        self._aliases = aliases
        self.root_attrs = names.read_root_attrs(names_.root)
        """The plaintext root's mode and owner (None: the cipher dir's own are shown)."""

    def target(self, path: str | None, fh: int | None) -> Target:
        """What a change applies to: the handle's fd when libfuse gives one (it then gives
        no path), else the backing entry of ``path``."""
        if fh is not None and fh in self._files:
            return fh
        if path is None:
            raise OSError(errno.EBADF, "operation needs a path or a file handle")
        return self._names.entry(path)

    @staticmethod
    def lstat(target: Target) -> os.stat_result:
        if isinstance(target, int):
            return os.fstat(target)
        return target.parent.lstat(target.name)

    def changed(self, target: Target, path: str | None) -> None:
        """Tell the other names of a multiply-linked file that ``target`` changed."""
        if not self._aliases:
            return
        if isinstance(target, int):
            cfile = self._files.get(target)
            key = cfile.inode_key if cfile is not None else None
            self._aliases.changed(key, self._files.path(target))
        else:
            st = self.lstat(target)
            if st.st_nlink > 1:
                self._aliases.changed((st.st_dev, st.st_ino), path)

    def chmod(self, path: str | None, mode: int, fh: int | None) -> None:
        if path == "/" and fh is None:
            self._set_root(mode=mode)
            return
        target = self.target(path, fh)
        if isinstance(target, int):
            os.fchmod(target, stat.S_IMODE(mode))
        else:
            target.parent.chmod(target.name, stat.S_IMODE(mode))
        if mode & (stat.S_ISUID | stat.S_ISGID):
            if isinstance(target, int):
                cfile = self._files.get(target)
            else:
                st = self.lstat(target)
                cfile = self._files.of_inode((st.st_dev, st.st_ino))
            if cfile is not None:
                cfile.setid = True
        self.changed(target, path)

    def chown(self, path: str | None, uid: int, gid: int, fh: int | None) -> None:
        """chown(2); -1 leaves the uid or gid as it is."""
        if path == "/" and fh is None:
            self._set_root(uid=uid, gid=gid)
            return
        target = self.target(path, fh)
        if isinstance(target, int):
            os.fchown(target, uid, gid)
        else:
            target.parent.chown(target.name, uid, gid)
        self.changed(target, path)

    def utimens(
        self,
        path: str | None,
        times: tuple[tuple[int, int], tuple[int, int]] | None,
        fh: int | None,
    ) -> None:
        """Set (atime, mtime) from raw (sec, nsec) pairs, ``UTIME_NOW`` and ``UTIME_OMIT``
        honoured; None: both now."""
        target = self.target(path, fh)
        ns: tuple[int, int] | None = None
        if times is not None:
            now = time.time_ns()
            st: os.stat_result | None = None
            result = []
            for index, (sec, nsec) in enumerate(times):
                if nsec == UTIME_NOW:
                    result.append(now)
                elif nsec == UTIME_OMIT:
                    st = st or self.lstat(target)
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
        self.changed(target, path)

    def _set_root(self, mode: int = -1, uid: int = -1, gid: int = -1) -> None:
        """chmod/chown of the mount's root: recorded on the cipher dir (FORMAT.md §6.2),
        which itself stays as it is (root's 0700)."""
        root = self._names.root
        if self.root_attrs is not None:
            old_mode, old_uid, old_gid = self.root_attrs
        else:
            st = root.fstat()
            old_mode, old_uid, old_gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
        new = (
            stat.S_IMODE(mode) if mode != -1 else old_mode,
            uid if uid != -1 else old_uid,
            gid if gid != -1 else old_gid,
        )
        names.write_root_attrs(root, *new)
        self.root_attrs = new
