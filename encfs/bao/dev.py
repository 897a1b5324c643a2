"""``bao server -dev``: an in-memory OpenBao on loopback with transit, for demos and tests.

Everything is lost when it stops, the root token is known (``encfs vault dev`` prints it, as
``bao server -dev`` itself does) and the API is plain HTTP: loopback only. The server runs
with a temporary HOME and ``-dev-no-store-token`` (no ``~/.vault-token``) and gets SIGTERM
if the thread that started it ends. Raises ``encfs.errors`` types; prints nothing.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from encfs import errors
from encfs.bao import process
from encfs.bao.setup import DEFAULT_MOUNT, ensure_transit
from encfs.vault import is_loopback
from encfs.vault.admin import AdminClient

__all__ = ["DevServer", "run_dev"]


@dataclass
class DevServer:
    """A running ``bao server -dev`` (in memory) with transit at ``mount``. ``stop()`` it (or
    use it as a context manager); it also gets SIGTERM when the thread that started it ends
    (``PR_SET_PDEATHSIG``), so start it from a thread that outlives it (the main thread)."""

    addr: str
    root_token: str = field(repr=False)
    proc: subprocess.Popen[bytes] = field(repr=False)
    workdir: Path
    mount: str = DEFAULT_MOUNT
    output: process.Output | None = field(default=None, repr=False)

    def stop(self, timeout: float = 10.0) -> int:
        """Stop OpenBao (SIGTERM, SIGKILL after ``timeout``), remove its temporary HOME;
        returns its exit status. Idempotent."""
        status = process.stop(self.proc, timeout)
        if self.output is not None:
            self.output.join()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return status

    def __enter__(self) -> DevServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_dev(
    listen: str = process.DEFAULT_LISTEN,
    root_token: str | None = None,
    *,
    log: TextIO | None = None,
    on_spawn: Callable[[subprocess.Popen[bytes]], None] | None = None,
    ready_timeout: float = 30.0,
) -> DevServer:
    """Start ``bao server -dev`` on ``listen`` (loopback only), wait until it is active and
    enable transit at ``transit/``; returns the running server (the caller stops it).

    The server keeps everything in memory, runs with a temporary HOME and
    ``-dev-no-store-token`` (so no ``~/.vault-token`` is written), and gets SIGTERM if the
    starting process dies. ``root_token`` defaults to a fresh random one. Its output goes to
    ``log`` (default: dropped) without the banner's unseal key and root token lines.
    ``on_spawn`` is called with the process as soon as it exists (to forward signals).
    Raises ``VaultConfigError`` (bad or non-loopback address, no binary) or
    ``BaoServerError`` (OpenBao exited or was not ready within ``ready_timeout``).
    """
    host, port = process.split_listen(listen)
    if not is_loopback(host):
        raise errors.VaultConfigError(
            f"dev mode listens on loopback only, not {host!r}: it is plain HTTP with a known "
            "root token",
            hint="use --listen 127.0.0.1:PORT, or `encfs vault serve` for a real vault",
        )
    binary = process.bao_binary()
    process.check_port_free(host, port, "dev server")
    token = root_token or "dev-" + secrets.token_urlsafe(18)
    workdir = Path(tempfile.mkdtemp(prefix="encfs-vault-dev-"))
    home = workdir / "home"
    home.mkdir(mode=0o700)
    addr = f"http://{process.url_host(host)}:{port}"
    cmd = [
        str(binary),
        "server",
        "-dev",
        "-dev-no-store-token",
        f"-dev-root-token-id={token}",
        f"-dev-listen-address={process.url_host(host)}:{port}",
    ]
    try:
        proc, out = process.spawn(cmd, env=process.child_env(home), cwd=workdir, sink=log)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    server = DevServer(addr=addr, root_token=token, proc=proc, workdir=workdir, output=out)
    try:
        if on_spawn is not None:
            on_spawn(proc)
        with AdminClient(addr, token) as api:
            process.wait_health(api, proc, out, want=(200,), timeout=ready_timeout, what="ready")
            ensure_transit(api, DEFAULT_MOUNT)
    except BaseException:
        server.stop()
        raise
    return server
