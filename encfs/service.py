"""Install a volume as a systemd service: its config file, its token, the units, enablement.

``encfs systemd install NAME`` writes ``/etc/encfs/NAME.conf`` (the settings
``encfs mount --config`` reads), copies the host's vault token to ``/etc/encfs/NAME.token``
(0600; the unit passes it as the credential ``vault-token``) and, for the second vault of a
double-encrypted volume, its own token to ``NAME.token2`` (credential ``vault2-token``),
installs ``encfs@.service``
and ``encfs-vault.service`` into ``/etc/systemd/system`` with ``ExecStart=`` pointing at
this installation of encfs, reloads systemd and enables ``encfs@NAME.service``. Every step
is idempotent; ``dry_run`` only says what would be done. Raises ``ServiceError`` with a
message saying what to fix.
"""

from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from encfs.errors import EncfsError
from encfs.hostfiles import write_file_atomic

UNIT_SOURCE = Path(__file__).resolve().parent.parent / "systemd"
UNITS = ("encfs@.service", "encfs-vault.service")
SHIPPED_EXEC = "/usr/local/bin/encfs"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class ServiceError(EncfsError):
    """A service cannot be installed as asked (bad name, missing file, systemctl failed)."""


@dataclass(frozen=True)
class ServicePlan:
    """One volume's service, as the operator asked for it."""

    name: str
    settings: dict[str, str]
    """Config keys (``CIPHER_DIR``, ``MOUNTPOINT``, ``VAULT``, ...), as in README."""
    token_file: Path | None = None
    token2_file: Path | None = None
    """The host's token for the second vault of a double-encrypted volume."""
    etc_dir: Path = Path("/etc/encfs")
    unit_dir: Path = Path("/etc/systemd/system")
    enable: bool = True
    start: bool = False
    exec_command: str = field(default_factory=lambda: f"{shlex.quote(sys.executable)} -m encfs")


def render_unit(unit: str, exec_command: str) -> str:
    """The shipped unit ``unit`` with ``ExecStart=`` running ``exec_command``."""
    try:
        text = (UNIT_SOURCE / unit).read_text(encoding="utf-8")
    except OSError as exc:
        raise ServiceError(
            f"cannot read the unit {unit} from {UNIT_SOURCE}: {exc.strerror} (install encfs "
            "from its source tree, or copy systemd/*.service by hand)"
        ) from None
    return text.replace(f"ExecStart={SHIPPED_EXEC} ", f"ExecStart={exec_command} ")


def config_text(plan: ServicePlan) -> str:
    lines = [
        f"# encfs volume {plan.name!r}: read by encfs@{plan.name}.service",
        "# (`encfs mount --config`); format and keys: README, 'Run it as a service'.",
    ]
    for key, value in plan.settings.items():
        quoted = f'"{value}"' if any(c.isspace() for c in value) else value
        lines.append(f"{key}={quoted}")
    return "\n".join(lines) + "\n"


def install(plan: ServicePlan, *, dry_run: bool, say: Callable[[str], None]) -> None:
    """Carry out ``plan`` (see module docstring); with ``dry_run`` only ``say`` each step."""
    if not _NAME_RE.fullmatch(plan.name):
        raise ServiceError(
            f"invalid service name {plan.name!r}: letters, digits, '-', '_', '.' (max 64)"
        )
    conf = plan.etc_dir / f"{plan.name}.conf"
    token = plan.etc_dir / f"{plan.name}.token"
    token2 = plan.etc_dir / f"{plan.name}.token2"
    unit = f"encfs@{plan.name}.service"
    for given in (plan.token_file, plan.token2_file):
        if given is not None and not given.is_file():
            raise ServiceError(f"token file {given} does not exist")
    mountpoint = Path(plan.settings.get("MOUNTPOINT", ""))
    steps: list[tuple[str, Callable[[], None]]] = [
        (f"mkdir -m 0700 -p {plan.etc_dir}", lambda: plan.etc_dir.mkdir(0o700, True, True)),
        (f"mkdir -p {mountpoint} (the mount point)", lambda: mountpoint.mkdir(0o755, True, True)),
        (
            f"write {conf} (0600):\n" + _indent(config_text(plan)),
            lambda: write_file_atomic(conf, config_text(plan).encode(), 0o600),
        ),
    ]
    if plan.token_file is not None:
        src = plan.token_file
        steps.append(
            (
                f"install the vault token {src} as {token} (0600)",
                lambda: write_file_atomic(token, src.read_bytes(), 0o600),
            )
        )
    elif not token.exists() and plan.settings.get("EPHEMERAL") != "yes":
        say(f"note: no --token-file: put the host token in {token} (0600) before starting")
    if plan.token2_file is not None:
        src2 = plan.token2_file
        steps.append(
            (
                f"install the second vault's token {src2} as {token2} (0600)",
                lambda: write_file_atomic(token2, src2.read_bytes(), 0o600),
            )
        )
    elif (
        plan.settings.get("VAULT2")
        and not plan.settings.get("TOKEN_FILE2")
        and not plan.settings.get("CLIENT_CERT2")
        and not token2.exists()
    ):
        say(
            f"note: no --vault2-token-file: put the host's token for the second vault in "
            f"{token2} (0600) before starting"
        )
    steps.append((f"mkdir -p {plan.unit_dir}", lambda: plan.unit_dir.mkdir(0o755, True, True)))
    for name in UNITS:
        text = render_unit(name, plan.exec_command)
        path = plan.unit_dir / name
        steps.append(
            (
                f"write {path} (ExecStart runs {plan.exec_command})",
                functools.partial(write_file_atomic, path, text.encode(), 0o644),
            )
        )
    steps.append(("systemctl daemon-reload", lambda: _systemctl("daemon-reload")))
    if plan.enable:
        steps.append((f"systemctl enable {unit}", lambda: _systemctl("enable", unit)))
    if plan.start:
        steps.append((f"systemctl start {unit}", lambda: _systemctl("start", unit)))
    for what, action in steps:
        say(("would " if dry_run else "") + what)
        if not dry_run:
            action()


def _indent(text: str) -> str:
    return "".join(f"    {line}\n" for line in text.splitlines())


def _systemctl(*args: str) -> None:
    tool = shutil.which("systemctl")
    if tool is None:
        raise ServiceError("systemctl not found: is this host run by systemd?")
    proc = subprocess.run([tool, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ServiceError(f"systemctl {' '.join(args)} failed: {proc.stderr.strip()}")
