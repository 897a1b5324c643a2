"""On-disk format v1: byte layouts and all plain<->cipher arithmetic. Pure: no I/O, no crypto.

This module mirrors docs/FORMAT.md; the two change together or not at all, and a change to
any constant here is a format change (tests/vectors pin them). Naming rule: ``plain_*`` are
offsets/sizes in the plaintext the user sees, ``cipher_*`` in the backing file on disk.
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace

# --- volume ----------------------------------------------------------------------------------

VOLUME_HEADER_NAME = "encfs.volume"
"""File in the cipher dir root holding the volume header."""
VOLUME_HEADER_TMP = "encfs.volume.tmp"
"""Temporary name used while a new header is written (then renamed over the old one)."""
VOLUME_HEADER_PREV = "encfs.volume.prev"
"""The previous header, kept until its replacement is durable."""
EPHEMERAL_MARKER_NAME = "encfs.ephemeral"
"""Marks a cipher dir as an ephemeral (crypto-erased) volume: plain text, no key, no header."""
LOCK_NAME = "encfs.lock"
"""Lock file in the cipher dir root: a mounting daemon (or ``fsck --repair``) holds an
exclusive ``flock`` on it for its whole life; its content names the holder (pid and
mountpoint, nothing secret). Not part of the volume: it may be missing or stale."""
UNDO_DIR_NAME = "encfs.undo"
"""Directory in the cipher dir root holding the undo records of in-place block rewrites
(§10b): one file per open file being rewritten, named by its file id. Not part of the
volume: a clean unmount leaves it empty; ``fsck --repair`` uses and then removes leftovers."""
REKEY_TMP_NAME = "encfs.rekey.tmp"
"""A symlink ``encfs rekey`` makes aside, in the directory of the one it re-seals, before
renaming it over that one (§2.5); a crash may leave it, and the next rekey removes it."""
ROOT_FILES = (
    VOLUME_HEADER_NAME,
    VOLUME_HEADER_TMP,
    VOLUME_HEADER_PREV,
    EPHEMERAL_MARKER_NAME,
    LOCK_NAME,
    UNDO_DIR_NAME,
)
"""Names in the cipher dir root that are not entries of the volume's root directory."""

VOLUME_MAGIC = b"ENCFSVOL"
FORMAT_VERSION = 1
VOLUME_KEY_LEN = 32
VOLUME_ID_LEN = 16
HEADER_TAG_LEN = 32  # HMAC-SHA256

CIPHER_AES256_GCM = 1
CIPHER_NAMES = {CIPHER_AES256_GCM: "AES-256-GCM"}
OUTER_CIPHER_CHACHA20_POLY1305 = 2
OUTER_CIPHER_NAMES = {OUTER_CIPHER_CHACHA20_POLY1305: "ChaCha20-Poly1305"}
"""Outer content ciphers of a ``FEATURE_DOUBLE`` volume (header byte 15, §2.1)."""

FEATURE_DIRID_LINKS = 1 << 0
"""Directory ids are symbolic links whose target is the id in base64url (§6.1), not files."""
FEATURE_DOUBLE = 1 << 1
"""Double encryption (§5.2): a second, independent volume key in key slot 1, wrapped by a
KEK of its own; every content block is sealed again with the outer cipher (byte 15)."""
FEATURE_REKEYING = 1 << 2
"""A rekey (``encfs rekey``) is under way (§2.5): the header also holds the retiring volume
keys' slots and a second tag made with them; entries are sealed under either key set."""
KNOWN_FEATURE_FLAGS = FEATURE_DIRID_LINKS | FEATURE_DOUBLE | FEATURE_REKEYING
"""Feature flags this build understands; any other set bit is refused at mount."""
NEW_VOLUME_FEATURES = FEATURE_DIRID_LINKS
"""Feature flags ``encfs init`` sets on a new volume (``init --double`` adds ``DOUBLE``)."""
EPHEMERAL_FEATURES = NEW_VOLUME_FEATURES
"""Features of an ephemeral volume (it has no header; nothing older ever reads one)."""
FEATURE_NAMES = {
    FEATURE_DIRID_LINKS: "dirid-links",
    FEATURE_DOUBLE: "double",
    FEATURE_REKEYING: "rekeying",
}

DEFAULT_BLOCK_SIZE = 4096
MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 65536

MAX_URL_LEN = 2048
MAX_WRAPPED_KEY_LEN = 4096

# magic(8) version(u16) flags(u32) cipher(u8) outer_cipher(u8, "reserved" without DOUBLE)
# block_size(u32) volume_id(16)
_FIXED = struct.Struct(">8sHIBBI16s")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")

# --- files -----------------------------------------------------------------------------------

FILE_HEADER_VERSION = 1
FILE_ID_LEN = 16
FILE_HEADER_LEN = 2 + FILE_ID_LEN  # u16 version + file id
_FILE_HEADER = struct.Struct(">H16s")

NONCE_LEN = 12
TAG_LEN = 16
BLOCK_OVERHEAD = NONCE_LEN + TAG_LEN
"""What one AEAD layer adds: to a content block (§5), a symlink target (§8), an xattr value."""
DOUBLE_BLOCK_OVERHEAD = 2 * BLOCK_OVERHEAD
"""What a content block of a ``FEATURE_DOUBLE`` volume carries besides its plaintext (§5.2)."""

_BLOCK_AD = struct.Struct(">16sQ")

# --- names -----------------------------------------------------------------------------------

DIRID_NAME = ".encfs.dirid"
"""Entry in every backing directory holding that directory's 16-byte id: a file, or (with
``FEATURE_DIRID_LINKS``) a symbolic link whose target is the id in base64url."""
DIRID_LEN = 16
DIRID_LINK_LEN = 22
"""Length of a directory id link's target (16 bytes in unpadded base64url)."""
LONGNAME_PREFIX = "encfs.ln."
LONGNAME_SUFFIX = ".name"
MAX_BACKING_NAME = 255
"""Encrypted names longer than this are stored under a hashed long name."""
MAX_PLAIN_NAME = 255
NAME_PAD = 16
MAX_SYMLINK_TARGET = 3000
"""Longest plaintext symlink target: its encoding must fit the backing fs's 4095-byte limit."""

SYMLINK_AD = b"encfs/v1/symlink"
"""Associated data of a sealed symlink target (AES-GCM under the meta key)."""
XATTR_NAME_AD = b"encfs/v1/xattr-name"
"""Associated data of an encrypted xattr name (AES-SIV under the names key); the value is
sealed with the encrypted backing name as associated data."""

XATTR_PREFIX = "user."
XATTR_BACKING_PREFIX = "user.encfs."
MAX_PLAIN_XATTR_NAME = 159
"""Longest plaintext xattr name (after ``user.``): the encoding must fit XATTR_NAME_MAX (255)."""


ROOT_ATTRS_XATTR = "user.encfs-root"
"""Extended attribute of the cipher dir holding the plaintext root directory's mode and
owner (§6.2), so that the cipher dir itself stays root's 0700 whatever the mount's root
shows. Outside ``XATTR_BACKING_PREFIX``: never taken for an encrypted xattr."""
_ROOT_ATTRS = struct.Struct(">BHII")
ROOT_ATTRS_VERSION = 1
NEW_ROOT_MODE = 0o755
"""The mount root of a new volume: as ``mkfs`` makes it."""


def pack_root_attrs(mode: int, uid: int, gid: int) -> bytes:
    """The ``ROOT_ATTRS_XATTR`` value: version, permission bits (07777), uid, gid."""
    return _ROOT_ATTRS.pack(ROOT_ATTRS_VERSION, mode & 0o7777, uid, gid)


def parse_root_attrs(raw: bytes) -> tuple[int, int, int] | None:
    """(permission bits, uid, gid) from a ``ROOT_ATTRS_XATTR`` value; None if it is not
    one this version knows (the cipher dir's own mode and owner are shown then)."""
    if len(raw) != _ROOT_ATTRS.size:
        return None
    version, mode, uid, gid = _ROOT_ATTRS.unpack(raw)
    if version != ROOT_ATTRS_VERSION or mode & ~0o7777:
        return None
    return mode, uid, gid


def dirid_links(flags: int) -> bool:
    """Whether a volume with ``flags`` makes its directory ids as links (§6.1)."""
    return bool(flags & FEATURE_DIRID_LINKS)


def is_double(flags: int) -> bool:
    """Whether a volume with ``flags`` encrypts its content twice (§5.2)."""
    return bool(flags & FEATURE_DOUBLE)


def volume_key_count(flags: int) -> int:
    """How many volume keys a volume with ``flags`` has: 2 with ``DOUBLE`` (inner, outer),
    else 1. Each has its own key slot (``slot_count``)."""
    return 2 if flags & FEATURE_DOUBLE else 1


def slot_count(flags: int) -> int:
    """How many key slots the header of a volume with ``flags`` holds (§2.1): one per
    volume key, slot 0 the (inner) volume key, slot 1 the outer one.

    The slots of the volume keys in use always come first. A later flag that keeps a
    second set of keys in the header (e.g. the retiring keys of an online rekey) appends
    that set's slots after these, one per key, in the same shape."""
    return volume_key_count(flags)


def block_overhead(flags: int) -> int:
    """Bytes a content block of a volume with ``flags`` adds to its plaintext (§5, §5.2)."""
    return DOUBLE_BLOCK_OVERHEAD if flags & FEATURE_DOUBLE else BLOCK_OVERHEAD


def feature_names(flags: int) -> list[str]:
    """Names of the known feature flags set in ``flags`` (``encfs info``)."""
    return [name for bit, name in FEATURE_NAMES.items() if flags & bit]


def is_reserved_backing_name(name: str) -> bool:
    """True for backing names that are encfs metadata, never user entries.

    Encrypted names are base64url and so never contain ``.``; every reserved name does.
    """
    return "." in name


def is_longname(name: str) -> bool:
    return name.startswith(LONGNAME_PREFIX) and not name.endswith(LONGNAME_SUFFIX)


def is_valid_plain_name(raw: bytes) -> bool:
    """Whether a decrypted name can be an entry's name (§4.4): 1 to ``MAX_PLAIN_NAME``
    bytes, neither ``.`` nor ``..``, no ``/`` and no NUL. Anything else was not written by
    encfs and is treated as corrupt, never handed to the kernel."""
    return (
        0 < len(raw) <= MAX_PLAIN_NAME
        and raw not in (b".", b"..")
        and b"/" not in raw
        and b"\0" not in raw
    )


# --- the volume header -------------------------------------------------------------------------


@dataclass(frozen=True)
class KeySlot:
    """One key slot of the volume header (§2.1): which vault key (KEK) wraps a volume key,
    at which KEK version, and the wrapped key as the vault returned it. Safe to show."""

    vault_url: str
    kek_version: int
    wrapped_key: str

    def pack(self) -> bytes:
        url = self.vault_url.encode("utf-8")
        wrapped = self.wrapped_key.encode("ascii")
        return b"".join(
            (
                _U16.pack(len(url)),
                url,
                _U32.pack(self.kek_version),
                _U16.pack(len(wrapped)),
                wrapped,
            )
        )


@dataclass(frozen=True)
class VolumeHeader:
    """The volume header's fields (docs/FORMAT.md §2); nothing here is secret.

    ``slots`` holds ``slot_count(feature_flags)`` key slots: slot 0 wraps the volume key
    (the only one of a single-layer volume), slot 1 the outer volume key of a ``DOUBLE``
    volume. ``vault_url``, ``kek_version`` and ``wrapped_key`` are slot 0's.
    ``outer_cipher`` is byte 15: an ``OUTER_CIPHER_NAMES`` id with ``DOUBLE``, else 0.
    ``retiring`` holds the slots of the volume keys a rekey is replacing, as many as
    ``slots`` (``FEATURE_REKEYING``, §2.5): present exactly when the flag is set."""

    format_version: int
    feature_flags: int
    cipher: int
    block_size: int
    volume_id: bytes
    slots: tuple[KeySlot, ...]
    outer_cipher: int = 0
    retiring: tuple[KeySlot, ...] = ()

    @property
    def vault_url(self) -> str:
        return self.slots[0].vault_url

    @property
    def kek_version(self) -> int:
        return self.slots[0].kek_version

    @property
    def wrapped_key(self) -> str:
        return self.slots[0].wrapped_key

    @property
    def double(self) -> bool:
        return is_double(self.feature_flags)

    @property
    def rekeying(self) -> bool:
        return bool(self.feature_flags & FEATURE_REKEYING)

    @property
    def tag_len(self) -> int:
        """How many tag bytes follow the body: one HMAC, two while rekeying (§2.5)."""
        return HEADER_TAG_LEN * (2 if self.rekeying else 1)

    def with_slot(self, index: int, **changes: str | int) -> VolumeHeader:
        """This header with fields of key slot ``index`` changed (``vault_url``,
        ``kek_version``, ``wrapped_key``; e.g. re-wrapped by a rotation)."""
        slots = list(self.slots)
        slots[index] = replace(slots[index], **changes)  # type: ignore[arg-type]
        return replace(self, slots=tuple(slots))

    def body(self) -> bytes:
        """The authenticated bytes: everything but the trailing tag. Raises ``ValueError``
        for a header no reader would accept in its slot count or byte 15 (a writer bug)."""
        if len(self.slots) != slot_count(self.feature_flags):
            raise ValueError(
                f"a header with flags 0x{self.feature_flags:x} holds "
                f"{slot_count(self.feature_flags)} key slot(s), not {len(self.slots)}"
            )
        if (self.outer_cipher != 0) != self.double:
            raise ValueError("byte 15 names an outer cipher exactly when DOUBLE is set")
        if len(self.retiring) != (len(self.slots) if self.rekeying else 0):
            raise ValueError("a header holds retiring slots exactly when it is rekeying")
        return b"".join(
            (
                _FIXED.pack(
                    VOLUME_MAGIC,
                    self.format_version,
                    self.feature_flags,
                    self.cipher,
                    self.outer_cipher,
                    self.block_size,
                    self.volume_id,
                ),
                *(slot.pack() for slot in self.slots),
                *(slot.pack() for slot in self.retiring),
            )
        )


def validate_block_size(block_size: int) -> None:
    """Raise ``ValueError`` unless 4 KiB <= block_size <= 64 KiB and a multiple of 4 KiB."""
    if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE) or block_size % 4096:
        raise ValueError(
            f"block size {block_size} not allowed: use a multiple of 4096 "
            f"from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
        )


def parse_volume_header(raw: bytes) -> tuple[VolumeHeader, bytes, bytes]:
    """Split and check the structure of a header file: returns (header, body, tag).

    Raises ``FormatError`` (truncated, bad magic, trailing bytes) or ``UnsupportedFormat``
    (other version, unknown flags or cipher). The tag is *not* verified here: that needs the
    volume key (see ``keys.VolumeKeys.verify_header``).
    """
    from encfs.errors import FormatError, UnsupportedFormat

    if len(raw) < _FIXED.size:
        raise FormatError(f"volume header truncated ({len(raw)} bytes)")
    magic, version, flags, cipher, byte15, block_size, volume_id = _FIXED.unpack_from(raw, 0)
    if magic != VOLUME_MAGIC:
        raise FormatError("not an encfs volume header (bad magic)")
    if version != FORMAT_VERSION:
        raise UnsupportedFormat(
            f"volume format version {version} is not supported by this encfs "
            f"(supports {FORMAT_VERSION}); use the encfs release that created it"
        )
    unknown = flags & ~KNOWN_FEATURE_FLAGS
    if unknown:
        raise UnsupportedFormat(
            f"volume uses unknown feature flags 0x{unknown:08x}; refusing to mount "
            "(created by a newer encfs?)"
        )
    if flags & FEATURE_DOUBLE:
        if byte15 == 0:
            raise FormatError("volume header sets DOUBLE but names no outer cipher (byte 15 is 0)")
        if byte15 not in OUTER_CIPHER_NAMES:
            raise UnsupportedFormat(f"volume uses unknown outer content cipher id {byte15}")
    elif byte15 != 0:
        raise FormatError(f"volume header reserved byte is {byte15}, must be 0 (corrupt header)")
    if cipher not in CIPHER_NAMES:
        raise UnsupportedFormat(f"volume uses unknown content cipher id {cipher}")
    try:
        validate_block_size(block_size)
    except ValueError as exc:
        raise FormatError(f"volume header: {exc}") from None
    pos = _FIXED.size
    slots: list[KeySlot] = []
    for index in range(slot_count(flags)):
        slot, pos = _parse_slot(raw, pos, "" if index == 0 else f" of key slot {index}")
        slots.append(slot)
    retiring: list[KeySlot] = []
    if flags & FEATURE_REKEYING:
        for index in range(slot_count(flags)):
            slot, pos = _parse_slot(raw, pos, f" of retiring key slot {index}")
            retiring.append(slot)
    tag = raw[pos:]
    tag_len = HEADER_TAG_LEN * (2 if flags & FEATURE_REKEYING else 1)
    if len(tag) != tag_len:
        raise FormatError(
            f"volume header has {len(tag)} tag bytes, expected {tag_len} "
            "(truncated or trailing garbage)"
        )
    header = VolumeHeader(
        format_version=version,
        feature_flags=flags,
        cipher=cipher,
        block_size=block_size,
        volume_id=volume_id,
        slots=tuple(slots),
        outer_cipher=byte15,
        retiring=tuple(retiring),
    )
    return header, raw[:pos], tag


def _parse_slot(raw: bytes, pos: int, which: str) -> tuple[KeySlot, int]:
    """The key slot at ``pos`` and where the next field starts. Raises ``FormatError``
    (``which`` names the slot in its message)."""
    from encfs.errors import FormatError

    try:
        (url_len,) = _U16.unpack_from(raw, pos)
        pos += 2
        url = raw[pos : pos + url_len]
        if len(url) != url_len:
            raise FormatError(f"volume header truncated in vault URL{which}")
        pos += url_len
        (kek_version,) = _U32.unpack_from(raw, pos)
        pos += 4
        (wrapped_len,) = _U16.unpack_from(raw, pos)
        pos += 2
        wrapped = raw[pos : pos + wrapped_len]
        if len(wrapped) != wrapped_len:
            raise FormatError(f"volume header truncated in wrapped key{which}")
        pos += wrapped_len
    except struct.error:
        raise FormatError(f"volume header truncated{which}") from None
    try:
        slot = KeySlot(url.decode("utf-8"), kek_version, wrapped.decode("ascii"))
    except UnicodeDecodeError:
        raise FormatError(f"volume header has a non-text vault URL or wrapped key{which}") from None
    return slot, pos


# --- file header and blocks ----------------------------------------------------------------------


def pack_file_header(file_id: bytes) -> bytes:
    return _FILE_HEADER.pack(FILE_HEADER_VERSION, file_id)


def parse_file_header(raw: bytes) -> bytes:
    """Return the file id. Raises ``FormatError`` for a short header or unknown version."""
    from encfs.errors import FormatError

    if len(raw) < FILE_HEADER_LEN:
        raise FormatError("file header truncated")
    version, file_id = _FILE_HEADER.unpack_from(raw, 0)
    if version != FILE_HEADER_VERSION:
        raise FormatError(f"unknown file header version {version}")
    return bytes(file_id)


def symlink_plain_size(target_len: int) -> int:
    """The plaintext length of a symlink whose backing target is ``target_len`` characters
    (unpadded base64url of the sealed target, §8); 0 for anything shorter than a seal."""
    return max(target_len * 3 // 4 - BLOCK_OVERHEAD, 0)


UNDO_MAGIC = b"ENCFSUND"
_UNDO_HEAD = struct.Struct(">8sHH")  # magic, version (1), record count
_UNDO_RECORD = struct.Struct(">QI")  # block_no, sealed length
UNDO_VERSION = 1


def undo_file_name(file_id: bytes) -> str:
    """The undo file of the file with ``file_id`` inside ``UNDO_DIR_NAME`` (§10b)."""
    return file_id.hex()


def pack_undo(records: list[tuple[int, bytes]]) -> bytes:
    """An undo file's content: ``(block_no, sealed block)`` pairs, each block sealed for
    its own position exactly as in the file (§5), so it authenticates only there."""
    parts = [_UNDO_HEAD.pack(UNDO_MAGIC, UNDO_VERSION, len(records))]
    for block_no, sealed in records:
        parts.append(_UNDO_RECORD.pack(block_no, len(sealed)))
        parts.append(sealed)
    return b"".join(parts)


UNDO_MAX_RECORDS = 2
"""A write rewrites at most its first and its last block in place."""
UNDO_REKEY_RECORDS = 64
"""A rekey re-seals up to this many consecutive blocks per undo record (§2.5, §10b)."""


def undo_size_limit(cipher_block_size: int) -> int:
    """The largest undo file a writer makes (``UNDO_REKEY_RECORDS`` whole blocks, from a
    rekey): what a reader reads of one."""
    return _UNDO_HEAD.size + UNDO_REKEY_RECORDS * (_UNDO_RECORD.size + cipher_block_size)


UNDO_EMPTY = _UNDO_HEAD.pack(UNDO_MAGIC, UNDO_VERSION, 0)
"""What an undo file holds when nothing is being rewritten (written over the records)."""


def parse_undo(raw: bytes, max_sealed: int) -> dict[int, bytes]:
    """The records of an undo file: block number -> sealed block. Untrusted input: whatever
    does not parse is dropped (a record is only used after it authenticates, §10b)."""
    out: dict[int, bytes] = {}
    if len(raw) < _UNDO_HEAD.size:
        return out
    magic, version, count = _UNDO_HEAD.unpack_from(raw)
    if magic != UNDO_MAGIC or version != UNDO_VERSION:
        return out
    pos = _UNDO_HEAD.size
    for _ in range(count):
        if pos + _UNDO_RECORD.size > len(raw):
            break
        block_no, length = _UNDO_RECORD.unpack_from(raw, pos)
        pos += _UNDO_RECORD.size
        if length > max_sealed or pos + length > len(raw):
            break
        out[block_no] = raw[pos : pos + length]
        pos += length
    return out


block_ad: Callable[[bytes, int], bytes] = _BLOCK_AD.pack
"""``block_ad(file_id, block_no)``: the associated data binding a block to its file and
position, file_id || u64 BE block_no (the struct's own ``pack``: one call per block, on the
hot path of every seal and open)."""


@dataclass(frozen=True)
class Geometry:
    """Plain<->cipher arithmetic for one block size and block overhead (28 bytes, or 56
    for a ``DOUBLE`` volume: ``of``). All offsets are byte offsets."""

    block_size: int
    overhead: int = BLOCK_OVERHEAD

    @classmethod
    def of(cls, block_size: int, flags: int) -> Geometry:
        """The geometry of a volume with this block size and these feature flags."""
        return cls(block_size, block_overhead(flags))

    @property
    def cipher_block_size(self) -> int:
        return self.block_size + self.overhead

    def plain_size(self, cipher_size: int) -> int:
        """Plaintext size of a backing file of ``cipher_size`` bytes.

        A trailing fragment too short to hold a block (1..overhead bytes) is corrupt; it
        counts as zero plaintext bytes here and fails authentication when read.
        """
        if cipher_size <= FILE_HEADER_LEN:
            return 0
        body = cipher_size - FILE_HEADER_LEN
        full, rest = divmod(body, self.cipher_block_size)
        return full * self.block_size + max(rest - self.overhead, 0)

    def entry_plain_size(self, mode: int, cipher_size: int) -> int:
        """The size the mount shows for a backing entry of type ``mode`` (its ``st_mode``)
        and ``cipher_size`` bytes: a regular file's plaintext size, a symbolic link's
        plaintext target length (§8), any other entry's own size."""
        if stat.S_ISREG(mode):
            return self.plain_size(cipher_size)
        if stat.S_ISLNK(mode):
            return symlink_plain_size(cipher_size)
        return cipher_size

    def whole_end(self, plain_size: int) -> int:
        """Where the whole blocks of a file of ``plain_size`` bytes end (plain side)."""
        return plain_size - plain_size % self.block_size

    def cipher_size(self, plain_size: int) -> int:
        """Backing file size for ``plain_size`` plaintext bytes (0 stays 0: no header)."""
        if plain_size == 0:
            return 0
        full, rest = divmod(plain_size, self.block_size)
        size = FILE_HEADER_LEN + full * self.cipher_block_size
        if rest:
            size += rest + self.overhead
        return size

    def block_count(self, cipher_size: int) -> int:
        """How many blocks a backing file of ``cipher_size`` bytes holds, a trailing
        fragment included (0 for an empty or header-only file)."""
        return -(-max(cipher_size - FILE_HEADER_LEN, 0) // self.cipher_block_size)

    def has_fragment(self, cipher_size: int) -> bool:
        """Whether the file ends in a fragment too short to be a block (1..overhead bytes)."""
        rest = max(cipher_size - FILE_HEADER_LEN, 0) % self.cipher_block_size
        return 0 < rest <= self.overhead

    def block_no(self, plain_off: int) -> int:
        return plain_off // self.block_size

    def block_plain_off(self, block_no: int) -> int:
        return block_no * self.block_size

    def block_cipher_off(self, block_no: int) -> int:
        return FILE_HEADER_LEN + block_no * self.cipher_block_size

    def block_range(self, plain_off: int, length: int) -> tuple[int, int]:
        """First and one-past-last block numbers covering [plain_off, plain_off + length)."""
        if length <= 0:
            return self.block_no(plain_off), self.block_no(plain_off)
        return self.block_no(plain_off), (plain_off + length - 1) // self.block_size + 1
