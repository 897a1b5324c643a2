"""KMIP backend: wrap and unwrap the volume key with a symmetric key held by a KMIP server.

The vault URL is ``kmip://HOST:PORT/KEY-ID``: KEY-ID is the KMIP *Unique Identifier* of an
AES key (the KEK) with usage mask Encrypt|Decrypt in state Active. The host authenticates
with a client certificate (mutual TLS): ``--client-cert`` / ``--client-key`` are required,
``--ca-file`` names the CA of the server's certificate (default: the system CAs).

Wrapped-key format (ASCII, always 88 characters)::

    kmip:v1:<base64url without padding of  nonce(12) || ciphertext(32) || tag(16)>

``v1`` means AES-GCM under the KMIP key with a 96-bit nonce chosen at random by the client,
a 128-bit tag and the associated data ``b"encfs/kmip/v1"``. KMIP keys have no versions, so
the format names none: ``rewrap`` re-encrypts under the same key id with a fresh nonce.
The server's Encrypt and a local seal produce exactly these bytes, so a wrapped key does not
record how it was made and either path opens it.

Which path is used (``VaultSettings.key_release``):

- ``"unwrap"`` (default): KMIP *Encrypt* (``new_volume_key``, ``rewrap``) and *Decrypt*
  (``unwrap``) run on the server, in AES-GCM mode; the KEK never leaves it. Needs KMIP 1.4
  (the version that carries GCM tags and associated data); PyKMIP 0.11's server implements
  Encrypt/Decrypt for symmetric keys in CBC, ECB, CFB, OFB, CTR and GCM modes.
- ``"export"`` (key release): ``unwrap`` first reads the key's *State* and refuses any state
  but Active (PyKMIP's server still hands out the bytes of a revoked key), then fetches the
  raw key with *Get*, opens the wrapped key locally (``encfs.crypto.kmip_gcm_open``) and
  zeroes the KEK at once. Wrapping still uses the server's Encrypt; only a server that
  answers *Operation Not Supported* gets a local seal (``Get`` + ``kmip_gcm_seal``).

The wire: our own TLS socket (TLS 1.2 or newer, ECDHE suites only, host name checked, the
timeout as a float) carrying KMIP 1.4 TTLV messages encoded and decoded by PyKMIP's codec
(``kmip.core``). PyKMIP's ``ProxyKmipClient`` is not used: it cannot send the GCM tag and
associated data, truncates the timeout to whole seconds (0.5 s would mean "non-blocking"),
does not check the server's host name, reads ``~/.pykmip/pykmip.conf`` and logs whole
messages (key bytes included) at DEBUG. One keep-alive connection per client, serialised by
a lock and reopened once when it turns out to have been closed while idle (server restart,
a firewall's idle timeout; PyKMIP's own server keeps idle sessions open): the lifecycle of
``encfs.vault.connection``, shared with transit.

Error mapping (KMIP result reasons as PyKMIP 0.11's server sends them):

============================================================  ===========================
connection refused / reset, DNS failure, no answer within       ``VaultUnreachable``
``timeout``, connection closed before the answer
certificate verification, handshake failure (e.g. the server    ``VaultTLSError``
rejects our client certificate: alert "unknown ca"), unreadable
``--ca-file``
no ``--client-cert``, unreadable certificate or key              ``VaultCredentialsError``
Item Not Found (unknown or destroyed key id)                    ``VaultKeyNotFound``
Permission Denied and the key's State is not Active             ``VaultKeyDisabled``
(Pre-Active, Deactivated, Compromised, Destroyed); a non-Active
State before a key release or in ``key_status``
Permission Denied otherwise (the server's operation policy      ``VaultPermissionDenied``
does not give this certificate's identity the key, usage mask
lacks Encrypt/Decrypt)
anything else (Decrypt of a damaged wrapped key, a wrapped      ``VaultProtocolError``
key of another backend, Operation Not Supported, undecodable
answers)
============================================================  ===========================

Messages are one line and name the server (``kmip://host:port``), the key id, the operation
and what to do; no key bytes in messages, logs, ``repr`` or returned dicts. PyKMIP's loggers
(``kmip`` and below) are set to WARNING: at DEBUG its protocol layer dumps messages in hex.

Memory hygiene. The volume key (and, on key release, the KEK) never enters a Python
``bytes`` or a PyKMIP object: requests are encoded with a zero placeholder of the key's
length, which is overwritten in our ``bytearray`` copy of the encoding right before sending;
answers are read with ``recv_into`` into a ``bytearray``, the key field is located by walking
the TTLV structure, copied into the caller's ``bytearray`` and zeroed in place *before*
PyKMIP decodes the rest (it copies every field into immutable ``bytes``, so it only ever sees
zeros); both buffers are zeroed afterwards. The TLS context sets OpenSSL 3's
``SSL_OP_CLEANSE_PLAINTEXT`` so the decrypted record (raw key bytes, unlike transit's base64
JSON) is cleansed once read, and the local AES-GCM runs a second time with a zero key to
overwrite the copy of the KEK that pyca/OpenSSL leave on the C stack. A released KEK is
zeroed as soon as the wrapped key is opened. ``tests/vault/test_kmip.py`` scans a process's
memory for both keys to check all this. What we cannot zero ourselves: OpenSSL's internal
buffers (its write buffer is encrypted in place and the test finds no key there with OpenSSL
3.0, but nothing guarantees it), the AES key schedule inside OpenSSL while a local seal/open
runs (cleansed when freed), copies a caller makes, and the KMIP server's own memory.
PyKMIP's high-level client would keep a Get'ed key as immutable ``bytes`` in its objects for
as long as they live: this module does not use it for that.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import logging
import re
import socket
import ssl
import threading
import warnings
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from encfs import crypto, errors
from encfs.vault import Endpoint, VaultSettings, VaultURL
from encfs.vault.connection import KeepAlive, KeyWrapperClient

__all__ = ["WRAPPED_PREFIX", "KmipClient"]

WRAPPED_PREFIX = "kmip:v1:"
_KEY_LEN = 32
_NONCE_LEN = 12
_TAG_LEN = 16
_AAD = b"encfs/kmip/v1"
_MAX_MESSAGE = 1 << 20  # our answers are a few hundred bytes; refuse anything absurd
_MAX_DETAIL = 200  # characters of the server's own result message kept in a message
_SSL_OP_CLEANSE_PLAINTEXT = 1 << 1  # OpenSSL >= 3.0 (ssl.h); the ssl module has no name for it
_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE+AES:!aNULL:!eNULL:!SHA1:!MD5"

# TTLV tags (KMIP 1.4 §9.1.3.1) of the fields that carry key bytes, and item types.
_TAG_REQUEST_MESSAGE = 0x420078
_TAG_RESPONSE_MESSAGE = 0x42007B
_TAG_BATCH_ITEM = 0x42000F
_TAG_REQUEST_PAYLOAD = 0x420079
_TAG_RESPONSE_PAYLOAD = 0x42007C
_TAG_DATA = 0x4200C2
_TAG_SYMMETRIC_KEY = 0x42008F
_TAG_KEY_BLOCK = 0x420040
_TAG_KEY_VALUE = 0x420045
_TAG_KEY_MATERIAL = 0x420043
_TYPE_STRUCTURE = 0x01
_TYPE_BYTE_STRING = 0x08

_REQUEST_DATA = (_TAG_REQUEST_MESSAGE, _TAG_BATCH_ITEM, _TAG_REQUEST_PAYLOAD, _TAG_DATA)
_RESPONSE_DATA = (_TAG_RESPONSE_MESSAGE, _TAG_BATCH_ITEM, _TAG_RESPONSE_PAYLOAD, _TAG_DATA)
_RESPONSE_KEY_MATERIAL = (
    _TAG_RESPONSE_MESSAGE,
    _TAG_BATCH_ITEM,
    _TAG_RESPONSE_PAYLOAD,
    _TAG_SYMMETRIC_KEY,
    _TAG_KEY_BLOCK,
    _TAG_KEY_VALUE,
    _TAG_KEY_MATERIAL,
)

_STATUS_ATTRIBUTES = (
    "State",
    "Object Type",
    "Cryptographic Algorithm",
    "Cryptographic Length",
    "Cryptographic Usage Mask",
)

_HINT_CREDENTIALS = (
    "give the host's KMIP client certificate and its key with --client-cert FILE "
    "--client-key FILE (PEM)"
)
_HINT_TLS = (
    "check --ca-file (the CA of the KMIP server's certificate), the server's host name and "
    "expiry, and that the server trusts the CA of --client-cert"
)
_HINT_NOT_FOUND = "check the key id in the kmip:// URL; a destroyed KMIP key cannot be recovered"
_HINT_DISABLED = (
    "the KMIP key is not Active: activate it if it is Pre-Active; a revoked (Deactivated or "
    "Compromised) KMIP key cannot be made Active again"
)
_HINT_DENIED = (
    "the KMIP server's operation policy does not let this client certificate use the key "
    "(or the key's usage mask lacks Encrypt/Decrypt): ask the KMS operator"
)
_HINT_PROTOCOL = (
    "check that the kmip:// URL names the KMIP 1.4 server and key that wrapped this volume key"
)

_PEM_CERT_RE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\s+[A-Za-z0-9+/=\s]+-----END CERTIFICATE-----"
)

_pykmip_lock = threading.Lock()
_pykmip_modules: SimpleNamespace | None = None


def _pykmip() -> SimpleNamespace:
    """PyKMIP's codec modules, imported on first use (``import kmip`` takes ~0.4 s: it pulls
    in SQLAlchemy for the server side), with its loggers held at WARNING or above."""
    global _pykmip_modules
    with _pykmip_lock:
        if _pykmip_modules is None:
            for name in ("kmip", "kmip.services.kmip_protocol", "kmip.services.kmip_client"):
                logger = logging.getLogger(name)
                if logger.level < logging.WARNING:  # NOTSET (0) included
                    logger.setLevel(logging.WARNING)
            try:
                with warnings.catch_warnings():
                    # kmip/__init__ imports its SQLAlchemy models: MovedIn20Warning.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    from kmip.core import attributes, enums, utils
                    from kmip.core.messages import contents, messages, payloads
            except ImportError as exc:
                raise errors.VaultConfigError(
                    f"kmip:// vault URLs need PyKMIP, which is not installed ({exc.name}): "
                    "pip install 'encfs[kmip]'",
                    hint="install the kmip extra: pip install 'encfs[kmip]'",
                ) from None
            _pykmip_modules = SimpleNamespace(
                attributes=attributes,
                enums=enums,
                utils=utils,
                contents=contents,
                messages=messages,
                payloads=payloads,
            )
        return _pykmip_modules


class _Refused(Exception):
    """The server answered a request with a failure result (not a transport error)."""

    def __init__(self, op: str, reason: Any, message: str) -> None:
        super().__init__(op)
        self.op = op
        self.reason = reason
        self.message = message

    @property
    def reason_name(self) -> str:
        return str(getattr(self.reason, "name", self.reason or "no reason given"))


class _ClosedBeforeAnswer(Exception):
    """The server closed the connection before sending a single byte of its answer."""


class _ClosedMidAnswer(Exception):
    """The server closed the connection in the middle of its answer."""


_STALE_CONNECTION = (
    _ClosedBeforeAnswer,
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
)


class KmipClient(KeyWrapperClient):
    """A KMIP client for one key (``kmip://HOST:PORT/KEY-ID``). Thread-safe.

    See ``encfs.vault`` for the contract and this module's docstring for the wrapped-key
    format, the two paths and the error mapping. Raises ``VaultCredentialsError`` at
    construction when the client certificate or key is missing or unreadable,
    ``VaultTLSError`` when the CA file is, ``VaultConfigError`` for a non-KMIP URL, an
    unknown ``key_release`` mode or a missing PyKMIP. No connection is made before the
    first call.
    """

    def __init__(self, url: VaultURL, *, settings: VaultSettings) -> None:
        if not url.is_kmip:
            raise errors.VaultConfigError(f"{url} is not a kmip:// URL")
        if settings.key_release not in ("unwrap", "export"):
            raise errors.VaultConfigError(
                f"unknown key-release mode {settings.key_release!r}: use unwrap or export"
            )
        self._url = url
        self._settings = settings
        self._uid = url.key_name
        self._link: KeepAlive[ssl.SSLSocket] = KeepAlive(url.endpoints, _STALE_CONNECTION)
        if settings.client_cert is None:
            raise errors.VaultCredentialsError(
                f"KMIP server {self.serving} authenticates hosts by client certificate: "
                f"pass {settings.option_prefix}client-cert FILE and "
                f"{settings.option_prefix}client-key FILE",
                hint=_HINT_CREDENTIALS,
            )
        self._cert_info = _read_certificate(settings.client_cert)
        self._ssl = self._make_context()
        self._kmip = _pykmip()

    def _make_context(self) -> ssl.SSLContext:
        settings = self._settings
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(_CIPHERS)  # TLS 1.2: forward-secret suites only (TLS 1.3's all are)
        if ssl.OPENSSL_VERSION_INFO >= (3, 0):
            # Zero each decrypted record once read: the Decrypt/Get answer holds raw key bytes.
            ctx.options |= _SSL_OP_CLEANSE_PLAINTEXT
        try:
            if settings.ca_file is not None:
                ctx.load_verify_locations(cafile=str(settings.ca_file))
            else:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
            raise errors.VaultTLSError(
                f"cannot load CA file {settings.ca_file} for KMIP server {self.serving}: {reason}",
                hint=_HINT_TLS,
            ) from None
        key_file = settings.client_key
        try:
            ctx.load_cert_chain(
                str(settings.client_cert), str(key_file) if key_file is not None else None
            )
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
            raise errors.VaultCredentialsError(
                f"cannot load client certificate {settings.client_cert} with key "
                f"{key_file or '(none given: looked inside the certificate file)'} for KMIP "
                f"server {self.serving}: {reason}; pass --client-cert FILE --client-key FILE",
                hint=_HINT_CREDENTIALS,
            ) from None
        return ctx

    def __repr__(self) -> str:
        return f"<KmipClient {self._url} key_release={self._settings.key_release}>"

    # --- KeyWrapper -------------------------------------------------------------------------

    def new_volume_key(self) -> tuple[bytearray, str]:
        """A fresh random 32-byte volume key (caller wipes) and its ``kmip:v1:`` wrapped
        form, encrypted by the server (or sealed locally, see the module docstring)."""
        key = bytearray(_KEY_LEN)
        try:
            crypto.random_key_into(key)
            return key, self._wrap(key)
        except BaseException:
            _zero(key)
            raise

    def unwrap(self, wrapped_key: str) -> bytearray:
        """The volume key wrapped in ``wrapped_key``, in a fresh bytearray (caller wipes).

        ``key_release="unwrap"``: server-side Decrypt. ``"export"``: check the key is
        Active, Get it, open here, zero the KEK.
        """
        nonce, sealed = self._parse_wrapped(wrapped_key)
        if self._settings.key_release == "export":
            return self._open_locally(nonce, sealed)
        return self._decrypt(nonce, sealed)

    def rewrap(self, wrapped_key: str) -> str:
        """Unwrap and wrap again under the same key id with a fresh nonce (KMIP keys have no
        versions); the intermediate plaintext is zeroed."""
        key = self.unwrap(wrapped_key)
        try:
            return self._wrap(key)
        finally:
            _zero(key)

    def key_status(self) -> dict[str, Any]:
        """``state`` (``active``, ``pre_active``, ``deactivated``, ``compromised``, ...),
        ``unique_identifier``, ``object_type``, ``algorithm``, ``length`` (bits), ``usage``
        and ``server``; never key material. Raises ``VaultKeyDisabled`` when the State is not
        Active, ``VaultPermissionDenied`` when the usage mask lacks Encrypt or Decrypt,
        ``VaultKeyNotFound`` for an unknown id."""
        k = self._kmip
        try:
            attrs = self._attributes(_STATUS_ATTRIBUTES)
        except _Refused as exc:
            raise self._refusal(exc, check_state=False) from None
        state = attrs.get("State")
        mask = attrs.get("Cryptographic Usage Mask")
        usage = (
            [m.name.lower() for m in k.enums.CryptographicUsageMask if mask & m.value]
            if isinstance(mask, int)
            else []
        )
        status: dict[str, Any] = {
            "state": _enum_name(state),
            "unique_identifier": self._uid,
            "object_type": _enum_name(attrs.get("Object Type")),
            "algorithm": getattr(attrs.get("Cryptographic Algorithm"), "name", None),
            "length": attrs.get("Cryptographic Length"),
            "usage": usage,
            "server": self.serving,
        }
        if state != k.enums.State.ACTIVE:
            raise self._disabled(state, "be used")
        if not {"encrypt", "decrypt"} <= set(usage):
            raise errors.VaultPermissionDenied(
                f"KMIP key {self._uid!r} on {self.serving} has usage mask "
                f"{', '.join(usage) or 'none'}: it needs Encrypt and Decrypt to wrap volume "
                "keys; use another key",
                hint=_HINT_DENIED,
            )
        return status

    def check_capabilities(self, purpose: str) -> None:
        """Preflight for ``purpose`` (``init``, ``mount``, ``rotate``). KMIP has no query for
        "what may this client do", so this reads the key's attributes, as ``key_status``
        does: it raises ``VaultPermissionDenied`` when the server denies this certificate the
        key or the usage mask lacks Encrypt/Decrypt, ``VaultKeyDisabled`` when the key is
        not Active, ``VaultKeyNotFound`` for an unknown id. Whether the operation policy
        allows Encrypt, Decrypt or Get themselves shows only in the real call."""
        if purpose not in ("init", "mount", "rotate"):
            raise ValueError(f"unknown purpose {purpose!r}")
        self.key_status()

    def renew_identity(self) -> float | None:
        """Nothing to renew: the host's identity is its client certificate, which the KMIP
        server does not extend. Returns ``None`` (no renewal loop); makes no call."""
        return None

    def identity(self) -> dict[str, Any]:
        """Who this host is to the KMIP server, from its client certificate (safe to log):
        ``client_cert_subject`` (RFC 4514), ``client_cert_common_name`` (the identity
        PyKMIP's server checks object ownership against), ``client_cert_issuer``,
        ``client_cert_fingerprint_sha256`` (hex of the DER), ``client_cert_not_after``
        (ISO 8601, UTC), ``server``."""
        return {**self._cert_info, "server": self.serving}

    # --- wrap / unwrap paths -------------------------------------------------------------------

    def _wrap(self, key: bytearray) -> str:
        try:
            return self._encrypt(key)
        except _Refused as exc:
            k = self._kmip
            unsupported = exc.reason in (
                k.enums.ResultReason.OPERATION_NOT_SUPPORTED,
                k.enums.ResultReason.FEATURE_NOT_SUPPORTED,
            )
            if unsupported and self._settings.key_release == "export":
                return self._seal_locally(key)
            if unsupported:
                raise errors.VaultProtocolError(
                    f"KMIP server {self.serving} cannot Encrypt with key {self._uid!r} in "
                    f"AES-GCM ({exc.reason_name}: {_detail(exc.message)}); use "
                    "--key-release export to wrap with the released key instead",
                    hint=_HINT_PROTOCOL,
                ) from None
            raise self._refusal(exc, check_state=True) from None

    def _crypto_params(self) -> Any:
        k = self._kmip
        return k.attributes.CryptographicParameters(
            block_cipher_mode=k.enums.BlockCipherMode.GCM,
            cryptographic_algorithm=k.enums.CryptographicAlgorithm.AES,
            tag_length=_TAG_LEN,
        )

    def _encrypt(self, key: bytearray) -> str:
        k = self._kmip
        nonce = crypto.random_bytes(_NONCE_LEN)
        payload = k.payloads.EncryptRequestPayload(
            unique_identifier=self._uid,
            cryptographic_parameters=self._crypto_params(),
            data=bytes(len(key)),  # placeholder: the key is patched into our copy of the encoding
            iv_counter_nonce=nonce,
            auth_additional_data=_AAD,
        )
        answer, _ = self._call(k.enums.Operation.ENCRYPT, "Encrypt", payload, secret_in=key)
        ct, tag, iv = answer.data, answer.auth_tag, answer.iv_counter_nonce
        if not (isinstance(ct, bytes) and len(ct) == len(key)):
            raise self._bad_answer("Encrypt", "no ciphertext of the key's length")
        if not (isinstance(tag, bytes) and len(tag) == _TAG_LEN):
            raise self._bad_answer("Encrypt", f"no {_TAG_LEN}-byte GCM tag (is it KMIP 1.4?)")
        if iv is not None and iv != nonce:
            raise self._bad_answer("Encrypt", "a nonce other than the one we chose")
        return _format_wrapped(nonce, ct + tag)

    def _decrypt(self, nonce: bytes, sealed: bytes) -> bytearray:
        k = self._kmip
        payload = k.payloads.DecryptRequestPayload(
            unique_identifier=self._uid,
            cryptographic_parameters=self._crypto_params(),
            data=sealed[:-_TAG_LEN],
            iv_counter_nonce=nonce,
            auth_additional_data=_AAD,
            auth_tag=sealed[-_TAG_LEN:],
        )
        try:
            _, key = self._call(
                k.enums.Operation.DECRYPT, "Decrypt", payload, secret_out=_RESPONSE_DATA
            )
        except _Refused as exc:
            if exc.reason in (
                k.enums.ResultReason.GENERAL_FAILURE,
                k.enums.ResultReason.CRYPTOGRAPHIC_FAILURE,
            ):
                raise errors.VaultProtocolError(
                    f"KMIP server {self.serving} could not Decrypt the wrapped key with key "
                    f"{self._uid!r} ({exc.reason_name}: {_detail(exc.message)}): it was "
                    "wrapped with another key or is damaged",
                    hint=_HINT_PROTOCOL,
                ) from None
            raise self._refusal(exc, check_state=True) from None
        assert key is not None
        if len(key) != _KEY_LEN:
            _zero(key)
            raise self._bad_answer("Decrypt", f"a plaintext that is not {_KEY_LEN} bytes")
        return key

    def _released_kek(self) -> bytearray:
        """Key release: refuse unless the key is Active, then Get its raw bytes (caller
        zeroes them)."""
        k = self._kmip
        try:
            state = self._attributes(("State",)).get("State")
        except _Refused as exc:
            raise self._refusal(exc, check_state=False) from None
        if state != k.enums.State.ACTIVE:
            raise self._disabled(state, "be released")
        payload = k.payloads.GetRequestPayload(unique_identifier=self._uid)
        try:
            answer, kek = self._call(
                k.enums.Operation.GET, "Get", payload, secret_out=_RESPONSE_KEY_MATERIAL
            )
        except _Refused as exc:
            raise self._refusal(exc, check_state=True) from None
        assert kek is not None
        try:
            block = getattr(answer.secret, "key_block", None)
            fmt = getattr(getattr(block, "key_format_type", None), "value", None)
            if answer.object_type != k.enums.ObjectType.SYMMETRIC_KEY:
                raise self._bad_answer("Get", f"a {_enum_name(answer.object_type)}, not a key")
            if fmt != k.enums.KeyFormatType.RAW or len(kek) not in (16, 24, 32):
                raise self._bad_answer("Get", "a key that is not a raw 128/192/256-bit AES key")
        except BaseException:
            _zero(kek)
            raise
        return kek

    def _open_locally(self, nonce: bytes, sealed: bytes) -> bytearray:
        kek = self._released_kek()
        try:
            key = crypto.kmip_gcm_open(kek, nonce, sealed, _AAD)
        except errors.IntegrityError:
            raise errors.VaultProtocolError(
                f"the wrapped key does not open under KMIP key {self._uid!r} from "
                f"{self.serving}: it was wrapped with another key or is damaged",
                hint=_HINT_PROTOCOL,
            ) from None
        finally:
            _zero(kek)
        if len(key) != _KEY_LEN:
            _zero(key)
            raise errors.VaultProtocolError(
                f"the wrapped key unwraps to {len(key)} bytes with KMIP key {self._uid!r}, "
                f"expected {_KEY_LEN}",
                hint=_HINT_PROTOCOL,
            )
        return key

    def _seal_locally(self, key: bytearray) -> str:
        kek = self._released_kek()
        try:
            nonce = crypto.random_bytes(_NONCE_LEN)
            return _format_wrapped(nonce, crypto.kmip_gcm_seal(kek, nonce, key, _AAD))
        finally:
            _zero(kek)

    def _attributes(self, names: tuple[str, ...]) -> dict[str, Any]:
        """GetAttributes: name -> value (enums as PyKMIP enum members). Raises ``_Refused``."""
        k = self._kmip
        payload = k.payloads.GetAttributesRequestPayload(
            unique_identifier=self._uid, attribute_names=list(names)
        )
        answer, _ = self._call(k.enums.Operation.GET_ATTRIBUTES, "GetAttributes", payload)
        found: dict[str, Any] = {}
        for attr in answer.attributes or []:
            name = getattr(getattr(attr, "attribute_name", None), "value", None)
            value = getattr(getattr(attr, "attribute_value", None), "value", None)
            if isinstance(name, str):
                found[name] = value
        return found

    def _state_or_none(self) -> Any:
        """The key's State, or None when even that cannot be read."""
        try:
            return self._attributes(("State",)).get("State")
        except (_Refused, errors.VaultError):
            return None

    # --- errors ------------------------------------------------------------------------------

    def _refusal(self, exc: _Refused, *, check_state: bool) -> errors.VaultError:
        """The ``VaultError`` a failure result stands for (see the module's table)."""
        k = self._kmip
        said = f"{exc.reason_name}: {_detail(exc.message)}"
        if exc.reason == k.enums.ResultReason.ITEM_NOT_FOUND:
            return errors.VaultKeyNotFound(
                f"KMIP server {self.serving} has no key {self._uid!r} ({exc.op}: {said}); "
                "check the key id in the vault URL",
                hint=_HINT_NOT_FOUND,
            )
        if exc.reason == k.enums.ResultReason.PERMISSION_DENIED:
            state = self._state_or_none() if check_state else None
            if state is not None and state != k.enums.State.ACTIVE:
                return self._disabled(state, f"be used for {exc.op}")
            return errors.VaultPermissionDenied(
                f"KMIP server {self.serving} denied {exc.op} on key {self._uid!r} to client "
                f"certificate CN={self._cert_info['client_cert_common_name']!r} ({said}); "
                "ask the KMS operator to grant it the key",
                hint=_HINT_DENIED,
            )
        return errors.VaultProtocolError(
            f"KMIP server {self.serving} failed {exc.op} on key {self._uid!r} ({said})",
            hint=_HINT_PROTOCOL,
        )

    def _disabled(self, state: Any, what: str) -> errors.VaultKeyDisabled:
        name = _enum_name(state) or "unknown"
        todo = (
            "activate it on the KMS"
            if name == "pre_active"
            else "it was revoked on the KMS and cannot be made Active again"
        )
        return errors.VaultKeyDisabled(
            f"KMIP key {self._uid!r} on {self.serving} is in state {name}, not active, and "
            f"may not {what}: {todo}",
            hint=_HINT_DISABLED,
        )

    def _bad_answer(self, op: str, what: str) -> errors.VaultProtocolError:
        return errors.VaultProtocolError(
            f"KMIP server {self.serving} answered {op} on key {self._uid!r} with {what}",
            hint=_HINT_PROTOCOL,
        )

    def _parse_wrapped(self, wrapped: str) -> tuple[bytes, bytes]:
        """(nonce, ciphertext || tag) of a ``kmip:v1:`` wrapped key."""
        if not wrapped.startswith(WRAPPED_PREFIX):
            kind = wrapped.split(":", 2)[:2] if wrapped.count(":") >= 2 else ["?"]
            raise errors.VaultProtocolError(
                f"the wrapped key is not a KMIP wrapped key (it starts {':'.join(kind)!r}, "
                f"expected {WRAPPED_PREFIX!r}); it cannot be unwrapped with {self._url}",
                hint=_HINT_PROTOCOL,
            )
        body = wrapped[len(WRAPPED_PREFIX) :]
        try:
            blob = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            canonical = base64.urlsafe_b64encode(blob).rstrip(b"=").decode("ascii") == body
        except (binascii.Error, ValueError):
            canonical = False
        if not canonical or len(blob) != _NONCE_LEN + _KEY_LEN + _TAG_LEN:
            raise errors.VaultProtocolError(
                f"the wrapped key is not valid {WRAPPED_PREFIX} data (base64url of a 12-byte "
                f"nonce, a 32-byte ciphertext and a 16-byte tag); key {self._url}",
                hint=_HINT_PROTOCOL,
            )
        return blob[:_NONCE_LEN], blob[_NONCE_LEN:]

    # --- messages ---------------------------------------------------------------------------

    def _call(
        self,
        operation: Any,
        op: str,
        payload: Any,
        *,
        secret_in: bytearray | None = None,
        secret_out: tuple[int, ...] | None = None,
    ) -> tuple[Any, bytearray | None]:
        """One KMIP request/answer. ``secret_in`` is patched over the request's Data
        placeholder; ``secret_out`` is the TTLV path of an answer field taken out (and
        zeroed) before PyKMIP decodes the answer. Returns (response payload, that field).
        Raises ``_Refused`` for a failure result, ``VaultError`` for everything else."""
        request = self._encode(operation, payload)
        try:
            if secret_in is not None:
                start, length = _find_field(request, _REQUEST_DATA, "request")
                if length != len(secret_in):
                    raise AssertionError("Data placeholder has the wrong length")
                request[start : start + length] = secret_in
            raw = self._exchange(request, op)
        finally:
            _zero(request)
        secret: bytearray | None = None
        try:
            try:
                if secret_out is not None and _find_all(raw, secret_out):
                    start, length = _find_field(raw, secret_out, "answer")
                    secret = bytearray(length)
                    with memoryview(raw) as view:
                        secret[:] = view[start : start + length]
                    raw[start : start + length] = bytes(length)
                item = self._decode(raw, op)
            except ValueError as exc:  # our TTLV walk: malformed structure
                raise self._bad_answer(op, f"a malformed message ({exc})") from None
            finally:
                _zero(raw)
            k = self._kmip
            status = getattr(item.result_status, "value", None)
            if status != k.enums.ResultStatus.SUCCESS:
                reason = getattr(item.result_reason, "value", None)
                message = getattr(item.result_message, "value", None) or ""
                raise _Refused(op, reason, str(message))
            got_op = getattr(item.operation, "value", None)
            if got_op is not None and got_op != operation:
                raise self._bad_answer(op, f"the answer to another operation ({got_op})")
            answer = item.response_payload
            if answer is None:
                raise self._bad_answer(op, "no payload")
            uid = getattr(answer, "unique_identifier", None)
            if uid is not None and uid != self._uid:
                raise self._bad_answer(op, f"the answer for another key ({uid!r})")
            if secret_out is not None and secret is None:
                raise self._bad_answer(op, "no key bytes")
            return answer, secret
        except BaseException:
            if secret is not None:
                _zero(secret)
            raise

    def _encode(self, operation: Any, payload: Any) -> bytearray:
        k = self._kmip
        header = k.messages.RequestHeader(
            protocol_version=k.contents.ProtocolVersion(1, 4),
            batch_count=k.contents.BatchCount(1),
        )
        item = k.messages.RequestBatchItem(
            operation=k.contents.Operation(operation), request_payload=payload
        )
        message = k.messages.RequestMessage(request_header=header, batch_items=[item])
        stream = k.utils.BytearrayStream()
        message.write(stream, kmip_version=k.enums.KMIPVersion.KMIP_1_4)
        return bytearray(stream.buffer)

    def _decode(self, raw: bytearray, op: str) -> Any:
        """The single batch item of an answer (key fields already zeroed in ``raw``)."""
        k = self._kmip
        try:
            message = k.messages.ResponseMessage()
            message.read(
                k.utils.BytearrayStream(bytes(raw)), kmip_version=k.enums.KMIPVersion.KMIP_1_4
            )
        except Exception as exc:
            raise self._bad_answer(
                op, f"a message PyKMIP cannot decode ({type(exc).__name__})"
            ) from None
        items = message.batch_items or []
        if len(items) != 1:
            raise self._bad_answer(op, f"{len(items)} batch items instead of 1")
        return items[0]

    # --- transport --------------------------------------------------------------------------

    def _exchange(self, request: bytearray, op: str) -> bytearray:
        """Send one request on the keep-alive connection and read the whole answer."""

        def step(sock: ssl.SSLSocket) -> tuple[bytearray, bool]:
            sock.sendall(request)
            return _read_message(sock), True

        def failed(exc: BaseException, endpoint: Endpoint) -> errors.VaultError | None:
            return self._transport_error(exc, op, endpoint.origin(self._url.scheme))

        # Several kmip:// addresses of one key (a KMIP cluster) fail over like transit's.
        return self._link.run(lambda endpoint: self._connect(op, endpoint), step, failed)

    def _connect(self, op: str, endpoint: Endpoint) -> ssl.SSLSocket:
        timeout = self._settings.timeout
        where = endpoint.origin(self._url.scheme)
        try:
            raw = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
        except TimeoutError:
            raise errors.VaultUnreachable(
                f"cannot reach KMIP server {where} for {op} on key {self._uid!r}: "
                f"no connection within {timeout:g} s"
            ) from None
        except OSError as exc:  # refused, unreachable network, DNS (socket.gaierror)
            raise errors.VaultUnreachable(
                f"cannot reach KMIP server {where} for {op} on key {self._uid!r}: "
                f"{exc.strerror or exc}; check that it runs and the address and port"
            ) from None
        try:
            return self._ssl.wrap_socket(raw, server_hostname=endpoint.host)
        except BaseException as exc:
            raw.close()
            if isinstance(exc, ssl.SSLError | ConnectionError | _ClosedBeforeAnswer):
                raise self._tls_error(exc, op, where) from None
            raise

    def _tls_error(self, exc: BaseException, op: str, where: str) -> errors.VaultTLSError:
        where = f"TLS handshake with KMIP server {where} ({op} on key {self._uid!r})"
        if isinstance(exc, ssl.SSLCertVerificationError):
            return errors.VaultTLSError(
                f"{where}: certificate verification failed: "
                f"{exc.verify_message or exc.reason}; check --ca-file and the server's "
                "certificate",
                hint=_HINT_TLS,
            )
        reason = getattr(exc, "reason", None) or type(exc).__name__
        todo = "check --ca-file, --client-cert and the server's TLS settings"
        if "ALERT" in str(reason).upper():
            todo = (
                "the server rejected the handshake, most likely our client certificate "
                "(not signed by a CA it trusts, expired, or not for clientAuth)"
            )
        elif isinstance(exc, ConnectionError):
            todo = "the server closed the connection; it may have rejected our client certificate"
        return errors.VaultTLSError(f"{where} failed: {reason}; {todo}", hint=_HINT_TLS)

    def _transport_error(self, exc: BaseException, op: str, where: str) -> errors.VaultError | None:
        """The ``VaultError`` for an exchange with the server at ``where`` that failed;
        None to re-raise ``exc`` as it is."""
        what = f"KMIP server {where} ({op} on key {self._uid!r})"
        if isinstance(exc, _ClosedBeforeAnswer):
            return errors.VaultUnreachable(
                f"{what} closed the connection without answering; a KMIP server does this "
                "when it rejects the client's identity or request: see its log"
            )
        if isinstance(exc, _ClosedMidAnswer):
            return errors.VaultUnreachable(f"{what} closed the connection in mid-answer")
        if isinstance(exc, _MessageTooLarge):
            return errors.VaultProtocolError(
                f"{what} sent an answer larger than {_MAX_MESSAGE} bytes", hint=_HINT_PROTOCOL
            )
        if isinstance(exc, _NotKmip):
            return errors.VaultProtocolError(
                f"{what} answered with something that is not a KMIP response message: is "
                "this port a KMIP server?",
                hint=_HINT_PROTOCOL,
            )
        if isinstance(exc, TimeoutError):
            return errors.VaultUnreachable(f"{what}: no answer within {self._settings.timeout:g} s")
        if isinstance(exc, ssl.SSLError):
            return self._tls_error(exc, op, where)
        if isinstance(exc, OSError):
            return errors.VaultUnreachable(f"{what}: {exc.strerror or exc}")
        return None


class _MessageTooLarge(Exception):
    pass


class _NotKmip(Exception):
    pass


def _read_message(sock: ssl.SSLSocket) -> bytearray:
    """Read one TTLV Response Message into a fresh bytearray with ``recv_into``."""
    header = bytearray(8)
    _recv_exactly(sock, memoryview(header), first=True)
    tag = int.from_bytes(header[0:3], "big")
    if tag != _TAG_RESPONSE_MESSAGE or header[3] != _TYPE_STRUCTURE:
        raise _NotKmip
    length = int.from_bytes(header[4:8], "big")
    if length > _MAX_MESSAGE:
        raise _MessageTooLarge
    buf = bytearray(8 + length)
    buf[:8] = header
    try:
        with memoryview(buf) as view:
            _recv_exactly(sock, view[8:], first=False)
    except BaseException:
        _zero(buf)
        raise
    return buf


def _recv_exactly(sock: ssl.SSLSocket, view: memoryview, *, first: bool) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise _ClosedBeforeAnswer if first and got == 0 else _ClosedMidAnswer
        got += n


def _walk(
    view: memoryview, start: int, end: int, path: tuple[int, ...]
) -> Iterator[tuple[tuple[int, ...], int, int, int]]:
    """Every TTLV item in ``view[start:end]``, depth first: (tag path, type, value offset,
    value length). Raises ``ValueError`` for a structure that does not add up."""
    pos = start
    while pos < end:
        if end - pos < 8:
            raise ValueError("truncated item header")
        tag = int.from_bytes(view[pos : pos + 3], "big")
        kind = view[pos + 3]
        length = int.from_bytes(view[pos + 4 : pos + 8], "big")
        value = pos + 8
        padded = length + (-length % 8)
        if value + (length if kind == _TYPE_STRUCTURE else padded) > end:
            raise ValueError("item longer than its container")
        here = (*path, tag)
        yield here, kind, value, length
        if kind == _TYPE_STRUCTURE:
            yield from _walk(view, value, value + length, here)
            pos = value + length
        else:
            pos = value + padded


def _find_all(buf: bytearray, path: tuple[int, ...]) -> list[tuple[int, int]]:
    with memoryview(buf) as view:
        return [
            (value, length)
            for here, kind, value, length in _walk(view, 0, len(buf), ())
            if here == path and kind == _TYPE_BYTE_STRING
        ]


def _find_field(buf: bytearray, path: tuple[int, ...], what: str) -> tuple[int, int]:
    """(offset, length) of the one byte-string item at ``path``; ``ValueError`` otherwise."""
    found = _find_all(buf, path)
    if len(found) != 1:
        raise ValueError(f"{len(found)} key fields in the {what}, expected 1")
    return found[0]


def _read_certificate(path: Any) -> dict[str, Any]:
    """Subject, issuer, SHA-256 fingerprint and expiry of the first certificate in ``path``.
    Raises ``VaultCredentialsError`` when the file cannot be read or holds none."""
    from cryptography import x509

    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise errors.VaultCredentialsError(
            f"cannot read client certificate {path}: {exc.strerror}; pass --client-cert FILE",
            hint=_HINT_CREDENTIALS,
        ) from None
    match = _PEM_CERT_RE.search(pem)
    try:
        if match is None:
            raise ValueError("no certificate")
        der = ssl.PEM_cert_to_DER_cert(match.group(0).decode("ascii"))
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise errors.VaultCredentialsError(
            f"client certificate file {path} holds no PEM certificate; pass --client-cert FILE",
            hint=_HINT_CREDENTIALS,
        ) from None
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    not_after = cert.not_valid_after_utc.astimezone(datetime.UTC)
    return {
        "client_cert_subject": cert.subject.rfc4514_string(),
        "client_cert_common_name": str(names[0].value) if names else None,
        "client_cert_issuer": cert.issuer.rfc4514_string(),
        "client_cert_fingerprint_sha256": hashlib.sha256(der).hexdigest(),
        "client_cert_not_after": not_after.isoformat(),
    }


def _format_wrapped(nonce: bytes, sealed: bytes) -> str:
    return WRAPPED_PREFIX + base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode("ascii")


def _enum_name(value: Any) -> str | None:
    name = getattr(value, "name", None)
    return name.lower() if isinstance(name, str) else None


def _detail(message: str) -> str:
    return " ".join(message.split())[:_MAX_DETAIL] or "no message"


def _zero(buf: bytearray) -> None:
    buf[:] = bytes(len(buf))
