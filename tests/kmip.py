"""Test harness: a real PyKMIP server on loopback with mutual TLS, administered with PyKMIP's
own client the way an operator would.

    with PyKMIPServer() as kmip:
        uid = kmip.create_key()                 # AES-256, Encrypt|Decrypt, Active
        url = kmip.url_for(uid)                 # kmip://127.0.0.1:PORT/UID
        settings = kmip.settings()              # VaultSettings with CA, client cert and key
        kmip.revoke(uid)                        # Active -> Deactivated

Certificates are made here with ``cryptography`` (ECDSA P-256, so the TLS 1.2 suite is
``ECDHE-ECDSA-AES256-GCM-SHA384``): a CA, a server certificate for ``127.0.0.1`` and
``localhost`` (serverAuth), the host's client certificate (clientAuth, CN ``encfs-host``),
a second client of the same CA (CN ``other-host``: the server denies it keys it does not own),
and a foreign CA with its own client certificate (``wrong_*``) for negative tests.

No ``pykmip-server`` process outlives its harness: the server runs in its own session and
``stop()`` kills the whole process group (SIGTERM, then SIGKILL after a bound) because the
server's children survive a plain kill of the parent; ``stop()`` runs on ``__exit__``, at
interpreter exit for any instance still running, and the kernel sends SIGTERM to the server
if the Python process that started it dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from encfs.vault import VaultSettings
from tests.harness import kill_process_group
from tests.openbao import _die_with_parent, free_port

_running: weakref.WeakSet[PyKMIPServer] = weakref.WeakSet()

HOST_CN = "encfs-host"
OTHER_CN = "other-host"
CIPHER_SUITES = (
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
)


def _pykmip_server_binary() -> str:
    beside = Path(sys.executable).with_name("pykmip-server")
    if beside.exists():
        return str(beside)
    found = shutil.which("pykmip-server")
    if found is None:
        raise RuntimeError("pykmip-server not found: pip install pykmip==0.11.0")
    return found


class _Issuer:
    """A throw-away CA that issues ECDSA P-256 certificates valid for one day."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self, common_name: str, *, server: bool
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.DNSName("localhost"),
                    ]
                ),
                critical=False,
            )
        return builder.sign(self.key, hashes.SHA256()), key


def _write_pem(path: Path, *items: x509.Certificate | ec.EllipticCurvePrivateKey) -> Path:
    data = b""
    for item in items:
        if isinstance(item, x509.Certificate):
            data += item.public_bytes(serialization.Encoding.PEM)
        else:
            data += item.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
    path.write_bytes(data)
    path.chmod(0o600)
    return path


class PyKMIPServer:
    """``pykmip-server`` on 127.0.0.1 with TLS 1.2, ECDHE suites and client certificates.

    Attributes: ``port``, ``ca_file``, ``client_cert``, ``client_key`` (identity
    ``encfs-host``, which owns every key the helpers create), ``other_cert`` /
    ``other_key`` (same CA, identity ``other-host``), ``wrong_ca_file``,
    ``wrong_client_cert`` / ``wrong_client_key`` (a foreign CA), ``log_path``.
    """

    def __init__(self, *, ready_timeout: float = 30.0) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="encfs-kmip-"))
        self.log_path = self.workdir / "server.log"  # the server's own log file
        self.out_path = self.workdir / "server.out"  # its stdout / stderr
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopped = False
        self._out: Any = None
        self._admin: Any = None
        _running.add(self)
        try:
            self._make_certs()
            for attempt in range(3):  # a port picked free may be taken before the server binds
                self.port = free_port()
                self._spawn()
                try:
                    self._wait_ready(ready_timeout)
                    break
                except _ExitedEarly:
                    if attempt == 2 or "address already in use" not in self.log().lower():
                        raise
        except BaseException:
            self.stop()
            raise

    # --- certificates ---------------------------------------------------------------------------

    def _make_certs(self) -> None:
        d = self.workdir / "pki"
        d.mkdir()
        ca = _Issuer("encfs test KMIP CA")
        wrong = _Issuer("encfs test foreign CA")
        self.ca_file = _write_pem(d / "ca.pem", ca.cert)
        server_cert, server_key = ca.issue("127.0.0.1", server=True)
        self.server_cert = _write_pem(d / "server.pem", server_cert)
        self.server_key = _write_pem(d / "server.key", server_key)
        cert, key = ca.issue(HOST_CN, server=False)
        self.client_cert = _write_pem(d / "client.pem", cert)
        self.client_key = _write_pem(d / "client.key", key)
        self.client_combined = _write_pem(d / "client-combined.pem", cert, key)
        cert, key = ca.issue(OTHER_CN, server=False)
        self.other_cert = _write_pem(d / "other.pem", cert)
        self.other_key = _write_pem(d / "other.key", key)
        self.wrong_ca_file = _write_pem(d / "wrong-ca.pem", wrong.cert)
        cert, key = wrong.issue(HOST_CN, server=False)
        self.wrong_client_cert = _write_pem(d / "wrong-client.pem", cert)
        self.wrong_client_key = _write_pem(d / "wrong-client.key", key)

    def settings(self, **overrides: Any) -> VaultSettings:
        """``VaultSettings`` for the host identity (``ca_file``, ``client_cert``,
        ``client_key``, ``timeout=5``), with ``overrides`` applied."""
        kw: dict[str, Any] = {
            "ca_file": self.ca_file,
            "client_cert": self.client_cert,
            "client_key": self.client_key,
            "timeout": 5.0,
        }
        kw.update(overrides)
        return VaultSettings(**kw)

    # --- process ------------------------------------------------------------------------------

    def _spawn(self) -> None:
        policies = self.workdir / "policies"
        policies.mkdir(exist_ok=True)
        db = self.workdir / f"pykmip-{self.port}.db"
        config = self.workdir / "server.conf"
        suites = "\n    ".join(CIPHER_SUITES)
        config.write_text(
            "[server]\n"
            "hostname=127.0.0.1\n"
            f"port={self.port}\n"
            f"certificate_path={self.server_cert}\n"
            f"key_path={self.server_key}\n"
            f"ca_path={self.ca_file}\n"
            "auth_suite=TLS1.2\n"
            f"policy_path={policies}\n"
            "enable_tls_client_auth=True\n"
            f"tls_cipher_suites=\n    {suites}\n"
            "logging_level=INFO\n"
            f"database_path={db}\n"
        )
        if self._out is not None:
            self._out.close()
        self._out = open(self.out_path, "ab")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYKMIP")}
        env["HOME"] = str(self.workdir)  # no ~/.pykmip of the developer's
        self.proc = subprocess.Popen(
            [_pykmip_server_binary(), "-f", str(config), "-l", str(self.log_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def _client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx

    def _wait_ready(self, timeout: float) -> None:
        """Until a TLS handshake with the host certificate succeeds, at most ``timeout``."""
        assert self.proc is not None
        ctx = self._client_context()
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise _ExitedEarly(
                    f"pykmip-server exited with {self.proc.returncode}:\n{self.log()}"
                )
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw,
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1"),
                ):
                    return
            except (OSError, ssl.SSLError) as exc:
                last = str(exc)
            time.sleep(0.05)
        raise RuntimeError(
            f"pykmip-server not accepting TLS on 127.0.0.1:{self.port} within {timeout} s "
            f"(last error: {last}):\n{self.log()}"
        )

    def _kill(self, timeout: float) -> None:
        """SIGTERM the process group, SIGKILL it after ``timeout`` (its children survive
        the leader otherwise), and reap the leader."""
        if self.proc is not None:
            kill_process_group(self.proc, timeout)

    def restart(self, ready_timeout: float = 30.0) -> None:
        """Kill the server and start it again on the same port and database: keys survive,
        open client connections do not."""
        self._close_admin()
        self._kill(timeout=0.5)
        self._spawn()
        self._wait_ready(ready_timeout)

    def log(self, tail: int = 4000) -> str:
        """The end of the server's output and log file (for failure messages)."""
        parts = []
        for path in (self.out_path, self.log_path):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace")[-tail:])
        return "\n".join(parts)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 1.0) -> None:
        """SIGTERM the server's process group, SIGKILL after ``timeout``; remove temp files.
        Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._close_admin()
        self._kill(timeout)
        if self._out is not None:
            self._out.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
        _running.discard(self)

    def __enter__(self) -> PyKMIPServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- addresses ------------------------------------------------------------------------------

    def url_for(self, uid: str) -> str:
        """The encfs vault URL of key ``uid``: ``kmip://127.0.0.1:PORT/UID``."""
        return f"kmip://127.0.0.1:{self.port}/{uid}"

    # --- keys (as the operator, with PyKMIP's ProxyKmipClient and the host identity) -----------

    def _admin_client(self) -> Any:
        if self._admin is None:
            with warnings.catch_warnings():  # SQLAlchemy 2 MovedIn20Warning at import
                warnings.simplefilter("ignore", DeprecationWarning)
                from kmip.pie.client import ProxyKmipClient

            conf = self.workdir / "client.conf"  # empty: no ~/.pykmip or /etc/pykmip lookups
            conf.touch()
            client = ProxyKmipClient(
                hostname="127.0.0.1",
                port=self.port,
                cert=str(self.client_cert),
                key=str(self.client_key),
                ca=str(self.ca_file),
                config_file=str(conf),
            )
            with warnings.catch_warnings():  # it asks for ssl.PROTOCOL_TLS, deprecated
                warnings.simplefilter("ignore", DeprecationWarning)
                client.open()
            self._admin = client
        return self._admin

    def _close_admin(self) -> None:
        if self._admin is not None:
            with contextlib.suppress(Exception):
                self._admin.close()
            self._admin = None

    def _admin_call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the admin client; once more on a fresh connection if the server dropped
        the kept one (``restart``)."""
        for attempt in range(2):
            try:
                return getattr(self._admin_client(), name)(*args, **kwargs)
            except (OSError, EOFError, ssl.SSLError):
                self._close_admin()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def create_key(self, length: int = 256, *, activate: bool = True) -> str:
        """A new AES key with usage mask Encrypt|Decrypt; Active unless ``activate=False``.
        Returns its unique identifier."""
        enums = _kmip_enums()
        uid: str = self._admin_call(
            "create",
            enums.CryptographicAlgorithm.AES,
            length,
            cryptographic_usage_mask=[
                enums.CryptographicUsageMask.ENCRYPT,
                enums.CryptographicUsageMask.DECRYPT,
            ],
        )
        if activate:
            self._admin_call("activate", uid)
        return uid

    def revoke(self, uid: str, *, compromised: bool = False) -> None:
        """Revoke ``uid``: state Deactivated (or Compromised with ``compromised=True``)."""
        enums = _kmip_enums()
        reason = (
            enums.RevocationReasonCode.KEY_COMPROMISE
            if compromised
            else enums.RevocationReasonCode.CESSATION_OF_OPERATION
        )
        if compromised:
            self._admin_call(
                "revoke",
                reason,
                uid,
                compromise_occurrence_date=int(time.time()),
            )
        else:
            self._admin_call("revoke", reason, uid)

    def destroy(self, uid: str) -> None:
        """Destroy ``uid`` (PyKMIP deletes it; it must not be Active: ``revoke`` first)."""
        self._admin_call("destroy", uid)

    def state(self, uid: str) -> str:
        """The key's State attribute as the operator sees it, e.g. ``ACTIVE``."""
        attrs = self._admin_call("get_attributes", uid, ["State"])[1]
        return str(attrs[0].attribute_value.value.name)


def _kmip_enums() -> Any:
    with warnings.catch_warnings():  # `import kmip` warns: SQLAlchemy 2 MovedIn20Warning
        warnings.simplefilter("ignore", DeprecationWarning)
        from kmip.core import enums
    return enums


class _ExitedEarly(RuntimeError):
    pass


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        server.stop()
