"""A persistent single-host OpenBao: Raft storage, TLS with a CA of its own, auto-unseal.

``start_serve`` (``encfs vault serve``, ``systemd/encfs-vault.service``) runs OpenBao with
Raft storage under a data directory (mode 0700), TLS with a CA of its own
(``DATA/tls/ca.pem``), initialised on first start with one unseal key share, and unsealed
with that key on every start.

The trade-off, stated wherever it matters (here, in ``start_serve`` and in the text
``encfs vault serve`` prints on first start): the unseal key is stored in
``DATA/init.json`` on the same disk as the vault's data, so the server comes back by itself
after a reboot. That keeps volume keys from leaving with a stolen *volume* or from being
used by other hosts, and gives central revocation and audit; it does not protect against
theft of *this host's* disk, which holds both the sealed data and the key that unseals it.
Move the root token out after setup; in production prefer an auto-unseal seal (KMS, HSM, or
transit on another vault) or unseal by hand (remove the unseal key from ``init.json``: the
server then waits for ``bao operator unseal``).

Unseal keys and tokens are never printed or logged. Raises ``encfs.errors`` types; prints
nothing (``encfs.cli`` does).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from encfs import errors, sdnotify
from encfs.bao import process
from encfs.bao.setup import DEFAULT_MOUNT, ensure_transit
from encfs.hostfiles import write_file_atomic
from encfs.vault.admin import AdminClient

__all__ = [
    "TLS_DAYS",
    "LocalServer",
    "ServePaths",
    "notify_ready",
    "notify_stopping",
    "start_serve",
]

TLS_DAYS = 3650
TLS_RENEW_BEFORE = datetime.timedelta(days=30)


@dataclass(frozen=True)
class ServePaths:
    """Where ``serve`` keeps things under its data directory."""

    data_dir: Path

    @property
    def raft_dir(self) -> Path:
        return self.data_dir / "raft"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    @property
    def ca_file(self) -> Path:
        """The CA certificate clients verify the server with (public, mode 0644)."""
        return self.tls_dir / "ca.pem"

    @property
    def cert_file(self) -> Path:
        return self.tls_dir / "server.pem"

    @property
    def key_file(self) -> Path:
        return self.tls_dir / "server-key.pem"

    @property
    def config_file(self) -> Path:
        return self.data_dir / "bao.hcl"

    @property
    def init_file(self) -> Path:
        """Unseal key(s) and initial root token (mode 0600)."""
        return self.data_dir / "init.json"

    @property
    def home_dir(self) -> Path:
        return self.data_dir / "home"


@dataclass
class LocalServer:
    """A running persistent OpenBao started by ``start_serve``."""

    addr: str
    paths: ServePaths
    proc: subprocess.Popen[bytes] = field(repr=False)
    initialized_now: bool
    """True on the first start: the vault was initialised by this call."""
    unsealed: bool
    """False when ``init.json`` holds no unseal key: the operator unseals by hand."""
    transit_enabled_now: bool = False
    output: process.Output | None = field(default=None, repr=False)

    def stop(self, timeout: float = 15.0) -> int:
        """Stop OpenBao (SIGTERM, SIGKILL after ``timeout``); returns its exit status."""
        status = process.stop(self.proc, timeout)
        if self.output is not None:
            self.output.join()
        return status

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listener_sans(host: str) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) the server certificate must carry for ``host``."""
    dns, ips = ["localhost"], ["127.0.0.1", "::1"]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if host not in dns:
            dns.append(host)
    else:
        if not ip.is_unspecified and str(ip) not in ips:
            ips.append(str(ip))
    return dns, ips


def _ensure_tls(paths: ServePaths, host: str) -> bool:
    """Make sure ``tls/`` holds a CA, a server certificate for ``host`` (and localhost,
    127.0.0.1, ::1) valid for 30 more days, and its key; (re)generate all three otherwise.
    Returns True if they were (re)generated: clients then need the new ``ca.pem``."""
    from cryptography import x509

    dns, ips = _listener_sans(host)
    if paths.cert_file.exists() and paths.key_file.exists() and paths.ca_file.exists():
        try:
            cert = x509.load_pem_x509_certificate(paths.cert_file.read_bytes())
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            have_dns = set(san.get_values_for_type(x509.DNSName))
            have_ips = {str(a) for a in san.get_values_for_type(x509.IPAddress)}
            fresh = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
            if set(dns) <= have_dns and set(ips) <= have_ips and fresh > TLS_RENEW_BEFORE:
                _check_private(paths.key_file, "TLS key file")
                return False
        except (ValueError, x509.ExtensionNotFound):
            pass  # unreadable: make new ones
    from encfs.crypto import make_tls_material

    ca_pem, cert_pem, key_pem = make_tls_material(
        dns_names=dns, ip_addresses=ips, days=TLS_DAYS, common_name="encfs-vault"
    )
    paths.tls_dir.mkdir(mode=0o700, exist_ok=True)
    write_file_atomic(paths.key_file, key_pem, 0o600)
    write_file_atomic(paths.cert_file, cert_pem, 0o644)
    write_file_atomic(paths.ca_file, ca_pem, 0o644)
    return True


def _server_config(paths: ServePaths, host: str, port: int, cluster: tuple[str, int]) -> str:
    q = json.dumps  # a JSON string is a valid HCL string
    client = process.url_host(process.client_host(host))
    listen = f"{process.url_host(host)}:{port}"
    cluster_listen = f"{process.url_host(cluster[0])}:{cluster[1]}"
    cluster_client = f"{process.url_host(process.client_host(cluster[0]))}:{cluster[1]}"
    return f"""\
# Written by encfs (`encfs vault serve`) on every start: edits here are overwritten.
ui = false
api_addr = {q(f"https://{client}:{port}")}
cluster_addr = {q(f"https://{cluster_client}")}

storage "raft" {{
  path = {q(str(paths.raft_dir))}
  node_id = "encfs-vault"
  # election timeouts of 1 s instead of 5 s: the single node becomes leader in ~1.5 s
  performance_multiplier = 1
}}

listener "tcp" {{
  address = {q(listen)}
  cluster_address = {q(cluster_listen)}
  tls_cert_file = {q(str(paths.cert_file))}
  tls_key_file = {q(str(paths.key_file))}
  tls_min_version = "tls12"
}}
"""


def _prepare_data_dir(data_dir: Path) -> None:
    if data_dir.exists():
        if not data_dir.is_dir():
            raise errors.VaultConfigError(f"vault data path {data_dir} is not a directory")
        _check_private(data_dir, "vault data directory", directory=True)
    else:
        data_dir.mkdir(parents=True, mode=0o700)
        os.chmod(data_dir, 0o700)


def _read_init(paths: ServePaths) -> dict[str, Any]:
    _check_private(paths.init_file, "vault init file")
    try:
        doc = json.loads(paths.init_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise errors.VaultCredentialsError(
            f"cannot read vault init file {paths.init_file}: {type(exc).__name__}",
            hint="restore it from your backup",
        ) from None
    if not isinstance(doc, dict):
        raise errors.VaultCredentialsError(f"vault init file {paths.init_file} is not an object")
    return doc


def _unseal_keys(doc: dict[str, Any]) -> list[str]:
    keys = doc.get("keys_base64") or []
    return [k for k in keys if isinstance(k, str) and k] if isinstance(keys, list) else []


def start_serve(
    data_dir: Path,
    listen: str = process.DEFAULT_LISTEN,
    *,
    cluster_listen: str | None = None,
    log: TextIO | None = None,
    on_spawn: Callable[[subprocess.Popen[bytes]], None] | None = None,
    ready_timeout: float = 60.0,
) -> LocalServer:
    """Start a persistent OpenBao with Raft storage under ``data_dir``; returns once it is
    active (or, without a stored unseal key, listening and sealed). The caller stops it.

    ``data_dir`` (created with mode 0700; refused if open to group or others) holds
    ``raft/`` (the data), ``tls/`` (``ca.pem`` 0644, ``server.pem``, ``server-key.pem``
    0600: a CA of our own whose private key is dropped after signing), ``bao.hcl`` (rewritten
    on every start) and ``init.json`` (0600). The API is TLS on ``listen``; Raft's cluster
    port is ``cluster_listen`` (default: the next port).

    First start (storage uninitialised): ``sys/init`` with one key share and threshold 1;
    the unseal key and the root token go to ``init.json`` before anything else happens.
    Every start: unseal with the stored key(s), wait until active, and (while the root token
    is still in ``init.json``) enable transit at ``transit/`` if it is missing.

    Trade-off: the unseal key sits on the same disk as the data, so the server unseals itself
    after a reboot. This protects against theft of keys from other hosts and gives central
    revocation and audit, not against theft of this host's disk. Operators should move the
    root token out after setup and may use auto-unseal in production, or delete the unseal
    key from ``init.json`` and unseal by hand (then this returns with ``unsealed=False``).

    Raises ``VaultConfigError`` (bad address, no binary, storage/init file mismatch),
    ``VaultCredentialsError`` (loose modes or foreign owner), ``BaoServerError`` (OpenBao
    exited or was not ready in time) or what the API answered.
    """
    data_dir = data_dir.absolute()
    paths = ServePaths(data_dir)
    host, port = process.split_listen(listen)
    cluster = process.split_listen(cluster_listen) if cluster_listen else (host, port + 1)
    if cluster[1] > 65535:
        raise errors.VaultConfigError(
            f"no port after {port} for the cluster listener", hint="pass --cluster-listen HOST:PORT"
        )
    binary = process.bao_binary()
    process.check_port_free(host, port, "API listener")
    process.check_port_free(cluster[0], cluster[1], "cluster listener")
    _prepare_data_dir(data_dir)
    if paths.init_file.exists():
        _check_private(paths.init_file, "vault init file")
    _ensure_tls(paths, host)
    paths.raft_dir.mkdir(mode=0o700, exist_ok=True)
    paths.home_dir.mkdir(mode=0o700, exist_ok=True)
    write_file_atomic(paths.config_file, _server_config(paths, host, port, cluster).encode(), 0o600)

    addr = f"https://{process.url_host(process.client_host(host))}:{port}"
    cmd = [str(binary), "server", f"-config={paths.config_file}"]
    proc, out = process.spawn(cmd, env=process.child_env(paths.home_dir), cwd=data_dir, sink=log)
    server = LocalServer(
        addr=addr, paths=paths, proc=proc, initialized_now=False, unsealed=False, output=out
    )
    try:
        if on_spawn is not None:
            on_spawn(proc)
        with AdminClient(addr, ca_file=paths.ca_file) as api:
            _bring_up(server, api, out, ready_timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _bring_up(
    server: LocalServer, api: AdminClient, out: process.Output, ready_timeout: float
) -> None:
    """Wait until ``server`` listens; initialise it on first start; unseal it with the
    stored key(s) (none: return, sealed); wait until it is active; enable transit while the
    root token is still in ``init.json``. Sets ``server``'s flags as it goes."""
    paths, proc, addr = server.paths, server.proc, server.addr
    status = process.wait_health(
        api, proc, out, want=(200, 429, 501, 503), timeout=ready_timeout, what="listening"
    )
    if status == 501:  # storage empty: first start
        _initialise(api, paths, addr)
        server.initialized_now = True
        status = 503
    if status == 503:
        init_doc = _read_init(paths) if paths.init_file.exists() else {}
        keys = _unseal_keys(init_doc)
        if not keys:
            return  # unseal by hand
        for key in keys:
            answer = api.call("PUT", "/v1/sys/unseal", {"key": key}, what="unseal")
            if isinstance(answer, dict) and answer.get("sealed") is False:
                break
        else:
            raise errors.BaoServerError(
                f"vault {addr} is still sealed after the key(s) in {paths.init_file}",
                hint=f"{paths.init_file} does not hold this vault's unseal key(s); "
                "unseal by hand: bao operator unseal",
            )
    process.wait_health(api, proc, out, want=(200,), timeout=ready_timeout, what="active")
    server.unsealed = True
    root_token = _read_init(paths).get("root_token") if paths.init_file.exists() else None
    if isinstance(root_token, str) and root_token:
        # a root token revoked but left in the file: nothing to do
        with (
            contextlib.suppress(errors.VaultPermissionDenied),
            AdminClient(addr, root_token, ca_file=paths.ca_file) as root,
        ):
            server.transit_enabled_now = ensure_transit(root, DEFAULT_MOUNT)


def _initialise(api: AdminClient, paths: ServePaths, addr: str) -> None:
    """``sys/init`` with one key share; the unseal key and the root token go to
    ``init.json`` (0600) before anything else happens. Refuses when ``init.json`` exists
    (its vault's storage is missing: initialising would orphan it)."""
    if paths.init_file.exists():
        raise errors.VaultConfigError(
            f"{paths.init_file} exists but the vault storage in {paths.raft_dir} is "
            "empty: refusing to initialise over it",
            hint=f"restore {paths.raft_dir} from backup, or move {paths.init_file} "
            "away to start a new, empty vault",
        )
    doc = api.call(
        "PUT",
        "/v1/sys/init",
        {"secret_shares": 1, "secret_threshold": 1},
        what="initialise",
    )
    keys = _unseal_keys(doc) if isinstance(doc, dict) else []
    root = doc.get("root_token") if isinstance(doc, dict) else None
    if not keys or not isinstance(root, str):
        raise errors.BaoServerError(f"vault {addr} answered sys/init without keys")
    record = {
        "keys_base64": keys,
        "root_token": root,
        "note": "written by encfs vault serve: the unseal key(s) unseal this vault at "
        "every start; move root_token out after setup (see encfs/bao/serve.py)",
    }
    write_file_atomic(paths.init_file, (json.dumps(record, indent=2) + "\n").encode())


def notify_ready(server: LocalServer) -> None:
    """Tell systemd (``READY=1``) that ``server`` is up: ready, or sealed and waiting for
    ``bao operator unseal``. (OpenBao itself is kept from saying so: ``child_env``.)"""
    if server.unsealed:
        sdnotify.notify(ready=1, status=f"ready at {server.addr}")
    else:
        sdnotify.notify(ready=1, status=f"sealed at {server.addr}: waiting for unseal")


def notify_stopping() -> None:
    """Tell systemd (``STOPPING=1``) that the vault is stopping."""
    sdnotify.notify(stopping=1)


def _check_private(path: Path, what: str, *, directory: bool = False) -> None:
    """``path`` is ours and not open to group or others, or raise ``VaultCredentialsError``."""
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise errors.VaultCredentialsError(
            f"{what} {path} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()}); "
            f"run as its owner, or: chown {os.geteuid()} {path}",
            hint="secrets of the vault must be readable by its owner only",
        )
    if st.st_mode & 0o077:
        mode = "700" if directory else "600"
        raise errors.VaultCredentialsError(
            f"{what} {path} is open to group or others (mode {st.st_mode & 0o777:o}); "
            f"run: chmod {mode} {path}",
            hint="secrets of the vault must be readable by its owner only",
        )
