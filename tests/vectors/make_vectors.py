"""Generator of the known-answer vectors in this directory. RUN ONCE; NEVER REGENERATE.

This script is kept for the record: it shows how every vector was computed. It deliberately
does not import ``encfs``: it re-implements format v1 from docs/FORMAT.md with the bare
primitives (AES-256-GCM, AES-SIV, HKDF-SHA256, HMAC-SHA256) and fixed inputs, including
fixed nonces where encfs would draw random ones. The tests then check that encfs itself
derives the same keys, produces the same deterministic encodings and opens the same fixed
ciphertexts. If encfs and a vector disagree, encfs changed the format: fix encfs, or define
format v2 (docs/FORMAT.md, "Changing the format"). Do not edit or regenerate the JSON.

    python tests/vectors/make_vectors.py          # refuses to overwrite existing vectors
    python tests/vectors/make_vectors.py --check  # recompute and compare, writes nothing
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import struct
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

HERE = Path(__file__).resolve().parent

# --- fixed inputs (TEST VALUES ONLY) ---------------------------------------------------------

VOLUME_KEY = bytes(range(0x00, 0x20))
VOLUME_ID = bytes(range(0xA0, 0xB0))
FILE_ID = bytes(range(0xF0, 0x100))
BLOCK_SIZE = 4096
DIR_ID = bytes(range(0xD0, 0xE0))
OTHER_DIR_ID = bytes(range(0xE0, 0xF0))
OUTER_KEY = bytes(range(0x20, 0x40))  # the second volume key of a DOUBLE volume (key slot 1)


def nonce(tag: int, block_no: int = 0) -> bytes:
    """A fixed, recognisable 12-byte nonce (encfs draws these from the CSPRNG)."""
    return bytes((tag,)) * 4 + struct.pack(">Q", block_no)


def pattern(n: int, seed: int) -> bytes:
    """Deterministic plaintext: byte i is (i * 31 + seed) mod 256."""
    return bytes((i * 31 + seed) & 0xFF for i in range(n))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# --- format v1, re-implemented from the spec -------------------------------------------------


def hkdf(ikm: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


SUBKEYS = {"content": 32, "names": 64, "meta": 32, "header": 32}


def subkey(purpose: str) -> bytes:
    return hkdf(VOLUME_KEY, VOLUME_ID, b"encfs/v1/" + purpose.encode(), SUBKEYS[purpose])


def file_key(file_id: bytes) -> bytes:
    return hkdf(subkey("content"), None, b"encfs/v1/file" + file_id, 32)


def seal_file(file_id: bytes, plain: bytes, nonce_tag: int) -> bytes:
    """File header || blocks, with nonce(nonce_tag, block_no) for each block."""
    if not plain:
        return b""
    aead = AESGCM(file_key(file_id))
    out = [struct.pack(">H16s", 1, file_id)]
    for block_no, off in enumerate(range(0, len(plain), BLOCK_SIZE)):
        n = nonce(nonce_tag, block_no)
        ad = struct.pack(">16sQ", file_id, block_no)
        out.append(n + aead.encrypt(n, plain[off : off + BLOCK_SIZE], ad))
    return b"".join(out)


def encrypt_name(name: bytes, ad: bytes) -> str:
    pad = 16 - len(name) % 16
    return b64url(AESSIV(subkey("names")).encrypt(name + bytes((pad,)) * pad, [ad]))


def seal_meta(plain: bytes, ad: bytes, nonce_tag: int) -> bytes:
    n = nonce(nonce_tag)
    return n + AESGCM(subkey("meta")).encrypt(n, plain, ad)


# --- the vectors -----------------------------------------------------------------------------


def keys_vectors() -> dict[str, Any]:
    return {
        "description": "HKDF-SHA256 subkeys of a fixed volume key (docs/FORMAT.md, key hierarchy)",
        "volume_key": VOLUME_KEY.hex(),
        "volume_id": VOLUME_ID.hex(),
        "subkeys": [
            {
                "purpose": purpose,
                "salt": "volume_id",
                "info": f"encfs/v1/{purpose}",
                "length": length,
                "key": subkey(purpose).hex(),
            }
            for purpose, length in SUBKEYS.items()
        ],
        "file_keys": [
            {
                "file_id": fid.hex(),
                "info_hex": (b"encfs/v1/file" + fid).hex(),
                "key": file_key(fid).hex(),
            }
            for fid in (FILE_ID, bytes(16))
        ],
    }


def content_vectors() -> dict[str, Any]:
    cases = []
    for name, size, seed, tag in (
        ("one byte", 1, 0x41, 0x11),
        ("one full block", 4096, 0x07, 0x22),
        ("two blocks, the second partial", 5000, 0x5A, 0x33),
    ):
        plain = pattern(size, seed)
        sealed = seal_file(FILE_ID, plain, tag)
        cases.append(
            {
                "name": name,
                "plain_size": size,
                "plain": plain.hex(),
                "plain_sha256": hashlib.sha256(plain).hexdigest(),
                "nonces": [nonce(tag, b).hex() for b in range(-(-size // BLOCK_SIZE))],
                "cipher_size": len(sealed),
                "cipher": sealed.hex(),
            }
        )
    # A hole: block 0 is all zero bytes on disk (never written), block 1 holds 10 bytes.
    tail = pattern(10, 0x99)
    header = struct.pack(">H16s", 1, FILE_ID)
    n = nonce(0x44, 1)
    block1 = n + AESGCM(file_key(FILE_ID)).encrypt(n, tail, struct.pack(">16sQ", FILE_ID, 1))
    hole = header + bytes(BLOCK_SIZE + 28) + block1
    cases.append(
        {
            "name": "hole: all-zero block 0, then 10 bytes in block 1",
            "plain_size": BLOCK_SIZE + 10,
            "plain": (bytes(BLOCK_SIZE) + tail).hex(),
            "plain_sha256": hashlib.sha256(bytes(BLOCK_SIZE) + tail).hexdigest(),
            "nonces": [None, n.hex()],
            "cipher_size": len(hole),
            "cipher": hole.hex(),
        }
    )
    return {
        "description": "Backing files as they sit on disk: file header (u16be 1, file id) then "
        "blocks nonce(12) || AES-256-GCM ciphertext || tag(16), AD = file_id || u64be(block_no)",
        "volume_key": VOLUME_KEY.hex(),
        "volume_id": VOLUME_ID.hex(),
        "block_size": BLOCK_SIZE,
        "file_id": FILE_ID.hex(),
        "file_key": file_key(FILE_ID).hex(),
        "cases": cases,
    }


def names_vectors() -> dict[str, Any]:
    plain_names = [
        b"hello.txt",
        b"fifteen-bytes!!",  # 15: one pad byte
        b"sixteen-bytes!!!",  # 16: a whole block of padding
        "ünïcødé 名前.txt".encode(),
        b"a" * 159,  # longest name that is not a long name
    ]
    cases = []
    for plain in plain_names:
        for label, dir_id in (("dir", DIR_ID), ("other_dir", OTHER_DIR_ID)):
            enc = encrypt_name(plain, dir_id)
            cases.append(
                {
                    "plain_hex": plain.hex(),
                    "dir_id": dir_id.hex(),
                    "dir": label,
                    "encoded": enc,
                    "backing_name": enc,
                }
            )
    long_cases = []
    printable = bytes(c for c in range(0x20, 0x7F) if c != 0x2F)  # no "/"
    for plain in (b"L" * 160, (printable * 3)[:255]):  # shortest and longest long names
        enc = encrypt_name(plain, DIR_ID)
        long_cases.append(
            {
                "plain_hex": plain.hex(),
                "plain_len": len(plain),
                "dir_id": DIR_ID.hex(),
                "encoded": enc,
                "backing_name": "encfs.ln." + b64url(hashlib.sha256(enc.encode()).digest()),
                "companion_name": "encfs.ln."
                + b64url(hashlib.sha256(enc.encode()).digest())
                + ".name",
                "companion_content": enc,
            }
        )
    return {
        "description": "Name encryption: PKCS#7 pad to 16, AES-SIV(names key, AD = [dir id]), "
        "base64url without padding; encodings over 255 chars stored as encfs.ln.<hash>",
        "volume_key": VOLUME_KEY.hex(),
        "volume_id": VOLUME_ID.hex(),
        "names_key": subkey("names").hex(),
        "cases": cases,
        "long_names": long_cases,
    }


def meta_vectors() -> dict[str, Any]:
    target = b"../some/where/target.txt"
    sealed_target = seal_meta(target, b"encfs/v1/symlink", 0x55)
    xattr_name = b"comment"  # the part after "user."
    xattr_backing = "user.encfs." + encrypt_name(xattr_name, b"encfs/v1/xattr-name")
    xattr_value = b"\x00binary\xffvalue"
    sealed_value = seal_meta(xattr_value, xattr_backing.encode(), 0x66)
    return {
        "description": "Symlink targets and xattrs: AES-256-GCM under the meta key, "
        "nonce || ciphertext || tag; xattr names AES-SIV under the names key",
        "volume_key": VOLUME_KEY.hex(),
        "volume_id": VOLUME_ID.hex(),
        "meta_key": subkey("meta").hex(),
        "symlink": {
            "target_hex": target.hex(),
            "ad": "encfs/v1/symlink",
            "nonce": nonce(0x55).hex(),
            "backing_target": b64url(sealed_target),
        },
        "xattr": {
            "plain_name": "user." + xattr_name.decode(),
            "name_ad": "encfs/v1/xattr-name",
            "backing_name": xattr_backing,
            "value_hex": xattr_value.hex(),
            "value_ad": "the backing name, UTF-8",
            "nonce": nonce(0x66).hex(),
            "backing_value_hex": sealed_value.hex(),
        },
    }


def header_vectors() -> dict[str, Any]:
    url = "transit+https://vault.example:8200/transit/encfs-kek"
    wrapped = "vault:v3:VGhpcyBpcyBub3QgYSByZWFsIHdyYXBwZWQga2V5LCBqdXN0IGJ5dGVzLg=="
    fields = {
        "format_version": 1,
        "feature_flags": 0,
        "cipher": 1,
        "block_size": 8192,
        "volume_id": VOLUME_ID.hex(),
        "vault_url": url,
        "kek_version": 3,
        "wrapped_key": wrapped,
    }
    body = b"".join(
        (
            struct.pack(">8sHIBBI16s", b"ENCFSVOL", 1, 0, 1, 0, 8192, VOLUME_ID),
            struct.pack(">H", len(url)),
            url.encode(),
            struct.pack(">I", 3),
            struct.pack(">H", len(wrapped)),
            wrapped.encode(),
        )
    )
    tag = hmac.new(subkey("header"), body, hashlib.sha256).digest()
    return {
        "description": "A complete volume header file (encfs.volume): body || HMAC-SHA256"
        "(header key, body)",
        "volume_key": VOLUME_KEY.hex(),
        "fields": fields,
        "body": body.hex(),
        "tag": tag.hex(),
        "file": (body + tag).hex(),
    }


# --- double encryption (feature flag DOUBLE, bit 1), added 2026-12 -----------------------------
#
# Written with the format flag, from docs/FORMAT.md §2.1, §3.1 and §5.2 alone: the keys,
# files and header above stay exactly as they were.

FEATURE_DOUBLE = 1 << 1
OUTER_CHACHA20_POLY1305 = 2
DOUBLE_SUBKEYS = {"names": 64, "meta": 32, "header": 32}


def double_subkey(purpose: str) -> bytes:
    """names / meta / header of a DOUBLE volume: IKM = volume key || outer key."""
    info = b"encfs/v1/double/" + purpose.encode()
    return hkdf(VOLUME_KEY + OUTER_KEY, VOLUME_ID, info, DOUBLE_SUBKEYS[purpose])


def outer_content_key() -> bytes:
    return hkdf(OUTER_KEY, VOLUME_ID, b"encfs/v1/outer-content", 32)


def outer_file_key(file_id: bytes) -> bytes:
    return hkdf(outer_content_key(), None, b"encfs/v1/outer-file" + file_id, 32)


def seal_double_block(file_id: bytes, block_no: int, plain: bytes, tag: int) -> bytes:
    """nonce2 || ChaCha20-Poly1305(outer file key, nonce2, inner block, AD) || tag2, with
    inner block = nonce || AES-256-GCM(file key, nonce, plain, AD) || tag; one AD for both."""
    ad = struct.pack(">16sQ", file_id, block_no)
    n = nonce(tag, block_no)
    inner = n + AESGCM(file_key(file_id)).encrypt(n, plain, ad)
    n2 = nonce(tag + 1, block_no)
    return n2 + ChaCha20Poly1305(outer_file_key(file_id)).encrypt(n2, inner, ad)


def seal_double_file(file_id: bytes, plain: bytes, tag: int) -> bytes:
    if not plain:
        return b""
    out = [struct.pack(">H16s", 1, file_id)]
    for block_no, off in enumerate(range(0, len(plain), BLOCK_SIZE)):
        out.append(seal_double_block(file_id, block_no, plain[off : off + BLOCK_SIZE], tag))
    return b"".join(out)


def double_keys_vectors() -> dict[str, Any]:
    return {
        "description": "Keys of a DOUBLE volume (docs/FORMAT.md §3.1): inner content and "
        "file keys as in keys.json from the volume key (slot 0); outer content and outer "
        "file keys from the outer key (slot 1); names, meta and header keys from both "
        "(IKM = volume key || outer key)",
        "volume_key": VOLUME_KEY.hex(),
        "outer_key": OUTER_KEY.hex(),
        "volume_id": VOLUME_ID.hex(),
        "content_key": subkey("content").hex(),
        "outer_content": {
            "ikm": "outer_key",
            "salt": "volume_id",
            "info": "encfs/v1/outer-content",
            "length": 32,
            "key": outer_content_key().hex(),
        },
        "subkeys": [
            {
                "purpose": purpose,
                "ikm": "volume_key || outer_key",
                "salt": "volume_id",
                "info": f"encfs/v1/double/{purpose}",
                "length": length,
                "key": double_subkey(purpose).hex(),
            }
            for purpose, length in DOUBLE_SUBKEYS.items()
        ],
        "file_keys": [
            {
                "file_id": fid.hex(),
                "key": file_key(fid).hex(),
                "outer_info_hex": (b"encfs/v1/outer-file" + fid).hex(),
                "outer_key": outer_file_key(fid).hex(),
            }
            for fid in (FILE_ID, bytes(16))
        ],
    }


def double_content_vectors() -> dict[str, Any]:
    cases = []
    for name, size, seed, tag in (
        ("one byte", 1, 0x41, 0x11),
        ("one full block", 4096, 0x07, 0x22),
        ("two blocks, the second partial", 5000, 0x5A, 0x33),
    ):
        plain = pattern(size, seed)
        sealed = seal_double_file(FILE_ID, plain, tag)
        blocks = range(-(-size // BLOCK_SIZE))
        cases.append(
            {
                "name": name,
                "plain_size": size,
                "plain": plain.hex(),
                "plain_sha256": hashlib.sha256(plain).hexdigest(),
                "inner_nonces": [nonce(tag, b).hex() for b in blocks],
                "outer_nonces": [nonce(tag + 1, b).hex() for b in blocks],
                "cipher_size": len(sealed),
                "cipher": sealed.hex(),
            }
        )
    tail = pattern(10, 0x99)
    header = struct.pack(">H16s", 1, FILE_ID)
    hole = header + bytes(BLOCK_SIZE + 56) + seal_double_block(FILE_ID, 1, tail, 0x44)
    cases.append(
        {
            "name": "hole: all-zero block 0, then 10 bytes in block 1",
            "plain_size": BLOCK_SIZE + 10,
            "plain": (bytes(BLOCK_SIZE) + tail).hex(),
            "plain_sha256": hashlib.sha256(bytes(BLOCK_SIZE) + tail).hexdigest(),
            "inner_nonces": [None, nonce(0x44, 1).hex()],
            "outer_nonces": [None, nonce(0x45, 1).hex()],
            "cipher_size": len(hole),
            "cipher": hole.hex(),
        }
    )
    return {
        "description": "Backing files of a DOUBLE volume: file header (u16be 1, file id) then "
        "blocks nonce2(12) || ChaCha20-Poly1305(outer file key, nonce2, inner block, AD) || "
        "tag2(16), inner block = nonce(12) || AES-256-GCM(file key, nonce, plain, AD) || "
        "tag(16), AD = file_id || u64be(block_no) for both layers",
        "volume_key": VOLUME_KEY.hex(),
        "outer_key": OUTER_KEY.hex(),
        "volume_id": VOLUME_ID.hex(),
        "block_size": BLOCK_SIZE,
        "file_id": FILE_ID.hex(),
        "file_key": file_key(FILE_ID).hex(),
        "outer_file_key": outer_file_key(FILE_ID).hex(),
        "cases": cases,
    }


def double_header_vectors() -> dict[str, Any]:
    url = "transit+https://vault.example:8200/transit/encfs-kek"
    wrapped = "vault:v3:VGhpcyBpcyBub3QgYSByZWFsIHdyYXBwZWQga2V5LCBqdXN0IGJ5dGVzLg=="
    url2 = "kmip://kms.example:5696/outer-kek-17"
    wrapped2 = "kmip:v1:" + b64url(bytes(range(60)))
    flags = 1 | FEATURE_DOUBLE  # DIRID_LINKS | DOUBLE, as `encfs init --double` makes it

    def slot(u: str, version: int, w: str) -> bytes:
        return b"".join(
            (
                struct.pack(">H", len(u)),
                u.encode(),
                struct.pack(">I", version),
                struct.pack(">H", len(w)),
                w.encode(),
            )
        )

    body = b"".join(
        (
            struct.pack(
                ">8sHIBBI16s", b"ENCFSVOL", 1, flags, 1, OUTER_CHACHA20_POLY1305, 8192, VOLUME_ID
            ),
            slot(url, 3, wrapped),
            slot(url2, 0, wrapped2),
        )
    )
    tag = hmac.new(double_subkey("header"), body, hashlib.sha256).digest()
    return {
        "description": "A complete DOUBLE volume header file: fixed part with byte 15 = outer "
        "cipher 2 (ChaCha20-Poly1305), key slot 0 then key slot 1 (same shape), then "
        "HMAC-SHA256(double header key, body)",
        "volume_key": VOLUME_KEY.hex(),
        "outer_key": OUTER_KEY.hex(),
        "fields": {
            "format_version": 1,
            "feature_flags": flags,
            "cipher": 1,
            "outer_cipher": OUTER_CHACHA20_POLY1305,
            "block_size": 8192,
            "volume_id": VOLUME_ID.hex(),
            "slots": [
                {"vault_url": url, "kek_version": 3, "wrapped_key": wrapped},
                {"vault_url": url2, "kek_version": 0, "wrapped_key": wrapped2},
            ],
        },
        "body": body.hex(),
        "tag": tag.hex(),
        "file": (body + tag).hex(),
    }


NEW_VOLUME_KEY = bytes(range(0x40, 0x60))
"""The volume key a rekey replaces ``VOLUME_KEY`` with (TEST VALUE)."""


def rekeying_vectors() -> dict[str, Any]:
    """A header written while a rekey is under way (FORMAT.md §2.5): the new key's slot as
    §2.1, then the retiring key's slot, then the new key's tag and the retiring key's tag."""
    url = "transit+https://vault.example:8200/transit/encfs-kek"
    wrapped_new = "vault:v4:TmV3IHZvbHVtZSBrZXksIHdyYXBwZWQgZm9yIHRoZSB2ZWN0b3Iu"
    wrapped_old = "vault:v3:VGhpcyBpcyBub3QgYSByZWFsIHdyYXBwZWQga2V5LCBqdXN0IGJ5dGVzLg=="
    flags = 1 | 4  # DIRID_LINKS | REKEYING

    def slot(kek_version: int, wrapped: str) -> bytes:
        return b"".join(
            (
                struct.pack(">H", len(url)),
                url.encode(),
                struct.pack(">I", kek_version),
                struct.pack(">H", len(wrapped)),
                wrapped.encode(),
            )
        )

    body = b"".join(
        (
            struct.pack(">8sHIBBI16s", b"ENCFSVOL", 1, flags, 1, 0, 4096, VOLUME_ID),
            slot(4, wrapped_new),
            slot(3, wrapped_old),
        )
    )
    new_header_key = hkdf(NEW_VOLUME_KEY, VOLUME_ID, b"encfs/v1/header", 32)
    tag = hmac.new(new_header_key, body, hashlib.sha256).digest()
    retiring_tag = hmac.new(subkey("header"), body, hashlib.sha256).digest()
    return {
        "description": "A volume header during a rekey (flag REKEYING): body (new key's "
        "slot, then the retiring key's) || HMAC-SHA256(new header key, body) || "
        "HMAC-SHA256(retiring header key, body)",
        "volume_key": NEW_VOLUME_KEY.hex(),
        "retiring_volume_key": VOLUME_KEY.hex(),
        "fields": {
            "feature_flags": flags,
            "block_size": 4096,
            "volume_id": VOLUME_ID.hex(),
            "vault_url": url,
            "kek_version": 4,
            "wrapped_key": wrapped_new,
            "retiring": [{"vault_url": url, "kek_version": 3, "wrapped_key": wrapped_old}],
        },
        "body": body.hex(),
        "tag": tag.hex(),
        "retiring_tag": retiring_tag.hex(),
        "file": (body + tag + retiring_tag).hex(),
    }


VECTORS = {
    "keys.json": keys_vectors,
    "content.json": content_vectors,
    "names.json": names_vectors,
    "meta.json": meta_vectors,
    "header.json": header_vectors,
    "double-keys.json": double_keys_vectors,
    "double-content.json": double_content_vectors,
    "double-header.json": double_header_vectors,
    "rekeying.json": rekeying_vectors,
}


def render(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1, ensure_ascii=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args(argv)
    status = 0
    for name, make in VECTORS.items():
        path = HERE / name
        text = render(make())
        if args.check:
            same = path.exists() and path.read_text() == text
            print(f"{name}: {'same' if same else 'DIFFERENT'}")
            status |= not same
        elif path.exists():
            print(f"{name}: exists; vectors are never regenerated", file=sys.stderr)
            status = 1
        else:
            path.write_text(text)
            print(f"{name}: written")
    return status


if __name__ == "__main__":
    sys.exit(main())
