"""Name encryption: plaintext paths to backing paths, per-directory ids, long names, listing.

Every backing directory holds ``.encfs.dirid`` (16 random bytes, in a file or a symbolic
link, see ``write_dirid``); a name is encrypted with
AES-SIV under the names key with its parent's id as associated data, so equal names in
different directories differ and a lookup needs no directory scan. Encodings longer than
255 bytes are stored as ``encfs.ln.<sha256 of the encoding>`` with the full encoding in a
companion file ``encfs.ln.<hash>.name``. The module caches directory resolutions; callers
that rename or remove a directory call ``invalidate()``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from encfs import crypto
from encfs import format as fmt
from encfs.errors import FormatError, IntegrityError
from encfs.keys import VolumeKeys

log = logging.getLogger(__name__)

_DIR_CACHE_MAX = 8192


def write_dirid(backing_dir: str, *, link: bool, dir_id: bytes | None = None) -> bytes:
    """Give the new backing directory ``backing_dir`` its id (a fresh one unless ``dir_id``
    is given); returns the id. Raises OSError (FileExistsError if it has one).

    ``link`` (volumes with ``FEATURE_DIRID_LINKS``): a symbolic link whose target is the id,
    made in one metadata operation, so no crash can leave the entry without its id; a
    journaling filesystem commits it no later than the entries created in the directory
    after it. Otherwise a file, fsynced before the directory gets entries: a crash must not
    keep entries whose names need an id that never reached the disk.
    """
    if dir_id is None:
        dir_id = crypto.random_bytes(fmt.DIRID_LEN)
    path = os.path.join(backing_dir, fmt.DIRID_NAME)
    if link:
        os.symlink(crypto.b64encode(dir_id), path)
        return dir_id
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o440)
    try:
        os.write(fd, dir_id)
        os.fsync(fd)
    finally:
        os.close(fd)
    return dir_id


def read_dirid(backing_dir: str) -> bytes:
    """The id of ``backing_dir``, in either form (``write_dirid``); a link is never followed.
    Raises FileNotFoundError/NotADirectoryError if the directory is gone, FormatError if
    its id is missing or damaged."""
    path = os.path.join(backing_dir, fmt.DIRID_NAME)
    try:
        try:
            target = os.readlink(path)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: not a link, so the file form
                raise
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                dir_id = os.read(fd, fmt.DIRID_LEN + 1)
            finally:
                os.close(fd)
        else:
            dir_id = _dirid_from_link(target)
    except FileNotFoundError:
        if os.path.isdir(backing_dir):
            raise FormatError(f"directory id missing in {backing_dir}") from None
        raise
    if len(dir_id) != fmt.DIRID_LEN:
        raise FormatError(f"directory id damaged in {backing_dir}")
    return dir_id


def _dirid_from_link(target: str) -> bytes:
    """The id a link target encodes, or b"" unless it is exactly a canonical encoding."""
    if len(target) != fmt.DIRID_LINK_LEN:
        return b""
    try:
        dir_id = crypto.b64decode(target)
    except IntegrityError:
        return b""
    return dir_id if crypto.b64encode(dir_id) == target else b""


@dataclass(frozen=True)
class Entry:
    """A resolved plaintext path: where it lives on the backing side."""

    backing_path: str
    parent_backing: str
    backing_name: str
    encoded: str
    """The full encrypted name (differs from ``backing_name`` for long names)."""

    @property
    def is_long(self) -> bool:
        return self.backing_name != self.encoded

    @property
    def companion(self) -> str:
        return self.backing_path + fmt.LONGNAME_SUFFIX


class Names:
    """Plaintext path -> backing path resolution for one mounted volume. Thread-safe."""

    def __init__(self, cipher_root: str, keys: VolumeKeys, *, dirid_links: bool = False) -> None:
        self.root = cipher_root
        self._keys = keys
        self.dirid_links = dirid_links
        """New directories get their id as a link (``FEATURE_DIRID_LINKS``)."""
        self._lock = threading.Lock()
        self._gen = 0
        self._dirs: dict[str, tuple[str, bytes]] = {}
        self._entries: dict[str, Entry] = {}

    # --- resolution -----------------------------------------------------------------------

    def invalidate(self) -> None:
        """Forget every cached directory (after a directory rename or removal)."""
        with self._lock:
            self._gen += 1
            self._dirs.clear()
            self._entries.clear()

    def directory(self, plain_dir: str) -> tuple[str, bytes]:
        """(backing path, dir id) of a plaintext directory path. Raises OSError/FormatError."""
        hit = self._dirs.get(plain_dir)
        if hit is not None:
            return hit
        gen = self._gen
        if plain_dir == "/":
            result = (self.root, read_dirid(self.root))
        else:
            entry = self.entry(plain_dir)
            result = (entry.backing_path, read_dirid(entry.backing_path))
        with self._lock:
            if gen == self._gen:
                if len(self._dirs) >= _DIR_CACHE_MAX:
                    self._dirs.clear()
                self._dirs[plain_dir] = result
        return result

    def entry(self, plain_path: str) -> Entry:
        """Resolve ``plain_path`` (absolute, not ``/``) to its backing location.

        Cached: the mapping depends only on the parent directory's id and the name, so it
        stays right across file renames and unlinks; ``invalidate()`` drops it when
        directories move.
        """
        hit = self._entries.get(plain_path)
        if hit is not None:
            return hit
        gen = self._gen
        parent, _, name = plain_path.rpartition("/")
        parent_backing, dir_id = self.directory(parent or "/")
        entry = self.child(parent_backing, dir_id, name)
        with self._lock:
            if gen == self._gen:
                if len(self._entries) >= _DIR_CACHE_MAX * 4:
                    self._entries.clear()
                self._entries[plain_path] = entry
        return entry

    def child(self, parent_backing: str, dir_id: bytes, name: str) -> Entry:
        raw = os.fsencode(name)
        if len(raw) > fmt.MAX_PLAIN_NAME:
            raise OSError(36, "File name too long")  # ENAMETOOLONG
        encoded = self._keys.names.encrypt(raw, dir_id)
        backing_name = encoded
        if len(encoded) > fmt.MAX_BACKING_NAME:
            backing_name = fmt.LONGNAME_PREFIX + crypto.b64encode(crypto.sha256(encoded.encode()))
        return Entry(
            backing_path=os.path.join(parent_backing, backing_name),
            parent_backing=parent_backing,
            backing_name=backing_name,
            encoded=encoded,
        )

    def backing_path(self, plain_path: str) -> str:
        if plain_path == "/":
            return self.root
        return self.entry(plain_path).backing_path

    # --- long-name companions -------------------------------------------------------------

    def add_companion(self, entry: Entry) -> None:
        """Write the companion file of a long name, durably, before the entry itself is
        created: a crash that kept the entry but not its companion's content would leave
        a name nothing can decrypt (long names are rare; the fsync costs little overall)."""
        if not entry.is_long:
            return
        fd = os.open(entry.companion, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o440)
        try:
            os.write(fd, entry.encoded.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove_companion(self, entry: Entry) -> None:
        if entry.is_long:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.companion)

    # --- listing --------------------------------------------------------------------------

    def decrypt_backing_name(self, parent_backing: str, dir_id: bytes, backing_name: str) -> str:
        """Plaintext name of a backing entry. Raises ``IntegrityError`` if it is not ours."""
        encoded = backing_name
        if backing_name.startswith(fmt.LONGNAME_PREFIX):
            try:
                with open(os.path.join(parent_backing, backing_name + fmt.LONGNAME_SUFFIX)) as f:
                    encoded = f.read(4096)
            except (OSError, UnicodeDecodeError):
                raise IntegrityError(
                    "long name companion missing or unreadable",
                    backing_path=os.path.join(parent_backing, backing_name),
                ) from None
            expect = fmt.LONGNAME_PREFIX + crypto.b64encode(crypto.sha256(encoded.encode()))
            if expect != backing_name:
                raise IntegrityError(
                    "long name does not match its companion",
                    backing_path=os.path.join(parent_backing, backing_name),
                )
        try:
            raw = self._keys.names.decrypt(encoded, dir_id)
        except IntegrityError:
            raise IntegrityError(
                "name authentication failed",
                backing_path=os.path.join(parent_backing, backing_name),
            ) from None
        return os.fsdecode(raw)

    def listdir(self, plain_dir: str) -> Iterator[tuple[str, os.DirEntry[str]]]:
        """Yield (plaintext name, backing DirEntry) for every user entry of ``plain_dir``.

        Entries whose names fail authentication are logged once each and skipped
        (``fsck`` reports them); listing goes on.
        """
        parent_backing, dir_id = self.directory(plain_dir)
        with os.scandir(parent_backing) as it:
            for dent in it:
                name = dent.name
                if fmt.is_reserved_backing_name(name) and not fmt.is_longname(name):
                    continue
                try:
                    yield self.decrypt_backing_name(parent_backing, dir_id, name), dent
                except IntegrityError as exc:
                    log.error("%s; entry hidden", exc)
