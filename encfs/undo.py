"""Undo records for in-place block rewrites, so a crash mid-write never costs synced data.

A write that changes part of an existing block (an append into a partial last block, an
overwrite of part of a block, a truncation inside a block) re-seals and rewrites the whole
block in place. A process killed in the middle of that ``pwrite`` can leave the block torn
(part new, part old), and a torn block fails authentication: without a copy of its old
content, bytes written and fsynced long before would be lost with it. So before such a
rewrite, ``UndoFile.save`` writes the old content of every block it touches, sealed for its
own position exactly as in the file, to ``encfs.undo/<file id>`` in the cipher dir root
(FORMAT §10b). ``fsck --repair`` puts a record back where its block is torn; the mount
never does (a torn block and a tampered one look alike to it).

One undo file per open file, with one slot: each save replaces the previous record, since
only the write in flight can tear (the file's write lock serialises them). After an fsync
the slot is cleared (a stale record must not roll a later torn block back past synced
data); at the last close the file is removed.

Covers a killed process (kill -9, the OOM killer, a crash of the daemon): the record is in
the page cache before the rewrite starts. It does not order the two on the disk, so it does
not cover a power cut that tears a block (see SECURITY.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Collection

from encfs import backing
from encfs import format as fmt

log = logging.getLogger(__name__)


class UndoLog:
    """The volume's ``encfs.undo`` directory, made on first use. Thread-safe."""

    def __init__(self, root: backing.Dir) -> None:
        self._root = root
        self._lock = threading.Lock()
        self._dir: backing.Dir | None = None
        self._refused: set[bytes] = set()  # file ids whose leftover undo file we keep
        self._broken = False  # the directory cannot be used: rewrites go without records
        leftovers = self.leftovers()
        if leftovers:
            log.warning(
                "%d undo record(s) left by a crash in %s: blocks torn by it read as errors "
                "until `encfs fsck --repair` restores them",
                len(leftovers),
                root.path(fmt.UNDO_DIR_NAME),
            )

    def leftovers(self) -> list[str]:
        """Names of the undo files present (after a clean unmount: none)."""
        try:
            return self._root.opendir(fmt.UNDO_DIR_NAME).names()
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.error("cannot read %s: %s", self._root.path(fmt.UNDO_DIR_NAME), exc)
            return []

    def _directory(self) -> backing.Dir | None:
        with self._lock:
            if self._dir is None and not self._broken:
                try:
                    with contextlib.suppress(FileExistsError):
                        self._root.mkdir(fmt.UNDO_DIR_NAME, 0o700)
                    self._dir = self._root.opendir(fmt.UNDO_DIR_NAME)
                except OSError as exc:  # e.g. something else planted under the name
                    self._broken = True
                    log.error(
                        "cannot use %s (%s): partial-block rewrites go without undo records",
                        self._root.path(fmt.UNDO_DIR_NAME),
                        exc.strerror or exc,
                    )
            return self._dir

    def open(
        self, file_id: bytes, intact: Callable[[Collection[int]], bool], max_sealed: int
    ) -> UndoFile | None:
        """The undo file for ``file_id``, made empty; None if the directory is unusable.

        A crash may have left one. It is taken over only if ``intact(block numbers)`` says
        that every block it has a record of authenticates (the crash tore none of them);
        otherwise it may hold the only good copy of a torn block, so it is kept for fsck,
        this file's rewrites go without records, and None is returned. Raises ``OSError``
        (e.g. ENOSPC)."""
        if file_id in self._refused:
            return None
        directory = self._directory()
        if directory is None:
            return None
        name = fmt.undo_file_name(file_id)
        try:
            fd = directory.create_file(name, os.O_RDWR, 0o600)
        except FileExistsError:
            try:
                raw = directory.read_small(name, fmt.undo_size_limit(max_sealed))
            except OSError as exc:  # not a regular file: not ours to replace
                log.error("cannot read %s: %s", directory.path(name), exc)
                self._refused.add(file_id)
                return None
            if not intact(fmt.parse_undo(raw, max_sealed).keys()):
                self._refused.add(file_id)
                log.warning(
                    "%s holds the old content of a block a crash tore; kept for "
                    "`encfs fsck --repair`",
                    directory.path(name),
                )
                return None
            fd = directory.open_file(name, os.O_RDWR)  # stale: nothing torn, taken over
            os.pwrite(fd, fmt.UNDO_EMPTY, 0)
        return UndoFile(directory, name, fd)


class UndoFile:
    """One file's undo slot. Caller holds the file's write lock for every method."""

    __slots__ = ("_directory", "_dirty", "_fd", "_name")

    def __init__(self, directory: backing.Dir, name: str, fd: int) -> None:
        self._directory = directory
        self._name = name
        self._fd = fd
        self._dirty = False

    def save(self, records: list[tuple[int, bytes]]) -> None:
        """Make ``records`` (block number, old block sealed for that position) the slot's
        content; call before rewriting those blocks. Raises ``OSError`` (then do not
        rewrite)."""
        backing.pwrite_all(self._fd, fmt.pack_undo(records), 0)
        self._dirty = True

    def clear(self) -> None:
        """Empty the slot once the file's data is synced. Raises ``OSError``."""
        if self._dirty:
            os.pwrite(self._fd, fmt.UNDO_EMPTY, 0)
            self._dirty = False

    def close(self) -> None:
        """Remove the undo file (at the last close of its file: no write is in flight)."""
        try:
            with contextlib.suppress(FileNotFoundError):
                self._directory.unlink(self._name)
        finally:
            os.close(self._fd)
