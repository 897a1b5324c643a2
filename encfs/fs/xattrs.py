"""Extended attributes of entries (FORMAT.md §9): only ``user.*``, each name encrypted and
each value sealed on the backing entry; every other namespace is unsupported.

Functions of the volume's keys and a backing entry; they raise ``OSError`` (ENODATA for a
missing attribute, from the backing filesystem) and ``IntegrityError`` naming the entry.
"""

from __future__ import annotations

import errno
import logging
import os

from encfs import format as fmt
from encfs import names
from encfs.errors import IntegrityError
from encfs.keys import VolumeKeys

log = logging.getLogger(__name__)

UNSUPPORTED = errno.EOPNOTSUPP
"""The answer for a name outside ``user.*`` (get, set, remove), as Linux filesystems answer
for a namespace they do not support; a missing ``user.*`` attribute is ENODATA."""


def backing_name(keys: VolumeKeys, name: str) -> str:
    """The backing attribute of ``user.NAME``: ``UNSUPPORTED`` outside ``user.*``, ERANGE
    for a name too long to encrypt within XATTR_NAME_MAX."""
    if not name.startswith(fmt.XATTR_PREFIX):
        raise OSError(UNSUPPORTED, "only user.* extended attributes are supported")
    plain = os.fsencode(name[len(fmt.XATTR_PREFIX) :])
    if len(plain) > fmt.MAX_PLAIN_XATTR_NAME:
        raise OSError(errno.ERANGE, "extended attribute name too long for encfs")
    return fmt.XATTR_BACKING_PREFIX + keys.names.encrypt(plain, fmt.XATTR_NAME_AD)


def get(keys: VolumeKeys, entry: names.Entry, bname: str) -> bytes:
    """The value of backing attribute ``bname`` of ``entry``, opened."""
    sealed = entry.parent.getxattr(entry.name, bname)
    try:
        return keys.meta.open(sealed, bname.encode(), "xattr value")
    except IntegrityError as exc:
        raise IntegrityError(exc.what, backing_path=entry.display) from None


def set_(keys: VolumeKeys, entry: names.Entry, bname: str, value: bytes, options: int) -> None:
    """Seal ``value`` into backing attribute ``bname`` (``options``: XATTR_CREATE/REPLACE)."""
    entry.parent.setxattr(entry.name, bname, keys.meta.seal(value, bname.encode()), options)


def listed(keys: VolumeKeys, entry: names.Entry) -> list[str]:
    """The plaintext ``user.*`` names of ``entry``; a name that fails authentication is
    logged and left out."""
    result = []
    for bname in entry.parent.listxattr(entry.name):
        if not bname.startswith(fmt.XATTR_BACKING_PREFIX):
            continue
        try:
            plain = keys.names.decrypt(bname[len(fmt.XATTR_BACKING_PREFIX) :], fmt.XATTR_NAME_AD)
        except IntegrityError:
            log.error("xattr name authentication failed on %s; attribute hidden", entry.display)
            continue
        result.append(fmt.XATTR_PREFIX + os.fsdecode(plain))
    return result
