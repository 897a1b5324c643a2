"""The daemon's key lifecycle against a real OpenBao and real mounts: every kind of
revocation suspends (keys wiped, no plaintext readable — not from the page cache, not
through an earlier mmap), restoring access resumes, an unreachable vault gets its grace,
``encfs status`` tells, and the daemon's memory holds no key after a suspension or unmount.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from encfs import crypto
from encfs import format as fmt
from encfs.cli import ExitCode
from tests.conftest import SecondKey, TransitKey
from tests.harness import (
    DirectFile,
    MakeVolume,
    Volume,
    encfs,
    force_unmount,
    is_mounted,
    mount_foreground,
    scan_memory,
    wait_until,
)
from tests.openbao import OpenBao

INTERVAL = 1.0
BOUND = INTERVAL + 2.0  # the issue's promise: check interval + 2 s
PAYLOAD = b"plaintext that must not outlive the key " * 200


@dataclass
class Live:
    """A mounted volume whose daemon holds a least-privilege host token from a file."""

    vol: Volume
    bao: OpenBao
    key: str
    token_file: Path
    policy: str

    def status(self) -> dict[str, object]:
        proc = encfs("status", self.vol.mountpoint, "--json")
        assert proc.returncode == 0, proc.stderr
        out: dict[str, object] = json.loads(proc.stdout)
        return out

    def wait_state(self, state: str, bound: float = BOUND + 3) -> float:
        """Seconds until ``encfs status`` says ``state`` (fails after ``bound``)."""
        t0 = time.monotonic()
        assert wait_until(lambda: self.status()["state"] == state, timeout=bound, interval=0.1), (
            f"not {state} after {bound} s: {self.status()}"
        )
        return time.monotonic() - t0

    def new_token(self) -> None:
        """Put a fresh host token in the token file (the daemon re-reads it while suspended)."""
        tmp = self.token_file.with_suffix(".new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.bao.make_token([self.policy]) + "\n")
        os.replace(tmp, self.token_file)


def _mount_live(
    make_volume: Callable[..., Volume], bao: OpenBao, key: str, *extra: str, double: bool = False
) -> Live:
    vol = make_volume(mount=False, double=double)
    policy = bao.write_host_policy(key)
    token_file = vol.cipher_dir.parent / f"{vol.mountpoint.name}.token"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(bao.make_token([policy]) + "\n")
    vol.mount("--token-file", str(token_file), "--check-interval", str(INTERVAL), *extra)
    return Live(vol, bao, key, token_file, policy)


@pytest.fixture
def live(make_volume: MakeVolume, openbao: OpenBao, transit_key: TransitKey) -> Live:
    return _mount_live(make_volume, openbao, transit_key.name, "--offline-grace", "3")


_MMAP_CHILD = textwrap.dedent("""
    import mmap, sys
    with open(sys.argv[1], "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        first = m[:64]
        print("ready", flush=True)
        sys.stdin.readline()
        print(repr(m[:64] == first), flush=True)  # SIGBUS kills us here when evicted
""")


class Witness:
    """What a user had before the suspension: a file read into the page cache through a
    handle still open, and a live mmap in another process."""

    def __init__(self, path: Path) -> None:
        path.write_bytes(PAYLOAD)
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        assert os.pread(self.fd, len(PAYLOAD), 0) == PAYLOAD  # now in the page cache
        self.child = subprocess.Popen(
            [sys.executable, "-c", _MMAP_CHILD, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.child.stdout is not None
        assert self.child.stdout.readline().strip() == "ready"

    def assert_unreadable(self) -> None:
        with pytest.raises(PermissionError):
            os.pread(self.fd, 100, 0)  # the page cache was dropped: the read reaches us
        with pytest.raises(PermissionError):
            self.path.read_bytes()
        with pytest.raises(PermissionError):
            os.stat(self.path)
        with pytest.raises(PermissionError):
            os.listdir(self.path.parent)
        assert self.child.stdin is not None
        self.child.stdin.write("\n")
        self.child.stdin.flush()
        assert self.child.wait(timeout=10) == -signal.SIGBUS, "an old mmap still read plaintext"

    def assert_readable_again(self) -> None:
        assert os.pread(self.fd, len(PAYLOAD), 0) == PAYLOAD  # the old handle works again
        assert self.path.read_bytes() == PAYLOAD
        os.close(self.fd)

    def close(self) -> None:
        if self.child.poll() is None:
            self.child.kill()
            self.child.wait()
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass(frozen=True)
class Revocation:
    revoke: Callable[[Live], None]
    restore: Callable[[Live], object]
    reason: str


def _narrow(live: Live) -> None:
    live.bao.write_policy(
        live.policy,
        f"""
path "{live.bao.mount}/keys/{live.key}" {{ capabilities = ["read"] }}
path "auth/token/renew-self" {{ capabilities = ["update"] }}
path "auth/token/lookup-self" {{ capabilities = ["read"] }}
""",
    )


def _retire(live: Live) -> None:
    live.bao.rotate_key(live.key)
    live.bao.set_min_decryption_version(live.key, 2)


REVOCATIONS = {
    "token-revoked": Revocation(
        revoke=lambda lv: lv.bao.revoke_token(lv.token_file.read_text().strip()),
        restore=Live.new_token,
        reason="VaultPermissionDenied",
    ),
    "policy-narrowed": Revocation(
        revoke=_narrow,
        restore=lambda lv: lv.bao.write_host_policy(lv.key) and None,
        reason="VaultPermissionDenied",
    ),
    "key-soft-deleted": Revocation(
        revoke=lambda lv: lv.bao.soft_delete_key(lv.key),
        restore=lambda lv: lv.bao.restore_key(lv.key),
        reason="VaultKeyDisabled",
    ),
    "version-retired": Revocation(
        revoke=_retire,
        restore=lambda lv: lv.bao.set_min_decryption_version(lv.key, 1),
        reason="VaultKeyVersionRetired",
    ),
}


@pytest.mark.parametrize("kind", list(REVOCATIONS))
def test_revocation_suspends_and_restoring_resumes(live: Live, kind: str) -> None:
    how = REVOCATIONS[kind]
    mp = live.vol.mountpoint
    (mp / "dir").mkdir()
    witness = Witness(mp / "dir" / "cached.bin")
    try:
        assert live.status()["state"] == "active"
        t0 = time.monotonic()
        how.revoke(live)
        took = live.wait_state("suspended")
        print(f"\n{kind}: revoke -> suspended in {time.monotonic() - t0:.2f} s")
        assert took <= BOUND + 0.5
        status = live.status()
        assert how.reason in str(status["reason"])
        witness.assert_unreadable()
        with pytest.raises(PermissionError):
            (mp / "new").write_bytes(b"x")
        # ps shows it, too.
        title = Path(f"/proc/{status['pid']}/cmdline").read_bytes().decode(errors="replace")
        assert "suspended" in title

        t0 = time.monotonic()
        how.restore(live)
        live.wait_state("active")
        print(f"{kind}: restore -> active in {time.monotonic() - t0:.2f} s")
        assert time.monotonic() - t0 <= BOUND + 0.5
        witness.assert_readable_again()
        (mp / "new").write_bytes(b"after")
        live.vol.remount()
        assert (mp / "dir" / "cached.bin").read_bytes() == PAYLOAD
        assert (mp / "new").read_bytes() == b"after"
        events = [(e["event"], e["result"]) for e in live.vol.audit_events()]
        assert ("suspend", "ok") in events and ("resume", "ok") in events
        # SECURITY.md: the suspension itself (flush, drain, wipe, invalidate) takes ms.
        assert live.vol.log_file is not None
        wiped = re.search(r"cached inodes invalidated \((\d+) ms\)", live.vol.log_file.read_text())
        assert wiped and int(wiped.group(1)) < 500, wiped
        assert ("vault_error", "error") in events
    finally:
        witness.close()


def _counters(live: Live) -> dict[str, int]:
    counters = live.status()["counters"]
    assert isinstance(counters, dict)
    return counters


def test_native_requests_stop_at_suspension_and_come_back_with_the_keys(live: Live) -> None:
    """The suspension gate shuts the native path too: a handle opened before fails every
    request while suspended (EACCES), none of them served natively; after the resume the
    native path is keyed again and serves the same handle."""
    path = live.vol.mountpoint / "data"
    data = os.urandom(16 * 4096)
    path.write_bytes(data)
    with DirectFile(path) as f:
        for _ in range(3):
            assert f.pread(4096, 4096) == data[4096:8192]
        counters = _counters(live)
        if "native_reads" not in counters:
            pytest.skip(f"no native path here: {live.status()['io_path']}")
        assert counters["native_reads"] > 0
        live.bao.soft_delete_key(live.key)
        try:
            live.wait_state("suspended")
            suspended = _counters(live)
            for request in (
                lambda: f.pread(4096, 4096),
                lambda: f.pwrite(bytes(4096), 0),
                lambda: os.fstat(f.fd),
                lambda: os.getxattr(path, "security.capability"),
            ):
                with pytest.raises(PermissionError):
                    request()
            after = _counters(live)
            assert (after["native_reads"], after["native_writes"]) == (
                suspended["native_reads"],
                suspended["native_writes"],
            )
        finally:
            live.bao.restore_key(live.key)
        live.wait_state("active")
        for _ in range(3):
            assert f.pread(4096, 4096) == data[4096:8192]
        assert f.pwrite(data[:4096], 0) == 4096
    resumed = _counters(live)
    assert resumed["native_reads"] > counters["native_reads"]
    assert path.read_bytes() == data


def test_unreachable_vault_gets_its_grace(make_volume: MakeVolume, tmp_path: Path) -> None:
    """Sealed (503) is unreachable, not revoked: serve for the grace, then suspend; resume
    when the vault is back."""
    with OpenBao() as bao:
        bao.create_key("k")
        vol = Volume(
            tmp_path / "c",
            tmp_path / "p",
            bao.url_for("k"),
            {"PATH": os.environ["PATH"], "VAULT_TOKEN": bao.root_token},
            audit_log=tmp_path / "audit",
        )
        vol.mountpoint.mkdir()
        vol.init()
        live = Live(vol, bao, "k", tmp_path / "unused", "")
        vol.mount("--check-interval", str(INTERVAL), "--offline-grace", "4")
        try:
            (vol.mountpoint / "f").write_bytes(PAYLOAD)
            bao.seal()
            live.wait_state("offline-grace")
            assert (vol.mountpoint / "f").read_bytes() == PAYLOAD  # still serving
            (vol.mountpoint / "g").write_bytes(b"written during grace")
            assert "sealed" in str(live.status()["reason"]).lower()
            took = live.wait_state("suspended", bound=4 + BOUND + 3)
            assert took >= 1.0
            assert "offline grace" in str(live.status()["reason"])
            with pytest.raises(PermissionError):
                (vol.mountpoint / "f").read_bytes()
            bao.unseal()
            live.wait_state("active")
            assert (vol.mountpoint / "f").read_bytes() == PAYLOAD
            assert (vol.mountpoint / "g").read_bytes() == b"written during grace"
        finally:
            force_unmount(vol.mountpoint)


def test_zero_grace_fails_closed(make_volume: MakeVolume, tmp_path: Path) -> None:
    with OpenBao() as bao:
        bao.create_key("k")
        vol = Volume(
            tmp_path / "c",
            tmp_path / "p",
            bao.url_for("k"),
            {"PATH": os.environ["PATH"], "VAULT_TOKEN": bao.root_token},
        )
        vol.mountpoint.mkdir()
        vol.init()
        live = Live(vol, bao, "k", tmp_path / "unused", "")
        vol.mount("--check-interval", str(INTERVAL), "--offline-grace", "0")
        try:
            bao.stop()
            took = live.wait_state("suspended")
            assert took <= BOUND + 0.5
            assert "unreachable" in str(live.status()["reason"])
        finally:
            force_unmount(vol.mountpoint)


def test_on_revoke_unmount_exits_with_its_own_code(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
) -> None:
    vol: Volume = make_volume(mount=False)
    token = openbao.make_token([openbao.write_host_policy(transit_key.name)])
    env = {**vol.env, "VAULT_TOKEN": token, "ENCFS_AUDIT_LOG": "none"}
    proc = mount_foreground(
        vol.cipher_dir,
        vol.mountpoint,
        "--check-interval",
        str(INTERVAL),
        "--on-revoke",
        "unmount",
        env=env,
    )
    try:
        assert wait_until(lambda: is_mounted(vol.mountpoint), timeout=20)
        (vol.mountpoint / "f").write_bytes(b"kept")
        openbao.revoke_token(token)
        assert proc.wait(timeout=BOUND + 10) == ExitCode.REVOKED
        assert not is_mounted(vol.mountpoint)
        assert proc.stderr is not None
        assert "revoked" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    vol.mount()
    assert (vol.mountpoint / "f").read_bytes() == b"kept"


def test_fsynced_writes_survive_a_revocation(live: Live) -> None:
    mp = live.vol.mountpoint
    durable: dict[str, bytes] = {}
    stopped = threading.Event()
    errors_seen: list[int] = []

    def writer() -> None:
        i = 0
        while not stopped.is_set():
            data = os.urandom(4096 + i)
            try:
                with open(mp / f"w{i}", "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                durable[f"w{i}"] = data
            except OSError as exc:
                errors_seen.append(exc.errno or 0)
                time.sleep(0.05)
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(1.0)
        REVOCATIONS["key-soft-deleted"].revoke(live)
        live.wait_state("suspended")
        time.sleep(0.5)
    finally:
        stopped.set()
        t.join()
    assert durable and errors_seen and set(errors_seen) == {errno.EACCES}
    REVOCATIONS["key-soft-deleted"].restore(live)
    live.wait_state("active")
    live.vol.remount()
    for name, data in durable.items():
        assert (mp / name).read_bytes() == data


def test_suspended_errno_is_configurable(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
) -> None:
    live = _mount_live(make_volume, openbao, transit_key.name, "--suspended-errno", "EIO")
    (live.vol.mountpoint / "f").write_text("x")
    openbao.soft_delete_key(transit_key.name)
    try:
        live.wait_state("suspended")
        with pytest.raises(OSError) as ei:
            (live.vol.mountpoint / "f").read_text()
        assert ei.value.errno == errno.EIO
        live.vol.unmount()  # a suspended volume unmounts cleanly (the daemon exits 0)
    finally:
        openbao.restore_key(transit_key.name)


def test_status_reports_the_mount(live: Live, transit_key: TransitKey) -> None:
    (live.vol.mountpoint / "f").write_bytes(b"y" * 10000)
    (live.vol.mountpoint / "f").read_bytes()
    time.sleep(INTERVAL + 0.5)  # one watcher check
    s = live.status()
    assert s["state"] == "active" and s["reason"] == ""
    assert s["mountpoint"] == str(live.vol.mountpoint.resolve())
    assert s["key_name"] == transit_key.name and s["kek_version"] == 1
    assert s["vault_reachable"] is True and s["last_check"]
    token = s["token"]
    assert isinstance(token, dict) and token["accessor"] and token["renewable"] is True
    assert 0 < token["ttl"] <= 3600
    counters = s["counters"]
    assert isinstance(counters, dict) and counters["bytes_written"] >= 10000
    assert counters["integrity_errors"] == 0
    memory = s["memory"]
    assert isinstance(memory, dict) and memory["locked"] is True and memory["dontdump"] is True
    assert s["pid"] == live.vol.daemon_pid() and int(str(s["rss"])) > 10 << 20
    text = encfs("status", live.vol.mountpoint).stdout
    assert "active since" in text and "key memory   locked" in text
    listing = json.loads(encfs("status", "--json").stdout)
    assert any(r["mountpoint"] == s["mountpoint"] for r in listing)


def test_status_of_nothing(tmp_path: Path) -> None:
    proc = encfs("status", tmp_path)
    assert proc.returncode == ExitCode.NOT_MOUNTED
    assert "no encfs daemon" in proc.stderr


# --- memory hygiene ------------------------------------------------------------------------------


def _key_material(live: Live, root_token: str) -> dict[str, bytes]:
    """Every key the daemon derives, computed here from the test's own knowledge."""
    header = json.loads(encfs("info", live.vol.cipher_dir, "--json", check=True).stdout)
    answer = live.bao.admin.secrets.transit.decrypt_data(
        name=live.key, ciphertext=header["wrapped_key"]
    )
    volume_key = base64.b64decode(answer["data"]["plaintext"])
    volume_id = bytes.fromhex(header["volume_id"])
    out = {"volume": volume_key}

    def derive(ikm: bytes, salt: bytes | None, info: bytes, length: int = 32) -> bytes:
        buf = bytearray(length)
        crypto.hkdf_into(ikm, salt=salt, info=info, out=buf)
        return bytes(buf)

    out["content"] = derive(volume_key, volume_id, b"encfs/v1/content")
    ikm, prefix = volume_key, b"encfs/v1/"
    if "wrapped_key2" in header:  # a double volume: its outer key, and subkeys of both
        answer = live.bao.admin.secrets.transit.decrypt_data(
            name=header["key_name2"], ciphertext=header["wrapped_key2"]
        )
        outer_key = base64.b64decode(answer["data"]["plaintext"])
        out["outer"] = outer_key
        out["outer content"] = derive(outer_key, volume_id, b"encfs/v1/outer-content")
        ikm, prefix = volume_key + outer_key, b"encfs/v1/double/"
    for purpose, length in (("names", 64), ("meta", 32), ("header", 32)):
        out[purpose] = derive(ikm, volume_id, prefix + purpose.encode(), length)
    contents = [
        p
        for p in live.vol.cipher_dir.rglob("*")
        if p.is_file()
        and not p.name.startswith((".encfs", "encfs.volume", fmt.LOCK_NAME))
        and p.stat().st_size > fmt.FILE_HEADER_LEN
    ]
    assert contents
    for i, backing in enumerate(contents):  # every file's own key
        file_id = fmt.parse_file_header(backing.read_bytes()[: fmt.FILE_HEADER_LEN])
        out[f"file{i}"] = derive(out["content"], None, b"encfs/v1/file" + file_id)
        if "outer content" in out:
            out[f"outer file{i}"] = derive(
                out["outer content"], None, b"encfs/v1/outer-file" + file_id
            )
    return out


def _native_io(live: Live, f: DirectFile) -> int | None:
    """Aligned reads and whole-block overwrites through ``f`` (at least 12 blocks) until
    the native path served some of both; how many reads it served so far (None: no native
    path in this build)."""
    for _ in range(4):  # keyed on the second request Python serves
        assert len(f.pread(2 * 4096, 4096)) == 2 * 4096
        assert f.pwrite(os.urandom(4096), 8 * 4096) == 4096
    status = live.status()
    if not str(status["io_path"]).startswith("native"):
        return None
    counters = status["counters"]
    assert isinstance(counters, dict)
    assert counters["native_reads"] > 0 and counters["native_writes"] > 0, counters
    return int(counters["native_reads"])


def _needles(keys: dict[str, bytes]) -> dict[str, bytes]:
    needles = {}
    for name, key in keys.items():
        needles[f"{name} raw"] = key
        needles[f"{name} hex"] = key.hex().encode()
        needles[f"{name} HEX"] = key.hex().upper().encode()
        needles[f"{name} base64"] = base64.b64encode(key).rstrip(b"=")
        needles[f"{name} base64url"] = base64.urlsafe_b64encode(key).rstrip(b"=")
    return needles


TOKEN_COPIES_MAX = 2
"""The host token in the daemon's memory while suspended, however many checks have passed:
the locked page of the vault client in use and that of the client made at mount (the mount's
own frame still refers to it); a replaced client's page is unmapped when it is freed.
Before the token lived in locked memory, five copies and more were found here."""


@pytest.mark.parametrize("double", [False, True], ids=["single", "double"])
def test_no_key_in_daemon_memory_after_suspend_and_before_exit(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
    request: pytest.FixtureRequest,
    double: bool,
) -> None:
    """For a double volume, KEK 2 is the one revoked: both volume keys, every subkey of
    either and every per-file key of both layers must be gone."""
    live = _mount_live(make_volume, openbao, transit_key.name, double=double)
    mp = live.vol.mountpoint
    (mp / "d").mkdir()
    for i in range(20):
        (mp / "d" / f"file{i}").write_bytes(os.urandom(50_000))
        (mp / "d" / f"file{i}").read_bytes()
    os.symlink("a target", mp / "d" / "link")  # the names and meta keys at work, too
    os.setxattr(mp / "d" / "file1", "user.note", b"small value")
    assert os.readlink(mp / "d" / "link") == "a target"
    assert os.getxattr(mp / "d" / "file1", "user.note") == b"small value"
    (mp / "d" / "tiny").write_bytes(b"short block")
    with open(mp / "d" / "file0", "r+b") as f:
        m = mmap.mmap(f.fileno(), 0)
        m[:10] = b"0123456789"
        m.flush()
        m.close()
    # Cipher contexts in the native path too, kept (the file stays open) until the wipe.
    held_open = DirectFile(mp / "d" / "file2")
    native = _native_io(live, held_open)
    time.sleep(2 * INTERVAL + 0.5)  # a few watcher unwraps have passed through memory
    needles = _needles(_key_material(live, openbao.root_token))
    pid = live.vol.daemon_pid()
    for name in ("volume raw", "outer raw") if double else ("volume raw",):
        assert name in scan_memory(pid, {name: needles[name]}), (
            "the scan must see the key while the volume is active (else it proves nothing)"
        )
    revoked = request.getfixturevalue("second_key").name if double else transit_key.name
    openbao.soft_delete_key(revoked)
    try:
        live.wait_state("suspended")
        assert scan_memory(pid, needles) == {}, "key material left in memory after suspension"
        # While suspended the watcher reconnects at every check, re-reading the token file:
        # the token must stay in the key owner's locked memory (one copy per live client),
        # not pile up in str/bytes copies request after request.
        time.sleep(3 * INTERVAL + 0.5)
        token_files = [live.token_file]
        if double:
            assert live.vol.vault2_token_file is not None
            token_files.append(live.vol.vault2_token_file)
        for token_file in token_files:
            token = token_file.read_text().strip().encode()
            copies = scan_memory(pid, {"token": token}).get("token", 0)
            assert 1 <= copies <= TOKEN_COPIES_MAX, f"{copies} copies of a host token in memory"
    finally:
        openbao.restore_key(revoked)
    live.wait_state("active")
    if native is not None:  # resumed: the native path is keyed again, and serves again
        again = _native_io(live, held_open)
        assert again is not None and again > native
    held_open.close()  # (an open file would keep the mount busy)
    # Stop the daemon when it removes its runtime file — its last act after unmounting,
    # wiping the keys and closing the vault client, before the interpreter exits — and
    # scan it there. (A SIGSTOP injected at exit_group does not stop the exit.)
    from encfs.mounts import runtime_file

    tracer = subprocess.Popen(
        ["strace", "-qq", "-o", "/dev/null", "-p", str(pid), "-P", str(runtime_file(mp)),
         "-e", "trace=unlink", "-e", "inject=unlink:signal=STOP"],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        time.sleep(1.0)  # strace attached
        subprocess.run(["fusermount3", "-u", str(mp)], check=True)

        def stopped() -> bool:
            status = Path(f"/proc/{pid}/status").read_text()
            return any(
                line.startswith("State:") and line.split()[1] == "T" for line in status.splitlines()
            )

        # Traced, the daemon passes through 't' at every syscall: wait for the unlink to
        # have happened, detach strace, and expect the group stop (T) the SIGSTOP left.
        assert wait_until(lambda: not runtime_file(mp).exists(), timeout=20), (
            "daemon did not reach its last unlink"
        )
        time.sleep(0.2)
        tracer.kill()
        tracer.wait()
        assert wait_until(stopped, timeout=10), "daemon is not stopped at its last unlink"
        assert not is_mounted(mp)
        leftovers = scan_memory(pid, needles)
        assert leftovers == {}, f"key material in memory at exit: {leftovers}"
    finally:
        tracer.kill()
        tracer.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_kmip_volume_end_to_end_and_revocation(tmp_path: Path) -> None:
    """A volume whose KEK is a KMIP key: init, mount, rotate (re-wrap) through the CLI over
    mutual TLS; revoking the key in the KMIP server suspends the mount within the bound."""
    from tests.kmip import PyKMIPServer

    with PyKMIPServer() as kmip:
        uid = kmip.create_key()
        creds = [
            "--ca-file",
            str(kmip.ca_file),
            "--client-cert",
            str(kmip.client_cert),
            "--client-key",
            str(kmip.client_key),
        ]
        env = {"PATH": os.environ["PATH"]}
        vol = Volume(
            tmp_path / "c", tmp_path / "p", kmip.url_for(uid), env, audit_log=tmp_path / "audit"
        )
        vol.mountpoint.mkdir()
        encfs("init", vol.cipher_dir, "--vault", vol.vault_url, *creds, env=env, check=True)
        info = json.loads(encfs("info", vol.cipher_dir, "--json", check=True).stdout)
        assert info["wrapped_key"].startswith("kmip:v1:")
        proc = encfs("rotate", vol.cipher_dir, "--vault", vol.vault_url, *creds, env=env)
        assert proc.returncode == 0, proc.stderr
        assert (
            json.loads(encfs("info", vol.cipher_dir, "--json").stdout)["wrapped_key"]
            != (info["wrapped_key"])
        )
        vol.mount(*creds, "--check-interval", str(INTERVAL))
        live = Live(vol, OpenBao.__new__(OpenBao), uid, tmp_path / "unused", "")
        try:
            witness = Witness(vol.mountpoint / "f")
            try:
                assert live.status()["token"]["client_cert_subject"]  # type: ignore[index]
                t0 = time.monotonic()
                kmip.revoke(uid)
                live.wait_state("suspended")
                assert time.monotonic() - t0 <= BOUND + 0.5
                assert "VaultKeyDisabled" in str(live.status()["reason"])
                witness.assert_unreadable()
            finally:
                witness.close()
        finally:
            pid = vol.daemon_pid()
            force_unmount(vol.mountpoint)
            assert wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=10)
        # A revoked KMIP key cannot unwrap again: mount refuses with its own code.
        proc = encfs(
            "mount", vol.cipher_dir, vol.mountpoint, "--vault", vol.vault_url, *creds, env=env
        )
        assert proc.returncode == ExitCode.VAULT_KEY_DISABLED, proc.stderr


def test_double_volume_with_kek_2_in_kmip_suspends_when_either_is_revoked(
    make_volume: MakeVolume, openbao: OpenBao, transit_key: TransitKey, tmp_path: Path
) -> None:
    """Two different vaults: KEK 1 a transit key of OpenBao, KEK 2 a KMIP key of PyKMIP,
    each reached with its own credential (token file; client certificate). Revoking the
    KMIP key suspends the mount (status names KEK 2), a KMIP key cannot come back, and a
    new mount is refused with its code, naming the KEK."""
    from tests.kmip import PyKMIPServer

    with PyKMIPServer() as kmip:
        uid = kmip.create_key()
        creds2 = [
            "--vault2-ca-file", str(kmip.ca_file),
            "--vault2-client-cert", str(kmip.client_cert),
            "--vault2-client-key", str(kmip.client_key),
        ]  # fmt: skip
        vol: Volume = make_volume(mount=False)
        shutil.rmtree(vol.cipher_dir, ignore_errors=True)
        second = ["--vault2", kmip.url_for(uid), *creds2]
        encfs(
            "init", vol.cipher_dir, "--double", "--vault", vol.vault_url, *second,
            env=vol.env, check=True,
        )  # fmt: skip
        info = json.loads(encfs("info", vol.cipher_dir, "--json", check=True).stdout)
        assert info["wrapped_key"].startswith("vault:v1:")
        assert info["wrapped_key2"].startswith("kmip:v1:") and info["kek_version2"] == 0
        vol.mount(*second, "--check-interval", str(INTERVAL))
        live = Live(vol, openbao, transit_key.name, tmp_path / "unused", "")
        try:
            witness = Witness(vol.mountpoint / "f")
            try:
                assert wait_until(
                    lambda: [k["state"] for k in live.status()["keks"]] == ["ok", "ok"],  # type: ignore[attr-defined]
                    timeout=BOUND + 2,
                ), live.status()
                keks = live.status()["keks"]
                assert keks[1]["token"]["client_cert_subject"]  # type: ignore[index]
                assert keks[0]["token"]["accessor"]  # type: ignore[index]
                text = encfs("status", vol.mountpoint, check=True).stdout
                assert "KEK 2" in text and kmip.url_for(uid) in text and "double" in text
                t0 = time.monotonic()
                kmip.revoke(uid)
                live.wait_state("suspended")
                assert time.monotonic() - t0 <= BOUND + 0.5
                status = live.status()
                assert "KEK 2" in str(status["reason"])
                assert [k["state"] for k in status["keks"]] == ["ok", "revoked"]  # type: ignore[attr-defined]
                witness.assert_unreadable()
            finally:
                witness.close()
        finally:
            pid = vol.daemon_pid()
            force_unmount(vol.mountpoint)
            assert wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=10)
        proc = encfs(
            "mount", vol.cipher_dir, vol.mountpoint, "--vault", vol.vault_url, *second,
            env=vol.env,
        )  # fmt: skip
        assert proc.returncode == ExitCode.VAULT_KEY_DISABLED, proc.stderr
        assert "KEK 2" in proc.stderr


@pytest.mark.systemd
def test_sd_notify_status_of_a_double_volume_names_both_keks(
    make_volume: MakeVolume, openbao: OpenBao, second_key: SecondKey, tmp_path: Path
) -> None:
    """STATUS= shows each KEK's version and state: what `systemctl status` prints."""
    import socket

    vol: Volume = make_volume(mount=False, double=True)
    addr = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(addr)
    receiver.settimeout(0.2)
    statuses: list[str] = []
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            try:
                data = receiver.recv(4096).decode()
            except TimeoutError:
                continue
            statuses.extend(line[7:] for line in data.splitlines() if line.startswith("STATUS="))

    listener = threading.Thread(target=receive)
    listener.start()
    env = {**vol.env, "NOTIFY_SOCKET": addr, "ENCFS_AUDIT_LOG": "none"}
    proc = mount_foreground(
        vol.cipher_dir, vol.mountpoint, *map(str, vol.vault2_args()), "--check-interval",
        str(INTERVAL), env=env,
    )  # fmt: skip
    try:
        ok = "[KEK 1 v1 ok, KEK 2 v1 ok] active"
        assert wait_until(lambda: ok in statuses, timeout=20), statuses
        openbao.soft_delete_key(second_key.name)
        assert wait_until(
            lambda: any(
                s.startswith("[KEK 1 v1 ok, KEK 2 v1 revoked] suspended") for s in statuses
            ),
            timeout=BOUND + 2,
        ), statuses
        openbao.restore_key(second_key.name)
        assert wait_until(lambda: statuses[-1] == ok, timeout=BOUND + 2), statuses
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(Exception):
            openbao.restore_key(second_key.name)
        stop.set()
        listener.join()
        receiver.close()


@pytest.mark.systemd
@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify_ready_status_watchdog_stopping(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
    tmp_path: Path,
    abstract: bool,
) -> None:
    """A fake systemd: a datagram socket in NOTIFY_SOCKET receives what a real daemon says
    over a real mount — READY=1 only once the mount answers, STATUS= on every state change,
    WATCHDOG=1 at half of WATCHDOG_USEC, STOPPING=1 on SIGTERM."""
    import socket

    vol: Volume = make_volume(mount=False)
    name = f"encfs-test-{os.getpid()}-{time.monotonic_ns()}"
    addr = "\0" + name if abstract else str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(addr)
    receiver.settimeout(0.2)
    messages: list[tuple[float, dict[str, str]]] = []
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            try:
                data = receiver.recv(4096).decode()
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
            messages.append((time.monotonic(), fields))

    def said(key: str, value: str | None = None) -> list[dict[str, str]]:
        return [f for _, f in messages if key in f and (value is None or value in f[key])]

    listener = threading.Thread(target=receive)
    listener.start()
    env = {
        **vol.env,
        "NOTIFY_SOCKET": "@" + name if abstract else addr,
        "WATCHDOG_USEC": "1000000",
        "ENCFS_AUDIT_LOG": "none",
    }
    proc = mount_foreground(
        vol.cipher_dir, vol.mountpoint, "--check-interval", str(INTERVAL), env=env
    )
    try:
        assert wait_until(lambda: said("READY", "1"), timeout=20), messages
        assert is_mounted(vol.mountpoint)  # READY=1 comes only once the mount answers
        assert said("STATUS", "active")
        openbao.soft_delete_key(transit_key.name)
        assert wait_until(lambda: said("STATUS", "suspended"), timeout=BOUND + 2), messages
        openbao.restore_key(transit_key.name)
        n_active = len(said("STATUS", "active"))
        assert wait_until(lambda: len(said("STATUS", "active")) > n_active, timeout=BOUND + 2)
        # every 0.5 s, suspended or not (the jittered first check can make the whole
        # suspend-resume round shorter than three pings: wait for them)
        assert wait_until(lambda: len(said("WATCHDOG", "1")) >= 3, timeout=5), messages
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert said("STOPPING", "1")
        assert not is_mounted(vol.mountpoint)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(Exception):
            openbao.restore_key(transit_key.name)
        stop.set()
        listener.join()
        receiver.close()


# --- ephemeral (crypto-erased) volumes -----------------------------------------------------------


def _ephemeral_env() -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "ENCFS_AUDIT_LOG": "none"}


def test_ephemeral_volume_is_crypto_erased(tmp_path: Path) -> None:
    cipher, mp = tmp_path / "scratch-cipher", tmp_path / "scratch"
    mp.mkdir()
    env = _ephemeral_env()
    proc = encfs("mount", "--ephemeral", cipher, mp, env=env)  # no vault, no token at all
    assert proc.returncode == 0, proc.stderr
    try:
        secret = b"ephemeral scratch data " * 500
        (mp / "job").mkdir()
        (mp / "job" / "out.bin").write_bytes(secret)
        assert (mp / "job" / "out.bin").read_bytes() == secret
        pid = json.loads(encfs("status", mp, "--json", check=True).stdout)["pid"]
        assert json.loads(encfs("status", mp, "--json").stdout)["ephemeral"] is True
        names = sorted(p.name for p in cipher.iterdir())
        assert "encfs.volume" not in names and "encfs.ephemeral" in names
        raw = b"".join(p.read_bytes() for p in cipher.rglob("*") if p.is_file())
        assert secret[:64] not in raw and b"out.bin" not in raw
    finally:
        assert encfs("unmount", mp).returncode == 0
    assert wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=10)
    # What survives: ciphertext, the marker and nothing that could unlock it.
    left = [p for p in cipher.rglob("*") if p.is_file()]
    assert len(left) >= 2  # the marker and out.bin's ciphertext (directory ids are links)
    assert not any(p.name.startswith("encfs.volume") for p in left)
    assert encfs("mount", cipher, mp, env=env).returncode == ExitCode.NO_VOLUME
    assert encfs("fsck", cipher, env=env).returncode == ExitCode.NO_VOLUME
    assert "cannot be decrypted" in (cipher / "encfs.ephemeral").read_text() or (
        "nothing here can be decrypted" in (cipher / "encfs.ephemeral").read_text()
    )
    # The next ephemeral mount starts empty and removes the old ciphertext.
    old = {p.name for p in cipher.rglob("*")}
    assert encfs("mount", "--ephemeral", cipher, mp, env=env).returncode == 0
    try:
        assert os.listdir(mp) == []
        now = {p.name for p in cipher.rglob("*")}
        kept = {"encfs.ephemeral", ".encfs.dirid", fmt.LOCK_NAME}
        assert now == kept
        assert not (old - kept) & now
    finally:
        assert encfs("unmount", mp).returncode == 0


def test_ephemeral_refuses_to_erase_anything_else(make_volume: MakeVolume, tmp_path: Path) -> None:
    vol: Volume = make_volume()
    (vol.mountpoint / "keep").write_text("precious")
    vol.unmount()
    header = (vol.cipher_dir / "encfs.volume").read_bytes()
    proc = encfs("mount", "--ephemeral", vol.cipher_dir, vol.mountpoint, env=_ephemeral_env())
    assert proc.returncode == ExitCode.VOLUME_EXISTS
    assert "persistent encfs volume" in proc.stderr
    assert (vol.cipher_dir / "encfs.volume").read_bytes() == header
    vol.mount()
    assert (vol.mountpoint / "keep").read_text() == "precious"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not encfs")
    (tmp_path / "elsewhere").mkdir()
    proc = encfs("mount", "--ephemeral", foreign, tmp_path / "elsewhere", env=_ephemeral_env())
    assert proc.returncode == ExitCode.VOLUME_EXISTS
    assert (foreign / "notes.txt").read_text() == "not encfs"


def test_ephemeral_volume_erases_itself_when_the_vault_revokes(
    tmp_path: Path,
    openbao: OpenBao,
    transit_key: TransitKey,
) -> None:
    cipher, mp = tmp_path / "c", tmp_path / "p"
    mp.mkdir()
    env = {**transit_key.env, "ENCFS_AUDIT_LOG": "none"}
    proc = mount_foreground(
        "--ephemeral",
        cipher,
        mp,
        "--vault",
        transit_key.url,
        "--check-interval",
        str(INTERVAL),
        env=env,
    )
    try:
        assert wait_until(lambda: is_mounted(mp), timeout=20)
        (mp / "f").write_bytes(b"scratch")
        openbao.soft_delete_key(transit_key.name)
        t0 = time.monotonic()
        assert proc.wait(timeout=BOUND + 10) == ExitCode.REVOKED
        assert time.monotonic() - t0 <= BOUND + 1
        assert not is_mounted(mp)
        assert proc.stderr is not None and "erased" in proc.stderr.read()
    finally:
        with contextlib.suppress(Exception):
            openbao.restore_key(transit_key.name)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        force_unmount(mp)


def test_restart_after_kill_9_detaches_the_dead_mount(make_volume: MakeVolume) -> None:
    """kill -9 leaves the kernel's mount behind (ENOTCONN); the next mount - what systemd's
    Restart= runs - detaches it and mounts again, and the data is there."""
    vol: Volume = make_volume()
    (vol.mountpoint / "f").write_bytes(b"survives a crash")
    os.kill(vol.daemon_pid(), signal.SIGKILL)
    assert wait_until(lambda: _enotconn(vol.mountpoint), timeout=10)
    assert is_mounted(vol.mountpoint)
    proc = encfs("mount", vol.cipher_dir, vol.mountpoint, *vol.audit_args(), env=vol.env)
    assert proc.returncode == 0, proc.stderr
    assert "crashed encfs daemon left its mount behind" in proc.stderr
    assert (vol.mountpoint / "f").read_bytes() == b"survives a crash"
    # A live mount is never taken over.
    proc = encfs("mount", vol.cipher_dir, vol.mountpoint, env=vol.env)
    assert proc.returncode == ExitCode.MOUNT_FAILED and "already a mount point" in proc.stderr


def _enotconn(path: Path) -> bool:
    try:
        os.statvfs(path)  # always reaches the (dead) daemon; stat may be served from cache
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def test_vault_stopped_serves_for_the_grace_then_suspends_and_resumes_when_back(
    tmp_path: Path,
) -> None:
    """A real stop: the Raft-backed single-host OpenBao (`encfs vault serve`) goes away
    (connection refused), the mount serves through the grace, suspends, and resumes by
    itself once the vault is back (same data, unsealed from its own init.json)."""
    from encfs.bao import serve
    from encfs.bao import setup as provision
    from tests.openbao import free_port

    data = tmp_path / "vault"
    listen, cluster = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    server = serve.start_serve(data, listen, cluster_listen=cluster)
    try:
        root = provision.read_admin_token(server.paths.init_file)
        token = tmp_path / "host.token"
        ca = server.paths.ca_file
        result = provision.setup(server.addr, root, "k", "guest", token, ca_file=ca)
        env = {"PATH": os.environ["PATH"], "ENCFS_AUDIT_LOG": "none"}
        vol = Volume(tmp_path / "c", tmp_path / "p", result.vault_url, env)
        vol.mountpoint.mkdir()
        creds = ["--token-file", str(token), "--ca-file", str(server.paths.ca_file)]
        encfs("init", vol.cipher_dir, "--vault", vol.vault_url, *creds, env=env, check=True)
        vol.mount(*creds, "--check-interval", str(INTERVAL), "--offline-grace", "4")
        live = Live(vol, OpenBao.__new__(OpenBao), "k", token, "")
        try:
            (vol.mountpoint / "f").write_bytes(PAYLOAD)
            server.stop()
            live.wait_state("offline-grace")
            assert "cannot reach" in str(live.status()["reason"])
            assert (vol.mountpoint / "f").read_bytes() == PAYLOAD  # serving in the grace
            live.wait_state("suspended", bound=4 + BOUND + 3)
            with pytest.raises(PermissionError):
                (vol.mountpoint / "f").read_bytes()
            server = serve.start_serve(data, listen, cluster_listen=cluster)
            t0 = time.monotonic()
            live.wait_state("active")
            assert time.monotonic() - t0 <= BOUND + 0.5
            assert (vol.mountpoint / "f").read_bytes() == PAYLOAD
        finally:
            force_unmount(vol.mountpoint)
    finally:
        server.stop()


def test_status_warns_when_key_memory_cannot_be_locked(make_volume: MakeVolume) -> None:
    """Without CAP_IPC_LOCK and with RLIMIT_MEMLOCK 0, mlock fails: the mount still works,
    and both the mount's warning and `encfs status` say what to raise."""
    import shutil

    if shutil.which("setpriv") is None or shutil.which("prlimit") is None:
        pytest.skip("needs setpriv and prlimit (util-linux)")
    vol: Volume = make_volume(mount=False)
    env = {**vol.env, "ENCFS_AUDIT_LOG": "none"}
    proc = subprocess.run(
        ["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock", "prlimit",
         "--memlock=0:0", sys.executable, "-m", "encfs", "mount", str(vol.cipher_dir),
         str(vol.mountpoint), "--vault", vol.vault_url],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "key memory is not locked" in proc.stderr
    status = json.loads(encfs("status", vol.mountpoint, "--json", check=True).stdout)
    assert status["memory"]["locked"] is False
    assert "LimitMEMLOCK" in status["memory"]["detail"]
    text = encfs("status", vol.mountpoint).stdout
    assert "key memory   NOT locked" in text
    (vol.mountpoint / "f").write_text("still works")
    assert (vol.mountpoint / "f").read_text() == "still works"


def test_one_cipher_dir_is_mounted_once(make_volume: MakeVolume, tmp_path: Path) -> None:
    """Two daemons on one cipher dir interleaved appends and lost 90 of 100 lines without
    an error: the second mount now fails (exit 24) naming the first mountpoint; the lock
    goes with the daemon, even when it is killed, and a restart mounts again."""
    vol: Volume = make_volume()
    other = tmp_path / "second-plain"
    other.mkdir()
    proc = encfs("mount", vol.cipher_dir, other, *vol.audit_args(), env=vol.env)
    assert proc.returncode == ExitCode.VOLUME_IN_USE, proc.stderr
    assert f"the encfs mount at {vol.mountpoint}" in proc.stderr
    assert not is_mounted(other)
    (vol.mountpoint / "f").write_bytes(b"kept")
    os.kill(vol.daemon_pid(), signal.SIGKILL)
    assert wait_until(lambda: _enotconn(vol.mountpoint), timeout=10)
    proc = encfs("mount", vol.cipher_dir, other, *vol.audit_args(), env=vol.env)
    assert proc.returncode == 0, proc.stderr
    try:
        assert (other / "f").read_bytes() == b"kept"
    finally:
        encfs("unmount", other, env=vol.env)
        subprocess.run(["fusermount3", "-uz", str(vol.mountpoint)], capture_output=True)


def test_mounting_over_a_nonempty_directory_needs_nonempty(make_volume: MakeVolume) -> None:
    """A mount over files hides them silently; refuse (exit 20, saying why and how) unless
    ``-o nonempty``, as gocryptfs does."""
    vol: Volume = make_volume(mount=False)
    (vol.mountpoint / "hidden-by-a-mount").write_text("here")
    proc = encfs("mount", vol.cipher_dir, vol.mountpoint, *vol.audit_args(), env=vol.env)
    assert proc.returncode == ExitCode.MOUNT_FAILED
    assert "not empty" in proc.stderr and "-o nonempty" in proc.stderr
    assert not is_mounted(vol.mountpoint)
    vol.mount("-o", "nonempty")
    assert os.listdir(vol.mountpoint) == []
    vol.unmount()
    assert (vol.mountpoint / "hidden-by-a-mount").read_text() == "here"
