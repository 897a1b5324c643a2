"""Vault clients: the only code that talks to a key vault; picks a backend from the vault URL.

A backend wraps and unwraps the 32-byte volume key with a key-encryption key (KEK) that lives
in the vault. Contract for every backend:

- ``new_volume_key()`` returns a fresh random volume key *and* its wrapped form. The plaintext
  comes back in a ``bytearray`` the caller owns and must wipe (``keys.wipe``).
- ``unwrap(wrapped_key)`` returns the volume key in a fresh ``bytearray`` (caller wipes).
  Intermediate copies (HTTP bodies, base64) are zeroed where Python lets us.
- Every failure is a subclass of ``errors.VaultError``; its ``revoked`` attribute tells
  "access withdrawn" (403, key deleted/disabled/retired) from "cannot reach" (503, refused).
- Tokens and key bytes never appear in messages, logs or ``repr``.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from encfs.errors import VaultConfigError

TRANSIT_SCHEMES = ("transit+https", "transit+http")


@dataclass(frozen=True)
class VaultURL:
    """A parsed vault URL: ``transit+https://HOST:PORT/MOUNT/KEYNAME``."""

    scheme: str
    host: str
    port: int
    mount: str
    key_name: str

    @property
    def base_url(self) -> str:
        """The plain HTTP(S) origin of the vault, e.g. ``https://vault:8200``."""
        proto = self.scheme.split("+", 1)[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{proto}://{host}:{self.port}"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/{self.mount}/{self.key_name}"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ``::1``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_vault_url(url: str) -> VaultURL:
    """Parse and validate a vault URL. Raises ``VaultConfigError`` saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in TRANSIT_SCHEMES:
        raise VaultConfigError(
            f"unsupported vault URL scheme {parts.scheme!r} in {url!r}: "
            "use transit+https://HOST:PORT/MOUNT/KEY (or transit+http:// on loopback)"
        )
    host = parts.hostname or ""
    if not host:
        raise VaultConfigError(f"vault URL {url!r} has no host")
    try:
        port = parts.port or (8200)
    except ValueError as exc:
        raise VaultConfigError(f"vault URL {url!r} has an invalid port") from exc
    segments = [s for s in parts.path.split("/") if s]
    if len(segments) < 2:
        raise VaultConfigError(
            f"vault URL {url!r} must name the transit mount and the key: .../MOUNT/KEYNAME"
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise VaultConfigError(f"vault URL {url!r} must not carry a query, fragment or credentials")
    if parts.scheme == "transit+http" and not is_loopback(host):
        raise VaultConfigError(
            f"refusing plain HTTP to non-loopback vault host {host!r}: use transit+https://"
        )
    return VaultURL(
        scheme=parts.scheme,
        host=host,
        port=port,
        mount="/".join(segments[:-1]),
        key_name=segments[-1],
    )


@dataclass(frozen=True)
class VaultSettings:
    """How to reach and authenticate to the vault; declared once by the CLI."""

    token_file: Path | None = None
    ca_file: Path | None = None
    timeout: float = 10.0


def read_token(settings: VaultSettings) -> str:
    """Find the host token: ``--token-file``, then ``$CREDENTIALS_DIRECTORY/vault-token``
    (systemd ``LoadCredential=``), then ``VAULT_TOKEN`` / ``BAO_TOKEN``.

    Raises ``VaultCredentialsError`` when none is usable. The token never enters a message.
    """
    from encfs.errors import VaultCredentialsError

    candidates: list[Path] = []
    if settings.token_file is not None:
        candidates.append(settings.token_file)
    else:
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if cred_dir and (Path(cred_dir) / "vault-token").exists():
            candidates.append(Path(cred_dir) / "vault-token")
    for path in candidates:
        try:
            st = path.stat()
            if st.st_mode & 0o077 and settings.token_file is not None:
                raise VaultCredentialsError(
                    f"token file {path} is readable by group or others (mode "
                    f"{st.st_mode & 0o777:o}); run: chmod 600 {path}"
                )
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise VaultCredentialsError(f"cannot read token file {path}: {exc.strerror}") from None
        if not token:
            raise VaultCredentialsError(f"token file {path} is empty")
        return token
    for var in ("VAULT_TOKEN", "BAO_TOKEN"):
        token = os.environ.get(var, "").strip()
        if token:
            return token
    raise VaultCredentialsError(
        "no vault token: pass --token-file FILE or set VAULT_TOKEN (or BAO_TOKEN)"
    )


class KeyWrapper(Protocol):
    """What the rest of encfs needs from a vault backend (see the module docstring)."""

    @property
    def url(self) -> VaultURL: ...

    def new_volume_key(self) -> tuple[bytearray, str]:
        """Return (volume key the caller must wipe, wrapped key as stored in the header)."""
        ...

    def unwrap(self, wrapped_key: str) -> bytearray:
        """Return the volume key for ``wrapped_key`` in a fresh bytearray (caller wipes)."""
        ...

    def close(self) -> None:
        """Release connections; idempotent."""
        ...


def wrapped_kek_version(wrapped_key: str) -> int:
    """The KEK version a transit ciphertext names (``vault:v3:…`` → 3); 0 if it names none."""
    parts = wrapped_key.split(":", 2)
    if len(parts) == 3 and parts[0] == "vault" and parts[1].startswith("v"):
        try:
            return int(parts[1][1:])
        except ValueError:
            return 0
    return 0


def connect(url: str | VaultURL, settings: VaultSettings) -> KeyWrapper:
    """Open a backend for ``url``. Raises ``VaultConfigError`` / ``VaultCredentialsError``."""
    parsed = url if isinstance(url, VaultURL) else parse_vault_url(url)
    from encfs.vault.transit import TransitClient

    return TransitClient(parsed, token=read_token(settings), settings=settings)
