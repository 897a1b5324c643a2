"""Extended attributes of entries (FORMAT.md §9): only ``user.*``, each name encrypted and
each value sealed on the backing entry; every other namespace is unsupported.

Functions of the volume's keys and a backing entry; they raise ``OSError`` (ENODATA for a
missing attribute, from the backing filesystem) and ``IntegrityError`` naming the entry.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os

from encfs import crypto, names
from encfs import format as fmt
from encfs.errors import IntegrityError
from encfs.keys import VolumeKeys

log = logging.getLogger(__name__)

UNSUPPORTED = errno.EOPNOTSUPP
"""The answer for a name outside ``user.*`` (get, set, remove), as Linux filesystems answer
for a namespace they do not support; a missing ``user.*`` attribute is ENODATA."""


def backing_name(keys: VolumeKeys, name: str) -> str:
    """The backing attribute of ``user.NAME``: ``UNSUPPORTED`` outside ``user.*``, ERANGE
    for a name too long to encrypt within XATTR_NAME_MAX."""
    return fmt.XATTR_BACKING_PREFIX + keys.names.encrypt(plain_name(name), fmt.XATTR_NAME_AD)


def plain_name(name: str) -> bytes:
    """The encrypted part of ``user.NAME``: ``UNSUPPORTED`` outside ``user.*``, ERANGE for
    a name too long to encrypt within XATTR_NAME_MAX."""
    if not name.startswith(fmt.XATTR_PREFIX):
        raise OSError(UNSUPPORTED, "only user.* extended attributes are supported")
    plain = os.fsencode(name[len(fmt.XATTR_PREFIX) :])
    if len(plain) > fmt.MAX_PLAIN_XATTR_NAME:
        raise OSError(errno.ERANGE, "extended attribute name too long for encfs")
    return plain


def retiring_backing_name(keys: VolumeKeys, name: str) -> str | None:
    """While the volume is re-keyed, the backing attribute of ``user.NAME`` under the
    retiring key (an attribute ``encfs rekey`` has not re-sealed yet); None otherwise."""
    cipher = keys.names
    if not isinstance(cipher, crypto.RekeyingNameCipher):
        return None
    return fmt.XATTR_BACKING_PREFIX + cipher.retiring.encrypt(plain_name(name), fmt.XATTR_NAME_AD)


def get(keys: VolumeKeys, entry: names.Entry, name: str) -> bytes:
    """The value of ``user.NAME`` on ``entry``, opened (ENODATA if it has none)."""
    bname = backing_name(keys, name)
    try:
        return open_value(keys, entry, bname)
    except OSError as exc:
        old = retiring_backing_name(keys, name) if exc.errno == errno.ENODATA else None
        if old is None:
            raise
    return open_value(keys, entry, old)


def open_value(keys: VolumeKeys, entry: names.Entry, bname: str) -> bytes:
    """The value of backing attribute ``bname`` of ``entry``, opened."""
    sealed = entry.parent.getxattr(entry.name, bname)
    try:
        return keys.meta.open(sealed, bname.encode(), "xattr value")
    except IntegrityError as exc:
        raise IntegrityError(exc.what, backing_path=entry.display) from None


def set_(keys: VolumeKeys, entry: names.Entry, name: str, value: bytes, options: int) -> None:
    """Seal ``value`` into ``user.NAME`` (``options``: XATTR_CREATE/REPLACE, which see the
    attribute under either key while a rekey runs; the retiring one is then removed)."""
    bname = backing_name(keys, name)
    old = retiring_backing_name(keys, name)
    if old is not None and _has(entry, old):
        if options & os.XATTR_CREATE:
            raise OSError(errno.EEXIST, "extended attribute exists")
        options &= ~os.XATTR_REPLACE
    entry.parent.setxattr(entry.name, bname, keys.meta.seal(value, bname.encode()), options)
    if old is not None:
        with contextlib.suppress(OSError):
            entry.parent.removexattr(entry.name, old)


def remove(keys: VolumeKeys, entry: names.Entry, name: str) -> None:
    """Remove ``user.NAME`` (under either key while a rekey runs); ENODATA if none."""
    bname = backing_name(keys, name)
    old = retiring_backing_name(keys, name)
    try:
        entry.parent.removexattr(entry.name, bname)
    except OSError as exc:
        if old is None or exc.errno != errno.ENODATA:
            raise
        entry.parent.removexattr(entry.name, old)
        return
    if old is not None:
        with contextlib.suppress(OSError):
            entry.parent.removexattr(entry.name, old)


def _has(entry: names.Entry, bname: str) -> bool:
    try:
        entry.parent.getxattr(entry.name, bname)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return False
        raise
    return True


def listed(keys: VolumeKeys, entry: names.Entry) -> list[str]:
    """The plaintext ``user.*`` names of ``entry``; a name that fails authentication is
    logged and left out (one that a rekey left under both keys is listed once)."""
    result: dict[str, None] = {}
    for bname in entry.parent.listxattr(entry.name):
        if not bname.startswith(fmt.XATTR_BACKING_PREFIX):
            continue
        try:
            plain = keys.names.decrypt(bname[len(fmt.XATTR_BACKING_PREFIX) :], fmt.XATTR_NAME_AD)
        except IntegrityError:
            log.error("xattr name authentication failed on %s; attribute hidden", entry.display)
            continue
        result[fmt.XATTR_PREFIX + os.fsdecode(plain)] = None
    return list(result)
