"""Parsed arguments -> what the layers below take: vault access (``VaultSettings``, one per
vault), the audit log (``AuditSettings``), and the vault URL(s) a command may send the
host's credentials to."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from encfs import volume
from encfs.audit import DEFAULT_AUDIT_LOG, AuditSettings, under_systemd
from encfs.vault import (
    KeyWrapper,
    VaultSettings,
    VaultURL,
    connect,
    env_ca_file,
    env_vault_addr,
    pin_vault_url,
    second_vault_settings,
)

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


def vault2_settings(args: argparse.Namespace) -> VaultSettings:
    """Access to the second vault of a double-encrypted volume (``--vault2-*``)."""
    return second_vault_settings(
        vault_settings(args),
        token_file=args.vault2_token_file,
        ca_file=args.vault2_ca_file,
        client_cert=args.vault2_client_cert,
        client_key=args.vault2_client_key,
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


def connect_vaults(args: argparse.Namespace, hf: volume.HeaderFile) -> list[KeyWrapper]:
    """A client for the vault of each volume key of ``hf`` (key slot order), each pinned on
    the host (``--vault``; ``--vault2`` for key slot 1 of a double volume, else
    ``VaultNotPinned``) with its own credential. The caller closes them."""
    urls = [pinned_url(args, hf)]
    if hf.header.double:
        pinned = pin_vault_url(
            hf.header.slots[1].vault_url, configured=args.vault2_url, addr=None, slot=1
        )
        if pinned.note:
            log.warning("KEK 2: %s", pinned.note)
        urls.append(pinned.url)
    elif args.vault2_url:
        log.warning("%s is not double-encrypted: --vault2 is not used", args.cipher_dir)
    vaults: list[KeyWrapper] = []
    try:
        for url, settings in zip(urls, (vault_settings(args), vault2_settings(args)), strict=False):
            vaults.append(connect(url, settings))
    except BaseException:
        for vault in vaults:
            vault.close()
        raise
    return vaults


def audit_settings(args: argparse.Namespace) -> AuditSettings:
    raw = args.audit_log if args.audit_log is not None else os.environ.get("ENCFS_AUDIT_LOG")
    if raw is None:
        path: Path | None = DEFAULT_AUDIT_LOG if os.geteuid() == 0 else None
    elif raw.lower() in ("none", ""):
        path = None
    else:
        path = Path(raw).absolute()
    return AuditSettings(path=path, journal=under_systemd())
