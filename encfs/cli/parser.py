"""The ``encfs`` argparse tree: every command, option and --help text, and the value types
its options take."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import typing
from pathlib import Path
from typing import Any

from encfs import __version__, pins
from encfs import format as fmt
from encfs.audit import DEFAULT_AUDIT_LOG
from encfs.cli.output import ExitCode
from encfs.fs import FsOptions
from encfs.vault import VaultSettings, redact_tokens
from encfs.watcher import WatchSettings

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
  --vault URL|https://HOST:PORT, repeated for the nodes of a cluster (or VAULT= in the
  config file, space-separated), $VAULT_ADDR, $BAO_ADDR (one address; CA: --ca-file,
  $VAULT_CACERT, $BAO_CACERT). Never the URL in the volume header alone.

double-encrypted volumes (init --double): a second vault key (KEK 2) with its own access:
  --vault2 URL|https://HOST:PORT (VAULT2=), --vault2-token-file FILE (TOKEN_FILE2=, or
  $CREDENTIALS_DIRECTORY/vault2-token), --vault2-ca-file, --vault2-client-cert/-key.
  No environment variable stands in for them.

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
  encfs init /srv/cipher2 --double --token-file /etc/encfs/host.token \\
      --vault transit+https://vault.example:8200/transit/host-key \\
      --vault2 kmip://kms.example:5696/KEY-ID --vault2-client-cert /etc/encfs/host.pem
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


def _vault2_args(p: argparse.ArgumentParser, *, init: bool = False) -> None:
    """The second vault of a double-encrypted volume: where (``--vault2``) and with which
    credential; never the first vault's (``vault.second_vault_settings``)."""
    g = p.add_argument_group(
        "second vault (double-encrypted volumes: KEK 2, key slot 1; its own credential)"
    )
    g.add_argument(
        "--vault2",
        dest="vault2_url",
        metavar="URL",
        help="the vault key (KEK 2) that wraps the second volume key: "
        "transit+https://HOST:PORT/MOUNT/KEY or kmip://HOST:PORT/KEY-ID; with --double"
        if init
        else "the vault of KEK 2: a full vault URL or an address https://HOST:PORT (the "
        "header's key slot 1 mount and key on it). Required for a double-encrypted volume "
        "(exit 9 without it); the URL in the header alone is never used",
    )
    g.add_argument(
        "--vault2-token-file",
        type=_abs_path,
        metavar="FILE",
        help="file holding the host's token for the second vault (mode 0600); default "
        "$CREDENTIALS_DIRECTORY/vault2-token. The first vault's token is never used for it",
    )
    g.add_argument(
        "--vault2-ca-file",
        type=_abs_path,
        metavar="FILE",
        help="CA bundle of the second vault's TLS certificate (default: system CAs)",
    )
    g.add_argument(
        "--vault2-client-cert",
        type=_abs_path,
        metavar="FILE",
        help="PEM client certificate for the second vault (required for kmip://)",
    )
    g.add_argument(
        "--vault2-client-key",
        type=_abs_path,
        metavar="FILE",
        help="PEM private key of --vault2-client-cert (default: inside the certificate file)",
    )


def _vault_override_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--vault",
        dest="vault_url",
        action="append",
        metavar="URL",
        help="the vault to use: a full vault URL (it wins over the one in the volume "
        "header) or an address https://HOST:PORT (the header's mount and key on it). Give "
        "it once per node of a vault cluster (or several separated by spaces): they are "
        "tried in order, failing over when a node cannot serve (never when it refuses). "
        "Default: $VAULT_ADDR / $BAO_ADDR (one address). The header's URL alone is never "
        "used: it is not authenticated before the key is unwrapped, so the host's token "
        "would go wherever an edited header points (exit 9, vault-not-pinned)",
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
        help="transit+https://HOST:PORT/MOUNT/KEY (transit+http only to loopback) or "
        "kmip://HOST:PORT/KEY-ID",
    )
    p.add_argument(
        "--double",
        action="store_true",
        help="double encryption: a second, independent volume key from the vault key "
        "--vault2 (KEK 2; another vault or another key in the same one), and every block "
        "sealed twice: AES-256-GCM under the first key inside ChaCha20-Poly1305 under the "
        "second. Names and metadata: one AES layer keyed by both. Needs --vault2",
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
    _vault2_args(p, init=True)

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
    p.add_argument(
        "--metrics-file",
        type=_abs_path,
        metavar="FILE",
        help="keep the mount's Prometheus metrics (those of `encfs status --prometheus`) in "
        "FILE for node_exporter's textfile collector: rewritten atomically every check "
        "interval, removed at unmount",
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
        help="error returned while suspended (default: "
        f"{errno.errorcode[_default(FsOptions, 'suspended_errno')]}; e.g. EIO, EPERM)",
    )
    p.add_argument(
        "--double",
        action="store_true",
        help=argparse.SUPPRESS,  # refused with a message: see cli.mount
    )
    _vault_args(p)
    _vault2_args(p)

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
    _vault2_args(p)

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
        "token needs update on MOUNT/rewrap/KEY and MOUNT/decrypt/KEY. A double-encrypted "
        "volume has two KEKs: --kek chooses which slot(s) to re-wrap; both vaults must "
        "unwrap either way (the header's tag is keyed by both volume keys).",
    )
    p.add_argument("cipher_dir", type=_abs_path, metavar="CIPHERDIR")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--kek",
        choices=("1", "2", "both"),
        default="both",
        help="which KEK's slot to re-wrap on a double-encrypted volume: 1 (--vault), "
        "2 (--vault2) or both (default: %(default)s; a single-layer volume has KEK 1 only)",
    )
    _vault_override_arg(p)
    _vault_args(p)
    _vault2_args(p)

    p = sub.add_parser(
        "rekey",
        help="re-encrypt everything under a new volume key (online, crash-safe)",
        description="For a volume key that may have been exposed: ask the vault for a new "
        "volume key and re-seal every name, block, symlink target and xattr under it, like "
        "cryptsetup reencrypt. Works while the volume is mounted and in use (the daemon "
        "does the work; this command starts it and shows its progress) or on a volume that "
        "is not mounted (this command does it, holding the volume's lock). Crash-safe and "
        "resumable: after a crash or kill at any point the volume mounts and reads as "
        "before, and running rekey again finishes the job. When it is done, the old wrapped "
        "key is gone from the header and from encfs.volume.prev, and the old key decrypts "
        "nothing in the volume; header backups made before still unwrap the old key, which "
        "opens nothing any more. Entries that open under neither key (see encfs fsck) "
        "keep it from finishing: exit 30. The host token needs update on "
        "MOUNT/datakey/plaintext/KEY and MOUNT/decrypt/KEY (what init and mount use). A "
        "double-encrypted volume gets two new keys, one from each vault (--vault2 ...).",
    )
    p.add_argument("cipher_dir", type=_abs_path, metavar="CIPHERDIR")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress on stderr (the default): a bar updated in place when stderr is a "
        'terminal, else one JSON object per second ({"kind": "progress", ...}) and one at '
        "the end. --no-progress: none",
    )
    _vault_override_arg(p)
    _vault_args(p)
    _vault2_args(p)

    p = sub.add_parser(
        "status",
        help="state of mounted volumes (active, offline-grace, suspended and why)",
        description="Ask the daemon serving MOUNTPOINT (or every encfs daemon on this host) "
        "for its state: active / offline-grace / suspended, since when and why, key and "
        "KEK version, vault reachability and last check, token TTL, counters, memory "
        "locking, PID and RSS. Answered over a root-only unix socket in /run/encfs.",
    )
    p.add_argument("mountpoint", type=_abs_path, nargs="?", metavar="MOUNTPOINT")
    fmt_group = p.add_mutually_exclusive_group()
    fmt_group.add_argument("--json", action="store_true", help="machine-readable output")
    fmt_group.add_argument(
        "--prometheus",
        action="store_true",
        help="Prometheus metrics (text exposition format): state, last check, check "
        "duration, vault reachability, operation counters, labelled by mountpoint and "
        "volume_id",
    )

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
        action="append",
        metavar="URL",
        help="the vault the service may send the host's token to (VAULT= in the config; "
        "required unless --ephemeral): a full vault URL, or https://HOST:PORT with the "
        "volume header's mount and key; repeated for each node of a vault cluster",
    )
    p.add_argument(
        "--token-file",
        type=_abs_path,
        metavar="FILE",
        help="the host's vault token, copied to /etc/encfs/NAME.token (0600)",
    )
    p.add_argument(
        "--vault2",
        metavar="URL",
        help="a double-encrypted volume's second vault (VAULT2= in the config; required "
        "for such a volume): a full vault URL, or https://HOST:PORT with the header's key "
        "slot 1 mount and key",
    )
    p.add_argument(
        "--vault2-token-file",
        type=_abs_path,
        metavar="FILE",
        help="the host's token for the second vault, copied to /etc/encfs/NAME.token2 "
        "(0600; the unit passes it as the credential vault2-token)",
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
        help="persistent OpenBao (Raft storage, TLS, auto-unseal from DATA); one node or a "
        "node of a cluster",
        description="Run a persistent OpenBao with Raft storage in DATA (mode 0700), TLS "
        "on the listen address with a CA of its own (DATA/tls/ca.pem). The first start "
        "initialises it with one unseal key kept in DATA/init.json (0600) and prints the "
        "trade-off: the unseal key sits on the same disk as the data, so this protects "
        "volume keys from other hosts and from a stolen volume, not from theft of this "
        "host's disk. Every start unseals it. Runs in the foreground. A cluster: start "
        "the first node with --node-id, copy its init.json, tls/ca.pem and tls/ca-key.pem "
        "into each other node's DATA, and start those with their own --node-id and --join "
        "https://FIRST:PORT (see README, 'A vault cluster').",
    )
    p.add_argument("--data", type=_abs_path, required=True, metavar="DIR")
    p.add_argument("--listen", default="127.0.0.1:8200", metavar="HOST:PORT")
    p.add_argument(
        "--cluster-listen",
        default=None,
        metavar="HOST:PORT",
        help="Raft's port, where the nodes of a cluster talk to each other "
        "(default: the port after --listen's)",
    )
    p.add_argument(
        "--node-id",
        default=None,
        metavar="ID",
        help="this node's name in the cluster, unique among its nodes (default: encfs-vault)",
    )
    p.add_argument(
        "--join",
        default=None,
        metavar="https://HOST:PORT",
        help="on the first start, join the cluster of the node at this address instead of "
        "initialising a new vault (DATA must hold init.json, tls/ca.pem and tls/ca-key.pem "
        "copied from a node); ignored once the node is a member",
    )
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
