"""A persistent OpenBao: Raft storage, TLS with a CA of its own, auto-unseal; one node, or
a node of a cluster.

``start_serve`` (``encfs vault serve``, ``systemd/encfs-vault.service``) runs OpenBao with
Raft storage under a data directory (mode 0700), TLS with a CA of its own
(``DATA/tls/ca.pem``), initialised on first start with one unseal key share, and unsealed
with that key on every start.

A cluster (three nodes, or five) is that server on several hosts — or, for tests, several
processes on one host — sharing one vault: the first node starts as above; every other one
is started with ``join`` (the address of a node already in it) and a ``node_id`` of its
own, after the operator copied ``init.json`` (the unseal key: every node unseals itself
with it) and ``tls/ca.pem`` + ``tls/ca-key.pem`` (its server certificate is issued by the
same CA, so hosts verify every node with one ``ca.pem``) into its data directory. Raft
replicates the data; the leader answers, and the other nodes forward every request to it:
standby reads are off (``disable_standby_reads``), because a standby that has lost its
leader would otherwise keep answering from its last replicated state — a host revoked
meanwhile could find a node that still says yes.

The trade-off, stated wherever it matters (here, in ``start_serve`` and in the text
``encfs vault serve`` prints on first start): the unseal key is stored in
``DATA/init.json`` on the same disk as the vault's data, so the server comes back by itself
after a reboot. That keeps volume keys from leaving with a stolen *volume* or from being
used by other hosts, and gives central revocation and audit; it does not protect against
theft of *this host's* disk, which holds both the sealed data and the key that unseals it.
In a cluster every node's disk holds them, and the CA's key beside them (no more than
``init.json`` already gives). Move the root token out after setup; in production prefer an
auto-unseal seal (KMS, HSM, or transit on another vault) or unseal by hand (remove the
unseal key from ``init.json``: the server then waits for ``bao operator unseal``).

Unseal keys and tokens are never printed or logged. Raises ``encfs.errors`` types; prints
nothing (``encfs.cli`` does).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from encfs import errors, sdnotify
from encfs.bao import process
from encfs.bao.setup import DEFAULT_MOUNT, ensure_transit
from encfs.hostfiles import write_file_atomic
from encfs.vault.admin import AdminClient

__all__ = [
    "DEFAULT_NODE_ID",
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
    def ca_key_file(self) -> Path:
        """The CA's private key (mode 0600): issues the certificate of every node of a
        cluster; copied to each with ``init.json``."""
        return self.tls_dir / "ca-key.pem"

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
    joined_now: bool = False
    """True on a joining node's first start: it joined the cluster by this call."""
    standby: bool = False
    """True when the node is a standby of a cluster (another node is the leader)."""
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


def _ensure_tls(paths: ServePaths, host: str, *, joining: bool) -> bool:
    """Make sure ``tls/`` holds a CA, a server certificate for ``host`` (and localhost,
    127.0.0.1, ::1) valid for 30 more days, and its key. A missing or stale server
    certificate is issued by the CA in ``tls/`` when its key is there (``ca-key.pem``: every
    node of a cluster shares the CA, so hosts trust all of them with one ``ca.pem``); else a
    new CA is made (and its key kept for the nodes to come) — refused for a ``joining``
    node (``--join``), which must use the cluster's. Returns True if a new CA was made: clients then
    need the new ``ca.pem``."""
    from cryptography import x509

    from encfs.crypto import issue_tls_cert, make_tls_ca

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
    made_ca = False
    if paths.ca_file.exists() and paths.ca_key_file.exists():
        _check_private(paths.ca_key_file, "TLS CA key file")
        ca_pem, ca_key_pem = paths.ca_file.read_bytes(), paths.ca_key_file.read_bytes()
    elif joining:
        raise errors.VaultConfigError(
            f"a joining node needs the cluster's CA: {paths.ca_file} and {paths.ca_key_file} "
            "are missing",
            hint="copy tls/ca.pem and tls/ca-key.pem (mode 0600) from a node of the cluster "
            "into this node's data directory, with init.json",
        )
    else:
        ca_pem, ca_key_pem = make_tls_ca(days=TLS_DAYS, common_name="encfs-vault")
        made_ca = True
    try:
        cert_pem, key_pem = issue_tls_cert(
            ca_pem,
            ca_key_pem,
            dns_names=dns,
            ip_addresses=ips,
            days=TLS_DAYS,
            common_name="encfs-vault",
        )
    except ValueError as exc:
        raise errors.VaultConfigError(
            f"cannot issue a server certificate with the CA in {paths.tls_dir}: {exc}",
            hint="copy ca.pem and ca-key.pem from the same node of the cluster",
        ) from None
    paths.tls_dir.mkdir(mode=0o700, exist_ok=True)
    write_file_atomic(paths.key_file, key_pem, 0o600)
    write_file_atomic(paths.cert_file, cert_pem, 0o644)
    if made_ca:
        write_file_atomic(paths.ca_key_file, ca_key_pem, 0o600)
        write_file_atomic(paths.ca_file, ca_pem, 0o644)
    return made_ca


def _server_config(
    paths: ServePaths, host: str, port: int, cluster: tuple[str, int], node_id: str
) -> str:
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
# A standby forwards every request to the leader and never answers from its own replica:
# cut off from the leader it would go on saying yes to a host revoked meanwhile.
disable_standby_reads = true

storage "raft" {{
  path = {q(str(paths.raft_dir))}
  node_id = {q(node_id)}
  # the fastest timeouts: a single node is leader in ~1.5 s, a cluster elects in ~2-3 s
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


DEFAULT_NODE_ID = "encfs-vault"
_NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def start_serve(
    data_dir: Path,
    listen: str = process.DEFAULT_LISTEN,
    *,
    cluster_listen: str | None = None,
    node_id: str | None = None,
    join: str | None = None,
    log: TextIO | None = None,
    on_spawn: Callable[[subprocess.Popen[bytes]], None] | None = None,
    ready_timeout: float = 60.0,
) -> LocalServer:
    """Start a persistent OpenBao with Raft storage under ``data_dir``; returns once it is
    active or a standby of its cluster (or, without a stored unseal key, listening and
    sealed). The caller stops it.

    ``data_dir`` (created with mode 0700; refused if open to group or others) holds
    ``raft/`` (the data), ``tls/`` (``ca.pem`` 0644, ``server.pem``, ``server-key.pem``
    0600: a CA of our own whose private key is dropped after signing), ``bao.hcl`` (rewritten
    on every start) and ``init.json`` (0600). The API is TLS on ``listen``; Raft's cluster
    port is ``cluster_listen`` (default: the next port). ``node_id`` names the node in
    Raft (default ``encfs-vault``; each node of a cluster needs its own).

    First start (storage uninitialised): ``sys/init`` with one key share and threshold 1;
    the unseal key and the root token go to ``init.json`` before anything else happens.
    Every start: unseal with the stored key(s), wait until active, and (while the root token
    is still in ``init.json``) enable transit at ``transit/`` if it is missing.

    ``join`` (``https://HOST:PORT`` of a node of a cluster): on the first start the node
    joins that cluster instead of initialising (``sys/storage/raft/join``; ``init.json`` and
    ``tls/ca.pem`` + ``tls/ca-key.pem`` copied from a node must be there), then unseals
    with the cluster's key like any node; later starts ignore it (the node is a member).

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
    node_id = DEFAULT_NODE_ID if node_id is None else node_id
    if not _NODE_ID_RE.fullmatch(node_id):
        raise errors.VaultConfigError(
            f"node id {node_id!r} is not a plain name",
            hint="letters, digits, '.', '_' and '-', at most 64",
        )
    if join is not None:
        parts = urlsplit(join)
        if parts.scheme != "https" or not parts.hostname or parts.path.strip("/"):
            raise errors.VaultConfigError(
                f"--join {join!r} is not the address of a node: https://HOST:PORT",
                hint="the API address another `encfs vault serve` node printed when it started",
            )
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
    if join is not None and not paths.init_file.exists():
        raise errors.VaultConfigError(
            f"a joining node unseals with the cluster's key, but {paths.init_file} is missing",
            hint="copy init.json (mode 0600) and tls/ca.pem, tls/ca-key.pem from a node of the "
            "cluster into this node's data directory",
        )
    _ensure_tls(paths, host, joining=join is not None)
    paths.raft_dir.mkdir(mode=0o700, exist_ok=True)
    paths.home_dir.mkdir(mode=0o700, exist_ok=True)
    config = _server_config(paths, host, port, cluster, node_id)
    write_file_atomic(paths.config_file, config.encode(), 0o600)

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
            _bring_up(server, api, out, ready_timeout, join=join)
    except BaseException:
        server.stop()
        raise
    return server


def _bring_up(
    server: LocalServer,
    api: AdminClient,
    out: process.Output,
    ready_timeout: float,
    *,
    join: str | None,
) -> None:
    """Wait until ``server`` listens; on first start initialise it, or join the cluster at
    ``join``; unseal it with the stored key(s) (none: return, sealed); wait until it is
    active or a standby; enable transit while the root token is still in ``init.json`` (on
    the leader). Sets ``server``'s flags as it goes."""
    paths, proc, addr = server.paths, server.proc, server.addr
    status = process.wait_health(
        api, proc, out, want=(200, 429, 501, 503), timeout=ready_timeout, what="listening"
    )
    if status == 501 and join is not None:  # a new node of a cluster (later starts: a member)
        _join(api, paths, join)
        server.joined_now = True
        status = 503
    elif status == 501:  # storage empty: first start
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
            if server.joined_now and isinstance(answer, dict) and answer.get("progress") == 0:
                break  # key accepted: a joining node unseals once the leader answers its challenge
        else:
            raise errors.BaoServerError(
                f"vault {addr} is still sealed after the key(s) in {paths.init_file}",
                hint=f"{paths.init_file} does not hold this vault's unseal key(s); "
                "unseal by hand: bao operator unseal",
            )
    process.wait_health(
        api, proc, out, want=(200, 429), timeout=ready_timeout, what="active or standby"
    )
    server.unsealed = True
    server.standby = not _wait_for_leader(api, min(ready_timeout, LEADER_WAIT))
    root_token = _read_init(paths).get("root_token") if paths.init_file.exists() else None
    if isinstance(root_token, str) and root_token and not server.standby:
        # a root token revoked but left in the file: nothing to do
        with (
            contextlib.suppress(errors.VaultPermissionDenied),
            AdminClient(addr, root_token, ca_file=paths.ca_file) as root,
        ):
            server.transit_enabled_now = ensure_transit(root, DEFAULT_MOUNT)


LEADER_WAIT = 15.0
"""Seconds an unsealed node waits for its cluster to have a leader before it reports ready
anyway (the first node of a cluster restarting after all of them stopped has no one to
elect a leader with until the next one is back)."""


def _wait_for_leader(api: AdminClient, timeout: float) -> bool:
    """Wait until this node is active (True) or a standby of a cluster with a leader
    (False), at most ``timeout`` seconds (then False: a standby waiting for its peers). A
    single node is active about 1.5 s after it is unsealed."""
    deadline = time.monotonic() + timeout
    while True:
        if api.health() == 200:
            return True
        status, doc = api.request("GET", "/v1/sys/leader")
        known = status == 200 and isinstance(doc, dict) and doc.get("leader_address")
        if known and isinstance(doc, dict) and not doc.get("is_self"):
            return False  # another node leads
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _join(api: AdminClient, paths: ServePaths, leader: str) -> None:
    """Join the cluster of the node at ``leader`` (Raft join: the node is then sealed, and
    unseals with the cluster's key like the others). The leader's certificate is checked
    with our CA, which must be the cluster's."""
    answer = api.call(
        "POST",
        "/v1/sys/storage/raft/join",
        {"leader_api_addr": leader, "leader_ca_cert": paths.ca_file.read_text(encoding="ascii")},
        what=f"join the cluster at {leader}",
    )
    if not (isinstance(answer, dict) and answer.get("joined") is True):
        raise errors.BaoServerError(
            f"the node could not join the cluster at {leader}",
            hint="check that a node of the cluster answers there, and that init.json and "
            "tls/ca.pem, tls/ca-key.pem were copied from it",
        )


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
