"""Provision a host on a vault: transit key, least-privilege policy, token role, host token.

``setup`` (``encfs vault setup``) works idempotently over the HTTP API with an admin token,
on the local OpenBao or any Vault / OpenBao: transit mount, a non-exportable
``aes256-gcm96`` key that may not be deleted, the host policy ``encfs-host-HOST`` (read the
key's status, datakey, decrypt, rewrap, renew and look up its own token, check its own
capabilities; nothing else), and a periodic, orphan host token written to a 0600 file.
Tokens are never printed, logged or returned. Failures raise ``encfs.errors`` types with
one-line messages that say what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from encfs import errors
from encfs.hostfiles import write_file_atomic
from encfs.vault.admin import AdminClient

__all__ = [
    "DEFAULT_MOUNT",
    "HOST_TOKEN_PERIOD",
    "KEY_TYPE",
    "SetupResult",
    "ensure_transit",
    "host_policy",
    "read_admin_token",
    "setup",
]

DEFAULT_MOUNT = "transit"
HOST_TOKEN_PERIOD = "24h"
KEY_TYPE = "aes256-gcm96"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def ensure_transit(api: AdminClient, mount: str) -> bool:
    """Enable the transit engine at ``mount`` unless something is mounted there; returns
    True if it was enabled now. A non-transit engine at ``mount`` raises."""
    status, doc = api.request("GET", f"/v1/sys/mounts/{mount}")
    if status == 200 and isinstance(doc, dict):
        data = doc.get("data", doc)
        kind = data.get("type") if isinstance(data, dict) else None
        if kind != "transit":
            raise errors.VaultConfigError(
                f"vault {api.addr} has a {kind!r} engine at {mount}/, not transit",
                hint="choose another --mount",
            )
        return False
    if status not in (400, 404):
        raise api.error(status, doc, "GET", f"/v1/sys/mounts/{mount}", "transit mount")
    api.call(
        "POST",
        f"/v1/sys/mounts/{mount}",
        {"type": "transit", "description": "encfs volume key-encryption keys"},
        what="enable transit",
    )
    return True


def _check_name(value: str, what: str) -> str:
    if not _NAME_RE.fullmatch(value) or ".." in value:
        raise errors.VaultConfigError(
            f"{what} {value!r} is not a plain name",
            hint="use letters, digits, '.', '_' and '-' (starting with a letter or digit)",
        )
    return value


def _check_mount(mount: str) -> str:
    parts = mount.strip("/").split("/")
    for part in parts:
        _check_name(part, "transit mount")
    return "/".join(parts)


def host_policy(key: str, mount: str = DEFAULT_MOUNT) -> str:
    """The policy ``setup`` gives a host for one key, in HCL: read the key's status,
    ``datakey/plaintext``, ``decrypt``, ``rewrap``; renew and look up its own token; ask for
    its own capabilities (the preflight). Nothing else."""
    key = _check_name(key, "key name")
    mount = _check_mount(mount)
    return (
        "# encfs host policy: one transit key, nothing else (written by encfs vault setup)\n"
        f'path "{mount}/keys/{key}" {{ capabilities = ["read"] }}\n'
        f'path "{mount}/datakey/plaintext/{key}" {{ capabilities = ["update"] }}\n'
        f'path "{mount}/decrypt/{key}" {{ capabilities = ["update"] }}\n'
        f'path "{mount}/rewrap/{key}" {{ capabilities = ["update"] }}\n'
        'path "auth/token/renew-self" { capabilities = ["update"] }\n'
        'path "auth/token/lookup-self" { capabilities = ["read"] }\n'
        'path "sys/capabilities-self" { capabilities = ["update"] }\n'
    )


_POLICY_KEY_RE = re.compile(r'path\s+"([^"]+)/keys/([^"/]+)"')


@dataclass(frozen=True)
class SetupResult:
    """What ``setup`` did. Holds no secret."""

    vault_url: str
    """The volume's vault URL: ``transit+https://HOST:PORT/MOUNT/KEY``."""
    key_created: bool
    transit_enabled: bool
    policy: str
    role: str
    token_file: Path
    accessor: str
    """Accessor of the new host token (safe to show; revoke with ``-accessor``)."""
    previous_accessor: str | None
    """Accessor of the token that was in ``token_file`` before, if it was still valid."""
    key_info: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def read_admin_token(token_file: Path | None = None) -> str:
    """The admin token: ``token_file`` (refused if group/world readable), else
    ``VAULT_TOKEN`` / ``BAO_TOKEN``. ``token_file`` may also be the ``init.json`` that
    ``serve`` wrote (a JSON object): its ``root_token`` is used. Raises
    ``VaultCredentialsError``; never shows the token."""
    hint = "pass --admin-token-file FILE (mode 0600) or set VAULT_TOKEN (or BAO_TOKEN)"
    if token_file is not None:
        try:
            st = token_file.stat()
            if st.st_mode & 0o077:
                raise errors.VaultCredentialsError(
                    f"admin token file {token_file} is readable by group or others (mode "
                    f"{st.st_mode & 0o777:o}); run: chmod 600 {token_file}",
                    hint=hint,
                )
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise errors.VaultCredentialsError(
                f"cannot read admin token file {token_file}: {exc.strerror}", hint=hint
            ) from None
        if token.startswith("{"):  # serve's init.json
            try:
                doc = json.loads(token)
            except ValueError:
                doc = None
            root = doc.get("root_token") if isinstance(doc, dict) else None
            if not isinstance(root, str):
                raise errors.VaultCredentialsError(
                    f"admin token file {token_file} is JSON without a root_token", hint=hint
                )
            token = root.strip()
        if not token:
            raise errors.VaultCredentialsError(f"admin token file {token_file} is empty", hint=hint)
        return token
    for var in ("VAULT_TOKEN", "BAO_TOKEN"):
        token = os.environ.get(var, "").strip()
        if token:
            return token
    raise errors.VaultCredentialsError("no admin token", hint=hint)


def _previous_accessor(api: AdminClient, token_out: Path) -> str | None:
    """Accessor of the still-valid token already in ``token_out``, if any (best effort)."""
    try:
        old = token_out.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not old:
        return None
    try:
        status, doc = api.request("POST", "/v1/auth/token/lookup", {"token": old})
    except errors.VaultError:
        return None
    data = doc.get("data") if status == 200 and isinstance(doc, dict) else None
    accessor = data.get("accessor") if isinstance(data, dict) else None
    return accessor if isinstance(accessor, str) else None


def setup(
    addr: str,
    admin_token: str,
    key: str,
    host: str,
    token_out: Path,
    ca_file: Path | None = None,
    mount: str = DEFAULT_MOUNT,
    *,
    timeout: float = 10.0,
) -> SetupResult:
    """Provision ``host`` for transit key ``key`` on the vault at ``addr`` with
    ``admin_token``; idempotent. Writes the host token to ``token_out`` (mode 0600, atomic
    replace); never prints or returns it.

    1. enable transit at ``mount`` if nothing is mounted there;
    2. create ``key`` (``aes256-gcm96``, not exportable) if missing; an existing key is kept
       (it must be a non-derived encryption key) and ``deletion_allowed`` is set to false;
    3. write policy ``encfs-host-HOST`` = ``host_policy(key, mount)``. If that policy
       already grants a *different* key this refuses (the host would lose that key): give
       each key its own host name;
    4. write token role ``encfs-host-HOST`` (orphan, periodic ``24h``, renewable, only that
       policy, no default policy) and create a token from it with display name
       ``encfs-HOST`` and metadata ``host=HOST``. Orphan: revoking the admin or root token
       that made it does not revoke it.

    Re-running keeps the key, rewrites the policy and role, and issues a fresh token; the
    previous one (``previous_accessor``) stays valid until it expires or is revoked.
    Raises ``VaultConfigError`` (bad names, wrong engine or key type, policy for another key),
    ``VaultPermissionDenied`` (admin token lacks rights) and the other ``VaultError`` types.
    """
    key = _check_name(key, "key name")
    host = _check_name(host, "host name")
    mount = _check_mount(mount)
    with AdminClient(addr, admin_token, ca_file=ca_file, timeout=timeout) as api:
        return _provision(api, key, host, mount, token_out.absolute())


def _provision(api: AdminClient, key: str, host: str, mount: str, token_out: Path) -> SetupResult:
    notes: list[str] = []

    transit_enabled = ensure_transit(api, mount)

    key_path = f"/v1/{mount}/keys/{key}"
    status, doc = api.request("GET", key_path)
    key_created = False
    if status == 404:
        api.call("POST", key_path, {"type": KEY_TYPE, "exportable": False}, what="create key")
        key_created = True
        status, doc = api.request("GET", key_path)
    if status != 200 or not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
        raise api.error(status, doc, "GET", key_path, "read key")
    info: dict[str, Any] = doc["data"]
    if info.get("derived") or info.get("supports_encryption") is False:
        raise errors.VaultConfigError(
            f"transit key {mount}/{key} exists but is a {info.get('type')!r} key"
            + (" with key derivation" if info.get("derived") else "")
            + ": encfs needs a plain encryption key",
            hint="choose another --key name",
        )
    if info.get("soft_deleted"):
        raise errors.VaultKeyDisabled(
            f"transit key {mount}/{key} is soft-deleted: hosts cannot use it; restore it first "
            f"(POST {mount}/keys/{key}/soft-delete-restore) or choose another --key name"
        )
    if info.get("exportable"):
        notes.append(
            f"key {mount}/{key} is exportable (a vault cannot undo that); the host policy "
            "does not grant export"
        )
    if info.get("deletion_allowed") is not False:
        api.call("POST", f"{key_path}/config", {"deletion_allowed": False}, what="key config")
        status, doc = api.request("GET", key_path)
        if status == 200 and isinstance(doc, dict) and isinstance(doc.get("data"), dict):
            info = doc["data"]
    if info.get("deletion_allowed") is not False:
        raise errors.VaultProtocolError(
            f"vault {api.addr} did not set deletion_allowed=false on {mount}/{key}"
        )

    policy = f"encfs-host-{host}"
    policy_path = f"/v1/sys/policies/acl/{policy}"
    hcl = host_policy(key, mount)
    status, doc = api.request("GET", policy_path)
    if status == 200 and isinstance(doc, dict):
        data = doc.get("data") if isinstance(doc.get("data"), dict) else doc
        old = data.get("policy", "") if isinstance(data, dict) else ""
        granted = set(_POLICY_KEY_RE.findall(old)) if isinstance(old, str) else set()
        if granted and granted != {(mount, key)}:
            others = ", ".join(sorted(f"{m}/{k}" for m, k in granted))
            raise errors.VaultConfigError(
                f"policy {policy} already grants key {others}: host {host!r} would lose it",
                hint=f"give this key its own host name (e.g. --host {host}-{key}), or remove "
                f"the old grant first: bao policy delete {policy}",
            )
    elif status not in (404,):
        raise api.error(status, doc, "GET", policy_path, "read policy")
    api.call("PUT", policy_path, {"policy": hcl}, what="write policy")

    role = f"encfs-host-{host}"
    api.call(
        "POST",
        f"/v1/auth/token/roles/{role}",
        {
            "allowed_policies": [policy],
            "orphan": True,
            "renewable": True,
            "token_period": HOST_TOKEN_PERIOD,
            "token_no_default_policy": True,
            "token_type": "service",
        },
        what="write token role",
    )
    previous = _previous_accessor(api, token_out)
    doc = api.call(
        "POST",
        f"/v1/auth/token/create/{role}",
        {
            # policies, period, renewable, orphan and no default policy come from the role:
            # asking for them here would need sudo for a non-root admin token
            "display_name": f"encfs-{host}",
            "meta": {"host": host},
        },
        what="create host token",
    )
    auth = doc.get("auth") if isinstance(doc, dict) else None
    token = auth.get("client_token") if isinstance(auth, dict) else None
    accessor = auth.get("accessor") if isinstance(auth, dict) else None
    if not isinstance(token, str) or not token or not isinstance(accessor, str):
        raise errors.VaultProtocolError(f"vault {api.addr} created a token but did not return it")
    got = sorted(auth.get("policies") or []) if isinstance(auth, dict) else []
    if got != [policy]:
        _revoke_accessor(api, accessor)
        raise errors.VaultProtocolError(
            f"vault {api.addr} issued a token with policies {got}, expected only {policy}; "
            "it was revoked"
        )
    try:
        write_file_atomic(token_out, (token + "\n").encode(), 0o600)
    except OSError as exc:
        _revoke_accessor(api, accessor)
        raise errors.VaultCredentialsError(
            f"cannot write token file {token_out}: {exc.strerror}; the new token was revoked",
            hint="check that the directory exists and is writable",
        ) from None
    del token

    base = urlsplit(api.addr)
    scheme = "transit+https" if base.scheme == "https" else "transit+http"
    return SetupResult(
        vault_url=f"{scheme}://{base.netloc}/{mount}/{key}",
        key_created=key_created,
        transit_enabled=transit_enabled,
        policy=policy,
        role=role,
        token_file=token_out,
        accessor=accessor,
        previous_accessor=previous if previous != accessor else None,
        key_info={
            k: info.get(k)
            for k in (
                "type",
                "latest_version",
                "min_decryption_version",
                "exportable",
                "deletion_allowed",
            )
        },
        notes=tuple(notes),
    )


def _revoke_accessor(api: AdminClient, accessor: str) -> None:
    with contextlib.suppress(errors.VaultError):
        api.call("POST", "/v1/auth/token/revoke-accessor", {"accessor": accessor})
