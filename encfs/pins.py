"""What the host remembers about the volumes it mounts: one pin per cipher dir.

The volume header is authenticated with a key derived from the volume key it wraps, so a
header is only "valid" relative to *some* key. Anyone who may ask the same KEK for a data
key (``transit/datakey``) can build a header of their own — a fresh volume key, a valid tag
— and put it in place of the real one; the pinned vault unwraps it and the host would mount
the attacker's volume and write into it. The host therefore pins, per cipher dir, the
volume id and the volume key's *check value* (``keys.key_check_value``; never the key) —
for a double-encrypted volume the check value of each of its two volume keys, so that a
header with either wrapped key substituted is refused:

- ``encfs init`` pins the volume it creates; the first ``encfs mount`` of a volume this
  host has no pin for pins it (trust on first use, logged); ``encfs systemd install`` does
  not (it has no key), the service's first start does;
- every later mount, and fsck and rotate when a pin exists, compares and refuses another
  volume (``VolumeMismatch``, exit 8) naming what differs;
- re-pinning is deliberate: ``encfs mount --repin`` or ``encfs pin reset CIPHERDIR``.

Pins live in ``/var/lib/encfs/pins`` (``$ENCFS_PIN_DIR`` overrides; a non-root user's are
under ``$XDG_STATE_HOME/encfs/pins``), one ``<sha256 of the cipher dir's real path>.json``
file each (0600, directory 0700).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from encfs.errors import VolumeMismatch
from encfs.hostfiles import write_file_atomic
from encfs.keys import VolumeKeys

log = logging.getLogger(__name__)

PIN_DIR_ENV = "ENCFS_PIN_DIR"
DEFAULT_PIN_DIR = Path("/var/lib/encfs/pins")


def pin_dir() -> Path:
    """Where pins are kept (module docstring)."""
    override = os.environ.get(PIN_DIR_ENV, "").strip()
    if override:
        return Path(override).absolute()
    if os.geteuid() == 0:
        return DEFAULT_PIN_DIR
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "encfs" / "pins"


def pin_path(cipher_dir: Path) -> Path:
    digest = hashlib.sha256(os.fsencode(cipher_dir.resolve())).hexdigest()[:32]
    return pin_dir() / f"{digest}.json"


@dataclass(frozen=True)
class Pin:
    """One pin file. ``vault_url`` and ``block_size`` are the header's fields that never
    change after ``init`` (empty in pins written before they were recorded): a header that
    differs in them while naming the pinned volume id is damaged (``volume.check_header``).
    A double-encrypted volume's pin also holds key slot 1's vault URL (``vault_url2``) and
    the check value of its outer key (``key_check2``); both are empty for a single-layer
    volume."""

    cipher_dir: str
    volume_id: str
    key_check: str
    pinned_at: str
    by: str
    vault_url: str = ""
    block_size: str = ""
    vault_url2: str = ""
    key_check2: str = ""


_OPTIONAL_PIN_FIELDS = ("vault_url", "block_size", "vault_url2", "key_check2")


def read_pin(cipher_dir: Path) -> Pin | None:
    """The pin for ``cipher_dir``, None if there is none. A damaged pin file raises
    ``VolumeMismatch`` (refuse rather than re-pin silently)."""
    path = pin_path(cipher_dir)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise VolumeMismatch(f"cannot read the volume pin {path}: {exc.strerror}") from None
    try:
        doc = json.loads(raw)
        return Pin(
            **{
                k: str(doc[k] if k not in _OPTIONAL_PIN_FIELDS else doc.get(k, ""))
                for k in Pin.__dataclass_fields__
            }
        )
    except (ValueError, KeyError, TypeError):
        raise VolumeMismatch(
            f"the volume pin {path} for {cipher_dir} is damaged; if the volume is the right "
            f"one, re-pin it: encfs pin reset {cipher_dir}"
        ) from None


def write_pin(
    cipher_dir: Path,
    volume_id: bytes,
    keys: VolumeKeys,
    *,
    by: str,
    vault_url: str = "",
    block_size: int = 0,
    vault_url2: str = "",
) -> Path:
    """Pin ``cipher_dir`` to this volume (replacing any pin); returns the pin file.
    ``vault_url``, ``block_size`` and (double volumes) ``vault_url2`` are the header's
    (recorded when given); the check value of every volume key in ``keys`` is."""
    path = pin_path(cipher_dir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    checks = keys.check_values()
    doc = {
        "cipher_dir": str(cipher_dir.resolve()),
        "volume_id": volume_id.hex(),
        "key_check": checks[0].hex(),
        "pinned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "by": by,
    }
    if vault_url:
        doc["vault_url"] = vault_url
    if block_size:
        doc["block_size"] = str(block_size)
    if vault_url2:
        doc["vault_url2"] = vault_url2
    if len(checks) > 1:
        doc["key_check2"] = checks[1].hex()
    write_file_atomic(path, (json.dumps(doc, indent=2) + "\n").encode(), 0o600)
    return path


def reset_pin(cipher_dir: Path) -> bool:
    """Forget the pin of ``cipher_dir``; returns whether there was one."""
    try:
        pin_path(cipher_dir).unlink()
    except FileNotFoundError:
        return False
    return True


def _key_differences(pin: Pin, checks: tuple[bytes, ...]) -> list[str]:
    """How the check values of a volume's keys (``checks``, slot order) differ from ``pin``."""
    differs = []
    if pin.key_check != checks[0].hex():
        which = " of KEK 1" if len(checks) > 1 or pin.key_check2 else ""
        differs.append(f"volume key{which} (its check value differs from the pinned one)")
    if len(checks) > 1 and pin.key_check2 != checks[1].hex():
        differs.append(
            "volume key of KEK 2 (its check value differs from the pinned one)"
            if pin.key_check2
            else "a double-encrypted volume where a single-layer one was pinned"
        )
    elif len(checks) == 1 and pin.key_check2:
        differs.append("a single-layer volume where a double-encrypted one was pinned")
    return differs


def check_pin(
    cipher_dir: Path,
    volume_id: bytes,
    keys: VolumeKeys,
    *,
    create: bool,
    repin: bool = False,
    by: str = "mount",
    vault_url: str = "",
    block_size: int = 0,
    vault_url2: str = "",
) -> str:
    """Compare the unlocked volume with the host's pin for ``cipher_dir``: its volume id
    and the check value of each of its volume keys.

    Returns ``"match"``, ``"pinned"`` (no pin yet and ``create``: written now; also after
    ``repin``) or ``"unpinned"`` (no pin, ``create`` false). Raises ``VolumeMismatch``
    naming what differs and how to re-pin deliberately. While a rekey is under way
    (``keys.retiring``; the caller verified both header tags) a pin of the retiring key
    matches and is moved to the new key.
    """
    pin = None if repin else read_pin(cipher_dir)
    if pin is None:
        if not (create or repin):
            return "unpinned"
        path = write_pin(
            cipher_dir,
            volume_id,
            keys,
            by=by,
            vault_url=vault_url,
            block_size=block_size,
            vault_url2=vault_url2,
        )
        log.warning(
            "%s volume %s of %s on this host (%s)",
            "re-pinned" if repin else "pinned",
            volume_id.hex(),
            cipher_dir,
            path,
        )
        return "pinned"
    differs = []
    if pin.volume_id != volume_id.hex():
        differs.append(f"volume id {volume_id.hex()} (pinned: {pin.volume_id})")
    checks = keys.check_values()
    pinned = (pin.key_check, *((pin.key_check2,) if pin.key_check2 else ()))
    retiring = keys.retiring
    # A rekey under way: the header's second tag, made with the retiring keys, vouches for
    # the new ones (verified before this is called), so the pin follows them.
    follows_rekey = (
        retiring is not None
        and pinned != tuple(c.hex() for c in checks)
        and pinned == tuple(c.hex() for c in retiring.check_values())
    )
    if not follows_rekey:
        differs += _key_differences(pin, checks)
    if differs:
        raise VolumeMismatch(
            f"{cipher_dir} holds another volume than the one this host pinned on "
            f"{pin.pinned_at}: {' and '.join(differs)}. The volume header may have been "
            "replaced by one built with another data key of the same KEK",
            hint=f"if this is deliberate (a restored or re-created volume), re-pin it: "
            f"`encfs mount --repin ...` or `encfs pin reset {cipher_dir}`",
        )
    if follows_rekey or (create and vault_url and not pin.vault_url):
        # a rekey's new key, or a pin from before the URL and block size were recorded
        write_pin(
            cipher_dir,
            volume_id,
            keys,
            by=pin.by,
            vault_url=vault_url or pin.vault_url,
            block_size=block_size or int(pin.block_size or 0),
            vault_url2=vault_url2 or pin.vault_url2,
        )
        if follows_rekey:
            log.info("the pin of %s follows its rekey to the new volume key", cipher_dir)
    return "match"
