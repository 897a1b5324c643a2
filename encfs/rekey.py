"""Re-encryption of a whole volume under a new volume key (``encfs rekey``), online or not.

For a volume key that may have been exposed: a new key from the vault, and every name,
block, symlink target and xattr re-sealed under it while the volume stays in use, like
``cryptsetup reencrypt``. Then the old wrapped key is gone from the header (and from
``encfs.volume.prev``) and the old key decrypts nothing in the volume.

The steps (FORMAT.md §2.5), each safe to interrupt at any point (``kill -9`` included):

1. *begin* — a fresh volume key from the vault; a header naming it as current and the old
   one as retiring, tagged by both (``volume.write_rekey_header``); then the key owner
   seals under the new key and opens under either (``VolumeKeys.retire``). Nothing is
   sealed under the new key before that header is durable. The host's pin follows.
2. *walk* — every directory, breadth first: its entries renamed to their new encryption
   (``RENAME_NOREPLACE``; a long name's new companion first, the old one after), its
   symlinks and xattrs re-sealed, all while no FUSE operation runs (``VolumeAccess.quiet``:
   a directory changes from old to new names in one step, never while an operation looks
   it up); then each regular file's blocks, a chunk at a time under that file's lock with
   undo records (``CipherFile.rekey``). An entry renamed or linked meanwhile may have left
   a part not yet walked for one already walked, so the walk repeats (skipping inodes done)
   until a pass saw no rename; past ``MAX_QUIET_PASSES`` the last pass runs quiet.
3. *finish* — the backing filesystem synced; a header with the new key alone, written
   twice (``.prev`` too); the retiring keys wiped.

A crash leaves a header that names both keys: every mount unwraps both and reads
everything, and the next ``encfs rekey`` carries on from step 2 (what is done already costs
a read). Problems (entries neither key opens) are reported and keep the rekey from
finishing: the old key stays until they are dealt with (``encfs fsck``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from encfs import backing, crypto, names, pins, volume
from encfs import format as fmt
from encfs.cipherfile import CipherFile
from encfs.errors import FormatError, IntegrityError, RekeyIncomplete, VolumeSuspended
from encfs.keys import VolumeKeys
from encfs.undo import UndoLog
from encfs.vault import KeyWrapper

log = logging.getLogger(__name__)

MAX_QUIET_PASSES = 3
"""Walks that let FUSE operations run; a volume renamed through all of them gets a last
walk with none running."""
RENAME_NOREPLACE = 1


class RekeyStopped(Exception):
    """The rekey was asked to stop (unmount); the volume stays mid-rekey and mountable."""


@dataclass
class RekeyProgress:
    """How far a rekey is. Updated by the rekey's thread without a lock; readers see
    counts that may be a moment old."""

    state: str = "starting"
    """starting, walking, finishing, done, failed, stopped, suspended (keys wiped: it goes
    on when the volume resumes)."""
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    passes: int = 0
    dirs_total: int = 0
    files_total: int = 0
    bytes_total: int = 0
    dirs: int = 0
    files: int = 0
    bytes_done: int = 0
    """Cipher bytes of file content examined (re-sealed or found done)."""
    names: int = 0
    blocks: int = 0
    symlinks: int = 0
    xattrs: int = 0
    problems: list[str] = field(default_factory=list)
    error: str = ""

    def problem(self, what: str) -> None:
        log.error("rekey: %s", what)
        if len(self.problems) < 1000:
            self.problems.append(what)

    @property
    def elapsed(self) -> float:
        return (self.ended if self.ended is not None else time.monotonic()) - self.started

    def summary(self) -> dict[str, Any]:
        """The counts an audit event records."""
        return {
            "names_renamed": self.names,
            "blocks_resealed": self.blocks,
            "symlinks_resealed": self.symlinks,
            "xattrs_resealed": self.xattrs,
            "elapsed": round(self.elapsed, 3),
        }

    def load(self, doc: dict[str, Any]) -> None:
        """Take over the counts of ``as_dict()`` (another process's rekey: the daemon's)."""
        self.state = str(doc.get("state", self.state))
        self.passes = int(doc.get("passes", 0))
        self.dirs, self.dirs_total = int(doc.get("dirs", 0)), int(doc.get("dirs_total", 0))
        self.files, self.files_total = int(doc.get("files", 0)), int(doc.get("files_total", 0))
        self.bytes_done, self.bytes_total = int(doc.get("bytes", 0)), int(doc.get("bytes_total", 0))
        self.names = int(doc.get("names_renamed", 0))
        self.blocks = int(doc.get("blocks_resealed", 0))
        self.symlinks = int(doc.get("symlinks_resealed", 0))
        self.xattrs = int(doc.get("xattrs_resealed", 0))
        self.problems = [str(p) for p in doc.get("problem_list", [])]
        self.error = str(doc.get("error", ""))
        self.started = time.monotonic() - float(doc.get("elapsed", 0.0))
        self.ended = time.monotonic() if self.state in ("done", "failed", "stopped") else None

    def as_dict(self) -> dict[str, Any]:
        elapsed = self.elapsed
        return {
            "state": self.state,
            "passes": self.passes,
            "dirs": self.dirs,
            "dirs_total": self.dirs_total,
            "files": self.files,
            "files_total": self.files_total,
            "bytes": self.bytes_done,
            "bytes_total": self.bytes_total,
            "names_renamed": self.names,
            "blocks_resealed": self.blocks,
            "symlinks_resealed": self.symlinks,
            "xattrs_resealed": self.xattrs,
            "problems": len(self.problems),
            "problem_list": self.problems[:20],
            "elapsed": round(elapsed, 3),
            "bytes_per_second": round(self.bytes_done / elapsed) if elapsed > 0 else 0,
            "error": self.error,
        }


class VolumeAccess(Protocol):
    """What a rekey needs of the volume it re-keys: a mounted one (the daemon's
    operations) or one no daemon serves (``OfflineAccess``)."""

    @property
    def cipher_dir(self) -> Path: ...

    @property
    def keys(self) -> VolumeKeys: ...

    @property
    def names(self) -> names.Names: ...

    def quiet(self) -> contextlib.AbstractContextManager[None]:
        """While held, no FUSE operation runs (and none is half done): the new ones wait."""
        ...

    def open_file(self, directory: backing.Dir, name: str) -> tuple[int, CipherFile]:
        """A read-write fd of the regular file ``name`` and its (shared) ``CipherFile``."""
        ...

    def close_file(self, fd: int) -> None: ...

    def tree_changes(self) -> int:
        """A count that moves whenever an entry is renamed or hard-linked."""
        ...

    def installed(self, hf: volume.HeaderFile, check_values: tuple[bytes, ...]) -> None:
        """The header in place now and the check values of the keys in use (the watcher's)."""
        ...


def begin(
    access: VolumeAccess,
    hf: volume.HeaderFile,
    vaults: Sequence[KeyWrapper],
    *,
    accept: Callable[[tuple[bytes, ...]], None] = lambda check_values: None,
) -> volume.HeaderFile:
    """Step 1 (module docstring), a new key from the vault of each key slot (``vaults``,
    slot order). ``accept(check_values)`` is told the new keys' check values before the
    header naming them is written (the watcher must take them for the volume's). Returns
    the header now in place. Raises ``VaultError``, ``OSError``."""
    new_keys, slots = volume.new_rekey_keys(hf, vaults)
    try:
        accept(new_keys.check_values())
        new_hf = volume.write_rekey_header(access.cipher_dir, hf, access.keys, new_keys, slots)
    except BaseException:
        new_keys.close()
        raise
    try:
        check_values = new_keys.check_values()
        with access.quiet():
            access.keys.retire(new_keys)  # from here on, new_keys is the retiring set
            access.names.invalidate()
    except BaseException:
        if access.keys.retiring is not new_keys:
            new_keys.close()  # not installed (the volume was suspended): the header
        raise  # names them, and the next run unwraps them from it
    access.installed(new_hf, check_values)
    pins.check_pin(
        access.cipher_dir,
        hf.header.volume_id,
        access.keys,
        create=True,
        vault_url=hf.header.vault_url,
        block_size=hf.header.block_size,
        vault_url2=hf.header.slots[1].vault_url if hf.header.double else "",
    )
    log.info(
        "rekey of %s begun: new volume key (KEK version %d); everything is sealed under "
        "it from now on",
        access.cipher_dir,
        new_hf.header.kek_version,
    )
    return new_hf


def walk(access: VolumeAccess, progress: RekeyProgress, stop: threading.Event) -> None:
    """Step 2 (module docstring): re-seal everything the retiring key sealed. Raises
    ``RekeyStopped`` when ``stop`` is set, ``VolumeSuspended`` (keys wiped meanwhile),
    ``OSError`` of the backing filesystem."""
    count(access, progress)
    done: set[tuple[int, int]] = set()
    progress.state = "walking"
    while True:
        quiet_pass = progress.passes >= MAX_QUIET_PASSES
        progress.passes += 1
        progress.dirs = 0
        before = access.tree_changes()
        walker = _Walker(access, progress, stop, done)
        if quiet_pass:
            with access.quiet():
                walker.run()
        else:
            walker.run()
        if quiet_pass or access.tree_changes() == before:
            return
        log.info("rekey: entries moved during pass %d; walking again", progress.passes)


def finish(
    access: VolumeAccess, hf: volume.HeaderFile, progress: RekeyProgress
) -> volume.HeaderFile:
    """Step 3 (module docstring). Returns the final header. Raises ``OSError``."""
    progress.state = "finishing"
    root = backing.open_root(str(access.cipher_dir))
    backing.syncfs(root.fd)  # every re-sealed block durable before the old key goes
    with access.quiet():
        # Whatever needs the keys comes first: a suspension (keys wiped) after the final
        # header is written must not leave the rekey looking unfinished.
        check_values = access.keys.check_values()
        final = volume.finish_rekey(access.cipher_dir, hf, access.keys)
        access.keys.end_rekey()
        access.names.invalidate()
    access.installed(final, check_values)
    progress.state = "done"
    progress.ended = time.monotonic()
    log.info(
        "rekey of %s done: %d names, %d blocks, %d symlinks and %d xattrs re-sealed in "
        "%.1f s; the old volume key is gone",
        access.cipher_dir,
        progress.names,
        progress.blocks,
        progress.symlinks,
        progress.xattrs,
        progress.elapsed,
    )
    return final


def count(access: VolumeAccess, progress: RekeyProgress) -> None:
    """The totals a progress report divides by: directories, files, their cipher bytes."""
    dirs = files = size = 0
    stack = [access.names.root]
    while stack:
        directory = stack.pop()
        dirs += 1
        try:
            entries = list(directory.scandir())
        except OSError:
            continue
        for dent in entries:
            if fmt.is_reserved_backing_name(dent.name) and not fmt.is_longname(dent.name):
                continue
            try:
                st = dent.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(directory.opendir(dent.name))
                elif stat.S_ISREG(st.st_mode):
                    files += 1
                    size += st.st_size
            except OSError:
                continue
    progress.dirs_total, progress.files_total, progress.bytes_total = dirs, files, size


class _Walker:
    """One pass over the backing tree (``walk``). ``done`` holds the inodes (st_dev,
    st_ino) whose content is re-sealed, across passes."""

    def __init__(
        self,
        access: VolumeAccess,
        progress: RekeyProgress,
        stop: threading.Event,
        done: set[tuple[int, int]],
    ) -> None:
        self.access = access
        self.progress = progress
        self.stop = stop
        self.done = done

    def run(self) -> None:
        root = self.access.names.root
        with self.access.quiet():
            self.xattrs(root, ".", "/")
        queue = [(root, "/")]
        while queue:
            if self.stop.is_set():
                raise RekeyStopped("rekey stopped")
            directory, plain_dir = queue.pop(0)
            with self.access.quiet():
                subdirs, files = self.directory(directory, plain_dir)
            self.progress.dirs += 1
            for name, plain in files:
                if self.stop.is_set():
                    raise RekeyStopped("rekey stopped")
                self.content(directory, name, plain)
            queue.extend(subdirs)

    # --- one directory (no FUSE operation runs meanwhile) ---------------------------------

    def directory(
        self, directory: backing.Dir, plain_dir: str
    ) -> tuple[list[tuple[backing.Dir, str]], list[tuple[str, str]]]:
        """Rename the entries of ``directory`` to their new encryption, re-seal its symlinks
        and every entry's xattrs; returns its subdirectories (open, with their plaintext
        paths) and its regular files (backing name, plaintext path)."""
        subdirs: list[tuple[backing.Dir, str]] = []
        files: list[tuple[str, str]] = []
        try:
            dir_id = names.read_dirid(directory)
            present = directory.names()
        except (FormatError, OSError) as exc:
            self.progress.problem(f"directory {plain_dir} ({directory.display}): {exc}")
            return subdirs, files
        cipher = self.access.keys.names
        for name in present:
            if fmt.is_reserved_backing_name(name) and not fmt.is_longname(name):
                continue
            try:
                plain_name, name = self.rename(directory, dir_id, name, cipher)
            except IntegrityError as exc:
                self.progress.problem(f"name in {plain_dir}: {exc}")
                continue
            except FileNotFoundError:
                continue
            plain = os.path.join(plain_dir, plain_name)
            try:
                st = directory.lstat(name)
                if stat.S_ISDIR(st.st_mode):
                    child = directory.opendir(name)
                    self.xattrs(child, ".", plain)
                    subdirs.append((child, plain))
                elif stat.S_ISLNK(st.st_mode):
                    self.symlink(directory, name, plain, st)
                elif stat.S_ISREG(st.st_mode):
                    self.xattrs(directory, name, plain)
                    files.append((name, plain))
            except FileNotFoundError:
                continue
            except IntegrityError as exc:
                self.progress.problem(f"{plain}: {exc}")
        self.tidy(directory, set(directory.names()))
        self.access.names.invalidate()
        return subdirs, files

    def rename(
        self,
        directory: backing.Dir,
        dir_id: bytes,
        name: str,
        cipher: crypto.NameCipher | crypto.RekeyingNameCipher,
    ) -> tuple[str, str]:
        """The plaintext name of backing entry ``name`` and its backing name under the new
        key, renamed there first if the retiring key sealed it. Raises ``IntegrityError``
        (neither key opens it), ``FileNotFoundError`` (gone meanwhile)."""
        old = self.access.names.entry_of(directory, name)
        raw = os.fsencode(self.access.names.decrypt_backing_name(directory, dir_id, name))
        if not isinstance(cipher, crypto.RekeyingNameCipher) or cipher.is_current(
            old.encoded, dir_id
        ):
            return os.fsdecode(raw), name
        new = names.entry_for(directory, cipher.encrypt(raw, dir_id))
        self.access.names.add_companion(new)
        backing.rename(directory, old.name, directory, new.name, RENAME_NOREPLACE)
        self.access.names.remove_companion(old)
        self.progress.names += 1
        return os.fsdecode(raw), new.name

    def symlink(self, directory: backing.Dir, name: str, plain: str, st: os.stat_result) -> None:
        """Re-seal the target of symlink ``name`` under the new key: a new link made aside
        (same owner and times) and renamed over it."""
        meta = self.access.keys.meta
        sealed = crypto.b64decode(directory.readlink(name))
        if not isinstance(meta, crypto.RekeyingMetaCipher) or meta.is_current(
            sealed, fmt.SYMLINK_AD
        ):
            return
        try:
            target = meta.open(sealed, fmt.SYMLINK_AD, "symlink target")
        except IntegrityError as exc:
            raise IntegrityError(exc.what, backing_path=directory.path(name)) from None
        with contextlib.suppress(FileNotFoundError):
            directory.unlink(fmt.REKEY_TMP_NAME)
        directory.symlink(crypto.b64encode(meta.seal(target, fmt.SYMLINK_AD)), fmt.REKEY_TMP_NAME)
        directory.chown(fmt.REKEY_TMP_NAME, st.st_uid, st.st_gid)
        directory.utime(fmt.REKEY_TMP_NAME, (st.st_atime_ns, st.st_mtime_ns))
        backing.rename(directory, fmt.REKEY_TMP_NAME, directory, name)
        self.progress.symlinks += 1

    def xattrs(self, directory: backing.Dir, name: str, plain: str) -> None:
        """Re-seal the encrypted xattrs of entry ``name`` (``.``: the directory itself)
        that the retiring key sealed: the new one set first, the old one removed after."""
        keys = self.access.keys
        cipher, meta = keys.names, keys.meta
        if not isinstance(cipher, crypto.RekeyingNameCipher):
            return
        for bname in directory.listxattr(name):
            if not bname.startswith(fmt.XATTR_BACKING_PREFIX):
                continue
            encoded = bname[len(fmt.XATTR_BACKING_PREFIX) :]
            if cipher.is_current(encoded, fmt.XATTR_NAME_AD):
                continue
            try:
                plain_name = cipher.decrypt(encoded, fmt.XATTR_NAME_AD)
                value = meta.open(directory.getxattr(name, bname), bname.encode(), "xattr value")
            except IntegrityError as exc:
                self.progress.problem(f"xattr of {plain} ({directory.path(name)}): {exc.what}")
                continue
            except OSError as exc:
                if exc.errno == errno.ENODATA:
                    continue
                raise
            new = fmt.XATTR_BACKING_PREFIX + cipher.encrypt(plain_name, fmt.XATTR_NAME_AD)
            # One set anew since the rekey began exists already: that value is the newer one.
            with contextlib.suppress(FileExistsError):
                directory.setxattr(name, new, meta.seal(value, new.encode()), os.XATTR_CREATE)
            with contextlib.suppress(OSError):
                directory.removexattr(name, bname)
            self.progress.xattrs += 1

    def tidy(self, directory: backing.Dir, present: set[str]) -> None:
        """Remove what an interrupted rekey left: a symlink made aside, and the old
        companions of long names already renamed."""
        for name in present:
            if name == fmt.REKEY_TMP_NAME or (
                name.startswith(fmt.LONGNAME_PREFIX)
                and name.endswith(fmt.LONGNAME_SUFFIX)
                and name[: -len(fmt.LONGNAME_SUFFIX)] not in present
            ):
                with contextlib.suppress(OSError):
                    directory.unlink(name)

    # --- one file's content (FUSE operations go on; the file's lock orders them) -------------

    def content(self, directory: backing.Dir, name: str, plain: str) -> None:
        try:
            st = directory.lstat(name)
        except FileNotFoundError:
            return
        inode = (st.st_dev, st.st_ino)
        if inode in self.done or not stat.S_ISREG(st.st_mode):
            return
        try:
            fd, cfile = self.access.open_file(directory, name)
        except FileNotFoundError:
            return
        try:
            self.progress.blocks += cfile.rekey(fd, self._counted)
        except IntegrityError as exc:
            self.progress.problem(f"{plain}: {exc}")
        finally:
            self.access.close_file(fd)
        self.done.add(inode)
        self.progress.files += 1

    def _counted(self, cipher_bytes: int) -> None:
        self.progress.bytes_done += cipher_bytes
        if self.stop.is_set():
            raise RekeyStopped("rekey stopped")


def run(
    access: VolumeAccess,
    hf: volume.HeaderFile,
    vaults: Sequence[KeyWrapper],
    progress: RekeyProgress,
    stop: threading.Event,
    *,
    accept: Callable[[tuple[bytes, ...]], None] = lambda check_values: None,
) -> volume.HeaderFile:
    """Begin (unless ``hf`` shows a rekey under way), walk, finish; returns the final
    header. ``progress.state`` says how it ended. Raises ``RekeyIncomplete`` (entries
    neither key opens: not finished), ``RekeyStopped``, ``VaultError``, ``OSError``,
    ``VolumeSuspended``."""
    try:
        if not hf.header.rekeying:
            hf = begin(access, hf, vaults, accept=accept)
        walk(access, progress, stop)
        if progress.problems:
            raise RekeyIncomplete(
                f"{len(progress.problems)} entries of {access.cipher_dir} open under neither "
                "key; the rekey stays unfinished and the old key in use",
                hint=f"see them with `encfs fsck {access.cipher_dir}`; repair or remove them "
                "(`encfs fsck --repair` for blocks), then run `encfs rekey` again",
            )
        return finish(access, hf, progress)
    except RekeyStopped:
        progress.state = "stopped"
        raise
    except VolumeSuspended:
        progress.state = "suspended"  # the keys were wiped meanwhile: run again on resume
        raise
    except BaseException as exc:
        progress.state = "failed"
        progress.error = str(exc)
        raise
    finally:
        if progress.ended is None:
            progress.ended = time.monotonic()


class OfflineAccess:
    """A volume no daemon serves (its lock held by the caller): no FUSE operation to keep
    out, a ``CipherFile`` of its own per file (with undo records)."""

    def __init__(self, cipher_dir: Path, keys: VolumeKeys, header: fmt.VolumeHeader) -> None:
        self.cipher_dir = cipher_dir
        self.keys = keys
        root = backing.open_root(str(cipher_dir))
        self.names = names.Names(root, keys, dirid_links=fmt.dirid_links(header.feature_flags))
        self._geo = fmt.Geometry(header.block_size)
        self._undo = UndoLog(root)
        self._files: dict[int, CipherFile] = {}

    def quiet(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def open_file(self, directory: backing.Dir, name: str) -> tuple[int, CipherFile]:
        fd = directory.open_file(name, os.O_RDWR | os.O_CLOEXEC)
        cfile = CipherFile(self.keys, self._geo, directory.path(name), None, self._undo)
        self._files[fd] = cfile
        return fd, cfile

    def close_file(self, fd: int) -> None:
        try:
            self._files.pop(fd).close()
        finally:
            os.close(fd)

    def tree_changes(self) -> int:
        return 0

    def installed(self, hf: volume.HeaderFile, check_values: tuple[bytes, ...]) -> None:
        pass


def run_offline(
    cipher_dir: Path,
    vaults: Sequence[KeyWrapper],
    progress: RekeyProgress,
    stop: threading.Event,
) -> volume.HeaderFile:
    """``run`` on a volume that is not mounted, holding its lock meanwhile (a mount waits
    for nothing: it fails with ``VolumeBusy`` naming this process). Raises as ``run``
    does, and ``VolumeBusy`` (mounted), ``VolumeMismatch`` (not the pinned volume)."""
    volume.require_cipher_dir(cipher_dir)
    volume.check_cipher_dir_safe(cipher_dir)
    lock = backing.lock_volume(
        backing.open_root(str(cipher_dir)), f"encfs rekey (pid {os.getpid()})"
    )
    try:
        hf = volume.read_checked_header(cipher_dir)
        keys = volume.unlock(hf, *vaults)
        try:
            pins.check_pin(
                cipher_dir,
                hf.header.volume_id,
                keys,
                create=False,
                vault_url=hf.header.vault_url,
                block_size=hf.header.block_size,
                vault_url2=hf.header.slots[1].vault_url if hf.header.double else "",
            )
            return run(OfflineAccess(cipher_dir, keys, hf.header), hf, vaults, progress, stop)
        finally:
            keys.close()
    finally:
        os.close(lock)
