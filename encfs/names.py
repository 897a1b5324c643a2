"""Name encryption: plaintext paths to backing entries, per-directory ids, long names, listing.

Every backing directory holds ``.encfs.dirid`` (16 random bytes, in a file or a symbolic
link, see ``write_dirid``); a name is encrypted with
AES-SIV under the names key with its parent's id as associated data, so equal names in
different directories differ and a lookup needs no directory scan. Encodings longer than
255 bytes are stored as ``encfs.ln.<sha256 of the encoding>`` with the full encoding in a
companion file ``encfs.ln.<hash>.name``.

Resolution never builds a backing path: a plaintext directory resolves to an open
``backing.Dir`` reached component by component without following links, and an entry is
that ``Dir`` plus one backing name. The module caches directory resolutions (their fds);
callers that rename or remove a directory call ``invalidate()``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from encfs import backing, crypto
from encfs import format as fmt
from encfs.errors import FormatError, IntegrityError
from encfs.keys import VolumeKeys

log = logging.getLogger(__name__)


def write_dirid(directory: backing.Dir, *, link: bool, dir_id: bytes | None = None) -> bytes:
    """Give the new backing directory ``directory`` its id (a fresh one unless ``dir_id``
    is given); returns the id. Raises OSError (FileExistsError if it has one).

    ``link`` (volumes with ``FEATURE_DIRID_LINKS``): a symbolic link whose target is the id,
    made in one metadata operation, so no crash can leave the entry without its id; a
    journaling filesystem commits it no later than the entries created in the directory
    after it. Otherwise a file, fsynced before the directory gets entries: a crash must not
    keep entries whose names need an id that never reached the disk.
    """
    if dir_id is None:
        dir_id = crypto.random_bytes(fmt.DIRID_LEN)
    if link:
        directory.symlink(crypto.b64encode(dir_id), fmt.DIRID_NAME)
    else:
        directory.write_new(fmt.DIRID_NAME, dir_id)
    return dir_id


def read_dirid(directory: backing.Dir) -> bytes:
    """The id of ``directory``, in either form (``write_dirid``); a link is never followed
    and a special file never opened. Raises FormatError if it is missing or damaged."""
    return read_dirid_form(directory)[0]


def read_dirid_form(directory: backing.Dir) -> tuple[bytes, bool]:
    """``read_dirid`` and whether the id is in the link form."""
    try:
        try:
            dir_id, link = _dirid_from_link(directory.readlink(fmt.DIRID_NAME)), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: not a link, so the file form
                raise
            dir_id, link = directory.read_small(fmt.DIRID_NAME, fmt.DIRID_LEN + 1), False
    except FileNotFoundError:
        raise FormatError(f"directory id missing in {directory.display}") from None
    except backing.SpecialFile:
        raise FormatError(f"directory id damaged in {directory.display}") from None
    if len(dir_id) != fmt.DIRID_LEN:
        raise FormatError(f"directory id damaged in {directory.display}")
    return dir_id, link


def read_root_attrs(root: backing.Dir) -> tuple[int, int, int] | None:
    """The plaintext root's (permission bits, uid, gid) kept on the cipher dir (FORMAT.md
    §6.2), or None where there are none (older volumes: the cipher dir's own are shown)."""
    try:
        raw = root.getxattr(".", fmt.ROOT_ATTRS_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return None
        raise
    return fmt.parse_root_attrs(raw)


def write_root_attrs(root: backing.Dir, mode: int, uid: int, gid: int) -> None:
    """Record the plaintext root's mode and owner on the cipher dir (never its own)."""
    root.setxattr(".", fmt.ROOT_ATTRS_XATTR, fmt.pack_root_attrs(mode, uid, gid), 0)


def with_root_attrs(st: os.stat_result, attrs: tuple[int, int, int]) -> os.stat_result:
    """``st`` (the cipher dir's stat) showing the plaintext root's mode and owner."""
    mode, uid, gid = attrs
    fields = list(st)
    fields[0] = stat.S_IFMT(st.st_mode) | mode
    fields[4], fields[5] = uid, gid
    return os.stat_result(fields, {name: getattr(st, name) for name in _STAT_EXTRA})


_STAT_EXTRA = (
    "st_atime", "st_mtime", "st_ctime", "st_atime_ns", "st_mtime_ns", "st_ctime_ns",
    "st_blksize", "st_blocks", "st_rdev",
)  # fmt: skip


def _dirid_from_link(target: str) -> bytes:
    """The id a link target encodes, or b"" unless it is exactly a canonical encoding."""
    if len(target) != fmt.DIRID_LINK_LEN:
        return b""
    try:
        dir_id = crypto.b64decode(target)
    except IntegrityError:
        return b""
    return dir_id if crypto.b64encode(dir_id) == target else b""


def long_backing_name(encoded: str) -> str:
    """The backing name of an encoding longer than ``MAX_BACKING_NAME``."""
    return fmt.LONGNAME_PREFIX + crypto.b64encode(crypto.sha256(encoded.encode()))


def entry_for(parent: backing.Dir, encoded: str) -> Entry:
    """The entry of encrypted name ``encoded`` in ``parent`` (hashed when too long)."""
    if len(encoded) > fmt.MAX_BACKING_NAME:
        return Entry(parent=parent, name=long_backing_name(encoded), encoded=encoded)
    return Entry(parent=parent, name=encoded, encoded=encoded)


@dataclass(frozen=True, slots=True)
class Entry:
    """A resolved plaintext path: one name inside an open backing directory."""

    parent: backing.Dir
    name: str
    """The backing name inside ``parent``."""
    encoded: str
    """The full encrypted name (differs from ``name`` for long names)."""

    @property
    def is_long(self) -> bool:
        return self.name != self.encoded

    @property
    def companion(self) -> str:
        """The backing name of a long name's companion, inside ``parent``."""
        return self.name + fmt.LONGNAME_SUFFIX

    @property
    def display(self) -> str:
        """Where the entry is, for messages (never opened)."""
        return self.parent.path(self.name)

    def opendir(self) -> backing.Dir:
        return self.parent.opendir(self.name)


def _cache_limit() -> int:
    """How many directories to keep open: a quarter of the fds we may have, at most 8192
    (each cached entry holds its parent's fd; both caches empty together)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(64, min(8192, soft // 4))


def raise_fd_limit() -> None:
    """Raise this process's soft open-file limit to its hard limit (the daemon keeps
    directory fds open; systemd's default soft limit is 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Names:
    """Plaintext path -> backing entry resolution for one mounted volume. Thread-safe.

    Locks: ``_lock`` guards the caches' replacement; lookups read them without it.
    """

    def __init__(
        self, cipher_root: str | backing.Dir, keys: VolumeKeys, *, dirid_links: bool = False
    ) -> None:
        self.root = (
            cipher_root if isinstance(cipher_root, backing.Dir) else backing.open_root(cipher_root)
        )
        self._keys = keys
        self.dirid_links = dirid_links
        """New directories get their id as a link (``FEATURE_DIRID_LINKS``)."""
        self._lock = threading.Lock()
        self._gen = 0
        self._limit = _cache_limit()
        self._dirs: dict[str, tuple[backing.Dir, bytes]] = {}
        self._entries: dict[str, Entry] = {}

    # --- resolution -----------------------------------------------------------------------

    def invalidate(self) -> None:
        """Forget every cached directory (after a directory rename or removal)."""
        with self._lock:
            self._gen += 1
            self._dirs = {}
            self._entries = {}

    def removed(self, plain_dir: str, directory: backing.Dir) -> None:
        """``plain_dir`` (open as ``directory``) was removed: whatever is cached under it
        resolves again (entries hold their parent, now ``dead``); nothing else is dropped."""
        directory.dead = True
        with self._lock:
            self._dirs.pop(plain_dir, None)

    def cached_directory(self, plain_dir: str) -> backing.Dir | None:
        """The open directory cached for ``plain_dir``, if any."""
        hit = self._dirs.get(plain_dir)
        return hit[0] if hit is not None else None

    def made(self, plain_dir: str, directory: backing.Dir, dir_id: bytes) -> None:
        """``plain_dir`` was just made as ``directory`` with ``dir_id``: cache it, so that
        the entries made in it next need no lookup of their own."""
        gen = self._gen
        with self._lock:
            if gen == self._gen and len(self._dirs) < self._limit:
                self._dirs[plain_dir] = (directory, dir_id)

    def directory(self, plain_dir: str) -> tuple[backing.Dir, bytes]:
        """(open backing directory, dir id) of a plaintext directory path. Raises OSError
        (``ELOOP``/``ENOTDIR`` where the backing entry is not a real directory) or
        FormatError."""
        hit = self._dirs.get(plain_dir)
        if hit is not None and not hit[0].dead:
            return hit
        gen = self._gen
        directory = self.root if plain_dir == "/" else self.entry(plain_dir).opendir()
        result = (directory, read_dirid(directory))
        with self._lock:
            if gen == self._gen:
                if len(self._dirs) >= self._limit:
                    self._dirs = {}
                    self._entries = {}  # they hold their parents' fds
                self._dirs[plain_dir] = result
        return result

    def entry(self, plain_path: str) -> Entry:
        """Resolve ``plain_path`` (absolute) to its backing location (``/``: the cipher dir
        as ``.`` inside itself, for metadata operations).

        Cached: the mapping depends only on the parent directory's id and the name, so it
        stays right across file renames and unlinks; ``invalidate()`` drops it when
        directories move.
        """
        hit = self._entries.get(plain_path)
        if hit is not None and not hit.parent.dead:
            return hit
        if plain_path == "/":
            return Entry(parent=self.root, name=".", encoded=".")
        gen = self._gen
        parent, _, name = plain_path.rpartition("/")
        parent_dir, dir_id = self.directory(parent or "/")
        entry = self.child(parent_dir, dir_id, name)
        with self._lock:
            if gen == self._gen:
                if len(self._entries) >= self._limit * 4:
                    self._entries = {}
                self._entries[plain_path] = entry
        return entry

    def child(self, parent: backing.Dir, dir_id: bytes, name: str) -> Entry:
        """The entry ``name`` in ``parent`` (whose id is ``dir_id``). While the volume is
        re-keyed a directory may still hold the entry under the retiring key's name (``encfs
        rekey`` renames every entry; never both at once): then that one, if it exists and
        the new one does not; anything new is made under the new key."""
        raw = os.fsencode(name)
        if len(raw) > fmt.MAX_PLAIN_NAME:
            raise OSError(errno.ENAMETOOLONG, "File name too long")
        cipher = self._keys.names
        entry = entry_for(parent, cipher.encrypt(raw, dir_id))
        if isinstance(cipher, crypto.RekeyingNameCipher) and not parent.exists(entry.name):
            old = entry_for(parent, cipher.retiring.encrypt(raw, dir_id))
            if parent.exists(old.name):
                return old
        return entry

    def entry_of(self, parent: backing.Dir, backing_name: str) -> Entry:
        """The entry backing ``backing_name`` in ``parent``, with its full encrypted name
        (a long name's from its companion). Raises ``IntegrityError`` (a long name whose
        companion is missing or does not match)."""
        if not fmt.is_longname(backing_name):
            return Entry(parent=parent, name=backing_name, encoded=backing_name)
        return Entry(
            parent=parent, name=backing_name, encoded=self._long_encoding(parent, backing_name)
        )

    # --- long-name companions -------------------------------------------------------------

    def add_companion(self, entry: Entry) -> None:
        """Write the companion file of a long name, durably, before the entry itself is
        created: a crash that kept the entry but not its companion's content would leave
        a name nothing can decrypt (long names are rare; the fsync costs little overall).
        A companion already there (a rename onto an existing long name) is replaced only
        if it is a regular file; it holds the same encoding."""
        if not entry.is_long:
            return
        data = entry.encoded.encode("ascii")
        try:
            entry.parent.write_new(entry.companion, data)
        except FileExistsError:
            if entry.parent.read_small(entry.companion, len(data) + 1) != data:
                entry.parent.unlink(entry.companion)
                entry.parent.write_new(entry.companion, data)

    def remove_companion(self, entry: Entry) -> None:
        if entry.is_long:
            with contextlib.suppress(FileNotFoundError):
                entry.parent.unlink(entry.companion)

    def rollback_companion(self, entry: Entry) -> None:
        """After creating ``entry`` failed: remove the companion written for it, unless
        the entry exists after all (then the companion is its)."""
        if entry.is_long and not entry.parent.exists(entry.name):
            self.remove_companion(entry)

    # --- listing --------------------------------------------------------------------------

    def decrypt_backing_name(self, parent: backing.Dir, dir_id: bytes, backing_name: str) -> str:
        """Plaintext name of a backing entry. Raises ``IntegrityError`` if it is not ours
        (also for a name that decrypts but cannot be a file name, ``is_valid_plain_name``)."""
        encoded = backing_name
        if backing_name.startswith(fmt.LONGNAME_PREFIX):
            encoded = self._long_encoding(parent, backing_name)
        try:
            raw = self._keys.names.decrypt(encoded, dir_id)
        except IntegrityError:
            raise IntegrityError(
                "name authentication failed", backing_path=parent.path(backing_name)
            ) from None
        if not fmt.is_valid_plain_name(raw):
            raise IntegrityError(
                "name decrypts to something that is not a file name",
                backing_path=parent.path(backing_name),
            )
        return os.fsdecode(raw)

    @staticmethod
    def _long_encoding(parent: backing.Dir, backing_name: str) -> str:
        """The full encrypted name of long name ``backing_name``, from its companion."""
        try:
            encoded = parent.read_small(backing_name + fmt.LONGNAME_SUFFIX, 4096).decode("ascii")
        except (OSError, UnicodeDecodeError):
            raise IntegrityError(
                "long name companion missing or unreadable",
                backing_path=parent.path(backing_name),
            ) from None
        if long_backing_name(encoded) != backing_name:
            raise IntegrityError(
                "long name does not match its companion", backing_path=parent.path(backing_name)
            )
        return encoded

    def listdir(self, plain_dir: str) -> Iterator[tuple[str, os.DirEntry[str]]]:
        """Yield (plaintext name, backing DirEntry) for every user entry of ``plain_dir``.

        Entries whose names fail authentication are logged once each and skipped
        (``fsck`` reports them); listing goes on.
        """
        parent, dir_id = self.directory(plain_dir)
        for dent in parent.scandir():
            name = dent.name
            if fmt.is_reserved_backing_name(name) and not fmt.is_longname(name):
                continue
            try:
                yield self.decrypt_backing_name(parent, dir_id, name), dent
            except IntegrityError as exc:
                log.error("%s; entry hidden", exc)
