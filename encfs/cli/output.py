"""What the user sees besides a command's own lines: the exit codes, the error -> exit code
mapping, and the logging set-up."""

from __future__ import annotations

import enum
import logging
import logging.handlers
import os
import sys
from pathlib import Path

from encfs import errors


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
    (errors.RekeyIncomplete, ExitCode.CORRUPT),
)


def exit_code_for(exc: BaseException) -> ExitCode:
    for kind, code in _ERROR_CODES:
        if isinstance(exc, kind):
            return code
    return ExitCode.FAILURE


def as_exit_code(code: int) -> ExitCode:
    return ExitCode(code) if code in ExitCode._value2member_map_ else ExitCode.FAILURE


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
