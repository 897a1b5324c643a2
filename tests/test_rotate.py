"""KEK rotation (``encfs rotate`` over ``volume.rotate``): re-wrap without re-encryption,
while mounted and under writes, retired versions, least privilege, and a rotation killed
between any two of its steps (SIGKILL injected by strace at the syscall)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

from encfs import format as fmt
from encfs.cli import ExitCode
from tests.conftest import SecondKey, TransitKey
from tests.harness import MakeVolume, Volume, encfs, is_mounted, wait_until
from tests.openbao import OpenBao


def info(vol: Volume) -> dict[str, object]:
    out: dict[str, object] = json.loads(encfs("info", vol.cipher_dir, "--json", check=True).stdout)
    return out


def rotate(
    vol: Volume, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return encfs("rotate", vol.cipher_dir, *vol.audit_args(), *extra, env=env or vol.env)


def data_files(vol: Volume) -> dict[str, bytes]:
    """Every cipher-dir file except the volume header family, by relative path."""
    return {
        str(p.relative_to(vol.cipher_dir)): p.read_bytes()
        for p in vol.cipher_dir.rglob("*")
        if p.is_file() and not p.name.startswith("encfs.volume")
    }


def test_rotate_rewraps_without_reencrypting(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
) -> None:
    vol: Volume = make_volume()
    payload = os.urandom(300_000)
    (vol.mountpoint / "f").write_bytes(payload)
    os.sync()
    before = data_files(vol)
    assert info(vol)["kek_version"] == 1
    assert openbao.rotate_key(transit_key.name) == 2

    proc = rotate(vol)  # while mounted
    assert proc.returncode == 0, proc.stderr
    assert "KEK version 2 (was 1)" in proc.stdout
    after = info(vol)
    assert after["kek_version"] == 2
    assert str(after["wrapped_key"]).startswith("vault:v2:")
    assert after["feature_flags"] == fmt.FEATURE_DIRID_LINKS  # the format is kept
    assert data_files(vol) == before, "rotation must not touch any data file"
    assert (vol.cipher_dir / "encfs.volume.prev").exists()
    assert (vol.mountpoint / "f").read_bytes() == payload  # the live mount never noticed

    # Version 1 retired: the rotated volume still mounts and reads.
    openbao.set_min_decryption_version(transit_key.name, 2)
    vol.remount()
    assert (vol.mountpoint / "f").read_bytes() == payload
    events = [e["event"] for e in vol.audit_events()]
    assert "rotate" in events


def test_rotate_is_a_noop_on_the_newest_version(make_volume: MakeVolume) -> None:
    vol: Volume = make_volume(mount=False)
    header = (vol.cipher_dir / "encfs.volume").read_bytes()
    proc = rotate(vol)
    assert proc.returncode == 0, proc.stderr
    assert "already uses the newest KEK version (1)" in proc.stdout
    assert (vol.cipher_dir / "encfs.volume").read_bytes() == header


def test_retired_version_is_refused_with_the_way_out(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
) -> None:
    vol: Volume = make_volume(mount=False)
    openbao.rotate_key(transit_key.name)
    openbao.set_min_decryption_version(transit_key.name, 2)
    proc = encfs("mount", vol.cipher_dir, vol.mountpoint, env=vol.env)
    assert proc.returncode == ExitCode.VAULT_KEY_RETIRED, proc.stderr
    assert not is_mounted(vol.mountpoint)
    assert "too old" in proc.stderr and "encfs rotate" in proc.stderr
    # Rotation needs the old version too (rewrap decrypts it): refused the same way.
    proc = rotate(vol)
    assert proc.returncode == ExitCode.VAULT_KEY_RETIRED, proc.stderr
    # The way out the hint gives: restore, rotate, retire again.
    openbao.set_min_decryption_version(transit_key.name, 1)
    assert rotate(vol).returncode == 0
    openbao.set_min_decryption_version(transit_key.name, 2)
    vol.mount()
    assert info(vol)["kek_version"] == 2


def test_rotate_preflight_names_the_missing_capability(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
) -> None:
    vol: Volume = make_volume(mount=False)
    openbao.rotate_key(transit_key.name)
    k, m = transit_key.name, openbao.mount
    openbao.write_policy(
        f"no-rewrap-{k}",
        f"""
path "{m}/decrypt/{k}" {{ capabilities = ["update"] }}
path "sys/capabilities-self" {{ capabilities = ["update"] }}
""",
    )
    token = openbao.make_token([f"no-rewrap-{k}"])
    proc = rotate(vol, env={**vol.env, "VAULT_TOKEN": token})
    assert proc.returncode == ExitCode.VAULT_DENIED, proc.stderr
    assert f"lacks 'update' on {m}/rewrap/{k}" in proc.stderr
    assert token not in proc.stderr
    assert info(vol)["kek_version"] == 1


def test_rotate_while_a_writer_runs(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
) -> None:
    vol: Volume = make_volume()
    stop = threading.Event()
    written: dict[str, bytes] = {}
    failures: list[BaseException] = []

    def writer() -> None:
        i = 0
        try:
            while not stop.is_set():
                data = os.urandom(5000 + i)
                path = vol.mountpoint / f"w{i}"
                with open(path, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                written[path.name] = data
                i += 1
        except BaseException as exc:
            failures.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for version in (2, 3, 4):
            assert openbao.rotate_key(transit_key.name) == version
            proc = rotate(vol)
            assert proc.returncode == 0, proc.stderr
            assert info(vol)["kek_version"] == version
    finally:
        stop.set()
        t.join()
    assert not failures, failures
    assert len(written) > 3
    openbao.set_min_decryption_version(transit_key.name, 4)
    vol.remount()
    for name, data in written.items():
        assert (vol.mountpoint / name).read_bytes() == data


# Kill points, in the order rotation reaches them (see volume.write_header_atomic; every
# call is relative to the cipher dir's fd): the first fsync (new header written, not yet
# durable), the link keeping the previous header, the fsync after it, the rename, the last
# directory fsync. The first unlinkat removes a .tmp a crash may have left (none here);
# with an existing .prev, the second one removes it.
KILL_POINTS = [
    ("fsync", 1),
    ("linkat", 1),
    ("fsync", 2),
    ("renameat", 1),
    ("fsync", 3),
    ("unlinkat", 2),
]


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (scripts/install)")
@pytest.mark.parametrize(("syscall", "when"), KILL_POINTS, ids=[f"{s}{w}" for s, w in KILL_POINTS])
def test_rotation_killed_at_each_step_leaves_a_volume_that_mounts(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
    syscall: str,
    when: int,
) -> None:
    vol: Volume = make_volume()
    (vol.mountpoint / "f").write_bytes(b"survives rotation crashes" * 100)
    vol.unmount()
    if syscall == "unlinkat":  # a second rotation, so that an old .prev exists to replace
        openbao.rotate_key(transit_key.name)
        assert rotate(vol).returncode == 0
        assert (vol.cipher_dir / "encfs.volume.prev").exists()
    old_version = info(vol)["kek_version"]
    new_version = openbao.rotate_key(transit_key.name)
    env = {**vol.env, "ENCFS_AUDIT_LOG": "none"}
    proc = subprocess.run(
        ["strace", "-qq", "-f", "-o", "/dev/null", "-e", f"trace={syscall}",
         "-e", f"inject={syscall}:signal=KILL:when={when}",
         sys.executable, "-m", "encfs", "rotate", str(vol.cipher_dir)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode in (-9, 137), (proc.returncode, proc.stderr)
    assert "rotated" not in proc.stdout
    # The kill landed where intended: only the last fsync comes after the rename.
    renamed = (syscall, when) == ("fsync", 3)
    assert info(vol)["kek_version"] == (new_version if renamed else old_version)
    assert (vol.cipher_dir / "encfs.volume.tmp").exists() != renamed
    vol.mount()
    assert (vol.mountpoint / "f").read_bytes() == b"survives rotation crashes" * 100
    vol.unmount()
    # And the next rotation completes from whatever state the crash left.
    proc = rotate(vol)
    assert proc.returncode == 0, proc.stderr
    latest = openbao.key_info(transit_key.name)["latest_version"]
    assert info(vol)["kek_version"] == latest
    vol.mount()
    assert (vol.mountpoint / "f").read_bytes() == b"survives rotation crashes" * 100


def test_rotation_survives_a_missing_current_header(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
) -> None:
    """The state a crash between unlink-and-rename would leave on a filesystem without
    atomic rename: only ``encfs.volume.prev``. Reading falls back to it."""
    vol: Volume = make_volume()
    (vol.mountpoint / "f").write_text("hello")
    vol.unmount()
    openbao.rotate_key(transit_key.name)
    assert rotate(vol).returncode == 0
    (vol.cipher_dir / "encfs.volume").unlink()
    vol.mount()
    assert (vol.mountpoint / "f").read_text() == "hello"


# --- double encryption: one KEK at a time ---------------------------------------------------------


def test_double_rotate_each_kek_while_mounted(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
    second_key: SecondKey,
) -> None:
    vol: Volume = make_volume(double=True, mount=False)
    vol.mount("--check-interval", "0.3")
    payload = os.urandom(300_000)
    (vol.mountpoint / "f").write_bytes(payload)
    os.sync()
    before = data_files(vol)
    args = vol.vault2_args()

    def versions() -> tuple[object, object]:
        doc = info(vol)
        return doc["kek_version"], doc["kek_version2"]

    assert openbao.rotate_key(transit_key.name) == 2
    proc = rotate(vol, "--kek", "1", *map(str, args))
    assert proc.returncode == 0, proc.stderr
    assert "(KEK 1," in proc.stdout and "KEK version 2 (was 1)" in proc.stdout
    assert versions() == (2, 1)
    assert openbao.rotate_key(second_key.name) == 2
    proc = rotate(vol, "--kek", "2", "--json", *map(str, args))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert [(k["kek"], k["old_kek_version"], k["kek_version"]) for k in doc["keks"]] == [(2, 1, 2)]
    assert versions() == (2, 2)
    proc = rotate(vol, *map(str, args))  # both, and both are the newest already
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("already uses the newest KEK version (2)") == 2
    assert openbao.rotate_key(transit_key.name) == 3
    assert openbao.rotate_key(second_key.name) == 3
    proc = rotate(vol, *map(str, args))
    assert proc.returncode == 0, proc.stderr
    assert versions() == (3, 3)
    assert data_files(vol) == before, "rotation must not touch any data file"
    assert (vol.mountpoint / "f").read_bytes() == payload  # the live mount never noticed

    def adopted() -> bool:
        status = json.loads(encfs("status", vol.mountpoint, "--json", check=True).stdout)
        return [k["kek_version"] for k in status["keks"]] == [3, 3] and status["state"] == "active"

    assert wait_until(adopted, timeout=10), "the watcher did not adopt the rotated header"
    rotations = [e for e in vol.audit_events() if e["event"] == "rotate"]
    assert {(e["kek"], e["kek_version"]) for e in rotations if e["changed"]} == {
        (1, 2), (2, 2), (1, 3), (2, 3)
    }  # fmt: skip
    # The old versions retired: the rotated volume still mounts and reads.
    openbao.set_min_decryption_version(transit_key.name, 3)
    openbao.set_min_decryption_version(second_key.name, 3)
    vol.remount()
    assert (vol.mountpoint / "f").read_bytes() == payload


def test_double_rotate_of_one_kek_needs_both_vaults(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
    second_key: SecondKey,
) -> None:
    """The header's tag is keyed by both volume keys: re-wrapping KEK 1 alone still asks
    the second vault to unwrap; refused there, nothing is written."""
    vol: Volume = make_volume(double=True, mount=False)
    header = (vol.cipher_dir / fmt.VOLUME_HEADER_NAME).read_bytes()
    openbao.rotate_key(transit_key.name)
    openbao.revoke_token(second_key.token)
    proc = rotate(vol, "--kek", "1", *map(str, vol.vault2_args()))
    assert proc.returncode == ExitCode.VAULT_DENIED, proc.stderr
    assert "KEK 2" in proc.stderr
    assert (vol.cipher_dir / fmt.VOLUME_HEADER_NAME).read_bytes() == header
