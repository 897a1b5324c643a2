"""Offline check of a volume: authenticate every directory id, name, file header, block,
symlink target and xattr, and report each problem with its path and block.

Read-only, unless asked to repair bad blocks (``check(..., repair=True)``). Walks the backing
tree through the same door and code the mount uses (``backing``, ``names``, ``crypto``
through ``keys``), so what fsck accepts is exactly what the mount would serve.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from encfs import backing, crypto, names
from encfs import format as fmt
from encfs.errors import FormatError, IntegrityError
from encfs.keys import VolumeKeys

_CHUNK_BLOCKS = 256


@dataclass(frozen=True)
class Problem:
    """One thing that failed. ``plain_path`` is None where the name itself failed."""

    kind: str
    backing_path: str
    plain_path: str | None
    block_no: int | None
    detail: str
    repaired: str = ""
    """What ``--repair`` did about it ("" if nothing)."""
    lost: tuple[int, int] | None = None
    """The plaintext byte range [start, end) the repair gave up, if it repaired."""

    def __str__(self) -> str:
        what = self.kind
        if self.block_no is not None:
            what = (
                f"block {self.block_no}" if what == "block" else f"{what} (block {self.block_no})"
            )
            what += " of"
        where = self.plain_path if self.plain_path is not None else "(name unreadable)"
        line = f"CORRUPT {what} {where} (cipher: {self.backing_path}): {self.detail}"
        return f"{line}; REPAIRED: {self.repaired}" if self.repaired else line

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "plain_path": self.plain_path,
            "backing_path": self.backing_path,
            "block": self.block_no,
            "detail": self.detail,
            "repaired": self.repaired or None,
            "lost": list(self.lost) if self.lost is not None else None,
        }


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    files: int = 0
    dirs: int = 0
    blocks: int = 0
    symlinks: int = 0
    xattrs: int = 0
    undo_files: int = 0
    """Undo files a crash left (FORMAT §10b); ``--repair`` uses and removes them."""

    @property
    def unrepaired(self) -> list[Problem]:
        return [p for p in self.problems if not p.repaired]


class _Checker:
    """One walk of the backing tree through the door (``backing``): no link followed, no
    special file opened, whatever the cipher dir holds."""

    def __init__(
        self,
        root: Path,
        keys: VolumeKeys,
        block_size: int,
        repair: bool,
        progress: Callable[[Report], None] | None = None,
    ) -> None:
        self.repair = repair
        self.progress = progress
        self.root = backing.open_root(str(root))
        self.keys = keys
        if block_size != keys.geometry.block_size:
            raise ValueError("block size differs from the keys' block size")
        self.geo = keys.geometry
        self.names = names.Names(self.root, keys)
        self.report = Report()
        self.dir_ids: dict[bytes, str] = {}
        self.undo_dir: backing.Dir | None = None
        try:
            self.undo_dir = self.root.opendir(fmt.UNDO_DIR_NAME)
            self.report.undo_files = len(self.undo_dir.names())
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.problem("undo directory", self.root.path(fmt.UNDO_DIR_NAME), None, str(exc))

    def problem(
        self, kind: str, backing: str, plain: str | None, detail: str, block_no: int | None = None
    ) -> None:
        self.report.problems.append(Problem(kind, backing, plain, block_no, detail))

    def run(self) -> Report:
        self.check_dir(self.root, "/")
        if self.repair and self.undo_dir is not None:
            # Every torn block that had a record is restored by now; the rest are stale.
            for name in self.undo_dir.names():
                self.undo_dir.unlink(name)
            self.undo_dir.fsync()
        return self.report

    def undo_records(self, file_id: bytes) -> dict[int, bytes]:
        """The undo records a crash left for the file ``file_id`` (unauthenticated)."""
        if self.undo_dir is None:
            return {}
        limit = fmt.undo_size_limit(self.geo.cipher_block_size)
        try:
            raw = self.undo_dir.read_small(fmt.undo_file_name(file_id), limit)
        except OSError:
            return {}
        return fmt.parse_undo(raw, self.geo.cipher_block_size)

    def check_dir(self, directory: backing.Dir, plain_dir: str) -> None:
        self.report.dirs += 1
        where = directory.display
        try:
            dir_id = names.read_dirid(directory)
        except (FormatError, OSError) as exc:
            self.problem("directory id", where, plain_dir, str(exc))
            return
        twin = self.dir_ids.setdefault(dir_id, plain_dir)
        if twin != plain_dir:
            self.problem(
                "directory id",
                where,
                plain_dir,
                f"same id as {twin}: one was copied from the other (entries can be grafted "
                "between them)",
            )
        self.check_xattrs(directory, ".", plain_dir)
        try:
            entries = sorted(directory.scandir(), key=lambda d: d.name)
        except OSError as exc:
            self.problem("directory", where, plain_dir, f"cannot list: {exc.strerror}")
            return
        present = {d.name for d in entries}
        for dent in entries:
            name = dent.name
            here = directory.path(name)
            if name in (fmt.DIRID_NAME, fmt.REKEY_TMP_NAME) or (
                directory is self.root and name in fmt.ROOT_FILES
            ):
                continue  # (a rekey's symlink made aside: the next rekey removes it)
            if name.startswith(fmt.LONGNAME_PREFIX) and name.endswith(fmt.LONGNAME_SUFFIX):
                if name[: -len(fmt.LONGNAME_SUFFIX)] not in present:
                    self.problem("orphan long-name companion", here, None, "no entry for it")
                continue
            if fmt.is_reserved_backing_name(name) and not fmt.is_longname(name):
                self.problem("unknown entry", here, None, "not written by encfs")
                continue
            try:
                plain_name = self.names.decrypt_backing_name(directory, dir_id, name)
            except IntegrityError as exc:
                self.problem("name", here, None, exc.what)
                continue
            plain = os.path.join(plain_dir, plain_name)
            try:
                st = directory.lstat(name)
            except OSError as exc:
                self.problem("entry", here, plain, f"cannot stat: {exc.strerror}")
                continue
            if stat.S_ISDIR(st.st_mode):
                try:
                    child = directory.opendir(name)
                except OSError as exc:
                    self.problem("directory", here, plain, f"cannot open: {exc.strerror}")
                    continue
                self.check_dir(child, plain)
            elif stat.S_ISLNK(st.st_mode):
                self.check_symlink(directory, name, plain)
            elif stat.S_ISREG(st.st_mode):
                self.check_file(directory, name, plain, st.st_size)
                self.check_xattrs(directory, name, plain)

    def check_symlink(self, directory: backing.Dir, name: str, plain: str) -> None:
        self.report.symlinks += 1
        try:
            sealed = crypto.b64decode(directory.readlink(name))
            self.keys.meta.open(sealed, fmt.SYMLINK_AD, "symlink target")
        except IntegrityError as exc:
            self.problem("symlink target", directory.path(name), plain, exc.what)

    def check_xattrs(self, directory: backing.Dir, name: str, plain: str) -> None:
        where = directory.path(name) if name != "." else directory.display
        try:
            xnames = directory.listxattr(name)
        except OSError:
            return
        for bname in xnames:
            if not bname.startswith(fmt.XATTR_BACKING_PREFIX):
                continue
            self.report.xattrs += 1
            try:
                self.keys.names.decrypt(bname[len(fmt.XATTR_BACKING_PREFIX) :], fmt.XATTR_NAME_AD)
                sealed = directory.getxattr(name, bname)
                self.keys.meta.open(sealed, bname.encode(), "xattr value")
            except IntegrityError as exc:
                self.problem("xattr", where, plain, f"{bname}: {exc.what}")
            except OSError as exc:
                self.problem("xattr", where, plain, f"{bname}: {exc.strerror}")

    def check_file(self, directory: backing.Dir, name: str, plain: str, cipher_size: int) -> None:
        self.report.files += 1
        if self.progress is not None:
            self.progress(self.report)
        if cipher_size == 0:
            return
        geo = self.geo
        where = directory.path(name)
        try:
            fd = directory.open_file(name, os.O_RDWR if self.repair else os.O_RDONLY)
        except OSError as exc:
            self.problem("file", where, plain, f"cannot open: {exc.strerror}")
            return
        first_problem = len(self.report.problems)
        try:
            try:
                file_id = fmt.parse_file_header(os.pread(fd, fmt.FILE_HEADER_LEN, 0))
            except FormatError as exc:
                self.problem("file header", where, plain, str(exc))
                return
            cipher = self.keys.file_cipher(file_id)
            nblocks = geo.block_count(cipher_size)
            if geo.has_fragment(cipher_size):
                self.problem(
                    "block",
                    where,
                    plain,
                    "trailing fragment too short to be a block",
                    block_no=nblocks - 1,
                )
                nblocks -= 1
            for first in range(0, nblocks, _CHUNK_BLOCKS):
                count = min(_CHUNK_BLOCKS, nblocks - first)
                raw = os.pread(fd, count * geo.cipher_block_size, geo.block_cipher_off(first))
                self.check_blocks(cipher, first, raw, where, plain)
                if self.progress is not None:
                    self.progress(self.report)
            if len(self.report.problems) > first_problem:
                restored = self.restorable(cipher, file_id, first_problem, where)
                if self.repair:
                    self.repair_blocks(fd, cipher, cipher_size, first_problem, restored)
        finally:
            os.close(fd)

    def restorable(
        self, cipher: crypto.FileCipher, file_id: bytes, first_problem: int, where: str
    ) -> dict[int, bytes]:
        """Plaintext of this file's bad blocks (problems from ``first_problem`` on) as the
        undo records a crash left hold them: only records that authenticate for the block's
        own position count. Notes each such problem as restorable."""
        records = self.undo_records(file_id)
        restored: dict[int, bytes] = {}
        problems = self.report.problems
        for index in range(first_problem, len(problems)):
            block_no = problems[index].block_no
            sealed = records.get(block_no) if block_no is not None else None
            if block_no is None or sealed is None:
                continue
            try:
                restored[block_no] = bytes(cipher.open(block_no, sealed, where))
            except IntegrityError:
                continue
            detail = problems[index].detail + " (torn by a crash; --repair restores it)"
            problems[index] = replace(problems[index], detail=detail)
        return restored

    def repair_blocks(
        self,
        fd: int,
        cipher: crypto.FileCipher,
        cipher_size: int,
        first_problem: int,
        restored: dict[int, bytes],
    ) -> None:
        """Make a file whose blocks failed readable again. A block torn by a crash in the
        middle of its rewrite gets back the content it had before that write, from its undo
        record (``restored``). Of the other bad blocks, a run at the end (a torn append) is
        cut off, and one before good ones is zeroed, so it reads as a hole (zeros). The
        problems from ``first_problem`` on (this file's, all blocks) say what each repair
        did and which plaintext range it gave up. fsynced before returning."""
        geo = self.geo
        bs = geo.block_size
        problems = self.report.problems
        bad = {p.block_no for p in problems[first_problem:] if p.block_no is not None}
        lost_blocks = bad - restored.keys()
        total = geo.block_count(cipher_size)
        cut = total
        while cut - 1 in lost_blocks:
            cut -= 1
        plain_size = geo.plain_size(cipher_size)
        new_plain_size = plain_size if cut == total else geo.block_plain_off(cut)
        for restore_no, data in sorted(restored.items()):
            if restore_no == cut - 1:
                new_plain_size = geo.block_plain_off(restore_no) + len(data)
            elif len(data) < bs:
                data += bytes(bs - len(data))  # it was the last block once; no longer
            os.pwrite(fd, cipher.seal(restore_no, data), geo.block_cipher_off(restore_no))
        zero = bytes(geo.cipher_block_size)
        for bad_no in sorted(lost_blocks):
            if bad_no < cut:
                os.pwrite(fd, zero, geo.block_cipher_off(bad_no))
        if new_plain_size != plain_size or cut < total:
            os.ftruncate(fd, geo.cipher_size(new_plain_size))
        os.fsync(fd)
        for index in range(first_problem, len(problems)):
            problem = problems[index]
            block_no = problem.block_no
            if block_no is None:
                continue
            start = geo.block_plain_off(block_no)
            lost: tuple[int, int] | None
            if block_no in restored:
                lost = None
                done = (
                    "restored from its undo record as it was before the write in progress "
                    "at the crash (only that unsynced write is lost)"
                )
            elif block_no >= cut:
                lost = (start, max(start, min(start + bs, plain_size)))
                done = f"torn tail cut at plaintext offset {new_plain_size}"
            else:
                lost = (start, start + bs)
                done = "block zeroed (reads as zeros)"
            if lost is not None:
                done += f": plaintext bytes {lost[0]}-{lost[1]} lost"
            problems[index] = replace(problem, repaired=done, lost=lost)

    def check_blocks(
        self, cipher: crypto.FileCipher, first: int, raw: bytes, backing: str, plain: str
    ) -> None:
        """Authenticate a run of blocks; on failure, retry one by one to name every bad block."""
        cbs = self.geo.cipher_block_size
        count = -(-len(raw) // cbs)
        try:
            cipher.open(first, raw, backing)
            self.report.blocks += count
            return
        except IntegrityError:
            pass
        for i in range(count):
            chunk = raw[i * cbs : (i + 1) * cbs]
            if len(chunk) <= self.geo.overhead:
                continue  # reported as a trailing fragment
            self.report.blocks += 1
            try:
                cipher.open(first + i, chunk, backing)
            except IntegrityError as exc:
                self.problem("block", backing, plain, exc.what, block_no=first + i)


def check(
    cipher_dir: Path,
    keys: VolumeKeys,
    block_size: int,
    *,
    repair: bool = False,
    progress: Callable[[Report], None] | None = None,
) -> Report:
    """Check the whole volume under ``cipher_dir`` with unlocked ``keys``. With ``repair``,
    files with bad blocks are made readable again (``_Checker.repair_blocks``); the volume
    must not be mounted then. ``progress(report)``, if given, is called with the report so
    far once per file and once per run of blocks read (up to 256); it must be cheap and
    throttle itself."""
    return _Checker(cipher_dir, keys, block_size, repair, progress).run()
