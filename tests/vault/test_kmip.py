"""The KMIP client against a real PyKMIP server over mutual TLS: round trips on both paths
(server-side Encrypt/Decrypt and key release), and every error class provoked for real
(revoked, Pre-Active, destroyed and unknown keys, another identity, wrong CA, foreign client
certificate, missing credentials, stopped server, silent server). No mocks."""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import socket
import ssl
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from encfs import errors
from encfs.vault import VaultSettings, connect, parse_vault_url, wrapped_kek_version
from encfs.vault.kmip import KmipClient
from tests.harness import count_in_memory
from tests.kmip import HOST_CN, OTHER_CN, PyKMIPServer
from tests.openbao import free_port

REPO = Path(__file__).resolve().parents[2]
WRAPPED_RE = re.compile(r"kmip:v1:[A-Za-z0-9_-]{80}")


@pytest.fixture(scope="module")
def kmip() -> Iterator[PyKMIPServer]:
    with PyKMIPServer() as server:
        yield server


@pytest.fixture
def uid(kmip: PyKMIPServer) -> str:
    """A fresh Active AES-256 key owned by the host identity."""
    return kmip.create_key()


def client(kmip: PyKMIPServer, uid: str, **overrides: object) -> KmipClient:
    return KmipClient(parse_vault_url(kmip.url_for(uid)), settings=kmip.settings(**overrides))


def key_forms(key: bytes | bytearray) -> list[str]:
    """Ways a key could leak into a message: hex, base64, base64url, latin-1 text."""
    raw = bytes(key)
    return [
        raw.hex(),
        raw.hex().upper(),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        raw.decode("latin-1"),
        repr(raw)[2:-1],
    ]


def check_error(
    exc: BaseException,
    cls: type[errors.VaultError],
    *,
    revoked: bool,
    contains: tuple[str, ...] = (),
    secrets: tuple[bytes | bytearray, ...] = (),
) -> str:
    """The error is exactly ``cls``, one line, names what it should, holds no key bytes."""
    assert type(exc) is cls, f"{type(exc).__name__}: {exc}"
    msg = str(exc)
    assert "\n" not in msg and msg.strip() == msg and msg
    assert exc.revoked is revoked
    assert isinstance(exc, errors.VaultError) and exc.hint and "\n" not in exc.hint
    for part in contains:
        assert part in msg, msg
    for secret in secrets:
        for form in key_forms(secret):
            assert form not in msg and form not in repr(exc) and form not in exc.hint
    return msg


def released_kek(kmip: PyKMIPServer, uid: str) -> bytes:
    """The KEK as an operator would export it (PyKMIP's own client, Get)."""
    value: bytes = kmip._admin_call("get", uid).value
    return value


def open_wrapped(kek: bytes, wrapped: str) -> bytes:
    """Independent implementation of the documented kmip:v1 format."""
    assert WRAPPED_RE.fullmatch(wrapped), wrapped
    blob = base64.urlsafe_b64decode(wrapped[len("kmip:v1:") :] + "=")
    return AESGCM(kek).decrypt(blob[:12], blob[12:], b"encfs/kmip/v1")


# --- happy path ----------------------------------------------------------------------------------


def test_round_trip(kmip: PyKMIPServer, uid: str) -> None:
    with client(kmip, uid) as c:
        key, wrapped = c.new_volume_key()
        assert isinstance(key, bytearray) and len(key) == 32
        assert WRAPPED_RE.fullmatch(wrapped) and len(wrapped) < 1024
        assert wrapped_kek_version(wrapped) == 0
        first = c.unwrap(wrapped)
        second = c.unwrap(wrapped)
        assert isinstance(first, bytearray) and first == key and second == key
        assert first is not second
        # The documented format, checked with an independent implementation.
        assert open_wrapped(released_kek(kmip, uid), wrapped) == key
        key2, wrapped2 = c.new_volume_key()
        assert key2 != key and wrapped2 != wrapped


def test_rewrap(kmip: PyKMIPServer, uid: str) -> None:
    with client(kmip, uid) as c:
        key, wrapped = c.new_volume_key()
        again = c.rewrap(wrapped)
        assert WRAPPED_RE.fullmatch(again) and again != wrapped  # fresh nonce
        assert c.unwrap(again) == key
        assert c.unwrap(wrapped) == key  # the old form still opens: same key, no versions


def test_connect_returns_kmip_client(kmip: PyKMIPServer, uid: str) -> None:
    settings = VaultSettings(
        ca_file=kmip.ca_file, client_cert=kmip.client_cert, client_key=kmip.client_key
    )
    c = connect(kmip.url_for(uid), settings)
    try:
        assert isinstance(c, KmipClient)
        assert str(c.url) == kmip.url_for(uid)
        key, wrapped = c.new_volume_key()
        assert c.unwrap(wrapped) == key
        assert repr(c) == f"<KmipClient {kmip.url_for(uid)} key_release=unwrap>"
        for form in key_forms(key):
            assert form not in repr(c)
    finally:
        c.close()
        c.close()  # idempotent
    assert c.unwrap(wrapped) == key  # a call after close opens a new connection
    c.close()


def test_key_release_interoperates(kmip: PyKMIPServer, uid: str) -> None:
    """Server Encrypt -> local open, and local seal -> server Decrypt: one format."""
    with client(kmip, uid) as server_side, client(kmip, uid, key_release="export") as local:
        key, wrapped = server_side.new_volume_key()
        assert local.unwrap(wrapped) == key
        sealed = local._seal_locally(key)
        assert WRAPPED_RE.fullmatch(sealed)
        assert server_side.unwrap(sealed) == key
        key2, wrapped2 = local.new_volume_key()  # export mode still wraps on the server
        assert server_side.unwrap(wrapped2) == key2 == local.unwrap(wrapped2)
        assert local.unwrap(local.rewrap(wrapped)) == key


def test_key_status_and_identity(kmip: PyKMIPServer, uid: str) -> None:
    with client(kmip, uid) as c:
        status = c.key_status()
        assert status == {
            "state": "active",
            "unique_identifier": uid,
            "object_type": "symmetric_key",
            "algorithm": "AES",
            "length": 256,
            "usage": ["encrypt", "decrypt"],
            "server": f"kmip://127.0.0.1:{kmip.port}",
        }
        ident = c.identity()
        for purpose in ("init", "mount", "rotate"):
            c.check_capabilities(purpose)
        with pytest.raises(ValueError):
            c.check_capabilities("fly")
        assert c.renew_identity() is None  # a client certificate is not renewed by us
    cert = x509.load_pem_x509_certificate(kmip.client_cert.read_bytes())
    der = ssl.PEM_cert_to_DER_cert(kmip.client_cert.read_text())
    assert ident["client_cert_subject"] == f"CN={HOST_CN}"
    assert ident["client_cert_common_name"] == HOST_CN
    assert ident["client_cert_issuer"] == cert.issuer.rfc4514_string()
    assert ident["client_cert_fingerprint_sha256"] == hashlib.sha256(der).hexdigest()
    assert ident["server"] == f"kmip://127.0.0.1:{kmip.port}"


def test_key_in_combined_pem_file(kmip: PyKMIPServer, uid: str) -> None:
    """``--client-key`` may be left out when the key is in the certificate file."""
    with client(kmip, uid, client_cert=kmip.client_combined, client_key=None) as c:
        assert c.key_status()["state"] == "active"
        assert c.identity()["client_cert_common_name"] == HOST_CN


def test_threads_share_one_client(kmip: PyKMIPServer, uid: str) -> None:
    with client(kmip, uid) as c:
        key, wrapped = c.new_volume_key()
        failures: list[BaseException] = []

        def worker() -> None:
            try:
                for _ in range(5):
                    got = c.unwrap(wrapped)
                    assert got == key
            except BaseException as exc:  # pragma: no cover - reported below
                failures.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not failures


def test_server_restart_reopens_connection() -> None:
    """A kept connection the server dropped (here: a restart; keys survive in its
    database) is reopened once, transparently."""
    with PyKMIPServer() as own:
        kid = own.create_key()
        with client(own, kid) as c:
            key, wrapped = c.new_volume_key()
            own.restart()
            assert c.unwrap(wrapped) == key


def test_unwrap_latency(kmip: PyKMIPServer, uid: str) -> None:
    with client(kmip, uid) as c:
        _, wrapped = c.new_volume_key()
        c.unwrap(wrapped)  # connection open
        samples = []
        for _ in range(20):
            t0 = time.perf_counter()
            c.unwrap(wrapped)
            samples.append(time.perf_counter() - t0)
    with client(kmip, uid, key_release="export") as e:
        e.unwrap(wrapped)
        export_samples = []
        for _ in range(20):
            t0 = time.perf_counter()
            e.unwrap(wrapped)
            export_samples.append(time.perf_counter() - t0)
    print(
        f"\nKMIP unwrap median over 20 calls (PyKMIP 0.11 server, TLS 1.2, loopback): "
        f"Decrypt {statistics.median(samples) * 1000:.2f} ms, "
        f"key release (GetAttributes + Get + local open) "
        f"{statistics.median(export_samples) * 1000:.2f} ms"
    )


# --- the key is withdrawn -----------------------------------------------------------------------


@pytest.mark.parametrize("compromised", [False, True], ids=["deactivated", "compromised"])
def test_revoked_key(kmip: PyKMIPServer, uid: str, compromised: bool) -> None:
    state = "compromised" if compromised else "deactivated"
    with client(kmip, uid) as c, client(kmip, uid, key_release="export") as e:
        key, wrapped = c.new_volume_key()
        kmip.revoke(uid, compromised=compromised)
        assert kmip.state(uid) == state.upper()
        # PyKMIP's server would still hand out the bytes: we refuse before asking.
        assert released_kek(kmip, uid)
        for call in (
            lambda: c.unwrap(wrapped),
            lambda: e.unwrap(wrapped),
            c.key_status,
            e.key_status,
            lambda: c.check_capabilities("mount"),
            c.new_volume_key,
            lambda: c.rewrap(wrapped),
        ):
            with pytest.raises(errors.VaultKeyDisabled) as ei:
                call()
            check_error(
                ei.value,
                errors.VaultKeyDisabled,
                revoked=True,
                contains=(f"kmip://127.0.0.1:{kmip.port}", repr(uid), state),
                secrets=(key,),
            )


def test_pre_active_key(kmip: PyKMIPServer) -> None:
    kid = kmip.create_key(activate=False)
    with client(kmip, kid) as c:
        for call in (c.key_status, c.new_volume_key):
            with pytest.raises(errors.VaultKeyDisabled) as ei:
                call()
            check_error(
                ei.value, errors.VaultKeyDisabled, revoked=True, contains=("pre_active", "activate")
            )


def test_unknown_and_destroyed_key(kmip: PyKMIPServer, uid: str) -> None:
    with client(kmip, uid) as c:
        key, wrapped = c.new_volume_key()
    kmip.revoke(uid)
    kmip.destroy(uid)
    for kid in (uid, "no-such-key"):
        for mode in ("unwrap", "export"):
            with client(kmip, kid, key_release=mode) as c:
                for call in (lambda c=c: c.unwrap(wrapped), c.key_status, c.new_volume_key):
                    with pytest.raises(errors.VaultKeyNotFound) as ei:
                        call()
                    check_error(
                        ei.value,
                        errors.VaultKeyNotFound,
                        revoked=True,
                        contains=(f"kmip://127.0.0.1:{kmip.port}", repr(kid)),
                        secrets=(key,),
                    )


def test_other_identity_is_denied(kmip: PyKMIPServer, uid: str) -> None:
    """Same CA, another CN: PyKMIP's default policy gives keys to their owner only."""
    with client(kmip, uid) as c:
        key, wrapped = c.new_volume_key()
    for mode in ("unwrap", "export"):
        with client(
            kmip, uid, client_cert=kmip.other_cert, client_key=kmip.other_key, key_release=mode
        ) as other:
            for call in (
                lambda o=other: o.unwrap(wrapped),
                other.key_status,
                lambda o=other: o.check_capabilities("mount"),
            ):
                with pytest.raises(errors.VaultPermissionDenied) as ei:
                    call()
                check_error(
                    ei.value,
                    errors.VaultPermissionDenied,
                    revoked=True,
                    contains=(repr(uid), OTHER_CN),
                    secrets=(key,),
                )


# --- transport and credentials ------------------------------------------------------------------


def test_wrong_ca(kmip: PyKMIPServer, uid: str) -> None:
    with (
        client(kmip, uid, ca_file=kmip.wrong_ca_file) as c,
        pytest.raises(errors.VaultTLSError) as ei,
    ):
        c.key_status()
    check_error(
        ei.value, errors.VaultTLSError, revoked=False, contains=("certificate verification",)
    )


def test_client_cert_from_another_ca(kmip: PyKMIPServer, uid: str) -> None:
    with (
        client(
            kmip, uid, client_cert=kmip.wrong_client_cert, client_key=kmip.wrong_client_key
        ) as c,
        pytest.raises(errors.VaultTLSError) as ei,
    ):
        c.key_status()
    check_error(ei.value, errors.VaultTLSError, revoked=False, contains=("client certificate",))


def test_missing_credentials(kmip: PyKMIPServer, uid: str, tmp_path: Path) -> None:
    url = parse_vault_url(kmip.url_for(uid))
    with pytest.raises(errors.VaultCredentialsError) as ei:
        KmipClient(url, settings=VaultSettings(ca_file=kmip.ca_file))
    check_error(
        ei.value,
        errors.VaultCredentialsError,
        revoked=False,
        contains=("--client-cert", "--client-key"),
    )
    assert "--client-cert" in ei.value.hint
    with pytest.raises(errors.VaultCredentialsError) as ei:  # key neither given nor inside
        KmipClient(url, settings=kmip.settings(client_key=None))
    check_error(ei.value, errors.VaultCredentialsError, revoked=False, contains=("--client-key",))
    with pytest.raises(errors.VaultCredentialsError) as ei:
        KmipClient(url, settings=kmip.settings(client_cert=tmp_path / "nope.pem"))
    check_error(ei.value, errors.VaultCredentialsError, revoked=False, contains=("nope.pem",))
    with pytest.raises(errors.VaultCredentialsError):  # key of another certificate
        KmipClient(url, settings=kmip.settings(client_key=kmip.other_key))
    with pytest.raises(errors.VaultTLSError) as tei:
        KmipClient(url, settings=kmip.settings(ca_file=tmp_path / "no-ca.pem"))
    check_error(tei.value, errors.VaultTLSError, revoked=False, contains=("no-ca.pem",))
    with pytest.raises(errors.VaultConfigError):
        KmipClient(url, settings=kmip.settings(key_release="maybe"))


def test_stopped_server_and_closed_port(kmip: PyKMIPServer) -> None:
    timeout = 2.0
    with PyKMIPServer() as own:
        kid = own.create_key()
        c = client(own, kid, timeout=timeout)
        key, wrapped = c.new_volume_key()
        port = own.port
        own.stop()
        t0 = time.monotonic()
        with pytest.raises(errors.VaultUnreachable) as ei:
            c.unwrap(wrapped)
        assert time.monotonic() - t0 < timeout + 2
        check_error(
            ei.value,
            errors.VaultUnreachable,
            revoked=False,
            contains=(f"kmip://127.0.0.1:{port}", repr(kid)),
            secrets=(key,),
        )
        c.close()
    url = parse_vault_url(f"kmip://127.0.0.1:{free_port()}/1")
    c = KmipClient(url, settings=kmip.settings(timeout=timeout))
    t0 = time.monotonic()
    with pytest.raises(errors.VaultUnreachable) as ei:
        c.unwrap(wrapped)
    assert time.monotonic() - t0 < timeout + 2
    check_error(ei.value, errors.VaultUnreachable, revoked=False, contains=("refused",))


def test_silent_server_times_out(kmip: PyKMIPServer, uid: str) -> None:
    """A port that accepts TCP but never speaks: VaultUnreachable after ``timeout``."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = parse_vault_url(f"kmip://127.0.0.1:{listener.getsockname()[1]}/{uid}")
        c = KmipClient(url, settings=kmip.settings(timeout=0.5))
        t0 = time.monotonic()
        with pytest.raises(errors.VaultUnreachable) as ei:
            c.key_status()
        elapsed = time.monotonic() - t0
    assert 0.4 < elapsed < 0.5 + 2
    check_error(ei.value, errors.VaultUnreachable, revoked=False, contains=("0.5 s",))


# --- wrapped keys ---------------------------------------------------------------------------------


def test_damaged_or_foreign_wrapped_key(kmip: PyKMIPServer, uid: str) -> None:
    other = kmip.create_key()
    with client(kmip, uid) as c, client(kmip, other) as o:
        key, wrapped = c.new_volume_key()
        _, wrapped_other = o.new_volume_key()
    flipped = wrapped[:-3] + ("A" if wrapped[-3] != "A" else "B") + wrapped[-2:]
    cases = [
        flipped,  # tag no longer verifies
        wrapped_other,  # another KMIP key
        "vault:v1:" + wrapped[len("kmip:v1:") :],  # transit ciphertext
        wrapped[:-4],  # truncated
        wrapped + "AAAA",  # too long
        wrapped[:-1] + "=",  # not base64url
    ]
    for mode in ("unwrap", "export"):
        with client(kmip, uid, key_release=mode) as c:
            for bad in cases:
                with pytest.raises(errors.VaultProtocolError) as ei:
                    c.unwrap(bad)
                check_error(ei.value, errors.VaultProtocolError, revoked=False, secrets=(key,))
            assert c.unwrap(wrapped) == key  # the connection is still good


# --- secrets stay out of logs and memory ----------------------------------------------------------


def test_no_key_bytes_in_logs(
    kmip: PyKMIPServer, uid: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # root at DEBUG: PyKMIP's loggers must stay at WARNING
    for mode in ("unwrap", "export"):
        with client(kmip, uid, key_release=mode) as c:
            key, wrapped = c.new_volume_key()
            assert c.unwrap(wrapped) == key
            text = "\n".join(r.getMessage() for r in caplog.records)
            for secret in (key, released_kek(kmip, uid)):
                for form in key_forms(secret):
                    assert form not in text
    assert logging.getLogger("kmip").getEffectiveLevel() >= logging.WARNING


_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from encfs.vault import VaultSettings, connect
    ca, cert, key_file, mode = sys.argv[2:6]
    c = connect(sys.argv[1], VaultSettings(ca_file=Path(ca), client_cert=Path(cert),
                                           client_key=Path(key_file), key_release=mode))
    key, wrapped = c.new_volume_key()
    key[:] = bytes(len(key))
    del key
    again = c.unwrap(wrapped)
    print(wrapped, flush=True)
    sys.stdin.readline()
    again[:] = bytes(len(again))
    del again
    print("wiped", flush=True)
    sys.stdin.readline()
""")


@pytest.mark.parametrize("mode", ["unwrap", "export"])
def test_no_key_bytes_left_in_memory(kmip: PyKMIPServer, uid: str, mode: str) -> None:
    """After the caller wipes its bytearray, no copy of the volume key (nor, on key release,
    of the KEK) remains anywhere in the process."""
    kek = released_kek(kmip, uid)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CHILD,
            kmip.url_for(uid),
            str(kmip.ca_file),
            str(kmip.client_cert),
            str(kmip.client_key),
            mode,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        wrapped = proc.stdout.readline().strip()
        key = open_wrapped(kek, wrapped)
        assert count_in_memory(proc.pid, key) == 1  # the caller's bytearray, and only it
        assert count_in_memory(proc.pid, kek) == 0
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "wiped"
        assert count_in_memory(proc.pid, key) == 0
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_list_of_kmip_addresses_fails_over_like_transit(kmip: PyKMIPServer, uid: str) -> None:
    """kmip:// URLs of one key at several addresses (a KMIP cluster) share the transit
    client's failover: a server that is down is passed over, and a refusal is not."""
    dead = free_port()
    urls = f"kmip://127.0.0.1:{dead}/{uid} {kmip.url_for(uid)}"
    vault = connect(urls, kmip.settings())
    try:
        key, wrapped = vault.new_volume_key()
        assert vault.unwrap(wrapped) == key
        assert vault.serving == f"kmip://127.0.0.1:{kmip.port}"
        kmip.revoke(uid)
        with pytest.raises(errors.VaultKeyDisabled):
            vault.unwrap(wrapped)
    finally:
        vault.close()
