"""Vault / OpenBao transit backend: wrap and unwrap the volume key with a named transit key.

Speaks the transit HTTP API with the standard library only (one keep-alive connection per
client, serialised by a lock). The KEK never leaves the vault: ``datakey/plaintext`` makes
the volume key, ``decrypt`` unwraps it, ``rewrap`` moves it to the newest KEK version.

Honest note on memory: the vault's JSON answer holding the base64 plaintext key passes
through ``json.loads``, whose ``str`` objects Python cannot zero. We decode the key into a
``bytearray`` at once and zero the raw response buffer; the short-lived ``str`` copies are
freed with the response (docs/SECURITY.md names this residue).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import ssl
import threading
from typing import Any

from encfs import errors
from encfs.vault import VaultSettings, VaultURL

_KEY_LEN = 32


class TransitClient:
    """A transit-engine client for one key. Thread-safe. See ``encfs.vault`` for the contract."""

    def __init__(self, url: VaultURL, *, token: str, settings: VaultSettings) -> None:
        self._url = url
        self._token = token
        self._settings = settings
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._ssl: ssl.SSLContext | None = None
        if url.scheme == "transit+https":
            try:
                self._ssl = ssl.create_default_context(
                    cafile=str(settings.ca_file) if settings.ca_file else None
                )
            except (OSError, ssl.SSLError) as exc:
                raise errors.VaultTLSError(
                    f"cannot load CA file {settings.ca_file}: {exc}"
                ) from None

    def __repr__(self) -> str:
        return f"<TransitClient {self._url}>"

    @property
    def url(self) -> VaultURL:
        return self._url

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # --- transport ---------------------------------------------------------------------------

    def _connect(self) -> http.client.HTTPConnection:
        if self._conn is None:
            timeout = self._settings.timeout
            if self._ssl is not None:
                self._conn = http.client.HTTPSConnection(
                    self._url.host, self._url.port, timeout=timeout, context=self._ssl
                )
            else:
                self._conn = http.client.HTTPConnection(
                    self._url.host, self._url.port, timeout=timeout
                )
        return self._conn

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One API call; returns the parsed JSON (or None for 204). Raises ``VaultError``."""
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"X-Vault-Token": self._token, "Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        where = f"{self._url.base_url}{path}"
        with self._lock:
            for attempt in (1, 2):
                conn = self._connect()
                try:
                    conn.request(method, path, body=payload, headers=headers)
                    resp = conn.getresponse()
                    raw = bytearray(resp.read())
                    status = resp.status
                    break
                except ssl.SSLError as exc:
                    self._drop()
                    raise errors.VaultTLSError(f"TLS with vault {where} failed: {exc}") from None
                except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                    # A keep-alive connection the server closed: retry once on a fresh one.
                    self._drop()
                    if attempt == 2:
                        raise errors.VaultUnreachable(
                            f"vault {where} closed the connection"
                        ) from None
                except TimeoutError:
                    self._drop()
                    raise errors.VaultUnreachable(
                        f"vault {where} did not answer within {self._settings.timeout:g}s"
                    ) from None
                except OSError as exc:
                    self._drop()
                    raise errors.VaultUnreachable(
                        f"cannot reach vault {where}: {exc.strerror or exc}"
                    ) from None
        try:
            return self._parse(status, raw, method, path)
        finally:
            raw[:] = bytes(len(raw))

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _parse(self, status: int, raw: bytearray, method: str, path: str) -> Any:
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        if 200 <= status < 300:
            if raw and data is None:
                raise errors.VaultProtocolError(
                    f"vault answered {method} {path} with something that is not JSON"
                )
            return data
        detail = (
            "; ".join(str(e) for e in (data.get("errors") or []) if isinstance(data, dict))
            if isinstance(data, dict)
            else ""
        )
        detail = detail or f"HTTP {status}"
        what = f"vault refused {method} {path} for key {self._url.key_name!r}: {detail}"
        low = detail.lower()
        if status == 403:
            raise errors.VaultPermissionDenied(what)
        if status == 503 or "sealed" in low:
            raise errors.VaultSealed(f"vault {self._url.base_url} is sealed ({detail})")
        if "soft-deleted" in low or "soft deleted" in low:
            raise errors.VaultKeyDisabled(what)
        if "too old" in low or "min_decryption_version" in low:
            raise errors.VaultKeyVersionRetired(what)
        if "not found" in low or status == 404:
            raise errors.VaultKeyNotFound(what)
        raise errors.VaultProtocolError(what)

    def _key_path(self, op: str) -> str:
        return f"/v1/{self._url.mount}/{op}/{self._url.key_name}"

    # --- KeyWrapper ----------------------------------------------------------------------------

    def new_volume_key(self) -> tuple[bytearray, str]:
        data = self._request("POST", self._key_path("datakey/plaintext"), {"bits": 256})
        try:
            plaintext = data["data"]["plaintext"]
            wrapped = data["data"]["ciphertext"]
        except (TypeError, KeyError):
            raise errors.VaultProtocolError(
                "vault datakey answer lacks plaintext/ciphertext"
            ) from None
        return _decode_key(plaintext), str(wrapped)

    def unwrap(self, wrapped_key: str) -> bytearray:
        data = self._request("POST", self._key_path("decrypt"), {"ciphertext": wrapped_key})
        try:
            plaintext = data["data"]["plaintext"]
        except (TypeError, KeyError):
            raise errors.VaultProtocolError("vault decrypt answer lacks plaintext") from None
        return _decode_key(plaintext)

    def rewrap(self, wrapped_key: str) -> str:
        """Re-wrap under the newest KEK version; no plaintext key crosses the wire."""
        data = self._request("POST", self._key_path("rewrap"), {"ciphertext": wrapped_key})
        try:
            return str(data["data"]["ciphertext"])
        except (TypeError, KeyError):
            raise errors.VaultProtocolError("vault rewrap answer lacks ciphertext") from None

    def key_status(self) -> dict[str, Any]:
        """The key's metadata (latest_version, min_decryption_version, …); no key material."""
        data = self._request("GET", f"/v1/{self._url.mount}/keys/{self._url.key_name}")
        result: dict[str, Any] = data.get("data", {}) if isinstance(data, dict) else {}
        return result

    def token_lookup_self(self) -> dict[str, Any]:
        data = self._request("GET", "/v1/auth/token/lookup-self")
        result: dict[str, Any] = data.get("data", {}) if isinstance(data, dict) else {}
        return result

    def renew_self(self, increment: str | None = None) -> dict[str, Any]:
        body = {"increment": increment} if increment else {}
        data = self._request("POST", "/v1/auth/token/renew-self", body)
        result: dict[str, Any] = data.get("auth", {}) if isinstance(data, dict) else {}
        return result


def _decode_key(text: object) -> bytearray:
    if not isinstance(text, str):
        raise errors.VaultProtocolError("vault returned a non-text key")
    buf = bytearray(text, "ascii")
    try:
        key = bytearray(base64.b64decode(buf, validate=True))
    except (binascii.Error, ValueError):
        raise errors.VaultProtocolError("vault returned a key that is not base64") from None
    finally:
        buf[:] = bytes(len(buf))
    if len(key) != _KEY_LEN:
        n = len(key)
        key[:] = bytes(n)
        raise errors.VaultProtocolError(f"vault returned a {n}-byte key, expected {_KEY_LEN}")
    return key
