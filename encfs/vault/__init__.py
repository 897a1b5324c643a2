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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from encfs.errors import (
    VaultConfigError,
    VaultError,
    VaultNotPinned,
    VaultSealed,
    VaultUnreachable,
)
from encfs.keys import LockedSecret

_T = TypeVar("_T")

_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")

TRANSIT_SCHEMES = ("transit+https", "transit+http")
KMIP_SCHEME = "kmip"
KMIP_DEFAULT_PORT = 5696
TRANSIT_DEFAULT_PORT = 8200


@dataclass(frozen=True)
class Endpoint:
    """One address of a vault: a host and a port (a node of a cluster)."""

    host: str
    port: int

    def origin(self, scheme: str) -> str:
        """``PROTO://HOST:PORT`` for a vault URL scheme (``transit+https`` -> ``https``)."""
        return f"{scheme.split('+', 1)[-1]}://{_url_host(self.host)}:{self.port}"


@dataclass(frozen=True)
class VaultURL:
    """A parsed vault URL: ``transit+https://HOST:PORT/MOUNT/KEYNAME`` or
    ``kmip://HOST:PORT/KEY-ID`` (then ``mount`` is empty and ``key_name`` is the KMIP
    unique identifier), at one address or, for a cluster, several (``also``)."""

    scheme: str
    host: str
    port: int
    mount: str
    key_name: str
    also: tuple[Endpoint, ...] = ()
    """Further addresses of the same vault (one cluster: the same key behind each), all
    pinned by the host and trusted alike; tried in order after ``host:port`` when it
    cannot serve (``encfs.vault.connection``). Empty for a vault at one address."""

    @property
    def is_kmip(self) -> bool:
        return self.scheme == KMIP_SCHEME

    @property
    def base_url(self) -> str:
        """The origin of the (first) address, e.g. ``https://vault:8200``
        (``kmip://host:5696``)."""
        return Endpoint(self.host, self.port).origin(self.scheme)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """Every address, the first one first."""
        return (Endpoint(self.host, self.port), *self.also)

    @property
    def origins(self) -> tuple[str, ...]:
        """``base_url`` of every address, in order."""
        return tuple(e.origin(self.scheme) for e in self.endpoints)

    @property
    def primary(self) -> VaultURL:
        """This vault at its first address only: the URL a volume header records."""
        return replace(self, also=())

    def __str__(self) -> str:
        """The URL of each address, separated by a space (``parse_vault_urls`` reads it
        back); one URL for a vault at one address."""
        path = f"{self.mount}/{self.key_name}" if self.mount else self.key_name
        return " ".join(
            f"{self.scheme}://{_url_host(e.host)}:{e.port}/{path}" for e in self.endpoints
        )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


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


def split_vault_list(spec: str) -> list[str]:
    """The entries of a list of vault addresses as the host writes it: separated by white
    space (``VAULT=https://a:8200 https://b:8200`` in a config file; ``--vault`` given more
    than once is joined the same way). A URL holds no white space, so nothing is ambiguous."""
    return spec.split()


def parse_vault_urls(spec: str) -> VaultURL:
    """One vault at one or more addresses: full vault URLs separated by white space
    (``split_vault_list``). Raises ``VaultConfigError`` for an invalid entry, for entries
    that name different vaults (scheme, mount or key: one list is one vault and one KEK;
    only host and port may differ), and for an address listed twice."""
    items = split_vault_list(spec)
    if not items:
        raise VaultConfigError("no vault URL given")
    return _one_vault([parse_vault_url(item) for item in items], "the vault list")


def _one_vault(urls: list[VaultURL], what: str) -> VaultURL:
    """``urls`` (each at one address) as one vault at all of their addresses, in order."""
    first = urls[0]
    seen: set[Endpoint] = set()
    for url in urls:
        if (url.scheme, url.mount, url.key_name) != (first.scheme, first.mount, first.key_name):
            raise VaultConfigError(
                f"{what} names more than one vault: {first} and {url}; the addresses of one "
                "list are the nodes of one vault (the same scheme, mount and key; only host "
                "and port differ)"
            )
        endpoint = Endpoint(url.host, url.port)
        if endpoint in seen:
            raise VaultConfigError(f"{what} names {endpoint.origin(url.scheme)} twice")
        seen.add(endpoint)
    return replace(first, also=tuple(Endpoint(u.host, u.port) for u in urls[1:]))


ADDR_ENV_VARS = ("VAULT_ADDR", "BAO_ADDR")
"""Where the Vault and OpenBao CLIs take the vault's address from; encfs honours them too."""
CACERT_ENV_VARS = ("VAULT_CACERT", "BAO_CACERT")
"""Where the Vault and OpenBao CLIs take the CA bundle from."""


def env_vault_addr(environ: Mapping[str, str] | None = None) -> str | None:
    """The vault address the host's environment configures (``VAULT_ADDR``, then
    ``BAO_ADDR``), or None."""
    env = os.environ if environ is None else environ
    for var in ADDR_ENV_VARS:
        value = env.get(var, "").strip()
        if value:
            return value
    return None


def env_ca_file(environ: Mapping[str, str] | None = None) -> Path | None:
    """The CA bundle the host's environment configures (``VAULT_CACERT``, ``BAO_CACERT``)."""
    env = os.environ if environ is None else environ
    for var in CACERT_ENV_VARS:
        value = env.get(var, "").strip()
        if value:
            return Path(value).absolute()
    return None


@dataclass(frozen=True)
class PinnedVault:
    """The vault a command may send the host's credential to, and why (for the log)."""

    url: VaultURL
    source: str
    """``--vault`` (command line or the config file's ``VAULT=``) or ``VAULT_ADDR``."""
    note: str = ""
    """Set when the pinned URL differs from the one the volume header names."""


def pin_vault_url(
    header_url: str, *, configured: str | None, addr: str | None, slot: int = 0
) -> PinnedVault:
    """Decide where the host's credential may go, never from the cipher dir alone.

    The volume header's URL is not authenticated before the key is unwrapped (its tag needs
    the key), so anyone who can edit the cipher dir could point it at a listener of theirs
    and collect the token. Only an address the operator configured on the host counts:

    - ``configured`` (``--vault URL``, or ``VAULT=URL`` in the volume's config file): a full
      vault URL, used as it is (it wins over the header's), or a bare
      ``https://HOST:PORT`` address, which takes the transit mount and key name from the
      header; or a list of either (white space between them: the nodes of one cluster,
      ``split_vault_list``), all trusted alike;
    - else ``addr`` (``VAULT_ADDR`` / ``BAO_ADDR``, like the Vault CLI): one
      ``http(s)://HOST:PORT`` with the header's transit mount and key name (transit volumes
      only).

    Which key is used on that vault is still read from the header when only an address is
    pinned; the host's volume pin (``encfs.pins``) catches a header that names another key.

    ``slot`` 1 is the second vault of a double-encrypted volume (its key slot 1, the
    header URL given here): ``configured`` is then ``--vault2`` (``VAULT2=``), and ``addr``
    must be None: ``VAULT_ADDR`` names the first vault only.
    Raises ``VaultNotPinned`` when nothing is configured, ``VaultConfigError`` when the
    configured value is invalid (an entry, a list naming two vaults or one address twice,
    a list mixing URLs and addresses, several addresses in ``VAULT_ADDR``).
    """
    option, conf = ("--vault", "VAULT") if slot == 0 else ("--vault2", "VAULT2")
    if configured:
        source = option
        items = split_vault_list(configured)
        bare = [urlsplit(item).scheme in ("http", "https") for item in items]
        if all(bare):
            url = _one_vault([_at_address(i, header_url, source) for i in items], source)
        elif any(bare):
            raise VaultConfigError(
                f"{source} mixes full vault URLs and addresses ({configured!r}): give every "
                "node as a full URL (transit+https://HOST:PORT/MOUNT/KEY) or every node as an "
                "address (https://HOST:PORT)"
            )
        else:
            url = _one_vault([parse_vault_url(i) for i in items], source)
    elif addr:
        source = "VAULT_ADDR"
        if len(split_vault_list(addr)) > 1 or "," in addr:
            raise VaultConfigError(
                f"VAULT_ADDR {addr!r} holds more than one address; like the Vault and OpenBao "
                "CLIs encfs reads one there",
                hint="give the nodes of a cluster with --vault ADDR repeated, or "
                "VAULT=ADDR1 ADDR2 ... in the volume's config file",
            )
        url = _at_address(addr, header_url, source)
    elif slot:
        raise VaultNotPinned(
            f"no second vault is configured on this host for this double-encrypted volume; "
            f"its key slot 1 names {header_url!r}, but a URL read only from the cipher dir "
            "is never sent a credential (anyone who can edit the cipher dir could change it)",
            hint=f"pin the second vault: --vault2 {header_url} with its own credential "
            "(--vault2-token-file, or --vault2-client-cert/--vault2-client-key for KMIP; "
            f"{conf}= and TOKEN_FILE2= in /etc/encfs/NAME.conf), after checking that it is "
            "your vault",
        )
    else:
        raise VaultNotPinned(
            f"no vault is configured on this host; the volume header names {header_url!r}, "
            "but a URL read only from the cipher dir is never sent the host's credential "
            "(anyone who can edit the cipher dir could change it)",
            hint=f"pin the vault: --vault {header_url} (or VAULT={header_url} in "
            "/etc/encfs/NAME.conf, or VAULT_ADDR=https://HOST:PORT), after checking that it "
            "is your vault",
        )
    try:
        named = parse_vault_url(header_url)
        same = any(named == replace(url, host=e.host, port=e.port, also=()) for e in url.endpoints)
    except VaultConfigError:
        same = False
    note = ""
    if not same:
        note = (
            f"using the vault pinned by {source}, {url}; the volume header names "
            f"{header_url!r}, which is ignored"
        )
    return PinnedVault(url=url, source=source, note=note)


def _at_address(addr: str, header_url: str, source: str) -> VaultURL:
    """``http(s)://HOST:PORT`` plus the transit mount and key of ``header_url``."""
    parts = urlsplit(addr)
    opt = "--vault2" if source == "--vault2" else "--vault"
    if parts.scheme not in ("http", "https") or parts.path.strip("/"):
        raise VaultConfigError(
            f"{source} {addr!r} is not a vault address (https://HOST:PORT); give a full "
            f"vault URL with {opt} instead"
        )
    header = parse_vault_url(header_url)  # an invalid one: VaultConfigError says why
    if header.is_kmip:
        raise VaultNotPinned(
            f"{source} {addr!r} gives only a transit address, but the volume header names "
            f"{header_url!r}",
            hint=f"pin the full vault URL with {opt} URL (or {opt[2:].upper()}=URL in the "
            "config file)",
        )
    return parse_vault_url(
        f"transit+{parts.scheme}://{parts.netloc}/{header.mount}/{header.key_name}"
    )


def check_vault_setting(spec: str) -> None:
    """Validate a host's vault setting (``--vault``, ``VAULT=``) before a volume header is
    at hand (``encfs systemd install``): one vault as full URLs, or as addresses
    ``http(s)://HOST:PORT`` (each valid, none twice), never both; what ``pin_vault_url``
    would refuse. Raises ``VaultConfigError``."""
    items = split_vault_list(spec)
    if not items:
        raise VaultConfigError("no vault URL given")
    if any(urlsplit(item).scheme in ("http", "https") for item in items):
        # An address takes mount and key from the header: any stand-in checks the rest.
        pin_vault_url("transit+https://127.0.0.1:8200/transit/k", configured=spec, addr=None)
    else:
        parse_vault_urls(spec)


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
    credential: str = "vault-token"
    """The systemd credential (``$CREDENTIALS_DIRECTORY/NAME``) the token is read from when
    no ``token_file`` is given."""
    token_env: tuple[str, ...] = ("VAULT_TOKEN", "BAO_TOKEN")
    """Environment variables the token may come from, last (none for a second vault)."""
    option_prefix: str = "--"
    """How this vault's access options begin, for messages: ``--token-file``, or
    ``--vault2-token-file`` for the second vault of a double volume."""

    @property
    def second(self) -> bool:
        """Whether these are the second vault's settings (``second_vault_settings``)."""
        return self.option_prefix != "--"


def second_vault_settings(
    first: VaultSettings,
    *,
    token_file: Path | None,
    ca_file: Path | None,
    client_cert: Path | None,
    client_key: Path | None,
) -> VaultSettings:
    """The access settings of the second vault of a double-encrypted volume: its own
    credential (``--vault2-token-file``, else the credential ``vault2-token``; never the
    first vault's token nor ``VAULT_TOKEN``), its own TLS files; the timeout and the key
    release mode of ``first``."""
    return VaultSettings(
        token_file=token_file,
        ca_file=ca_file,
        client_cert=client_cert,
        client_key=client_key,
        timeout=first.timeout,
        key_release=first.key_release,
        credential="vault2-token",
        token_env=(),
        option_prefix="--vault2-",
    )


_TOKEN_SHAPE_RE = re.compile(r"(?:hv[sbr]|[sbr])\.[A-Za-z0-9_-]{8,}")
_TOKEN_WORD_RE = re.compile(r"[^\s'\"=,:/]{20,}")


def looks_like_token(text: str) -> bool:
    """Whether ``text`` may be a vault token rather than a path: a Vault/OpenBao token shape
    (``hvs.``, ``hvb.``, ``s.``, ``b.``, ``r.`` + 8 or more characters) or a word of 20+
    characters without ``/`` that looks random (>= 3.5 bits of entropy per character).
    Used to keep a token typed where a path belongs out of every message."""
    import math
    from collections import Counter

    text = text.strip()
    if _TOKEN_SHAPE_RE.fullmatch(text):
        return True
    if "/" in text or len(text) < 20 or not _TOKEN_WORD_RE.fullmatch(text):
        return False
    counts = Counter(text)
    entropy = -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())
    return entropy >= 3.5


def redact_tokens(message: str) -> str:
    """``message`` with every word that ``looks_like_token`` replaced by ``<redacted>``."""
    out = _TOKEN_SHAPE_RE.sub("<redacted>", message)
    return _TOKEN_WORD_RE.sub(
        lambda m: "<redacted>" if looks_like_token(m.group(0)) else m.group(0), out
    )


def _shown_path(path: Path) -> str:
    """How a token file's path may appear in a message: not at all if it looks like a token
    (a token typed where the path belongs)."""
    if looks_like_token(path.name) or looks_like_token(str(path)):
        return "(path not shown: it looks like a token)"
    return str(path)


_MAX_TOKEN = 4096


def read_token(settings: VaultSettings) -> LockedSecret:
    """Find the host token: ``--token-file``, then ``$CREDENTIALS_DIRECTORY/vault-token``
    (systemd ``LoadCredential=``), then ``VAULT_TOKEN`` / ``BAO_TOKEN`` (for the second
    vault of a double volume: ``--vault2-token-file``, then the credential
    ``vault2-token``; ``settings`` says which).

    The token comes back in locked memory (``keys.LockedSecret``; the caller closes it): a
    file is read with ``readv`` into a buffer that is zeroed afterwards, so no ``str`` of it
    is made. (A token from the environment is a ``str`` there already.) Raises
    ``VaultCredentialsError`` when none is usable. The token never enters a message.
    """
    from encfs.errors import VaultCredentialsError

    candidates: list[Path] = []
    placeholder = False
    if settings.token_file is not None:
        candidates.append(settings.token_file)
    else:
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        cred = Path(cred_dir) / settings.credential if cred_dir else None
        if cred is not None and cred.exists():
            # encfs@.service sets "-" when /etc/encfs/NAME.token is missing (SetCredential=).
            placeholder = _read_text(cred).strip() == "-"
            if not placeholder:
                candidates.append(cred)
    for path in candidates:
        shown = _shown_path(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            where = shown if shown.startswith("(") else f": {shown}"
            raise VaultCredentialsError(
                f"token file not found {where}".replace(" :", ":")
            ) from None
        except OSError as exc:
            raise VaultCredentialsError(f"cannot read token file {shown}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if st.st_mode & 0o077 and settings.token_file is not None:
                raise VaultCredentialsError(
                    f"token file {shown} is readable by group or others (mode "
                    f"{st.st_mode & 0o777:o}); run: chmod 600 {shown}"
                )
            buf = bytearray(_MAX_TOKEN + 1)
            try:
                got = 0
                with memoryview(buf) as view:
                    while got < len(buf) and (n := os.readv(fd, [view[got:]])):
                        got += n
                return _token_secret(buf, 0, got, f"token file {shown}")
            finally:
                buf[:] = bytes(len(buf))
        except OSError as exc:
            raise VaultCredentialsError(f"cannot read token file {shown}: {exc.strerror}") from None
        finally:
            os.close(fd)
    for var in settings.token_env:
        value = os.environ.get(var, "")
        if value.strip():
            raw = bytearray(value, "utf-8")
            try:
                return _token_secret(raw, 0, len(raw), f"${var}")
            finally:
                raw[:] = bytes(len(raw))
    option = f"{settings.option_prefix}token-file"
    if placeholder:
        file = "NAME.token2" if settings.second else "NAME.token"
        raise VaultCredentialsError(
            f"no vault token: the service's credential {settings.credential} is empty "
            f"because /etc/encfs/{file} does not exist; install the host token there (mode "
            f"0600, e.g. `encfs systemd install NAME {option} FILE`)"
        )
    if settings.second:
        raise VaultCredentialsError(
            f"no token for the second vault: pass {option} FILE (the second vault is never "
            "sent the first one's token unless that file holds it)",
            hint=f"give the second vault's token with {option} FILE (mode 0600)",
        )
    raise VaultCredentialsError(
        "no vault token: pass --token-file FILE or set VAULT_TOKEN (or BAO_TOKEN)"
    )


def _token_secret(buf: bytearray, start: int, end: int, what: str) -> LockedSecret:
    """``buf[start:end]`` without surrounding white space, checked, in locked memory."""
    from encfs.errors import VaultCredentialsError

    if end > _MAX_TOKEN:
        raise VaultCredentialsError(f"{what} is longer than {_MAX_TOKEN} bytes: not a token")
    while start < end and buf[start] in b" \t\r\n":
        start += 1
    while end > start and buf[end - 1] in b" \t\r\n":
        end -= 1
    if start == end:
        raise VaultCredentialsError(f"{what} is empty")
    if any(c < 0x21 or c > 0x7E for c in memoryview(buf)[start:end]):
        raise VaultCredentialsError(
            f"{what} holds white space or non-printable characters inside the token"
        )
    with memoryview(buf) as view:
        return LockedSecret(view[start:end])


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


class KeyWrapper(Protocol):
    """What the rest of encfs needs from a vault backend (see the module docstring)."""

    @property
    def url(self) -> VaultURL: ...

    @property
    def serving(self) -> str:
        """The address (``PROTO://HOST:PORT``) that answered the last request: of a vault
        at several addresses, the node in use (the first address until one answered)."""
        ...

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
    """Open a backend for ``url`` (a string may list several addresses of one vault:
    ``parse_vault_urls``). Raises ``VaultConfigError`` / ``VaultCredentialsError``."""
    parsed = url if isinstance(url, VaultURL) else parse_vault_urls(url)
    if parsed.is_kmip:
        from encfs.vault.kmip import KmipClient

        return KmipClient(parsed, settings=settings)
    from encfs.vault.transit import TransitClient

    return TransitClient(parsed, token=read_token(settings), settings=settings)
