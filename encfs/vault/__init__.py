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
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from encfs.errors import VaultConfigError, VaultError, VaultSealed, VaultUnreachable

_T = TypeVar("_T")

_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")

TRANSIT_SCHEMES = ("transit+https", "transit+http")
KMIP_SCHEME = "kmip"
KMIP_DEFAULT_PORT = 5696
TRANSIT_DEFAULT_PORT = 8200


@dataclass(frozen=True)
class VaultURL:
    """A parsed vault URL: ``transit+https://HOST:PORT/MOUNT/KEYNAME`` or
    ``kmip://HOST:PORT/KEY-ID`` (then ``mount`` is empty and ``key_name`` is the KMIP
    unique identifier)."""

    scheme: str
    host: str
    port: int
    mount: str
    key_name: str

    @property
    def is_kmip(self) -> bool:
        return self.scheme == KMIP_SCHEME

    @property
    def base_url(self) -> str:
        """The origin of the vault, e.g. ``https://vault:8200`` (``kmip://host:5696``)."""
        proto = self.scheme.split("+", 1)[-1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{proto}://{host}:{self.port}"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        path = f"{self.mount}/{self.key_name}" if self.mount else self.key_name
        return f"{self.scheme}://{host}:{self.port}/{path}"


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
    if parts.scheme not in (*TRANSIT_SCHEMES, KMIP_SCHEME):
        raise VaultConfigError(
            f"unsupported vault URL scheme {parts.scheme!r} in {url!r}: "
            "use transit+https://HOST:PORT/MOUNT/KEY (or transit+http:// on loopback) "
            "or kmip://HOST:PORT/KEY-ID"
        )
    host = parts.hostname or ""
    if not host:
        raise VaultConfigError(f"vault URL {url!r} has no host")
    default_port = KMIP_DEFAULT_PORT if parts.scheme == KMIP_SCHEME else TRANSIT_DEFAULT_PORT
    try:
        port = parts.port or default_port
    except ValueError as exc:
        raise VaultConfigError(f"vault URL {url!r} has an invalid port") from exc
    if parts.query or parts.fragment or parts.username or parts.password:
        raise VaultConfigError(f"vault URL {url!r} must not carry a query, fragment or credentials")
    segments = [s for s in parts.path.split("/") if s]
    if any(s in (".", "..") or not _SEGMENT_RE.fullmatch(s) for s in segments):
        raise VaultConfigError(
            f"vault URL {url!r} has a path segment that is not a plain name "
            "(letters, digits, '-', '_', '.'; no '..')"
        )
    if parts.scheme == KMIP_SCHEME:
        if len(segments) != 1:
            raise VaultConfigError(
                f"vault URL {url!r} must name exactly one KMIP key: kmip://HOST:PORT/KEY-ID"
            )
        return VaultURL(scheme=parts.scheme, host=host, port=port, mount="", key_name=segments[0])
    if len(segments) < 2:
        raise VaultConfigError(
            f"vault URL {url!r} must name the transit mount and the key: .../MOUNT/KEYNAME"
        )
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


KEY_RELEASE_MODES = ("unwrap", "export")


@dataclass(frozen=True)
class VaultSettings:
    """How to reach and authenticate to the vault; declared once by the CLI."""

    token_file: Path | None = None
    """Transit: file holding the host token (mode 0600)."""
    ca_file: Path | None = None
    """CA bundle that signs the vault's TLS certificate (default: the system CAs)."""
    client_cert: Path | None = None
    """PEM client certificate for mutual TLS (required by KMIP, optional for transit)."""
    client_key: Path | None = None
    """PEM private key of ``client_cert`` (default: inside ``client_cert``)."""
    timeout: float = 10.0
    """Bound, in seconds, of one request *and* of the retries at mount while unreachable."""
    key_release: str = "unwrap"
    """``unwrap`` (the vault unwraps; the KEK never leaves it) or ``export`` (fetch an
    exportable KEK, unwrap locally, wipe it at once)."""


def read_token(settings: VaultSettings) -> str:
    """Find the host token: ``--token-file``, then ``$CREDENTIALS_DIRECTORY/vault-token``
    (systemd ``LoadCredential=``), then ``VAULT_TOKEN`` / ``BAO_TOKEN``.

    Raises ``VaultCredentialsError`` when none is usable. The token never enters a message.
    """
    from encfs.errors import VaultCredentialsError

    candidates: list[Path] = []
    placeholder = False
    if settings.token_file is not None:
        candidates.append(settings.token_file)
    else:
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        cred = Path(cred_dir) / "vault-token" if cred_dir else None
        if cred is not None and cred.exists():
            # encfs@.service sets "-" when /etc/encfs/NAME.token is missing (SetCredential=).
            placeholder = _read_text(cred).strip() == "-"
            if not placeholder:
                candidates.append(cred)
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
    if placeholder:
        raise VaultCredentialsError(
            "no vault token: the service's credential vault-token is empty because "
            "/etc/encfs/NAME.token does not exist; install the host token there (mode 0600, "
            "e.g. `encfs systemd install NAME --token-file FILE`)"
        )
    raise VaultCredentialsError(
        "no vault token: pass --token-file FILE or set VAULT_TOKEN (or BAO_TOKEN)"
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


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

    def rewrap(self, wrapped_key: str) -> str:
        """Re-wrap under the newest KEK version (transit ``rewrap``; no plaintext crosses
        the wire). Backends without versions re-wrap under the same key."""
        ...

    def key_status(self) -> dict[str, Any]:
        """The KEK's metadata, never key material. Raises the ``VaultError`` that says why
        the key is unusable (deleted, disabled / not Active, access denied)."""
        ...

    def check_capabilities(self, purpose: str) -> None:
        """Preflight for ``purpose`` (``init``, ``mount``, ``rotate``): raise
        ``VaultPermissionDenied`` naming exactly what the host's identity lacks."""
        ...

    def renew_identity(self) -> float | None:
        """Keep the host's credential alive (renew a transit token); returns seconds until
        the next call, or ``None`` when the credential does not expire."""
        ...

    def identity(self) -> dict[str, Any]:
        """Who this host is to the vault, safe to log: transit token ``accessor``, ``ttl``,
        ``renewable``, ``policies``; KMIP client certificate ``subject``. Never the secret."""
        ...

    def close(self) -> None:
        """Release connections; idempotent."""
        ...


def retry_unavailable(
    call: Callable[[], _T],
    *,
    bound: float,
    on_retry: Callable[[VaultError, float], None] | None = None,
) -> _T:
    """Run ``call``; while it fails with ``VaultUnreachable`` or ``VaultSealed`` (a vault
    restarting), retry with exponential backoff (0.25 s doubling, at most 2 s apart) until
    ``bound`` seconds have passed, then re-raise the last error. Other errors (refusals,
    configuration) are raised at once. ``on_retry(error, delay)`` is told of each retry.
    """
    deadline = time.monotonic() + bound
    delay = 0.25
    while True:
        try:
            return call()
        except (VaultUnreachable, VaultSealed) as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            pause = min(delay, left)
            if on_retry is not None:
                on_retry(exc, pause)
            time.sleep(pause)
            delay = min(delay * 2, 2.0)


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
    if parsed.is_kmip:
        from encfs.vault.kmip import KmipClient

        return KmipClient(parsed, settings=settings)
    from encfs.vault.transit import TransitClient

    return TransitClient(parsed, token=read_token(settings), settings=settings)
