"""The key owner: holds the volume key(s) and every key derived from them, in locked memory.

Only this module touches key bytes. Keys live in one anonymous mapping that is mlock'ed
(never swapped) and marked MADV_DONTDUMP (never in a core dump); ``wipe()`` zeroes it and
drops every cipher object built from it (their OpenSSL contexts are cleansed when freed).
Derivation (docs/FORMAT.md §3), all HKDF-SHA256 with the volume id as salt:

    content = HKDF(volume_key, salt=volume_id, info="encfs/v1/content")   32 bytes
    names   = HKDF(volume_key, salt=volume_id, info="encfs/v1/names")     64 bytes (AES-SIV)
    meta    = HKDF(volume_key, salt=volume_id, info="encfs/v1/meta")      32 bytes
    header  = HKDF(volume_key, salt=volume_id, info="encfs/v1/header")    32 bytes
    file    = HKDF(content, salt=none, info="encfs/v1/file" || file_id)   32 bytes
    check   = HKDF(volume_key, salt=volume_id, info="encfs/v1/key-check") 16 bytes

A double-encrypted volume (``FEATURE_DOUBLE``, §3.1) has a second, independent volume key,
the *outer* key (key slot 1). Content is as above from the first key, plus an outer layer;
names, metadata and the header tag are keyed by both keys together:

    outer content = HKDF(outer_key, salt=volume_id, info="encfs/v1/outer-content")    32
    outer file    = HKDF(outer content, salt=none, info="encfs/v1/outer-file" || id)   32
    names         = HKDF(volume_key || outer_key, salt=volume_id, info="encfs/v1/double/names")
    meta, header  = the same with ".../double/meta", ".../double/header"
    outer check   = HKDF(outer_key, salt=volume_id, info="encfs/v1/outer-key-check")   16

The *check values* are not keys: they are what the host remembers about a volume it mounts
(``encfs.pins``) and what the watcher compares each fresh unwrap with, so that another
volume key in either slot (a substituted header) is told apart without keeping the key
itself. HKDF is one-way and the labels are their own, so a value reveals nothing about the
volume key or its subkeys.

``LockedSecret`` holds the other secret the daemon keeps for its whole life, the host's vault
token, in locked memory of its own, zeroed on ``close()``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

from encfs import backing, crypto
from encfs import format as fmt
from encfs.errors import HeaderAuthError, VolumeSuspended

log = logging.getLogger(__name__)

_SLOTS = {
    "volume": (0, 32),
    "outer": (32, 32),  # right after "volume": the two together are the double IKM
    "content": (64, 32),
    "outer_content": (96, 32),
    "names": (128, 64),
    "meta": (192, 32),
    "header": (224, 32),
    "scratch": (256, 32),
    "scratch_outer": (288, 32),
}
_ARENA_SIZE = mmap.PAGESIZE
CHECK_VALUE_LEN = 16
_CHECK_INFO = (b"encfs/v1/key-check", b"encfs/v1/outer-key-check")
"""The check value label of the key in slot 0 and of the outer key in slot 1."""


def key_check_value(volume_key: bytearray | memoryview, volume_id: bytes, slot: int = 0) -> bytes:
    """The check value of the plaintext volume key of key slot ``slot`` (0: the volume key,
    1: the outer key of a double volume; see the module docstring); the caller still owns
    and wipes ``volume_key``."""
    out = bytearray(CHECK_VALUE_LEN)
    crypto.hkdf_into(volume_key, salt=volume_id, info=_CHECK_INFO[slot], out=out)
    return bytes(out)


_FILE_CIPHER_CACHE_MAX = 4096
T = TypeVar("T")


@dataclass(frozen=True)
class MemoryLockState:
    """Whether the key arena is really locked and excluded from core dumps."""

    mlocked: bool
    dontdump: bool
    detail: str = ""


class LockedArena:
    """One page of anonymous memory, mlock'ed and MADV_DONTDUMP where the OS allows.

    Failure to lock does not stop encfs (RLIMIT_MEMLOCK may forbid it); ``state`` says so.
    """

    def __init__(self, size: int = _ARENA_SIZE) -> None:
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self._map)
        detail = []
        dontdump = False
        try:
            self._map.madvise(mmap.MADV_DONTDUMP)
            dontdump = True
        except (AttributeError, OSError) as exc:
            detail.append(f"madvise(MADV_DONTDUMP) failed: {exc}")
        mlocked = False
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self.address = addr
        """Where the arena starts, for handing a key to native code by pointer."""
        if backing.LIBC.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(size)) == 0:
            mlocked = True
        else:
            err = ctypes.get_errno()
            detail.append(f"mlock failed (errno {err}); raise LimitMEMLOCK / ulimit -l")
        self.state = MemoryLockState(mlocked=mlocked, dontdump=dontdump, detail="; ".join(detail))

    def zero(self) -> None:
        self.view[:] = bytes(len(self.view))

    def close(self) -> None:
        self.zero()
        self.view.release()
        self._map.close()


class NativeKeyed(Protocol):
    """Native code that holds cipher contexts made from keys lent by ``lend_file_key``
    (``fastpath.NativeReads``): wiped with the keys."""

    def wipe(self) -> bool:
        """Free every context; False if native reads kept it from doing so in time."""
        ...


class VolumeKeys:
    """Derived keys and cipher objects for one unlocked volume.

    Built from the plaintext volume key, and for a double-encrypted volume its outer key
    (both copied into the arena; the caller wipes its own copies). Thread-safe. After
    ``wipe()`` every method raises ``VolumeSuspended`` until ``load()`` brings the keys
    back (resume after a suspension).
    """

    def __init__(
        self,
        volume_key: bytearray | memoryview,
        *,
        volume_id: bytes,
        block_size: int,
        outer_key: bytearray | memoryview | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._crypto_gate = threading.Lock()
        self._arena = LockedArena()
        self._block_size = block_size
        self._volume_id = volume_id
        self.double = outer_key is not None
        """Whether this is a double-encrypted volume (two volume keys, two layers)."""
        self.geometry = fmt.Geometry.of(block_size, fmt.FEATURE_DOUBLE if self.double else 0)
        """The plain<->cipher arithmetic of this volume's content blocks."""
        self._file_ciphers: dict[bytes, crypto.BlockCipher] = {}
        self._names: crypto.NameCipher | None = None
        self._meta: crypto.MetaCipher | None = None
        self._native: NativeKeyed | None = None
        self._wiped = True
        self._retiring: VolumeKeys | None = None
        """The keys being replaced while the volume is re-keyed (``retire``), else None."""
        self._rekeying: _Rekeying | None = None
        try:
            self.load(volume_key, outer_key)
        except BaseException:
            self._arena.close()
            raise

    def load(
        self, volume_key: bytearray | memoryview, outer_key: bytearray | memoryview | None = None
    ) -> None:
        """(Re)load from the plaintext volume key(s) (copied; the caller wipes its copies):
        derive every subkey into the arena. Used at unlock and to resume after ``wipe``.
        ``outer_key`` is given exactly for a double volume (``ValueError`` otherwise).
        The caller checks the header tag (``verify_header``) before serving."""
        if len(volume_key) != fmt.VOLUME_KEY_LEN or (
            outer_key is not None and len(outer_key) != fmt.VOLUME_KEY_LEN
        ):
            raise ValueError("volume key must be 32 bytes")
        if (outer_key is not None) != self.double:
            raise ValueError("a double volume has an outer key, a single one none")
        with self._lock:
            self._slot("volume")[:] = volume_key
            vol = self._slot("volume")
            salt = self._volume_id
            crypto.hkdf_into(vol, salt=salt, info=b"encfs/v1/content", out=self._slot("content"))
            if outer_key is None:
                ikm, prefix = vol, b"encfs/v1/"
            else:
                self._slot("outer")[:] = outer_key
                crypto.hkdf_into(
                    self._slot("outer"),
                    salt=salt,
                    info=b"encfs/v1/outer-content",
                    out=self._slot("outer_content"),
                )
                # volume key || outer key: the two slots lie side by side in the arena.
                ikm, prefix = self._arena.view[0 : 2 * fmt.VOLUME_KEY_LEN], b"encfs/v1/double/"
            for purpose in ("names", "meta", "header"):
                crypto.hkdf_into(
                    ikm, salt=salt, info=prefix + purpose.encode(), out=self._slot(purpose)
                )
            self._names = crypto.NameCipher(self._slot("names"))
            self._meta = crypto.MetaCipher(self._slot("meta"))
            self._wiped = False
            retiring = self._retiring
            if retiring is not None and not retiring._wiped:
                self._rekeying = _Rekeying(self, retiring)

    def __repr__(self) -> str:
        return f"<VolumeKeys {'wiped' if self._wiped else 'loaded'}>"

    def _slot(self, name: str) -> memoryview:
        off, length = _SLOTS[name]
        return self._arena.view[off : off + length]

    @property
    def memory_lock(self) -> MemoryLockState:
        return self._arena.state

    @property
    def wiped(self) -> bool:
        return self._wiped

    def _check(self) -> None:
        if self._wiped:
            raise VolumeSuspended("volume keys are wiped")

    @property
    def names(self) -> crypto.NameCipher | crypto.RekeyingNameCipher:
        """Encrypts names; while re-keyed (``retire``) it also decrypts the retiring key's."""
        rekeying = self._rekeying
        if rekeying is not None:
            return rekeying.names
        names = self._names
        if names is None:
            raise VolumeSuspended("volume keys are wiped")
        return names

    @property
    def meta(self) -> crypto.MetaCipher | crypto.RekeyingMetaCipher:
        """Seals metadata; while re-keyed it also opens what the retiring key sealed."""
        rekeying = self._rekeying
        if rekeying is not None:
            return rekeying.meta
        meta = self._meta
        if meta is None:
            raise VolumeSuspended("volume keys are wiped")
        return meta

    def names_own(self) -> crypto.NameCipher:
        """The name cipher of this object's own (newest) key only; takes no lock."""
        names = self._names
        if names is None:
            raise VolumeSuspended("volume keys are wiped")
        return names

    def meta_own(self) -> crypto.MetaCipher:
        """The metadata cipher of this object's own (newest) key only; takes no lock."""
        meta = self._meta
        if meta is None:
            raise VolumeSuspended("volume keys are wiped")
        return meta

    @property
    def retiring(self) -> VolumeKeys | None:
        """The keys being replaced while a rekey runs (``retire``), else None."""
        return self._retiring

    def file_cipher(self, file_id: bytes) -> crypto.FileCipher:
        """The block cipher for ``file_id`` (derived once, then cached until wipe); while
        re-keyed, one that opens blocks under either key and seals under the new one."""
        rekeying = self._rekeying
        if rekeying is not None:
            return rekeying.file_cipher(self, file_id)
        return self.own_file_cipher(file_id)

    def own_file_cipher(self, file_id: bytes) -> crypto.BlockCipher:
        """The block cipher of ``file_id`` under this object's own (newest) key only."""
        cipher = self._file_ciphers.get(file_id)
        if cipher is not None:
            return cipher
        with self._lock, self._file_keys(file_id) as (key, outer):
            cipher = crypto.BlockCipher(
                key, file_id, self._block_size, self._crypto_gate, outer_key=outer
            )
            if len(self._file_ciphers) >= _FILE_CIPHER_CACHE_MAX:
                self._file_ciphers.clear()
            self._file_ciphers[file_id] = cipher
            return cipher

    def attach_native(self, native: NativeKeyed) -> None:
        """Wipe ``native``'s contexts with the keys from now on (and when a rekey
        replaces the keys they were made from: ``retire``)."""
        self._native = native

    def _wipe_native(self) -> None:
        """Drop the native path's contexts: the keys they were made from are going (caller
        holds ``_lock``; the native path waits for its requests in flight)."""
        if self._native is not None and not self._native.wipe():
            log.error("native requests still in flight: their cipher contexts are kept")

    def lend_file_key(self, file_id: bytes, use: Callable[[int], T]) -> T:
        """Derive ``file_id``'s key into the locked arena, call ``use`` with its address
        (32 bytes, followed on a double volume by the 32 of its outer per-file key; valid
        only during the call: native code makes its cipher contexts from them and keeps no
        copy), zero them, and return what ``use`` returned. No Python object ever holds a
        key. Raises ``VolumeSuspended`` when wiped."""
        with self._lock, self._file_keys(file_id):
            return use(self._arena.address + _SLOTS["scratch"][0])

    @contextlib.contextmanager
    def _file_keys(self, file_id: bytes) -> Iterator[tuple[memoryview, memoryview | None]]:
        """``file_id``'s per-file key, and on a double volume its outer per-file key,
        derived into the arena's scratch slots (adjacent: ``lend_file_key`` lends both
        by one address) for the ``with`` block, zeroed after it. Caller holds ``_lock``.
        Raises ``VolumeSuspended`` when wiped."""
        self._check()
        key, outer = self._slot("scratch"), self._slot("scratch_outer")
        try:
            crypto.hkdf_into(
                self._slot("content"), salt=None, info=b"encfs/v1/file" + file_id, out=key
            )
            if self.double:
                crypto.hkdf_into(
                    self._slot("outer_content"),
                    salt=None,
                    info=b"encfs/v1/outer-file" + file_id,
                    out=outer,
                )
            yield key, outer if self.double else None
        finally:
            key[:] = bytes(len(key))
            outer[:] = bytes(len(outer))

    def check_value(self) -> bytes:
        """The volume key's check value (module docstring); never the key."""
        return self.check_values()[0]

    def check_values(self) -> tuple[bytes, ...]:
        """The check value of each volume key, in key slot order (one, or two for a double
        volume); never a key."""
        with self._lock:
            self._check()
            values = [key_check_value(self._slot("volume"), self._volume_id)]
            if self.double:
                values.append(key_check_value(self._slot("outer"), self._volume_id, slot=1))
            return tuple(values)

    def header_tag(self, body: bytes) -> bytes:
        with self._lock:
            self._check()
            return crypto.header_tag(self._slot("header"), body)

    def header_tags(self, body: bytes) -> bytes:
        """The tag(s) of a header ``body`` written now: this key's, then while a rekey is
        under way the retiring key's (FORMAT.md §2.5: the old key vouches for the new)."""
        retiring = self._retiring
        return self.header_tag(body) + (retiring.header_tag(body) if retiring else b"")

    def verify_header(self, body: bytes, tag: bytes) -> None:
        """Raises ``HeaderAuthError`` unless ``tag`` authenticates ``body`` under this key
        (and, for a header written during a rekey, its second tag under the retiring key)."""
        n = fmt.HEADER_TAG_LEN
        retiring = self._retiring
        ok = crypto.tags_equal(self.header_tag(body), tag[:n])
        if len(tag) > n:
            ok = (
                ok
                and retiring is not None
                and crypto.tags_equal(retiring.header_tag(body), tag[n:])
            )
        if not ok:
            raise HeaderAuthError(
                "volume header tag mismatch: the header was modified or does not belong "
                "to this volume key"
            )

    def wipe(self) -> None:
        """Zero every key byte and drop every cipher object, the retiring keys' too (they
        stay attached: ``load_retiring`` brings them back on resume) and the native path's
        contexts (it waits for native requests in flight first). Idempotent."""
        with self._lock:
            self._wiped = True
            self._rekeying = None
            self._wipe_native()
            self._file_ciphers.clear()
            self._names = None
            self._meta = None
            self._arena.zero()
            retiring = self._retiring
        if retiring is not None:
            retiring.wipe()

    def close(self) -> None:
        self.wipe()
        with self._lock:
            retiring, self._retiring = self._retiring, None
            self._arena.close()
        if retiring is not None:
            retiring.close()

    # --- re-keying (``encfs rekey``) --------------------------------------------------------

    def retire(self, replacement: VolumeKeys) -> None:
        """Start a rekey: from now on this object seals under ``replacement``'s keys and
        keeps its own as the retiring set (``retiring``), which opens what they sealed
        until ``end_rekey``. ``replacement`` is consumed: its key material moves in here
        and the object itself becomes the retiring set (the caller must not close it).
        Raises ``ValueError`` if a rekey is already under way or either set is wiped."""
        if replacement is self or replacement._retiring is not None:
            raise ValueError("the replacement keys must be a fresh key set")
        with self._lock, replacement._lock:
            if self._retiring is not None:
                raise ValueError("a rekey is already under way")
            if self._wiped or replacement._wiped:
                raise VolumeSuspended("volume keys are wiped")
            if (
                replacement._block_size != self._block_size
                or replacement._volume_id != self._volume_id
                or replacement.double != self.double
            ):
                raise ValueError("the replacement keys belong to another volume")
            for attr in _KEY_STATE:
                mine = getattr(self, attr)
                setattr(self, attr, getattr(replacement, attr))
                setattr(replacement, attr, mine)
            self._retiring = replacement
            self._rekeying = _Rekeying(self, replacement)
            # Native contexts hold per-file keys of the retiring set: never seal with them
            # again (they are keyed anew, from the new set, as files are used).
            self._wipe_native()

    def load_retiring(
        self, volume_key: bytearray | memoryview, outer_key: bytearray | memoryview | None = None
    ) -> None:
        """Attach (or, after a wipe, reload) the retiring key(s) of a volume whose rekey is
        under way (its header names both key sets; ``outer_key`` exactly for a double
        volume); the caller wipes its copies."""
        retiring = self._retiring
        if retiring is None:
            retiring = VolumeKeys(
                volume_key,
                volume_id=self._volume_id,
                block_size=self._block_size,
                outer_key=outer_key,
            )
            with self._lock:
                self._retiring = retiring
        else:
            retiring.load(volume_key, outer_key)
        with self._lock:
            if not self._wiped:
                self._rekeying = _Rekeying(self, retiring)

    def end_rekey(self) -> None:
        """The rekey is done: wipe and drop the retiring keys. Idempotent."""
        with self._lock:
            retiring, self._retiring = self._retiring, None
            self._rekeying = None
        if retiring is not None:
            retiring.close()


_KEY_STATE = ("_arena", "_file_ciphers", "_names", "_meta")
"""What ``VolumeKeys.retire`` moves between two key sets of one volume."""


class _Rekeying:
    """The ciphers of a volume being re-keyed: each seals under the new keys and opens
    under either (``crypto.Rekeying*``). Built once per (re)load; file ciphers cached."""

    __slots__ = ("_cache", "_cipher_block_size", "meta", "names", "retiring")

    def __init__(self, current: VolumeKeys, retiring: VolumeKeys) -> None:
        self.retiring = retiring
        self.names = crypto.RekeyingNameCipher(current.names_own(), retiring.names_own())
        self.meta = crypto.RekeyingMetaCipher(current.meta_own(), retiring.meta_own())
        self._cipher_block_size = current.geometry.cipher_block_size
        self._cache: dict[bytes, crypto.RekeyingBlockCipher] = {}

    def file_cipher(self, current: VolumeKeys, file_id: bytes) -> crypto.RekeyingBlockCipher:
        cipher = self._cache.get(file_id)
        if cipher is None:
            cipher = crypto.RekeyingBlockCipher(
                current.own_file_cipher(file_id),
                self.retiring.own_file_cipher(file_id),
                self._cipher_block_size,
            )
            if len(self._cache) >= _FILE_CIPHER_CACHE_MAX:
                self._cache.clear()
            self._cache[file_id] = cipher
        return cipher


class LockedSecret:
    """A secret of up to a page (the host's vault token) in its own locked arena.

    Built by copying from a buffer the caller then wipes. ``view()`` lends the bytes for the
    length of one request; ``close()`` zeroes them. No ``str`` copy is ever made here: the
    caller builds what it sends into a ``bytearray`` it zeroes (``encfs.vault.transit``).
    """

    def __init__(self, source: bytes | bytearray | memoryview) -> None:
        data = memoryview(source)
        if not 0 < len(data) <= _ARENA_SIZE:
            raise ValueError("a locked secret holds 1 byte to one page")
        self._lock = threading.Lock()
        self._arena = LockedArena()
        self._len = len(data)
        self._arena.view[: self._len] = data
        self._closed = False

    def __repr__(self) -> str:
        return "<LockedSecret>"

    def __len__(self) -> int:
        return self._len

    @property
    def memory_lock(self) -> MemoryLockState:
        return self._arena.state

    def view(self) -> memoryview:
        """The secret's bytes, valid until ``close()``; do not keep copies."""
        with self._lock:
            if self._closed:
                raise VolumeSuspended("secret is wiped")
            return self._arena.view[: self._len]

    def within(self, text: bytes | bytearray, start: int = 0) -> int:
        """Where the secret occurs in ``text`` from ``start`` on (-1 if it does not), found
        without a copy of either: to blank it in a vault answer before it is parsed."""
        with self._lock:
            if self._closed:
                return -1
            with self._arena.view[: self._len] as view:
                return text.find(view, start)

    def blank_in(self, buf: bytearray) -> None:
        """Overwrite every occurrence of the secret in ``buf`` with ``*`` (same length)."""
        i = self.within(buf)
        while i >= 0:
            buf[i : i + self._len] = b"*" * self._len
            i = self.within(buf, i + self._len)

    def close(self) -> None:
        """Zero and release; idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._arena.zero()
                with contextlib.suppress(BufferError):  # a view still lent out: zeroed
                    self._arena.close()
