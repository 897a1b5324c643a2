"""Vault / OpenBao transit backend: wrap and unwrap the volume key with a named transit key.

Speaks the transit HTTP API over ``encfs.vault.rest`` (standard library only): one
keep-alive connection per client, serialised by a lock, reopened once when the server (or a
load balancer) dropped it while idle (``encfs.vault.connection``). The KEK never leaves the
vault: ``datakey/plaintext`` makes the volume key, ``decrypt`` unwraps it, ``rewrap`` moves
it to the newest KEK version without any plaintext crossing the wire.

Error mapping, from answers observed on OpenBao 2.7.2 (bodies are ``{"errors": [...]}``):

==========================================================  ==========================
HTTP 403 "permission denied" (token revoked/expired; a      ``VaultPermissionDenied``
policy miss says "1 error occurred:\\n\\t* permission denied")
HTTP 400 "encryption key not found"; HTTP 404 on            ``VaultKeyNotFound``
``keys/KEY`` (``{"errors":[]}``) or on an unknown mount
("no handler for route ...")
HTTP 400 "refusing to use soft-deleted key"                 ``VaultKeyDisabled``
HTTP 400 "... disallowed by policy (too old)"               ``VaultKeyVersionRetired``
HTTP 503 "Vault is sealed"                                  ``VaultSealed``
refused / reset / timeout / DNS; a redirect, HTTP 429,      ``VaultUnreachable``
472, 473 or another 5xx (a node that cannot serve:
``encfs.vault.rest``; with several addresses, the next
one is asked first)
certificate verification, handshake, https to a plain port  ``VaultTLSError``
other HTTP 400 on ``decrypt``/``rewrap`` (bad ciphertext,   ``VaultCiphertextRejected``
or not made by this key: a key re-created under its name)
anything else (HTTP 400 "lease is not                       ``VaultProtocolError``
renewable", non-JSON, missing fields, redirects)
==========================================================  ==========================

Messages are one line, name the vault and the API path (hence mount and key) and keep the
vault's own error text; the token is never put in a message, a ``repr`` or a returned dict.

Memory hygiene for the plaintext volume key (``datakey/plaintext`` and ``decrypt``): the body
is read with ``readinto`` straight into a ``bytearray``; the base64 ``plaintext`` value is
located in that buffer and decoded by hand into the caller's ``bytearray`` (``base64`` and
``binascii`` would return an immutable ``bytes`` copy of the key), then overwritten with
``A`` characters *before* ``json.loads`` runs, so the ``str`` objects json creates never hold
the key; the body buffer is zeroed afterwards. What Python still leaves behind, and we cannot
zero: short-lived ``int`` objects of at most 24 bits of key each from the decoder. The
answer is read from the socket without http.client's buffered reader (``encfs.vault.rest``)
and, over TLS, OpenSSL zeroes each decrypted record once read (``SSL_OP_CLEANSE_PLAINTEXT``),
so neither keeps the base64 text of the key. No contiguous copy of the 32 key bytes remains
after the caller wipes its ``bytearray`` (``tests/vault/test_transit.py`` scans a process's
memory to check this).
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any, TypeVar

from encfs import errors
from encfs.keys import LockedSecret
from encfs.vault import VaultSettings, VaultURL
from encfs.vault.connection import KeyWrapperClient
from encfs.vault.rest import VaultHTTP, tls_context
from encfs.vault.rest import zero as _zero

__all__ = ["TransitClient"]

_T = TypeVar("_T")

_KEY_LEN = 32
_MAX_DETAIL = 300  # characters of the vault's own error text kept in a message

# The base64 plaintext in a datakey/decrypt answer. Go's encoding/json writes base64 as is
# (it escapes only <, > and &), so the value is a plain run of base64 characters.
_PLAINTEXT_RE = re.compile(rb'"plaintext"\s*:\s*"([A-Za-z0-9+/]*={0,2})"')

_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_INVALID = 255
_B64_TABLE = bytearray([_B64_INVALID]) * 256
for _i, _c in enumerate(_B64_ALPHABET):
    _B64_TABLE[_c] = _i
del _i, _c


class TransitClient(KeyWrapperClient):
    """A transit-engine client for one key. Thread-safe. See ``encfs.vault`` for the contract."""

    def __init__(
        self, url: VaultURL, *, token: LockedSecret | str, settings: VaultSettings
    ) -> None:
        if not token:
            raise errors.VaultCredentialsError(f"empty vault token for {url}")
        self._url = url
        # The token lives in locked memory for the client's life; each request copies it
        # into a request buffer that is zeroed once sent (``_request_bytes``).
        self._token = token if isinstance(token, LockedSecret) else LockedSecret(token.encode())
        self._settings = settings
        tls = None
        if url.scheme == "transit+https":
            tls = tls_context(
                settings.ca_file,
                client_cert=settings.client_cert,
                client_key=settings.client_key,
                what=f" for vault {url}",
            )
        elif settings.client_cert is not None:
            raise errors.VaultConfigError(
                f"a client certificate needs TLS, but {url} is plain HTTP: use transit+https://"
            )
        self._link = self._http = VaultHTTP(
            url.endpoints, tls=tls, token=self._token, timeout=settings.timeout
        )
        if settings.key_release not in ("unwrap", "export"):
            raise errors.VaultConfigError(
                f"unknown key-release mode {settings.key_release!r}: use unwrap or export"
            )

    def __repr__(self) -> str:
        return f"<TransitClient {self._url}>"

    # --- KeyWrapper -------------------------------------------------------------------------

    def new_volume_key(self) -> tuple[bytearray, str]:
        """A fresh 32-byte volume key (caller wipes) and its ``vault:vN:…`` wrapped form."""
        path = self._key_path("datakey/plaintext")
        key, data = self._call_secret("POST", path, {"bits": _KEY_LEN * 8})
        try:
            wrapped = _field(data, "ciphertext", str, path)
            if not wrapped.startswith("vault:v"):
                raise errors.VaultProtocolError(
                    f"vault {self.serving} answered POST {path} with a ciphertext "
                    "that is not in vault:vN: form"
                )
        except BaseException:
            _zero(key)
            raise
        return key, wrapped

    def unwrap(self, wrapped_key: str) -> bytearray:
        """The volume key wrapped in ``wrapped_key``, in a fresh bytearray (caller wipes).

        ``key_release="unwrap"`` (default): transit ``decrypt``, the KEK never leaves the
        vault. ``"export"``: fetch that KEK version (the key must be exportable), unwrap
        here, and zero the KEK before returning.
        """
        if self._settings.key_release == "export":
            return self._unwrap_exported(wrapped_key)
        key, _ = self._call_secret("POST", self._key_path("decrypt"), {"ciphertext": wrapped_key})
        return key

    def _unwrap_exported(self, wrapped_key: str) -> bytearray:
        parts = wrapped_key.split(":", 2)
        version = parts[1][1:] if len(parts) == 3 and parts[1].startswith("v") else ""
        if parts[0] != "vault" or not version.isdigit():
            raise errors.VaultProtocolError(
                f"wrapped key is not a transit ciphertext (vault:vN:...); cannot unwrap it "
                f"locally with a key exported from {self._url}"
            )
        path = f"/v1/{self._url.mount}/export/encryption-key/{self._url.key_name}/{version}"
        pattern = re.compile(
            rb'"keys"\s*:\s*\{\s*"' + version.encode() + rb'"\s*:\s*"([A-Za-z0-9+/]*={0,2})"\s*\}'
        )
        kek, _ = self._call_secret("GET", path, None, pattern=pattern, field="keys")
        try:
            try:
                blob = base64.b64decode(parts[2], validate=True)
            except ValueError:
                raise errors.VaultCiphertextRejected(
                    "the wrapped key in the volume is not valid base64 after vault:vN:"
                ) from None
            from encfs import crypto

            try:
                key = crypto.open_transit_ciphertext(kek, blob)
            except errors.IntegrityError as exc:
                raise errors.VaultCiphertextRejected(
                    f"{exc} (key {self._url.key_name!r} version {version})"
                ) from None
        finally:
            _zero(kek)
        if len(key) != _KEY_LEN:
            _zero(key)
            raise errors.VaultProtocolError(
                f"the wrapped key in the volume unwraps to {len(key)} bytes, expected {_KEY_LEN}"
            )
        return key

    def check_capabilities(self, purpose: str) -> None:
        """Preflight: ask the vault which capabilities the token has on the paths that
        ``purpose`` (``init``, ``mount``, ``rotate``) needs and name the first one missing
        (``VaultPermissionDenied``). Skipped (returns) when the token may not ask
        ``sys/capabilities-self``: the real call then reports the refusal."""
        ops = {
            "init": ["datakey/plaintext"],
            "mount": ["export/encryption-key"]
            if self._settings.key_release == "export"
            else ["decrypt"],
            "rotate": ["rewrap", "decrypt"],
        }[purpose]
        need = {
            f"{self._url.mount}/{op}/{self._url.key_name}": (
                "read" if op.startswith("export") else "update"
            )
            for op in ops
        }
        try:
            data = self._call(
                "POST", "/v1/sys/capabilities-self", {"paths": list(need)}, section=""
            )
        except errors.VaultPermissionDenied:
            return  # not allowed to ask; the real call will say what is refused
        for path, cap in need.items():
            have = data.get(path)
            if not isinstance(have, list):
                continue
            if "root" in have or cap in have:
                continue
            raise errors.VaultPermissionDenied(
                f"vault {self.serving}: the token lacks {cap!r} on {path} "
                f"(it has {', '.join(map(str, have)) or 'nothing'}); `encfs {purpose}` needs it",
                hint="grant it in the host's policy (see `encfs vault setup`), or use the "
                "right token",
            )

    def renew_identity(self) -> float | None:
        """Keep the token alive: renew it when renewable (``auth/token/renew-self``) and
        return the seconds after which to call again (half the granted TTL); ``None`` for
        a token that never expires. A non-renewable token is not renewed: the return value
        is its remaining TTL, so the caller notices expiry (a 403 from then on).
        Raises ``VaultPermissionDenied`` when the token is revoked or expired."""
        info = self.token_lookup_self()
        ttl = info.get("ttl")
        if not isinstance(ttl, int) or ttl <= 0:
            return None
        if not info.get("renewable"):
            return float(ttl)
        auth = self.renew_self()
        granted = int(auth.get("lease_duration", ttl))
        return max(granted / 2.0, 1.0)

    def identity(self) -> dict[str, Any]:
        """Token ``accessor``, ``ttl``, ``renewable``, ``policies``, ``display_name``,
        ``expire_time`` (all safe to log; never the token)."""
        data = self.token_lookup_self()
        keep = ("accessor", "ttl", "renewable", "policies", "display_name", "expire_time", "period")
        return {k: data.get(k) for k in keep if k in data}

    def rewrap(self, wrapped_key: str) -> str:
        """Re-wrap under the newest KEK version; no plaintext key crosses the wire."""
        path = self._key_path("rewrap")
        data = self._call("POST", path, {"ciphertext": wrapped_key})
        return _field(data, "ciphertext", str, path)

    def key_status(self) -> dict[str, Any]:
        """The key's metadata (``latest_version``, ``min_decryption_version``,
        ``deletion_allowed``, ...); never key material. A soft-deleted key (OpenBao) raises
        ``VaultKeyDisabled``, like any use of it would."""
        path = f"/v1/{self._url.mount}/keys/{self._url.key_name}"
        data = self._call("GET", path)
        _field(data, "latest_version", int, path)
        if data.get("soft_deleted"):  # OpenBao still shows a soft-deleted key's metadata
            raise errors.VaultKeyDisabled(
                f"vault {self.serving}: key {self._url.key_name!r} in mount "
                f"{self._url.mount!r} is soft-deleted"
            )
        return data

    def token_lookup_self(self) -> dict[str, Any]:
        """The token's own metadata (``ttl``, ``renewable``, ``accessor``, ``policies``, ...).

        The vault's answer carries the token itself as ``id``: it is removed.
        """
        data = self._call("GET", "/v1/auth/token/lookup-self")
        data.pop("id", None)
        return data

    def renew_self(self, increment: str | None = None) -> dict[str, Any]:
        """Renew the token; returns the ``auth`` block (``lease_duration``, ``renewable``,
        ``policies``, ...) without ``client_token``. A non-renewable token raises
        ``VaultProtocolError`` ("lease is not renewable"); a revoked one
        ``VaultPermissionDenied``."""
        path = "/v1/auth/token/renew-self"
        body: dict[str, Any] = {"increment": increment} if increment else {}
        auth = self._call("POST", path, body, section="auth")
        auth.pop("client_token", None)
        _field(auth, "lease_duration", int, path)
        return auth

    # --- requests -----------------------------------------------------------------------------

    def _key_path(self, op: str) -> str:
        return f"/v1/{self._url.mount}/{op}/{self._url.key_name}"

    def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, section: str = "data"
    ) -> dict[str, Any]:
        """One API call without secrets in the answer; returns its ``data`` (or ``auth``)."""
        status, raw = self._http.exchange(method, path, body)
        try:
            doc = self._decode(status, raw, method, path)
        finally:
            _zero(raw)
        return self._section(doc, section, method, path)

    def _call_secret(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        pattern: re.Pattern[bytes] = _PLAINTEXT_RE,
        field: str = "plaintext",
    ) -> tuple[bytearray, dict[str, Any]]:
        """A call whose answer holds a key in ``data[field]`` (base64, located in the raw
        body by ``pattern``'s group 1): returns (key, the rest of ``data``)."""
        status, raw = self._http.exchange(method, path, body)
        key: bytearray | None = None
        try:
            match = pattern.search(raw) if 200 <= status < 300 else None
            if match is not None:
                start, end = match.span(1)
                key = _b64decode_key(raw, start, end)
                raw[start:end] = b"A" * (end - start)  # same length: overwritten in place
                blank: str | None = "A" * (end - start)
            else:
                blank = None
            doc = self._decode(status, raw, method, path)
            data = self._section(doc, "data", method, path)
            text = data.pop(field, None)
            if isinstance(text, dict) and len(text) == 1:  # export: {"N": "base64"}
                text = next(iter(text.values()))
            if key is None:
                # Not the compact form we scan for; still correct, but the json str holding
                # the base64 key is a copy we cannot zero.
                if not isinstance(text, str):
                    raise errors.VaultProtocolError(
                        f"vault {self.serving} answered {method} {path} without a plaintext key"
                    )
                text_buf = bytearray(text, "ascii", errors="replace")
                try:
                    key = _b64decode_key(text_buf, 0, len(text_buf))
                finally:
                    _zero(text_buf)
            elif text != blank:
                raise errors.VaultProtocolError(
                    f"vault {self.serving} answered {method} {path} with an ambiguous "
                    "plaintext field"
                )
            if len(key) != _KEY_LEN:
                raise errors.VaultProtocolError(
                    f"vault {self.serving} answered {method} {path} with a "
                    f"{len(key)}-byte key, expected {_KEY_LEN}"
                )
            return key, data
        except BaseException:
            if key is not None:
                _zero(key)
            raise
        finally:
            _zero(raw)

    # --- answers --------------------------------------------------------------------------------

    def _decode(self, status: int, raw: bytearray, method: str, path: str) -> Any:
        """Parse the JSON answer; raise the ``VaultError`` a non-2xx status stands for."""
        try:
            doc = json.loads(raw) if raw else None
            parsed = True
        except ValueError:  # includes UnicodeDecodeError
            doc, parsed = None, False
        if 200 <= status < 300:
            if not parsed:
                raise errors.VaultProtocolError(
                    f"vault {self.serving} answered {method} {path} with something that is not JSON"
                )
            return doc
        raise self._error(status, doc if parsed else None, raw, method, path)

    def _error(
        self, status: int, doc: Any, raw: bytearray, method: str, path: str
    ) -> errors.VaultError:
        detail = ""
        if isinstance(doc, dict) and isinstance(doc.get("errors"), list):
            detail = "; ".join(str(e) for e in doc["errors"])
        elif doc is None and raw:
            detail = raw[:_MAX_DETAIL].decode("utf-8", errors="replace")
        detail = " ".join(detail.split())  # one line: a policy miss comes as a bulleted list
        if self._token.within(detail.encode("utf-8", errors="replace")) >= 0:
            detail = "(the vault's message is not shown: it contained the token)"
        detail = detail[:_MAX_DETAIL]
        low = detail.lower()
        what = f"vault {self.serving} refused {method} {path}: HTTP {status}" + (
            f" {detail}" if detail else ""
        )
        if status == 403:
            return errors.VaultPermissionDenied(what)
        if "not exportable" in low:
            return errors.VaultConfigError(
                what,
                hint="--key-release export needs a transit key created exportable; use the "
                "default --key-release unwrap (the KEK then never leaves the vault)",
            )
        if "soft-deleted" in low:
            return errors.VaultKeyDisabled(what)
        if "(too old)" in low:
            return errors.VaultKeyVersionRetired(what)
        if "encryption key not found" in low:
            return errors.VaultKeyNotFound(what)
        if status == 404:
            if "no handler for route" in low:
                return errors.VaultKeyNotFound(
                    f"{what} (no secrets engine mounted at {self._url.mount!r})"
                )
            return errors.VaultKeyNotFound(
                f"{what} (no key {self._url.key_name!r} in mount {self._url.mount!r})"
            )
        if status == 400 and path in (self._key_path("decrypt"), self._key_path("rewrap")):
            return errors.VaultCiphertextRejected(what)  # the key exists; the ciphertext fails
        return errors.VaultProtocolError(what)

    def _section(self, doc: Any, section: str, method: str, path: str) -> dict[str, Any]:
        """``doc[section]`` (``section=""``: the whole answer), checked to be an object."""
        if not section:
            block = doc if isinstance(doc, dict) else None
        else:
            block = doc.get(section) if isinstance(doc, dict) else None
        if not isinstance(block, dict):
            raise errors.VaultProtocolError(
                f"vault {self.serving} answered {method} {path} without a {section!r} object"
            )
        return block


def _field(data: dict[str, Any], name: str, kind: type[_T], path: str) -> _T:
    value = data.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise errors.VaultProtocolError(f"vault answer to {path} lacks {name!r} ({kind.__name__})")
    return value


def _b64decode_key(src: bytearray, start: int, end: int) -> bytearray:
    """Decode standard padded base64 ``src[start:end]`` into a new bytearray, by hand.

    ``base64.b64decode`` would return the key as an immutable ``bytes`` object that nobody
    can zero; this writes each output byte straight into the result.
    """
    n = end - start
    if n % 4:
        raise errors.VaultProtocolError("vault returned a plaintext key that is not base64")
    pad = 0
    while pad < 2 and pad < n and src[end - 1 - pad] == 0x3D:  # '='
        pad += 1
    out = bytearray(n // 4 * 3 - pad)
    table = _B64_TABLE
    j = 0
    acc = 0
    bits = 0
    try:
        for i in range(start, end - pad):
            v = table[src[i]]
            if v == _B64_INVALID:
                raise errors.VaultProtocolError("vault returned a plaintext key that is not base64")
            acc = ((acc << 6) | v) & 0xFFFFFF
            bits += 6
            if bits >= 8:
                bits -= 8
                out[j] = (acc >> bits) & 0xFF
                j += 1
    except BaseException:
        _zero(out)
        raise
    return out
