"""The CLI end to end: init, info, mount, unmount, and one exit code per refusal."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from encfs.cli import ExitCode
from tests.conftest import TransitKey
from tests.harness import Volume, encfs, is_mounted
from tests.openbao import OpenBao


def test_init_info_mount_roundtrip(make_volume, transit_key: TransitKey) -> None:  # type: ignore[no-untyped-def]
    vol: Volume = make_volume()
    (vol.mountpoint / "hello.txt").write_text("hello, vault\n")
    info = json.loads(encfs("info", vol.cipher_dir, "--json", check=True).stdout)
    assert info["format_version"] == 1
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


def test_info_has_no_secret_and_needs_no_vault(make_volume) -> None:  # type: ignore[no-untyped-def]
    vol: Volume = make_volume(mount=False)
    proc = encfs("info", vol.cipher_dir, env={"PATH": os.environ["PATH"]})
    assert proc.returncode == 0, proc.stderr
    assert "wrapped key" in proc.stdout


def test_init_refuses_non_empty_dir(tmp_path: Path, transit_key: TransitKey) -> None:
    target = tmp_path / "c"
    target.mkdir()
    (target / "stray").write_text("x")
    proc = encfs("init", target, "--vault", transit_key.url, env=transit_key.env)
    assert proc.returncode == ExitCode.VOLUME_EXISTS
    assert "not empty" in proc.stderr
    assert (target / "stray").read_text() == "x"


def test_init_rejects_bad_block_size(tmp_path: Path, transit_key: TransitKey) -> None:
    proc = encfs("init", tmp_path / "c", "--vault", transit_key.url, "--block-size", "5000",
                 env=transit_key.env)
    assert proc.returncode == ExitCode.USAGE
    assert "multiple of 4096" in proc.stderr


def _mount_fails(vol: Volume, env: dict[str, str], *extra: str) -> tuple[int, str]:
    proc = encfs("mount", vol.cipher_dir, vol.mountpoint, *extra, env=env)
    assert not is_mounted(vol.mountpoint), "nothing may be mounted when the vault refuses"
    return proc.returncode, proc.stderr


def test_mount_revoked_token(make_volume, openbao: OpenBao, transit_key: TransitKey) -> None:  # type: ignore[no-untyped-def]
    vol: Volume = make_volume(mount=False)
    token = openbao.make_token(["default"])
    openbao.admin.auth.token.revoke(token)
    code, err = _mount_fails(vol, {**transit_key.env, "VAULT_TOKEN": token})
    assert code == ExitCode.VAULT_DENIED
    assert "permission denied" in err
    assert token not in err


def test_mount_key_missing(make_volume, transit_key: TransitKey, openbao: OpenBao) -> None:  # type: ignore[no-untyped-def]
    vol: Volume = make_volume(mount=False)
    code, err = _mount_fails(vol, transit_key.env, "--vault", openbao.url_for("no-such-key"))
    assert code == ExitCode.VAULT_KEY_NOT_FOUND
    assert "encryption key not found" in err


def test_mount_vault_unreachable(make_volume, transit_key: TransitKey) -> None:  # type: ignore[no-untyped-def]
    vol: Volume = make_volume(mount=False)
    from tests.openbao import free_port

    code, err = _mount_fails(vol, transit_key.env, "--vault",
                             f"transit+http://127.0.0.1:{free_port()}/transit/x",
                             "--vault-timeout", "2")
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


def test_mount_without_token(make_volume) -> None:  # type: ignore[no-untyped-def]
    vol: Volume = make_volume(mount=False)
    code, err = _mount_fails(vol, {"PATH": os.environ["PATH"]})
    assert code == ExitCode.VAULT_CREDENTIALS
    assert "--token-file" in err


def test_token_file_must_be_private(make_volume, transit_key: TransitKey, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
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
    proc = encfs("mount", vol.cipher_dir, vol.mountpoint, "--token-file", token_file, env=env)
    assert proc.returncode == 0, proc.stderr
    vol.unmount()


def test_least_privilege_host_token_mounts(make_volume, host_token: Path) -> None:  # type: ignore[no-untyped-def]
    vol: Volume = make_volume(mount=False)
    env = {"PATH": os.environ["PATH"]}
    proc = encfs("mount", vol.cipher_dir, vol.mountpoint, "--token-file", host_token, env=env)
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
