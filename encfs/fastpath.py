"""The door to the native read path (``encfs/native/fastpath.c``): loads the library and
wraps its few calls; nothing else in encfs calls into it.

The library serves block-aligned FUSE reads of open files in C, without Python (see the C
file's header comment for the happy path and everything it hands back to Python). Three
rooms use it, each through this module: ``fs.binding`` plugs ``NativeReads`` into libfuse,
``cipherfile`` maps its open files (``NativeFile``) and makes every change of their content
visible to native readers (the seqlock), ``keys`` keys each file and wipes every context.

``load`` returns None — and encfs serves every read in Python, exactly as without the
library — when it is disabled (``ENCFS_NATIVE_READ=0``), missing, stale (built from
another source than the one next to this module), not loadable, on a machine other than
x86-64 Linux (the seqlock relies on its ordered stores), or for a volume with a feature
the native path does not implement (``NATIVE_FEATURES``). The reason is returned for the
log and ``encfs status``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import resource
import sys
from collections.abc import Mapping
from pathlib import Path

from encfs import format as fmt

LIBRARY_NAME = "libencfs_fastpath.so"
ABI_VERSION = 1
"""``fp_version()`` of a library this module can drive (``FP_VERSION`` in the C file)."""
SOURCE = Path(__file__).with_name("native") / "fastpath.c"
NATIVE_FEATURES = fmt.FEATURE_DIRID_LINKS
"""Volume feature flags the native path serves. Any other flag (a new content layout, such
as an outer cipher layer) makes ``load`` refuse: such volumes are served in Python."""
MAX_FDS = 1 << 20
GATE_TIMEOUT_MS = 5000


def library_path(environ: Mapping[str, str] = os.environ) -> Path:
    """Where scripts/install builds the library (``$ENCFS_FASTPATH_LIBRARY`` overrides)."""
    override = environ.get("ENCFS_FASTPATH_LIBRARY")
    if override:
        return Path(override)
    return Path(sys.prefix) / "lib" / "encfs" / LIBRARY_NAME


def source_digest() -> str:
    """SHA-256 of the C source, as scripts/install writes it next to the library it built."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


class NativeFile:
    """The native entry of one open backing inode (a ``CipherFile``): its cipher context
    and the seqlock words shared with native readers. Not thread-safe by itself: the
    ``CipherFile`` calls it under its own lock (see each method)."""

    __slots__ = ("_lib", "_ptr", "_queued", "_seq", "file_id", "fds", "keyed")

    def __init__(self, lib: ctypes.CDLL, file_id: bytes) -> None:
        ptr = lib.fp_file_new(file_id)
        if not ptr:
            raise MemoryError("fp_file_new failed")
        self._lib = lib
        self._ptr: int = ptr
        self._seq = ctypes.c_uint64.from_address(ptr)
        self._queued = ctypes.c_uint64.from_address(ptr + 8)
        self.file_id = file_id
        self.fds: set[int] = set()
        self.keyed = -1
        """The ``NativeReads.generation`` it was keyed in (keys are wiped between)."""

    def changing(self) -> None:
        """A writer starts changing the file's content or size (under its write lock):
        native readers stop serving it until ``changed``."""
        self._seq.value += 1

    def changed(self) -> None:
        """The change is complete (still under the write lock)."""
        self._seq.value += 1

    def set_queued(self, count: int) -> None:
        """How many deferred writes wait in the Sealer (under the Sealer's lock)."""
        self._queued.value = count

    def set_key(self, key_address: int) -> None:
        """Key the entry from 32 bytes at ``key_address`` (``VolumeKeys.lend_file_key``:
        the locked arena); the library keeps only an OpenSSL context."""
        if self._lib.fp_file_set_key(self._ptr, ctypes.c_void_p(key_address)) != 0:
            raise OSError("the native read path could not set a key")

    def map(self, fd: int) -> None:
        """Serve reads of handle ``fd`` (an open fd of this inode) natively."""
        if self._lib.fp_map_fd(fd, self._ptr) == 0:
            self.fds.add(fd)

    def unmap(self, fd: int) -> None:
        """Stop serving ``fd`` natively (before it is closed)."""
        if fd in self.fds:
            self._lib.fp_map_fd(fd, None)
            self.fds.discard(fd)

    def free(self) -> None:
        """Unmap every fd and free the entry (its contexts are cleansed). Only once no
        read of it can be in flight: at the inode's last close, or after ``retire``."""
        for fd in list(self.fds):
            self.unmap(fd)
        if self._ptr:
            self._lib.fp_file_free(self._ptr)
            self._ptr = 0


class NativeReads:
    """The loaded library and the state of the one mount it serves (see the C file).

    Thread-safe: the library synchronises itself; ``generation`` only grows.
    """

    def __init__(self, lib: ctypes.CDLL, block_size: int) -> None:
        self._lib = lib
        self.generation = 0
        """Bumped by every ``wipe``: files keyed in an earlier one need their key again."""
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        nfds = MAX_FDS if nofile == resource.RLIM_INFINITY else min(nofile, MAX_FDS)
        if lib.fp_setup(block_size, nfds) != 0:
            raise OSError("fp_setup refused the volume's geometry")

    @property
    def read_address(self) -> int:
        """The address of the C ``read`` callback, for libfuse's operations table."""
        address = ctypes.cast(self._lib.fp_read, ctypes.c_void_p).value
        assert address is not None
        return address

    def plug(self, fallback_address: int, fh_offset: int) -> None:
        """Hand every read the library does not serve to the callback at
        ``fallback_address``; ``fh_offset`` is where ``struct fuse_file_info`` keeps fh."""
        self._lib.fp_plug(ctypes.c_void_p(fallback_address), fh_offset)

    def new_file(self, file_id: bytes) -> NativeFile:
        return NativeFile(self._lib, file_id)

    def gate_close(self, timeout: float) -> bool:
        """Stop serving; True once no native read is in flight (False at ``timeout``)."""
        return bool(self._lib.fp_gate_close(int(timeout * 1000)))

    def gate_open(self) -> None:
        self._lib.fp_gate_open()

    def wipe(self) -> bool:
        """Free (and cleanse) every cipher context once no native read is in flight; False
        if reads were still in flight after ``GATE_TIMEOUT_MS`` (the contexts are then kept
        and the gate stays shut, so none is used again)."""
        self.generation += 1
        return bool(self._lib.fp_wipe(GATE_TIMEOUT_MS))

    def counters(self) -> tuple[int, int, int]:
        """(reads served, bytes served, reads handed to Python)."""
        out = (ctypes.c_ulong * 3)()
        self._lib.fp_counters(out)
        return out[0], out[1], out[2]


def _declare(lib: ctypes.CDLL) -> None:
    vp, sz, c_int = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
    lib.fp_version.restype = c_int
    lib.fp_version.argtypes = ()
    lib.fp_setup.restype = c_int
    lib.fp_setup.argtypes = (ctypes.c_uint32, sz)
    lib.fp_plug.restype = None
    lib.fp_plug.argtypes = (vp, sz)
    lib.fp_gate_open.restype = None
    lib.fp_gate_open.argtypes = ()
    lib.fp_gate_close.restype = c_int
    lib.fp_gate_close.argtypes = (ctypes.c_long,)
    lib.fp_wipe.restype = c_int
    lib.fp_wipe.argtypes = (ctypes.c_long,)
    lib.fp_counters.restype = None
    lib.fp_counters.argtypes = (ctypes.POINTER(ctypes.c_ulong),)
    lib.fp_file_new.restype = vp
    lib.fp_file_new.argtypes = (ctypes.c_char_p,)
    lib.fp_file_set_key.restype = c_int
    lib.fp_file_set_key.argtypes = (vp, vp)
    lib.fp_map_fd.restype = c_int
    lib.fp_map_fd.argtypes = (c_int, vp)
    lib.fp_file_free.restype = None
    lib.fp_file_free.argtypes = (vp,)


def load(
    block_size: int, features: int, environ: Mapping[str, str] = os.environ
) -> tuple[NativeReads | None, str]:
    """The native read path for a volume of ``block_size`` and ``features``, or None;
    with the reason either way (for the log and ``encfs status``)."""
    if environ.get("ENCFS_NATIVE_READ", "1") == "0":
        return None, "disabled (ENCFS_NATIVE_READ=0)"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"not supported on {sys.platform}/{platform.machine()}"
    if features & ~NATIVE_FEATURES:
        return None, f"not for volumes with features {features & ~NATIVE_FEATURES:#x}"
    path = library_path(environ)
    stamp = path.with_name(path.name + ".stamp")
    try:
        built_from = stamp.read_text().strip()
    except OSError:
        return None, f"{path} not built (scripts/install builds it)"
    try:
        if built_from != source_digest():
            return None, f"{path} is stale: built from another fastpath.c (run scripts/install)"
    except OSError as exc:
        return None, f"cannot read {SOURCE}: {exc.strerror}"
    try:
        lib = ctypes.CDLL(str(path))
        _declare(lib)
        if lib.fp_version() != ABI_VERSION:
            return None, f"{path} has ABI {lib.fp_version()}, not {ABI_VERSION}"
        return NativeReads(lib, block_size), f"native ({path})"
    except (OSError, AttributeError) as exc:
        return None, f"cannot load {path}: {exc}"
