"""Format v1 arithmetic and byte layouts (encfs/format.py, docs/FORMAT.md).

Pure: no keys, no vault, no FUSE. The header vector pins the exact bytes of ``encfs.volume``.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from encfs import format as fmt
from encfs.errors import FormatError, UnsupportedFormat

VECTORS = Path(__file__).parent / "vectors"
BLOCK_SIZES = [4096, 8192, 12288, 16384, 32768, 65536]


def vector(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text())
    return data


def sample_header(**changes: Any) -> fmt.VolumeHeader:
    fields: dict[str, Any] = {
        "format_version": fmt.FORMAT_VERSION,
        "feature_flags": 0,
        "cipher": fmt.CIPHER_AES256_GCM,
        "block_size": 4096,
        "volume_id": bytes(range(16)),
        "vault_url": "transit+https://vault.example:8200/transit/kek",
        "kek_version": 7,
        "wrapped_key": "vault:v7:AAAA",
    }
    fields.update(changes)
    slot = fmt.KeySlot(
        fields.pop("vault_url"), fields.pop("kek_version"), fields.pop("wrapped_key")
    )
    return fmt.VolumeHeader(**fields, slots=(slot,))


def header_file(header: fmt.VolumeHeader, tag: bytes = b"\x5a" * fmt.HEADER_TAG_LEN) -> bytes:
    return header.body() + tag


# --- constants that are the format ---------------------------------------------------------


def test_format_constants() -> None:
    """Every number here is in docs/FORMAT.md; changing one is changing the format."""
    assert fmt.VOLUME_MAGIC == b"ENCFSVOL"
    assert fmt.FORMAT_VERSION == 1
    assert fmt.FEATURE_DIRID_LINKS == 1
    assert fmt.FEATURE_DOUBLE == 2
    assert fmt.FEATURE_REKEYING == 4
    assert fmt.NEW_VOLUME_FEATURES == fmt.FEATURE_DIRID_LINKS
    assert fmt.KNOWN_FEATURE_FLAGS == (
        fmt.FEATURE_DIRID_LINKS | fmt.FEATURE_DOUBLE | fmt.FEATURE_REKEYING
    )
    assert fmt.feature_names(0xFFFFFFFF) == ["dirid-links", "double", "rekeying"]
    assert fmt.feature_names(0) == []
    assert fmt.CIPHER_AES256_GCM == 1
    assert fmt.OUTER_CIPHER_CHACHA20_POLY1305 == 2
    assert fmt.DOUBLE_BLOCK_OVERHEAD == 56
    assert fmt.VOLUME_HEADER_NAME == "encfs.volume"
    assert fmt.VOLUME_HEADER_TMP == "encfs.volume.tmp"
    assert fmt.VOLUME_HEADER_PREV == "encfs.volume.prev"
    assert (fmt.VOLUME_KEY_LEN, fmt.VOLUME_ID_LEN, fmt.HEADER_TAG_LEN) == (32, 16, 32)
    assert (fmt.FILE_HEADER_VERSION, fmt.FILE_ID_LEN, fmt.FILE_HEADER_LEN) == (1, 16, 18)
    assert (fmt.NONCE_LEN, fmt.TAG_LEN, fmt.BLOCK_OVERHEAD) == (12, 16, 28)
    assert (fmt.DEFAULT_BLOCK_SIZE, fmt.MIN_BLOCK_SIZE, fmt.MAX_BLOCK_SIZE) == (4096, 4096, 65536)
    assert (fmt.DIRID_NAME, fmt.DIRID_LEN) == (".encfs.dirid", 16)
    assert (fmt.LONGNAME_PREFIX, fmt.LONGNAME_SUFFIX) == ("encfs.ln.", ".name")
    assert (fmt.MAX_BACKING_NAME, fmt.MAX_PLAIN_NAME, fmt.NAME_PAD) == (255, 255, 16)
    assert fmt.MAX_SYMLINK_TARGET == 3000
    assert fmt.SYMLINK_AD == b"encfs/v1/symlink"
    assert fmt.XATTR_NAME_AD == b"encfs/v1/xattr-name"
    assert (fmt.XATTR_PREFIX, fmt.XATTR_BACKING_PREFIX) == ("user.", "user.encfs.")


# --- geometry ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plain", "cipher"),
    [(0, 0), (1, 47), (4095, 4141), (4096, 4142), (4097, 4171), (5000, 5074), (8192, 8266)],
)
def test_worked_sizes_4096(plain: int, cipher: int) -> None:
    """The worked examples of docs/FORMAT.md."""
    geo = fmt.Geometry(4096)
    assert geo.cipher_size(plain) == cipher
    assert geo.plain_size(cipher) == plain


def test_cipher_block_size() -> None:
    for bs in BLOCK_SIZES:
        assert fmt.Geometry(bs).cipher_block_size == bs + 28


@given(block_size=st.sampled_from(BLOCK_SIZES), plain=st.integers(0, 1 << 44))
def test_cipher_plain_round_trip(block_size: int, plain: int) -> None:
    geo = fmt.Geometry(block_size)
    cipher = geo.cipher_size(plain)
    assert geo.plain_size(cipher) == plain
    if plain == 0:
        assert cipher == 0
    else:
        blocks = -(-plain // block_size)
        assert cipher == fmt.FILE_HEADER_LEN + plain + blocks * fmt.BLOCK_OVERHEAD


@given(block_size=st.sampled_from(BLOCK_SIZES), plain=st.integers(0, 1 << 40))
def test_cipher_size_is_monotonic(block_size: int, plain: int) -> None:
    geo = fmt.Geometry(block_size)
    assert geo.cipher_size(plain + 1) > geo.cipher_size(plain)


@given(block_size=st.sampled_from(BLOCK_SIZES), cipher=st.integers(0, 1 << 40))
def test_plain_size_of_any_backing_size(block_size: int, cipher: int) -> None:
    """Every backing size maps to a plaintext size no larger than it; valid sizes map back
    exactly, and a trailing fragment of 1..28 bytes (corrupt) adds no plaintext."""
    geo = fmt.Geometry(block_size)
    plain = geo.plain_size(cipher)
    assert 0 <= plain <= cipher
    assert geo.cipher_size(plain) <= cipher
    if cipher > fmt.FILE_HEADER_LEN:
        rest = (cipher - fmt.FILE_HEADER_LEN) % geo.cipher_block_size
        if rest == 0 or rest > fmt.BLOCK_OVERHEAD:
            assert geo.cipher_size(plain) == cipher
        else:
            assert plain % block_size == 0
    else:
        assert plain == 0


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_header_only_and_fragments_hold_no_plaintext(block_size: int) -> None:
    geo = fmt.Geometry(block_size)
    for size in range(fmt.FILE_HEADER_LEN + fmt.BLOCK_OVERHEAD + 1):
        assert geo.plain_size(size) == 0
    assert geo.plain_size(fmt.FILE_HEADER_LEN + fmt.BLOCK_OVERHEAD + 1) == 1
    full = fmt.FILE_HEADER_LEN + geo.cipher_block_size
    for extra in range(fmt.BLOCK_OVERHEAD + 1):
        assert geo.plain_size(full + extra) == block_size


@given(
    block_size=st.sampled_from(BLOCK_SIZES),
    off=st.integers(0, 1 << 40),
    length=st.integers(-5, 1 << 22),
)
def test_block_range(block_size: int, off: int, length: int) -> None:
    geo = fmt.Geometry(block_size)
    first, end = geo.block_range(off, length)
    assert first == off // block_size
    if length <= 0:
        assert end == first
        return
    assert end > first
    # [first, end) covers the byte range, and no block more.
    assert geo.block_plain_off(first) <= off
    assert geo.block_plain_off(end) >= off + length
    assert geo.block_plain_off(end - 1) < off + length


@given(block_size=st.sampled_from(BLOCK_SIZES), block_no=st.integers(0, 1 << 32))
def test_block_offsets(block_size: int, block_no: int) -> None:
    geo = fmt.Geometry(block_size)
    assert geo.block_plain_off(block_no) == block_no * block_size
    assert geo.block_cipher_off(block_no) == 18 + block_no * (block_size + 28)
    assert geo.block_no(geo.block_plain_off(block_no)) == block_no
    assert geo.block_no(geo.block_plain_off(block_no + 1) - 1) == block_no
    # A full block ends exactly where the next one starts.
    assert geo.cipher_size(geo.block_plain_off(block_no + 1)) == geo.block_cipher_off(block_no + 1)


def test_block_range_examples() -> None:
    geo = fmt.Geometry(4096)
    assert geo.block_range(0, 1) == (0, 1)
    assert geo.block_range(0, 4096) == (0, 1)
    assert geo.block_range(0, 4097) == (0, 2)
    assert geo.block_range(4095, 2) == (0, 2)
    assert geo.block_range(4096, 4096) == (1, 2)
    assert geo.block_range(5000, 0) == (1, 1)


def test_block_ad() -> None:
    file_id = bytes(range(16))
    assert fmt.block_ad(file_id, 0) == file_id + bytes(8)
    assert fmt.block_ad(file_id, 0x0102030405060708) == file_id + bytes(range(1, 9))
    assert len(fmt.block_ad(file_id, (1 << 64) - 1)) == 24


@pytest.mark.parametrize("good", [4096, 8192, 61440, 65536])
def test_validate_block_size_accepts(good: int) -> None:
    fmt.validate_block_size(good)


@pytest.mark.parametrize("bad", [0, 512, 4095, 4097, 5000, 69632, 1 << 20])
def test_validate_block_size_refuses(bad: int) -> None:
    with pytest.raises(ValueError, match="multiple of 4096"):
        fmt.validate_block_size(bad)


# --- reserved names ---------------------------------------------------------------------------


def test_reserved_backing_names() -> None:
    for name in (".encfs.dirid", "encfs.volume", "encfs.volume.prev", "encfs.volume.tmp"):
        assert fmt.is_reserved_backing_name(name)
        assert not fmt.is_longname(name)
    assert fmt.is_reserved_backing_name("encfs.ln.abc")
    assert fmt.is_longname("encfs.ln.abc")
    assert not fmt.is_longname("encfs.ln.abc.name")
    assert not fmt.is_reserved_backing_name("yCS2hMeQfgevwbydsOUGm1bKu2D6pk6197FYuJD-yEU")


# --- volume header -----------------------------------------------------------------------------


def test_header_vector_exact_bytes() -> None:
    vec = vector("header.json")
    f = vec["fields"]
    header = fmt.VolumeHeader(
        format_version=f["format_version"],
        feature_flags=f["feature_flags"],
        cipher=f["cipher"],
        block_size=f["block_size"],
        volume_id=bytes.fromhex(f["volume_id"]),
        slots=(fmt.KeySlot(f["vault_url"], f["kek_version"], f["wrapped_key"]),),
    )
    assert header.body().hex() == vec["body"]
    parsed, body, tag = fmt.parse_volume_header(bytes.fromhex(vec["file"]))
    assert parsed == header
    assert body.hex() == vec["body"]
    assert tag.hex() == vec["tag"]


def test_header_layout_offsets() -> None:
    """Field offsets as in the byte table of docs/FORMAT.md."""
    h = sample_header(feature_flags=0, block_size=0x3000, kek_version=0x01020304)
    raw = h.body()
    assert raw[0:8] == b"ENCFSVOL"
    assert raw[8:10] == b"\x00\x01"
    assert raw[10:14] == bytes(4)
    assert raw[14] == 1
    assert raw[15] == 0
    assert raw[16:20] == b"\x00\x00\x30\x00"
    assert raw[20:36] == bytes(range(16))
    url = h.vault_url.encode()
    assert raw[36:38] == struct.pack(">H", len(url))
    assert raw[38 : 38 + len(url)] == url
    pos = 38 + len(url)
    assert raw[pos : pos + 4] == b"\x01\x02\x03\x04"
    assert raw[pos + 4 : pos + 6] == struct.pack(">H", len(h.wrapped_key))
    assert raw[pos + 6 :] == h.wrapped_key.encode()


@given(
    block_size=st.sampled_from(BLOCK_SIZES),
    volume_id=st.binary(min_size=16, max_size=16),
    url=st.text(max_size=300),
    kek_version=st.integers(0, (1 << 32) - 1),
    wrapped=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=600),
    tag=st.binary(min_size=32, max_size=32),
)
def test_header_round_trip(
    block_size: int, volume_id: bytes, url: str, kek_version: int, wrapped: str, tag: bytes
) -> None:
    h = sample_header(
        block_size=block_size,
        volume_id=volume_id,
        vault_url=url,
        kek_version=kek_version,
        wrapped_key=wrapped,
    )
    parsed, body, got_tag = fmt.parse_volume_header(h.body() + tag)
    assert parsed == h
    assert body == h.body()
    assert got_tag == tag


def test_header_truncated_at_every_length() -> None:
    raw = header_file(sample_header())
    for n in range(len(raw)):
        with pytest.raises(FormatError, match="truncated") as info:
            fmt.parse_volume_header(raw[:n])
        assert not isinstance(info.value, UnsupportedFormat)


def test_header_truncation_messages() -> None:
    raw = header_file(sample_header())
    with pytest.raises(FormatError, match=r"truncated \(10 bytes\)"):
        fmt.parse_volume_header(raw[:10])
    with pytest.raises(FormatError, match="truncated in vault URL"):
        fmt.parse_volume_header(raw[:40])
    with pytest.raises(FormatError, match="31 tag bytes, expected 32"):
        fmt.parse_volume_header(raw[:-1])


def test_header_trailing_garbage() -> None:
    raw = header_file(sample_header())
    with pytest.raises(FormatError, match=r"33 tag bytes.*trailing garbage"):
        fmt.parse_volume_header(raw + b"\x00")


def test_header_bad_magic() -> None:
    raw = header_file(sample_header())
    with pytest.raises(FormatError, match="bad magic") as info:
        fmt.parse_volume_header(b"ENCFSVOX" + raw[8:])
    assert not isinstance(info.value, UnsupportedFormat)
    with pytest.raises(FormatError, match="bad magic"):
        fmt.parse_volume_header(bytes(len(raw)))


@pytest.mark.parametrize("version", [0, 2, 0xFFFF])
def test_header_wrong_version(version: int) -> None:
    raw = header_file(sample_header(format_version=version))
    with pytest.raises(UnsupportedFormat, match=f"format version {version} is not supported"):
        fmt.parse_volume_header(raw)


@pytest.mark.parametrize(
    ("flags", "unknown"), [(8, 8), (0x80000000, 0x80000000), (0xFFFFFFF9, 0xFFFFFFF8)]
)
def test_header_unknown_feature_flag(flags: int, unknown: int) -> None:
    raw = header_file(sample_header(feature_flags=flags))
    with pytest.raises(UnsupportedFormat, match=f"unknown feature flags 0x{unknown:08x}"):
        fmt.parse_volume_header(raw)


def test_header_known_feature_flag_parses() -> None:
    h = sample_header(feature_flags=fmt.FEATURE_DIRID_LINKS)
    assert fmt.parse_volume_header(header_file(h))[0].feature_flags == fmt.FEATURE_DIRID_LINKS


@pytest.mark.parametrize("cipher", [0, 2, 255])
def test_header_unknown_cipher(cipher: int) -> None:
    raw = header_file(sample_header(cipher=cipher))
    with pytest.raises(UnsupportedFormat, match=f"unknown content cipher id {cipher}"):
        fmt.parse_volume_header(raw)


@pytest.mark.parametrize("block_size", [0, 1024, 5000, 131072, 0xFFFFFFFF])
def test_header_bad_block_size(block_size: int) -> None:
    raw = header_file(sample_header(block_size=block_size))
    with pytest.raises(FormatError, match=f"block size {block_size} not allowed") as info:
        fmt.parse_volume_header(raw)
    assert not isinstance(info.value, UnsupportedFormat)


def test_header_non_text_fields() -> None:
    h = sample_header(vault_url="x")
    raw = bytearray(header_file(h))
    raw[38] = 0xFF  # the one URL byte: not UTF-8
    with pytest.raises(FormatError, match="non-text vault URL or wrapped key"):
        fmt.parse_volume_header(bytes(raw))
    h = sample_header(wrapped_key="w")
    raw = bytearray(header_file(h))
    raw[len(h.body()) - 1] = 0xC3  # the one wrapped-key byte: not ASCII
    with pytest.raises(FormatError, match="non-text vault URL or wrapped key"):
        fmt.parse_volume_header(bytes(raw))


def test_header_nonzero_reserved_byte_refused() -> None:
    raw = bytearray(header_file(sample_header()))
    raw[15] = 1
    with pytest.raises(FormatError, match="reserved"):
        fmt.parse_volume_header(bytes(raw))


def test_header_version_checked_before_the_rest() -> None:
    """A future version may change everything after the version field: v1 must refuse it
    with UnsupportedFormat, not misreport it as truncated or corrupt."""
    future = b"ENCFSVOL" + struct.pack(">H", 2) + b"\xff" * 26
    with pytest.raises(UnsupportedFormat):
        fmt.parse_volume_header(future)


# --- file header ----------------------------------------------------------------------------


def test_file_header_round_trip() -> None:
    file_id = bytes(range(0xF0, 0x100))
    raw = fmt.pack_file_header(file_id)
    assert raw == b"\x00\x01" + file_id
    assert len(raw) == fmt.FILE_HEADER_LEN
    assert fmt.parse_file_header(raw) == file_id
    # Readers pass more than the header (e.g. a whole first read); only 18 bytes count.
    assert fmt.parse_file_header(raw + b"rest") == file_id


def test_file_header_errors() -> None:
    raw = fmt.pack_file_header(bytes(16))
    for n in range(fmt.FILE_HEADER_LEN):
        with pytest.raises(FormatError, match="file header truncated"):
            fmt.parse_file_header(raw[:n])
    with pytest.raises(FormatError, match="unknown file header version 2"):
        fmt.parse_file_header(b"\x00\x02" + bytes(16))
    with pytest.raises(FormatError, match="unknown file header version 0"):
        fmt.parse_file_header(bytes(18))


def test_file_header_in_content_vectors() -> None:
    vec = vector("content.json")
    for case in vec["cases"]:
        cipher = bytes.fromhex(case["cipher"])
        assert fmt.parse_file_header(cipher) == bytes.fromhex(vec["file_id"])
        geo = fmt.Geometry(vec["block_size"])
        assert geo.cipher_size(case["plain_size"]) == case["cipher_size"] == len(cipher)
        assert geo.plain_size(len(cipher)) == case["plain_size"]


@given(
    block_size=st.sampled_from(BLOCK_SIZES),
    plain=st.integers(0, 1 << 36),
    fragment=st.integers(0, fmt.BLOCK_OVERHEAD),
)
def test_block_count_and_fragment(block_size: int, plain: int, fragment: int) -> None:
    """A valid file of ``plain`` bytes holds ceil(plain / B) blocks and no fragment; 1..28
    bytes more after whole blocks are a fragment, counted as one more (bad) block."""
    geo = fmt.Geometry(block_size)
    cipher = geo.cipher_size(plain)
    assert geo.block_count(cipher) == -(-plain // block_size)
    assert not geo.has_fragment(cipher)
    if plain and plain % block_size == 0 and fragment:
        assert geo.has_fragment(cipher + fragment)
        assert geo.block_count(cipher + fragment) == plain // block_size + 1


def test_entry_plain_size_by_type() -> None:
    """What the mount shows as st_size: plaintext for files and symlinks, else as is."""
    import stat

    geo = fmt.Geometry(4096)
    cipher = geo.cipher_size(5000)
    assert geo.entry_plain_size(stat.S_IFREG | 0o644, cipher) == 5000
    assert geo.entry_plain_size(stat.S_IFLNK | 0o777, 60) == fmt.symlink_plain_size(60)
    for kind in (stat.S_IFDIR, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
        assert geo.entry_plain_size(kind | 0o755, cipher) == cipher


def test_symlink_plain_size() -> None:
    """§8: the backing target is b64url(nonce || target || tag), unpadded."""
    import base64

    for n in (0, 1, 2, 3, 100, fmt.MAX_SYMLINK_TARGET):
        sealed = base64.urlsafe_b64encode(bytes(n + fmt.BLOCK_OVERHEAD)).rstrip(b"=")
        assert fmt.symlink_plain_size(len(sealed)) == n


def test_undo_file_layout_and_untrusted_parse() -> None:
    """FORMAT §10b: the undo file's bytes, and a parser that drops what does not parse
    (the records are authenticated by their blocks' own seals, never by the framing)."""
    raw = fmt.pack_undo([(2, b"\xaa" * 40), (1 << 40, b"\xbb" * 30)])
    assert raw[:12] == b"ENCFSUND" + bytes([0, 1, 0, 2])
    assert raw[12:24] == (2).to_bytes(8, "big") + (40).to_bytes(4, "big")
    assert len(raw) == 12 + 2 * 12 + 70
    assert fmt.parse_undo(raw, 4124) == {2: b"\xaa" * 40, 1 << 40: b"\xbb" * 30}
    assert fmt.parse_undo(fmt.UNDO_EMPTY, 4124) == {}
    assert fmt.parse_undo(raw[:-1], 4124) == {2: b"\xaa" * 40}  # cut short: last one dropped
    assert fmt.parse_undo(raw, 39) == {}  # a length over the limit ends the parse
    assert fmt.parse_undo(b"ENCFSUNX" + raw[8:], 4124) == {}
    assert fmt.parse_undo(raw[:8] + b"\x00\x02" + raw[10:], 4124) == {}  # unknown version
    assert fmt.undo_file_name(bytes(range(16))) == "000102030405060708090a0b0c0d0e0f"


# --- double encryption (FEATURE_DOUBLE): key slots, byte 15, geometry ---------------------------


def double_header(**changes: Any) -> fmt.VolumeHeader:
    h = sample_header(feature_flags=fmt.FEATURE_DIRID_LINKS | fmt.FEATURE_DOUBLE)
    fields: dict[str, Any] = {
        "slots": (*h.slots, fmt.KeySlot("kmip://kms.example:5696/outer", 0, "kmip:v1:" + "B" * 80)),
        "outer_cipher": fmt.OUTER_CIPHER_CHACHA20_POLY1305,
    }
    fields.update(changes)
    return dataclasses.replace(h, **fields)


def test_double_header_vector_exact_bytes() -> None:
    vec = vector("double-header.json")
    f = vec["fields"]
    header = fmt.VolumeHeader(
        format_version=f["format_version"],
        feature_flags=f["feature_flags"],
        cipher=f["cipher"],
        block_size=f["block_size"],
        volume_id=bytes.fromhex(f["volume_id"]),
        slots=tuple(
            fmt.KeySlot(s["vault_url"], s["kek_version"], s["wrapped_key"]) for s in f["slots"]
        ),
        outer_cipher=f["outer_cipher"],
    )
    assert header.body().hex() == vec["body"]
    parsed, body, tag = fmt.parse_volume_header(bytes.fromhex(vec["file"]))
    assert parsed == header
    assert parsed.double and len(parsed.slots) == 2
    assert (parsed.vault_url, parsed.kek_version, parsed.wrapped_key) == (
        f["slots"][0]["vault_url"],
        f["slots"][0]["kek_version"],
        f["slots"][0]["wrapped_key"],
    )
    assert body.hex() == vec["body"]
    assert tag.hex() == vec["tag"]


def test_double_header_layout() -> None:
    """Byte 15 is the outer cipher; slot 1 follows slot 0 in the same shape, then the tag."""
    h = double_header()
    raw = h.body()
    assert raw[10:14] == struct.pack(">I", fmt.FEATURE_DIRID_LINKS | fmt.FEATURE_DOUBLE)
    assert raw[15] == fmt.OUTER_CIPHER_CHACHA20_POLY1305
    single = h.slots[0].pack()
    assert raw[36 : 36 + len(single)] == single
    second = raw[36 + len(single) :]
    url2 = h.slots[1].vault_url.encode()
    assert second[:2] == struct.pack(">H", len(url2))
    assert second[2 : 2 + len(url2)] == url2
    assert second[2 + len(url2) : 6 + len(url2)] == bytes(4)  # KEK version 0
    assert second == h.slots[1].pack()


@given(
    urls=st.lists(st.text(max_size=200), min_size=2, max_size=2),
    versions=st.lists(st.integers(0, (1 << 32) - 1), min_size=2, max_size=2),
    wrapped=st.lists(
        st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300),
        min_size=2,
        max_size=2,
    ),
    tag=st.binary(min_size=32, max_size=32),
)
def test_double_header_round_trip(
    urls: list[str], versions: list[int], wrapped: list[str], tag: bytes
) -> None:
    h = double_header(slots=tuple(map(fmt.KeySlot, urls, versions, wrapped)))
    parsed, body, got_tag = fmt.parse_volume_header(h.body() + tag)
    assert parsed == h
    assert body == h.body()
    assert got_tag == tag


def test_slot_count_follows_the_flags() -> None:
    assert fmt.slot_count(0) == fmt.slot_count(fmt.FEATURE_DIRID_LINKS) == 1
    assert fmt.slot_count(fmt.FEATURE_DOUBLE) == fmt.slot_count(0xFFFFFFFF) == 2
    assert fmt.volume_key_count(fmt.FEATURE_DOUBLE) == 2
    with pytest.raises(ValueError, match="2 key slot"):
        dataclasses.replace(double_header(), slots=double_header().slots[:1]).body()
    with pytest.raises(ValueError, match="1 key slot"):
        dataclasses.replace(sample_header(), slots=double_header().slots).body()
    with pytest.raises(ValueError, match="outer cipher"):
        double_header(outer_cipher=0).body()
    with pytest.raises(ValueError, match="outer cipher"):
        dataclasses.replace(sample_header(), outer_cipher=2).body()


def test_double_without_slot_1_is_truncated() -> None:
    """A header that sets DOUBLE but ends after slot 0 (or inside slot 1) is cut short."""
    h = double_header()
    raw = h.body() + b"\x5a" * fmt.HEADER_TAG_LEN
    slot1_start = len(h.body()) - len(h.slots[1].pack())
    with pytest.raises(FormatError, match="truncated"):  # slot 1 missing, tag in its place
        fmt.parse_volume_header(raw[:slot1_start] + raw[-fmt.HEADER_TAG_LEN :])
    for n in range(slot1_start, len(raw)):
        with pytest.raises(FormatError, match="truncated") as info:
            fmt.parse_volume_header(raw[:n])
        assert not isinstance(info.value, UnsupportedFormat)
    with pytest.raises(FormatError, match="truncated in vault URL of key slot 1"):
        fmt.parse_volume_header(raw[: slot1_start + 4])
    # A single-layer header with the DOUBLE bit set later: its tag is read as slot 1.
    single = sample_header()
    forged = bytearray(header_file(single))
    forged[10:14] = struct.pack(">I", fmt.FEATURE_DOUBLE)
    forged[15] = fmt.OUTER_CIPHER_CHACHA20_POLY1305
    with pytest.raises(FormatError, match=r"truncated|tag bytes"):
        fmt.parse_volume_header(bytes(forged))


@pytest.mark.parametrize("outer", [1, 3, 0x80, 255])
def test_unknown_outer_cipher_refused(outer: int) -> None:
    raw = bytearray(header_file(double_header()))
    raw[15] = outer
    with pytest.raises(UnsupportedFormat, match=f"unknown outer content cipher id {outer}"):
        fmt.parse_volume_header(bytes(raw))


def test_double_without_outer_cipher_is_corrupt() -> None:
    raw = bytearray(header_file(double_header()))
    raw[15] = 0
    with pytest.raises(FormatError, match="names no outer cipher") as info:
        fmt.parse_volume_header(bytes(raw))
    assert not isinstance(info.value, UnsupportedFormat)


def test_double_geometry_worked_sizes() -> None:
    """docs/FORMAT.md §5.2: 56 bytes per block, the file header unchanged."""
    geo = fmt.Geometry.of(4096, fmt.FEATURE_DOUBLE | fmt.FEATURE_DIRID_LINKS)
    assert geo.overhead == 56 and geo.cipher_block_size == 4152
    assert fmt.Geometry.of(4096, fmt.FEATURE_DIRID_LINKS) == fmt.Geometry(4096)
    table = {0: 0, 1: 75, 4096: 4170, 5000: 5130}
    for plain, cipher in table.items():
        assert geo.cipher_size(plain) == cipher, plain
        assert geo.plain_size(cipher) == plain, plain
    assert geo.plain_size(18 + 4152 + 56) == 4096  # a trailing fragment of <= 56 bytes adds nothing
    assert geo.has_fragment(18 + 4152 + 56) and not geo.has_fragment(18 + 4152 + 57)
    assert geo.block_cipher_off(3) == 18 + 3 * 4152


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_double_geometry_round_trip(block_size: int) -> None:
    geo = fmt.Geometry.of(block_size, fmt.FEATURE_DOUBLE)
    for plain in [0, 1, block_size - 1, block_size, block_size + 1, 7 * block_size + 3]:
        assert geo.plain_size(geo.cipher_size(plain)) == plain
        assert geo.block_count(geo.cipher_size(plain)) == -(-plain // block_size)


def test_double_content_vector_sizes() -> None:
    vec = vector("double-content.json")
    geo = fmt.Geometry.of(vec["block_size"], fmt.FEATURE_DOUBLE)
    for case in vec["cases"]:
        assert (
            geo.cipher_size(case["plain_size"]) == case["cipher_size"] == len(case["cipher"]) // 2
        )


# --- a rekey under way (§2.5) ---------------------------------------------------------------


def test_rekeying_header_vector_exact_bytes() -> None:
    vec = vector("rekeying.json")
    f = vec["fields"]
    header = fmt.VolumeHeader(
        format_version=1,
        feature_flags=f["feature_flags"],
        cipher=1,
        block_size=f["block_size"],
        volume_id=bytes.fromhex(f["volume_id"]),
        slots=(fmt.KeySlot(f["vault_url"], f["kek_version"], f["wrapped_key"]),),
        retiring=tuple(fmt.KeySlot(**slot) for slot in f["retiring"]),
    )
    assert header.rekeying and header.tag_len == 64
    assert header.body().hex() == vec["body"]
    parsed, body, tag = fmt.parse_volume_header(bytes.fromhex(vec["file"]))
    assert parsed == header
    assert body.hex() == vec["body"]
    assert tag.hex() == vec["tag"] + vec["retiring_tag"]


def test_rekeying_header_refuses_a_cut_retiring_slot_or_a_missing_tag() -> None:
    raw = bytes.fromhex(vector("rekeying.json")["file"])
    for cut in (10, 40, 64 + 1, 64 + 20):
        with pytest.raises(FormatError):
            fmt.parse_volume_header(raw[:-cut])
    with pytest.raises(FormatError):
        fmt.parse_volume_header(raw + b"\0")
    # Without the flag, the retiring slot is trailing garbage.
    flags = struct.unpack_from(">I", raw, 10)[0]
    plain = raw[:10] + struct.pack(">I", flags & ~fmt.FEATURE_REKEYING) + raw[14:]
    with pytest.raises(FormatError):
        fmt.parse_volume_header(plain)


def test_a_double_rekeying_header_holds_two_retiring_slots() -> None:
    h = double_header()
    rekeying = dataclasses.replace(
        h, feature_flags=h.feature_flags | fmt.FEATURE_REKEYING, retiring=h.slots
    )
    raw = rekeying.body() + b"\x5a" * 64
    parsed = fmt.parse_volume_header(raw)[0]
    assert parsed.retiring == h.slots and parsed.slots == h.slots
    with pytest.raises(ValueError):
        dataclasses.replace(rekeying, retiring=h.slots[:1]).body()
    with pytest.raises(FormatError):
        fmt.parse_volume_header(raw[:-33])  # one tag, not two


def test_a_header_has_retiring_slots_exactly_when_rekeying() -> None:
    h = sample_header(feature_flags=fmt.FEATURE_REKEYING)
    with pytest.raises(ValueError):
        h.body()
    assert fmt.feature_names(fmt.FEATURE_REKEYING) == ["rekeying"]
