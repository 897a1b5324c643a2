"""encfs/keys.py: derivation against the vectors, caching, wipe, and what never leaks."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from encfs import crypto
from encfs import format as fmt
from encfs import keys as keys_mod
from encfs.errors import HeaderAuthError, IntegrityError, VolumeSuspended
from encfs.keys import VolumeKeys

VECTORS = Path(__file__).parent / "vectors"


def vector(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text())
    return data


KEYS = vector("keys.json")
VOLUME_KEY = bytes.fromhex(KEYS["volume_key"])
VOLUME_ID = bytes.fromhex(KEYS["volume_id"])


def make_keys(block_size: int = 4096) -> VolumeKeys:
    return VolumeKeys(bytearray(VOLUME_KEY), volume_id=VOLUME_ID, block_size=block_size)


def arena_bytes(keys: VolumeKeys) -> bytes:
    return bytes(keys._arena.view)


@pytest.fixture
def vkeys() -> Iterator[VolumeKeys]:
    k = make_keys()
    yield k
    k.close()


# --- derivation --------------------------------------------------------------------------------


def test_subkeys_match_vectors(vkeys: VolumeKeys) -> None:
    labels = set()
    for sub in KEYS["subkeys"]:
        labels.add(sub["info"])
        got = bytes(vkeys._slot(sub["purpose"]))
        assert got.hex() == sub["key"], sub["purpose"]
        assert len(got) == sub["length"]
    assert labels == {"encfs/v1/content", "encfs/v1/names", "encfs/v1/meta", "encfs/v1/header"}
    assert bytes(vkeys._slot("volume")) == VOLUME_KEY


def test_file_keys_match_vectors(vkeys: VolumeKeys) -> None:
    """The per-file key is observable through the cipher: it opens what the vector's key
    sealed, and nothing sealed under another file's key."""
    content = vector("content.json")
    assert content["file_key"] == KEYS["file_keys"][0]["key"]
    for case in content["cases"]:
        raw = bytes.fromhex(case["cipher"])
        file_id = fmt.parse_file_header(raw)
        plain = vkeys.file_cipher(file_id).open(0, raw[fmt.FILE_HEADER_LEN :])
        assert plain.hex() == case["plain"]
    # The scratch slot that held the per-file key is zeroed again.
    assert bytes(vkeys._slot("scratch")) == bytes(32)


def test_names_and_meta_use_the_vector_keys(vkeys: VolumeKeys) -> None:
    names = vector("names.json")
    case = names["cases"][0]
    assert (
        vkeys.names.encrypt(bytes.fromhex(case["plain_hex"]), bytes.fromhex(case["dir_id"]))
        == (case["encoded"])
    )
    meta = vector("meta.json")
    from encfs import crypto

    sealed = crypto.b64decode(meta["symlink"]["backing_target"])
    assert vkeys.meta.open(sealed, fmt.SYMLINK_AD).hex() == meta["symlink"]["target_hex"]


def test_header_tag_matches_vector(vkeys: VolumeKeys) -> None:
    vec = vector("header.json")
    body = bytes.fromhex(vec["body"])
    assert vkeys.header_tag(body).hex() == vec["tag"]
    vkeys.verify_header(body, bytes.fromhex(vec["tag"]))
    with pytest.raises(HeaderAuthError, match="header tag mismatch"):
        vkeys.verify_header(body + b"x", bytes.fromhex(vec["tag"]))
    with pytest.raises(HeaderAuthError):
        vkeys.verify_header(body, bytes(32))


def test_other_volume_id_gives_other_keys() -> None:
    a = make_keys()
    b = VolumeKeys(bytearray(VOLUME_KEY), volume_id=bytes(16), block_size=4096)
    try:
        for purpose in ("content", "names", "meta", "header"):
            assert bytes(a._slot(purpose)) != bytes(b._slot(purpose))
    finally:
        a.close()
        b.close()


def test_volume_key_length_checked() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        VolumeKeys(bytearray(31), volume_id=VOLUME_ID, block_size=4096)


def test_caller_copy_is_not_kept() -> None:
    """The keys live in the arena: changing the caller's buffer changes nothing."""
    buf = bytearray(VOLUME_KEY)
    k = VolumeKeys(buf, volume_id=VOLUME_ID, block_size=4096)
    try:
        buf[:] = bytes(32)
        assert bytes(k._slot("volume")) == VOLUME_KEY
        assert k.header_tag(b"x") == make_keys().header_tag(b"x")
    finally:
        k.close()


# --- file cipher cache -------------------------------------------------------------------------


def test_file_cipher_is_cached(vkeys: VolumeKeys) -> None:
    a = vkeys.file_cipher(bytes(16))
    assert vkeys.file_cipher(bytes(16)) is a
    assert vkeys.file_cipher(b"\x01" * 16) is not a


def test_file_cipher_cache_is_bounded(vkeys: VolumeKeys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys_mod, "_FILE_CIPHER_CACHE_MAX", 4)
    for i in range(10):
        vkeys.file_cipher(i.to_bytes(16, "big"))
        assert len(vkeys._file_ciphers) <= 4


def test_file_cipher_concurrent(vkeys: VolumeKeys) -> None:
    results: list[bytes] = []
    file_id = b"\x07" * 16

    def work() -> None:
        bc = vkeys.file_cipher(file_id)
        results.append(bytes(bc.open(0, bc.seal(0, b"same"))))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [b"same"] * 8


def test_file_cipher_uses_configured_block_size() -> None:
    k = make_keys(block_size=8192)
    try:
        sealed = k.file_cipher(bytes(16)).seal(0, bytes(8192 + 1))
        assert len(sealed) == 8192 + 1 + 2 * fmt.BLOCK_OVERHEAD
    finally:
        k.close()


# --- wipe --------------------------------------------------------------------------------------


def test_wipe_zeroes_the_arena_and_suspends() -> None:
    k = make_keys()
    file_id = bytes(16)
    k.file_cipher(file_id)
    assert VOLUME_KEY in arena_bytes(k)
    assert not k.wiped
    k.wipe()
    assert k.wiped
    assert arena_bytes(k) == bytes(len(arena_bytes(k)))
    assert k._file_ciphers == {}
    with pytest.raises(VolumeSuspended):
        _ = k.names
    with pytest.raises(VolumeSuspended):
        _ = k.meta
    with pytest.raises(VolumeSuspended):
        k.file_cipher(file_id)  # was cached before the wipe
    with pytest.raises(VolumeSuspended):
        k.file_cipher(b"\x02" * 16)
    with pytest.raises(VolumeSuspended):
        k.header_tag(b"body")
    with pytest.raises(VolumeSuspended):
        k.verify_header(b"body", bytes(32))
    k.wipe()  # idempotent
    assert k.wiped
    k.close()


def test_close_wipes_and_releases() -> None:
    k = make_keys()
    view = k._arena.view
    k.close()
    assert k.wiped
    with pytest.raises(ValueError):
        bytes(view)  # released
    with pytest.raises(VolumeSuspended):
        _ = k.names


# --- nothing leaks -----------------------------------------------------------------------------


def test_repr_has_no_key_bytes(vkeys: VolumeKeys) -> None:
    text = repr(vkeys) + str(vkeys)
    assert text == "<VolumeKeys loaded><VolumeKeys loaded>"
    for secret in [VOLUME_KEY] + [bytes.fromhex(s["key"]) for s in KEYS["subkeys"]]:
        assert secret.hex() not in text
        assert repr(secret)[2:-1] not in text
    vkeys.wipe()
    assert repr(vkeys) == "<VolumeKeys wiped>"


def test_memory_lock_state(vkeys: VolumeKeys) -> None:
    state = vkeys.memory_lock
    assert state.dontdump, state.detail  # MADV_DONTDUMP exists on every Linux we run on
    if state.mlocked:
        with open("/proc/self/status") as f:
            locked_kb = next(int(line.split()[1]) for line in f if line.startswith("VmLck:"))
        assert locked_kb >= 4
    else:
        assert "mlock failed" in state.detail


def test_arena_is_one_page_and_slots_do_not_overlap() -> None:
    spans = sorted(keys_mod._SLOTS.values())
    for (off_a, len_a), (off_b, _len_b) in itertools.pairwise(spans):
        assert off_a + len_a <= off_b
    last_off, last_len = spans[-1]
    assert last_off + last_len <= keys_mod._ARENA_SIZE


# --- double encryption: two volume keys ---------------------------------------------------------

DOUBLE = vector("double-keys.json")
OUTER_KEY = bytes.fromhex(DOUBLE["outer_key"])


def make_double(block_size: int = 4096) -> VolumeKeys:
    return VolumeKeys(
        bytearray(VOLUME_KEY),
        volume_id=VOLUME_ID,
        block_size=block_size,
        outer_key=bytearray(OUTER_KEY),
    )


def test_double_subkeys_match_vectors() -> None:
    k = make_double()
    try:
        assert k.double
        assert k.geometry == fmt.Geometry(4096, fmt.DOUBLE_BLOCK_OVERHEAD)
        for sub in DOUBLE["subkeys"]:  # names, meta, header: from both keys
            assert bytes(k._slot(sub["purpose"])).hex() == sub["key"], sub["purpose"]
        assert bytes(k._slot("content")).hex() == DOUBLE["content_key"]  # as a single volume's
        assert bytes(k._slot("outer_content")).hex() == DOUBLE["outer_content"]["key"]
        assert bytes(k._slot("volume")) == VOLUME_KEY
        assert bytes(k._slot("outer")) == OUTER_KEY
        single = make_keys()
        try:
            for purpose in ("names", "meta", "header"):  # neither key alone gives them
                assert bytes(k._slot(purpose)) != bytes(single._slot(purpose))
        finally:
            single.close()
        for entry in DOUBLE["file_keys"]:
            assert k.own_file_cipher(bytes.fromhex(entry["file_id"])).overhead == 56
        assert bytes(k._slot("scratch")) == bytes(32)
        assert bytes(k._slot("scratch_outer")) == bytes(32)
    finally:
        k.close()


def test_double_header_tag_matches_vector() -> None:
    vec = vector("double-header.json")
    k = make_double()
    try:
        k.verify_header(bytes.fromhex(vec["body"]), bytes.fromhex(vec["tag"]))
        with pytest.raises(HeaderAuthError):  # the single-layer header key does not do
            make_keys().verify_header(bytes.fromhex(vec["body"]), bytes.fromhex(vec["tag"]))
    finally:
        k.close()


def test_double_check_values_catch_either_key() -> None:
    """One check value per key slot: substituting either key changes one of them; slot 0's
    is a single volume's check value of the same key (pins of either kind compare it)."""
    k = make_double()
    other_outer = VolumeKeys(
        bytearray(VOLUME_KEY), volume_id=VOLUME_ID, block_size=4096, outer_key=bytearray(32)
    )
    other_inner = VolumeKeys(
        bytearray(32), volume_id=VOLUME_ID, block_size=4096, outer_key=bytearray(OUTER_KEY)
    )
    single = make_keys()
    try:
        a, b = k.check_values()
        assert len({a, b}) == 2 and k.check_value() == a
        assert keys_mod.key_check_value(bytearray(OUTER_KEY), VOLUME_ID, slot=1) == b
        assert single.check_values() == (a,)
        assert other_outer.check_values() == (a, other_outer.check_values()[1]) != (a, b)
        assert other_inner.check_values()[1] == b and other_inner.check_values()[0] != a
        # The same key in slot 1 does not give slot 0's value: the labels differ.
        assert keys_mod.key_check_value(bytearray(VOLUME_KEY), VOLUME_ID, slot=1) != a
    finally:
        for keys in (k, other_outer, other_inner, single):
            keys.close()


def test_double_load_needs_exactly_its_keys() -> None:
    k = make_double()
    single = make_keys()
    try:
        k.wipe()
        with pytest.raises(ValueError, match="outer key"):
            k.load(bytearray(VOLUME_KEY))
        with pytest.raises(ValueError, match="outer key"):
            single.load(bytearray(VOLUME_KEY), bytearray(OUTER_KEY))
        with pytest.raises(ValueError, match="32 bytes"):
            k.load(bytearray(VOLUME_KEY), bytearray(31))
        k.load(bytearray(VOLUME_KEY), bytearray(OUTER_KEY))
        assert k.check_values() == make_double().check_values()
    finally:
        k.close()
        single.close()


def test_double_wipe_zeroes_both_keys() -> None:
    k = make_double()
    k.file_cipher(bytes(16))
    assert VOLUME_KEY in arena_bytes(k) and OUTER_KEY in arena_bytes(k)
    k.wipe()
    assert arena_bytes(k) == bytes(len(arena_bytes(k)))
    with pytest.raises(VolumeSuspended):
        k.check_values()
    k.close()


# --- a rekey under way -------------------------------------------------------------------------

NEW_KEY = bytes(range(0x40, 0x60))
FILE_ID = bytes(range(0xF0, 0x100))


def new_keys() -> VolumeKeys:
    return VolumeKeys(bytearray(NEW_KEY), volume_id=VOLUME_ID, block_size=4096)


def test_retire_seals_under_the_new_key_and_opens_under_both(vkeys: VolumeKeys) -> None:
    old_data = b"old data" * 512  # a whole block: only the last may be short
    old_sealed = vkeys.file_cipher(FILE_ID).seal(0, old_data)
    old_name = vkeys.names.encrypt(b"name", bytes(16))
    old_meta = vkeys.meta.seal(b"target", b"ad")
    vkeys.retire(new_keys())
    assert vkeys.retiring is not None
    fresh = new_keys()
    try:
        new_sealed = vkeys.file_cipher(FILE_ID).seal(1, b"new data")
        assert fresh.own_file_cipher(FILE_ID).open(1, new_sealed) == b"new data"  # new key
        assert vkeys.file_cipher(FILE_ID).open(0, old_sealed + new_sealed) == old_data + b"new data"
        assert vkeys.names.decrypt(old_name, bytes(16)) == b"name"
        assert vkeys.names.encrypt(b"name", bytes(16)) == fresh.names.encrypt(b"name", bytes(16))
        assert vkeys.meta.open(old_meta, b"ad") == b"target"
        assert vkeys.check_value() == fresh.check_value()
    finally:
        fresh.close()
    vkeys.end_rekey()
    assert vkeys.retiring is None
    with pytest.raises(IntegrityError):
        vkeys.file_cipher(FILE_ID).open(0, old_sealed)
    with pytest.raises(IntegrityError):
        vkeys.names.decrypt(old_name, bytes(16))


def test_reseal_moves_only_old_blocks_and_refuses_foreign_ones(vkeys: VolumeKeys) -> None:
    old = vkeys.file_cipher(FILE_ID).seal(0, bytes(4096) + b"\x01" * 4096)
    vkeys.retire(new_keys())
    cipher = vkeys.file_cipher(FILE_ID)
    assert isinstance(cipher, crypto.RekeyingBlockCipher)
    mixed = bytearray(old[:4124] + cipher.seal(1, b"\x02" * 4096) + bytes(4124))  # + a hole
    assert cipher.reseal(0, mixed) == [0]
    assert mixed[4124:] == old[:0] + mixed[4124:]  # block 1 and the hole untouched
    fresh = new_keys()
    try:
        assert fresh.own_file_cipher(FILE_ID).open(0, mixed) == bytes(
            4096
        ) + b"\x02" * 4096 + bytes(4096)
    finally:
        fresh.close()
    foreign = bytearray(old)
    foreign[100] ^= 1
    before = bytes(foreign)
    with pytest.raises(IntegrityError):
        cipher.reseal(0, foreign)
    assert bytes(foreign) == before  # nothing changed when a block opens under neither


def test_rekeying_header_needs_both_tags(vkeys: VolumeKeys) -> None:
    vec = vector("rekeying.json")
    assert bytes.fromhex(vec["retiring_volume_key"]) == VOLUME_KEY
    body, tag = bytes.fromhex(vec["body"]), bytes.fromhex(vec["tag"])
    retiring_tag = bytes.fromhex(vec["retiring_tag"])
    current = new_keys()
    try:
        with pytest.raises(HeaderAuthError):  # no retiring key: the second tag cannot hold
            current.verify_header(body, tag + retiring_tag)
        current.load_retiring(bytearray(VOLUME_KEY))
        current.verify_header(body, tag + retiring_tag)
        assert current.header_tags(body) == tag + retiring_tag
        with pytest.raises(HeaderAuthError):
            current.verify_header(body, tag + bytes(32))
        with pytest.raises(HeaderAuthError):
            current.verify_header(body, bytes(32) + retiring_tag)
    finally:
        current.close()


def test_wipe_takes_the_retiring_keys_too_and_resume_brings_them_back(vkeys: VolumeKeys) -> None:
    old_sealed = vkeys.file_cipher(FILE_ID).seal(0, b"kept")
    vkeys.retire(new_keys())
    retiring = vkeys.retiring
    assert retiring is not None
    vkeys.wipe()
    assert retiring.wiped and not any(arena_bytes(retiring))
    with pytest.raises(VolumeSuspended):
        vkeys.file_cipher(FILE_ID)
    vkeys.load(bytearray(NEW_KEY))
    vkeys.load_retiring(bytearray(VOLUME_KEY))
    assert vkeys.file_cipher(FILE_ID).open(0, old_sealed) == b"kept"
