"""The native path (encfs/fastpath.py and the C library it loads), driven the way libfuse
drives it — its callbacks called with a ``struct fuse_file_info`` whose fh is a backing
fd — over real files written by ``CipherFile``: what it serves, what it hands back to
Python (each case of the happy path's conditions), the seqlock against every kind of
writer, keys, wipe and the gate. Through a live mount: test_fs.py."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from encfs import backing, fastpath
from encfs import format as fmt
from encfs import keys as keys_module
from encfs.cipherfile import STREAM_MIN, CipherFile, Sealer
from encfs.fastpath import NativeIO
from encfs.fs.kcache import Gate
from encfs.keys import VolumeKeys

BS = 4096
FH_OFFSET = 16  # where our fake struct fuse_file_info keeps fh
FALLBACK = -131  # what the Python side answers here: -ENOTRECOVERABLE, never a real answer

READ = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64, ctypes.c_void_p
)
WRITE = READ
GETATTR = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p)
GETXATTR = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t
)


def _load(read_only: bool = False, features: int = 0) -> NativeIO:
    choice = fastpath.load(
        BS,
        features,
        read_only=read_only,
        foreign_errno=errno.EOPNOTSUPP,
    )
    if choice.native is None:
        pytest.skip(f"the native path is not available here: {choice.reason}")
    return choice.native


@dataclass
class Lib:
    """The library's four callbacks, plugged in front of recording Python fallbacks."""

    native: NativeIO
    fallbacks: list[tuple[str, int, int]] = field(default_factory=list)
    write_fallback: Callable[[int, bytes, int], int] | None = None
    _keep: list[object] = field(default_factory=list)

    def __post_init__(self) -> None:
        def fb_read(path: bytes | None, buf: int, size: int, off: int, fi: int) -> int:
            self.fallbacks.append(("read", size, off))
            return FALLBACK

        def fb_write(path: bytes | None, buf: int, size: int, off: int, fi: int) -> int:
            self.fallbacks.append(("write", size, off))
            if self.write_fallback is not None:
                fh = struct.unpack_from("<Q", ctypes.string_at(fi, 24), FH_OFFSET)[0]
                return self.write_fallback(fh, ctypes.string_at(buf, size), off)
            return FALLBACK

        def fb_getattr(path: bytes | None, st: int, fi: int) -> int:
            self.fallbacks.append(("getattr", 0, 0))
            return FALLBACK

        def fb_getxattr(path: bytes | None, name: bytes, value: int, size: int) -> int:
            self.fallbacks.append(("getxattr", 0, 0))
            return FALLBACK

        thunks = {
            "read": READ(fb_read),
            "write": WRITE(fb_write),
            "getattr": GETATTR(fb_getattr),
            "getxattr": GETXATTR(fb_getxattr),
        }
        self._keep.append(thunks)
        plugged = {
            op: self.native.plug(op, ctypes.cast(t, ctypes.c_void_p).value or 0, FH_OFFSET)
            for op, t in thunks.items()
        }
        self._read = READ(plugged["read"])
        self._write = WRITE(plugged["write"])
        self._getattr = GETATTR(plugged["getattr"])
        self._getxattr = GETXATTR(plugged["getxattr"])

    @staticmethod
    def fi(fd: int) -> ctypes.Array[ctypes.c_char]:
        fi = (ctypes.c_char * 64)()
        struct.pack_into("<Q", fi, FH_OFFSET, fd)
        return fi

    def read(self, fd: int, off: int, size: int) -> bytes | int:
        """The bytes read natively, or what the fallback answered (``FALLBACK``)."""
        buf = (ctypes.c_char * max(size, 1))()
        fi = self.fi(fd)
        rc = self._read(None, ctypes.addressof(buf), size, off, ctypes.addressof(fi))
        return rc if rc < 0 else buf.raw[:rc]

    def write(self, fd: int, off: int, data: bytes) -> int:
        buf = ctypes.create_string_buffer(data, len(data))
        fi = self.fi(fd)
        return int(self._write(None, ctypes.addressof(buf), len(data), off, ctypes.addressof(fi)))

    def getattr(self, fd: int | None) -> os.stat_result | int:
        out = (ctypes.c_char * 256)()
        fi = None if fd is None else self.fi(fd)
        fi_address = None if fi is None else ctypes.addressof(fi)
        rc = self._getattr(b"/f", ctypes.addressof(out), fi_address)
        if rc:
            return int(rc)
        # struct stat on x86-64: dev, ino, nlink, mode, uid, gid, pad, rdev, size, ...
        dev, ino, _nlink, mode, _uid, _gid, _pad, _rdev, size = struct.unpack_from(
            "=QQQIIIiQq", out
        )
        return os.stat_result((mode, ino, dev, 0, 0, 0, size, 0, 0, 0))

    def getxattr(self, name: bytes) -> int:
        out = (ctypes.c_char * 64)()
        return int(self._getxattr(b"/f", name, ctypes.addressof(out), 64))


@dataclass
class Setup:
    lib: Lib
    keys: VolumeKeys
    volume_key: bytes
    cfile: CipherFile
    fd: int
    path: Path
    cbs: int
    """Backing bytes per block: 4096 + 28, or + 56 on a double volume (FORMAT §5.2)."""
    outer_key: bytes | None = None

    def new_outer(self) -> bytearray | None:
        """A fresh outer key if the volume is double (for a new key set), else None."""
        return None if self.outer_key is None else bytearray(os.urandom(32))


@pytest.fixture(params=["single", "double"])
def setup(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Setup]:
    """A file written by ``CipherFile`` (Python), its fd mapped natively, 8 whole blocks
    and a partial one; keyed by two Python reads. Once on a volume with one layer, once
    on a ``DOUBLE`` one (the native path seals and opens both layers)."""
    double = request.param == "double"
    native = _load(features=fmt.FEATURE_DOUBLE if double else 0)
    lib = Lib(native)
    volume_key = os.urandom(32)
    outer_key = os.urandom(32) if double else None
    keys = VolumeKeys(
        bytearray(volume_key),
        volume_id=os.urandom(16),
        block_size=BS,
        outer_key=None if outer_key is None else bytearray(outer_key),
    )
    keys.attach_native(native)
    path = tmp_path / "f"
    with _open_file(path, native, keys) as (cfile, fd):
        cfile.write(fd, 0, bytes(range(256)) * 16 * 8 + b"tail")
        _key(cfile, fd)
        cbs = keys.geometry.cipher_block_size
        yield Setup(lib, keys, volume_key, cfile, fd, path, cbs, outer_key)


@contextlib.contextmanager
def _open_file(
    path: Path, native: NativeIO, keys: VolumeKeys | None = None
) -> Iterator[tuple[CipherFile, int]]:
    """A new backing file at ``path`` as the daemon has it open: a ``CipherFile`` (of
    ``keys``, else of a fresh single-layer key) with its fd attached; closed after."""
    if keys is None:
        keys = VolumeKeys(bytearray(os.urandom(32)), volume_id=os.urandom(16), block_size=BS)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    cfile = CipherFile(keys, keys.geometry, str(path), Sealer(), native=native)
    cfile.attach_fd(fd)
    try:
        yield cfile, fd
    finally:
        cfile.forget_fd(fd)
        cfile.close()
        os.close(fd)


def _key(cfile: CipherFile, fd: int) -> None:
    """Two aligned reads served in Python: the second keys the native entry."""
    for _ in range(2):
        cfile.read_into(fd, 0, memoryview(bytearray(BS)))


def _content(s: Setup) -> bytes:
    return s.cfile.read(s.fd, 0, 1 << 20)


# --- loading --------------------------------------------------------------------------


def test_load_says_why_the_native_path_is_not_used(tmp_path: Path) -> None:
    def why(environ: dict[str, str], features: int = 0) -> tuple[bool, str, bool]:
        choice = fastpath.load(BS, features, read_only=False, foreign_errno=95, environ=environ)
        return choice.native is not None, choice.reason, choice.degraded

    real = fastpath.library_path()
    if not real.exists():
        pytest.skip("the native path is not built here")
    assert why({}) == (True, f"native ({real})", False)
    assert why({"ENCFS_NATIVE": "0"}) == (False, "Python: disabled (ENCFS_NATIVE=0)", False)
    missing = tmp_path / "nowhere.so"
    assert why({"ENCFS_FASTPATH_LIBRARY": str(missing)}) == (
        False,
        f"Python: {missing} is not built (scripts/install builds it)",
        True,
    )
    stale = tmp_path / "stale.so"
    shutil.copy(real, stale)
    (tmp_path / "stale.so.stamp").write_text("0" * 64 + "\n")
    ok, reason, degraded = why({"ENCFS_FASTPATH_LIBRARY": str(stale)})
    assert not ok and degraded and "is stale" in reason
    garbage = tmp_path / "garbage.so"
    garbage.write_bytes(b"not an ELF file")
    (tmp_path / "garbage.so.stamp").write_text(fastpath.source_digest())
    ok, reason, degraded = why({"ENCFS_FASTPATH_LIBRARY": str(garbage)})
    assert not ok and degraded and reason.startswith(f"Python: cannot load {garbage}")
    # The seam for formats the native path does not implement (blocks under two keys
    # while a rekey runs, a new content layout): any feature flag but the ones it knows
    # keeps the volume in Python.
    assert why({}, features=fmt.FEATURE_DIRID_LINKS | fmt.FEATURE_REKEYING) == (
        False,
        "Python: the native path does not serve volume features 0x4",
        False,
    )
    assert why({}, features=fmt.FEATURE_DIRID_LINKS | 1 << 9)[2] is False
    assert why({}, features=fmt.FEATURE_DIRID_LINKS)[0]
    assert why({}, features=fmt.FEATURE_DIRID_LINKS | fmt.FEATURE_DOUBLE)[0]


# --- reads ----------------------------------------------------------------------------


def test_aligned_reads_of_whole_blocks_are_served_natively(setup: Setup) -> None:
    s, content = setup, _content(setup)
    for off, size in [(0, BS), (BS, 3 * BS), (0, 8 * BS), (7 * BS, BS), (9 * BS, BS)]:
        assert s.lib.read(s.fd, off, size) == content[off : off + size], (off, size)
    assert s.lib.fallbacks == []
    counters = s.lib.native.counters()
    assert counters["reads"] == 5 and counters["bytes_read"] == 13 * BS


def test_every_other_read_goes_to_python(setup: Setup) -> None:
    s = setup
    cases = {
        "unaligned offset": (100, BS),
        "unaligned size": (0, 100),
        "reaches the short last block": (7 * BS, 2 * BS),
        "the short last block": (8 * BS, BS),
        "longer than libfuse's max_read": (0, (1 << 20) + BS),
    }
    for what, (off, size) in cases.items():
        s.lib.fallbacks.clear()
        assert s.lib.read(s.fd, off, size) == FALLBACK, what
        assert s.lib.fallbacks == [("read", size, off)], what
    other = os.open(s.path, os.O_RDONLY)  # an fd of the file that was never mapped
    try:
        assert s.lib.read(other, 0, BS) == FALLBACK
    finally:
        os.close(other)


def test_holes_and_tampered_blocks_go_to_python(setup: Setup) -> None:
    s = setup
    s.cfile.truncate(s.fd, 12 * BS)  # blocks 9..11 are a hole (block 8 padded)
    assert s.lib.read(s.fd, 10 * BS, BS) == FALLBACK
    assert s.cfile.read(s.fd, 10 * BS, BS) == bytes(BS)
    os.pwrite(s.fd, b"\x01", fmt.FILE_HEADER_LEN + 2 * s.cbs + 50)  # flip a byte of block 2
    s.lib.fallbacks.clear()
    assert s.lib.read(s.fd, 0, 4 * BS) == FALLBACK
    assert s.lib.fallbacks == [("read", 4 * BS, 0)]
    assert s.lib.read(s.fd, 3 * BS, BS) != FALLBACK  # its neighbours still authenticate


def test_a_file_being_written_or_with_queued_writes_goes_to_python(setup: Setup) -> None:
    s = setup
    nfile = s.cfile._nfile
    assert nfile is not None
    nfile.changing()  # a writer is inside
    assert s.lib.read(s.fd, 0, BS) == FALLBACK
    assert s.lib.getattr(s.fd) == FALLBACK
    nfile.changed()
    assert s.lib.read(s.fd, 0, BS) != FALLBACK
    nfile.set_queued(1)  # a deferred write waits in the Sealer
    assert s.lib.read(s.fd, 0, BS) == FALLBACK
    assert s.lib.getattr(s.fd) == FALLBACK
    assert s.lib.write(s.fd, 0, bytes(BS)) == FALLBACK
    nfile.set_queued(0)
    assert s.lib.read(s.fd, 0, BS) != FALLBACK


def test_a_file_is_served_only_once_keyed_and_only_under_its_own_id(tmp_path: Path) -> None:
    native = _load()
    lib = Lib(native)
    with _open_file(tmp_path / "f", native) as (cfile, fd):
        first = os.urandom(4 * BS)
        cfile.write(fd, 0, first)
        assert lib.read(fd, 0, BS) == FALLBACK  # the entry has no key yet
        cfile.read_into(fd, 0, memoryview(bytearray(BS)))
        assert lib.read(fd, 0, BS) == FALLBACK  # one Python read does not key it
        cfile.read_into(fd, 0, memoryview(bytearray(BS)))
        assert lib.read(fd, 0, BS) == first[:BS]  # the second does
        cfile.truncate(fd, 0)  # the file id is gone ...
        second = os.urandom(4 * BS)
        cfile.write(fd, 0, second)  # ... and a new one made
        assert lib.read(fd, 0, BS) == FALLBACK  # the old key is never used for it
        _key(cfile, fd)
        assert lib.read(fd, BS, BS) == second[BS : 2 * BS]


# --- writes ---------------------------------------------------------------------------


def test_overwrites_of_whole_blocks_are_sealed_natively(setup: Setup) -> None:
    s = setup
    before = _content(s)
    data = os.urandom(3 * BS)
    size = os.fstat(s.fd).st_size
    assert s.lib.write(s.fd, 2 * BS, data) == 3 * BS
    assert s.lib.fallbacks == []
    assert os.fstat(s.fd).st_size == size  # in place
    assert _content(s) == before[: 2 * BS] + data + before[5 * BS :]  # Python reads it back
    assert s.lib.read(s.fd, 2 * BS, 3 * BS) == data
    nonces = {os.pread(s.fd, 12, fmt.FILE_HEADER_LEN + n * s.cbs) for n in range(9)}
    assert len(nonces) == 9  # a fresh nonce per block
    assert s.lib.native.counters()["writes"] == 1


def test_stream_writes_are_sealed_natively_once_keyed(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Sealer's whole-block jobs (``CipherFile.preseal``) of a keyed file are sealed in
    C, both layers on a double volume, with fresh nonces; Python opens what it sealed.
    Not keyed for that id, or wiped: Python seals."""
    s = setup
    nfile = s.cfile._nfile
    assert nfile is not None and nfile.keyed == s.lib.native.generation
    data = os.urandom(2 * STREAM_MIN)
    python_seals: list[int] = []
    file_cipher = s.keys.file_cipher

    def counted(file_id: bytes) -> object:
        python_seals.append(1)
        return file_cipher(file_id)

    monkeypatch.setattr(s.keys, "file_cipher", counted)
    sealed = s.cfile.preseal(4 * BS, data)
    assert sealed is not None and python_seals == []
    file_id, blocks = sealed
    nblocks = len(data) // BS
    assert len(blocks) == nblocks * s.cbs
    assert len({bytes(blocks[i * s.cbs : i * s.cbs + 12]) for i in range(nblocks)}) == nblocks
    monkeypatch.undo()
    s.cfile.write_now(s.fd, 4 * BS, data, presealed=sealed)
    assert _content(s)[4 * BS :] == data  # Python opens both layers of what C sealed
    out = bytearray(len(blocks))
    assert not nfile.seal_into(os.urandom(16), 0, data, out)  # another id: not keyed for it
    with pytest.raises(OSError) as exc:  # an output of another length is refused, not overrun
        nfile.seal_into(file_id, 0, data, bytearray(len(blocks) - 1))
    assert exc.value.errno == errno.EINVAL
    s.keys.wipe()
    assert not nfile.seal_into(file_id, 0, data, out)  # no contexts after a wipe


def test_every_other_write_goes_to_python(setup: Setup) -> None:
    s = setup
    cases = {
        "unaligned": (100, BS),
        "a partial block": (0, 100),
        "into the short last block": (8 * BS, BS),
        "past the end": (9 * BS, BS),
        "a stream-sized write": (0, STREAM_MIN),
    }
    for what, (off, size) in cases.items():
        s.lib.fallbacks.clear()
        assert s.lib.write(s.fd, off, os.urandom(size)) == FALLBACK, what
        assert s.lib.fallbacks == [("write", size, off)], what
    before = _content(s)

    def report_error() -> None:
        with pytest.raises(OSError):
            s.cfile.raise_deferred()

    toggles: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "set-ID bits to clear": (lambda: setattr(s.cfile, "setid", True),
                                 lambda: setattr(s.cfile, "setid", False)),
        "a deferred error to report": (
            lambda: s.cfile.keep_deferred_error(OSError(errno.EIO, "x")), report_error),
        "other names to invalidate": (lambda: s.lib.native.set_aliases(True),
                                      lambda: s.lib.native.set_aliases(False)),
    }  # fmt: skip
    for what, (enable, disable) in toggles.items():
        enable()
        assert s.lib.write(s.fd, 0, os.urandom(BS)) == FALLBACK, what
        disable()
        assert s.lib.write(s.fd, 0, before[:BS]) == BS, what
    assert _content(s) == before


@pytest.mark.parametrize("reason", ["set-ID bits", "a deferred error"])
def test_what_python_must_see_is_known_to_an_entry_made_later(tmp_path: Path, reason: str) -> None:
    """A file's entry is made when it pays off, maybe long after the file learnt that its
    writes must go through Python: the entry starts out knowing it."""
    native = _load()
    lib = Lib(native)
    with _open_file(tmp_path / "f", native) as (cfile, fd):
        cfile.write(fd, 0, os.urandom(4 * BS))
        if reason == "set-ID bits":
            cfile.setid = True  # as OpenFiles.attach does for a set-ID file
        else:
            cfile.keep_deferred_error(OSError(errno.ENOSPC, "no space"))
        assert cfile._nfile is None
        _key(cfile, fd)
        assert cfile._nfile is not None and lib.read(fd, 0, BS) != FALLBACK  # made, keyed
        assert lib.write(fd, 0, bytes(BS)) == FALLBACK


def test_a_held_file_lock_sends_writes_to_python(setup: Setup) -> None:
    s = setup
    nfile = s.cfile._nfile
    assert nfile is not None
    nfile.lock()  # a Python reader or writer is inside
    try:
        assert s.lib.write(s.fd, 0, bytes(BS)) == FALLBACK
    finally:
        nfile.unlock()
    assert s.lib.write(s.fd, 0, bytes(BS)) == BS


def test_a_read_only_mount_writes_nothing_natively(tmp_path: Path) -> None:
    native = _load(read_only=True)
    lib = Lib(native)
    with _open_file(tmp_path / "f", native) as (cfile, fd):
        cfile.write(fd, 0, os.urandom(4 * BS))
        _key(cfile, fd)
        assert lib.read(fd, 0, BS) != FALLBACK
        assert lib.write(fd, 0, bytes(BS)) == FALLBACK


# --- getattr, getxattr ----------------------------------------------------------------


def test_getattr_by_handle_shows_the_plaintext_size(setup: Setup) -> None:
    s = setup
    for size in (8 * BS + 4, 0, 1, BS, 3 * BS + 100):
        s.cfile.truncate(s.fd, size)
        st = s.lib.getattr(s.fd)
        assert isinstance(st, os.stat_result), size
        backing = os.fstat(s.fd)
        assert (st.st_size, st.st_ino, st.st_mode, st.st_dev) == (
            size,
            backing.st_ino,
            backing.st_mode,
            0,
        )
        assert stat.S_ISREG(st.st_mode)
    s.cfile.truncate(s.fd, 3 * BS)
    os.pwrite(s.fd, b"x" * 10, os.fstat(s.fd).st_size)  # a fragment too short to be a block
    st = s.lib.getattr(s.fd)
    assert isinstance(st, os.stat_result) and st.st_size == 3 * BS == s.cfile.plain_size(s.fd)
    s.lib.fallbacks.clear()
    assert s.lib.getattr(None) == FALLBACK  # by path: Python's
    assert s.lib.fallbacks == [("getattr", 0, 0)]


def test_getxattr_answers_the_capability_probe_and_nothing_else(setup: Setup) -> None:
    s = setup
    assert s.lib.getxattr(b"security.capability") == -errno.EOPNOTSUPP
    assert s.lib.getxattr(b"trusted.x") == -errno.EOPNOTSUPP
    assert s.lib.getxattr(b"user.note") == FALLBACK
    assert s.lib.native.counters()["security_probes"] == 2
    assert s.lib.native.gate_close(1.0)
    assert s.lib.getxattr(b"security.capability") == FALLBACK  # shut: Python answers
    s.lib.native.gate_open()


# --- the seqlock against writers --------------------------------------------------------


def _uniform(data: bytes) -> bool:
    return data == data[:1] * len(data)


def _race(
    reader: Callable[[], bytes | int],
    writer: Callable[[int], object],
    seconds: float = 1.5,
    both: bool = True,
) -> tuple[int, int, int]:
    """Run ``writer(version)`` in a thread while ``reader`` reads for ``seconds`` (and,
    with ``both``, until it was both served and handed back, at most 20 s more):
    (served, handed back, mixed) — a mixed read holds blocks of two versions."""
    stop = threading.Event()

    def write_loop() -> None:
        version = 1
        while not stop.is_set():
            writer(version)
            version = version % 200 + 1

    t = threading.Thread(target=write_loop, daemon=True)
    t.start()
    served = handed = mixed = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline or (both and not (served and handed)):
            if time.monotonic() > deadline + 20:
                break
            got = reader()
            if isinstance(got, int):
                handed += 1
            else:
                served += 1
                mixed += not _uniform(got)
    finally:
        stop.set()
        t.join(10)
    return served, handed, mixed


def test_native_reads_never_return_a_mix_of_a_python_write(setup: Setup) -> None:
    """32 blocks rewritten whole by Python, again and again: a native read of them gets
    one version or goes to Python (where the file lock orders it), never blocks of two
    (each of which authenticates: only the change count tells them apart)."""
    s = setup
    s.cfile.write(s.fd, 0, bytes(32 * BS))
    _key(s.cfile, s.fd)
    served, handed, mixed = _race(
        lambda: s.lib.read(s.fd, 0, 32 * BS),
        lambda v: s.cfile.write(s.fd, 0, bytes([v]) * 32 * BS),
    )
    assert mixed == 0, f"{mixed} of {served} native reads mixed two writes"
    assert served and handed, (served, handed)  # both sides of the race were exercised


def test_native_reads_never_return_a_mix_of_a_native_write(setup: Setup) -> None:
    s = setup
    s.cfile.write(s.fd, 0, bytes(32 * BS))
    _key(s.cfile, s.fd)
    served, handed, mixed = _race(
        lambda: s.lib.read(s.fd, 0, 16 * BS),
        lambda v: [s.lib.write(s.fd, 0, bytes([v]) * 16 * BS) for _ in range(3)],
    )
    assert mixed == 0, f"{mixed} of {served} native reads mixed two writes"
    assert served and handed, (served, handed)


def test_python_reads_never_see_a_native_write_half_done(setup: Setup) -> None:
    """Python's readers do not use the change count: the file lock keeps native writes
    out while they read (a torn block would be an integrity error, EIO)."""
    s = setup
    s.cfile.write(s.fd, 0, bytes(16 * BS))
    _key(s.cfile, s.fd)
    done_natively = 0

    def write(v: int) -> None:
        nonlocal done_natively
        done_natively += s.lib.write(s.fd, 0, bytes([v]) * 16 * BS) > 0

    s.lib.write_fallback = lambda fd, data, off: s.cfile.write(fd, off, data)
    _served, _handed, mixed = _race(lambda: s.cfile.read(s.fd, 3, 16 * BS - 6), write, both=False)
    assert mixed == 0
    assert done_natively > 0


BETWEEN = ctypes.CFUNCTYPE(None)


@pytest.fixture
def between(setup: Setup) -> Iterator[Callable[[Callable[[], object] | None], None]]:
    """``between(action)``: run ``action`` once, inside the next native read, after it has
    decrypted its blocks and before it checks the seqlock again."""
    keep: list[object] = []

    def arm(action: Callable[[], object] | None) -> None:
        if action is None:
            setup.lib.native.test_between(None)
            return

        def once() -> None:
            setup.lib.native.test_between(None)
            action()

        thunk = BETWEEN(once)
        keep.append(thunk)
        setup.lib.native.test_between(ctypes.cast(thunk, ctypes.c_void_p).value)

    yield arm
    setup.lib.native.test_between(None)


@pytest.mark.parametrize(
    "writer",
    ["python write", "native write", "truncate", "fallocate", "queued deferred write"],
)
def test_a_write_that_returns_during_a_native_read_sends_it_to_python(
    setup: Setup, between: Callable[[Callable[[], object] | None], None], writer: str
) -> None:
    """A native read that already holds the old (valid) blocks when a write completes
    must not return them: it goes to Python, which reads what the write left."""
    s = setup
    old = s.cfile.read(s.fd, 0, 2 * BS)
    new = os.urandom(2 * BS)
    nfile = s.cfile._nfile
    assert nfile is not None
    actions: dict[str, Callable[[], object]] = {
        "python write": lambda: s.cfile.write(s.fd, 0, new),
        "native write": lambda: s.lib.write(s.fd, 0, new),
        "truncate": lambda: s.cfile.truncate(s.fd, BS),
        "fallocate": lambda: s.cfile.allocate(s.fd, 1, 0, BS),
        "queued deferred write": lambda: nfile.set_queued(1),
    }
    between(actions[writer])
    s.lib.fallbacks.clear()
    got = s.lib.read(s.fd, 0, 2 * BS)
    assert got == FALLBACK, f"a native read returned {'the old' if got == old else 'some'} data"
    assert s.lib.fallbacks == [("read", 2 * BS, 0)]
    nfile.set_queued(0)
    between(None)
    assert s.lib.read(s.fd, 0, 2 * BS) != FALLBACK or writer == "truncate"


def test_a_native_read_with_nothing_in_between_is_served(
    setup: Setup, between: Callable[[Callable[[], object] | None], None]
) -> None:
    s = setup
    between(lambda: s.cfile.read(s.fd, 0, BS))  # a reader changes nothing
    assert s.lib.read(s.fd, 0, 2 * BS) == _content(s)[: 2 * BS]


def test_every_change_of_a_file_moves_its_change_count(setup: Setup) -> None:
    """Each way Python changes a file's content or size runs between ``changing`` and
    ``changed``: the count is even again after it and has moved."""
    s = setup
    nfile = s.cfile._nfile
    assert nfile is not None

    def count() -> int:
        return int(nfile._seq.value)

    def rewrite_and_sync() -> None:
        s.cfile.write(s.fd, 5, b"y")
        s.cfile.sync(s.fd, True)

    changes: dict[str, Callable[[], object]] = {
        "aligned overwrite": lambda: s.cfile.write(s.fd, 0, bytes(BS)),
        "partial overwrite": lambda: s.cfile.write(s.fd, 10, b"x"),
        "append": lambda: s.cfile.write(s.fd, os.fstat(s.fd).st_size, b"more"),
        "truncate down": lambda: s.cfile.truncate(s.fd, 5 * BS + 1),
        "truncate up": lambda: s.cfile.truncate(s.fd, 20 * BS),
        "fallocate": lambda: s.cfile.allocate(s.fd, 0, 0, 30 * BS),
        "truncate to 0": lambda: s.cfile.truncate(s.fd, 0),
        "first write of an empty file": lambda: s.cfile.write(s.fd, 0, os.urandom(3 * BS)),
        "fsync after a rewrite": rewrite_and_sync,
    }
    for what, change in changes.items():
        before = count()
        change()
        after = count()
        assert after % 2 == 0 and after > before, (what, before, after)


def test_deferred_writes_count_as_writes_until_written(setup: Setup) -> None:
    s = setup
    nfile = s.cfile._nfile
    assert nfile is not None
    chunk = os.urandom(STREAM_MIN)
    s.cfile.write(s.fd, 0, chunk)  # starts a stream (written at once)
    s.cfile.lock.acquire_write()  # hold the Sealer back
    try:
        s.cfile.write(s.fd, len(chunk), chunk)  # continues it: queued
        assert s.cfile.pending == 1 and nfile._queued.value == 1
        assert s.lib.read(s.fd, 0, BS) == FALLBACK
    finally:
        s.cfile.lock.release_write()
    s.cfile.drain()
    assert nfile._queued.value == 0
    assert s.lib.read(s.fd, len(chunk), BS) == chunk[:BS]  # written, and served again


# --- keys, wipe, gate -------------------------------------------------------------------


def test_wipe_drops_every_context_and_keying_again_brings_them_back(setup: Setup) -> None:
    s = setup
    content = _content(s)
    assert s.lib.read(s.fd, 0, BS) == content[:BS]
    s.keys.wipe()  # the native path's contexts too (attach_native)
    assert s.lib.read(s.fd, 0, BS) == FALLBACK
    assert s.lib.write(s.fd, 0, content[:BS]) == FALLBACK
    outer = None if s.outer_key is None else bytearray(s.outer_key)
    s.keys.load(bytearray(s.volume_key), outer)  # resume: the next Python read keys it again
    s.cfile.read_into(s.fd, 0, memoryview(bytearray(BS)))
    assert s.lib.read(s.fd, 0, BS) == content[:BS]


def test_a_rekey_never_lets_the_native_path_seal_under_the_retiring_key(setup: Setup) -> None:
    """``encfs rekey`` replaces the keys (``VolumeKeys.retire``): contexts made from the
    retiring set are dropped at once, so no block is sealed under it again; the next
    contexts come from the new set, and what they seal opens once the old set is gone."""
    s = setup
    content = bytearray(_content(s))
    assert s.lib.write(s.fd, 0, bytes(content[:BS])) == BS  # keyed: native
    new_keys = VolumeKeys(
        bytearray(os.urandom(32)),
        volume_id=s.keys._volume_id,
        block_size=BS,
        outer_key=s.new_outer(),
    )
    s.keys.retire(new_keys)
    data = os.urandom(BS)
    s.lib.write_fallback = lambda fd, buf, off: s.cfile.write(fd, off, buf)
    assert s.lib.write(s.fd, BS, data) == BS  # by Python: the native contexts are gone
    assert s.lib.fallbacks[-1] == ("write", BS, BS)
    content[BS : 2 * BS] = data
    _key(s.cfile, s.fd)  # keyed again, from the new set
    data = os.urandom(BS)
    fallbacks = len(s.lib.fallbacks)
    assert s.lib.write(s.fd, 2 * BS, data) == BS
    assert len(s.lib.fallbacks) == fallbacks  # natively
    content[2 * BS : 3 * BS] = data
    s.cfile.rekey(s.fd)
    s.keys.end_rekey()  # the retiring key is gone: everything must open under the new one
    assert _content(s) == bytes(content)


def test_the_gate_shuts_native_requests_out(setup: Setup) -> None:
    s = setup
    gate = Gate(s.lib.native)
    assert gate.enter()
    gate.leave()
    assert gate.close(1.0)
    assert s.lib.read(s.fd, 0, BS) == FALLBACK
    assert s.lib.write(s.fd, 0, bytes(BS)) == FALLBACK
    assert s.lib.getattr(s.fd) == FALLBACK
    gate.reopen()
    assert s.lib.read(s.fd, 0, BS) != FALLBACK


def test_the_key_is_lent_from_the_locked_arena_and_zeroed_after(setup: Setup) -> None:
    """32 bytes, the per-file key; on a double volume 64: then the outer per-file key.
    Both are what the Python ciphers derive (the native path's blocks open in Python:
    the tests above), distinct, and zero again once lent."""
    s = setup
    seen: list[bytes] = []
    file_id = os.urandom(16)

    def use(address: int) -> int:
        arena = s.keys._arena
        assert arena.address <= address and address + 64 <= arena.address + len(arena.view)
        seen.append(ctypes.string_at(address, 64))
        return 7

    assert s.keys.lend_file_key(file_id, use) == 7
    inner, outer = seen[0][:32], seen[0][32:]
    assert inner != bytes(32)
    assert (outer != bytes(32)) == (s.outer_key is not None) and outer != inner
    scratch = keys_module._SLOTS["scratch"][0]
    assert keys_module._SLOTS["scratch_outer"][0] == scratch + 32
    assert ctypes.string_at(s.keys._arena.address + scratch, 64) == bytes(64)


PAGE = os.sysconf("SC_PAGESIZE")


def _resident_pages(fd: int, npages: int) -> set[int]:
    """Which of the file's first ``npages`` pages are in the page cache (mincore(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long)  # fmt: skip
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    length = npages * PAGE
    address = libc.mmap(None, length, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
    assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    try:
        vec = ctypes.create_string_buffer(npages)
        assert libc.mincore(address, length, vec) == 0, os.strerror(ctypes.get_errno())
        return {i for i in range(npages) if vec.raw[i] & 1}
    finally:
        libc.munmap(address, length)


@pytest.mark.parametrize("side", ["python", "native"])
@pytest.mark.parametrize(
    ("cipher_off", "cipher_len", "pages"),
    [
        (PAGE + 16, 4124, {1, 2}),  # a block straddling two pages: both edges, one request
        (PAGE, PAGE + 28, {2}),  # starts on a page: only the tail is partial
        (PAGE - 28, PAGE + 28, {0}),  # ends on a page: only the head
        (PAGE, 2 * PAGE, set()),  # whole pages: nothing to read
        (100, 5 * PAGE, {0, 5}),  # the pages in between are overwritten whole: not read
        (100, 200, {0}),  # inside one page
    ],
)
def test_prefetch_edges_reads_exactly_the_pages_a_rewrite_covers_in_part(
    tmp_path: Path, side: str, cipher_off: int, cipher_len: int, pages: set[int]
) -> None:
    """Before a rewrite of backing bytes, both the door (backing.prefetch_edges, Python's
    block rewrites) and the library (its native rewrites) start reading the pages the
    write covers only in part, which the filesystem would otherwise read one after the
    other inside the pwrite; no other page (that would be a wasted disk read)."""
    prefetch = backing.prefetch_edges if side == "python" else _load().test_prefetch_edges
    path = tmp_path / "backing"
    path.write_bytes(os.urandom(8 * PAGE))
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if _resident_pages(fd, 8):
            pytest.skip("this filesystem keeps clean pages after POSIX_FADV_DONTNEED")
        prefetch(fd, cipher_off, cipher_len)
        deadline = time.monotonic() + 5
        while not pages <= _resident_pages(fd, 8) and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)  # let a wrongly asked-for page arrive too
        assert _resident_pages(fd, 8) == pages
    finally:
        os.close(fd)
