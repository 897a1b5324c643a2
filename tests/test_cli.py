"""The CLI end to end: init, info, mount, unmount, and one exit code per refusal."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

from encfs.cli import ExitCode
from tests.conftest import SecondKey, TransitKey
from tests.harness import MakeVolume, Volume, encfs, is_mounted, wait_until
from tests.openbao import OpenBao


def test_init_info_mount_roundtrip(make_volume: MakeVolume, transit_key: TransitKey) -> None:
    vol: Volume = make_volume()
    (vol.mountpoint / "hello.txt").write_text("hello, vault\n")
    info = json.loads(encfs("info", vol.cipher_dir, "--json", check=True).stdout)
    assert info["format_version"] == 1
    assert (info["feature_flags"], info["features"]) == (1, ["dirid-links"])
    assert info["block_size"] == 4096
    assert info["vault"] == transit_key.url
    assert info["kek_version"] == 1
    assert info["wrapped_key"].startswith("vault:v1:")
    assert len(bytes.fromhex(info["volume_id"])) == 16
    pid = vol.daemon_pid()
    vol.unmount()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the daemon exited (after wiping its keys)
    vol.mount()
    assert (vol.mountpoint / "hello.txt").read_text() == "hello, vault\n"


def test_info_has_no_secret_and_needs_no_vault(make_volume: MakeVolume) -> None:
    vol: Volume = make_volume(mount=False)
    proc = encfs("info", vol.cipher_dir, env={"PATH": os.environ["PATH"]})
    assert proc.returncode == 0, proc.stderr
    assert "wrapped key" in proc.stdout
    assert re.search(r"^features +dirid-links$", proc.stdout, re.M), proc.stdout


def test_init_refuses_non_empty_dir(tmp_path: Path, transit_key: TransitKey) -> None:
    target = tmp_path / "c"
    target.mkdir()
    (target / "stray").write_text("x")
    proc = encfs("init", target, "--vault", transit_key.url, env=transit_key.env)
    assert proc.returncode == ExitCode.VOLUME_EXISTS
    assert "not empty" in proc.stderr
    assert (target / "stray").read_text() == "x"


def test_init_rejects_bad_block_size(tmp_path: Path, transit_key: TransitKey) -> None:
    proc = encfs(
        "init",
        tmp_path / "c",
        "--vault",
        transit_key.url,
        "--block-size",
        "5000",
        env=transit_key.env,
    )
    assert proc.returncode == ExitCode.USAGE
    assert "multiple of 4096" in proc.stderr


def _mount_fails(
    vol: Volume, env: dict[str, str], *extra: str | Path, vault: str | None = None
) -> tuple[int, str]:
    """Mount with ``--vault vault`` (default: the volume's) and ``extra``, which fails."""
    url = vault or vol.vault_url
    proc = encfs("mount", vol.cipher_dir, vol.mountpoint, "--vault", url, *extra, env=env)
    assert not is_mounted(vol.mountpoint), "nothing may be mounted when the vault refuses"
    return proc.returncode, proc.stderr


def test_mount_revoked_token(
    make_volume: MakeVolume, openbao: OpenBao, transit_key: TransitKey
) -> None:
    vol: Volume = make_volume(mount=False)
    token = openbao.make_token(["default"])
    openbao.admin.auth.token.revoke(token)
    code, err = _mount_fails(vol, {**transit_key.env, "VAULT_TOKEN": token})
    assert code == ExitCode.VAULT_DENIED
    assert "permission denied" in err
    assert token not in err


def test_mount_key_missing(
    make_volume: MakeVolume, transit_key: TransitKey, openbao: OpenBao
) -> None:
    vol: Volume = make_volume(mount=False)
    code, err = _mount_fails(vol, transit_key.env, vault=openbao.url_for("no-such-key"))
    assert code == ExitCode.VAULT_KEY_NOT_FOUND
    assert "encryption key not found" in err


def test_mount_vault_unreachable(make_volume: MakeVolume, transit_key: TransitKey) -> None:
    vol: Volume = make_volume(mount=False)
    from tests.openbao import free_port

    code, err = _mount_fails(
        vol,
        transit_key.env,
        "--vault-timeout",
        "2",
        vault=f"transit+http://127.0.0.1:{free_port()}/transit/x",
    )
    assert code == ExitCode.VAULT_UNREACHABLE
    assert "cannot reach vault" in err


def test_mount_vault_sealed(tmp_path: Path) -> None:
    with OpenBao() as bao:
        bao.create_key("k")
        env = {"PATH": os.environ["PATH"], "VAULT_TOKEN": bao.root_token}
        vol = Volume(tmp_path / "c", tmp_path / "p", bao.url_for("k"), env)
        vol.mountpoint.mkdir()
        vol.init()
        bao.admin.sys.seal()
        code, err = _mount_fails(vol, env)
        assert code == ExitCode.VAULT_SEALED
        assert "sealed" in err


def test_mount_without_token(make_volume: MakeVolume) -> None:
    vol: Volume = make_volume(mount=False)
    code, err = _mount_fails(vol, {"PATH": os.environ["PATH"]})
    assert code == ExitCode.VAULT_CREDENTIALS
    assert "--token-file" in err


def test_token_file_must_be_private(
    make_volume: MakeVolume, transit_key: TransitKey, tmp_path: Path
) -> None:
    vol: Volume = make_volume(mount=False)
    token_file = tmp_path / "tok"
    token_file.write_text(transit_key.token)
    token_file.chmod(0o644)
    env = {"PATH": os.environ["PATH"]}
    code, err = _mount_fails(vol, env, "--token-file", str(token_file))
    assert code == ExitCode.VAULT_CREDENTIALS
    assert "chmod 600" in err
    token_file.chmod(0o600)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    proc = encfs(
        "mount",
        vol.cipher_dir,
        vol.mountpoint,
        "--vault",
        vol.vault_url,
        "--token-file",
        token_file,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    vol.unmount()


def test_least_privilege_host_token_mounts(make_volume: MakeVolume, host_token: Path) -> None:
    vol: Volume = make_volume(mount=False)
    env = {"PATH": os.environ["PATH"]}
    proc = encfs(
        "mount",
        vol.cipher_dir,
        vol.mountpoint,
        "--vault",
        vol.vault_url,
        "--token-file",
        host_token,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    (vol.mountpoint / "f").write_bytes(b"x" * 10000)
    vol.unmount()


def test_mount_twice_refused(vol: Volume) -> None:
    proc = encfs("mount", vol.cipher_dir, vol.mountpoint, env=vol.env)
    assert proc.returncode == ExitCode.MOUNT_FAILED
    assert "already a mount point" in proc.stderr


def test_unmount_not_mounted(tmp_path: Path) -> None:
    proc = encfs("unmount", tmp_path)
    assert proc.returncode == ExitCode.NOT_MOUNTED


def test_unmount_busy(vol: Volume) -> None:
    handle = open(vol.mountpoint / "busy", "w")  # noqa: SIM115
    try:
        proc = encfs("unmount", vol.mountpoint)
        assert proc.returncode == ExitCode.BUSY
        assert is_mounted(vol.mountpoint)
    finally:
        handle.close()


def test_no_volume(tmp_path: Path) -> None:
    proc = encfs("info", tmp_path)
    assert proc.returncode == ExitCode.NO_VOLUME
    assert "encfs init" in proc.stderr


def test_help_documents_exit_codes() -> None:
    out = encfs("--help", check=True).stdout
    for code in ExitCode:
        assert f"{code.value:3d}  {code.name.lower().replace('_', '-')}" in out
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for code in ExitCode:
        assert f"| {code.value} | {code.name.lower().replace('_', '-')} |" in readme


# --- vault access in production shape (issue 3) -------------------------------------------------


def test_mount_preflight_names_the_missing_capability(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
) -> None:
    vol: Volume = make_volume(mount=False)
    k, m = transit_key.name, openbao.mount
    openbao.write_policy(
        f"no-decrypt-{k}",
        f"""
path "{m}/keys/{k}" {{ capabilities = ["read"] }}
path "sys/capabilities-self" {{ capabilities = ["update"] }}
""",
    )
    token = openbao.make_token([f"no-decrypt-{k}"])
    code, err = _mount_fails(vol, {**transit_key.env, "VAULT_TOKEN": token}, *vol.audit_args())
    assert code == ExitCode.VAULT_DENIED
    assert f"token lacks 'update' on {m}/decrypt/{k}" in err
    assert token not in err
    last = vol.audit_events()[-1]
    assert (last["event"], last["result"], last["error"]) == (
        "unwrap",
        "error",
        "VaultPermissionDenied",
    )
    assert "lacks 'update'" in str(last["message"])


def test_mount_soft_deleted_key(
    make_volume: MakeVolume, openbao: OpenBao, transit_key: TransitKey
) -> None:
    vol: Volume = make_volume(mount=False)
    openbao.soft_delete_key(transit_key.name)
    try:
        code, err = _mount_fails(vol, transit_key.env, *vol.audit_args())
    finally:
        openbao.restore_key(transit_key.name)
    assert code == ExitCode.VAULT_KEY_DISABLED
    assert "soft-deleted" in err and "soft-delete-restore" in err
    last = vol.audit_events()[-1]
    assert (last["event"], last["result"], last["error"]) == ("unwrap", "error", "VaultKeyDisabled")


def test_mount_with_wrong_ca(tmp_path: Path) -> None:
    with OpenBao(tls=True) as bao:
        bao.create_key("k")
        assert bao.ca_file is not None
        env = {"PATH": os.environ["PATH"], "VAULT_TOKEN": bao.root_token}
        vol = Volume(tmp_path / "c", tmp_path / "p", bao.url_for("k"), env)
        vol.mountpoint.mkdir()
        encfs(
            "init",
            vol.cipher_dir,
            "--vault",
            vol.vault_url,
            "--ca-file",
            bao.ca_file,
            env=env,
            check=True,
        )
        code, err = _mount_fails(vol, env)  # system CAs do not know the dev CA
        assert code == ExitCode.VAULT_TLS
        assert "certificate verification failed" in err
        proc = encfs(
            "mount",
            vol.cipher_dir,
            vol.mountpoint,
            "--vault",
            vol.vault_url,
            "--ca-file",
            bao.ca_file,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr
        vol.unmount()


def test_mount_waits_for_a_sealed_vault_within_the_timeout(tmp_path: Path) -> None:
    import threading
    import time

    with OpenBao() as bao:
        bao.create_key("k")
        env = {"PATH": os.environ["PATH"], "VAULT_TOKEN": bao.root_token}
        vol = Volume(tmp_path / "c", tmp_path / "p", bao.url_for("k"), env)
        vol.mountpoint.mkdir()
        vol.init()
        bao.seal()
        timer = threading.Timer(2.0, bao.unseal)
        timer.start()
        t0 = time.monotonic()
        proc = encfs(
            "mount",
            vol.cipher_dir,
            vol.mountpoint,
            "--vault",
            vol.vault_url,
            "--vault-timeout",
            "30",
            env=env,
        )
        timer.join()
        assert proc.returncode == 0, proc.stderr
        assert 1.9 < time.monotonic() - t0 < 20
        assert "retrying" in proc.stderr  # the operator sees why the mount is slow
        vol.unmount()


def test_mount_with_key_release_export(tmp_path: Path, openbao: OpenBao) -> None:
    name = "exp-" + os.urandom(4).hex()
    openbao.create_key(name, exportable=True)
    env = {"PATH": os.environ["PATH"], "VAULT_TOKEN": openbao.root_token}
    vol = Volume(tmp_path / "c", tmp_path / "p", openbao.url_for(name), env)
    vol.mountpoint.mkdir()
    vol.init()
    vol.mount("--key-release", "export")
    (vol.mountpoint / "f").write_text("released")
    vol.unmount()
    vol.mount()  # and the default unwrap mode reads the same volume
    assert (vol.mountpoint / "f").read_text() == "released"
    vol.unmount()


def test_mount_key_release_export_of_a_non_exportable_key(make_volume: MakeVolume) -> None:
    vol: Volume = make_volume(mount=False)
    code, err = _mount_fails(vol, vol.env, "--key-release", "export")
    assert code == ExitCode.VAULT_CONFIG
    assert "not exportable" in err and "--key-release unwrap" in err


def test_non_renewable_token_is_reported(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
) -> None:
    vol: Volume = make_volume(mount=False)
    token = openbao.make_token([openbao.write_host_policy(transit_key.name)], renewable=False)
    proc = encfs(
        "mount",
        vol.cipher_dir,
        vol.mountpoint,
        *vol.audit_args(),
        env={**vol.env, "VAULT_TOKEN": token},
    )
    assert proc.returncode == 0, proc.stderr
    assert "not renewable and expires in" in proc.stderr
    vol.unmount()


def test_token_is_renewed_while_mounted_and_audited(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
) -> None:
    import time

    vol: Volume = make_volume(mount=False)
    token = openbao.make_token(
        [openbao.write_host_policy(transit_key.name)], ttl="4s", explicit_max_ttl="1h"
    )
    accessor = openbao.admin.auth.token.lookup(token)["data"]["accessor"]
    vol.env = {**vol.env, "VAULT_TOKEN": token}
    vol.mount()
    time.sleep(7)  # without renewal the 4 s token would be gone by now
    assert openbao.admin.auth.token.lookup(token)["data"]["ttl"] > 0
    (vol.mountpoint / "f").write_text("still here")
    vol.unmount()
    events = vol.audit_events()
    kinds = [e["event"] for e in events]
    assert kinds[0] == "init"
    assert kinds[1:3] == ["unwrap", "mount"] and kinds[-1] == "unmount"
    assert kinds.count("token_renew") >= 2
    mount_events = [e for e in events if e["event"] != "init"]
    assert all(e["identity"] == accessor for e in mount_events)
    for e in events:
        assert (
            e["volume_id"] and e["host"] and isinstance(e["time"], str) and e["time"].endswith("Z")
        )
        assert e["result"] == "ok"
    raw = vol.audit_log.read_text() if vol.audit_log else ""
    assert token not in raw and openbao.root_token not in raw


# --- volume config files (/etc/encfs/NAME.conf) ---------------------------------------------------


def test_mount_from_a_config_file(make_volume: MakeVolume, tmp_path: Path) -> None:
    vol: Volume = make_volume(mount=False)
    conf = tmp_path / "data.conf"
    conf.write_text(f"""# encfs volume "data"
CIPHER_DIR={vol.cipher_dir}
MOUNTPOINT="{vol.mountpoint}"
CHECK_INTERVAL=2
OFFLINE_GRACE=60
ON_REVOKE=suspend
AUDIT_LOG={tmp_path / "conf.audit"}

OPTIONS=default_permissions
""")
    proc = encfs("mount", "--config", conf, env=vol.env)
    assert proc.returncode == 0, proc.stderr
    try:
        status = json.loads(encfs("status", vol.mountpoint, "--json", check=True).stdout)
        assert status["check_interval"] == 2 and status["offline_grace"] == 60
        assert (tmp_path / "conf.audit").exists()
    finally:
        vol.unmount()


def test_mount_a_double_volume_from_a_config_file(
    make_volume: MakeVolume, tmp_path: Path, second_key: SecondKey
) -> None:
    """VAULT2 and TOKEN_FILE2 (README's config keys): the service's second vault and its
    own credential; the first vault comes from VAULT (no VAULT_ADDR in the env)."""
    vol: Volume = make_volume(mount=False, double=True)
    token1 = tmp_path / "token1"
    token1.write_text(vol.env["VAULT_TOKEN"] + "\n")
    token1.chmod(0o600)
    conf = tmp_path / "double.conf"
    conf.write_text(f"""CIPHER_DIR={vol.cipher_dir}
MOUNTPOINT={vol.mountpoint}
VAULT={vol.vault_url}
TOKEN_FILE={token1}
VAULT2={second_key.url}
TOKEN_FILE2={second_key.token_file}
""")
    env = {k: v for k, v in vol.env.items() if not k.startswith(("VAULT_", "BAO_"))}
    proc = encfs("mount", "--config", conf, env=env)
    assert proc.returncode == 0, proc.stderr
    try:
        status = json.loads(encfs("status", vol.mountpoint, "--json", check=True).stdout)
        assert [k["vault"] for k in status["keks"]] == [vol.vault_url, second_key.url]
        assert status["keks"][1]["token"]["policies"] == [second_key.policy]
    finally:
        vol.unmount()
    conf.write_text(conf.read_text().replace(f"TOKEN_FILE2={second_key.token_file}\n", ""))
    proc = encfs("mount", "--config", conf, env=env)  # no credential of its own: refused
    assert proc.returncode == ExitCode.VAULT_CREDENTIALS, proc.stderr
    assert not is_mounted(vol.mountpoint)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        (
            "CIPHER_DIR=/a\nMOUNTPOINT=/b\nCHECK_INTERVALL=5\n",
            "line 3: unknown key 'CHECK_INTERVALL'",
        ),
        ("CIPHER_DIR=/a\n", "MOUNTPOINT is required"),
        ("CIPHER_DIR=/a\nMOUNTPOINT=/b\nEPHEMERAL=maybe\n", "EPHEMERAL must be yes or no"),
        ("CIPHER_DIR=/a\nMOUNTPOINT=/b\nthis is not a setting\n", "line 3: expected KEY=VALUE"),
        ("CIPHER_DIR=/a\nCIPHER_DIR=/b\nMOUNTPOINT=/b\n", "line 2: CIPHER_DIR is set twice"),
    ],
)
def test_config_file_errors_name_the_line(tmp_path: Path, text: str, complaint: str) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text(text)
    proc = encfs("mount", "--config", conf)
    assert proc.returncode == ExitCode.USAGE
    assert complaint in proc.stderr and str(conf) in proc.stderr
    proc = encfs("mount", "--config", tmp_path / "missing.conf")
    assert proc.returncode == ExitCode.USAGE and "cannot read config" in proc.stderr


# --- double encryption: init --double, two vaults ------------------------------------------------


def test_double_init_info_mount_fsck_roundtrip(
    make_volume: MakeVolume, transit_key: TransitKey, second_key: SecondKey
) -> None:
    vol: Volume = make_volume(double=True)
    sizes = {"empty": 0, "one": 1, "block": 4096, "five": 5000, "big": 3 * 4096 + 100}
    data = {name: os.urandom(size) for name, size in sizes.items()}
    for name, content in data.items():
        (vol.mountpoint / name).write_bytes(content)
    os.symlink("five", vol.mountpoint / "link")
    os.setxattr(vol.mountpoint / "five", "user.note", b"twice")
    info = json.loads(encfs("info", vol.cipher_dir, "--json", check=True).stdout)
    assert (info["feature_flags"], info["features"]) == (3, ["dirid-links", "double"])
    assert (info["cipher"], info["outer_cipher"]) == ("AES-256-GCM", "ChaCha20-Poly1305")
    assert (info["vault"], info["vault2"]) == (transit_key.url, second_key.url)
    assert (info["kek_version"], info["kek_version2"]) == (1, 1)
    assert info["wrapped_key"].startswith("vault:v1:") and info["wrapped_key2"].startswith("vault:")
    text = encfs("info", vol.cipher_dir, check=True).stdout
    assert re.search(r"^outer cipher +ChaCha20-Poly1305$", text, re.M), text
    # Worked sizes of docs/FORMAT.md §5.2: 56 bytes per block.
    backing = {
        p.stat().st_size for p in vol.cipher_dir.iterdir() if p.is_file() and "." not in p.name
    }
    assert {0, 75, 4170, 5130, 18 + 3 * 4152 + 156} <= backing
    assert backing == {vol.geometry.cipher_size(size) for size in sizes.values()}
    raw = vol.raw_bytes()
    for content in data.values():
        assert len(content) < 16 or content[:16] not in raw
    assert b"twice" not in raw and b"five" not in raw
    vol.unmount()
    proc = encfs("fsck", vol.cipher_dir, "--vault", vol.vault_url, *vol.vault2_args(), env=vol.env)
    assert proc.returncode == 0, proc.stderr
    assert "0 problem(s)" in proc.stdout
    vol.mount()
    for name, content in data.items():
        assert (vol.mountpoint / name).read_bytes() == content
    assert os.readlink(vol.mountpoint / "link") == "five"
    assert os.getxattr(vol.mountpoint / "five", "user.note") == b"twice"
    status = json.loads(encfs("status", vol.mountpoint, "--json", check=True).stdout)
    assert status["double"] is True and status["outer_cipher"] == "ChaCha20-Poly1305"
    assert [k["vault"] for k in status["keks"]] == [transit_key.url, second_key.url]


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--double"], "--double needs --vault2"),
        (["--vault2", "transit+http://127.0.0.1:1/transit/k2"], "add --double"),
        (["--double", "--vault2", "SAME"], "names the same vault key"),
    ],
)
def test_init_double_usage_errors(
    tmp_path: Path, transit_key: TransitKey, args: list[str], complaint: str
) -> None:
    args = [transit_key.url if a == "SAME" else a for a in args]
    proc = encfs("init", tmp_path / "c", "--vault", transit_key.url, *args, env=transit_key.env)
    assert proc.returncode == ExitCode.USAGE, proc.stderr
    assert complaint in proc.stderr
    assert not (tmp_path / "c").exists()  # refused before anything was made


def test_mount_double_usage_errors(make_volume: MakeVolume, tmp_path: Path) -> None:
    vol = make_volume(mount=False)
    proc = encfs("mount", vol.cipher_dir, vol.mountpoint, "--double", env=vol.env)
    assert proc.returncode == ExitCode.USAGE
    assert "encfs init" in proc.stderr and "--vault2" in proc.stderr
    scratch = tmp_path / "scratch"
    for extra in (["--double"], ["--vault2", vol.vault_url]):
        proc = encfs("mount", "--ephemeral", scratch, vol.mountpoint, *extra, env=vol.env)
        assert proc.returncode == ExitCode.USAGE
        assert "ephemeral volume is single-layer" in proc.stderr
    assert not scratch.exists()
    proc = encfs("rotate", vol.cipher_dir, "--kek", "2", env=vol.env)
    assert proc.returncode == ExitCode.USAGE
    assert "single-layer and has one KEK" in proc.stderr


def test_double_volume_needs_its_second_vault_pinned(make_volume: MakeVolume) -> None:
    """Without --vault2 nothing is sent anywhere: exit 9 naming key slot 1's URL; and the
    second vault never gets the first one's token (VAULT_TOKEN is in the env)."""
    vol: Volume = make_volume(double=True, mount=False)
    assert "VAULT_TOKEN" in vol.env
    commands: list[list[str | Path]] = [
        ["mount", vol.cipher_dir, vol.mountpoint],
        ["fsck", vol.cipher_dir],
        ["rotate", vol.cipher_dir],
    ]
    for command in commands:
        proc = encfs(*command, "--vault", vol.vault_url, env=vol.env)
        assert proc.returncode == ExitCode.VAULT_NOT_PINNED, (command, proc.stderr)
        assert vol.vault2_url in proc.stderr and "--vault2" in proc.stderr
        assert not is_mounted(vol.mountpoint)
    proc = encfs(
        "mount", vol.cipher_dir, vol.mountpoint, "--vault", vol.vault_url, "--vault2",
        vol.vault2_url, env=vol.env,
    )  # fmt: skip
    assert proc.returncode == ExitCode.VAULT_CREDENTIALS, proc.stderr
    assert "--vault2-token-file" in proc.stderr
    assert not is_mounted(vol.mountpoint)
    vol.mount()  # with its own credential it mounts


def test_double_volume_with_a_revoked_kek_2_is_not_mounted(
    make_volume: MakeVolume, openbao: OpenBao, second_key: SecondKey
) -> None:
    vol: Volume = make_volume(double=True, mount=False)
    openbao.revoke_token(second_key.token)
    code, err = _mount_fails(vol, vol.env, *vol.vault2_args(), *vol.audit_args())
    assert code == ExitCode.VAULT_DENIED, err
    assert "KEK 2" in err
    events = vol.audit_events()
    assert any(
        e["event"] == "unwrap" and e["result"] == "error" and e.get("kek") == 2 for e in events
    )


def test_a_config_file_pins_a_vault_cluster_and_the_command_line_replaces_it(
    make_volume: MakeVolume, transit_key: TransitKey, tmp_path: Path
) -> None:
    """VAULT= lists the nodes of one vault, white-space separated; the mount fails over
    from a node that is down to one that answers. --vault on the command line replaces
    the list (as every later option overrides the file), and is repeated for a list."""
    from encfs.cli.parser import build_parser
    from encfs.cli.service import expand_config
    from encfs.cli.settings import vault_setting
    from tests.openbao import free_port

    vol: Volume = make_volume(mount=False)
    down = f"http://127.0.0.1:{free_port()}"
    conf = tmp_path / "data.conf"
    conf.write_text(
        f"CIPHER_DIR={vol.cipher_dir}\nMOUNTPOINT={vol.mountpoint}\n"
        f'VAULT="{down} {transit_key.bao.addr}"\nCHECK_INTERVAL=1\n'
    )

    def pinned(*argv: str) -> str | None:
        args = build_parser().parse_args(expand_config(["mount", "--config", str(conf), *argv]))
        return vault_setting(args.vault_url)

    assert pinned() == f"{down} {transit_key.bao.addr}"
    assert pinned("--vault", "https://c:8200") == "https://c:8200"
    assert pinned("--vault", "https://c:8200", "--vault", "https://d:8200") == (
        "https://c:8200 https://d:8200"
    )
    proc = encfs("mount", "--config", conf, *vol.audit_args(), env=transit_key.env)
    assert proc.returncode == 0, proc.stderr
    try:
        status = json.loads(encfs("status", vol.mountpoint, "--json", check=True).stdout)
        assert status["vault_addresses"] == [down, transit_key.bao.addr]
        assert wait_until(
            lambda: (
                json.loads(encfs("status", vol.mountpoint, "--json").stdout)["vault_node"]
                == transit_key.bao.addr
            )
        )
    finally:
        vol.unmount()
