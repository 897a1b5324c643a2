"""A vault at several addresses: the list the host pins (``encfs.vault``) and the failover
of the one connection lifecycle (``encfs.vault.connection``), against real OpenBao dev
servers and real sockets. A node that cannot serve (down, sealed) is passed over, the
address that served is remembered, and a refusal is never asked again elsewhere.

The real three-node cluster (leader killed, standbys forwarding) is tests/test_cluster.py.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import closing

import pytest

from encfs import errors
from encfs.vault import (
    Endpoint,
    VaultSettings,
    check_vault_setting,
    connect,
    parse_vault_url,
    parse_vault_urls,
    pin_vault_url,
)
from encfs.vault.connection import KeepAlive
from encfs.vault.transit import TransitClient
from tests.conftest import TransitKey
from tests.openbao import OpenBao, free_port

HEADER = "transit+https://vault-a:8200/transit/web-01"


class Listener:
    """A TCP listener on loopback that counts the connections it accepts; ``close_at_once``
    hangs up on each (a node that dies mid-request), else it holds them unanswered."""

    def __init__(self, *, close_at_once: bool) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self._close = close_at_once
        self._held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self._close:
                conn.close()
            else:
                self._held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self._held:
            conn.close()


@pytest.fixture
def hang_up() -> Iterator[Listener]:
    listener = Listener(close_at_once=True)
    yield listener
    listener.close()


@pytest.fixture
def canary() -> Iterator[Listener]:
    """An address that must never be asked: it counts every connection."""
    listener = Listener(close_at_once=False)
    yield listener
    listener.close()


def client_for(key: TransitKey, ports: list[int]) -> TransitClient:
    """A transit client for ``key`` at the given loopback ports, in order."""
    urls = " ".join(f"transit+http://127.0.0.1:{p}/{key.bao.mount}/{key.name}" for p in ports)
    vault = connect(urls, VaultSettings(timeout=2))
    assert isinstance(vault, TransitClient)
    return vault


@pytest.fixture
def root_env(transit_key: TransitKey, monkeypatch: pytest.MonkeyPatch) -> TransitKey:
    monkeypatch.setenv("VAULT_TOKEN", transit_key.token)
    return transit_key


# --- the list ------------------------------------------------------------------------------


def test_a_list_of_urls_is_one_vault_at_several_addresses() -> None:
    url = parse_vault_urls(
        "transit+https://a:8200/transit/k  transit+https://b:8201/transit/k\ttransit+https://[::1]/transit/k"
    )
    assert url.endpoints == (Endpoint("a", 8200), Endpoint("b", 8201), Endpoint("::1", 8200))
    assert url.origins == ("https://a:8200", "https://b:8201", "https://[::1]:8200")
    assert (url.host, url.port, url.mount, url.key_name) == ("a", 8200, "transit", "k")
    assert parse_vault_urls(str(url)) == url  # str() lists every address, and reads back
    assert str(url.primary) == "transit+https://a:8200/transit/k"  # what a header records
    single = parse_vault_urls("transit+https://a:8200/transit/k")
    assert single == parse_vault_url("transit+https://a:8200/transit/k") and single.also == ()


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("transit+https://a/transit/k transit+https://b/transit/other", "more than one vault"),
        ("transit+https://a/transit/k transit+https://b/mount2/k", "more than one vault"),
        ("transit+https://a/transit/k kmip://b/k", "more than one vault"),
        ("transit+https://a:8200/transit/k transit+https://a/transit/k", "twice"),
        ("transit+https://a/transit/k transit+http://b.example/transit/k", "plain HTTP"),
        ("transit+https://a/transit/k https://b:8200", "mixes full vault URLs and addresses"),
        ("https://a:8200 https://a:8200", "twice"),
        ("https://a:8200 https://b:8200/path", "is not a vault address"),
        ("https://a:8200 http://b.example:8200", "plain HTTP"),
        ("", "no vault URL"),
    ],
)
def test_a_bad_list_is_refused_saying_why(spec: str, complaint: str) -> None:
    with pytest.raises(errors.VaultConfigError, match=complaint):
        check_vault_setting(spec)


def test_pinned_addresses_take_the_header_key_at_every_node() -> None:
    pinned = pin_vault_url(
        HEADER, configured="https://vault-b:8200 https://vault-a:8200", addr=None
    )
    assert pinned.url.origins == ("https://vault-b:8200", "https://vault-a:8200")
    assert (pinned.url.mount, pinned.url.key_name) == ("transit", "web-01")
    assert pinned.note == ""  # the header's node is one of them: nothing to warn about
    other = pin_vault_url(HEADER, configured="https://vault-c:8200 https://vault-d:8200", addr=None)
    assert "which is ignored" in other.note


def test_vault_addr_holds_one_address_like_the_vault_cli() -> None:
    assert pin_vault_url(HEADER, configured=None, addr="https://v:8200").url.origins == (
        "https://v:8200",
    )
    for addr in ("https://a:8200 https://b:8200", "https://a:8200,https://b:8200"):
        with pytest.raises(errors.VaultConfigError, match="more than one address") as info:
            pin_vault_url(HEADER, configured=None, addr=addr)
        assert "--vault ADDR repeated" in info.value.hint


# --- failover ------------------------------------------------------------------------------


def test_a_node_that_is_down_is_passed_over_and_the_one_that_served_remembered(
    root_env: TransitKey, hang_up: Listener
) -> None:
    dead = free_port()  # nothing listens: connection refused
    key = root_env
    with client_for(key, [dead, hang_up.port, key.bao.port]) as vault:
        assert vault.serving == f"http://127.0.0.1:{dead}"  # before any request: the first
        vkey, wrapped = vault.new_volume_key()
        assert vault.serving == key.bao.addr
        assert hang_up.accepted == 1  # asked once, in order, then the next address
        for _ in range(3):
            assert vault.unwrap(wrapped) == vkey
        assert hang_up.accepted == 1  # the next requests start where the last one was served


def test_every_address_failing_names_each(hang_up: Listener, root_env: TransitKey) -> None:
    dead = free_port()
    with (
        client_for(root_env, [dead, hang_up.port]) as vault,
        pytest.raises(errors.VaultUnreachable) as info,
    ):
        vault.key_status()
    message = str(info.value)
    assert "no address of the vault could serve the request (2 tried)" in message
    assert f"127.0.0.1:{dead}" in message and f"127.0.0.1:{hang_up.port}" in message
    assert message.index(str(dead)) < message.index(str(hang_up.port))  # in the order tried


def test_a_refusal_is_the_vaults_answer_and_never_asked_elsewhere(
    transit_key: TransitKey, canary: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revoked host must not go looking for a node that says yes: 403, a missing key, a
    ciphertext the key rejects — each is raised from the first node, and the next address
    never sees a connection."""
    bao = transit_key.bao
    policy = bao.write_host_policy(transit_key.name)
    token = bao.make_token([policy])
    monkeypatch.setenv("VAULT_TOKEN", token)
    with client_for(transit_key, [bao.port, canary.port]) as vault:
        _, wrapped = vault.new_volume_key()
        bao.revoke_token(token)
        with pytest.raises(errors.VaultPermissionDenied):
            vault.unwrap(wrapped)
    monkeypatch.setenv("VAULT_TOKEN", bao.root_token)
    with client_for(transit_key, [bao.port, canary.port]) as vault:
        with pytest.raises(errors.VaultCiphertextRejected):
            vault.unwrap(wrapped[:-8] + "AAAAAAA=")
        bao.delete_key(transit_key.name)
        with pytest.raises(errors.VaultKeyNotFound):
            vault.unwrap(wrapped)
    assert canary.accepted == 0


def test_a_refusal_after_a_node_that_is_down_is_still_a_refusal(
    transit_key: TransitKey, canary: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    bao = transit_key.bao
    monkeypatch.setenv("VAULT_TOKEN", "not-a-token-of-this-vault")
    with (
        client_for(transit_key, [free_port(), bao.port, canary.port]) as vault,
        pytest.raises(errors.VaultPermissionDenied),
    ):
        vault.key_status()
    assert canary.accepted == 0


def test_a_sealed_node_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two servers, one token: node A sealed (503), node B answers."""
    with OpenBao() as a, OpenBao() as b:
        b.admin.auth.token.create(id=a.root_token, policies=["root"])
        b.create_key("k")
        monkeypatch.setenv("VAULT_TOKEN", a.root_token)
        a.seal()
        urls = f"transit+http://127.0.0.1:{a.port}/transit/k transit+http://127.0.0.1:{b.port}/transit/k"
        with closing(connect(urls, VaultSettings(timeout=5))) as vault:
            assert vault.key_status()["latest_version"] == 1
            assert vault.serving == b.addr
        b.seal()
        with (
            closing(connect(urls, VaultSettings(timeout=5))) as vault,
            pytest.raises(errors.VaultSealed, match="2 tried"),
        ):
            vault.key_status()  # every node sealed: sealed, not merely unreachable


# --- the lifecycle itself ------------------------------------------------------------------


def _echo_server() -> tuple[socket.socket, int]:
    """A loopback server that answers every line with the same line."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=conn: _echo(c), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return sock, sock.getsockname()[1]


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(100):
            conn.sendall(data)


def test_keepalive_tries_the_first_addresses_again_after_a_while() -> None:
    """The operator's order is a preference: after ``failback_after`` on another address,
    a request starts at the first again (and stays where it is served if that is down)."""
    first, first_port = _echo_server()
    second, second_port = _echo_server()
    endpoints = [Endpoint("127.0.0.1", first_port), Endpoint("127.0.0.1", second_port)]
    link: KeepAlive[socket.socket] = KeepAlive(endpoints, (), failback_after=0.3)
    down = {first_port}

    def connect_to(endpoint: Endpoint) -> socket.socket:
        if endpoint.port in down:
            raise ConnectionRefusedError("down")
        return socket.create_connection((endpoint.host, endpoint.port), timeout=2)

    def step(sock: socket.socket) -> tuple[bytes, bool]:
        sock.sendall(b"x")
        return sock.recv(10), True

    def failed(exc: BaseException, endpoint: Endpoint) -> errors.VaultError | None:
        return errors.VaultUnreachable(f"{endpoint}: {exc}") if isinstance(exc, OSError) else None

    try:
        assert link.run(connect_to, step, failed) == b"x"
        assert link.serving.port == second_port
        down.clear()  # the first comes back
        assert link.run(connect_to, step, failed) == b"x"
        assert link.serving.port == second_port  # not asked again yet
        time.sleep(0.35)
        assert link.run(connect_to, step, failed) == b"x"
        assert link.serving.port == first_port  # back to the first after a while
    finally:
        link.close()
        first.close()
        second.close()


def test_keepalive_never_fails_over_an_error_that_means_revocation() -> None:
    """Defence in depth: whatever a client maps to a revocation, even from a transport
    step, is raised from the address that gave it; the next one is never connected."""
    first, first_port = _echo_server()
    endpoints = [Endpoint("127.0.0.1", first_port), Endpoint("127.0.0.1", free_port())]
    link: KeepAlive[socket.socket] = KeepAlive(endpoints, ())
    connected: list[int] = []

    def connect_to(endpoint: Endpoint) -> socket.socket:
        connected.append(endpoint.port)
        return socket.create_connection((endpoint.host, endpoint.port), timeout=2)

    def step(sock: socket.socket) -> tuple[bytes, bool]:
        raise errors.VaultKeyDisabled("the key is disabled")

    try:
        with pytest.raises(errors.VaultKeyDisabled):
            link.run(connect_to, step, lambda exc, endpoint: None)
        assert connected == [first_port]
    finally:
        link.close()
        first.close()
