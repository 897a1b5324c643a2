"""encfs under a real systemd: the units boot, notify, suspend, restart after a crash and stop
cleanly in a systemd-nspawn container; a qemu test VM's ephemeral scratch volume comes up at
boot and leaves only undecryptable ciphertext on the VM's disk after power-off."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.vm.guest import guest_artifacts, guest_root, run_nspawn, run_qemu

CA = "/var/lib/encfs-vault/tls/ca.pem"
UNIT_DIR = "/usr/local/lib/systemd/system"  # persisted across the two boots (a bind mount)

# Boot 1: a host is set up the way README says - the single-host vault unit, its key and
# least-privilege token, a volume, the volume's unit; enabled for the next boot.
FIRST_BOOT = rf"""
systemctl is-system-running --wait || true
encfs systemd install data --cipher-dir /srv/cipher --mountpoint /srv/data \
    --vault transit+https://127.0.0.1:8200/transit/data --unit-dir {UNIT_DIR} --no-enable \
    --set CA_FILE={CA} --set CHECK_INTERVAL=1 \
    --set AUDIT_LOG=/srv/audit.log
systemctl daemon-reload
systemctl start encfs-vault.service
systemctl is-active encfs-vault.service
encfs vault setup --addr https://127.0.0.1:8200 --ca-file {CA} \
    --admin-token-file /var/lib/encfs-vault/init.json --key data --host guest \
    --token-out /root/data.token
encfs init /srv/cipher --vault transit+https://127.0.0.1:8200/transit/data \
    --token-file /root/data.token --ca-file {CA} --audit-log none
install -m 0600 /root/data.token /etc/encfs/data.token
mkdir -p {UNIT_DIR}/multi-user.target.wants
ln -sf ../encfs-vault.service {UNIT_DIR}/multi-user.target.wants/encfs-vault.service
ln -sf ../encfs@.service {UNIT_DIR}/multi-user.target.wants/encfs@data.service
systemctl daemon-reload
systemctl start encfs@data.service
mountpoint -q /srv/data
echo "written in boot 1" >/srv/data/f
echo "security=$(systemd-analyze security encfs@data.service --no-pager | tail -n 1)"
systemctl stop encfs@data.service encfs-vault.service
echo boot1-ok
"""

# Boot 2: both units came up at boot; then revocation, restore, a crash and a clean stop.
SECOND_BOOT = r"""
state=$(systemctl is-system-running --wait || true)
echo "state=$state"
systemctl is-active encfs-vault.service encfs@data.service
mountpoint -q /srv/data
test "$(cat /srv/data/f)" = "written in boot 1"
status() { systemctl show -p StatusText --value encfs@data.service; }
wait_status() {  # wait_status WORD SECONDS
    for _ in $(seq $(( $2 * 10 ))); do status | grep -q "$1" && return 0; sleep 0.1; done
    status; return 1
}
wait_status active 5
echo "status-at-boot=$(status)"

export BAO_ADDR=https://127.0.0.1:8200 BAO_CACERT=/var/lib/encfs-vault/tls/ca.pem
BAO_TOKEN=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["root_token"])' \
    /var/lib/encfs-vault/init.json)
export BAO_TOKEN

# Revocation in the vault: systemctl status says suspended, and why; nothing is readable.
bao delete transit/keys/data/soft-delete >/dev/null
t0=$(date +%s%N)
wait_status suspended 5
echo "suspended-after-ms=$(( ($(date +%s%N) - t0) / 1000000 ))"
systemctl status encfs@data.service --no-pager | grep -m1 "Status:" | tee /results/status-suspended
if cat /srv/data/f 2>/dev/null; then echo "READ WHILE SUSPENDED"; exit 1; fi
bao write -f transit/keys/data/soft-delete-restore >/dev/null
wait_status active 5
test "$(cat /srv/data/f)" = "written in boot 1"
echo resumed-ok

# A crash: systemd restarts the daemon, which detaches the dead mount and mounts again.
old=$(systemctl show -p MainPID --value encfs@data.service)
kill -9 "$old"
for _ in $(seq 200); do
    new=$(systemctl show -p MainPID --value encfs@data.service)
    [[ $new != 0 && $new != "$old" ]] && systemctl is-active -q encfs@data.service && break
    sleep 0.1
done
echo "restarts=$(systemctl show -p NRestarts --value encfs@data.service)"
systemctl is-active encfs@data.service
test "$(cat /srv/data/f)" = "written in boot 1"

# A clean stop: unmounted, keys gone with the process, exit status 0.
pid=$(systemctl show -p MainPID --value encfs@data.service)
systemctl stop encfs@data.service
if mountpoint -q /srv/data; then echo "STILL MOUNTED"; exit 1; fi
if kill -0 "$pid" 2>/dev/null; then echo "DAEMON STILL RUNNING"; exit 1; fi
echo "stop-result=$(systemctl show -p Result --value encfs@data.service)"
echo "exit-status=$(systemctl show -p ExecMainStatus --value encfs@data.service)"
grep -c '"event": "suspend"' /srv/audit.log | sed 's/^/audit-suspends=/'
journalctl -b -t encfs-audit -o cat --no-pager | grep -c '"event": "suspend"' \
    | sed 's/^/journal-suspends=/'

# --on-revoke unmount: the revocation ends the service with 23, and systemd leaves it down.
echo "ON_REVOKE=unmount" >>/etc/encfs/data.conf
systemctl start encfs@data.service
mountpoint -q /srv/data
bao delete transit/keys/data/soft-delete >/dev/null
for _ in $(seq 100); do systemctl is-active -q encfs@data.service || break; sleep 0.1; done
sleep 7  # longer than RestartSec=5: a restart would have happened by now
echo "revoked-state=$(systemctl is-active encfs@data.service)"
echo "revoked-status=$(systemctl show -p ExecMainStatus --value encfs@data.service)"
echo "revoked-restarts=$(systemctl show -p NRestarts --value encfs@data.service)"
if mountpoint -q /srv/data; then echo "STILL MOUNTED"; exit 1; fi
bao write -f transit/keys/data/soft-delete-restore >/dev/null
echo boot2-ok
"""


@pytest.mark.systemd
def test_units_under_a_real_systemd(tmp_path: Path) -> None:
    root = guest_root()
    state = {name: tmp_path / name for name in ("etc-encfs", "vault", "srv", "units")}
    for path in state.values():
        path.mkdir(mode=0o700)
    binds: list[tuple[str | Path, str]] = [
        (state["etc-encfs"], "/etc/encfs"),
        (state["vault"], "/var/lib/encfs-vault"),
        (state["srv"], "/srv"),
        (state["units"], UNIT_DIR),
    ]
    first = run_nspawn(root, FIRST_BOOT, binds=binds, workdir=tmp_path / "boot1", timeout=180)
    first.check()
    assert "boot1-ok" in first.stdout, first.describe()
    score = re.search(r"security=.*exposure level for \S+: ([0-9.]+)", first.stdout)
    assert score and float(score.group(1)) <= 5.0, first.describe()
    print(f"\nsystemd-analyze security (real systemd): {score.group(0)}")

    second = run_nspawn(root, SECOND_BOOT, binds=binds, workdir=tmp_path / "boot2", timeout=180)
    second.check()
    out = second.stdout
    assert "boot2-ok" in out, second.describe()
    assert re.search(r"^state=(running|degraded)$", out, re.M), second.describe()
    assert "status-at-boot=active" in out
    assert 'Status: "suspended: access revoked (VaultKeyDisabled)' in out, second.describe()
    assert "resumed-ok" in out
    assert re.search(r"^restarts=1$", out, re.M), second.describe()
    assert "stop-result=success" in out and "exit-status=0" in out
    assert "revoked-state=failed" in out and "revoked-status=23" in out, second.describe()
    assert "revoked-restarts=0" in out  # a revocation is not a crash: no restart loop
    # Audit events reach both the file and, under systemd, the journal (README, "Audit").
    assert re.search(r"^audit-suspends=[1-9]", out, re.M), second.describe()
    assert re.search(r"^journal-suspends=[1-9]", out, re.M), second.describe()
    found = re.search(r"suspended-after-ms=([0-9]+)", out)
    assert found, second.describe()
    suspended_after = int(found.group(1)) / 1000
    print(f"revocation -> suspended (check interval 1 s): {suspended_after:.2f} s")
    assert suspended_after <= 3.5


CI_JOB = r"""
systemctl is-active encfs@scratch.service          # came up at boot, before this job
echo "fstype=$(findmnt -n -o FSTYPE /scratch)"
echo "status=$(systemctl show -p StatusText --value encfs@scratch.service)"
for i in $(seq 8); do head -c 200000 /dev/urandom >/scratch/blob$i; done
python -c 'open("/scratch/build.log", "w").write("CI-JOB-SECRET-4f1d0c\n" * 150000)'
mkdir /scratch/artifacts
cp /scratch/build.log /scratch/artifacts/copy.log
test "$(head -n 1 /scratch/build.log)" = "CI-JOB-SECRET-4f1d0c"
sync
ls -la /var/scratch-cipher | tee /results/cipher-listing
echo job-ok
"""


@pytest.mark.vm
@pytest.mark.slow
def test_ci_vm_scratch_is_crypto_erased_at_power_off(tmp_path: Path) -> None:
    artifacts = guest_artifacts()
    result = run_qemu(artifacts, CI_JOB, workdir=tmp_path, timeout=300)
    print(f"\nqemu CI job timing: {result.timing}")
    result.check()
    out = result.stdout
    assert "job-ok" in out and "fstype=fuse.encfs" in out, result.describe()
    assert "status=active" in out
    # After power-off, the VM's disk holds the scratch ciphertext - and nothing that opens it.
    listing = result.debugfs("ls -l /var/scratch-cipher")
    assert "encfs.ephemeral" in listing and ".encfs.dirid" in listing, listing
    assert "encfs.volume" not in listing, listing
    entries = [line for line in listing.splitlines() if line.strip()]
    assert len(entries) >= 2 + 2 + 8 + 2  # ., .., marker, dirid, 8 blobs, log, artifacts
    raw = result.raw_disk()
    needle = b"CI-JOB-SECRET-4f1d0c"
    found = 0
    with open(raw, "rb") as disk:
        tail = b""
        while chunk := disk.read(16 << 20):
            found += (tail + chunk).count(needle)
            tail = chunk[-len(needle) :]
    assert found == 0, "the job's plaintext reached the VM's disk"
