"""The ``encfs`` command line: argv, exit codes and logging set-up live here and nowhere else."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import errno
import json
import logging
import logging.handlers
import os
import select
import subprocess
import sys
import time
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from encfs import __version__, backing, errors, pins, volume
from encfs import format as fmt
from encfs.audit import DEFAULT_AUDIT_LOG, AuditLog, AuditSettings, under_systemd
from encfs.keys import VolumeKeys
from encfs.vault import (
    VaultSettings,
    connect,
    env_ca_file,
    env_vault_addr,
    parse_vault_url,
    pin_vault_url,
    redact_tokens,
)
from encfs.watcher import WatchSettings

if typing.TYPE_CHECKING:
    from encfs.bao.process import BaoExit

log = logging.getLogger("encfs")


class ExitCode(enum.IntEnum):
    """Process exit codes; README.md's table mirrors this enum."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    NO_VOLUME = 3
    BAD_VOLUME = 4
    HEADER_AUTH = 5
    VOLUME_EXISTS = 6
    UNSAFE_CIPHER_DIR = 7
    VOLUME_MISMATCH = 8
    VAULT_NOT_PINNED = 9
    VAULT_CONFIG = 10
    VAULT_CREDENTIALS = 11
    VAULT_DENIED = 12
    VAULT_KEY_NOT_FOUND = 13
    VAULT_KEY_DISABLED = 14
    VAULT_KEY_RETIRED = 15
    VAULT_SEALED = 16
    VAULT_UNREACHABLE = 17
    VAULT_TLS = 18
    VAULT_PROTOCOL = 19
    MOUNT_FAILED = 20
    NOT_MOUNTED = 21
    BUSY = 22
    REVOKED = 23
    VOLUME_IN_USE = 24
    CORRUPT = 30


_ERROR_CODES: tuple[tuple[type[errors.EncfsError], ExitCode], ...] = (
    (errors.VolumeNotFound, ExitCode.NO_VOLUME),
    (errors.HeaderAuthError, ExitCode.HEADER_AUTH),
    (errors.FormatError, ExitCode.BAD_VOLUME),
    (errors.WrappedKeyRejected, ExitCode.BAD_VOLUME),
    (errors.VolumeExists, ExitCode.VOLUME_EXISTS),
    (errors.UnsafeCipherDir, ExitCode.UNSAFE_CIPHER_DIR),
    (errors.VolumeMismatch, ExitCode.VOLUME_MISMATCH),
    (errors.VaultNotPinned, ExitCode.VAULT_NOT_PINNED),
    (errors.VaultConfigError, ExitCode.VAULT_CONFIG),
    (errors.VaultCredentialsError, ExitCode.VAULT_CREDENTIALS),
    (errors.VaultPermissionDenied, ExitCode.VAULT_DENIED),
    (errors.VaultKeyNotFound, ExitCode.VAULT_KEY_NOT_FOUND),
    (errors.VaultKeyDisabled, ExitCode.VAULT_KEY_DISABLED),
    (errors.VaultKeyVersionRetired, ExitCode.VAULT_KEY_RETIRED),
    (errors.VaultSealed, ExitCode.VAULT_SEALED),
    (errors.VaultUnreachable, ExitCode.VAULT_UNREACHABLE),
    (errors.VaultTLSError, ExitCode.VAULT_TLS),
    (errors.VaultProtocolError, ExitCode.VAULT_PROTOCOL),
    (errors.MountError, ExitCode.MOUNT_FAILED),
    (errors.VolumeRevoked, ExitCode.REVOKED),
    (errors.VolumeBusy, ExitCode.VOLUME_IN_USE),
)


def exit_code_for(exc: BaseException) -> ExitCode:
    for kind, code in _ERROR_CODES:
        if isinstance(exc, kind):
            return code
    return ExitCode.FAILURE


DESCRIPTION = """\
encfs keeps a directory of ciphertext (the cipher dir) and presents it, decrypted, as a FUSE
mount. The volume key is wrapped by a key-encryption key in a vault (OpenBao or HashiCorp
Vault transit, or a KMIP key manager); encfs asks the vault to unwrap it at mount time,
checks every few seconds that it still may, suspends the mount (keys wiped, cached
plaintext dropped) when the vault withdraws access, resumes by itself when access comes
back, and wipes every key when it unmounts. encfs is unrelated to, and not compatible
with, the legacy EncFS.
"""

EPILOG = (
    """\
vault token (the host's identity), first found wins:
  --token-file FILE (mode 0600), $CREDENTIALS_DIRECTORY/vault-token (systemd
  LoadCredential=), $VAULT_TOKEN, $BAO_TOKEN. Never on the command line.

vault address (where the token may go), first found wins:
  --vault URL|https://HOST:PORT (or VAULT= in the config file), $VAULT_ADDR, $BAO_ADDR
  (CA: --ca-file, $VAULT_CACERT, $BAO_CACERT). Never the URL in the volume header alone.

volume pins: init and the first mount remember each cipher dir's volume (id and a key
  check value) in /var/lib/encfs/pins ($ENCFS_PIN_DIR); another volume there is refused
  (exit 8) until `encfs mount --repin` or `encfs pin reset CIPHERDIR`.

exit codes:
"""
    + "\n".join(f"  {code.value:3d}  {code.name.lower().replace('_', '-')}" for code in ExitCode)
    + """

examples:
  encfs init /srv/cipher --vault transit+https://vault.example:8200/transit/host-key \\
      --token-file /etc/encfs/host.token
  encfs mount /srv/cipher /srv/data --token-file /etc/encfs/host.token \\
      --vault transit+https://vault.example:8200/transit/host-key
  encfs status /srv/data
  VAULT_ADDR=https://vault.example:8200 encfs rotate /srv/cipher \\
      --token-file /etc/encfs/host.token
  encfs unmount /srv/data
  encfs header backup /srv/cipher /root/cipher-header.backup   # keep it off that disk
  encfs systemd install data --cipher-dir /srv/cipher --mountpoint /srv/data \\
      --vault transit+https://vault.example:8200/transit/host-key \\
      --token-file /etc/encfs/host.token --start
  encfs mount --ephemeral /var/scratch-cipher /scratch
  encfs vault dev          # a throw-away OpenBao for trying it out
"""
)


class _Parser(argparse.ArgumentParser):
    """``ArgumentParser`` that takes no abbreviations (``--tok`` is not ``--token-file``:
    a token typed there would be read as a path and echoed) and keeps anything that looks
    like a vault token out of its error messages. Subparsers inherit both."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        super().error(redact_tokens(message))


def _default(settings: type[Any], name: str) -> Any:
    """The default of field ``name`` of the settings dataclass ``settings``: defaults are
    written once, there, and argparse applies and shows that one."""
    for f in dataclasses.fields(settings):
        if f.name == name and f.default is not dataclasses.MISSING:
            return f.default
    raise LookupError(f"{settings.__name__}.{name} has no plain default")


def _abs_path(text: str) -> Path:
    """A path option, made absolute when parsed: the daemon's working directory may change
    (and a background daemon re-reads its token file long after the shell is gone)."""
    return Path(text).absolute()


def _vault_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vault access")
    g.add_argument(
        "--token-file",
        type=_abs_path,
        metavar="FILE",
        help="file holding the host's vault token (must not be group/world readable)",
    )
    g.add_argument(
        "--ca-file",
        type=_abs_path,
        metavar="FILE",
        help="CA bundle to verify the vault's TLS certificate (default: system CAs)",
    )
    g.add_argument(
        "--client-cert",
        type=_abs_path,
        metavar="FILE",
        help="PEM client certificate for mutual TLS (required for kmip://, optional for "
        "transit+https://)",
    )
    g.add_argument(
        "--client-key",
        type=_abs_path,
        metavar="FILE",
        help="PEM private key of --client-cert (default: inside the certificate file)",
    )
    g.add_argument(
        "--vault-timeout",
        type=float,
        default=_default(VaultSettings, "timeout"),
        metavar="SECONDS",
        help="bound on each vault request, and on retrying a vault that is unreachable or "
        "sealed at mount (default: %(default)s)",
    )
    g.add_argument(
        "--key-release",
        choices=("unwrap", "export"),
        default=_default(VaultSettings, "key_release"),
        help="unwrap: the vault unwraps the volume key and the KEK never leaves it. "
        "export: fetch the KEK (transit key marked exportable; the host policy needs read "
        "on MOUNT/export/encryption-key/KEY), unwrap here, wipe the KEK at once "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--audit-log",
        metavar="FILE",
        default=None,
        help=f"append audit events (JSON lines) here (default: $ENCFS_AUDIT_LOG, else "
        f"{DEFAULT_AUDIT_LOG} when run as root, none otherwise; 'none' disables). Under "
        "systemd they also go to the journal",
    )


def _vault_override_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--vault",
        dest="vault_url",
        metavar="URL",
        help="the vault to use: a full vault URL (it wins over the one in the volume "
        "header) or an address https://HOST:PORT (the header's mount and key on it). "
        "Default: $VAULT_ADDR / $BAO_ADDR. The header's URL alone is never used: it is not "
        "authenticated before the key is unwrapped, so the host's token would go wherever "
        "an edited header points (exit 9, vault-not-pinned)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="encfs",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"encfs {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "init",
        help="create a new volume in an empty cipher dir",
        description="Create a volume: ask the vault for a fresh volume key (transit datakey), "
        "store only its wrapped form in CIPHERDIR/encfs.volume and wipe the plaintext copy.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "cipher_dir",
        type=_abs_path,
        metavar="CIPHERDIR",
        help="directory for the ciphertext (created if missing; must be empty)",
    )
    p.add_argument(
        "--vault",
        required=True,
        metavar="URL",
        help="transit+https://HOST:PORT/MOUNT/KEY (transit+http only to loopback)",
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=fmt.DEFAULT_BLOCK_SIZE,
        metavar="BYTES",
        help="plaintext bytes per encrypted block, 4096..65536 in steps of 4096 "
        "(default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _vault_args(p)

    p = sub.add_parser(
        "mount",
        help="unlock a volume with the vault and mount it",
        description="Unwrap the volume key with the vault and mount the plaintext view. "
        "Returns once the mount is live and leaves the daemon running in the background, "
        "unless --foreground is given (use that under systemd). If the vault refuses or "
        "cannot be reached, nothing is mounted and the exit code says why.",
    )
    p.add_argument("cipher_dir", type=_abs_path, metavar="CIPHERDIR")
    p.add_argument("mountpoint", type=_abs_path, metavar="MOUNTPOINT")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="read CIPHERDIR, MOUNTPOINT and options from a volume config file "
        "(/etc/encfs/NAME.conf: KEY=VALUE lines, see README); later options override it",
    )
    p.add_argument(
        "--ephemeral",
        action="store_true",
        help="crypto-erased scratch volume: a fresh random key made now, held only in "
        "locked memory, never written or sent anywhere. Unmount, crash or reboot make the "
        "data unreadable for good; the next --ephemeral mount removes the old ciphertext "
        "and starts empty. With --vault, the mount also watches the host's access to that "
        "key and erases itself (unmounts) when it is revoked",
    )
    p.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="stay attached; log to stderr; exit when unmounted",
    )
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[,OPT...]",
        help="mount options: allow_other (let other users in; root only; implies "
        "default_permissions), default_permissions (the kernel checks modes and owners), "
        "nonempty (mount over a mount point that holds entries, hiding them; refused "
        "otherwise), ro (read-only), writeback_cache (the kernel gathers small writes; "
        "faster, but a file's other hard-link names then show a stale size until they are "
        "reopened)",
    )
    _vault_override_arg(p)
    p.add_argument(
        "--repin",
        action="store_true",
        help="accept the volume now in CIPHERDIR even if it is not the one this host pinned "
        "there (a restored or re-created volume), and pin it instead. Without it a "
        "different volume id or volume key is refused (exit 8, volume-mismatch)",
    )
    p.add_argument(
        "--log-file",
        type=_abs_path,
        metavar="FILE",
        help="where the background daemon logs (default: syslog if available)",
    )
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    g = p.add_argument_group("key lifecycle while mounted")
    g.add_argument(
        "--check-interval",
        type=_positive_float,
        default=_default(WatchSettings, "check_interval"),
        metavar="SECONDS",
        help="how often the daemon asks the vault to unwrap the volume key; a refusal "
        "(revoked token, narrowed policy, deleted or retired key) suspends the volume: keys "
        "wiped, every operation and every cached page refused (default: %(default)s)",
    )
    g.add_argument(
        "--offline-grace",
        type=_non_negative_float,
        default=_default(WatchSettings, "offline_grace"),
        metavar="SECONDS",
        help="keep serving this long while the vault cannot be reached or is sealed, then "
        "suspend; 0 fails closed at once (default: %(default)s)",
    )
    g.add_argument(
        "--on-revoke",
        choices=("suspend", "unmount"),
        default=_default(WatchSettings, "on_revoke"),
        help="suspend: keep the mount, refuse everything, resume by itself when access "
        "comes back. unmount: unmount and exit with code 23, revoked (default: %(default)s)",
    )
    g.add_argument(
        "--suspended-errno",
        type=_errno_name,
        metavar="NAME",
        help="error returned while suspended (default: EACCES; e.g. EIO, EPERM)",
    )
    _vault_args(p)

    p = sub.add_parser(
        "unmount",
        aliases=["umount"],
        help="unmount; the daemon wipes its keys and exits",
        description="Unmount MOUNTPOINT (fusermount3 -u) and wait for the daemon to wipe its "
        "keys and exit.",
    )
    p.add_argument("mountpoint", type=_abs_path, metavar="MOUNTPOINT")
    p.add_argument(
        "-z", "--lazy", action="store_true", help="detach now even if files are open (lazy unmount)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the daemon to exit (default: %(default)s)",
    )

    p = sub.add_parser(
        "info",
        help="print the volume header (no secrets)",
        description="Print the volume header. Needs no vault: the wrapped key is safe to show. "
        "The header's tag is checked only by mount and fsck, which unwrap the key.",
    )
    p.add_argument("cipher_dir", type=_abs_path, metavar="CIPHERDIR")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser(
        "fsck",
        help="authenticate every name and block of a volume",
        description="Unwrap the key, then decrypt and authenticate every directory id, name, "
        "file header, block, symlink and xattr. Lists each problem with its path and block. "
        "Exit 0 when clean, 30 (corrupt) when anything failed. Read-only unless --repair. "
        "Run it on an unmounted volume: on a mounted one it warns that concurrent writes may "
        "show as problems. With --repair (refused while the volume is mounted: exit 24), "
        "every file with bad blocks is made readable again, losing only those blocks: a run "
        "of bad blocks at a file's end (a write torn by a crash or a killed daemon) is cut "
        "off, a bad block before good ones is zeroed (it then reads as zeros); each repair "
        "names the plaintext byte range it lost. Names, directory ids, file headers, "
        "symlinks and xattrs that fail are reported, never changed. Exit 0 when everything "
        "found was repaired.",
    )
    p.add_argument("cipher_dir", type=_abs_path, metavar="CIPHERDIR")
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per problem, then one with kind 'summary'",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="cut torn tails and zero bad blocks so that every file reads again",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress on stderr: a line updated in place when stderr is a terminal "
        "(the default there), else one JSON object per second "
        '({"kind": "progress", ...}; only when asked). --no-progress: none',
    )
    _vault_override_arg(p)
    _vault_args(p)

    p = sub.add_parser(
        "rotate",
        help="re-wrap the volume key under the newest KEK version (no re-encryption)",
        description="Re-wrap the volume key under the newest version of its KEK: the vault "
        "re-wraps it (transit rewrap; no plaintext key crosses the wire), encfs checks that "
        "the new wrapping holds the same volume key, and replaces the volume header "
        "atomically (the previous header is kept as encfs.volume.prev until the new one is "
        "durable). No file is re-encrypted; it takes seconds and works while the volume is "
        "mounted. Rotate the KEK in the vault first (bao write -f transit/keys/KEY/rotate); "
        "afterwards old KEK versions can be retired with min_decryption_version. The host "
        "token needs update on MOUNT/rewrap/KEY and MOUNT/decrypt/KEY.",
    )
    p.add_argument("cipher_dir", type=_abs_path, metavar="CIPHERDIR")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _vault_override_arg(p)
    _vault_args(p)

    p = sub.add_parser(
        "status",
        help="state of mounted volumes (active, offline-grace, suspended and why)",
        description="Ask the daemon serving MOUNTPOINT (or every encfs daemon on this host) "
        "for its state: active / offline-grace / suspended, since when and why, key and "
        "KEK version, vault reachability and last check, token TTL, counters, memory "
        "locking, PID and RSS. Answered over a root-only unix socket in /run/encfs.",
    )
    p.add_argument("mountpoint", type=_abs_path, nargs="?", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    hp = sub.add_parser(
        "header",
        help="back up or restore the volume header (its loss loses the volume)",
        description="The volume header (CIPHERDIR/encfs.volume) holds the only copy of the "
        "wrapped volume key: without it the ciphertext cannot be read, whatever the vault "
        "holds. `backup` copies it to a file; `restore` puts a copy back. A backup holds no "
        "secret the vault does not guard (the key is wrapped by the KEK), and stays valid "
        "across rotations as long as the KEK version it names is not retired. Neither needs "
        "the vault.",
    )
    hsub = hp.add_subparsers(dest="header_command", required=True, metavar="ACTION")
    p = hsub.add_parser(
        "backup",
        help="copy the volume header to FILE (0600; never overwrites)",
        description="Copy the volume header of CIPHERDIR to FILE, a new file (mode 0600, "
        "fsynced); refuses to overwrite an existing FILE. Keep it off the cipher dir's disk.",
    )
    p.add_argument("cipher_dir", type=_abs_path, metavar="CIPHERDIR")
    p.add_argument("file", type=_abs_path, metavar="FILE")
    p = hsub.add_parser(
        "restore",
        help="put a header back, from FILE or from encfs.volume.prev",
        description="Replace CIPHERDIR/encfs.volume with the header in FILE (made by "
        "`encfs header backup`) or, without FILE, with encfs.volume.prev (the header before "
        "the last rotation). Refused while the volume is mounted (exit 24), for a FILE that "
        "is not a volume header (exit 4), and for a header of another volume than the one "
        "this host pinned there (exit 8). Written crash-safely; the header it replaces is "
        "kept as encfs.volume.prev. Run `encfs fsck` or mount afterwards: they verify its "
        "tag with the vault.",
    )
    p.add_argument("cipher_dir", type=_abs_path, metavar="CIPHERDIR")
    p.add_argument("file", type=_abs_path, nargs="?", metavar="FILE")

    pp = sub.add_parser(
        "pin",
        help="show or forget which volume this host mounts in a cipher dir",
        description="The host pins, per cipher dir, the volume id and a check value of the "
        "volume key (never the key): `init` and the first `mount` write the pin, every "
        "mount, fsck and rotate compares, and a different volume (a substituted header) "
        f"is refused with exit 8. Pins live in {pins.DEFAULT_PIN_DIR} "
        f"(${pins.PIN_DIR_ENV} overrides).",
    )
    psub = pp.add_subparsers(dest="pin_command", required=True, metavar="ACTION")
    p = psub.add_parser("show", help="print the pin of CIPHERDIR")
    p.add_argument("cipher_dir", type=_abs_path, metavar="CIPHERDIR")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = psub.add_parser(
        "reset",
        help="forget the pin of CIPHERDIR; the next mount pins what it finds",
        description="Forget the pin of CIPHERDIR. Do this only when the volume there was "
        "replaced on purpose (restored from a backup, re-created); the next mount pins "
        "whatever volume it then finds. `encfs mount --repin` does both in one step.",
    )
    p.add_argument("cipher_dir", type=_abs_path, metavar="CIPHERDIR")

    sp = sub.add_parser(
        "systemd",
        help="run a volume as a systemd service (encfs@NAME.service)",
        description="Install a volume as a service: write /etc/encfs/NAME.conf, install the "
        "host's vault token as /etc/encfs/NAME.token (0600, passed to the daemon as a "
        "systemd credential), install encfs@.service and encfs-vault.service into "
        "/etc/systemd/system, daemon-reload and enable encfs@NAME.service. Idempotent.",
    )
    ssub = sp.add_subparsers(dest="systemd_command", required=True, metavar="ACTION")
    p = ssub.add_parser(
        "install",
        help="write the config and token, install the units, enable the instance",
        description="Install NAME as encfs@NAME.service. Options after the paths become "
        "keys of /etc/encfs/NAME.conf (see README, 'Run it as a service').",
    )
    p.add_argument("name", metavar="NAME", help="instance name (letters, digits, -_.)")
    p.add_argument("--cipher-dir", type=_abs_path, required=True, metavar="DIR")
    p.add_argument("--mountpoint", type=_abs_path, required=True, metavar="DIR")
    p.add_argument(
        "--vault",
        metavar="URL",
        help="the vault the service may send the host's token to (VAULT= in the config; "
        "required unless --ephemeral): a full vault URL, or https://HOST:PORT with the "
        "volume header's mount and key",
    )
    p.add_argument(
        "--token-file",
        type=_abs_path,
        metavar="FILE",
        help="the host's vault token, copied to /etc/encfs/NAME.token (0600)",
    )
    p.add_argument(
        "--ephemeral", action="store_true", help="a crypto-erased scratch volume (EPHEMERAL=yes)"
    )
    p.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other config key, e.g. --set CHECK_INTERVAL=10 (repeatable)",
    )
    p.add_argument("--start", action="store_true", help="also start it now")
    p.add_argument(
        "--no-enable", dest="enable", action="store_false", help="do not enable it at boot"
    )
    p.add_argument("--dry-run", action="store_true", help="print what would be done")
    p.add_argument("--etc-dir", type=_abs_path, default=Path("/etc/encfs"), help=argparse.SUPPRESS)
    p.add_argument(
        "--unit-dir", type=_abs_path, default=Path("/etc/systemd/system"), help=argparse.SUPPRESS
    )

    vp = sub.add_parser(
        "vault",
        help="run or provision a local OpenBao (for hosts without a vault)",
        description="A local OpenBao for a host that has no vault: `dev` (in memory, for "
        "demos and tests), `serve` (persistent, Raft storage, TLS; what "
        "encfs-vault.service runs) and `setup` (transit key, least-privilege host "
        "policy, host token).",
    )
    vsub = vp.add_subparsers(dest="vault_command", required=True, metavar="ACTION")
    p = vsub.add_parser(
        "dev",
        help="in-memory OpenBao dev server (insecure; lost when stopped)",
        description="Start `bao server -dev` on loopback with transit enabled, print its "
        "address and root token, and run until SIGTERM/SIGINT. Everything is in memory.",
    )
    p.add_argument("--listen", default="127.0.0.1:8200", metavar="HOST:PORT")
    p.add_argument(
        "--root-token-file",
        type=_abs_path,
        metavar="FILE",
        help="use the root token in FILE, or write a fresh one there (mode 0600) if it does "
        "not exist; for scripts that must administer the dev server",
    )
    p = vsub.add_parser(
        "serve",
        help="persistent single-host OpenBao (Raft storage, TLS, auto-unseal from DATA)",
        description="Run a persistent OpenBao with Raft storage in DATA (mode 0700), TLS "
        "on the listen address with a CA of its own (DATA/tls/ca.pem). The first start "
        "initialises it with one unseal key kept in DATA/init.json (0600) and prints the "
        "trade-off: the unseal key sits on the same disk as the data, so this protects "
        "volume keys from other hosts and from a stolen volume, not from theft of this "
        "host's disk. Every start unseals it. Runs in the foreground.",
    )
    p.add_argument("--data", type=_abs_path, required=True, metavar="DIR")
    p.add_argument("--listen", default="127.0.0.1:8200", metavar="HOST:PORT")
    p.add_argument("--cluster-listen", default=None, metavar="HOST:PORT")
    p = vsub.add_parser(
        "setup",
        help="create the transit key, the host's policy and its token (idempotent)",
        description="Enable transit if needed, create KEY (not exportable, deletion not "
        "allowed), write the least-privilege policy encfs-host-HOST (read the key's status, "
        "datakey, decrypt, rewrap, renew and look up its own token, check its own "
        "capabilities; nothing else) and write a renewable, periodic host token to FILE "
        "(0600). Re-running is safe: the key is kept and a fresh token issued.",
    )
    p.add_argument(
        "--addr", required=True, metavar="URL", help="vault address, e.g. https://127.0.0.1:8200"
    )
    p.add_argument("--key", required=True, metavar="NAME", help="transit key name")
    p.add_argument(
        "--host",
        required=True,
        metavar="HOSTNAME",
        help="the host the token is for (names its policy)",
    )
    p.add_argument(
        "--token-out",
        required=True,
        type=_abs_path,
        metavar="FILE",
        help="where to write the host token (mode 0600)",
    )
    p.add_argument(
        "--admin-token-file",
        type=_abs_path,
        metavar="FILE",
        help="admin token (or serve's init.json); default $VAULT_TOKEN/$BAO_TOKEN",
    )
    p.add_argument(
        "--ca-file",
        type=_abs_path,
        metavar="FILE",
        help="CA of the vault's certificate (serve: DATA/tls/ca.pem)",
    )
    p.add_argument("--mount", default="transit", metavar="PATH", help="transit mount")
    _verbose_everywhere(parser)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below ``parser`` (aliases once)."""
    found: dict[int, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if id(child) not in found:
                    found[id(child)] = child
                    for grandchild in _subparsers(child):
                        found.setdefault(id(grandchild), grandchild)
    return list(found.values())


def _verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """``-v`` after the command too (``encfs mount ... -v``), counted with the one before."""
    for child in _subparsers(parser):
        child.add_argument(
            "-v",
            "--verbose",
            dest="sub_verbose",
            action="count",
            default=argparse.SUPPRESS,
            help="more log output (-vv for debug); before or after the command",
        )


def verbosity(args: argparse.Namespace) -> int:
    """``-v`` counted before and after the command."""
    return int(args.verbose) + int(getattr(args, "sub_verbose", 0))


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text}")
    return value


def _errno_name(text: str) -> int:
    code = getattr(errno, text.upper(), None) if not text.isdigit() else int(text)
    if not isinstance(code, int) or code <= 0:
        raise argparse.ArgumentTypeError(f"unknown errno name {text!r} (e.g. EACCES, EIO)")
    return code


def _settings(args: argparse.Namespace) -> VaultSettings:
    return VaultSettings(
        token_file=args.token_file,
        ca_file=args.ca_file if args.ca_file is not None else env_ca_file(),
        client_cert=args.client_cert,
        client_key=args.client_key,
        timeout=args.vault_timeout,
        key_release=args.key_release,
    )


def _pinned_url(args: argparse.Namespace, hf: volume.HeaderFile) -> str:
    """Where this command may send the host's credential (``vault.pin_vault_url``)."""
    pinned = pin_vault_url(hf.header.vault_url, configured=args.vault_url, addr=env_vault_addr())
    if pinned.note:
        log.warning("%s", pinned.note)
    return str(pinned.url)


def _audit_settings(args: argparse.Namespace) -> AuditSettings:
    raw = args.audit_log if args.audit_log is not None else os.environ.get("ENCFS_AUDIT_LOG")
    if raw is None:
        path: Path | None = DEFAULT_AUDIT_LOG if os.geteuid() == 0 else None
    elif raw.lower() in ("none", ""):
        path = None
    else:
        path = Path(raw).absolute()
    return AuditSettings(path=path, journal=under_systemd())


def setup_logging(
    verbose: int, *, stream: bool = True, log_file: Path | None = None, syslog: bool = False
) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level)
    fmt_line = logging.Formatter("%(asctime)s encfs[%(process)d] %(levelname)s %(message)s")
    if stream:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("encfs: %(levelname)s: %(message)s"))
        root.addHandler(handler)
    if log_file is not None:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(fmt_line)
        root.addHandler(handler)
    if syslog and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("encfs[%(process)d]: %(levelname)s %(message)s"))
        root.addHandler(handler)


# --- commands --------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> ExitCode:
    url = parse_vault_url(args.vault)
    try:
        fmt.validate_block_size(args.block_size)
    except ValueError as exc:
        print(f"encfs: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    audit = AuditLog(_audit_settings(args), cipher_dir=str(args.cipher_dir), vault=str(url))
    note = volume.prepare_cipher_dir(args.cipher_dir)
    if note:
        print(f"encfs: note: {note}", file=sys.stderr)

    def pin(header: fmt.VolumeHeader, keys: VolumeKeys) -> None:
        pins.write_pin(
            args.cipher_dir,
            header.volume_id,
            keys,
            by="init",
            vault_url=header.vault_url,
            block_size=header.block_size,
        )

    vault = connect(url, _settings(args))
    try:
        vault.check_capabilities("init")
        header = volume.create(args.cipher_dir, vault, block_size=args.block_size, on_keys=pin)
    except errors.VaultError as exc:
        audit.error("init", exc)
        raise
    finally:
        vault.close()
    audit.event("init", volume_id=header.volume_id.hex(), kek_version=header.kek_version)
    if args.json:
        doc = {
            "cipher_dir": str(args.cipher_dir),
            "volume_id": header.volume_id.hex(),
            "vault": str(url),
            "kek_version": header.kek_version,
            "block_size": header.block_size,
            "features": fmt.feature_names(header.feature_flags),
            "pin_file": str(pins.pin_path(args.cipher_dir)),
        }
        print(json.dumps(doc, indent=2))
        return ExitCode.OK
    print(f"created volume {header.volume_id.hex()} in {args.cipher_dir}")
    print(f"  vault key: {url} (KEK version {header.kek_version})")
    print(
        f"  pinned:    {pins.pin_path(args.cipher_dir)} (this host mounts only this volume there)"
    )
    print(f"  mount it:  encfs mount {args.cipher_dir} MOUNTPOINT --vault {url}")
    return ExitCode.OK


def _mount_options(raw: Sequence[str]) -> dict[str, bool]:
    known = {"allow_other", "default_permissions", "nonempty", "ro", "rw", "writeback_cache"}
    opts: dict[str, bool] = {}
    for group in raw:
        for opt in filter(None, group.split(",")):
            if opt not in known:
                raise argparse.ArgumentTypeError(
                    f"unknown mount option {opt!r} (known: {', '.join(sorted(known))})"
                )
            opts[opt] = True
    return opts


def cmd_mount(args: argparse.Namespace, argv: Sequence[str]) -> ExitCode:
    from encfs.daemon import Daemon, MountConfig
    from encfs.fs import FsOptions

    try:
        opts = _mount_options(args.options)
    except argparse.ArgumentTypeError as exc:
        print(f"encfs: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    if not args.foreground:
        return _spawn_background(argv, args)
    read_only = opts.get("ro", False) and not opts.get("rw", False)
    fs = FsOptions(read_only=read_only, writeback_cache=opts.get("writeback_cache", False))
    if args.suspended_errno is not None:  # else FsOptions' default
        fs = dataclasses.replace(fs, suspended_errno=args.suspended_errno)
    config = MountConfig(
        cipher_dir=args.cipher_dir.resolve(),
        mountpoint=args.mountpoint.resolve(),
        vault=_settings(args),
        vault_url=args.vault_url,
        vault_addr=env_vault_addr(),
        repin=args.repin,
        nonempty=opts.get("nonempty", False),
        allow_other=opts.get("allow_other", False),
        default_permissions=opts.get("default_permissions", False),
        read_only=read_only,
        fs=fs,
        debug=verbosity(args) >= 3,
        audit=_audit_settings(args),
        ephemeral=args.ephemeral,
        watch=WatchSettings(
            check_interval=args.check_interval,
            offline_grace=args.offline_grace,
            on_revoke=args.on_revoke,
        ),
    )
    ready_fd: int | None = args.ready_fd

    def on_ready() -> None:
        if ready_fd is None:
            return
        # Background child: from now on log only to the log file / syslog, then tell the
        # waiting parent that the mount is live (it exits, and our stderr pipe closes).
        setup_logging(
            verbosity(args), stream=False, log_file=args.log_file, syslog=args.log_file is None
        )
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        os.write(ready_fd, b"READY\n")
        os.close(ready_fd)

    Daemon(config).run(on_ready=on_ready)
    return ExitCode.OK


def _spawn_background(argv: Sequence[str], args: argparse.Namespace) -> ExitCode:
    """Run the daemon as a detached child; return once it reports the mount live or fails."""
    read_end, write_end = os.pipe()
    cmd = [sys.executable, "-m", "encfs", *argv, "--foreground", "--ready-fd", str(write_end)]
    child = subprocess.Popen(
        cmd,
        pass_fds=(write_end,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    os.close(write_end)
    assert child.stderr is not None
    stderr_fd = child.stderr.fileno()
    deadline = time.monotonic() + max(60.0, 3 * args.vault_timeout)
    ready = b""
    err_text = b""
    open_fds = {read_end, stderr_fd}
    while open_fds and time.monotonic() < deadline:
        readable, _, _ = select.select(list(open_fds), [], [], 0.5)
        for fd in readable:
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.discard(fd)
            elif fd == read_end:
                ready += chunk
            else:
                err_text += chunk
        if b"READY" in ready:
            break
    os.close(read_end)
    child.stderr.close()
    # libfuse 3.14 warns about its own unset thread limit on every start; not ours to report.
    err_text = b"".join(
        line for line in err_text.splitlines(keepends=True) if b"invalid max threads" not in line
    )
    if b"READY" in ready:
        sys.stderr.write(err_text.decode(errors="replace"))
        print(f"mounted {args.cipher_dir} on {args.mountpoint} (daemon pid {child.pid})")
        return ExitCode.OK
    try:
        code = child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        sys.stderr.write(err_text.decode(errors="replace"))
        print("encfs: error: the mount did not come up in time; daemon killed", file=sys.stderr)
        return ExitCode.MOUNT_FAILED
    sys.stderr.write(err_text.decode(errors="replace"))
    return ExitCode(code) if code in ExitCode._value2member_map_ else ExitCode.MOUNT_FAILED


def cmd_unmount(args: argparse.Namespace) -> ExitCode:
    from encfs.mounts import fusermount, is_mountpoint, runtime_file

    mountpoint = args.mountpoint.resolve()
    if not is_mountpoint(mountpoint):
        print(f"encfs: error: {mountpoint} is not mounted", file=sys.stderr)
        return ExitCode.NOT_MOUNTED
    pid: int | None = None
    try:
        pid = int(json.loads(runtime_file(mountpoint).read_text())["pid"])
    except (OSError, ValueError, KeyError):
        pid = None
    proc = fusermount("-u", *(["-z"] if args.lazy else []), str(mountpoint))
    if proc.returncode != 0:
        msg = proc.stderr.strip()
        if "busy" in msg.lower():
            print(
                f"encfs: error: {mountpoint} is busy (files open or a process's cwd); "
                "close them or use --lazy",
                file=sys.stderr,
            )
            return ExitCode.BUSY
        print(f"encfs: error: unmount failed: {msg}", file=sys.stderr)
        return ExitCode.FAILURE
    if pid is not None:
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            print(
                f"encfs: warning: daemon {pid} still running after {args.timeout}s", file=sys.stderr
            )
            return ExitCode.FAILURE
    print(f"unmounted {mountpoint}")
    return ExitCode.OK


def cmd_info(args: argparse.Namespace) -> ExitCode:
    hf = volume.read_header(args.cipher_dir)
    h = hf.header
    try:
        key_name = parse_vault_url(h.vault_url).key_name
    except errors.VaultConfigError:
        key_name = ""
    info = {
        "cipher_dir": str(args.cipher_dir.resolve()),
        "format_version": h.format_version,
        "feature_flags": h.feature_flags,
        "features": fmt.feature_names(h.feature_flags),
        "volume_id": h.volume_id.hex(),
        "cipher": fmt.CIPHER_NAMES[h.cipher],
        "block_size": h.block_size,
        "vault": h.vault_url,
        "key_name": key_name,
        "kek_version": h.kek_version,
        "wrapped_key": h.wrapped_key,
        "header_file": str(hf.path),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            if isinstance(value, list):
                value = ", ".join(value) or "none"
            print(f"{key.replace('_', ' '):<{width}}  {value}")
        print("(header tag not verified: that needs the vault; `encfs fsck` verifies it)")
    return ExitCode.OK


def cmd_fsck(args: argparse.Namespace) -> ExitCode:
    from encfs import fsck

    hf = volume.read_checked_header(args.cipher_dir)
    vault = connect(_pinned_url(args, hf), _settings(args))
    try:
        keys = volume.unlock(hf, vault)
        try:
            pins.check_pin(args.cipher_dir, hf.header.volume_id, keys, create=False)
        except BaseException:
            keys.close()
            raise
    finally:
        vault.close()
    root = backing.open_root(str(args.cipher_dir))
    lock: int | None = None
    try:
        if args.repair:
            lock = backing.lock_volume(root, f"encfs fsck --repair (pid {os.getpid()})")
        elif (holder := backing.volume_holder(root)) is not None:
            print(
                f"encfs: warning: {args.cipher_dir} is in use by {holder}; writes made while "
                "fsck runs may show as problems (unmount it for a clean check)",
                file=sys.stderr,
            )
        progress = _FsckProgress.choose(args.progress)
        try:
            report = fsck.check(
                args.cipher_dir,
                keys,
                hf.header.block_size,
                repair=args.repair,
                progress=progress.update if progress else None,
            )
        finally:
            if progress:
                progress.done()
    finally:
        keys.close()
        if lock is not None:
            os.close(lock)
    for problem in report.problems:
        print(json.dumps(problem.as_dict()) if args.json else problem)
    left = report.unrepaired
    repaired = len(report.problems) - len(left)
    if args.json:
        summary: dict[str, object] = {
            "kind": "summary",
            "files": report.files,
            "dirs": report.dirs,
            "blocks": report.blocks,
            "symlinks": report.symlinks,
            "xattrs": report.xattrs,
            "problems": len(report.problems),
            "repaired": repaired,
            "undo_files": report.undo_files,
        }
        print(json.dumps(summary))
    else:
        print(
            f"{report.files} files, {report.dirs} directories, {report.blocks} blocks "
            f"checked: {len(report.problems)} problem(s)"
            + (f", {repaired} repaired" if args.repair else "")
        )
        if report.undo_files:
            print(
                f"{report.undo_files} undo file(s) left by a crash"
                + (": used and removed" if args.repair else " (--repair uses and removes them)")
            )
    return ExitCode.CORRUPT if left else ExitCode.OK


class _FsckProgress:
    """fsck's progress on stderr, at most every ``interval`` seconds (the callback itself
    only compares the clock): a line rewritten in place on a terminal, JSON lines
    otherwise (only when asked: ``--progress``)."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.interval = 0.2 if tty else 1.0
        self.start = time.monotonic()
        self.next = self.start + self.interval
        self.shown = False
        self.last: Any = None

    @classmethod
    def choose(cls, asked: bool | None) -> _FsckProgress | None:
        tty = sys.stderr.isatty()
        if asked is False or (asked is None and not tty):
            return None
        return cls(tty)

    def update(self, report: Any) -> None:
        self.last = report
        now = time.monotonic()
        if now < self.next:
            return
        self.next = now + self.interval
        self.show(report, now)

    def show(self, report: Any, now: float) -> None:
        elapsed = now - self.start
        if self.tty:
            sys.stderr.write(
                f"\rfsck: {report.files} files, {report.dirs} directories, {report.blocks} "
                f"blocks checked, {len(report.problems)} problem(s), {elapsed:.0f} s\x1b[K"
            )
        else:
            doc = {
                "kind": "progress",
                "files": report.files,
                "dirs": report.dirs,
                "blocks": report.blocks,
                "problems": len(report.problems),
                "elapsed": round(elapsed, 1),
            }
            sys.stderr.write(json.dumps(doc) + "\n")
        sys.stderr.flush()
        self.shown = True

    def done(self) -> None:
        """Clear the terminal line; in JSON mode, one last line with the final counts."""
        if self.tty and self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
        elif not self.tty and self.last is not None:
            self.show(self.last, time.monotonic())


def cmd_rotate(args: argparse.Namespace) -> ExitCode:
    hf = volume.read_checked_header(args.cipher_dir)
    url = _pinned_url(args, hf)
    audit = AuditLog(
        _audit_settings(args),
        cipher_dir=str(args.cipher_dir),
        vault=url,
        volume_id=hf.header.volume_id.hex(),
    )
    vault = connect(url, _settings(args))
    try:
        vault.check_capabilities("rotate")
        if pins.read_pin(args.cipher_dir) is not None:  # rotate only the volume pinned here
            keys = volume.unlock(hf, vault)
            try:
                pins.check_pin(args.cipher_dir, hf.header.volume_id, keys, create=False)
            finally:
                keys.close()
        result = volume.rotate(args.cipher_dir, vault)
    except errors.EncfsError as exc:
        audit.error("rotate", exc, kek_version=hf.header.kek_version)
        raise
    finally:
        vault.close()
    audit.event(
        "rotate",
        kek_version=result.new_version,
        old_kek_version=result.old_version,
        changed=result.changed,
    )
    if args.json:
        doc = {
            "cipher_dir": str(args.cipher_dir),
            "volume_id": hf.header.volume_id.hex(),
            "changed": result.changed,
            "old_kek_version": result.old_version,
            "kek_version": result.new_version,
        }
        print(json.dumps(doc, indent=2))
    elif result.changed:
        print(
            f"rotated {args.cipher_dir}: volume key now wrapped with KEK version "
            f"{result.new_version} (was {result.old_version}); no data re-encrypted"
        )
    else:
        print(
            f"{args.cipher_dir} already uses the newest KEK version ({result.new_version}); "
            "rotate the key in the vault first (bao write -f MOUNT/keys/KEY/rotate)"
        )
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> ExitCode:
    import socket

    from encfs.mounts import RUN_DIR, status_socket

    if args.mountpoint is not None:
        sockets = [status_socket(args.mountpoint.resolve())]
    else:
        sockets = sorted(RUN_DIR.glob("*.sock")) if RUN_DIR.is_dir() else []
    reports: list[dict[str, object]] = []
    for path in sockets:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(path))
                raw = b""
                while chunk := sock.recv(65536):
                    raw += chunk
            reports.append(json.loads(raw))
        except (OSError, ValueError) as exc:
            if args.mountpoint is not None:
                print(
                    f"encfs: error: no encfs daemon answers for {args.mountpoint} ({exc})",
                    file=sys.stderr,
                )
                return ExitCode.NOT_MOUNTED
    if args.json:
        print(json.dumps(reports[0] if args.mountpoint is not None else reports, indent=2))
        return ExitCode.OK
    if not reports:
        print("no encfs volume is mounted")
        return ExitCode.OK
    for report in reports:
        _print_status(report)
    return ExitCode.OK


def _print_status(r: dict[str, Any]) -> None:
    state = str(r.get("state", "?"))
    reason = f" — {r['reason']}" if r.get("reason") else ""
    print(f"{r.get('mountpoint')}: {state} since {r.get('since')}{reason}")
    print(f"  cipher dir   {r.get('cipher_dir')}  (volume {r.get('volume_id')})")
    print(f"  vault key    {r.get('vault')}  (KEK version {r.get('kek_version')})")
    reach = {True: "reachable", False: "unreachable", None: "not checked yet"}[
        r.get("vault_reachable")
    ]
    print(
        f"  vault        {reach}, last check {r.get('last_check') or '-'}"
        f" (every {r.get('check_interval')} s, offline grace {r.get('offline_grace')} s)"
    )
    if r.get("last_error"):
        print(f"  last error   {r['last_error']}")
    token = r.get("token") or {}
    if token:
        ttl = token.get("ttl")
        print(
            f"  identity     {token.get('accessor') or token.get('client_cert_subject') or '-'}"
            f", token TTL {'never expires' if ttl is None else f'{ttl} s'}"
            f"{', renewable' if token.get('renewable') else ''}"
        )
    mem = r.get("memory") or {}
    if mem:
        locked = "locked" if mem.get("locked") else f"NOT locked ({mem.get('detail')})"
        print(
            f"  key memory   {locked}, {'excluded from' if mem.get('dontdump') else 'in'} "
            "core dumps"
        )
    c = r.get("counters") or {}
    if c:
        print(
            f"  counters     {c.get('reads')} reads ({c.get('bytes_read')} B), "
            f"{c.get('writes')} writes ({c.get('bytes_written')} B), "
            f"{c.get('integrity_errors')} integrity errors"
        )
    lf = r.get("libfuse") or {}
    if lf:
        print(
            f"  libfuse      {lf.get('version')}"
            f"{', HANDLE_KILLPRIV_V2' if lf.get('killpriv_v2') else ''}"
        )
    rss = r.get("rss")
    print(f"  daemon       pid {r.get('pid')}, RSS {int(rss) // 1024 if rss else '?'} KiB")


def _dev_root_token(path: Path) -> str:
    """The dev server's root token from ``path``, made (0600) when the file is missing."""
    import secrets

    from encfs.vault import read_token

    if path.exists():
        secret = read_token(VaultSettings(token_file=path))
        try:
            view = secret.view()
            try:
                return bytes(view).decode()  # the dev server takes it on its command line
            finally:
                view.release()
        finally:
            secret.close()
    token = "dev-" + secrets.token_urlsafe(18)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def cmd_systemd(args: argparse.Namespace) -> ExitCode:
    from encfs import service

    settings: dict[str, str] = {
        "CIPHER_DIR": str(args.cipher_dir.absolute()),
        "MOUNTPOINT": str(args.mountpoint.absolute()),
    }
    if args.vault:
        settings["VAULT"] = args.vault
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
    if settings.get("VAULT"):
        try:
            parse_vault_url(settings["VAULT"])
        except errors.VaultConfigError:
            if not settings["VAULT"].startswith(("http://", "https://")):
                raise
    plan = service.ServicePlan(
        name=args.name,
        settings=settings,
        token_file=args.token_file,
        etc_dir=args.etc_dir,
        unit_dir=args.unit_dir,
        enable=args.enable,
        start=args.start,
    )
    service.install(plan, dry_run=args.dry_run, say=print)
    if not args.dry_run:
        print(f"installed encfs@{args.name}.service; `systemctl status encfs@{args.name}`")
    return ExitCode.OK


def cmd_header(args: argparse.Namespace) -> ExitCode:
    if args.header_command == "backup":
        try:
            hf = volume.backup_header(args.cipher_dir, args.file)
        except FileExistsError:
            print(f"encfs: error: {args.file} exists; refusing to overwrite it", file=sys.stderr)
            return ExitCode.FAILURE
        print(
            f"backed up {hf.path} to {args.file} (volume {hf.header.volume_id.hex()}, KEK "
            f"version {hf.header.kek_version}); keep it away from the cipher dir's disk"
        )
        return ExitCode.OK
    result = volume.restore_header(args.cipher_dir, args.file)
    h = result.header.header
    source = args.file or args.cipher_dir / fmt.VOLUME_HEADER_PREV
    if not result.changed:
        print(f"{result.header.path} already is the header in {source}; nothing written")
        return ExitCode.OK
    print(
        f"restored the volume header of {args.cipher_dir} from {source} (volume "
        f"{h.volume_id.hex()}, KEK version {h.kek_version}); the header it replaced is kept "
        f"as {fmt.VOLUME_HEADER_PREV}. Its tag is verified by the next mount or "
        f"`encfs fsck {args.cipher_dir}`"
    )
    return ExitCode.OK


def cmd_pin(args: argparse.Namespace) -> ExitCode:
    if args.pin_command == "reset":
        if pins.reset_pin(args.cipher_dir):
            print(f"forgot the pin of {args.cipher_dir}; the next mount pins what it finds")
        else:
            print(f"{args.cipher_dir} was not pinned ({pins.pin_path(args.cipher_dir)})")
        return ExitCode.OK
    pin = pins.read_pin(args.cipher_dir)
    if pin is None:
        print(f"{args.cipher_dir} is not pinned on this host", file=sys.stderr)
        return ExitCode.NO_VOLUME
    doc = {**pin.__dict__, "pin_file": str(pins.pin_path(args.cipher_dir))}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        for key, value in doc.items():
            print(f"{key.replace('_', ' '):<12} {value}")
    return ExitCode.OK


def _as_exit_code(code: int) -> ExitCode:
    return ExitCode(code) if code in ExitCode._value2member_map_ else ExitCode.FAILURE


def cmd_vault(args: argparse.Namespace) -> ExitCode:
    if args.vault_command == "dev":
        return _vault_dev(args)
    if args.vault_command == "serve":
        return _vault_serve(args)
    return _vault_setup(args)


def _vault_dev(args: argparse.Namespace) -> ExitCode:
    """``encfs vault dev``: an in-memory OpenBao in the foreground until SIGTERM/SIGINT;
    prints its address and root token (dev mode only). 0 when stopped on request."""
    from encfs.bao.dev import run_dev
    from encfs.bao.process import SignalForwarder

    root_token: str | None = None
    if args.root_token_file is not None:
        root_token = _dev_root_token(args.root_token_file)
    with SignalForwarder() as fwd:
        try:
            server = run_dev(args.listen, root_token, log=sys.stderr, on_spawn=fwd.attach)
        except errors.BaoServerError:
            if fwd.stop_signal is not None:
                return ExitCode.OK
            raise
        try:
            _print_dev_info(server.addr, server.root_token, server.mount)
            return _bao_exit_code(fwd.wait(server.proc))
        finally:
            server.stop()


def _print_dev_info(addr: str, root_token: str, mount: str) -> None:
    """The operator-facing lines of ``encfs vault dev``: address, admin (root) token, the
    ``export`` line, and the warning that dev mode is in memory and insecure."""
    lines = [
        f"OpenBao dev server listening on {addr} (transit enabled at {mount}/)",
        f"admin (root) token: {root_token}",
        "",
        f"  export VAULT_ADDR={addr} VAULT_TOKEN={root_token}",
        "",
        "Give a host a key and its own token:",
        f"  encfs vault setup --addr {addr} --key KEY --host HOST --token-out FILE",
        "",
        "WARNING: dev mode keeps everything in memory and is insecure: plain HTTP, a root",
        "token printed above, and every key is lost when it stops - so is every volume",
        "created with it. Use it for demos and tests only; `encfs vault serve` keeps data.",
        "Stop it with Ctrl-C (or SIGTERM).",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


def _bao_exit_code(ended: BaoExit) -> ExitCode:
    """A supervised OpenBao's end (``bao.process.BaoExit``) as our exit code: 0 if we
    stopped it and it exited cleanly, else non-zero (saying so if it stopped by itself)."""
    if ended.on_request:
        return ExitCode.OK if ended.status == 0 else ExitCode.FAILURE
    print(f"OpenBao stopped by itself (exit status {ended.status})", file=sys.stderr)
    return _as_exit_code(ended.status if ended.status > 0 else 1)


FIRST_START_TEXT = """\
Initialised a new OpenBao vault in {data} (1 unseal key share, threshold 1).
The unseal key and the initial root token are in {init} (mode 0600).

Trade-off: the unseal key sits on the same disk as the vault's data, so this server unseals
itself after every restart. That gives central revocation and an audit point, and keeps the
volume keys from anyone who has a volume's files or another host; it does NOT protect against
theft of this host's disk, which holds both the vault's data and the key that unseals it.

Next:
  1. give each host a key and its own token (with the root token from {init}):
       encfs vault setup --addr {addr} --ca-file {ca} --admin-token-file {init} \\
           --key KEY --host HOST --token-out FILE
  2. then move the root token out of {init}: keep it offline, or revoke it
     (bao token revoke -self) and make a new one when needed (bao operator generate-root).
     Host tokens are orphans: revoking the root token does not revoke them.
  3. in production prefer auto-unseal (cloud KMS, HSM, or transit on another vault), or
     remove the unseal key from {init} and unseal by hand after each start
     (bao operator unseal).
"""


def _vault_serve(args: argparse.Namespace) -> ExitCode:
    """``encfs vault serve`` (and ``encfs-vault.service``): the persistent OpenBao of
    ``bao.serve.start_serve`` in the foreground; prints (and tells systemd) when it is
    ready, forwards SIGTERM/SIGINT (stop) and SIGHUP (reload) to it, and returns when it
    has stopped: 0 if stopped on request, non-zero if OpenBao died. Its log goes to stderr."""
    from encfs.bao.process import SignalForwarder
    from encfs.bao.serve import notify_ready, notify_stopping, start_serve
    from encfs.bao.setup import DEFAULT_MOUNT

    with SignalForwarder() as fwd:
        try:
            server = start_serve(
                args.data,
                args.listen,
                cluster_listen=args.cluster_listen,
                log=sys.stderr,
                on_spawn=fwd.attach,
            )
        except errors.BaoServerError:
            if fwd.stop_signal is not None:
                return ExitCode.OK
            raise
        try:
            paths = server.paths
            if server.initialized_now:
                print(
                    FIRST_START_TEXT.format(
                        data=paths.data_dir,
                        init=paths.init_file,
                        addr=server.addr,
                        ca=paths.ca_file,
                    ),
                    flush=True,
                )
            if server.unsealed:
                print(
                    f"encfs-vault: OpenBao ready at {server.addr} (CA: {paths.ca_file}; "
                    f"transit at {DEFAULT_MOUNT}/)",
                    flush=True,
                )
            else:
                print(
                    f"encfs-vault: OpenBao at {server.addr} is SEALED: no unseal key in "
                    f"{paths.init_file}; unseal it with:\n"
                    f"  BAO_ADDR={server.addr} BAO_CACERT={paths.ca_file} bao operator unseal",
                    flush=True,
                )
            notify_ready(server)
            return _bao_exit_code(fwd.wait(server.proc))
        finally:
            notify_stopping()
            server.stop()


def _vault_setup(args: argparse.Namespace) -> ExitCode:
    """``encfs vault setup``: ``bao.setup.setup`` with the admin token from
    ``--admin-token-file`` or ``VAULT_TOKEN`` / ``BAO_TOKEN``, then print what was done and
    how to use it (never the token)."""
    from encfs.bao.setup import HOST_TOKEN_PERIOD, read_admin_token, setup

    result = setup(
        args.addr,
        read_admin_token(args.admin_token_file),
        args.key,
        args.host,
        args.token_out,
        args.ca_file,
        args.mount,
    )
    if result.transit_enabled:
        print(f"enabled transit at {args.mount.strip('/')}/")
    kinfo = result.key_info
    if result.key_created:
        print(
            f"created key {result.vault_url} ({kinfo.get('type')}, not exportable, "
            "deletion not allowed)"
        )
    else:
        print(
            f"kept existing key {result.vault_url} (version {kinfo.get('latest_version')}, "
            "deletion not allowed)"
        )
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote policy {result.policy} and token role {result.role}")
    print(
        f"issued a new host token (periodic {HOST_TOKEN_PERIOD}, orphan; accessor "
        f"{result.accessor}) into {result.token_file} (mode 0600)"
    )
    if result.previous_accessor:
        print(
            f"the previous token in {result.token_file} (accessor {result.previous_accessor}) "
            "stays valid until it expires or you revoke it: "
            f"bao token revoke -accessor {result.previous_accessor}"
        )
    ca = f" --ca-file {args.ca_file}" if args.ca_file is not None else ""
    print("create a volume with it:")
    print(
        f"  encfs init CIPHER_DIR --vault {result.vault_url} --token-file {result.token_file}{ca}"
    )
    return ExitCode.OK


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
    "VAULT_TIMEOUT": "--vault-timeout",
    "KEY_RELEASE": "--key-release",
    "CHECK_INTERVAL": "--check-interval",
    "OFFLINE_GRACE": "--offline-grace",
    "ON_REVOKE": "--on-revoke",
    "SUSPENDED_ERRNO": "--suspended-errno",
    "AUDIT_LOG": "--audit-log",
    "LOG_FILE": "--log-file",
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


def _expand_config(argv: list[str]) -> list[str]:
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
    return rest[: m + 1] + read_config(Path(argv[i + 1])) + rest[m + 1 :]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        argv = _expand_config(argv)
    except ConfigError as exc:
        print(f"encfs: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        return _run(parser, argv)
    except BrokenPipeError:
        # The reader went away (`encfs status | head -1`): stop quietly, like other tools.
        # Point stdout at /dev/null so that the interpreter's final flush cannot fail again.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return ExitCode.FAILURE


def _run(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """Parse ``argv`` and run the command; flushes stdout before returning (a reader that
    went away raises ``BrokenPipeError`` here, for ``main``)."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        sys.stdout.flush()
        return int(exc.code) if isinstance(exc.code, int) else ExitCode.USAGE
    setup_logging(verbosity(args))
    code = _dispatch(parser, args, argv)
    sys.stdout.flush()
    return code


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    try:
        if args.command == "init":
            return cmd_init(args)
        if args.command == "mount":
            return cmd_mount(args, argv)
        if args.command in ("unmount", "umount"):
            return cmd_unmount(args)
        if args.command == "info":
            return cmd_info(args)
        if args.command == "fsck":
            return cmd_fsck(args)
        if args.command == "rotate":
            return cmd_rotate(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "vault":
            return cmd_vault(args)
        if args.command == "systemd":
            return cmd_systemd(args)
        if args.command == "pin":
            return cmd_pin(args)
        if args.command == "header":
            return cmd_header(args)
    except errors.EncfsError as exc:
        print(f"encfs: error: {exc}", file=sys.stderr)
        hint = getattr(exc, "hint", "")
        if hint:
            print(f"encfs: hint: {hint}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        return ExitCode.FAILURE
    except BrokenPipeError:
        raise
    except OSError as exc:
        print(f"encfs: error: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    parser.error(f"unknown command {args.command}")
    return ExitCode.USAGE  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
