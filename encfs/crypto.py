"""Every cryptographic primitive encfs uses; the only importer of ``cryptography.hazmat``.

Primitives (docs/FORMAT.md): AES-256-GCM for content blocks, symlink targets and xattr
values; ChaCha20-Poly1305 for the outer layer of content blocks of a double-encrypted
volume; AES-SIV (AES-256, 64-byte key) for names; HKDF-SHA256 for key derivation;
HMAC-SHA256 for the volume header tag. Objects here hold key schedules inside OpenSSL; the
key owner (``keys.py``) creates them from its locked buffers and drops them on wipe.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import threading
from collections.abc import Iterator
from typing import Protocol, TypeAlias

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as hazmat_hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from encfs import format as fmt
from encfs.errors import IntegrityError

Buffer: TypeAlias = bytes | bytearray | memoryview


def random_bytes(n: int) -> bytes:
    """``n`` bytes from the OS CSPRNG (for ids and nonces, never for keys kept in memory)."""
    return os.urandom(n)


def random_key_into(buf: bytearray | memoryview) -> None:
    """Fill ``buf`` with key material from the OS CSPRNG.

    ``os.urandom`` would return an immutable ``bytes`` copy we could never wipe; reading
    /dev/urandom (the same pool as getrandom(2)) straight into the caller's buffer leaves none.
    """
    view = memoryview(buf)
    with open("/dev/urandom", "rb", buffering=0) as rng:
        filled = 0
        while filled < len(view):
            got = rng.readinto(view[filled:])
            if not got:
                raise OSError("short read from /dev/urandom")
            filled += got


def hkdf_into(ikm: Buffer, *, salt: bytes | None, info: bytes, out: bytearray | memoryview) -> None:
    """HKDF-SHA256(ikm, salt, info) written into ``out`` (its length is the output length)."""
    HKDF(algorithm=hashes.SHA256(), length=len(memoryview(out)), salt=salt, info=info).derive_into(
        ikm, out
    )


def header_tag(key: Buffer, body: bytes) -> bytes:
    """HMAC-SHA256 over the volume header body."""
    mac = hazmat_hmac.HMAC(key, hashes.SHA256())
    mac.update(body)
    return mac.finalize()


def open_transit_ciphertext(kek: Buffer, sealed: Buffer) -> bytearray:
    """Unwrap a Vault/OpenBao transit ``aes256-gcm96`` ciphertext locally (key release).

    ``sealed`` is the base64-decoded part after ``vault:vN:``: a 12-byte nonce, then the
    AES-256-GCM ciphertext and tag, no associated data. Returns the plaintext in a fresh
    ``bytearray`` the caller wipes. Raises ``IntegrityError`` when the tag does not verify
    (wrong KEK version, or a damaged wrapped key).
    """
    view = memoryview(sealed)
    if len(view) < 12 + 16:
        raise IntegrityError("wrapped key too short for AES-256-GCM")
    out = bytearray(len(view) - 12 - 16)
    try:
        AESGCM(kek).decrypt_into(view[:12], view[12:], None, out)
    except InvalidTag:
        raise IntegrityError("wrapped key does not authenticate under the exported KEK") from None
    finally:
        scrub_stack()
    return out


def tags_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


_SCRUB_LEN = 64
_SCRUB_NONCE = bytes(fmt.NONCE_LEN)
_SCRUB_PLAIN = bytes(_SCRUB_LEN)
_SCRUB_AEAD = AESGCM(bytes(32))  # an all-zero key: nothing secret, built once
_SCRUB_SEALED = _SCRUB_AEAD.encrypt(_SCRUB_NONCE, _SCRUB_PLAIN, None)


def scrub_stack() -> None:
    """Overwrite what OpenSSL's AES-GCM leaves of the last key on this thread's C stack.

    Measured here (OpenSSL 3 in pyca 45+, AES-NI): encrypting or decrypting a short input
    (under a few hundred bytes: the non-stitched code path) leaves the first 32 bytes of the
    key schedule — for AES-256 that is the raw key — on the calling thread's stack, where it
    stays until something overwrites it; freeing the cipher object does not. One short
    operation under an all-zero key, on the same thread, overwrites it. Costs ~2 µs; callers
    run it after short operations only (the long, stitched path leaves nothing behind).
    """
    _SCRUB_AEAD.encrypt(_SCRUB_NONCE, _SCRUB_PLAIN, None)
    _SCRUB_AEAD.decrypt(_SCRUB_NONCE, _SCRUB_SEALED, None)


class FileCipher(Protocol):
    """What the content of one file is sealed and opened with (``BlockCipher``, or
    ``RekeyingBlockCipher`` while the volume is re-keyed). See ``BlockCipher``."""

    def seal(self, first_block_no: int, plain: Buffer) -> bytearray: ...

    def open(self, first_block_no: int, cipher: Buffer, backing_path: str = "") -> bytearray: ...

    def plain_len(
        self, cipher_len: int, first_block_no: int = 0, backing_path: str = ""
    ) -> int: ...

    def open_into(
        self, first_block_no: int, cipher: Buffer, out: Buffer, backing_path: str = ""
    ) -> None: ...


class BlockCipher:
    """Seals and opens the content blocks of one file under its per-file key(s).

    Block ``n`` on disk is ``nonce(12) || AES-256-GCM(key, nonce, plain, ad) || tag(16)`` with
    ``ad = file_id || u64be(n)`` (FORMAT §5). With an ``outer_key`` (a double-encrypted
    volume, §5.2) that inner block is sealed once more: ``nonce2(12) ||
    ChaCha20-Poly1305(outer_key, nonce2, inner block, ad) || tag2(16)``, the same ``ad``.
    A block that is entirely zero bytes on disk is a hole and reads as zeros (sparse
    files); any other block that fails authentication, in either layer, raises
    ``IntegrityError`` naming the block. Thread-safe: the AEAD objects are stateless.

    Batches of ``GATE_MIN_BLOCKS`` or more run under ``gate``, a lock shared by the whole
    volume: pyca releases the GIL around every block, and several threads doing that at
    once spend their time handing the GIL back and forth (measured here: 1 MiB batches,
    4 threads 0.9 GB/s without the gate, 2.1 GB/s with it; one thread 2.4 GB/s).
    """

    GATE_MIN_BLOCKS = 8

    __slots__ = ("_aead", "_block_size", "_file_id", "_gate", "_outer", "overhead")

    def __init__(
        self,
        key: Buffer,
        file_id: bytes,
        block_size: int,
        gate: threading.Lock | None = None,
        outer_key: Buffer | None = None,
    ) -> None:
        self._aead = AESGCM(key)
        self._outer = None if outer_key is None else ChaCha20Poly1305(outer_key)
        self.overhead = fmt.BLOCK_OVERHEAD if outer_key is None else fmt.DOUBLE_BLOCK_OVERHEAD
        """Bytes each sealed block adds to its plaintext."""
        self._file_id = file_id
        self._block_size = block_size
        self._gate = gate or threading.Lock()

    def seal(self, first_block_no: int, plain: Buffer) -> bytearray:
        """Encrypt contiguous plaintext starting at block ``first_block_no``.

        Every block but the last must be full; returns the cipher bytes for them all.
        """
        seal = self._seal if self._outer is None else self._seal_double
        if len(plain) >= self.GATE_MIN_BLOCKS * self._block_size:
            with self._gate:
                return seal(first_block_no, plain)
        out = seal(first_block_no, plain)
        if len(plain) % self._block_size:  # a short last block: see scrub_stack
            scrub_stack()
        return out

    def _seal(self, first_block_no: int, plain: Buffer) -> bytearray:
        src = memoryview(plain)
        bs = self._block_size
        nblocks = -(-len(src) // bs)
        out = bytearray(len(src) + nblocks * fmt.BLOCK_OVERHEAD)
        dst = memoryview(out)
        nonces = os.urandom(fmt.NONCE_LEN * nblocks)
        aead = self._aead
        file_id = self._file_id
        plain_off = 0
        cipher_off = 0
        for i in range(nblocks):
            chunk = src[plain_off : plain_off + bs]
            nonce = nonces[i * fmt.NONCE_LEN : (i + 1) * fmt.NONCE_LEN]
            dst[cipher_off : cipher_off + fmt.NONCE_LEN] = nonce
            end = cipher_off + fmt.NONCE_LEN + len(chunk) + fmt.TAG_LEN
            aead.encrypt_into(
                nonce,
                chunk,
                fmt.block_ad(file_id, first_block_no + i),
                dst[cipher_off + fmt.NONCE_LEN : end],
            )
            plain_off += bs
            cipher_off = end
        return out

    def _seal_double(self, first_block_no: int, plain: Buffer) -> bytearray:
        """``_seal`` with the outer layer: per block, the inner block is sealed into one
        scratch buffer (pyca refuses overlapping input and output) and the outer layer
        from there straight into place; both layers share the block's associated data.
        The loop is the hot path of a double volume's writes: names are local, nothing is
        recomputed per block that need not be."""
        outer = self._outer
        assert outer is not None
        src = memoryview(plain)
        bs = self._block_size
        n12 = fmt.NONCE_LEN
        inner_over = fmt.BLOCK_OVERHEAD
        cbs = bs + fmt.DOUBLE_BLOCK_OVERHEAD
        total = len(src)
        nblocks = -(-total // bs)
        out = bytearray(total + nblocks * fmt.DOUBLE_BLOCK_OVERHEAD)
        dst = memoryview(out)
        nonces = memoryview(os.urandom(2 * n12 * nblocks))
        scratch = memoryview(bytearray(bs + inner_over))
        scratch_nonce = scratch[:n12]
        inner_full = scratch[: bs + inner_over]
        inner_out_full = scratch[n12 : bs + inner_over]
        seal_inner = self._aead.encrypt_into
        seal_outer = outer.encrypt_into
        ad_of = fmt.block_ad
        file_id = self._file_id
        block_no = first_block_no
        cipher_off = 0
        nonce_off = 0
        for plain_off in range(0, total, bs):
            chunk = src[plain_off : plain_off + bs]
            ad = ad_of(file_id, block_no)
            nonce = nonces[nonce_off : nonce_off + n12]
            nonce2 = nonces[nonce_off + n12 : nonce_off + 2 * n12]
            scratch_nonce[:] = nonce
            if len(chunk) == bs:
                seal_inner(nonce, chunk, ad, inner_out_full)
                inner = inner_full
            else:  # the short last block
                n = len(chunk)
                seal_inner(nonce, chunk, ad, scratch[n12 : n + inner_over])
                inner = scratch[: n + inner_over]
            end = cipher_off + len(inner) + inner_over
            dst[cipher_off : cipher_off + n12] = nonce2
            seal_outer(nonce2, inner, ad, dst[cipher_off + n12 : end])
            cipher_off += cbs
            nonce_off += 2 * n12
            block_no += 1
        return out

    def open(self, first_block_no: int, cipher: Buffer, backing_path: str = "") -> bytearray:
        """Decrypt contiguous cipher blocks starting at block ``first_block_no``.

        Raises ``IntegrityError`` (with ``backing_path`` and the block number) on the first
        block that fails authentication or is too short to be a block.
        """
        out = bytearray(self.plain_len(len(cipher), first_block_no, backing_path))
        self.open_into(first_block_no, cipher, out, backing_path)
        return out

    def plain_len(self, cipher_len: int, first_block_no: int = 0, backing_path: str = "") -> int:
        """Plaintext length of ``cipher_len`` bytes of contiguous blocks. Raises
        ``IntegrityError`` if the last block is too short to be one."""
        overhead = self.overhead
        cbs = self._block_size + overhead
        nblocks = -(-cipher_len // cbs)
        if 0 < cipher_len % cbs <= overhead:
            raise IntegrityError(
                "truncated block", backing_path=backing_path, block_no=first_block_no + nblocks - 1
            )
        return cipher_len - nblocks * overhead

    def open_into(
        self, first_block_no: int, cipher: Buffer, out: Buffer, backing_path: str = ""
    ) -> None:
        """``open``, decrypting into ``out`` (writable, exactly ``plain_len`` bytes long),
        e.g. libfuse's reply buffer. Raises ``IntegrityError`` as ``open`` does; ``out``
        then holds partial plaintext, which the caller must not hand out."""
        src = memoryview(cipher)
        dst = memoryview(out)
        if len(dst) != self.plain_len(len(src), first_block_no, backing_path):
            raise ValueError("output buffer does not fit the blocks")
        open_ = self._open if self._outer is None else self._open_double
        if len(src) >= self.GATE_MIN_BLOCKS * self._block_size:
            with self._gate:
                open_(first_block_no, src, dst, backing_path)
            return
        open_(first_block_no, src, dst, backing_path)
        if len(dst) % self._block_size:  # a short last block: see scrub_stack
            scrub_stack()

    def _open(
        self, first_block_no: int, src: memoryview, dst: memoryview, backing_path: str
    ) -> None:
        cbs = self._block_size + fmt.BLOCK_OVERHEAD
        aead = self._aead
        file_id = self._file_id
        cipher_off = 0
        plain_off = 0
        for i in range(-(-len(src) // cbs)):
            chunk = src[cipher_off : cipher_off + cbs]
            block_no = first_block_no + i
            plain_len = len(chunk) - fmt.BLOCK_OVERHEAD
            try:
                aead.decrypt_into(
                    chunk[: fmt.NONCE_LEN],
                    chunk[fmt.NONCE_LEN :],
                    fmt.block_ad(file_id, block_no),
                    dst[plain_off : plain_off + plain_len],
                )
            except InvalidTag:
                if chunk.tobytes().count(0) == len(chunk):  # all-zero on disk: a hole
                    dst[plain_off : plain_off + plain_len] = bytes(plain_len)
                else:
                    raise IntegrityError(
                        "block authentication failed", backing_path=backing_path, block_no=block_no
                    ) from None
            cipher_off += cbs
            plain_off += plain_len

    def _open_double(
        self, first_block_no: int, src: memoryview, dst: memoryview, backing_path: str
    ) -> None:
        """``_open`` through both layers: the outer opens into a scratch buffer (the inner
        block), the inner from there into ``dst``. An all-zero outer block is a hole. Hot
        path of a double volume's reads (see ``_seal_double``)."""
        outer = self._outer
        assert outer is not None
        n12 = fmt.NONCE_LEN
        bs = self._block_size
        over = fmt.DOUBLE_BLOCK_OVERHEAD
        cbs = bs + over
        scratch = memoryview(bytearray(bs + fmt.BLOCK_OVERHEAD))
        scratch_nonce = scratch[:n12]
        inner_full = scratch[: bs + fmt.BLOCK_OVERHEAD]
        inner_body_full = scratch[n12 : bs + fmt.BLOCK_OVERHEAD]
        open_inner = self._aead.decrypt_into
        open_outer = outer.decrypt_into
        ad_of = fmt.block_ad
        file_id = self._file_id
        block_no = first_block_no
        plain_off = 0
        for cipher_off in range(0, len(src), cbs):
            chunk = src[cipher_off : cipher_off + cbs]
            ad = ad_of(file_id, block_no)
            plain_len = len(chunk) - over
            try:
                if plain_len == bs:
                    open_outer(chunk[:n12], chunk[n12:], ad, inner_full)
                    open_inner(scratch_nonce, inner_body_full, ad, dst[plain_off : plain_off + bs])
                else:  # the short last block
                    inner_len = plain_len + fmt.BLOCK_OVERHEAD
                    open_outer(chunk[:n12], chunk[n12:], ad, scratch[:inner_len])
                    open_inner(
                        scratch_nonce,
                        scratch[n12:inner_len],
                        ad,
                        dst[plain_off : plain_off + plain_len],
                    )
            except InvalidTag:
                if chunk.tobytes().count(0) == len(chunk):  # all-zero on disk: a hole
                    dst[plain_off : plain_off + plain_len] = bytes(plain_len)
                else:
                    raise IntegrityError(
                        "block authentication failed", backing_path=backing_path, block_no=block_no
                    ) from None
            plain_off += plain_len
            block_no += 1


class NameCipher:
    """Deterministic name encryption: AES-SIV with the parent directory's id as associated data.

    Names are padded to a multiple of 16 bytes (PKCS#7) before encryption so that only their
    length class leaks, then encoded base64url without padding.
    """

    __slots__ = ("_siv",)

    def __init__(self, key: Buffer) -> None:
        self._siv = AESSIV(key)

    def encrypt(self, plain_name: bytes, ad: bytes) -> str:
        pad = fmt.NAME_PAD - len(plain_name) % fmt.NAME_PAD
        sealed = self._siv.encrypt(plain_name + bytes((pad,)) * pad, [ad])
        return base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii")

    def decrypt(self, encoded: str, ad: bytes) -> bytes:
        """Raises ``IntegrityError`` when the name is not one we encrypted under ``ad``."""
        try:
            raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            if b64encode(raw) != encoded:  # one name, one encoding: no aliases
                raise ValueError("non-canonical base64")
            padded = self._siv.decrypt(raw, [ad])
        except (InvalidTag, binascii.Error, ValueError):
            raise IntegrityError("name authentication failed", backing_path=encoded) from None
        pad = padded[-1] if padded else 0
        if not 1 <= pad <= fmt.NAME_PAD or padded[-pad:] != bytes((pad,)) * pad:
            raise IntegrityError("bad name padding", backing_path=encoded)
        return padded[:-pad]


class MetaCipher:
    """AES-256-GCM with a random nonce for small metadata: symlink targets, xattr values.

    Output is ``nonce || ciphertext || tag``; ``ad`` binds it to its purpose and owner.
    """

    __slots__ = ("_aead",)

    def __init__(self, key: Buffer) -> None:
        self._aead = AESGCM(key)

    def seal(self, plain: bytes, ad: bytes) -> bytes:
        nonce = os.urandom(fmt.NONCE_LEN)
        try:
            return nonce + self._aead.encrypt(nonce, plain, ad)
        finally:
            scrub_stack()

    def open(self, sealed: bytes, ad: bytes, what: str = "metadata") -> bytes:
        if len(sealed) < fmt.BLOCK_OVERHEAD:
            raise IntegrityError(f"{what} truncated")
        try:
            return self._aead.decrypt(sealed[: fmt.NONCE_LEN], sealed[fmt.NONCE_LEN :], ad)
        except InvalidTag:
            raise IntegrityError(f"{what} authentication failed") from None
        finally:
            scrub_stack()


_ZERO_NONCE = bytes(fmt.NONCE_LEN)


class RekeyingBlockCipher:
    """The block cipher of one file while the volume is re-keyed (``encfs rekey``): seals
    under the new key (``primary``); opens each block under the new key, else under the
    retiring one, so a file whose blocks are part re-sealed reads whole. Same interface as
    ``BlockCipher`` (duck-typed), plus ``reseal``. Per-block Python work: only while a
    rekey runs."""

    __slots__ = ("_cipher_block_size", "_primary", "_retiring")

    def __init__(self, primary: BlockCipher, retiring: BlockCipher, cipher_block_size: int) -> None:
        self._primary = primary
        self._retiring = retiring
        self._cipher_block_size = cipher_block_size

    def seal(self, first_block_no: int, plain: Buffer) -> bytearray:
        return self._primary.seal(first_block_no, plain)

    def plain_len(self, cipher_len: int, first_block_no: int = 0, backing_path: str = "") -> int:
        return self._primary.plain_len(cipher_len, first_block_no, backing_path)

    def open(self, first_block_no: int, cipher: Buffer, backing_path: str = "") -> bytearray:
        out = bytearray(self.plain_len(len(cipher), first_block_no, backing_path))
        self.open_into(first_block_no, cipher, out, backing_path)
        return out

    def open_into(
        self, first_block_no: int, cipher: Buffer, out: Buffer, backing_path: str = ""
    ) -> None:
        """As ``BlockCipher.open_into``; a block that fails under the new key is opened
        under the retiring one, and ``IntegrityError`` names the first that fails both."""
        try:
            self._primary.open_into(first_block_no, cipher, out, backing_path)
            return
        except IntegrityError:
            pass
        for block_no, src, dst in self._blocks(first_block_no, cipher, out):
            try:
                self._primary.open_into(block_no, src, dst, backing_path)
            except IntegrityError:
                self._retiring.open_into(block_no, src, dst, backing_path)

    def reseal(self, first_block_no: int, cipher: bytearray, backing_path: str = "") -> list[int]:
        """Re-seal under the new key, in place in ``cipher`` (whole blocks as on disk),
        every block that opens only under the retiring key; returns their block numbers
        (holes and blocks already under the new key stay as they are). Raises
        ``IntegrityError`` for a block that opens under neither (``cipher`` unchanged)."""
        if self._all_retiring(first_block_no, cipher, backing_path):
            return list(
                range(first_block_no, first_block_no + -(-len(cipher) // self._cipher_block_size))
            )
        changed: list[tuple[int, memoryview, bytearray]] = []
        try:
            for block_no, block, _ in self._blocks(first_block_no, cipher, None):
                plain = bytearray(self._primary.plain_len(len(block), block_no, backing_path))
                changed.append((block_no, block, plain))
                try:
                    self._primary.open_into(block_no, block, plain, backing_path)
                    plain[:] = bytes(len(plain))
                    changed.pop()
                except IntegrityError:
                    self._retiring.open_into(block_no, block, plain, backing_path)
            for block_no, block, plain in changed:
                block[:] = self._primary.seal(block_no, plain)
        finally:
            for _, _, plain in changed:
                plain[:] = bytes(len(plain))
        return [block_no for block_no, _, _ in changed]

    def _all_retiring(self, first_block_no: int, cipher: bytearray, backing_path: str) -> bool:
        """The common case, in two calls instead of two per block: every block opens under
        the retiring key and none is a hole; then re-sealed in place, and True. False
        (``cipher`` unchanged) when any block is a hole or opens only under another key."""
        cbs = self._cipher_block_size
        src = memoryview(cipher)
        nonce = fmt.NONCE_LEN
        if any(src[at : at + nonce] == _ZERO_NONCE for at in range(0, len(src), cbs)):
            return False  # maybe a hole (its nonce is zeros too): block by block instead
        plain = bytearray(self._primary.plain_len(len(src), first_block_no, backing_path))
        try:
            self._retiring.open_into(first_block_no, src, plain, backing_path)
            cipher[:] = self._primary.seal(first_block_no, plain)
        except IntegrityError:
            return False
        finally:
            plain[:] = bytes(len(plain))
        return True

    def _blocks(
        self, first_block_no: int, cipher: Buffer, out: Buffer | None
    ) -> Iterator[tuple[int, memoryview, memoryview]]:
        """(block number, its cipher bytes, its slice of ``out``; empty without) per block."""
        src = memoryview(cipher)
        dst = memoryview(out) if out is not None else None
        cbs = self._cipher_block_size
        plain_off = 0
        for i, cipher_off in enumerate(range(0, len(src), cbs)):
            block = src[cipher_off : cipher_off + cbs]
            plain_len = self._primary.plain_len(len(block), first_block_no + i)
            part = dst[plain_off : plain_off + plain_len] if dst is not None else block[:0]
            yield first_block_no + i, block, part
            plain_off += plain_len


class RekeyingNameCipher:
    """The name cipher while the volume is re-keyed: encrypts under the new key, decrypts
    under the new key else the retiring one. ``retiring`` encrypts the old form (a lookup
    must find entries not yet renamed)."""

    __slots__ = ("_primary", "retiring")

    def __init__(self, primary: NameCipher, retiring: NameCipher) -> None:
        self._primary = primary
        self.retiring = retiring

    def encrypt(self, plain_name: bytes, ad: bytes) -> str:
        return self._primary.encrypt(plain_name, ad)

    def decrypt(self, encoded: str, ad: bytes) -> bytes:
        try:
            return self._primary.decrypt(encoded, ad)
        except IntegrityError:
            return self.retiring.decrypt(encoded, ad)

    def is_current(self, encoded: str, ad: bytes) -> bool:
        """Whether ``encoded`` decrypts under the new key."""
        try:
            self._primary.decrypt(encoded, ad)
        except IntegrityError:
            return False
        return True


class RekeyingMetaCipher:
    """The metadata cipher while the volume is re-keyed: seals under the new key, opens
    under the new key else the retiring one."""

    __slots__ = ("_primary", "_retiring")

    def __init__(self, primary: MetaCipher, retiring: MetaCipher) -> None:
        self._primary = primary
        self._retiring = retiring

    def seal(self, plain: bytes, ad: bytes) -> bytes:
        return self._primary.seal(plain, ad)

    def open(self, sealed: bytes, ad: bytes, what: str = "metadata") -> bytes:
        try:
            return self._primary.open(sealed, ad, what)
        except IntegrityError:
            return self._retiring.open(sealed, ad, what)

    def is_current(self, sealed: bytes, ad: bytes) -> bool:
        """Whether ``sealed`` opens under the new key."""
        try:
            self._primary.open(sealed, ad)
        except IntegrityError:
            return False
        return True


def b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(text: str) -> bytes:
    """Raises ``IntegrityError`` for text that is not base64url."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise IntegrityError("bad encoding") from None


def sha256(data: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize()


# --- TLS material for the single-host vault ---
#
# ``encfs.bao.serve`` serves OpenBao over TLS on loopback with a CA of its own. Generating
# keys and signing certificates needs ``cryptography.hazmat``, so it lives here; reading
# certificates (``cryptography.x509``) is fine anywhere.


def make_tls_ca(*, days: int, common_name: str) -> tuple[bytes, bytes]:
    """A fresh CA for a vault's own TLS; returns ``(ca_pem, ca_key_pem)``.

    ECDSA P-256, valid for ``days``, named ``COMMON_NAME CA``; it may sign nothing but
    end-entity certificates (path length 0). ``ca_key_pem`` is the CA's unencrypted PKCS#8
    private key: whoever holds it can make certificates every client of this CA trusts, so
    the caller keeps it like the vault's unseal key (mode 0600, beside it) or drops it.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name} CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock steps
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    return (
        ca_cert.public_bytes(serialization.Encoding.PEM),
        ca_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def issue_tls_cert(
    ca_pem: bytes,
    ca_key_pem: bytes,
    *,
    dns_names: list[str],
    ip_addresses: list[str],
    days: int,
    common_name: str,
) -> tuple[bytes, bytes]:
    """A server certificate signed by the CA ``ca_pem`` / ``ca_key_pem``
    (``make_tls_ca``); returns ``(cert_pem, key_pem)``.

    ECDSA P-256, ``serverAuth`` only, ``dns_names`` and ``ip_addresses`` as subject
    alternative names, valid for ``days`` but never past the CA. ``key_pem`` is the
    server's unencrypted PKCS#8 private key; the caller writes it with mode 0600. Raises
    ``ValueError`` if the CA files do not parse or do not belong together.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or (
        ca_key.public_key().public_bytes(*spki) != ca_cert.public_key().public_bytes(*spki)
    ):
        raise ValueError("the CA key does not belong to the CA certificate")
    now = datetime.datetime.now(datetime.UTC)
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


# --- KMIP key release (local unwrap) ---
#
# pyca/OpenSSL leave a copy of the AES key on the C stack while setting up the key schedule
# (tests/vault/test_kmip.py finds it there after the KEK is zeroed). Running the same code
# path once more with an all-zero key overwrites those stack slots: best effort, but checked
# by that test's memory scan.


def kmip_gcm_seal(kek: Buffer, nonce: bytes, plain: Buffer, aad: bytes) -> bytes:
    """AES-GCM (128-bit tag) of ``plain`` under a KEK released by a KMIP server.

    Returns ``ciphertext || tag`` (nothing secret): byte for byte what the server's own
    Encrypt returns for the same nonce and associated data, so either side can open it.
    """
    try:
        return AESGCM(kek).encrypt(nonce, plain, aad)
    finally:
        AESGCM(bytes(len(memoryview(kek)))).encrypt(nonce, bytes(len(memoryview(plain))), aad)


def kmip_gcm_open(kek: Buffer, nonce: bytes, sealed: Buffer, aad: bytes) -> bytearray:
    """Open ``sealed`` (``ciphertext || 16-byte tag``) with a KEK released by a KMIP server.

    Returns the plaintext in a fresh ``bytearray`` the caller wipes (no ``bytes`` copy is
    made). Raises ``IntegrityError`` when the tag does not verify (another KEK, or a damaged
    wrapped key).
    """
    view = memoryview(sealed)
    if len(view) < 16:
        raise IntegrityError("wrapped key too short for AES-GCM")
    out = bytearray(len(view) - 16)
    try:
        AESGCM(kek).decrypt_into(nonce, view, aad, out)
    except InvalidTag:
        out[:] = bytes(len(out))
        raise IntegrityError("wrapped key does not authenticate under the released KEK") from None
    finally:
        scratch = bytearray(len(out))
        try:
            AESGCM(bytes(len(memoryview(kek)))).decrypt_into(nonce, view, aad, scratch)
        except InvalidTag:  # expected: the zero key is not the KEK
            scratch[:] = bytes(len(scratch))
    return out
