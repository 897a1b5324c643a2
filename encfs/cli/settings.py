"""Parsed arguments -> what the layers below take: vault access (``VaultSettings``), the audit
log (``AuditSettings``), and the vault URL a command may send the host's token to."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from encfs import volume
from encfs.audit import DEFAULT_AUDIT_LOG, AuditSettings, under_systemd
from encfs.vault import VaultSettings, VaultURL, env_ca_file, env_vault_addr, pin_vault_url

log = logging.getLogger("encfs")


def vault_settings(args: argparse.Namespace) -> VaultSettings:
    return VaultSettings(
        token_file=args.token_file,
        ca_file=args.ca_file if args.ca_file is not None else env_ca_file(),
        client_cert=args.client_cert,
        client_key=args.client_key,
        timeout=args.vault_timeout,
        key_release=args.key_release,
    )


def vault_setting(values: list[str] | None) -> str | None:
    """The host's vault setting from ``--vault`` given any number of times: one
    space-separated list (the syntax of ``VAULT=`` in a config file), None if not given."""
    return " ".join(values) if values else None


def pinned_url(args: argparse.Namespace, hf: volume.HeaderFile) -> VaultURL:
    """Where this command may send the host's credential (``vault.pin_vault_url``)."""
    pinned = pin_vault_url(
        hf.header.vault_url, configured=vault_setting(args.vault_url), addr=env_vault_addr()
    )
    if pinned.note:
        log.warning("%s", pinned.note)
    return pinned.url


def audit_settings(args: argparse.Namespace) -> AuditSettings:
    raw = args.audit_log if args.audit_log is not None else os.environ.get("ENCFS_AUDIT_LOG")
    if raw is None:
        path: Path | None = DEFAULT_AUDIT_LOG if os.geteuid() == 0 else None
    elif raw.lower() in ("none", ""):
        path = None
    else:
        path = Path(raw).absolute()
    return AuditSettings(path=path, journal=under_systemd())
