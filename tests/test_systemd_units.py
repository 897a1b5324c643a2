"""The systemd units and ``encfs systemd install``, checked on this host without a running
systemd: ``systemd-analyze verify`` (any output fails), the security exposure score, and
what the installer would do. Booting them for real is tests/vm (nspawn, qemu)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from encfs import service
from encfs.cli import ExitCode
from tests.conftest import SecondKey
from tests.harness import MakeVolume, Volume, encfs

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (Debian systemd)"
)

REPO = Path(__file__).resolve().parent.parent


def _render_all(tmp_path: Path, exec_command: str) -> dict[str, Path]:
    """Every unit as installed, the template also as a concrete instance (``verify`` checks
    templates only through an instance)."""
    out = {}
    for unit in service.UNITS:
        path = tmp_path / unit
        path.write_text(service.render_unit(unit, exec_command))
        out[unit] = path
    instance = subprocess.run(
        ["systemd-escape", "--template=encfs@.service", "data-volume"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    inst = tmp_path / instance
    inst.write_text(service.render_unit("encfs@.service", exec_command))
    out["instance"] = inst
    return out


@pytest.mark.parametrize("how", ["shipped", "installed"])
def test_units_verify_without_a_word(tmp_path: Path, how: str) -> None:
    if how == "shipped":
        exec_command = service.SHIPPED_EXEC
        if not Path(exec_command).exists():
            pytest.skip(f"{exec_command} missing (scripts/install links it when run as root)")
    else:
        exec_command = service.ServicePlan(name="x", settings={}).exec_command
    units = _render_all(tmp_path, exec_command)
    proc = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            str(units["encfs-vault.service"]),
            str(units["instance"]),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", (
        proc.stdout + proc.stderr
    )


def _exposure(unit: Path) -> float:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True, text=True
    )
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    return float(found.group(1))


def test_security_exposure_stays_low(tmp_path: Path) -> None:
    units = _render_all(tmp_path, service.ServicePlan(name="x", settings={}).exec_command)
    # encfs@ cannot use any option that makes a mount namespace (the mount would vanish
    # from the host): 4.9 is what the rest buys. The vault has no such limit.
    assert _exposure(units["instance"]) <= 5.0
    assert _exposure(units["encfs-vault.service"]) <= 2.0


def test_no_namespace_hardening_in_the_volume_unit() -> None:
    text = (REPO / "systemd" / "encfs@.service").read_text()
    settings = [
        line.split("=", 1)[0]
        for line in text.splitlines()
        if line and not line.startswith(("#", "["))
    ]
    forbidden = {
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateMounts",
        "ReadWritePaths",
        "ReadOnlyPaths",
        "InaccessiblePaths",
        "BindPaths",
        "TemporaryFileSystem",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectProc",
        "ProtectHostname",
        "ProtectClock",
        "PrivateUsers",
        "MountFlags",
    }
    assert not forbidden & set(settings)
    assert "LoadCredential" in settings and "WatchdogSec" in settings
    assert re.search(r"^RestartPreventExitStatus=.*\b23\b", text, re.M)


def test_install_dry_run_says_everything_and_touches_nothing(tmp_path: Path) -> None:
    token = tmp_path / "host.token"
    token.write_text("t\n")
    token.chmod(0o600)
    etc, units = tmp_path / "etc", tmp_path / "units"
    proc = encfs("systemd", "install", "data", "--cipher-dir", "/srv/cipher", "--mountpoint",
                 "/srv/data", "--vault", "transit+https://vault.example:8200/transit/data",
                 "--token-file", token, "--set", "CHECK_INTERVAL=10",
                 "--set", "OPTIONS=allow_other,default_permissions", "--start", "--dry-run",
                 "--etc-dir", etc, "--unit-dir", units)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for expected in (
        f"would write {etc}/data.conf (0600)",
        "CIPHER_DIR=/srv/cipher",
        "CHECK_INTERVAL=10",
        f"as {etc}/data.token (0600)",
        "VAULT=transit+https://vault.example:8200/transit/data",
        f"would write {units}/encfs@.service",
        "would systemctl daemon-reload",
        "would systemctl enable encfs@data.service",
        "would systemctl start encfs@data.service",
    ):
        assert expected in out, out
    assert "t\n" not in out  # never the token itself
    assert not etc.exists() and not units.exists()


def test_install_needs_a_pinned_vault(tmp_path: Path) -> None:
    """The service may send its token only to a vault written in its config, never to the
    URL in the cipher dir: without --vault (or --set VAULT=) install refuses."""
    proc = encfs("systemd", "install", "data", "--cipher-dir", "/srv/cipher", "--mountpoint",
                 "/srv/data", "--dry-run", "--etc-dir", tmp_path / "etc",
                 "--unit-dir", tmp_path / "units")  # fmt: skip
    assert proc.returncode == ExitCode.VAULT_NOT_PINNED, proc.stderr
    assert "needs --vault URL" in proc.stderr


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["bad/name", "--cipher-dir", "/c", "--mountpoint", "/m"], "invalid service name"),
        (
            ["ok", "--cipher-dir", "/c", "--mountpoint", "/m", "--set", "NOPE=1"],
            "expected KEY=VALUE",
        ),
        (
            ["ok", "--cipher-dir", "/c", "--mountpoint", "/m", "--token-file", "/no/such"],
            "does not exist",
        ),
    ],
)
def test_install_refuses_bad_input(args: list[str], complaint: str) -> None:
    proc = encfs("systemd", "install", *args, "--vault", "transit+https://v:8200/t/k", "--dry-run")
    assert proc.returncode != 0
    assert complaint in proc.stderr


def test_install_of_a_double_volume_gets_its_second_vault_and_token(tmp_path: Path) -> None:
    token, token2 = tmp_path / "host.token", tmp_path / "host2.token"
    for path, text in ((token, "secret-one\n"), (token2, "secret-two\n")):
        path.write_text(text)
        path.chmod(0o600)
    etc, units = tmp_path / "etc", tmp_path / "units"
    proc = encfs("systemd", "install", "data", "--cipher-dir", "/srv/cipher", "--mountpoint",
                 "/srv/data", "--vault", "transit+https://vault.example:8200/transit/data",
                 "--token-file", token, "--vault2", "kmip://kms.example:5696/outer",
                 "--vault2-token-file", token2, "--dry-run", "--etc-dir", etc,
                 "--unit-dir", units)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for expected in (
        "VAULT2=kmip://kms.example:5696/outer",
        f"install the second vault's token {token2} as {etc}/data.token2 (0600)",
        f"as {etc}/data.token (0600)",
    ):
        assert expected in proc.stdout, proc.stdout
    assert "secret-" not in proc.stdout  # never a token itself


def test_the_unit_passes_the_second_vaults_own_credential() -> None:
    text = (service.UNIT_SOURCE / "encfs@.service").read_text()
    assert "LoadCredential=vault2-token:/etc/encfs/%i.token2" in text
    assert "SetCredential=vault2-token:-" in text


def test_install_of_a_double_volume_needs_vault2(
    make_volume: MakeVolume, second_key: SecondKey, tmp_path: Path
) -> None:
    vol: Volume = make_volume(double=True, mount=False)
    common: list[str | Path] = [
        "--cipher-dir", vol.cipher_dir, "--mountpoint", vol.mountpoint, "--vault",
        vol.vault_url, "--dry-run", "--etc-dir", tmp_path / "etc", "--unit-dir",
        tmp_path / "units",
    ]  # fmt: skip
    proc = encfs("systemd", "install", "data", *common)
    assert proc.returncode == ExitCode.VAULT_NOT_PINNED, proc.stderr
    assert "--vault2" in proc.stderr and second_key.url in proc.stderr
    proc = encfs("systemd", "install", "data", *common, "--vault2", second_key.url)
    assert proc.returncode == 0, proc.stderr
    assert "note: no --vault2-token-file" in proc.stdout
    proc = encfs("systemd", "install", "scratch", "--cipher-dir", tmp_path / "s", "--mountpoint",
                 tmp_path / "m", "--ephemeral", "--vault2", second_key.url, "--dry-run",
                 "--etc-dir", tmp_path / "etc", "--unit-dir", tmp_path / "units")  # fmt: skip
    assert proc.returncode == ExitCode.USAGE
    assert "ephemeral volume is single-layer" in proc.stderr


def test_install_pins_every_node_of_a_vault_cluster(tmp_path: Path) -> None:
    nodes = ["https://vault-1.internal:8200", "https://vault-2.internal:8200"]
    proc = encfs("systemd", "install", "data", "--cipher-dir", "/srv/cipher", "--mountpoint",
                 "/srv/data", "--vault", nodes[0], "--vault", nodes[1], "--dry-run",
                 "--etc-dir", tmp_path / "etc", "--unit-dir", tmp_path / "units")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f'VAULT="{nodes[0]} {nodes[1]}"' in proc.stdout
    proc = encfs("systemd", "install", "data", "--cipher-dir", "/srv/cipher", "--mountpoint",
                 "/srv/data", "--vault", nodes[0], "--vault", nodes[0], "--dry-run",
                 "--etc-dir", tmp_path / "etc", "--unit-dir", tmp_path / "units")  # fmt: skip
    assert proc.returncode == ExitCode.VAULT_CONFIG
    assert "twice" in proc.stderr
