"""A volume as a systemd service: the volume config file (``/etc/encfs/NAME.conf``, read into
``encfs mount`` arguments by ``mount --config``) and ``encfs systemd install``, which writes
it and the units (``encfs.service``)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from encfs import errors, volume
from encfs.cli.output import ExitCode
from encfs.vault import check_vault_setting

# KEY=VALUE settings of one volume (/etc/encfs/NAME.conf) -> `encfs mount` arguments.
CONFIG_KEYS: dict[str, str] = {
    "CIPHER_DIR": "",  # positional
    "MOUNTPOINT": "",  # positional
    "VAULT": "--vault",
    "OPTIONS": "-o",
    "TOKEN_FILE": "--token-file",
    "CA_FILE": "--ca-file",
    "CLIENT_CERT": "--client-cert",
    "CLIENT_KEY": "--client-key",
    "VAULT2": "--vault2",
    "TOKEN_FILE2": "--vault2-token-file",
    "CA_FILE2": "--vault2-ca-file",
    "CLIENT_CERT2": "--vault2-client-cert",
    "CLIENT_KEY2": "--vault2-client-key",
    "VAULT_TIMEOUT": "--vault-timeout",
    "KEY_RELEASE": "--key-release",
    "CHECK_INTERVAL": "--check-interval",
    "OFFLINE_GRACE": "--offline-grace",
    "ON_REVOKE": "--on-revoke",
    "SUSPENDED_ERRNO": "--suspended-errno",
    "AUDIT_LOG": "--audit-log",
    "LOG_FILE": "--log-file",
    "METRICS_FILE": "--metrics-file",
    "EPHEMERAL": "--ephemeral",
}


class ConfigError(Exception):
    """A volume config file is unreadable or invalid; the message names file and line."""


def read_config(path: Path) -> list[str]:
    """``encfs mount`` arguments from a volume config file (format in README, "Run it as a
    service"): ``KEY=VALUE`` lines, ``#`` comments, optional double quotes, the same file
    systemd can read as an ``EnvironmentFile=``. Raises ``ConfigError``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    values: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ConfigError(f"{path} line {lineno}: expected KEY=VALUE, got {raw.strip()!r}")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        if key not in CONFIG_KEYS:
            raise ConfigError(
                f"{path} line {lineno}: unknown key {key!r} (known: {', '.join(CONFIG_KEYS)})"
            )
        if key in values:
            raise ConfigError(f"{path} line {lineno}: {key} is set twice")
        values[key] = value
    for required in ("CIPHER_DIR", "MOUNTPOINT"):
        if not values.get(required):
            raise ConfigError(f"{path}: {required} is required")
    out = [values.pop("CIPHER_DIR"), values.pop("MOUNTPOINT")]
    ephemeral = values.pop("EPHEMERAL", "no").lower()
    if ephemeral in ("yes", "true", "1"):
        out.append("--ephemeral")
    elif ephemeral not in ("no", "false", "0", ""):
        raise ConfigError(f"{path}: EPHEMERAL must be yes or no, not {ephemeral!r}")
    for key, value in values.items():
        if value:
            out += [CONFIG_KEYS[key], value]
    return out


def expand_config(argv: list[str]) -> list[str]:
    """``mount --config FILE [more]`` -> ``mount <settings from FILE> [more]``."""
    argv = [
        part
        for arg in argv
        for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])
    ]
    if "--config" not in argv or "mount" not in argv:
        return argv
    i = argv.index("--config")
    if i + 1 >= len(argv):
        raise ConfigError("--config needs a file")
    m = argv.index("mount")
    rest = argv[:i] + argv[i + 2 :]
    settings = read_config(Path(argv[i + 1]))
    if "--vault" in settings and any(a == "--vault" or a.startswith("--vault=") for a in rest):
        # --vault adds a node to the list; on the command line it replaces VAULT= instead.
        i = settings.index("--vault")
        settings = settings[:i] + settings[i + 2 :]
    return rest[: m + 1] + settings + rest[m + 1 :]


def cmd_systemd(args: argparse.Namespace) -> ExitCode:
    from encfs import service

    settings: dict[str, str] = {
        "CIPHER_DIR": str(args.cipher_dir.absolute()),
        "MOUNTPOINT": str(args.mountpoint.absolute()),
    }
    if args.vault:
        settings["VAULT"] = " ".join(args.vault)
    if args.vault2:
        settings["VAULT2"] = args.vault2
    if args.ephemeral:
        settings["EPHEMERAL"] = "yes"
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep or key not in CONFIG_KEYS or key in ("CIPHER_DIR", "MOUNTPOINT"):
            print(
                f"encfs: error: --set {item!r}: expected KEY=VALUE with KEY one of "
                f"{', '.join(k for k in CONFIG_KEYS if k not in ('CIPHER_DIR', 'MOUNTPOINT'))}",
                file=sys.stderr,
            )
            return ExitCode.USAGE
        settings[key] = value
    if not settings.get("VAULT") and not args.ephemeral:
        hint = ""
        with contextlib.suppress(errors.EncfsError, OSError):
            named = volume.read_header(args.cipher_dir).header.vault_url
            hint = f" (the volume header names {named}; check that it is yours)"
        print(
            "encfs: error: encfs systemd install needs --vault URL: the service sends the "
            "host's token only to a vault pinned in its config (VAULT=), never to the URL "
            f"in the cipher dir{hint}",
            file=sys.stderr,
        )
        return ExitCode.VAULT_NOT_PINNED
    if args.ephemeral and (settings.get("VAULT2") or args.vault2_token_file):
        print(
            "encfs: error: an ephemeral volume is single-layer: VAULT2 (--vault2) and "
            "--vault2-token-file are for double-encrypted volumes (`encfs init --double`)",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    if not settings.get("VAULT2") and not args.ephemeral:
        header = None
        with contextlib.suppress(errors.EncfsError, OSError):
            header = volume.read_header(args.cipher_dir).header
        if header is not None and header.double:
            print(
                "encfs: error: the volume in "
                f"{args.cipher_dir} is double-encrypted: encfs systemd install needs "
                "--vault2 URL for its second vault (VAULT2=; key slot 1 names "
                f"{header.slots[1].vault_url}; check that it is yours) and its credential "
                "(--vault2-token-file, or --set CLIENT_CERT2=...)",
                file=sys.stderr,
            )
            return ExitCode.VAULT_NOT_PINNED
    for key in ("VAULT", "VAULT2"):
        if settings.get(key):
            check_vault_setting(settings[key])
    plan = service.ServicePlan(
        name=args.name,
        settings=settings,
        token_file=args.token_file,
        token2_file=args.vault2_token_file,
        etc_dir=args.etc_dir,
        unit_dir=args.unit_dir,
        enable=args.enable,
        start=args.start,
    )
    service.install(plan, dry_run=args.dry_run, say=print)
    if not args.dry_run:
        print(f"installed encfs@{args.name}.service; `systemctl status encfs@{args.name}`")
    return ExitCode.OK
