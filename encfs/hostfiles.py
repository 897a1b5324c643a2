"""The one crash-safe writer of host files: configs, tokens, pins, the local vault's files.

Files of the host (``/etc/encfs``, ``/etc/systemd/system``, the pin directory, a local
OpenBao's data directory), never the cipher dir: that goes through ``encfs.backing``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["write_file_atomic"]


def write_file_atomic(path: Path, data: bytes, mode: int = 0o600, *, sync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically: a new ``mode`` file created with O_EXCL next to
    it, fsynced, renamed over ``path``; the directory is fsynced too. A crash leaves either
    the old file or the new one (and at worst a hidden ``.NAME.*.tmp`` beside it). Raises
    ``OSError``; the temporary file is removed on failure. ``sync=False`` skips both
    fsyncs (readers never see a partial file; a crash may lose the new one): for files
    rewritten every few seconds, such as metrics."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it; never wider than asked
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if not sync:
        return
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
