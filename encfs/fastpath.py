"""The door to the native I/O path (``encfs/native/fastpath.c``): loads the library and
wraps its calls; nothing else in encfs calls into it.

The library serves the hot requests of open files in C, without Python: block-aligned
reads, whole-block overwrites, getattr by handle and the kernel's ``security.capability``
probe (the C file's header comment lists the happy path and everything it hands back to
Python), on single and double volumes alike; and it seals the Sealer's stream writes.
Three rooms use it, each through this module: ``fs.binding`` plugs ``NativeIO`` into
libfuse; ``cipherfile`` gives each open inode a ``NativeFile``, maps its handles, makes
every change of its content visible to native readers (the seqlock), orders its writers
with them (the file lock) and has its stream writes sealed (``seal_into``); ``keys`` keys
each file and wipes every context.

``load`` returns None — and encfs serves every request in Python, exactly as without the
library — when it is disabled (``ENCFS_NATIVE=0``), missing, stale (built from another
source than the one next to this module), not loadable, on a machine other than x86-64
Linux (the seqlock relies on its ordered stores), or for a volume with a feature the
native path does not implement (``NATIVE_FEATURES``). The reason comes back with it, for
the log and ``encfs status``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import resource
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from encfs import format as fmt

LIBRARY_NAME = "libencfs_fastpath.so"
ABI_VERSION = 6
"""``fp_version()`` of a library this module can drive (``FP_VERSION`` in the C file)."""
SOURCE = Path(__file__).with_name("native") / "fastpath.c"
NATIVE_FEATURES = fmt.FEATURE_DIRID_LINKS | fmt.FEATURE_DOUBLE
"""Volume feature flags the native path serves: ``DOUBLE`` (its outer layer,
ChaCha20-Poly1305, the only outer cipher FORMAT.md defines) it implements; the others do
not change a file's content layout. Any other flag (``REKEYING``: blocks under two keys;
a new content layout) makes ``load`` refuse: such volumes are served in Python."""
MAX_FDS = 1 << 20
WIPE_TIMEOUT_MS = 5000
OPS = {"read": 0, "write": 1, "getattr": 2, "getxattr": 3}
"""libfuse operations the library serves (``FP_OP_*``)."""
_COUNTERS = (
    "reads",
    "bytes_read",
    "writes",
    "bytes_written",
    "security_probes",
    "fallbacks",
    "bytes_sealed",
)
"""``fp_counters`` in order (``bytes_sealed``: of the Sealer's stream writes, ``seal_into``)."""


def library_path(environ: Mapping[str, str] = os.environ) -> Path:
    """Where scripts/build-fastpath puts the library (``$ENCFS_FASTPATH_LIBRARY`` overrides)."""
    override = environ.get("ENCFS_FASTPATH_LIBRARY")
    if override:
        return Path(override)
    return Path(sys.prefix) / "lib" / "encfs" / LIBRARY_NAME


def source_digest() -> str:
    """SHA-256 of the C source, as scripts/build-fastpath stamps the library it built."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


class NativeFile:
    """The native entry of one open backing inode (one per ``CipherFile``, for its life).

    Words shared with the library (``struct fp_file``): the change count ``seq`` (odd
    while a writer changes the file), ``queued`` deferred writes, and two reasons for
    Python to see every write (``py_setid``, ``py_error``). Not thread-safe by itself: the
    ``CipherFile`` says under which of its locks it calls each method.
    """

    __slots__ = (
        "_lib",
        "_ptr",
        "_py_error",
        "_py_setid",
        "_queued",
        "_seq",
        "_waits",
        "fds",
        "keyed",
    )

    def __init__(self, lib: ctypes.PyDLL, waits: ctypes.CDLL) -> None:
        ptr = lib.fp_file_new()
        if not ptr:
            raise MemoryError("fp_file_new failed")
        self._lib = lib
        self._waits = waits
        self._ptr: int = ptr
        self._seq = ctypes.c_uint64.from_address(ptr)
        self._queued = ctypes.c_uint64.from_address(ptr + 8)
        self._py_setid = ctypes.c_uint32.from_address(ptr + 16)
        self._py_error = ctypes.c_uint32.from_address(ptr + 20)
        self.fds: set[int] = set()
        self.keyed = -1
        """The ``NativeIO.generation`` its key was set in (keys are wiped in between)."""

    def lock(self) -> None:
        """Take the file's lock (the C mutex that native writes try): around every
        locked section of the ``CipherFile``, after its own lock. Waits, if it must, with
        the GIL released (a Python holder may need it to let go)."""
        if self._lib.fp_file_trylock(self._ptr) != 0:
            self._waits.fp_file_lock(self._ptr)

    def unlock(self) -> None:
        self._lib.fp_file_unlock(self._ptr)

    def changing(self) -> None:
        """A change of the file's content or size starts (``lock`` held): native readers
        stop serving it until ``changed``."""
        self._seq.value += 1

    def changed(self) -> None:
        self._seq.value += 1

    def set_queued(self, count: int) -> None:
        """How many deferred writes wait (under the Sealer's lock, which guards the count)."""
        self._queued.value = count

    def set_python_writes(self, setid: bool | None = None, error: bool | None = None) -> None:
        """Whether writes must go through Python: set-ID bits may need clearing
        (``setid``), a deferred write's error waits to be reported (``error``)."""
        if setid is not None:
            self._py_setid.value = setid
        if error is not None:
            self._py_error.value = error

    def set_id(self, file_id: bytes | None) -> None:
        """The file's id as it changed (None: empty); drops the old id's contexts (after
        any native read of them, waited for with the GIL released). With ``lock`` held."""
        if self._lib.fp_file_set_id(self._ptr, file_id, 0) == -_EBUSY:
            self._waits.fp_file_set_id(self._ptr, file_id, 1)
        self.keyed = -1

    def set_key(self, file_id: bytes, key_address: int) -> bool:
        """Key the entry for ``file_id`` from the per-file key at ``key_address`` (lent by
        ``VolumeKeys.lend_file_key`` from its locked arena: 32 bytes, followed on a
        ``DOUBLE`` volume by the 32 of the outer per-file key); the library keeps only
        OpenSSL contexts. False if the entry's id is another by now."""
        rc = self._lib.fp_file_set_key(self._ptr, file_id, ctypes.c_void_p(key_address))
        if rc == 0:
            return True
        if rc == -_ESTALE:
            return False
        raise OSError(-rc, "the native path could not set a key")

    def seal_into(self, file_id: bytes, first_block_no: int, plain: bytes, out: bytearray) -> bool:
        """Seal ``plain`` (whole blocks from ``first_block_no``) into ``out`` (exactly its
        sealed length) with the entry's contexts, the GIL released: for the Sealer's stream
        writes (``CipherFile.preseal``). False (``out`` unusable) if the entry is not keyed
        for ``file_id`` or the gate is shut; the caller then seals in Python."""
        buf = (ctypes.c_char * len(out)).from_buffer(out)
        rc = self._waits.fp_file_seal(
            self._ptr, file_id, first_block_no, plain, len(plain), buf, len(out)
        )
        if rc == 0:
            return True
        if rc in (-_ESTALE, -_ESHUTDOWN):
            return False
        raise OSError(-rc, "the native path could not seal")

    def map(self, fd: int) -> None:
        """Serve handle ``fd`` (an open fd of this inode) natively from now on."""
        if self._lib.fp_map_fd(fd, self._ptr) == 0:
            self.fds.add(fd)

    def unmap(self, fd: int) -> None:
        """Stop serving ``fd`` natively (before it is closed; no request of it is in flight)."""
        if fd in self.fds:
            self._lib.fp_map_fd(fd, None)
            self.fds.discard(fd)

    def free(self) -> None:
        """Unmap every fd and free the entry, its contexts cleansed (at the last close)."""
        for fd in list(self.fds):
            self.unmap(fd)
        if self._ptr:
            self._lib.fp_file_free(self._ptr)
            self._ptr = 0


_ESTALE = 116
_EBUSY = 16
_ESHUTDOWN = 108


class NativeIO:
    """The loaded library and the state of the one mount it serves (see the C file).

    Thread-safe: the library synchronises itself; ``generation`` only grows. Calls that
    never wait go through ``lib`` (a ``PyDLL``: the GIL stays held, no thread switch per
    call, which the per-file calls of every open and close would otherwise cost); the
    ones that may wait through ``waits`` (a ``CDLL`` of the same library: GIL released).
    """

    def __init__(
        self,
        lib: ctypes.PyDLL,
        waits: ctypes.CDLL,
        path: Path,
        block_size: int,
        double: bool,
        read_only: bool,
        foreign_errno: int,
    ) -> None:
        self._lib = lib
        self._waits = waits
        self.path = path
        self.generation = 0
        """Bumped by every ``wipe``: files keyed in an earlier one need their key again."""
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nfds = MAX_FDS if hard == resource.RLIM_INFINITY else max(min(hard, MAX_FDS), 1024)
        rc = lib.fp_setup(block_size, double, read_only, foreign_errno, nfds)
        if rc != 0:
            raise OSError(-rc, "fp_setup refused the mount's settings")

    def plug(self, op: str, fallback_address: int, fh_offset: int) -> int:
        """The native callback for libfuse operation ``op`` (a key of ``OPS``), handing
        what it does not serve to the callback at ``fallback_address``; ``fh_offset`` is
        where ``struct fuse_file_info`` keeps fh."""
        address = self._lib.fp_plug(OPS[op], ctypes.c_void_p(fallback_address), fh_offset)
        if not address:
            raise ValueError(f"the native path does not serve {op}")
        result: int = address
        return result

    def new_file(self) -> NativeFile:
        return NativeFile(self._lib, self._waits)

    def gate_close(self, timeout: float) -> bool:
        """Stop serving; True once no native request is in flight (False at ``timeout``)."""
        return bool(self._waits.fp_gate_close(int(timeout * 1000)))

    def gate_open(self) -> None:
        self._lib.fp_gate_open()

    def set_aliases(self, any_: bool) -> None:
        """Whether some file has other names to invalidate after a write (writes to Python)."""
        self._lib.fp_set_aliases(any_)

    def wipe(self) -> bool:
        """Free (and cleanse) every cipher context once no native request is in flight;
        False if some still were after ``WIPE_TIMEOUT_MS`` (the contexts are then kept
        and the gate stays shut, so none is used again)."""
        self.generation += 1
        return bool(self._waits.fp_wipe(WIPE_TIMEOUT_MS))

    def test_between(self, address: int | None) -> None:
        """Tests only: call the C function at ``address`` in every native read between its
        decryption and its second look at the seqlock (None: nothing)."""
        self._lib.fp_test_between(None if address is None else ctypes.c_void_p(address))

    def test_prefetch_edges(self, fd: int, cipher_off: int, cipher_len: int) -> None:
        """Tests only: the library's ``prefetch_edges``, which its block rewrites call as
        ``backing.prefetch_edges`` does Python's."""
        self._lib.fp_test_prefetch_edges(fd, cipher_off, cipher_len)

    def counters(self) -> dict[str, int]:
        """What the library served (reads, writes, bytes, probes), sealed for the Sealer
        and handed to Python."""
        out = (ctypes.c_ulong * len(_COUNTERS))()
        self._lib.fp_counters(out)
        return dict(zip(_COUNTERS, out, strict=True))


def _declare(lib: ctypes.CDLL | ctypes.PyDLL) -> None:
    vp, sz, c_int, u32 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_uint32
    for name, restype, argtypes in (
        ("fp_version", c_int, ()),
        ("fp_setup", c_int, (u32, c_int, c_int, c_int, sz)),
        ("fp_plug", vp, (c_int, vp, sz)),
        ("fp_gate_open", None, ()),
        ("fp_gate_close", c_int, (ctypes.c_long,)),
        ("fp_set_aliases", None, (c_int,)),
        ("fp_wipe", c_int, (ctypes.c_long,)),
        ("fp_counters", None, (ctypes.POINTER(ctypes.c_ulong),)),
        ("fp_test_between", None, (vp,)),
        ("fp_test_prefetch_edges", None, (c_int, ctypes.c_int64, sz)),
        ("fp_file_new", vp, ()),
        ("fp_file_set_id", c_int, (vp, ctypes.c_char_p, c_int)),
        ("fp_file_set_key", c_int, (vp, ctypes.c_char_p, vp)),
        (
            "fp_file_seal",
            c_int,
            (vp, ctypes.c_char_p, ctypes.c_uint64, ctypes.c_char_p, sz, vp, sz),
        ),
        ("fp_file_trylock", c_int, (vp,)),
        ("fp_file_lock", None, (vp,)),
        ("fp_file_unlock", None, (vp,)),
        ("fp_map_fd", c_int, (c_int, vp)),
        ("fp_file_free", None, (vp,)),
    ):
        func = getattr(lib, name)
        func.restype = restype
        func.argtypes = argtypes


@dataclass(frozen=True)
class Choice:
    """What ``load`` found: the native path, or None and why not."""

    native: NativeIO | None
    reason: str
    """For ``encfs status`` and the log: ``native (LIBRARY)``, or why Python serves all."""
    degraded: bool = False
    """The library should have been there and is not (missing, stale, broken): worth a
    warning, where a choice (``ENCFS_NATIVE=0``, a volume feature) is not."""


def load(
    block_size: int,
    features: int,
    *,
    read_only: bool,
    foreign_errno: int,
    environ: Mapping[str, str] = os.environ,
) -> Choice:
    """The native path for a mount of a volume with ``block_size`` and ``features``."""
    if environ.get("ENCFS_NATIVE", "1") == "0":
        return Choice(None, "Python: disabled (ENCFS_NATIVE=0)")
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return Choice(None, f"Python: no native path on {sys.platform}/{platform.machine()}")
    if features & ~NATIVE_FEATURES:
        unknown = features & ~NATIVE_FEATURES
        return Choice(None, f"Python: the native path does not serve volume features {unknown:#x}")
    path = library_path(environ)
    try:
        built_from = path.with_name(path.name + ".stamp").read_text().strip()
    except OSError:
        return Choice(None, f"Python: {path} is not built (scripts/install builds it)", True)
    try:
        if built_from != source_digest():
            return Choice(
                None,
                f"Python: {path} is stale, built from another fastpath.c (scripts/install)",
                True,
            )
    except OSError as exc:
        return Choice(None, f"Python: cannot read {SOURCE}: {exc.strerror}", True)
    try:
        lib, waits = ctypes.PyDLL(str(path)), ctypes.CDLL(str(path))
        _declare(lib)
        _declare(waits)
        version = lib.fp_version()
        if version != ABI_VERSION:
            return Choice(None, f"Python: {path} has ABI {version}, not {ABI_VERSION}", True)
        native = NativeIO(
            lib,
            waits,
            path,
            block_size,
            bool(features & fmt.FEATURE_DOUBLE),
            read_only,
            foreign_errno,
        )
    except (OSError, AttributeError) as exc:
        return Choice(None, f"Python: cannot load {path}: {exc}", True)
    return Choice(native, f"native ({path})")
