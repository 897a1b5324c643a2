"""The transit client against a real OpenBao: round trips, rotation, and every error class
provoked for real (revoked token, narrowed policy, deleted / soft-deleted / retired key,
sealed vault, stopped server, timeouts, wrong CA). No mocks."""

from __future__ import annotations

import base64
import contextlib
import datetime
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from encfs import errors
from encfs.keys import LockedSecret
from encfs.vault import (
    VaultSettings,
    VaultURL,
    connect,
    parse_vault_url,
    read_token,
    wrapped_kek_version,
)
from encfs.vault.transit import TransitClient
from tests.conftest import TransitKey
from tests.harness import count_in_memory, encfs, scan_memory
from tests.openbao import OpenBao, free_port

REPO = Path(__file__).resolve().parents[2]


def client(
    url: str, token: str, *, ca_file: Path | None = None, timeout: float = 5.0
) -> TransitClient:
    settings = VaultSettings(ca_file=ca_file, timeout=timeout)
    return TransitClient(parse_vault_url(url), token=token, settings=settings)


def check_error(
    exc: BaseException,
    cls: type[errors.VaultError],
    *,
    token: str,
    revoked: bool,
    contains: tuple[str, ...] = (),
) -> str:
    """The error is exactly ``cls``, one line, names what it should, never holds the token."""
    assert type(exc) is cls, f"{type(exc).__name__}: {exc}"
    msg = str(exc)
    assert token not in msg and token not in repr(exc)
    assert all(token not in str(a) for a in exc.args)
    assert "\n" not in msg and msg.strip() == msg and msg
    assert exc.revoked is revoked
    assert isinstance(exc, errors.VaultError) and exc.hint
    for part in contains:
        assert part in msg, msg
    return msg


def host_client(bao: OpenBao, key: str, **kw: Any) -> tuple[TransitClient, str]:
    token = bao.make_token([bao.write_host_policy(key)])
    return client(bao.url_for(key), token, **kw), token


# --- happy path ----------------------------------------------------------------------------------


def test_datakey_unwrap_round_trip(transit_key: TransitKey) -> None:
    with client(transit_key.url, transit_key.token) as c:
        key, wrapped = c.new_volume_key()
        assert isinstance(key, bytearray) and len(key) == 32
        assert re.fullmatch(r"vault:v1:[A-Za-z0-9+/]+=*", wrapped)
        assert wrapped_kek_version(wrapped) == 1
        again = c.unwrap(wrapped)
        assert isinstance(again, bytearray) and again == key and again is not key
        # An independent client (hvac, the operator's tool) agrees on the plaintext.
        answer = transit_key.bao.admin.secrets.transit.decrypt_data(
            name=transit_key.name, ciphertext=wrapped
        )
        assert base64.b64decode(answer["data"]["plaintext"]) == key
        second, wrapped2 = c.new_volume_key()
        assert second != key and wrapped2 != wrapped


def test_unwrap_of_hvac_wrapped_key(transit_key: TransitKey) -> None:
    raw = os.urandom(32)
    wrapped = transit_key.bao.admin.secrets.transit.encrypt_data(
        name=transit_key.name, plaintext=base64.b64encode(raw).decode()
    )["data"]["ciphertext"]
    with client(transit_key.url, transit_key.token) as c:
        assert c.unwrap(wrapped) == raw


def test_unwrap_refuses_wrong_length(transit_key: TransitKey) -> None:
    wrapped = transit_key.bao.admin.secrets.transit.encrypt_data(
        name=transit_key.name, plaintext=base64.b64encode(b"sixteen byte key").decode()
    )["data"]["ciphertext"]
    with (
        client(transit_key.url, transit_key.token) as c,
        pytest.raises(errors.VaultProtocolError) as ei,
    ):
        c.unwrap(wrapped)
    check_error(
        ei.value,
        errors.VaultProtocolError,
        token=transit_key.token,
        revoked=False,
        contains=("16-byte key",),
    )


def test_wrapped_kek_version() -> None:
    assert wrapped_kek_version("vault:v1:abcd") == 1
    assert wrapped_kek_version("vault:v12:abcd") == 12
    assert wrapped_kek_version("vault:vx:abcd") == 0
    assert wrapped_kek_version("garbage") == 0
    assert wrapped_kek_version("") == 0


def test_rotate_then_rewrap(transit_key: TransitKey) -> None:
    bao = transit_key.bao
    with client(transit_key.url, transit_key.token) as c:
        key, wrapped = c.new_volume_key()
        assert c.key_status()["latest_version"] == 1
        assert bao.rotate_key(transit_key.name) == 2
        status = c.key_status()
        assert status["latest_version"] == 2 and status["min_decryption_version"] == 1
        assert status["soft_deleted"] is False
        rewrapped = c.rewrap(wrapped)
        assert wrapped_kek_version(wrapped) == 1 and wrapped_kek_version(rewrapped) == 2
        assert c.unwrap(rewrapped) == key
        assert c.unwrap(wrapped) == key  # v1 still allowed until retired
        bao.rotate_key(transit_key.name)
        assert wrapped_kek_version(c.rewrap(rewrapped)) == 3
        assert wrapped_kek_version(c.new_volume_key()[1]) == 3


def test_least_privilege_host_token(
    openbao: OpenBao, transit_key: TransitKey, host_token: Path
) -> None:
    assert host_token.stat().st_mode & 0o777 == 0o600
    token = host_token.read_text().strip()
    c = connect(transit_key.url, VaultSettings(token_file=host_token))
    assert isinstance(c, TransitClient)
    try:
        key, wrapped = c.new_volume_key()
        assert c.unwrap(wrapped) == key
        openbao.rotate_key(transit_key.name)
        assert c.unwrap(c.rewrap(wrapped)) == key
        assert c.key_status()["latest_version"] == 2
        me = c.token_lookup_self()
        assert me["policies"] == [f"host-{transit_key.name}"]
        assert me["renewable"] is True and me["ttl"] > 0 and me["accessor"]
        assert "id" not in me and token not in repr(me)
        renewed = c.renew_self("2h")
        assert renewed["lease_duration"] > 3000 and "client_token" not in renewed
        assert token not in repr(renewed)
        assert token not in repr(c) and transit_key.name in repr(c)
    finally:
        c.close()
        c.close()  # idempotent
    # Nothing else: not another key, not rotation, not an encrypt of its own choosing.
    other = "other-" + transit_key.name
    openbao.create_key(other)
    for attempt in (
        lambda: client(openbao.url_for(other), token).new_volume_key(),
        lambda: client(openbao.url_for(other), token).key_status(),
        lambda: openbao_post(openbao, token, f"transit/keys/{transit_key.name}/rotate"),
        lambda: openbao_post(openbao, token, f"transit/encrypt/{transit_key.name}"),
    ):
        with pytest.raises(errors.VaultPermissionDenied) as ei:
            attempt()
        check_error(ei.value, errors.VaultPermissionDenied, token=token, revoked=True)


def openbao_post(bao: OpenBao, token: str, path: str) -> None:
    """POST through TransitClient's transport to an arbitrary path (for permission checks)."""
    c = client(bao.url_for("x"), token)
    try:
        c._call("POST", f"/v1/{path}", {"plaintext": "AAAA"})
    finally:
        c.close()


def test_connection_is_reused_and_thread_safe(openbao: OpenBao, transit_key: TransitKey) -> None:
    with (
        TCPProxy(openbao.port) as proxy,
        client(
            f"transit+http://127.0.0.1:{proxy.port}/transit/{transit_key.name}", transit_key.token
        ) as c,
    ):
        key, wrapped = c.new_volume_key()
        results: list[bool] = []

        def work() -> None:
            for _ in range(10):
                results.append(c.unwrap(wrapped) == key)

        threads = [threading.Thread(target=work) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [True] * 60
        assert proxy.accepted == 1  # one keep-alive connection for 61 calls


def test_reconnects_once_after_dropped_keepalive(openbao: OpenBao, transit_key: TransitKey) -> None:
    with (
        TCPProxy(openbao.port) as proxy,
        client(
            f"transit+http://127.0.0.1:{proxy.port}/transit/{transit_key.name}", transit_key.token
        ) as c,
    ):
        key, wrapped = c.new_volume_key()
        proxy.drop_all()  # what an idle timeout in the vault or a load balancer does
        assert c.unwrap(wrapped) == key
        assert proxy.accepted == 2
        proxy.drop_all()
        proxy.refuse = True  # dropped, and the way back is gone too: no endless retry
        t0 = time.monotonic()
        with pytest.raises(errors.VaultUnreachable) as ei:
            c.unwrap(wrapped)
        assert time.monotonic() - t0 < 2
        check_error(ei.value, errors.VaultUnreachable, token=transit_key.token, revoked=False)


# --- revocation signals --------------------------------------------------------------------------


def test_revoked_token(openbao: OpenBao, transit_key: TransitKey) -> None:
    c, token = host_client(openbao, transit_key.name)
    with c:
        key, wrapped = c.new_volume_key()
        openbao.revoke_token(token)
        for call in (
            lambda: c.unwrap(wrapped),
            c.key_status,
            c.renew_self,
            c.token_lookup_self,
            c.new_volume_key,
            lambda: c.rewrap(wrapped),
        ):
            with pytest.raises(errors.VaultPermissionDenied) as ei:
                call()
            check_error(
                ei.value,
                errors.VaultPermissionDenied,
                token=token,
                revoked=True,
                contains=("HTTP 403 permission denied", "127.0.0.1"),
            )
        key[:] = bytes(32)


def test_expired_token(openbao: OpenBao, transit_key: TransitKey) -> None:
    token = openbao.make_token([openbao.write_host_policy(transit_key.name)], ttl="1s")
    with client(transit_key.url, token) as c:
        _key, wrapped = c.new_volume_key()
        deadline = time.monotonic() + 5
        while True:
            try:
                c.unwrap(wrapped)
            except errors.VaultPermissionDenied as exc:
                check_error(exc, errors.VaultPermissionDenied, token=token, revoked=True)
                break
            assert time.monotonic() < deadline, "token did not expire"
            time.sleep(0.1)


def test_policy_without_decrypt(openbao: OpenBao, transit_key: TransitKey) -> None:
    name = f"nodecrypt-{transit_key.name}"
    openbao.write_policy(
        name,
        f"""
path "transit/keys/{transit_key.name}" {{ capabilities = ["read"] }}
path "transit/datakey/plaintext/{transit_key.name}" {{ capabilities = ["update"] }}
""",
    )
    token = openbao.make_token([name])
    with client(transit_key.url, token) as c:
        _key, wrapped = c.new_volume_key()
        assert c.key_status()["name"] == transit_key.name
        with pytest.raises(errors.VaultPermissionDenied) as ei:
            c.unwrap(wrapped)
    # OpenBao says "1 error occurred:\n\t* permission denied\n\n": flattened to one line.
    msg = check_error(
        ei.value,
        errors.VaultPermissionDenied,
        token=token,
        revoked=True,
        contains=(f"/v1/transit/decrypt/{transit_key.name}", "permission denied"),
    )
    assert "\t" not in msg


def test_policy_narrowed_while_in_use(openbao: OpenBao, transit_key: TransitKey) -> None:
    c, token = host_client(openbao, transit_key.name)
    with c:
        key, wrapped = c.new_volume_key()
        # The operator narrows the host's policy to status only.
        status_only = f'path "transit/keys/{transit_key.name}" {{ capabilities = ["read"] }}'
        openbao.write_policy(f"host-{transit_key.name}", status_only)
        assert c.key_status()["name"] == transit_key.name
        with pytest.raises(errors.VaultPermissionDenied) as ei:
            c.unwrap(wrapped)
        check_error(ei.value, errors.VaultPermissionDenied, token=token, revoked=True)
        openbao.write_host_policy(transit_key.name)  # and gives it back
        assert c.unwrap(wrapped) == key


def test_deleted_key(openbao: OpenBao, transit_key: TransitKey) -> None:
    with client(transit_key.url, transit_key.token) as c:
        _key, wrapped = c.new_volume_key()
        openbao.delete_key(transit_key.name)
        for call in (lambda: c.unwrap(wrapped), lambda: c.rewrap(wrapped), c.new_volume_key):
            with pytest.raises(errors.VaultKeyNotFound) as ei:
                call()
            check_error(
                ei.value,
                errors.VaultKeyNotFound,
                token=transit_key.token,
                revoked=True,
                contains=("encryption key not found", transit_key.name),
            )
        with pytest.raises(errors.VaultKeyNotFound) as ei:
            c.key_status()  # HTTP 404 with {"errors": []}
        check_error(
            ei.value,
            errors.VaultKeyNotFound,
            token=transit_key.token,
            revoked=True,
            contains=("HTTP 404", f"no key {transit_key.name!r}"),
        )


def test_unknown_mount(openbao: OpenBao, transit_key: TransitKey) -> None:
    with client(openbao.url_for(transit_key.name, mount="nomount"), transit_key.token) as c:
        for call in (c.key_status, lambda: c.unwrap("vault:v1:AAAA")):
            with pytest.raises(errors.VaultKeyNotFound) as ei:
                call()
            check_error(
                ei.value,
                errors.VaultKeyNotFound,
                token=transit_key.token,
                revoked=True,
                contains=("no secrets engine mounted at 'nomount'",),
            )


def test_soft_deleted_key(openbao: OpenBao, transit_key: TransitKey) -> None:
    with client(transit_key.url, transit_key.token) as c:
        key, wrapped = c.new_volume_key()
        openbao.soft_delete_key(transit_key.name)
        for call in (lambda: c.unwrap(wrapped), lambda: c.rewrap(wrapped), c.new_volume_key):
            with pytest.raises(errors.VaultKeyDisabled) as ei:
                call()
            check_error(
                ei.value,
                errors.VaultKeyDisabled,
                token=transit_key.token,
                revoked=True,
                contains=("refusing to use soft-deleted key",),
            )
        with pytest.raises(errors.VaultKeyDisabled) as ei:  # the vault still shows the
            c.key_status()  # metadata with soft_deleted: true; for us it is unusable
        check_error(
            ei.value,
            errors.VaultKeyDisabled,
            token=transit_key.token,
            revoked=True,
            contains=("is soft-deleted",),
        )
        openbao.restore_key(transit_key.name)
        assert c.key_status()["soft_deleted"] is False
        assert c.unwrap(wrapped) == key


def test_retired_key_version(openbao: OpenBao, transit_key: TransitKey) -> None:
    with client(transit_key.url, transit_key.token) as c:
        key, wrapped = c.new_volume_key()
        openbao.rotate_key(transit_key.name)
        openbao.set_min_decryption_version(transit_key.name, 2)
        assert c.key_status()["min_decryption_version"] == 2
        for call in (lambda: c.unwrap(wrapped), lambda: c.rewrap(wrapped)):
            with pytest.raises(errors.VaultKeyVersionRetired) as ei:
                call()
            check_error(
                ei.value,
                errors.VaultKeyVersionRetired,
                token=transit_key.token,
                revoked=True,
                contains=("(too old)",),
            )
        openbao.set_min_decryption_version(transit_key.name, 1)
        rewrapped = c.rewrap(wrapped)
        openbao.set_min_decryption_version(transit_key.name, 2)
        assert c.unwrap(rewrapped) == key


@pytest.mark.parametrize(
    ("ciphertext", "vault_says"),
    [
        ("garbage", "invalid ciphertext: no prefix"),
        ("vault:v1:AAAA", "invalid ciphertext length"),
        ("vault:v9:" + "A" * 60, "version is too new"),
        (None, "message authentication failed"),
    ],
)
def test_bad_ciphertext(
    openbao: OpenBao, transit_key: TransitKey, ciphertext: str | None, vault_says: str
) -> None:
    if ciphertext is None:  # a ciphertext of some other key
        other = "other-" + transit_key.name
        openbao.create_key(other)
        with client(openbao.url_for(other), transit_key.token) as c:
            ciphertext = c.new_volume_key()[1]
    with (
        client(transit_key.url, transit_key.token) as c,
        pytest.raises(errors.VaultCiphertextRejected) as ei,
    ):
        c.unwrap(ciphertext)
    check_error(
        ei.value,
        errors.VaultCiphertextRejected,  # a protocol error the header check can name
        token=transit_key.token,
        revoked=False,
        contains=(vault_says, "HTTP 400"),
    )


def test_token_renewal(openbao: OpenBao, transit_key: TransitKey) -> None:
    policy = openbao.write_host_policy(transit_key.name)
    token = openbao.make_token([policy], ttl="10m")
    with client(transit_key.url, token) as c:
        assert 0 < c.token_lookup_self()["ttl"] <= 600
        auth = c.renew_self("1h")
        assert auth["lease_duration"] == 3600 and auth["renewable"] is True
        assert 3500 < c.token_lookup_self()["ttl"] <= 3600
        assert c.renew_self()["lease_duration"] > 0
    fixed = openbao.make_token([policy], renewable=False)
    with client(transit_key.url, fixed) as c:
        assert c.token_lookup_self()["renewable"] is False
        with pytest.raises(errors.VaultProtocolError) as ei:
            c.renew_self()
        check_error(
            ei.value,
            errors.VaultProtocolError,
            token=fixed,
            revoked=False,
            contains=("lease is not renewable",),
        )


# --- unreachable ---------------------------------------------------------------------------------


def test_sealed_vault_then_unsealed() -> None:
    with OpenBao() as bao:  # a server of its own: sealing the session server would break others
        bao.create_key("k")
        c, token = host_client(bao, "k")
        with c:
            key, wrapped = c.new_volume_key()
            bao.seal()
            for call in (lambda: c.unwrap(wrapped), c.key_status, c.renew_self):
                with pytest.raises(errors.VaultSealed) as ei:
                    call()
                check_error(
                    ei.value,
                    errors.VaultSealed,
                    token=token,
                    revoked=False,
                    contains=("HTTP 503 Vault is sealed", bao.addr),
                )
            bao.unseal()
            assert c.unwrap(wrapped) == key  # same client, carries on


def test_stopped_server() -> None:
    with OpenBao() as bao:
        bao.create_key("k")
        c = client(bao.url_for("k"), bao.root_token, timeout=5)
        _key, wrapped = c.new_volume_key()
        bao.stop()
        t0 = time.monotonic()
        with pytest.raises(errors.VaultUnreachable) as ei:
            c.unwrap(wrapped)  # the kept-alive connection is gone, and so is the listener
        assert time.monotonic() - t0 < 1
        check_error(
            ei.value,
            errors.VaultUnreachable,
            token=bao.root_token,
            revoked=False,
            contains=(f"127.0.0.1:{bao.port}",),
        )
        c.close()


def test_closed_port() -> None:
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(errors.VaultUnreachable) as ei:
        client(f"transit+http://127.0.0.1:{port}/transit/k", "s.secret-token").unwrap("vault:v1:x")
    assert time.monotonic() - t0 < 1
    check_error(
        ei.value,
        errors.VaultUnreachable,
        token="s.secret-token",
        revoked=False,
        contains=("Connection refused", f"127.0.0.1:{port}"),
    )


def test_timeout() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog), never answers
        port = silent.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(errors.VaultUnreachable) as ei:
            client(
                f"transit+http://127.0.0.1:{port}/transit/k", "s.secret-token", timeout=0.3
            ).unwrap("vault:v1:x")
        assert 0.25 < time.monotonic() - t0 < 2
    check_error(
        ei.value,
        errors.VaultUnreachable,
        token="s.secret-token",
        revoked=False,
        contains=("no answer within 0.3 s",),
    )


def test_unknown_host() -> None:
    with pytest.raises(errors.VaultUnreachable) as ei:
        client("transit+https://vault.invalid:8200/transit/k", "s.secret-token", timeout=3).unwrap(
            "vault:v1:x"
        )
    check_error(
        ei.value,
        errors.VaultUnreachable,
        token="s.secret-token",
        revoked=False,
        contains=("vault.invalid",),
    )


# --- TLS -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_bao() -> Iterator[OpenBao]:
    with OpenBao(tls=True) as bao:
        bao.create_key("k")
        yield bao


def test_https_with_right_ca(tls_bao: OpenBao) -> None:
    assert tls_bao.ca_file is not None
    assert tls_bao.url_for("k").startswith("transit+https://127.0.0.1:")
    c, _token = host_client(tls_bao, "k", ca_file=tls_bao.ca_file)
    with c:
        key, wrapped = c.new_volume_key()
        assert c.unwrap(wrapped) == key
        assert c.key_status()["name"] == "k"


def make_other_ca(path: Path) -> Path:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the vault's CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.mark.parametrize("which", ["system CAs", "another CA"])
def test_https_with_wrong_ca(tls_bao: OpenBao, tmp_path: Path, which: str) -> None:
    ca = make_other_ca(tmp_path / "other-ca.pem") if which == "another CA" else None
    with pytest.raises(errors.VaultTLSError) as ei:
        client(tls_bao.url_for("k"), tls_bao.root_token, ca_file=ca).key_status()
    check_error(
        ei.value,
        errors.VaultTLSError,
        token=tls_bao.root_token,
        revoked=False,
        contains=("certificate verification failed", "unable to get local issuer"),
    )


def test_missing_ca_file(tls_bao: OpenBao, tmp_path: Path) -> None:
    with pytest.raises(errors.VaultTLSError) as ei:
        client(tls_bao.url_for("k"), tls_bao.root_token, ca_file=tmp_path / "nope.pem")
    check_error(
        ei.value,
        errors.VaultTLSError,
        token=tls_bao.root_token,
        revoked=False,
        contains=("nope.pem",),
    )


def test_https_to_plain_http_port(openbao: OpenBao, transit_key: TransitKey) -> None:
    url = transit_key.url.replace("transit+http://", "transit+https://")
    with pytest.raises(errors.VaultTLSError) as ei:
        client(url, transit_key.token).key_status()
    check_error(ei.value, errors.VaultTLSError, token=transit_key.token, revoked=False)


def test_http_to_https_port(tls_bao: OpenBao) -> None:
    url = tls_bao.url_for("k").replace("transit+https://", "transit+http://")
    with pytest.raises(errors.VaultProtocolError) as ei:
        client(url, tls_bao.root_token).key_status()
    check_error(
        ei.value,
        errors.VaultProtocolError,
        token=tls_bao.root_token,
        revoked=False,
        contains=("Client sent an HTTP request to an HTTPS server.",),
    )


# --- key bytes in memory -------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import sys
    from encfs.vault import VaultSettings, connect
    c = connect(sys.argv[1], VaultSettings(ca_file=sys.argv[2] or None))
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


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_no_key_bytes_left_in_memory(openbao: OpenBao, tls_bao: OpenBao, tls: bool) -> None:
    """After the caller wipes its bytearray, no copy of the 32 key bytes, nor their base64
    text, remains anywhere in the process (docs/SECURITY.md, "Keys in memory")."""
    bao = tls_bao if tls else openbao
    name = "mem-" + os.urandom(4).hex()
    bao.create_key(name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["VAULT_TOKEN"] = bao.root_token
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, bao.url_for(name), str(bao.ca_file or "")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        wrapped = proc.stdout.readline().strip()
        assert wrapped.startswith("vault:v1:"), wrapped
        answer = bao.admin.secrets.transit.decrypt_data(name=name, ciphertext=wrapped)
        key = base64.b64decode(answer["data"]["plaintext"])
        assert count_in_memory(proc.pid, key) == 1  # the caller's bytearray, and only it
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "wiped"
        assert count_in_memory(proc.pid, key) == 0
        # Nor its base64 text: the answer never passed through http.client's buffered
        # reader, and over TLS OpenSSL cleansed the decrypted records.
        text = base64.b64encode(key).rstrip(b"=")
        assert scan_memory(proc.pid, {"base64": text, "hex": key.hex().encode()}) == {}
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- URL and token -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("transit+http://vault.example.com:8200/transit/k", "refusing plain HTTP"),
        ("transit+http://10.0.0.5/transit/k", "refusing plain HTTP"),
        ("transit+https://vault.example.com:8200/transit", "must name the transit mount"),
        ("transit+https://vault.example.com:8200/", "must name the transit mount"),
        ("https://vault.example.com:8200/transit/k", "unsupported vault URL scheme"),
        ("vault://vault.example.com/transit/k", "unsupported vault URL scheme"),
        ("transit+https:///transit/k", "has no host"),
        ("transit+https://vault:99999/transit/k", "invalid port"),
        ("transit+https://user:pw@vault/transit/k", "must not carry"),
    ],
)
def test_parse_vault_url_refuses(url: str, complaint: str) -> None:
    with pytest.raises(errors.VaultConfigError, match=re.escape(complaint)):
        parse_vault_url(url)


def test_parse_vault_url_accepts() -> None:
    u = parse_vault_url("transit+https://vault.example.com/ops/transit/host-kek")
    assert u == VaultURL("transit+https", "vault.example.com", 8200, "ops/transit", "host-kek")
    assert u.base_url == "https://vault.example.com:8200"
    for url in (
        "transit+http://127.0.0.1:8200/transit/k",
        "transit+http://localhost:1/t/k",
        "transit+http://[::1]:8200/transit/k",
    ):
        assert str(parse_vault_url(url)) == url
    assert parse_vault_url("transit+http://[::1]:8200/transit/k").base_url == "http://[::1]:8200"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ("VAULT_TOKEN", "BAO_TOKEN", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def write_token(path: Path, token: str, mode: int) -> Path:
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


def _reveal(secret: LockedSecret) -> str:
    """The token a ``LockedSecret`` holds, as a ``str`` (tests only: an unwipeable copy)."""
    view = secret.view()
    try:
        return bytes(view).decode()
    finally:
        view.release()


def test_read_token_file(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    path = write_token(tmp_path / "t", "s.file-token", 0o600)
    clean_env.setenv("VAULT_TOKEN", "s.env-token")
    assert _reveal(read_token(VaultSettings(token_file=path))) == "s.file-token"


def test_read_token_refuses_open_file(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    path = write_token(tmp_path / "t", "s.file-token", 0o644)
    with pytest.raises(errors.VaultCredentialsError) as ei:
        read_token(VaultSettings(token_file=path))
    check_error(
        ei.value,
        errors.VaultCredentialsError,
        token="s.file-token",
        revoked=False,
        contains=(f"chmod 600 {path}",),
    )


def test_read_token_env_fallback(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("BAO_TOKEN", "s.bao-token")
    assert _reveal(read_token(VaultSettings())) == "s.bao-token"
    clean_env.setenv("VAULT_TOKEN", "s.vault-token")
    assert _reveal(read_token(VaultSettings())) == "s.vault-token"


def test_read_token_systemd_credential(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    write_token(tmp_path / "vault-token", "s.cred-token", 0o400)
    clean_env.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    clean_env.setenv("VAULT_TOKEN", "s.env-token")
    assert _reveal(read_token(VaultSettings())) == "s.cred-token"


def test_read_token_unit_placeholder(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    """encfs@.service's SetCredential=vault-token:- stands in for a missing token file."""
    write_token(tmp_path / "vault-token", "-", 0o400)
    clean_env.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(errors.VaultCredentialsError, match=re.escape("/etc/encfs/NAME.token")):
        read_token(VaultSettings())
    clean_env.setenv("VAULT_TOKEN", "s.env-token")
    assert _reveal(read_token(VaultSettings())) == "s.env-token"


@pytest.mark.parametrize("how", ["nothing", "missing file", "empty file"])
def test_read_token_missing(tmp_path: Path, clean_env: pytest.MonkeyPatch, how: str) -> None:
    settings = VaultSettings()
    if how == "missing file":
        settings = VaultSettings(token_file=tmp_path / "absent")
    elif how == "empty file":
        settings = VaultSettings(token_file=write_token(tmp_path / "t", "", 0o600))
    with pytest.raises(errors.VaultCredentialsError) as ei:
        read_token(settings)
    check_error(ei.value, errors.VaultCredentialsError, token="s.never-written", revoked=False)


def test_repr_and_url_hide_token(transit_key: TransitKey) -> None:
    c = client(transit_key.url, transit_key.token)
    assert str(c.url) == transit_key.url and isinstance(c.url, VaultURL)
    assert transit_key.token not in repr(c) and transit_key.token not in str(c)
    assert transit_key.name in repr(c)
    c.close()
    assert c.key_status()["name"] == transit_key.name  # usable again after close()
    c.close()


# --- a TCP proxy that can drop connections -------------------------------------------------------


class TCPProxy:
    """Forwards 127.0.0.1:port to the vault; counts connections; ``drop_all()`` resets them."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        self.accepted = 0
        self.refuse = False
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.server.accept()
            except OSError:
                return
            if self.refuse:
                down.close()
                continue
            up = socket.create_connection(self.target)
            with self._lock:
                self.accepted += 1
                self._pairs.append((down, up))
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    def drop_all(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                _close(s)

    def close(self) -> None:
        _close(self.server)
        self.drop_all()

    def __enter__(self) -> TCPProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass


# --- key release, preflight, identity, retries ------------------------------------------------


def test_key_release_export_unwraps_locally(openbao: OpenBao) -> None:
    name = "exp-" + os.urandom(4).hex()
    openbao.create_key(name, exportable=True)
    token = openbao.root_token
    url = openbao.url_for(name)
    with client(url, token) as c:
        key, wrapped = c.new_volume_key()
    openbao.rotate_key(name)  # the wrapped key names v1: export must fetch that version
    settings = VaultSettings(timeout=5.0, key_release="export")
    with TransitClient(parse_vault_url(url), token=token, settings=settings) as exp:
        assert exp.unwrap(wrapped) == key
        rewrapped = exp.rewrap(wrapped)
        assert rewrapped.startswith("vault:v2:") and exp.unwrap(rewrapped) == key
        # A damaged wrapped key fails authentication locally, with a clear error.
        raw = bytearray(base64.b64decode(wrapped.split(":", 2)[2]))
        raw[-1] ^= 1
        bad = "vault:v1:" + base64.b64encode(bytes(raw)).decode()
        with pytest.raises(errors.VaultProtocolError, match="does not authenticate"):
            exp.unwrap(bad)


def test_key_release_export_refused_for_a_non_exportable_key(transit_key: TransitKey) -> None:
    with client(transit_key.url, transit_key.token) as c:
        _, wrapped = c.new_volume_key()
    settings = VaultSettings(timeout=5.0, key_release="export")
    exp = TransitClient(
        parse_vault_url(transit_key.url), token=transit_key.token, settings=settings
    )
    with exp, pytest.raises(errors.VaultError) as ei:
        exp.unwrap(wrapped)
    assert "export" in str(ei.value) and "not exportable" in str(ei.value).lower()


def test_preflight_names_the_missing_capability(openbao: OpenBao, transit_key: TransitKey) -> None:
    k, m = transit_key.name, openbao.mount
    c, _ = host_client(openbao, k)
    with c:
        for purpose in ("init", "mount", "rotate"):
            c.check_capabilities(purpose)  # the host policy has everything
    openbao.write_policy(
        f"only-datakey-{k}",
        f"""
path "{m}/datakey/plaintext/{k}" {{ capabilities = ["update"] }}
path "sys/capabilities-self" {{ capabilities = ["update"] }}
""",
    )
    narrow = openbao.make_token([f"only-datakey-{k}"])
    with client(transit_key.url, narrow) as c:
        c.check_capabilities("init")
        with pytest.raises(errors.VaultPermissionDenied) as ei:
            c.check_capabilities("mount")
        check_error(
            ei.value,
            errors.VaultPermissionDenied,
            token=narrow,
            revoked=True,
            contains=(f"lacks 'update' on {m}/decrypt/{k}",),
        )
    # A token that may not ask about itself: the preflight steps aside.
    openbao.write_policy(f"no-caps-{k}", f'path "{m}/decrypt/{k}" {{ capabilities = ["update"] }}')
    blind = openbao.make_token([f"no-caps-{k}"])
    with client(transit_key.url, blind) as c:
        c.check_capabilities("rotate")


def test_identity_and_renewal(openbao: OpenBao, transit_key: TransitKey) -> None:
    policy = openbao.write_host_policy(transit_key.name)
    token = openbao.make_token([policy], ttl="2m")
    accessor = openbao.admin.auth.token.lookup(token)["data"]["accessor"]
    with client(transit_key.url, token) as c:
        ident = c.identity()
        assert ident["accessor"] == accessor
        assert token not in repr(ident)
        assert ident["renewable"] is True and 0 < ident["ttl"] <= 120
        next_in = c.renew_identity()
        assert next_in is not None and 30 <= next_in <= 60
    fixed = openbao.make_token([policy], ttl="5m", renewable=False)
    with client(transit_key.url, fixed) as c:
        left = c.renew_identity()  # not renewable: nothing renewed, the TTL comes back
        assert left is not None and 250 < left <= 300
    with client(transit_key.url, openbao.root_token) as c:
        assert c.renew_identity() is None  # root never expires


def test_retry_unavailable_waits_for_an_unsealed_vault() -> None:
    from encfs.vault import retry_unavailable

    with OpenBao() as bao:
        bao.create_key("k")
        c, _ = host_client(bao, "k")
        with c:
            key, wrapped = c.new_volume_key()
            bao.seal()
            timer = threading.Timer(1.5, bao.unseal)
            timer.start()
            retries: list[str] = []
            t0 = time.monotonic()
            got = retry_unavailable(
                lambda: c.unwrap(wrapped),
                bound=20,
                on_retry=lambda exc, d: retries.append(type(exc).__name__),
            )
            timer.join()
            assert got == key
            assert 1.4 < time.monotonic() - t0 < 10
            assert retries and set(retries) == {"VaultSealed"}
            # Refusals are never retried.
            bao.revoke_token(_reveal(c._token))
            t0 = time.monotonic()
            with pytest.raises(errors.VaultPermissionDenied):
                retry_unavailable(lambda: c.unwrap(wrapped), bound=20)
            assert time.monotonic() - t0 < 2
        # And the bound holds when the vault stays away.
        bao.stop()
        c2 = client(bao.url_for("k"), "t", timeout=1)
        t0 = time.monotonic()
        with pytest.raises(errors.VaultUnreachable):
            retry_unavailable(lambda: c2.unwrap(wrapped), bound=2)
        assert 1.9 < time.monotonic() - t0 < 5


def test_client_certificate_problems_are_credentials_errors(
    tls_bao: OpenBao, tmp_path: Path
) -> None:
    bad = tmp_path / "client.pem"
    bad.write_text("not a certificate\n")
    settings = VaultSettings(ca_file=tls_bao.ca_file, client_cert=bad, timeout=5)
    with pytest.raises(errors.VaultCredentialsError, match="client certificate"):
        TransitClient(parse_vault_url(tls_bao.url_for("k")), token="t", settings=settings)
    with pytest.raises(errors.VaultConfigError, match="needs TLS"):
        TransitClient(
            parse_vault_url("transit+http://127.0.0.1:1/transit/k"),
            token="t",
            settings=VaultSettings(client_cert=bad),
        )


def test_a_token_that_is_also_a_word_is_blanked_only_where_it_is_the_token(
    openbao: OpenBao, transit_key: TransitKey, tmp_path: Path
) -> None:
    """The token is blanked in the answers that repeat it (lookup-self, renew-self), and
    nowhere else: a dev server's token "root" is also the capability that
    sys/capabilities-self answers, which blanking turned into "****" (init then said the
    token lacked 'update')."""
    openbao.admin.auth.token.create(id="root", policies=["root"])
    env = {**transit_key.env, "VAULT_TOKEN": "root"}
    proc = encfs("init", tmp_path / "c", "--vault", transit_key.url, env=env)
    assert proc.returncode == 0, proc.stderr
