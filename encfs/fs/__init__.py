"""The FUSE filesystem of a mount: ``serve`` mounts the operations (``ops``, with their
rooms ``handles``, ``tree``, ``attrs``, ``xattrs`` and ``kcache``) through the libfuse
adapter (``binding``).

Importing this package loads no FUSE library and changes no environment: mfusepy picks its
libfuse when imported, so only ``serve`` imports the binding, after ``select_libfuse``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

from encfs.fs.ops import EncfsOperations, FsOptions, load_native

__all__ = ["EncfsOperations", "FsOptions", "load_native", "select_libfuse", "serve"]


def select_libfuse(environ: MutableMapping[str, str] = os.environ) -> None:
    """Make mfusepy load libfuse 3 when it is imported (it reads ``environ`` then):
    ``$FUSE_LIBRARY_PATH`` if set, else the libfuse 3.17 that scripts/build-libfuse put into
    this Python's prefix (it negotiates HANDLE_KILLPRIV_V2: no ``security.capability`` round
    trip before every write), else the system's libfuse 3 by name (mfusepy would pick
    libfuse 2 when both are installed). Writes ``environ`` (so call it where the process
    starts, before other threads run); a second call writes nothing, and once mfusepy is
    loaded nothing changes its choice."""
    if not environ.get("FUSE_LIBRARY_PATH"):
        built = os.path.join(sys.prefix, "lib", "encfs", "libfuse3.so.4")
        if os.path.exists(built):
            environ["FUSE_LIBRARY_PATH"] = built
    environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")


def serve(operations: EncfsOperations, mountpoint: str, **options: object) -> None:
    """Mount ``operations`` on ``mountpoint`` with mount ``options`` and serve them in this
    thread until unmounted, on the libfuse ``select_libfuse`` chose. Raises what mfusepy's
    ``FUSE`` raises (``RuntimeError(8)`` when the loop ended on a signal)."""
    select_libfuse()  # a no-op if the process did it at its start, as it should
    from encfs.fs.binding import EncfsFUSE

    EncfsFUSE(operations, mountpoint, **options)
