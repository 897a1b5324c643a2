"""A volume on disk: create it, read and atomically replace its header, unlock its keys.

The header is the one file whose loss loses the volume, so every replacement is crash-safe:
write ``encfs.volume.tmp``, fsync it, keep the current header as ``encfs.volume.prev`` (a
hard link), rename the new one over ``encfs.volume``, fsync the directory. A reader that
finds no ``encfs.volume`` but a ``.prev`` (a crash between steps) falls back to it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from encfs import backing, crypto, names, pins
from encfs import format as fmt
from encfs.errors import (
    EncfsError,
    FormatError,
    HeaderAuthError,
    HeaderDamaged,
    HeaderMissing,
    RekeyUnderWay,
    UnsafeCipherDir,
    UnsupportedFormat,
    VaultCiphertextRejected,
    VaultConfigError,
    VaultError,
    VolumeExists,
    VolumeMismatch,
    VolumeNotFound,
    WrappedKeyRejected,
)
from encfs.keys import VolumeKeys
from encfs.vault import KeyWrapper, parse_vault_url, wrapped_kek_version


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


def parse_header_file(raw: bytes, path: Path) -> HeaderFile:
    """``raw`` parsed as a volume header that came from ``path`` (structure only: the tag
    needs the volume key). Raises ``FormatError`` / ``UnsupportedFormat`` naming ``path``."""
    try:
        header, body, tag = fmt.parse_volume_header(raw)
    except UnsupportedFormat as exc:
        raise UnsupportedFormat(
            f"{path}: {exc} (written by a newer encfs, or the header is damaged)"
        ) from None
    except FormatError as exc:
        raise FormatError(f"the volume header {path} is damaged: {exc}") from None
    return HeaderFile(header=header, body=body, tag=tag, path=path)


def _read_header_in(root: backing.Dir, cipher_dir: Path, name: str) -> HeaderFile | None:
    """The header file ``name`` in the cipher dir, parsed; None if it does not exist.
    Raises ``FormatError``."""
    candidate = cipher_dir / name
    try:
        raw = root.read_small(name, _HEADER_READ_MAX)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FormatError(f"cannot read volume header {candidate}: {exc.strerror}") from None
    return parse_header_file(raw, candidate)


def read_prev_header(cipher_dir: Path) -> HeaderFile | None:
    """``encfs.volume.prev`` parsed, or None if it is missing or does not parse."""
    try:
        root = backing.open_root(str(cipher_dir))
        return _read_header_in(root, cipher_dir, fmt.VOLUME_HEADER_PREV)
    except (FormatError, OSError):
        return None


def _prev_offer(cipher_dir: Path, current: bytes | None) -> str:
    """A hint offering ``encfs.volume.prev`` when it parses and differs from ``current``."""
    prev = read_prev_header(cipher_dir)
    if prev is None or (current is not None and prev.body + prev.tag == current):
        return ""
    return (
        f"{fmt.VOLUME_HEADER_PREV} (volume {prev.header.volume_id.hex()}, KEK version "
        f"{prev.header.kek_version}) parses: `encfs header restore {cipher_dir}` puts it back "
        "(the damaged header is kept as the new .prev)"
    )


def read_header(cipher_dir: Path) -> HeaderFile:
    """Read and structurally check the header, through the door (a link or special file
    in its place is refused, never followed or opened). A missing ``encfs.volume`` falls
    back to ``encfs.volume.prev``; one that does not parse does not (its ``FormatError``
    says the header is damaged and offers ``.prev`` when that parses). Raises
    ``VolumeNotFound`` (``HeaderMissing`` when the directory still holds an encfs volume)
    or ``FormatError``."""
    require_cipher_dir(cipher_dir)
    root = backing.open_root(str(cipher_dir))
    for name in (fmt.VOLUME_HEADER_NAME, fmt.VOLUME_HEADER_PREV):
        try:
            hf = _read_header_in(root, cipher_dir, name)
        except FormatError as exc:
            if name == fmt.VOLUME_HEADER_NAME and not exc.hint:
                exc.hint = _prev_offer(cipher_dir, None)
            raise
        if hf is not None:
            return hf
    if root.exists(fmt.EPHEMERAL_MARKER_NAME):
        raise VolumeNotFound(
            f"{cipher_dir} is an ephemeral encfs volume: it has no header (its key lived "
            "only in memory); mount it with `encfs mount --ephemeral`, which starts it empty"
        )
    if root.exists(fmt.DIRID_NAME):
        raise HeaderMissing(
            f"the volume header is missing: {cipher_dir} holds an encfs volume (its "
            f"directory ids are there) but neither {fmt.VOLUME_HEADER_NAME} nor "
            f"{fmt.VOLUME_HEADER_PREV}",
            hint=f"restore a header backup: `encfs header restore {cipher_dir} FILE` (FILE "
            "made by `encfs header backup`). Do not run `encfs init`: a new volume key "
            "cannot read this ciphertext",
        )
    raise VolumeNotFound(
        f"{cipher_dir} holds no encfs volume (no {fmt.VOLUME_HEADER_NAME}); "
        "create one with `encfs init`"
    )


_TRANSIT_WRAPPED = re.compile(r"vault:v([1-9][0-9]*):[A-Za-z0-9+/]{20,}={0,2}")
_KMIP_WRAPPED = re.compile(r"kmip:v1:[A-Za-z0-9_-]{80}")


def _slot_findings(slot: fmt.KeySlot, which: str) -> list[str]:
    """What is certainly wrong with one key slot on its own (see ``header_findings``);
    ``which`` names the slot in each finding ("" for slot 0 of a single volume)."""
    found: list[str] = []
    kmip = None
    try:
        kmip = parse_vault_url(slot.vault_url).is_kmip
    except VaultConfigError as exc:
        found.append(f"its vault URL{which} {slot.vault_url!r} is not a vault URL ({exc})")
    if kmip is not True and _TRANSIT_WRAPPED.fullmatch(slot.wrapped_key):
        if wrapped_kek_version(slot.wrapped_key) != slot.kek_version:
            found.append(
                f"its KEK version field{which} says {slot.kek_version} but its wrapped key "
                f"names v{wrapped_kek_version(slot.wrapped_key)}"
            )
    elif kmip is not False and _KMIP_WRAPPED.fullmatch(slot.wrapped_key):
        if slot.kek_version != 0:
            found.append(
                f"its KEK version field{which} says {slot.kek_version}; a kmip key has none (0)"
            )
    else:
        found.append(
            f"its wrapped key{which} {slot.wrapped_key[:24]!r}... is not a "
            f"{'KMIP' if kmip else 'transit'} ciphertext"
        )
    return found


def slot_label(header: fmt.VolumeHeader, index: int) -> str:
    """How messages name key slot ``index`` of ``header``: "" for the only slot of a
    single-layer volume, " (KEK 1)" / " (KEK 2)" for the slots of a double one."""
    return f" (KEK {index + 1})" if len(header.slots) > 1 else ""


def header_findings(hf: HeaderFile, pin: pins.Pin | None) -> list[str]:
    """What is certainly wrong with a header that parses, judged before the key is
    unwrapped (the tag needs the key, so only structure and the host's pin can tell):
    in any key slot, a vault URL that is not one, a wrapped key that is not a vault's
    ciphertext, a KEK version field that disagrees with the wrapped key (the writer copies
    it); and — when the host's pin names this volume id — a vault URL or block size other
    than the pinned ones, or a double-encrypted volume where a single-layer one was pinned
    or the reverse (none of these changes after ``init``). Empty for every header encfs
    writes."""
    h = hf.header
    found: list[str] = []
    for index, slot in enumerate(h.slots):
        found += _slot_findings(slot, slot_label(h, index))
    for index, old in enumerate(h.retiring):  # a rekey under way: the keys it replaces
        found += _slot_findings(old, f" (retiring{slot_label(h, index) or ''})")
        if old.vault_url != h.slots[index].vault_url:
            found.append(f"its retiring key{slot_label(h, index)} names another vault")
    if pin is not None and pin.volume_id == h.volume_id.hex():
        if pin.vault_url and pin.vault_url != h.vault_url:
            found.append(
                f"its vault URL{slot_label(h, 0)} {h.vault_url!r} is not the one this host "
                f"pinned for volume {pin.volume_id} ({pin.vault_url!r})"
            )
        if pin.block_size and pin.block_size != str(h.block_size):
            found.append(f"its block size {h.block_size} is not the pinned one ({pin.block_size})")
        pinned_double = bool(pin.vault_url2 or pin.key_check2)
        if pinned_double and not h.double:
            found.append(
                f"it is single-layer, but this host pinned volume {pin.volume_id} as "
                "double-encrypted (feature flag DOUBLE cleared?)"
            )
        elif h.double and pin.key_check and not pinned_double:
            found.append(
                f"it is double-encrypted, but this host pinned volume {pin.volume_id} as "
                "single-layer"
            )
        elif h.double and pin.vault_url2 and pin.vault_url2 != h.slots[1].vault_url:
            found.append(
                f"its vault URL (KEK 2) {h.slots[1].vault_url!r} is not the one this host "
                f"pinned for volume {pin.volume_id} ({pin.vault_url2!r})"
            )
    return found


def check_header(cipher_dir: Path, hf: HeaderFile) -> None:
    """Refuse a header with ``header_findings`` against the host's pin (``HeaderDamaged``,
    offering ``encfs.volume.prev`` when it parses), before anything goes to the vault.
    A damaged pin file raises ``VolumeMismatch``."""
    found = header_findings(hf, pins.read_pin(cipher_dir))
    if found:
        raise HeaderDamaged(
            f"the volume header {hf.path} is damaged: {'; '.join(found)}",
            hint=_prev_offer(cipher_dir, hf.body + hf.tag)
            or f"restore a header backup: `encfs header restore {cipher_dir} FILE`",
        )


def read_checked_header(cipher_dir: Path) -> HeaderFile:
    """``read_header`` then ``check_header``: what mount, fsck and rotate read."""
    hf = read_header(cipher_dir)
    check_header(cipher_dir, hf)
    return hf


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


def backup_header(cipher_dir: Path, dest: Path) -> HeaderFile:
    """Copy the volume header (the one ``read_header`` reads, so it parses) to the new file
    ``dest``: mode 0600, fsynced with its directory, never over an existing file
    (``FileExistsError``) nor through a link. Needs no vault: the header holds the volume
    key only wrapped. Raises ``VolumeNotFound``, ``FormatError``, ``OSError``."""
    hf = read_header(cipher_dir)
    parent = backing.open_root(str(dest.parent))  # the operator's directory
    parent.write_new(dest.name, hf.body + hf.tag, 0o600)
    parent.fsync()
    return hf


@dataclass(frozen=True)
class Restore:
    """What ``restore_header`` did: the header now in place, and whether it wrote."""

    header: HeaderFile
    changed: bool


def restore_header(cipher_dir: Path, source: Path | None = None) -> Restore:
    """Put a header back: from ``source`` (a file made by ``backup_header``) or, when None,
    from ``encfs.volume.prev``. Refuses (nothing written):

    - while the volume is mounted or repaired (``VolumeBusy``: the lock is held for the
      whole restore, so no mount starts meanwhile);
    - a replacement that does not parse (``FormatError``) or has ``header_findings``
      (``HeaderDamaged``);
    - a replacement of another volume (``VolumeMismatch``) than the one this host pinned
      there, or, without a pin, than both the current header and ``.prev`` name.

    Writes with ``write_header_atomic``, so the header it replaces (damaged or not) stays
    as ``encfs.volume.prev``. Needs no vault; the tag is checked by the next mount or fsck.
    Raises as above and ``VolumeNotFound``, ``OSError``."""
    require_cipher_dir(cipher_dir)
    root = backing.open_root(str(cipher_dir))
    if source is None:
        source_path = cipher_dir / fmt.VOLUME_HEADER_PREV
        try:
            raw = root.read_small(fmt.VOLUME_HEADER_PREV, _HEADER_READ_MAX + 1)
        except FileNotFoundError:
            raise VolumeNotFound(
                f"{cipher_dir} has no {fmt.VOLUME_HEADER_PREV} to restore",
                hint=f"give the backup file: `encfs header restore {cipher_dir} FILE`",
            ) from None
    else:
        source_path = source
        with open(source, "rb") as f:
            raw = f.read(_HEADER_READ_MAX + 1)
    if len(raw) > _HEADER_READ_MAX:
        raise FormatError(f"{source_path} is too large to be a volume header")
    new = parse_header_file(raw, source_path)
    lock = backing.lock_volume(root, f"encfs header restore (pid {os.getpid()})")
    try:
        pin = pins.read_pin(cipher_dir)
        found = header_findings(new, pin)
        if found:
            raise HeaderDamaged(f"the header in {source_path} is damaged: {'; '.join(found)}")
        current: HeaderFile | None = None
        with contextlib.suppress(FormatError):
            current = _read_header_in(root, cipher_dir, fmt.VOLUME_HEADER_NAME)
        new_id = new.header.volume_id.hex()
        if pin is not None:
            allowed = {pin.volume_id}
            whose = f"this host pinned volume {pin.volume_id} there"
        else:
            others = (current, None if source is None else read_prev_header(cipher_dir))
            allowed = {o.header.volume_id.hex() for o in others if o is not None}
            whose = f"{cipher_dir} holds volume {' / '.join(sorted(allowed))}"
        if allowed and new_id not in allowed:
            raise VolumeMismatch(
                f"the header in {source_path} is of volume {new_id}, but {whose}: a header "
                "unlocks only its own volume's ciphertext",
                hint=f"if the volume was replaced on purpose, `encfs pin reset {cipher_dir}` "
                f"first; if the current header's volume id is the damaged part, move "
                f"{fmt.VOLUME_HEADER_NAME} (and {fmt.VOLUME_HEADER_PREV}) aside and retry"
                if pin is None
                else f"if the volume was replaced on purpose, `encfs pin reset {cipher_dir}` first",
            )
        if current is not None and current.body + current.tag == raw:
            return Restore(header=current, changed=False)
        write_header_atomic(cipher_dir, raw)
    finally:
        os.close(lock)
    return Restore(header=replace(new, path=header_path(cipher_dir)), changed=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_header_bytes(header: fmt.VolumeHeader, keys: VolumeKeys) -> bytes:
    """The header file's bytes: the body and its tag(s) under ``keys`` (a rekeying header
    needs keys with the retiring set attached)."""
    if header.rekeying != (keys.retiring is not None):
        raise ValueError("a rekeying header is tagged by both keys, any other by one")
    body = header.body()
    return body + keys.header_tags(body)


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
    marks = (fmt.VOLUME_HEADER_PREV, fmt.DIRID_NAME)
    if any(os.path.lexists(cipher_dir / mark) for mark in marks):
        raise VolumeExists(
            f"{cipher_dir} holds an encfs volume whose header is missing; encfs init would "
            "not make its ciphertext readable again",
            hint=f"restore a header backup: `encfs header restore {cipher_dir} [FILE]`",
        )
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
    outer_vault: KeyWrapper | None = None,
) -> fmt.VolumeHeader:
    """Initialise a new volume in ``cipher_dir`` (``prepare_cipher_dir`` first).

    Asks the vault for a fresh wrapped volume key, stores only the wrapped form, and wipes
    the plaintext copy. With ``outer_vault`` the volume is double-encrypted (FORMAT §5.2):
    a second, independent volume key from that vault goes into key slot 1. ``on_keys(header,
    keys)`` runs once the header is durable, before the keys are wiped (``init`` pins the
    volume there). Raises ``VolumeExists``, ``UnsafeCipherDir``, ``ValueError`` (block
    size), ``VaultError``.
    """
    fmt.validate_block_size(block_size)
    prepare_cipher_dir(cipher_dir)
    wrappers = [vault] if outer_vault is None else [vault, outer_vault]
    flags = fmt.NEW_VOLUME_FEATURES | (0 if outer_vault is None else fmt.FEATURE_DOUBLE)
    volume_keys: list[bytearray] = []
    try:
        slots = []
        for wrapper in wrappers:
            volume_key, wrapped_key = wrapper.new_volume_key()
            volume_keys.append(volume_key)
            slots.append(
                fmt.KeySlot(str(wrapper.url.primary), wrapped_kek_version(wrapped_key), wrapped_key)
            )
        header = fmt.VolumeHeader(
            format_version=fmt.FORMAT_VERSION,
            feature_flags=flags,
            cipher=fmt.CIPHER_AES256_GCM,
            block_size=block_size,
            volume_id=crypto.random_bytes(fmt.VOLUME_ID_LEN),
            slots=tuple(slots),
            outer_cipher=fmt.OUTER_CIPHER_CHACHA20_POLY1305 if outer_vault is not None else 0,
        )
        keys = keys_from(header, volume_keys)
    finally:
        for volume_key in volume_keys:
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


def unlock(hf: HeaderFile, *vaults: KeyWrapper) -> VolumeKeys:
    """Unwrap the volume key(s) with the vault(s), derive the keys, verify the header tag.

    ``vaults``: one client per volume key, in key slot order (one; two for a double
    volume: the first unwraps slot 0, the second slot 1; ``ValueError`` otherwise). Every
    plaintext volume key copy from a vault is wiped before returning. Raises
    ``VaultError`` or ``HeaderAuthError``. When a vault refuses its wrapped key itself, or
    the tag fails, the error says the header may be damaged and its ``hint`` whether
    ``encfs.volume.prev`` unwraps and verifies (``encfs header restore``); finding that
    out costs more vault calls, on the error path only.
    """
    try:
        keys = _unlock_once(hf, vaults)
    except _SlotRejected as exc:
        raise WrappedKeyRejected(
            f"the wrapped key{slot_label(hf.header, exc.slot)} in the volume header {hf.path} "
            f"does not unwrap with {vaults[exc.slot].url}: the header may be damaged, or the "
            "KEK was deleted and re-created under the same name (a re-created key cannot "
            f"unwrap the old volume key) [{exc}]",
            hint=_restore_hint(hf, vaults),
        ) from None
    except HeaderAuthError as exc:
        exc.hint = _restore_hint(hf, vaults)
        raise
    return keys


class _SlotRejected(VaultCiphertextRejected):
    """A vault refused the wrapped key of key slot ``slot`` as such (the same error, with
    the slot it came from)."""

    def __init__(self, error: VaultCiphertextRejected, slot: int) -> None:
        super().__init__(str(error), hint=error.hint)
        self.slot = slot


def unwrap_slots(header: fmt.VolumeHeader, vaults: Sequence[KeyWrapper]) -> list[bytearray]:
    """Each volume key of ``header`` unwrapped by its vault (slot order), in fresh buffers
    the caller wipes. Raises ``VaultError`` (marked with its KEK for a double volume;
    ``_SlotRejected`` for a wrapped key a vault refuses as such, naming the slot; nothing
    stays unwiped) and ``ValueError`` for a wrong vault count."""
    if len(vaults) != fmt.volume_key_count(header.feature_flags):
        raise ValueError(
            f"{len(vaults)} vault(s) for {fmt.volume_key_count(header.feature_flags)} key(s)"
        )
    keys: list[bytearray] = []
    try:
        for index, vault in enumerate(vaults):
            try:
                keys.append(vault.unwrap(header.slots[index].wrapped_key))
            except VaultCiphertextRejected as exc:
                raise _SlotRejected(exc, index) from None
            except VaultError as exc:
                if header.double:
                    exc.for_kek(index + 1)
                raise
    except BaseException:
        for key in keys:
            key[:] = bytes(len(key))
        raise
    return keys


def keys_from(header: fmt.VolumeHeader, volume_keys: Sequence[bytearray]) -> VolumeKeys:
    """``VolumeKeys`` for ``header`` from its plaintext volume keys (slot order: the
    volume key, then the outer key of a double volume); the caller wipes its copies."""
    return VolumeKeys(
        volume_keys[0],
        volume_id=header.volume_id,
        block_size=header.block_size,
        outer_key=volume_keys[1] if header.double else None,
    )


def retiring_header(header: fmt.VolumeHeader) -> fmt.VolumeHeader:
    """``header`` as its retiring keys saw it: their slots in place of the current ones
    (to unwrap them with ``unwrap_slots``; never written)."""
    return replace(
        header,
        feature_flags=header.feature_flags & ~fmt.FEATURE_REKEYING,
        slots=header.retiring,
        retiring=(),
    )


def load_retiring(keys: VolumeKeys, header: fmt.VolumeHeader, vaults: Sequence[KeyWrapper]) -> None:
    """Unwrap the retiring keys of a rekeying ``header`` (each with its slot's vault) into
    ``keys`` (``VolumeKeys.load_retiring``); nothing stays unwiped. Raises ``VaultError``."""
    old_keys = unwrap_slots(retiring_header(header), vaults)
    try:
        keys.load_retiring(old_keys[0], old_keys[1] if header.double else None)
    finally:
        for key in old_keys:
            key[:] = bytes(len(key))


def _unlock_once(hf: HeaderFile, vaults: Sequence[KeyWrapper]) -> VolumeKeys:
    volume_keys = unwrap_slots(hf.header, vaults)
    try:
        keys = keys_from(hf.header, volume_keys)
    finally:
        for key in volume_keys:
            key[:] = bytes(len(key))
    try:
        if hf.header.rekeying:  # a rekey under way: the old keys open the rest
            load_retiring(keys, hf.header, vaults)
        keys.verify_header(hf.body, hf.tag)
    except BaseException:
        keys.close()
        raise
    return keys


def _restore_hint(hf: HeaderFile, vaults: Sequence[KeyWrapper]) -> str:
    """What to do about a header whose key does not unwrap or whose tag fails: restore
    ``encfs.volume.prev`` if it unwraps and its own tag verifies, else a backup."""
    cipher_dir = hf.path.parent
    restore = f"restore a header backup (`encfs header restore {cipher_dir} FILE`)"
    prev = read_prev_header(cipher_dir)
    if prev is None or prev.path == hf.path or prev.body + prev.tag == hf.body + hf.tag:
        return restore + "; if the KEK was re-created, only a vault backup of the old key helps"
    try:
        _unlock_once(prev, vaults).close()
    except (EncfsError, ValueError) as exc:
        return f"{fmt.VOLUME_HEADER_PREV} does not unlock either ({exc}); {restore}"
    return (
        f"{fmt.VOLUME_HEADER_PREV} unwraps and its tag verifies (volume "
        f"{prev.header.volume_id.hex()}, KEK version {prev.header.kek_version}): "
        f"`encfs header restore {cipher_dir}` puts it back"
    )


@dataclass(frozen=True)
class SlotRotation:
    """What ``rotate`` did to one key slot: its KEK versions before and after."""

    slot: int
    old_version: int
    new_version: int
    changed: bool


@dataclass(frozen=True)
class Rotation:
    """What ``rotate`` did: one ``SlotRotation`` per slot asked for, and the header now
    in place. ``old_version`` / ``new_version`` are key slot 0's."""

    slots: tuple[SlotRotation, ...]
    old_header: fmt.VolumeHeader
    header: fmt.VolumeHeader

    @property
    def changed(self) -> bool:
        return any(s.changed for s in self.slots)

    @property
    def old_version(self) -> int:
        return self.old_header.kek_version

    @property
    def new_version(self) -> int:
        return self.header.kek_version


def rotate(cipher_dir: Path, *vaults: KeyWrapper, slots: Sequence[int] | None = None) -> Rotation:
    """Re-wrap the volume key of each key slot in ``slots`` (default: all) under its KEK's
    newest version and replace the header.

    ``vaults`` is one client per volume key, in slot order (as ``unlock``): all of them are
    needed even to re-wrap one slot, since the new header's tag is keyed by every volume
    key. Steps: the vault of each chosen slot re-wraps (transit ``rewrap``: no plaintext
    key crosses the wire); the new wrapped keys (and the unchanged ones) are unwrapped
    once to check that they hold the *same* volume keys (the old header's tag must verify
    under them) and to tag the new header; the header is replaced crash-safely
    (``write_header_atomic``: the previous header stays as ``encfs.volume.prev`` until the
    new one is durable), once, for all slots. No data is re-encrypted, and a mounted daemon
    is not disturbed: it holds its keys. Killing this at any point leaves a volume that
    mounts. Raises ``VaultError``, ``HeaderAuthError``, ``OSError``, ``ValueError`` (a
    slot the volume does not have, a wrong vault count).
    """
    hf = read_header(cipher_dir)
    old = hf.header
    if old.rekeying:
        raise RekeyUnderWay(
            f"a rekey of {cipher_dir} is under way; rotate the KEK once it is done",
            hint=f"finish it first: `encfs rekey {cipher_dir}`",
        )
    if len(vaults) != len(old.slots):
        raise ValueError(f"{len(vaults)} vault(s) for {len(old.slots)} key slot(s)")
    chosen = sorted(set(range(len(old.slots)) if slots is None else slots))
    if any(not 0 <= index < len(old.slots) for index in chosen):
        raise ValueError(f"the volume has {len(old.slots)} key slot(s)")
    new = old
    done: list[SlotRotation] = []
    for index in chosen:
        slot = old.slots[index]
        new_wrapped = vaults[index].rewrap(slot.wrapped_key)
        new_version = wrapped_kek_version(new_wrapped)
        if new_wrapped == slot.wrapped_key or (new_version and new_version == slot.kek_version):
            done.append(SlotRotation(index, slot.kek_version, slot.kek_version, changed=False))
            continue
        new = new.with_slot(index, kek_version=new_version, wrapped_key=new_wrapped)
        done.append(SlotRotation(index, slot.kek_version, new_version, changed=True))
    if new == old:
        return Rotation(tuple(done), old, old)
    volume_keys = unwrap_slots(new, vaults)
    try:
        keys = keys_from(new, volume_keys)
    finally:
        for key in volume_keys:
            key[:] = bytes(len(key))
    try:
        keys.verify_header(hf.body, hf.tag)
        write_header_atomic(cipher_dir, build_header_bytes(new, keys))
    finally:
        keys.close()
    return Rotation(tuple(done), old, new)


def new_rekey_keys(
    hf: HeaderFile, vaults: Sequence[KeyWrapper]
) -> tuple[VolumeKeys, tuple[fmt.KeySlot, ...]]:
    """Fresh volume keys from the vaults (one per key slot, each from its slot's vault) for
    a rekey of the volume of ``hf`` (first step of ``encfs rekey``, FORMAT.md §2.5): keys
    the caller owns, and their key slots. Raises ``VaultError``, ``RekeyUnderWay``."""
    old = hf.header
    if old.rekeying:
        raise RekeyUnderWay(f"a rekey of {hf.path.parent} is already under way")
    if len(vaults) != len(old.slots):
        raise ValueError(f"{len(vaults)} vault(s) for {len(old.slots)} key slot(s)")
    new_keys: list[bytearray] = []
    try:
        slots = []
        for slot, vault in zip(old.slots, vaults, strict=True):
            key, wrapped = vault.new_volume_key()
            new_keys.append(key)
            slots.append(fmt.KeySlot(slot.vault_url, wrapped_kek_version(wrapped), wrapped))
        return keys_from(old, new_keys), tuple(slots)
    finally:
        for key in new_keys:
            key[:] = bytes(len(key))


def write_rekey_header(
    cipher_dir: Path,
    hf: HeaderFile,
    keys: VolumeKeys,
    new_keys: VolumeKeys,
    slots: tuple[fmt.KeySlot, ...],
) -> HeaderFile:
    """Write, crash-safely, the header of a rekey under way: ``new_keys`` (from
    ``new_rekey_keys``, with their key ``slots``) current, the keys in use (``keys``, which
    unlocked ``hf``) retiring, tagged by both (the old keys vouch for the new ones). The
    caller then installs the new keys (``keys.retire(new_keys)``); until it does, nothing
    is sealed under them, so a crash at any point leaves a volume that mounts. Returns the
    header now in place. Raises ``OSError``."""
    old = hf.header
    new = replace(
        old,
        feature_flags=old.feature_flags | fmt.FEATURE_REKEYING,
        slots=slots,
        retiring=old.slots,
    )
    body = new.body()
    raw = body + new_keys.header_tag(body) + keys.header_tag(body)
    write_header_atomic(cipher_dir, raw)
    return parse_header_file(raw, header_path(cipher_dir))


def finish_rekey(cipher_dir: Path, hf: HeaderFile, keys: VolumeKeys) -> HeaderFile:
    """Last step of ``encfs rekey``, once every entry is sealed under the new keys: a header
    without the retiring slots, tagged by the new keys alone, written crash-safely twice,
    so that ``encfs.volume.prev`` no longer holds the old wrapped keys either. The caller
    then drops the retiring keys (``keys.end_rekey``). Raises ``OSError``."""
    new = replace(
        hf.header, feature_flags=hf.header.feature_flags & ~fmt.FEATURE_REKEYING, retiring=()
    )
    body = new.body()
    raw = body + keys.header_tag(body)
    write_header_atomic(cipher_dir, raw)
    write_header_atomic(cipher_dir, raw)  # .prev: the same header, the old keys gone
    return parse_header_file(raw, header_path(cipher_dir))


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
