"""A volume on disk: create it, read and atomically replace its header, unlock its keys.

The header is the one file whose loss loses the volume, so every replacement is crash-safe:
write ``encfs.volume.tmp``, fsync it, keep the current header as ``encfs.volume.prev`` (a
hard link), rename the new one over ``encfs.volume``, fsync the directory. A reader that
finds no ``encfs.volume`` but a ``.prev`` (a crash between steps) falls back to it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from encfs import backing, crypto, names
from encfs import format as fmt
from encfs.errors import FormatError, UnsafeCipherDir, VolumeExists, VolumeNotFound
from encfs.keys import VolumeKeys
from encfs.vault import KeyWrapper, wrapped_kek_version


@dataclass(frozen=True)
class HeaderFile:
    """A parsed header as read from disk, with the bytes its tag covers."""

    header: fmt.VolumeHeader
    body: bytes
    tag: bytes
    path: Path


def check_cipher_dir_safe(cipher_dir: Path) -> None:
    """When encfs runs as root, the cipher dir must be owned by root and closed to group and
    others (mode 0700 or narrower): whoever may write into it could plant symbolic links
    and files for the root daemon to follow. Raises ``UnsafeCipherDir`` naming the fix; does
    nothing for a non-root user (who can only harm their own files) or a missing directory
    (the caller reports that)."""
    if os.geteuid() != 0:
        return
    try:
        st = os.stat(cipher_dir)
    except FileNotFoundError:
        return
    problems = []
    if st.st_uid != 0:
        problems.append(f"owned by uid {st.st_uid}, not root")
    if st.st_mode & 0o077:
        problems.append(f"mode {stat.S_IMODE(st.st_mode):04o} lets group or others in")
    if problems:
        raise UnsafeCipherDir(
            f"cipher dir {cipher_dir} is {' and '.join(problems)}; encfs runs as root and "
            "refuses a cipher dir others may change",
            hint=f"chmod 700 {cipher_dir}; chown root {cipher_dir}",
        )


def header_path(cipher_dir: Path) -> Path:
    return cipher_dir / fmt.VOLUME_HEADER_NAME


def require_cipher_dir(cipher_dir: Path) -> None:
    """Raise ``VolumeNotFound`` unless ``cipher_dir`` is a directory."""
    if not cipher_dir.is_dir():
        raise VolumeNotFound(f"cipher directory {cipher_dir} does not exist or is not a directory")


_HEADER_READ_MAX = 1 << 16
"""More than any header can be (its variable part is the URL and the wrapped key)."""


def read_header(cipher_dir: Path) -> HeaderFile:
    """Read and structurally check the header, through the door (a link or special file
    in its place is refused, never followed or opened). Raises ``VolumeNotFound`` or
    ``FormatError``."""
    require_cipher_dir(cipher_dir)
    root = backing.open_root(str(cipher_dir))
    for name in (fmt.VOLUME_HEADER_NAME, fmt.VOLUME_HEADER_PREV):
        candidate = cipher_dir / name
        try:
            raw = root.read_small(name, _HEADER_READ_MAX)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise FormatError(f"cannot read volume header {candidate}: {exc.strerror}") from None
        try:
            header, body, tag = fmt.parse_volume_header(raw)
        except FormatError as exc:
            raise type(exc)(f"{candidate}: {exc}") from None
        return HeaderFile(header=header, body=body, tag=tag, path=candidate)
    raise VolumeNotFound(
        f"{cipher_dir} holds no encfs volume (no {fmt.VOLUME_HEADER_NAME}); "
        "create one with `encfs init`"
    )


def write_header_atomic(cipher_dir: Path, raw: bytes) -> None:
    """Replace the header crash-safely (see module docstring), through the door: the
    temporary file is made new (``O_EXCL``), nothing planted under the three names is
    followed. Raises ``OSError``."""
    root = backing.open_root(str(cipher_dir))
    with contextlib.suppress(FileNotFoundError):
        root.unlink(fmt.VOLUME_HEADER_TMP)  # left by a crash
    root.write_new(fmt.VOLUME_HEADER_TMP, raw, 0o600)
    if root.exists(fmt.VOLUME_HEADER_NAME):
        with contextlib.suppress(FileNotFoundError):
            root.unlink(fmt.VOLUME_HEADER_PREV)
        backing.link(root, fmt.VOLUME_HEADER_NAME, root, fmt.VOLUME_HEADER_PREV)
        root.fsync()
    backing.rename(root, fmt.VOLUME_HEADER_TMP, root, fmt.VOLUME_HEADER_NAME)
    root.fsync()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_header_bytes(header: fmt.VolumeHeader, keys: VolumeKeys) -> bytes:
    body = header.body()
    return body + keys.header_tag(body)


def prepare_cipher_dir(cipher_dir: Path) -> str:
    """Make ``cipher_dir`` ready for ``init``: created 0700 if missing; an existing one must
    be an empty directory. As root an existing empty directory owned by root is narrowed
    to 0700, one owned by another user is refused (``UnsafeCipherDir``: that user could
    still change it). Returns a note for the operator when it changed a mode, else ""."""
    if not cipher_dir.exists():
        cipher_dir.mkdir(mode=0o700, parents=True)
        os.chmod(cipher_dir, 0o700)  # whatever the umask
        return ""
    if not cipher_dir.is_dir():
        raise VolumeExists(f"{cipher_dir} exists and is not a directory")
    if header_path(cipher_dir).exists():
        raise VolumeExists(f"{cipher_dir} already holds an encfs volume")
    if any(cipher_dir.iterdir()):
        raise VolumeExists(f"{cipher_dir} is not empty; encfs init needs an empty directory")
    st = os.stat(cipher_dir)
    if os.geteuid() == 0 and st.st_uid != 0:
        raise UnsafeCipherDir(
            f"cipher dir {cipher_dir} is owned by uid {st.st_uid}, not root; encfs runs as "
            "root and refuses a cipher dir another user may change",
            hint=f"chown root {cipher_dir}; chmod 700 {cipher_dir} (or let encfs init create it)",
        )
    if st.st_mode & 0o077:
        os.chmod(cipher_dir, 0o700)
        return f"narrowed {cipher_dir} from mode {stat.S_IMODE(st.st_mode):04o} to 0700"
    return ""


def create(
    cipher_dir: Path,
    vault: KeyWrapper,
    *,
    block_size: int = fmt.DEFAULT_BLOCK_SIZE,
    on_keys: Callable[[fmt.VolumeHeader, VolumeKeys], None] | None = None,
) -> fmt.VolumeHeader:
    """Initialise a new volume in ``cipher_dir`` (``prepare_cipher_dir`` first).

    Asks the vault for a fresh wrapped volume key, stores only the wrapped form, and wipes
    the plaintext copy. ``on_keys(header, keys)`` runs once the header is durable, before
    the keys are wiped (``init`` pins the volume there). Raises ``VolumeExists``,
    ``UnsafeCipherDir``, ``ValueError`` (block size), ``VaultError``.
    """
    fmt.validate_block_size(block_size)
    prepare_cipher_dir(cipher_dir)
    volume_key, wrapped_key = vault.new_volume_key()
    try:
        header = fmt.VolumeHeader(
            format_version=fmt.FORMAT_VERSION,
            feature_flags=fmt.NEW_VOLUME_FEATURES,
            cipher=fmt.CIPHER_AES256_GCM,
            block_size=block_size,
            volume_id=crypto.random_bytes(fmt.VOLUME_ID_LEN),
            vault_url=str(vault.url),
            kek_version=wrapped_kek_version(wrapped_key),
            wrapped_key=wrapped_key,
        )
        keys = VolumeKeys(volume_key, volume_id=header.volume_id, block_size=block_size)
    finally:
        volume_key[:] = bytes(len(volume_key))
    try:
        root = backing.open_root(str(cipher_dir))
        names.write_dirid(root, link=fmt.dirid_links(header.feature_flags))
        names.write_root_attrs(root, fmt.NEW_ROOT_MODE, os.geteuid(), os.getegid())
        write_header_atomic(cipher_dir, build_header_bytes(header, keys))
        if on_keys is not None:
            on_keys(header, keys)
    finally:
        keys.close()
    return header


def unlock(hf: HeaderFile, vault: KeyWrapper) -> VolumeKeys:
    """Unwrap the volume key with the vault, derive the keys, verify the header tag.

    The plaintext volume key copy from the vault is wiped before returning. Raises
    ``VaultError`` or ``HeaderAuthError``.
    """
    volume_key = vault.unwrap(hf.header.wrapped_key)
    try:
        keys = VolumeKeys(
            volume_key, volume_id=hf.header.volume_id, block_size=hf.header.block_size
        )
    finally:
        volume_key[:] = bytes(len(volume_key))
    try:
        keys.verify_header(hf.body, hf.tag)
    except BaseException:
        keys.close()
        raise
    return keys


@dataclass(frozen=True)
class Rotation:
    """What ``rotate`` did: the KEK versions before and after, and whether it wrote."""

    old_version: int
    new_version: int
    changed: bool
    header: fmt.VolumeHeader


def rotate(cipher_dir: Path, vault: KeyWrapper) -> Rotation:
    """Re-wrap the volume key under the KEK's newest version and replace the header.

    Steps: the vault re-wraps (transit ``rewrap``: no plaintext key crosses the wire); the
    new wrapped key is unwrapped once to check that it holds the *same* volume key (the old
    header's tag must verify under it) and to tag the new header; the header is replaced
    crash-safely (``write_header_atomic``: the previous header stays as ``encfs.volume.prev``
    until the new one is durable). No data is re-encrypted, and a mounted daemon is not
    disturbed: it holds its keys and never re-reads the header. Killing this at any point
    leaves a volume that mounts. Raises ``VaultError``, ``HeaderAuthError``, ``OSError``.
    """
    hf = read_header(cipher_dir)
    old = hf.header
    new_wrapped = vault.rewrap(old.wrapped_key)
    new_version = wrapped_kek_version(new_wrapped)
    if new_wrapped == old.wrapped_key or (new_version and new_version == old.kek_version):
        return Rotation(old.kek_version, old.kek_version, changed=False, header=old)
    volume_key = vault.unwrap(new_wrapped)
    try:
        keys = VolumeKeys(volume_key, volume_id=old.volume_id, block_size=old.block_size)
    finally:
        volume_key[:] = bytes(len(volume_key))
    try:
        keys.verify_header(hf.body, hf.tag)
        new = replace(old, kek_version=new_version, wrapped_key=new_wrapped)
        write_header_atomic(cipher_dir, build_header_bytes(new, keys))
    finally:
        keys.close()
    return Rotation(old.kek_version, new_version, changed=True, header=new)


EPHEMERAL_MARKER_TEXT = (
    "encfs ephemeral volume: its key lived only in the memory of the daemon that mounted it\n"
    "and is gone; nothing here can be decrypted. The next `encfs mount --ephemeral` of this\n"
    "directory removes it all.\n"
)


def check_ephemeral_dir(cipher_dir: Path) -> list[Path]:
    """Whether ``cipher_dir`` may become an ephemeral volume (``start_ephemeral``): created
    0700 if missing; returns what erasing it would remove. Raises ``VolumeExists`` for a
    directory holding a persistent volume or anything that is not an earlier ephemeral
    volume."""
    if cipher_dir.exists() and not cipher_dir.is_dir():
        raise VolumeExists(f"{cipher_dir} exists and is not a directory")
    cipher_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if header_path(cipher_dir).exists() or (cipher_dir / fmt.VOLUME_HEADER_PREV).exists():
        raise VolumeExists(
            f"{cipher_dir} holds a persistent encfs volume; refusing to erase it for an "
            "ephemeral mount (use an empty directory)"
        )
    entries = [e for e in cipher_dir.iterdir() if e.name != fmt.LOCK_NAME]
    if entries and not (cipher_dir / fmt.EPHEMERAL_MARKER_NAME).exists():
        raise VolumeExists(
            f"{cipher_dir} is not empty and is not an ephemeral encfs volume; refusing to "
            "erase it (use an empty directory)"
        )
    return entries


def start_ephemeral(
    cipher_dir: Path, *, block_size: int = fmt.DEFAULT_BLOCK_SIZE
) -> tuple[bytes, VolumeKeys]:
    """Prepare ``cipher_dir`` for a fresh ephemeral volume and make its keys.

    The volume key comes from the OS CSPRNG straight into the key arena and is never
    written anywhere. The directory must be empty (created if missing) or hold an earlier
    ephemeral volume (``encfs.ephemeral``), whose undecryptable ciphertext is removed.
    Refuses (``VolumeExists``) a directory holding a persistent volume or anything else.
    Returns (volume id, keys). The caller holds the cipher dir's lock (``fmt.LOCK_NAME``,
    which is kept).
    """
    entries = check_ephemeral_dir(cipher_dir)
    for entry in entries:
        if entry.name == fmt.EPHEMERAL_MARKER_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    root = backing.open_root(str(cipher_dir))
    if not root.exists(fmt.EPHEMERAL_MARKER_NAME):
        root.write_new(fmt.EPHEMERAL_MARKER_NAME, EPHEMERAL_MARKER_TEXT.encode(), 0o600)
    names.write_dirid(root, link=fmt.dirid_links(fmt.EPHEMERAL_FEATURES))
    names.write_root_attrs(root, fmt.NEW_ROOT_MODE, os.geteuid(), os.getegid())
    fsync_dir(cipher_dir)
    volume_id = crypto.random_bytes(fmt.VOLUME_ID_LEN)
    volume_key = bytearray(fmt.VOLUME_KEY_LEN)
    try:
        crypto.random_key_into(volume_key)
        keys = VolumeKeys(volume_key, volume_id=volume_id, block_size=block_size)
    finally:
        volume_key[:] = bytes(len(volume_key))
    return volume_id, keys
