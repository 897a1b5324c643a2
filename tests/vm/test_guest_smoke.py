"""The guest harness works: systemd boots, the checkout and the venv are usable, FUSE mounts,
and a VM's disk can be read after power-off."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

import encfs
from tests.vm.guest import (
    guest_artifacts,
    guest_root,
    run_nspawn,
    run_qemu,
)

NSPAWN_SMOKE = r"""
state=$(systemctl is-system-running --wait || true)
echo "state=$state"
if [[ $state != running && $state != degraded ]]; then systemctl --failed --no-pager; exit 1; fi
test -f /src/pyproject.toml
echo "pid1=$(cat /proc/1/comm)"
echo "version=$(encfs --version)"

# A local OpenBao (in memory), a transit key and a least-privilege host token.
encfs vault dev --listen 127.0.0.1:8200 >/root/vault.out 2>/root/vault.err &
for _ in $(seq 300); do grep -q '^admin (root) token:' /root/vault.out && break; sleep 0.1; done
VAULT_TOKEN=$(sed -n 's/^admin (root) token: //p' /root/vault.out)
export VAULT_TOKEN
encfs vault setup --addr http://127.0.0.1:8200 --key k --host guest --token-out /root/host.token
unset VAULT_TOKEN

encfs init --vault transit+http://127.0.0.1:8200/transit/k --token-file /root/host.token \
    /root/cipher
mkdir /root/plain
encfs mount --vault transit+http://127.0.0.1:8200/transit/k --token-file /root/host.token \
    /root/cipher /root/plain
echo "fstype=$(findmnt -n -o FSTYPE /root/plain)"
echo "hello through fuse" >/root/plain/hello.txt
echo "read=$(cat /root/plain/hello.txt)"
! grep -rq "hello through fuse" /root/cipher
encfs unmount /root/plain
test ! -e /root/plain/hello.txt
echo done
"""


@pytest.mark.systemd
def test_nspawn_boots_systemd_and_mounts_encfs(tmp_path: Path) -> None:
    root = guest_root()
    result = run_nspawn(root, NSPAWN_SMOKE, workdir=tmp_path, timeout=120)
    print(f"\nnspawn smoke timing: {result.timing}")
    result.check()
    out = result.stdout.splitlines()
    assert out[0] in ("state=running", "state=degraded"), result.describe()
    assert "pid1=systemd" in out
    assert f"version=encfs {encfs.__version__}" in out
    assert any(line.startswith("fstype=fuse") for line in out), result.describe()
    assert "read=hello through fuse" in out
    assert out[-1] == "done"
    assert "not locked" not in result.stderr, "the guest's root cannot mlock()"
    assert "encfs-guest-test.service" in result.journal


@pytest.mark.systemd
def test_nspawn_exit_status_and_leaves_root_untouched(tmp_path: Path) -> None:
    root = guest_root()
    result = run_nspawn(
        root, "touch /etc/written-by-test\necho partial\nexit 7\n", workdir=tmp_path
    )
    assert result.returncode == 7, result.describe()
    assert result.stdout == "partial\n"
    assert not (root / "etc" / "written-by-test").exists()


@pytest.mark.vm
@pytest.mark.slow
def test_qemu_boots_and_disk_is_readable_after_poweroff(tmp_path: Path) -> None:
    artifacts = guest_artifacts()
    marker = "marker-" + secrets.token_hex(8)
    script = f"""
uname -r
encfs --version
findmnt -n -o FSTYPE,OPTIONS /src
echo {marker} >/root/marker
"""
    result = run_qemu(artifacts, script, workdir=tmp_path, timeout=240)
    print(f"\nqemu smoke timing: {result.timing}")
    result.check()
    lines = result.stdout.splitlines()
    assert lines[0].endswith("-cloud-amd64"), result.describe()
    assert lines[1].startswith("encfs ")
    assert lines[2].startswith("virtiofs ro")
    assert result.disk is not None and result.disk.exists()
    assert result.read_disk_file("/root/marker") == f"{marker}\n".encode()
    with pytest.raises(FileNotFoundError):
        result.read_disk_file("/root/no-such-file")
