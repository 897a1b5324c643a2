"""encfs/crypto.py: block sealing, name and metadata encryption, against fixed vectors.

Content vectors pin the format without a fixed-nonce API: encfs must *open* the exact
bytes in tests/vectors/content.json. Names are deterministic, so their vectors pin the
exact encoding.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from hypothesis import given, settings
from hypothesis import strategies as st

from encfs import crypto
from encfs import format as fmt
from encfs.errors import IntegrityError

VECTORS = Path(__file__).parent / "vectors"
BS = 4096
CBS = BS + fmt.BLOCK_OVERHEAD
KEY = bytes(range(0x40, 0x60))
FILE_ID = bytes(range(0x10, 0x20))


def vector(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text())
    return data


def block_cipher(key: bytes = KEY, file_id: bytes = FILE_ID, bs: int = BS) -> crypto.BlockCipher:
    return crypto.BlockCipher(key, file_id, bs)


def subkey(purpose: str) -> bytes:
    for sub in vector("keys.json")["subkeys"]:
        if sub["purpose"] == purpose:
            return bytes.fromhex(sub["key"])
    raise KeyError(purpose)


# --- content blocks: vectors ------------------------------------------------------------------


@pytest.mark.parametrize("case", vector("content.json")["cases"], ids=lambda c: c["name"])
def test_open_content_vector(case: dict[str, Any]) -> None:
    vec = vector("content.json")
    cipher = bytes.fromhex(case["cipher"])
    file_id = fmt.parse_file_header(cipher)
    bc = crypto.BlockCipher(bytes.fromhex(vec["file_key"]), file_id, vec["block_size"])
    plain = bc.open(0, cipher[fmt.FILE_HEADER_LEN :])
    assert plain.hex() == case["plain"]
    assert len(plain) == case["plain_size"]


def test_open_content_vector_blockwise() -> None:
    """Blocks of the 5000-byte vector open one at a time at their own positions."""
    vec = vector("content.json")
    case = next(c for c in vec["cases"] if c["plain_size"] == 5000)
    cipher = bytes.fromhex(case["cipher"])
    bc = crypto.BlockCipher(bytes.fromhex(vec["file_key"]), bytes.fromhex(vec["file_id"]), BS)
    geo = fmt.Geometry(BS)
    b0 = cipher[geo.block_cipher_off(0) : geo.block_cipher_off(1)]
    b1 = cipher[geo.block_cipher_off(1) :]
    assert len(b0) == CBS
    assert len(b1) == 5000 - BS + fmt.BLOCK_OVERHEAD
    assert b0[: fmt.NONCE_LEN].hex() == case["nonces"][0]
    assert b1[: fmt.NONCE_LEN].hex() == case["nonces"][1]
    plain = bytes.fromhex(case["plain"])
    assert bc.open(0, b0) == plain[:BS]
    assert bc.open(1, b1) == plain[BS:]
    with pytest.raises(IntegrityError):
        bc.open(0, b1)


# --- content blocks: round trips ---------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=5 * BS + 17),
    first=st.integers(0, (1 << 40)),
)
def test_seal_open_round_trip(data: bytes, first: int) -> None:
    bc = block_cipher()
    sealed = bc.seal(first, data)
    nblocks = -(-len(data) // BS)
    assert len(sealed) == len(data) + nblocks * fmt.BLOCK_OVERHEAD
    assert bc.open(first, sealed) == data


@pytest.mark.parametrize("size", [1, BS - 1, BS, BS + 1, 3 * BS + 100, 9 * BS, 9 * BS + 5])
def test_seal_open_sizes(size: int) -> None:
    """Partial last blocks, exact multiples, and batches large enough to take the gate."""
    data = os.urandom(size)
    bc = block_cipher()
    sealed = bc.seal(0, data)
    assert len(sealed) == fmt.Geometry(BS).cipher_size(size) - fmt.FILE_HEADER_LEN
    assert bc.open(0, sealed) == data


def test_seal_uses_fresh_nonces() -> None:
    bc = block_cipher()
    a = bc.seal(0, bytes(2 * BS))
    b = bc.seal(0, bytes(2 * BS))
    assert a != b
    assert a[: fmt.NONCE_LEN] != a[CBS : CBS + fmt.NONCE_LEN]
    assert a[: fmt.NONCE_LEN] != b[: fmt.NONCE_LEN]


def test_seal_other_block_sizes() -> None:
    for bs in (8192, 65536):
        data = os.urandom(2 * bs + 3)
        bc = block_cipher(bs=bs)
        sealed = bc.seal(5, data)
        assert len(sealed) == len(data) + 3 * fmt.BLOCK_OVERHEAD
        assert bc.open(5, sealed) == data


# --- content blocks: tampering -----------------------------------------------------------------


def three_blocks() -> tuple[crypto.BlockCipher, bytes, bytearray]:
    data = os.urandom(2 * BS + 1000)
    bc = block_cipher()
    return bc, data, bc.seal(0, data)


@pytest.mark.parametrize(
    "offset",
    [0, fmt.NONCE_LEN - 1, fmt.NONCE_LEN, 100, CBS - fmt.TAG_LEN, CBS - 1],
    ids=["nonce0", "nonce11", "ct0", "ct100", "tag0", "tag15"],
)
@pytest.mark.parametrize("block", [0, 1, 2])
def test_flipped_bit_names_the_block(offset: int, block: int) -> None:
    bc, _data, sealed = three_blocks()
    pos = block * CBS + offset
    if pos >= len(sealed):
        pos = len(sealed) - 1
    sealed[pos] ^= 0x01
    with pytest.raises(IntegrityError) as info:
        bc.open(0, sealed, "/cipher/some-file")
    assert info.value.block_no == block
    assert info.value.backing_path == "/cipher/some-file"
    assert f"/cipher/some-file block {block}" in str(info.value)
    assert "authentication failed" in str(info.value)


def test_swapped_blocks_fail() -> None:
    bc, _data, sealed = three_blocks()
    b0, b1 = sealed[:CBS], sealed[CBS : 2 * CBS]
    swapped = b1 + b0 + sealed[2 * CBS :]
    with pytest.raises(IntegrityError) as info:
        bc.open(0, swapped)
    assert info.value.block_no == 0


def test_wrong_block_number_fails() -> None:
    bc, _data, sealed = three_blocks()
    with pytest.raises(IntegrityError) as info:
        bc.open(1, sealed[:CBS])
    assert info.value.block_no == 1
    with pytest.raises(IntegrityError) as info:
        bc.open(7, sealed)
    assert info.value.block_no == 7


def test_wrong_file_id_fails() -> None:
    """Same key, other file id: the associated data differs, so every block fails."""
    _bc, _data, sealed = three_blocks()
    other = block_cipher(file_id=bytes(16))
    with pytest.raises(IntegrityError) as info:
        other.open(0, sealed)
    assert info.value.block_no == 0


def test_wrong_key_fails() -> None:
    _bc, _data, sealed = three_blocks()
    with pytest.raises(IntegrityError):
        block_cipher(key=bytes(32)).open(0, sealed)


def test_truncated_block() -> None:
    bc, _data, sealed = three_blocks()
    with pytest.raises(IntegrityError, match="truncated block") as info:
        bc.open(0, sealed[: 2 * CBS + fmt.BLOCK_OVERHEAD])
    assert info.value.block_no == 2
    # Cutting inside a block's ciphertext leaves a block that fails authentication.
    with pytest.raises(IntegrityError, match="authentication failed") as info:
        bc.open(0, sealed[: 2 * CBS + 500])
    assert info.value.block_no == 2


@pytest.mark.parametrize("cut", [1, fmt.BLOCK_OVERHEAD - 1])
def test_short_trailing_fragment_is_a_truncated_block(cut: int) -> None:
    bc, _data, sealed = three_blocks()
    with pytest.raises(IntegrityError, match="truncated block") as info:
        bc.open(0, sealed[: 2 * CBS + cut])
    assert info.value.block_no == 2


def test_open_empty() -> None:
    assert block_cipher().open(0, b"") == bytearray()


# --- holes -------------------------------------------------------------------------------------


def test_all_zero_block_is_a_hole() -> None:
    bc, data, sealed = three_blocks()
    sealed[CBS : 2 * CBS] = bytes(CBS)
    plain = bc.open(0, sealed)
    assert plain[:BS] == data[:BS]
    assert plain[BS : 2 * BS] == bytes(BS)
    assert plain[2 * BS :] == data[2 * BS :]


def test_all_zero_partial_last_block_is_a_hole() -> None:
    """Also a documented weakness: zeroing any block, even the last partial one, is not
    detected (docs/FORMAT.md, security notes)."""
    bc, data, sealed = three_blocks()
    sealed[2 * CBS :] = bytes(len(sealed) - 2 * CBS)
    plain = bc.open(0, sealed)
    assert plain == data[: 2 * BS] + bytes(1000)


def test_almost_zero_block_is_not_a_hole() -> None:
    bc = block_cipher()
    block = bytearray(CBS)
    block[-1] = 1
    with pytest.raises(IntegrityError):
        bc.open(0, block)


def test_hole_vector() -> None:
    vec = vector("content.json")
    case = next(c for c in vec["cases"] if c["name"].startswith("hole"))
    cipher = bytes.fromhex(case["cipher"])
    assert cipher[fmt.FILE_HEADER_LEN : fmt.FILE_HEADER_LEN + CBS] == bytes(CBS)
    bc = crypto.BlockCipher(bytes.fromhex(vec["file_key"]), bytes.fromhex(vec["file_id"]), BS)
    assert bc.open(0, cipher[fmt.FILE_HEADER_LEN :]).hex() == case["plain"]


# --- names -------------------------------------------------------------------------------------


NAMES_KEY = bytes(range(64))
DIR_A = bytes(range(16))
DIR_B = bytes(range(1, 17))


def test_name_vectors() -> None:
    vec = vector("names.json")
    nc = crypto.NameCipher(bytes.fromhex(vec["names_key"]))
    for case in vec["cases"]:
        plain = bytes.fromhex(case["plain_hex"])
        dir_id = bytes.fromhex(case["dir_id"])
        assert nc.encrypt(plain, dir_id) == case["encoded"]
        assert nc.decrypt(case["encoded"], dir_id) == plain


def test_long_name_vectors_encoding() -> None:
    vec = vector("names.json")
    nc = crypto.NameCipher(bytes.fromhex(vec["names_key"]))
    for case in vec["long_names"]:
        plain = bytes.fromhex(case["plain_hex"])
        encoded = nc.encrypt(plain, bytes.fromhex(case["dir_id"]))
        assert encoded == case["encoded"]
        assert len(encoded) > fmt.MAX_BACKING_NAME
        digest = crypto.sha256(encoded.encode())
        assert fmt.LONGNAME_PREFIX + crypto.b64encode(digest) == case["backing_name"]


def test_name_vectors_through_names_module(tmp_path: Path) -> None:
    """The path layer (names.Names) yields the vector's backing names, short and long, and
    reads a long name back through its companion file."""
    from encfs import backing
    from encfs.keys import VolumeKeys
    from encfs.names import Names

    vec = vector("names.json")
    keys = VolumeKeys(
        bytearray.fromhex(vec["volume_key"]),
        volume_id=bytes.fromhex(vec["volume_id"]),
        block_size=BS,
    )
    try:
        root = backing.open_root(str(tmp_path))
        nm = Names(root, keys)
        for case in vec["cases"]:
            name = os.fsdecode(bytes.fromhex(case["plain_hex"]))
            entry = nm.child(root, bytes.fromhex(case["dir_id"]), name)
            assert entry.name == case["backing_name"]
            assert not entry.is_long
        for case in vec["long_names"]:
            name = os.fsdecode(bytes.fromhex(case["plain_hex"]))
            dir_id = bytes.fromhex(case["dir_id"])
            entry = nm.child(root, dir_id, name)
            assert entry.is_long
            assert entry.encoded == case["encoded"]
            assert entry.name == case["backing_name"]
            assert entry.companion == case["companion_name"]
            nm.add_companion(entry)
            assert (tmp_path / entry.companion).read_text() == case["companion_content"]
            got = nm.decrypt_backing_name(root, dir_id, case["backing_name"])
            assert got == name
    finally:
        keys.close()


def test_name_is_deterministic_per_directory() -> None:
    nc = crypto.NameCipher(NAMES_KEY)
    assert nc.encrypt(b"report.pdf", DIR_A) == nc.encrypt(b"report.pdf", DIR_A)
    assert nc.encrypt(b"report.pdf", DIR_A) != nc.encrypt(b"report.pdf", DIR_B)
    assert nc.encrypt(b"report.pdf", DIR_A) != nc.encrypt(b"report.pdg", DIR_A)
    other = crypto.NameCipher(bytes(64))
    assert nc.encrypt(b"report.pdf", DIR_A) != other.encrypt(b"report.pdf", DIR_A)


def test_name_from_other_directory_fails() -> None:
    nc = crypto.NameCipher(NAMES_KEY)
    enc = nc.encrypt(b"secret", DIR_A)
    with pytest.raises(IntegrityError, match="name authentication failed"):
        nc.decrypt(enc, DIR_B)


def test_name_padding_hides_length_within_16() -> None:
    nc = crypto.NameCipher(NAMES_KEY)
    for n in range(1, 256):
        padded = (n // 16 + 1) * 16
        enc = nc.encrypt(b"n" * n, DIR_A)
        raw = base64.urlsafe_b64decode(enc + "=" * (-len(enc) % 4))
        assert len(raw) == padded + 16  # SIV tag
        assert "=" not in enc
        assert set(enc) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        assert nc.decrypt(enc, DIR_A) == b"n" * n
    lengths = {len(nc.encrypt(b"n" * n, DIR_A)) for n in range(1, 16)}
    assert lengths == {43}


def test_name_padding_is_pkcs7() -> None:
    siv = AESSIV(NAMES_KEY)
    raw = siv.decrypt(
        base64.urlsafe_b64decode(crypto.NameCipher(NAMES_KEY).encrypt(b"abc", DIR_A) + "="),
        [DIR_A],
    )
    assert raw == b"abc" + bytes((13,)) * 13


@pytest.mark.parametrize(
    "padded",
    [b"abc" + bytes(13), b"abc" + bytes((14,)) * 13, bytes((17,)) * 16, b"x" * 15 + b"\x00"],
)
def test_name_bad_padding(padded: bytes) -> None:
    """A name that authenticates but is not PKCS#7-padded is refused."""
    enc = crypto.b64encode(AESSIV(NAMES_KEY).encrypt(padded, [DIR_A]))
    with pytest.raises(IntegrityError, match="bad name padding"):
        crypto.NameCipher(NAMES_KEY).decrypt(enc, DIR_A)


@pytest.mark.parametrize("pos", [0, 10, 21, 42])
def test_name_tampered(pos: int) -> None:
    nc = crypto.NameCipher(NAMES_KEY)
    enc = nc.encrypt(b"hello.txt", DIR_A)
    swap = "A" if enc[pos] != "A" else "B"
    bad = enc[:pos] + swap + enc[pos + 1 :]
    with pytest.raises(IntegrityError, match="name authentication failed") as info:
        nc.decrypt(bad, DIR_A)
    assert info.value.backing_path == bad


@pytest.mark.parametrize("bad", ["", "A", "AAAAA", "!!!!", "short"])
def test_name_garbage(bad: str) -> None:
    with pytest.raises(IntegrityError):
        crypto.NameCipher(NAMES_KEY).decrypt(bad, DIR_A)


def test_name_decrypt_accepts_only_the_canonical_encoding() -> None:
    nc = crypto.NameCipher(NAMES_KEY)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    enc = next(e for i in range(1000) if set("-_") & set(e := nc.encrypt(b"name%d" % i, DIR_A)))
    assert len(enc) == 43  # 32 bytes: the last character carries 2 spare bits
    spare_bits = enc[:-1] + alphabet[alphabet.index(enc[-1]) ^ 1]
    std_alphabet = enc.replace("-", "+").replace("_", "/")
    for variant in (spare_bits, std_alphabet):
        assert variant != enc
        with pytest.raises(IntegrityError):
            nc.decrypt(variant, DIR_A)


# --- metadata (symlink targets, xattr values) --------------------------------------------------


def test_symlink_vector() -> None:
    vec = vector("meta.json")
    mc = crypto.MetaCipher(bytes.fromhex(vec["meta_key"]))
    sym = vec["symlink"]
    sealed = crypto.b64decode(sym["backing_target"])
    assert sealed[: fmt.NONCE_LEN].hex() == sym["nonce"]
    assert mc.open(sealed, fmt.SYMLINK_AD, "symlink target").hex() == sym["target_hex"]
    assert sym["ad"].encode() == fmt.SYMLINK_AD


def test_xattr_vector() -> None:
    vec = vector("meta.json")
    x = vec["xattr"]
    nc = crypto.NameCipher(subkey("names"))
    plain_name = x["plain_name"][len(fmt.XATTR_PREFIX) :].encode()
    assert fmt.XATTR_BACKING_PREFIX + nc.encrypt(plain_name, fmt.XATTR_NAME_AD) == x["backing_name"]
    mc = crypto.MetaCipher(bytes.fromhex(vec["meta_key"]))
    value = mc.open(bytes.fromhex(x["backing_value_hex"]), x["backing_name"].encode())
    assert value.hex() == x["value_hex"]
    with pytest.raises(IntegrityError):
        mc.open(bytes.fromhex(x["backing_value_hex"]), b"user.encfs.other")


def test_meta_round_trip_and_fresh_nonce() -> None:
    mc = crypto.MetaCipher(KEY)
    a = mc.seal(b"/some/target", b"ad")
    b = mc.seal(b"/some/target", b"ad")
    assert a != b
    assert len(a) == len(b"/some/target") + fmt.BLOCK_OVERHEAD
    assert mc.open(a, b"ad") == mc.open(b, b"ad") == b"/some/target"
    assert mc.open(mc.seal(b"", b"ad"), b"ad") == b""


def test_meta_tamper_and_wrong_ad() -> None:
    mc = crypto.MetaCipher(KEY)
    sealed = bytearray(mc.seal(b"value", b"ad"))
    with pytest.raises(IntegrityError, match="symlink target authentication failed"):
        mc.open(bytes(sealed), b"other", "symlink target")
    for pos in (0, fmt.NONCE_LEN, len(sealed) - 1):
        bad = bytearray(sealed)
        bad[pos] ^= 0x80
        with pytest.raises(IntegrityError, match="metadata authentication failed"):
            mc.open(bytes(bad), b"ad")
    with pytest.raises(IntegrityError, match="xattr value truncated"):
        mc.open(bytes(sealed[:27]), b"ad", "xattr value")


# --- limits that follow from the encodings ------------------------------------------------


def test_long_name_threshold() -> None:
    """Plaintext names up to 159 bytes fit a 255-byte backing name; 160 and up are long."""
    nc = crypto.NameCipher(NAMES_KEY)
    assert len(nc.encrypt(b"a" * 159, DIR_A)) == 235
    assert len(nc.encrypt(b"a" * 160, DIR_A)) == 256 > fmt.MAX_BACKING_NAME
    assert len(nc.encrypt(b"a" * fmt.MAX_PLAIN_NAME, DIR_A)) == 363


def test_longest_symlink_target_fits_the_backing_fs() -> None:
    sealed = crypto.MetaCipher(KEY).seal(b"t" * fmt.MAX_SYMLINK_TARGET, fmt.SYMLINK_AD)
    assert len(crypto.b64encode(sealed)) == 4038 <= 4095


def test_longest_xattr_name_fits_xattr_name_max() -> None:
    nc = crypto.NameCipher(NAMES_KEY)
    longest = fmt.XATTR_BACKING_PREFIX + nc.encrypt(
        b"x" * fmt.MAX_PLAIN_XATTR_NAME, fmt.XATTR_NAME_AD
    )
    assert len(longest) <= 255
    one_more = fmt.XATTR_BACKING_PREFIX + nc.encrypt(
        b"x" * (fmt.MAX_PLAIN_XATTR_NAME + 1), fmt.XATTR_NAME_AD
    )
    assert len(one_more) > 255


# --- helpers -----------------------------------------------------------------------------------


def test_b64_helpers() -> None:
    for n in range(40):
        data = os.urandom(n)
        text = crypto.b64encode(data)
        assert "=" not in text
        assert crypto.b64decode(text) == data
    with pytest.raises(IntegrityError, match="bad encoding"):
        crypto.b64decode("A")


def test_header_tag_vector() -> None:
    vec = vector("header.json")
    tag = crypto.header_tag(subkey("header"), bytes.fromhex(vec["body"]))
    assert tag.hex() == vec["tag"]
    assert crypto.tags_equal(tag, bytes.fromhex(vec["tag"]))
    assert not crypto.tags_equal(tag, bytes(32))


def test_hkdf_into_vector() -> None:
    vec = vector("keys.json")
    for sub in vec["subkeys"]:
        out = bytearray(sub["length"])
        crypto.hkdf_into(
            bytes.fromhex(vec["volume_key"]),
            salt=bytes.fromhex(vec["volume_id"]),
            info=sub["info"].encode(),
            out=out,
        )
        assert out.hex() == sub["key"]


def test_random_key_into_fills_the_buffer() -> None:
    buf = bytearray(64)
    crypto.random_key_into(memoryview(buf)[16:48])
    assert buf[:16] == bytes(16)
    assert buf[48:] == bytes(16)
    assert buf[16:48] != bytes(32)
    assert len(crypto.random_bytes(16)) == 16


# --- double encryption: the outer ChaCha20-Poly1305 layer ---------------------------------------

DOUBLE = vector("double-content.json")
DCBS = BS + fmt.DOUBLE_BLOCK_OVERHEAD
OUTER = bytes(range(0x60, 0x80))


def double_cipher(file_id: bytes = FILE_ID, bs: int = BS) -> crypto.BlockCipher:
    return crypto.BlockCipher(KEY, file_id, bs, outer_key=OUTER)


def outer_seal(key: bytes, nonce: bytes, inner: bytes, ad: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    return nonce + ChaCha20Poly1305(key).encrypt(nonce, inner, ad)


def inner_seal(key: bytes, nonce: bytes, plain: bytes, ad: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return nonce + AESGCM(key).encrypt(nonce, plain, ad)


@pytest.mark.parametrize("case", DOUBLE["cases"], ids=lambda c: c["name"])
def test_open_double_content_vector(case: dict[str, Any]) -> None:
    cipher = bytes.fromhex(case["cipher"])
    file_id = fmt.parse_file_header(cipher)
    bc = crypto.BlockCipher(
        bytes.fromhex(DOUBLE["file_key"]),
        file_id,
        DOUBLE["block_size"],
        outer_key=bytes.fromhex(DOUBLE["outer_file_key"]),
    )
    assert bc.open(0, cipher[fmt.FILE_HEADER_LEN :]).hex() == case["plain"]
    # Each block's layers: outer nonce first, the inner block (with its nonce) inside.
    for block_no, (n1, n2) in enumerate(
        zip(case["inner_nonces"], case["outer_nonces"], strict=True)
    ):
        if n1 is None:
            continue
        off = fmt.FILE_HEADER_LEN + block_no * DCBS
        assert cipher[off : off + 12].hex() == n2


@pytest.mark.parametrize("case", DOUBLE["cases"], ids=lambda c: c["name"])
def test_volume_keys_open_double_content_vector(case: dict[str, Any]) -> None:
    """The per-file inner and outer keys derived by ``VolumeKeys`` from the two volume keys
    open the vector (docs/FORMAT.md §3.1)."""
    from encfs.keys import VolumeKeys

    keys = VolumeKeys(
        bytearray.fromhex(DOUBLE["volume_key"]),
        volume_id=bytes.fromhex(DOUBLE["volume_id"]),
        block_size=DOUBLE["block_size"],
        outer_key=bytearray.fromhex(DOUBLE["outer_key"]),
    )
    try:
        cipher = bytes.fromhex(case["cipher"])
        plain = keys.file_cipher(fmt.parse_file_header(cipher)).open(0, cipher[18:])
        assert plain.hex() == case["plain"]
    finally:
        keys.close()


@pytest.mark.parametrize("bs", [4096, 8192, 65536])
@pytest.mark.parametrize("blocks_and_rest", [(0, 1), (0, 100), (1, 0), (1, 1), (3, 0), (9, 777)])
def test_double_round_trip_every_size_class(bs: int, blocks_and_rest: tuple[int, int]) -> None:
    full, rest = blocks_and_rest
    if rest >= bs:
        pytest.skip("rest is less than a block")
    plain = os.urandom(full * bs + rest)
    bc = double_cipher(bs=bs)
    for first in (0, 5):
        sealed = bc.seal(first, plain)
        geo = fmt.Geometry(bs, fmt.DOUBLE_BLOCK_OVERHEAD)
        assert len(sealed) == geo.cipher_size(len(plain)) - fmt.FILE_HEADER_LEN
        assert bytes(bc.open(first, sealed)) == plain
        out = bytearray(len(plain))
        bc.open_into(first, sealed, out)
        assert bytes(out) == plain
        with pytest.raises(IntegrityError):  # the position is bound
            bc.open(first + 1, sealed)


def test_double_nonces_are_fresh_per_layer_and_write() -> None:
    bc = double_cipher()
    a, b = bc.seal(0, b"x" * BS), bc.seal(0, b"x" * BS)
    assert a != b
    assert a[:12] != b[:12] and a[12:24] != a[:12]  # outer nonce, and the inner one inside


def test_double_hole_and_partial_zero_block() -> None:
    bc = double_cipher()
    data = bc.seal(0, os.urandom(3 * BS))
    holed = bytes(DCBS) + data[DCBS:]
    out = bc.open(0, holed)
    assert bytes(out[:BS]) == bytes(BS)
    short = bc.seal(0, b"tail")  # a last block of 4 bytes: 60 zero bytes are its hole
    assert bytes(bc.open(0, bytes(len(short)))) == bytes(4)
    with pytest.raises(IntegrityError):  # zeroing the outer layer's tag only is no hole
        bc.open(0, short[:-16] + bytes(16))


@pytest.mark.parametrize("where", [0, 5, 12, 30, 2000, DCBS - 30, DCBS - 1])
def test_double_tamper_anywhere_fails(where: int) -> None:
    """A bit flipped in the outer nonce, the inner nonce (inside the outer ciphertext), the
    inner ciphertext or either tag: the block fails."""
    bc = double_cipher()
    sealed = bytearray(bc.seal(0, os.urandom(2 * BS)))
    sealed[DCBS + where] ^= 0x01
    with pytest.raises(IntegrityError) as info:
        bc.open(0, sealed, "backing/f")
    assert info.value.block_no == 1


def test_inner_valid_outer_not_and_the_reverse() -> None:
    """Both layers must authenticate: a genuine inner block under a wrong outer key (or
    outer associated data) fails; so does a wrong inner block under a genuine outer layer."""
    bc = double_cipher()
    plain = os.urandom(BS)
    ad = fmt.block_ad(FILE_ID, 0)
    inner = inner_seal(KEY, os.urandom(12), plain, ad)
    good = outer_seal(OUTER, os.urandom(12), inner, ad)
    assert bytes(bc.open(0, good)) == plain  # the construction as FORMAT §5.2 says
    for bad in (
        outer_seal(bytes(32), os.urandom(12), inner, ad),  # wrong outer key
        outer_seal(OUTER, os.urandom(12), inner, fmt.block_ad(FILE_ID, 1)),  # wrong outer AD
        outer_seal(OUTER, os.urandom(12), inner_seal(bytes(32), os.urandom(12), plain, ad), ad),
        outer_seal(OUTER, os.urandom(12), inner_seal(KEY, os.urandom(12), plain, b"x" * 24), ad),
        outer_seal(OUTER, os.urandom(12), bytes(len(inner)), ad),  # an all-zero inner block
        inner + bytes(28),  # a single-layer block padded to the double size
    ):
        with pytest.raises(IntegrityError):
            bc.open(0, bad)


def test_double_blocks_swapped_or_moved_fail() -> None:
    bc = double_cipher()
    sealed = bc.seal(0, os.urandom(3 * BS))
    b0, b1, b2 = sealed[:DCBS], sealed[DCBS : 2 * DCBS], sealed[2 * DCBS :]
    with pytest.raises(IntegrityError):
        bc.open(0, b1 + b0 + b2)
    other = double_cipher(file_id=bytes(16))
    with pytest.raises(IntegrityError):
        other.open(0, sealed)


def test_single_and_double_blocks_are_not_interchangeable() -> None:
    single, double = block_cipher(), double_cipher()
    assert single.overhead == 28 and double.overhead == 56
    with pytest.raises(IntegrityError):
        double.open(0, single.seal(0, os.urandom(BS)) + bytes(28))
    with pytest.raises(IntegrityError):
        single.open(0, double.seal(0, os.urandom(BS))[:CBS])
    with pytest.raises(IntegrityError, match="truncated"):  # 1..56 trailing bytes
        double.open(0, double.seal(0, os.urandom(BS)) + b"x" * 56)
