"""What the host remembers about the volumes it mounts: one pin per cipher dir.

The volume header is authenticated with a key derived from the volume key it wraps, so a
header is only "valid" relative to *some* key. Anyone who may ask the same KEK for a data
key (``transit/datakey``) can build a header of their own — a fresh volume key, a valid tag
— and put it in place of the real one; the pinned vault unwraps it and the host would mount
the attacker's volume and write into it. The host therefore pins, per cipher dir, the
volume id and the volume key's *check value* (``keys.key_check_value``; never the key):

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
    differs in them while naming the pinned volume id is damaged (``volume.check_header``)."""

    cipher_dir: str
    volume_id: str
    key_check: str
    pinned_at: str
    by: str
    vault_url: str = ""
    block_size: str = ""


_OPTIONAL_PIN_FIELDS = ("vault_url", "block_size")


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
) -> Path:
    """Pin ``cipher_dir`` to this volume (replacing any pin); returns the pin file.
    ``vault_url`` and ``block_size`` are the header's (recorded when given)."""
    path = pin_path(cipher_dir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    doc = {
        "cipher_dir": str(cipher_dir.resolve()),
        "volume_id": volume_id.hex(),
        "key_check": keys.check_value().hex(),
        "pinned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "by": by,
    }
    if vault_url:
        doc["vault_url"] = vault_url
    if block_size:
        doc["block_size"] = str(block_size)
    write_file_atomic(path, (json.dumps(doc, indent=2) + "\n").encode(), 0o600)
    return path


def reset_pin(cipher_dir: Path) -> bool:
    """Forget the pin of ``cipher_dir``; returns whether there was one."""
    try:
        pin_path(cipher_dir).unlink()
    except FileNotFoundError:
        return False
    return True


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
) -> str:
    """Compare the unlocked volume with the host's pin for ``cipher_dir``.

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
            cipher_dir, volume_id, keys, by=by, vault_url=vault_url, block_size=block_size
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
    follows_rekey = False
    if pin.key_check != keys.check_value().hex():
        retiring = keys.retiring
        # A rekey under way: the header's second tag, made with the retiring key, vouches
        # for the new one (verified before this is called), so the pin follows it.
        follows_rekey = retiring is not None and pin.key_check == retiring.check_value().hex()
        if not follows_rekey:
            differs.append("volume key (its check value differs from the pinned one)")
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
        )
        if follows_rekey:
            log.info("the pin of %s follows its rekey to the new volume key", cipher_dir)
    return "match"
