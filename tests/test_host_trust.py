"""What the host trusts, attacked for real: a real OpenBao, real mounts, a real unprivileged
user (``nobody`` through ``setpriv``).

- the vault URL in the header is never sent the host's token (a listener written into the
  header receives nothing; only a vault configured on the host is used);
- a header built with another data key of the same KEK is refused (the host's pin), also
  while mounted (the watcher compares what it unwraps with the key in use);
- hiding the header while mounted skips no vault check;
- ``-o allow_other`` alone still enforces modes and owners;
- a token typed where a path belongs is never echoed, and relative paths survive the daemon;
- the cipher dir must be root's and 0700 when encfs runs as root.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.server
import json
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest

from encfs import format as fmt
from encfs import volume
from encfs.cli import ExitCode
from encfs.keys import VolumeKeys
from tests.conftest import SecondKey, TransitKey
from tests.harness import MakeVolume, Volume, encfs, force_unmount, is_mounted, wait_until
from tests.openbao import OpenBao

INTERVAL = 1.0
BOUND = INTERVAL + 2.0  # the promise: check interval + 2 s
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
PLAIN_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}


# --- helpers ---------------------------------------------------------------------------------


class Listener:
    """An HTTP server on a loopback port that records every request it gets (and answers
    403, like a vault would refuse): the attacker's endpoint."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                outer.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        **{k.lower(): v for k, v in self.headers.items()},
                    }
                )
                body = b'{"errors":["permission denied"]}'
                self.send_response(403)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = _any

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    lst = Listener()
    yield lst
    lst.close()


def _rewrite_header(cipher_dir: Path, **changes: object) -> None:
    """Change fields of the header in place, keeping its (now stale) tag: what someone who
    may write the cipher dir, but has no key, can do."""
    path = cipher_dir / fmt.VOLUME_HEADER_NAME
    header, _body, tag = fmt.parse_volume_header(path.read_bytes())
    slot_fields = {
        k: changes.pop(k) for k in ("vault_url", "kek_version", "wrapped_key") if k in changes
    }
    new = dataclasses.replace(header, **changes).with_slot(0, **slot_fields)  # type: ignore[arg-type]
    path.write_bytes(new.body() + tag)


def _no_vault_env(transit_key: TransitKey) -> dict[str, str]:
    """The test's env with the token but no vault configured (no VAULT_ADDR)."""
    return {k: v for k, v in transit_key.env.items() if k not in ("VAULT_ADDR", "BAO_ADDR")}


def _substitute_header(bao: OpenBao, key: str, cipher_dir: Path) -> None:
    """The attack of §3: a principal whose only right is ``datakey`` on the volume's KEK
    makes a fresh data key and writes a header around it, with a valid tag."""
    bao.write_policy(
        f"datakey-only-{key}",
        f'path "{bao.mount}/datakey/plaintext/{key}" {{ capabilities = ["update"] }}',
    )
    attacker = hvac.Client(url=bao.addr, token=bao.make_token([f"datakey-only-{key}"]))
    answer = attacker.secrets.transit.generate_data_key(
        name=key, key_type="plaintext", mount_point=bao.mount
    )
    real = volume.read_header(cipher_dir).header
    forged = real.with_slot(0, wrapped_key=answer["data"]["ciphertext"])
    new_key = bytearray(base64.b64decode(answer["data"]["plaintext"]))
    keys = VolumeKeys(new_key, volume_id=forged.volume_id, block_size=forged.block_size)
    try:
        raw = volume.build_header_bytes(forged, keys)
    finally:
        keys.close()
    (cipher_dir / fmt.VOLUME_HEADER_NAME).write_bytes(raw)


def _token_file(bao: OpenBao, key: str, path: Path) -> tuple[Path, str]:
    policy = bao.write_host_policy(key)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(bao.make_token([policy]) + "\n")
    return path, policy


def _status(vol: Volume) -> dict[str, object]:
    proc = encfs("status", vol.mountpoint, "--json")
    assert proc.returncode == 0, proc.stderr
    out: dict[str, object] = json.loads(proc.stdout)
    return out


def _wait_state(vol: Volume, state: str, bound: float = BOUND + 3) -> float:
    t0 = time.monotonic()
    assert wait_until(lambda: _status(vol)["state"] == state, timeout=bound, interval=0.1), (
        f"not {state} after {bound} s: {_status(vol)}"
    )
    return time.monotonic() - t0


def _narrow(bao: OpenBao, policy: str, key: str) -> None:
    bao.write_policy(
        policy,
        f"""
path "{bao.mount}/keys/{key}" {{ capabilities = ["read"] }}
path "auth/token/renew-self" {{ capabilities = ["update"] }}
path "auth/token/lookup-self" {{ capabilities = ["read"] }}
""",
    )


# --- §2: the header's vault URL is never sent a credential ---------------------------------


def test_header_url_alone_is_never_sent_the_token(
    make_volume: MakeVolume,
    transit_key: TransitKey,
    listener: Listener,
) -> None:
    vol: Volume = make_volume(mount=False)
    _rewrite_header(
        vol.cipher_dir,
        vault_url=f"transit+http://127.0.0.1:{listener.port}/transit/{transit_key.name}",
    )
    env = _no_vault_env(transit_key)
    commands: list[list[str | Path]] = [
        ["mount", vol.cipher_dir, vol.mountpoint],
        ["fsck", vol.cipher_dir],
        ["rotate", vol.cipher_dir],
    ]
    # The host pinned the header's URL at init: the edit is refused as damage, before any
    # vault (the header's or the pinned one) is asked anything.
    for command in commands:
        proc = encfs(*command, env=transit_key.env)
        assert proc.returncode == ExitCode.BAD_VOLUME, (command, proc.stderr)
        assert "is damaged" in proc.stderr and "not the one this host pinned" in proc.stderr
    assert listener.requests == []
    # Without a pin (a host that never mounted it), only a vault configured on the host
    # counts, and the tag exposes the edit.
    encfs("pin", "reset", vol.cipher_dir, check=True)
    for command in commands:
        proc = encfs(*command, env=env)
        assert proc.returncode == ExitCode.VAULT_NOT_PINNED, (command, proc.stderr)
        assert f"127.0.0.1:{listener.port}" in proc.stderr  # names the header's URL
        assert "--vault" in proc.stderr and "VAULT_ADDR" in proc.stderr  # says how to pin
        assert transit_key.token not in proc.stderr
    assert not is_mounted(vol.mountpoint)
    assert listener.requests == [], "a request (with the host's token) reached the header's URL"

    # Pinned, the real vault is asked even though the header names the listener: it
    # unwraps the real key, and the header tag (which covers the URL) exposes the edit.
    for pin in (["--vault", vol.vault_url], []):  # --vault, then VAULT_ADDR
        run_env = env if pin else transit_key.env
        proc = encfs("mount", vol.cipher_dir, vol.mountpoint, *pin, env=run_env)
        assert proc.returncode == ExitCode.HEADER_AUTH, proc.stderr
        assert "is ignored" in proc.stderr  # the pinned URL wins, and says so
        proc = encfs("fsck", vol.cipher_dir, *pin, env=run_env)
        assert proc.returncode == ExitCode.HEADER_AUTH, proc.stderr
    assert listener.requests == []


def test_pinned_vault_url_wins_over_the_header_and_says_so(
    openbao: OpenBao,
    transit_key: TransitKey,
    tmp_path: Path,
) -> None:
    """A volume made while the vault was known by another name (the vault moved): the
    pinned URL is used, the header's is not, and the log line says which won."""
    old_url = f"transit+http://localhost:{openbao.port}/transit/{transit_key.name}"
    vol = Volume(
        tmp_path / "c",
        tmp_path / "p",
        old_url,
        _no_vault_env(transit_key),
        log_file=tmp_path / "log",
    )
    vol.mountpoint.mkdir()
    vol.init()
    proc = encfs("mount", vol.cipher_dir, vol.mountpoint, "--vault", transit_key.url, env=vol.env)
    try:
        assert proc.returncode == 0, proc.stderr
        assert f"using the vault pinned by --vault, {transit_key.url}" in proc.stderr
        assert f"{old_url!r}, which is ignored" in proc.stderr
        assert _status(vol)["vault"] == transit_key.url
    finally:
        force_unmount(vol.mountpoint)


# --- §3: key substitution and a hidden header ---------------------------------------------


def test_substituted_header_is_refused_by_the_host_pin(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
) -> None:
    vol: Volume = make_volume()
    (vol.mountpoint / "real").write_text("the real volume")
    vol.unmount()
    _substitute_header(openbao, transit_key.name, vol.cipher_dir)
    proc = encfs("mount", vol.cipher_dir, vol.mountpoint, "--vault", vol.vault_url, env=vol.env)
    assert proc.returncode == ExitCode.VOLUME_MISMATCH, proc.stderr
    assert "another volume than the one this host pinned" in proc.stderr
    assert "--repin" in proc.stderr and "encfs pin reset" in proc.stderr
    assert not is_mounted(vol.mountpoint)
    for command in ("fsck", "rotate"):
        proc = encfs(command, vol.cipher_dir, env=vol.env)
        assert proc.returncode == ExitCode.VOLUME_MISMATCH, (command, proc.stderr)
    # Re-pinning is a deliberate act, and then it mounts.
    proc = encfs(
        "mount", vol.cipher_dir, vol.mountpoint, "--vault", vol.vault_url, "--repin", env=vol.env
    )
    assert proc.returncode == 0, proc.stderr
    vol.unmount()
    pin = json.loads(encfs("pin", "show", vol.cipher_dir, "--json", check=True).stdout)
    assert pin["by"] == "mount"


def test_substituted_header_while_mounted_suspends(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
    tmp_path: Path,
) -> None:
    vol: Volume = make_volume(mount=False)
    token, _ = _token_file(openbao, transit_key.name, tmp_path / "t")
    vol.mount("--token-file", str(token), "--check-interval", str(INTERVAL))
    (vol.mountpoint / "f").write_text("x")
    real = (vol.cipher_dir / fmt.VOLUME_HEADER_NAME).read_bytes()
    _substitute_header(openbao, transit_key.name, vol.cipher_dir)
    took = _wait_state(vol, "suspended")
    assert took <= BOUND + 0.5, took
    assert "another volume key" in str(_status(vol)["reason"])
    with pytest.raises(PermissionError):
        (vol.mountpoint / "f").read_text()
    (vol.cipher_dir / fmt.VOLUME_HEADER_NAME).write_bytes(real)
    _wait_state(vol, "active")
    assert (vol.mountpoint / "f").read_text() == "x"


@pytest.mark.parametrize("revoke", ["policy-narrowed", "token-revoked"])
def test_hidden_header_skips_no_check(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
    tmp_path: Path,
    revoke: str,
) -> None:
    vol: Volume = make_volume(mount=False)
    token, policy = _token_file(openbao, transit_key.name, tmp_path / "t")
    vol.mount("--token-file", str(token), "--check-interval", str(INTERVAL))
    (vol.mountpoint / "f").write_text("x")
    hidden = tmp_path / "moved-away.volume"
    shutil.move(vol.cipher_dir / fmt.VOLUME_HEADER_NAME, hidden)
    time.sleep(2 * INTERVAL)  # checks pass with the header gone: the held wrapped key
    assert _status(vol)["state"] == "active"
    if revoke == "policy-narrowed":
        _narrow(openbao, policy, transit_key.name)
    else:
        openbao.revoke_token(token.read_text().strip())
    took = _wait_state(vol, "suspended")
    assert took <= BOUND + 0.5, took
    with pytest.raises(PermissionError):
        (vol.mountpoint / "f").read_text()
    if revoke == "policy-narrowed":
        openbao.write_host_policy(transit_key.name)
    else:
        _token_file(openbao, transit_key.name, token)
    _wait_state(vol, "active")  # resumes with the held header, still hidden
    assert (vol.mountpoint / "f").read_text() == "x"


# --- §4: allow_other implies default_permissions --------------------------------------------


@pytest.fixture
def shared_mountpoint() -> Iterator[Path]:
    """A mount point nobody can reach (pytest's tmp dirs are 0700)."""
    base = Path(tempfile.mkdtemp(prefix="encfs-shared-"))
    os.chmod(base, 0o755)
    (base / "mnt").mkdir(mode=0o755)
    yield base / "mnt"
    force_unmount(base / "mnt")
    shutil.rmtree(base, ignore_errors=True)


def test_allow_other_alone_still_enforces_permissions(
    transit_key: TransitKey,
    tmp_path: Path,
    shared_mountpoint: Path,
) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    vol = Volume(
        tmp_path / "c", shared_mountpoint, transit_key.url, transit_key.env, options=["allow_other"]
    )
    vol.init()
    proc = encfs(
        "mount",
        vol.cipher_dir,
        vol.mountpoint,
        "--vault",
        vol.vault_url,
        "-o",
        "allow_other",
        env=vol.env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "allow_other implies default_permissions" in proc.stderr
    mp = vol.mountpoint
    os.chmod(mp, 0o755)
    secret = mp / "secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"root's secret\n")
    os.close(fd)
    options = next(
        line.split()[3]
        for line in Path("/proc/mounts").read_text().splitlines()
        if line.split()[1] == str(mp)
    )
    assert "default_permissions" in options.split(","), options
    for cmd in (
        ["cat", str(secret)],
        ["sh", "-c", f"echo nobody >> {secret}"],
        ["chown", "nobody", str(secret)],
        ["chmod", "666", str(secret)],
    ):
        run = subprocess.run(
            [*NOBODY, *cmd], capture_output=True, text=True, timeout=30, env=PLAIN_ENV
        )
        assert run.returncode != 0, (cmd, run.stdout)
        assert "Permission denied" in run.stderr or "not permitted" in run.stderr, run.stderr
    assert secret.read_bytes() == b"root's secret\n"
    st = secret.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    run = subprocess.run(
        [*NOBODY, "/usr/bin/python3", "-c", f"open({str(secret)!r}).read()"],
        capture_output=True,
        text=True,
        timeout=30,
        env=PLAIN_ENV,
    )
    assert "PermissionError" in run.stderr and "Errno 13" in run.stderr, run.stderr  # EACCES


# --- §6: tokens on the command line, relative paths ----------------------------------------


FAKE_TOKEN = "hvs.CAESIJq3c2VjcmV0LXRva2VuLXRoYXQtbXVzdC1ub3QtbGVhaw"


@pytest.mark.parametrize("spelling", ["--token", "--tok", "--token-f"])
def test_abbreviations_are_refused_without_echoing_the_token(tmp_path: Path, spelling: str) -> None:
    proc = encfs("mount", tmp_path / "c", tmp_path / "m", spelling, FAKE_TOKEN)
    assert proc.returncode == ExitCode.USAGE, proc.stderr
    assert FAKE_TOKEN not in proc.stderr + proc.stdout
    assert "<redacted>" in proc.stderr
    for sub in ("fsck", "rotate"):
        proc = encfs(sub, tmp_path / "c", spelling, FAKE_TOKEN)
        assert proc.returncode == ExitCode.USAGE and FAKE_TOKEN not in proc.stderr


def test_token_given_as_token_file_is_not_echoed(
    make_volume: MakeVolume, transit_key: TransitKey
) -> None:
    vol: Volume = make_volume(mount=False)
    for token in (FAKE_TOKEN, "s.AbCdEfGhIjKlMnOp", "7f1c0b9e3a4d5f60718293a4b5c6d7e8f9"):
        proc = encfs(
            "mount",
            vol.cipher_dir,
            vol.mountpoint,
            "--vault",
            vol.vault_url,
            "--token-file",
            token,
            env=vol.env,
        )
        assert proc.returncode == ExitCode.VAULT_CREDENTIALS, proc.stderr
        assert token not in proc.stderr
        assert "token file not found (path not shown: it looks like a token)" in proc.stderr
    proc = encfs(
        "mount",
        vol.cipher_dir,
        vol.mountpoint,
        "--vault",
        vol.vault_url,
        "--token-file",
        "no-such.token",
        env=vol.env,
    )
    assert proc.returncode == ExitCode.VAULT_CREDENTIALS
    assert "no-such.token" in proc.stderr  # an ordinary path is still named


def test_relative_token_file_survives_suspension(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
    tmp_path: Path,
) -> None:
    vol: Volume = make_volume(mount=False)
    token, _ = _token_file(openbao, transit_key.name, tmp_path / "rel.token")
    env = {k: v for k, v in vol.env.items() if k not in ("VAULT_TOKEN", "BAO_TOKEN")}
    proc = subprocess.run(
        [
            *_encfs_cmd(),
            "mount",
            str(vol.cipher_dir),
            str(vol.mountpoint),
            "--vault",
            vol.vault_url,
            "--token-file",
            "rel.token",
            "--check-interval",
            str(INTERVAL),
            "--audit-log",
            "none",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    try:
        (vol.mountpoint / "f").write_text("x")
        openbao.revoke_token(token.read_text().strip())
        _wait_state(vol, "suspended")
        _token_file(openbao, transit_key.name, token)  # access back: a fresh token
        _wait_state(vol, "active")
        assert (vol.mountpoint / "f").read_text() == "x"
    finally:
        force_unmount(vol.mountpoint)


def _encfs_cmd() -> list[str]:
    import sys

    return [sys.executable, "-m", "encfs"]


# --- the cipher dir belongs to root, 0700 ----------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="the rule applies when encfs runs as root")
def test_mount_refuses_a_cipher_dir_others_may_enter(make_volume: MakeVolume) -> None:
    vol: Volume = make_volume(mount=False)
    os.chmod(vol.cipher_dir, 0o755)
    proc = encfs("mount", vol.cipher_dir, vol.mountpoint, "--vault", vol.vault_url, env=vol.env)
    assert proc.returncode == ExitCode.UNSAFE_CIPHER_DIR, proc.stderr
    assert f"chmod 700 {vol.cipher_dir}; chown root {vol.cipher_dir}" in proc.stderr
    assert not is_mounted(vol.mountpoint)
    os.chmod(vol.cipher_dir, 0o700)
    os.chown(vol.cipher_dir, 65534, 65534)
    proc = encfs("mount", vol.cipher_dir, vol.mountpoint, "--vault", vol.vault_url, env=vol.env)
    assert proc.returncode == ExitCode.UNSAFE_CIPHER_DIR, proc.stderr
    assert "not root" in proc.stderr
    os.chown(vol.cipher_dir, 0, 0)
    vol.mount()
    vol.unmount()


@pytest.mark.skipif(os.geteuid() != 0, reason="the rule applies when encfs runs as root")
def test_init_makes_the_cipher_dir_private(transit_key: TransitKey, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    encfs("init", fresh, "--vault", transit_key.url, env=transit_key.env, check=True)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    proc = encfs("init", existing, "--vault", transit_key.url, env=transit_key.env)
    assert proc.returncode == 0, proc.stderr
    assert "narrowed" in proc.stderr and stat.S_IMODE(existing.stat().st_mode) == 0o700
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)
    proc = encfs("init", foreign, "--vault", transit_key.url, env=transit_key.env)
    assert proc.returncode == ExitCode.UNSAFE_CIPHER_DIR, proc.stderr
    assert not any(foreign.iterdir())
    with contextlib.suppress(OSError):
        os.chown(foreign, 0, 0)


# --- double encryption: either slot substituted ----------------------------------------------


def _substitute_slot(bao: OpenBao, key: str, cipher_dir: Path, slot: int) -> None:
    """§3 against a double volume: whoever may ask KEK ``slot + 1`` for a data key swaps that
    slot's volume key for a fresh one and re-tags the header (here with the other volume
    key unwrapped by root, the strongest form: only the pin can tell)."""
    real = volume.read_header(cipher_dir).header
    fresh = bao.admin.secrets.transit.generate_data_key(
        name=key, key_type="plaintext", mount_point=bao.mount
    )["data"]
    volume_keys = []
    for index, entry in enumerate(real.slots):
        if index == slot:
            volume_keys.append(bytearray(base64.b64decode(fresh["plaintext"])))
            continue
        other = entry.vault_url.rsplit("/", 1)[1]
        plain = bao.admin.secrets.transit.decrypt_data(
            name=other, ciphertext=entry.wrapped_key, mount_point=bao.mount
        )["data"]["plaintext"]
        volume_keys.append(bytearray(base64.b64decode(plain)))
    forged = real.with_slot(slot, wrapped_key=fresh["ciphertext"])
    keys = volume.keys_from(forged, volume_keys)
    try:
        raw = volume.build_header_bytes(forged, keys)
    finally:
        keys.close()
    (cipher_dir / fmt.VOLUME_HEADER_NAME).write_bytes(raw)


@pytest.mark.parametrize("slot", [0, 1], ids=["kek-1", "kek-2"])
def test_double_volume_with_either_slot_substituted_is_refused(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
    second_key: SecondKey,
    slot: int,
) -> None:
    """The host pins the check value of both volume keys: a header whose either wrapped key
    was swapped (with a valid tag) is another volume, exit 8 naming the KEK."""
    vol: Volume = make_volume(double=True)
    (vol.mountpoint / "real").write_text("the real volume")
    vol.unmount()
    _substitute_slot(openbao, (transit_key.name, second_key.name)[slot], vol.cipher_dir, slot)
    args = ["--vault", vol.vault_url, *vol.vault2_args()]
    proc = encfs("mount", vol.cipher_dir, vol.mountpoint, *args, env=vol.env)
    assert proc.returncode == ExitCode.VOLUME_MISMATCH, proc.stderr
    assert f"volume key of KEK {slot + 1}" in proc.stderr
    assert not is_mounted(vol.mountpoint)
    proc = encfs("fsck", vol.cipher_dir, *args, env=vol.env)
    assert proc.returncode == ExitCode.VOLUME_MISMATCH, proc.stderr


def test_double_volume_on_a_host_pinned_otherwise_exits_8(
    make_volume: MakeVolume, transit_key: TransitKey
) -> None:
    """A cipher dir pinned with one volume now holds a double-encrypted one (restored,
    re-created): refused until re-pinned on purpose."""
    single: Volume = make_volume(mount=False, name="first")
    double: Volume = make_volume(double=True, mount=False, name="second")
    pin_dir = Path(os.environ["ENCFS_PIN_DIR"])
    before = {p.name for p in pin_dir.iterdir()}
    shutil.rmtree(single.cipher_dir)
    shutil.copytree(double.cipher_dir, single.cipher_dir, symlinks=True)
    assert {p.name for p in pin_dir.iterdir()} == before  # nothing re-pinned the copy
    args = ["--vault", double.vault_url, *double.vault2_args()]
    proc = encfs("mount", single.cipher_dir, single.mountpoint, *args, env=single.env)
    assert proc.returncode == ExitCode.VOLUME_MISMATCH, proc.stderr
    assert "volume id" in proc.stderr
    proc = encfs("mount", single.cipher_dir, single.mountpoint, *args, "--repin", env=single.env)
    assert proc.returncode == 0, proc.stderr
    force_unmount(single.mountpoint)
    pin = json.loads(encfs("pin", "show", single.cipher_dir, "--json", check=True).stdout)
    assert pin["vault_url2"] == double.vault2_url and len(pin["key_check2"]) == 32
