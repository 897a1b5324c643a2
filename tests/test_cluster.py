"""Volumes on a real three-node OpenBao Raft cluster (``tests.openbao.OpenBaoCluster``: made
the way ``encfs vault serve --join`` makes one — TLS with one CA, standby reads off),
each host pinning every node (``--vault`` repeated).

A standby forwards to the leader, so a host may start anywhere; a refusal comes back
through whichever node was asked. With two volumes mounted and under I/O: ``kill -9`` of
the leader costs no operation and no suspension, and a new leader answers the next check;
two nodes of three gone leave no quorum — the offline grace, then the volumes fail closed;
the nodes back, the volumes resume by themselves.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from encfs import errors
from encfs.bao import setup as provision
from encfs.vault import VaultSettings, connect
from tests.harness import Volume, encfs, force_unmount, wait_until
from tests.openbao import OpenBaoCluster

INTERVAL = 1.0
GRACE = 10.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[OpenBaoCluster]:
    with OpenBaoCluster(3) as made:
        yield made


def host_token(cluster: OpenBaoCluster, tmp_path: Path) -> tuple[str, Path]:
    """A fresh key and a least-privilege host token for it (``encfs vault setup``)."""
    key = "k-" + secrets.token_hex(4)
    token_file = tmp_path / f"{key}.token"
    provision.setup(
        cluster.addrs[cluster.leader()],
        cluster.root_token,
        key,
        "host-" + key,
        token_file,
        ca_file=cluster.ca_file,
    )
    return key, token_file


def urls(cluster: OpenBaoCluster, key: str, order: list[int]) -> str:
    return " ".join(cluster.url_for(key, i) for i in order)


def test_a_standby_forwards_and_a_refusal_comes_back_through_it(
    cluster: OpenBaoCluster, tmp_path: Path
) -> None:
    key, token_file = host_token(cluster, tmp_path)
    leader = cluster.leader()
    standby = next(i for i in range(3) if i != leader)
    assert cluster.health(standby) == 429
    settings = VaultSettings(token_file=token_file, ca_file=cluster.ca_file, timeout=5)
    with closing(connect(urls(cluster, key, [standby]), settings)) as vault:  # the standby alone
        vkey, wrapped = vault.new_volume_key()  # a write, forwarded to the leader
        assert vault.unwrap(wrapped) == vkey
        assert vault.serving == cluster.addrs[standby]
    token = token_file.read_text().strip()
    status, _ = cluster.call(leader, "POST", "/v1/auth/token/revoke", {"token": token})
    assert status == 204
    order = [standby, leader, next(i for i in range(3) if i not in (leader, standby))]
    with (
        closing(connect(urls(cluster, key, order), settings)) as vault,
        pytest.raises(errors.VaultPermissionDenied),
    ):
        vault.unwrap(wrapped)  # the standby relays the leader's 403: no node says yes


class Exerciser:
    """Reads and writes through a mount in a thread until stopped; every operation must
    succeed (``failures`` lists any that did not)."""

    def __init__(self, mountpoint: Path) -> None:
        self.dir = mountpoint / "io"
        self.dir.mkdir()
        self.ops = 0
        self.failures: list[str] = []
        self.written: dict[Path, bytes] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            path = self.dir / f"f{n % 20}"
            data = os.urandom(4096 + n % 5000)
            try:
                with open(path, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                if path.read_bytes() != data:
                    self.failures.append(f"{path}: read back other bytes")
                os.stat(path)
                self.written[path] = data
                self.ops += 4
            except OSError as exc:
                self.failures.append(f"{path}: {exc}")
            n += 1
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def status(vol: Volume) -> dict[str, object]:
    doc: dict[str, object] = json.loads(
        encfs("status", vol.mountpoint, "--json", check=True).stdout
    )
    return doc


def events(vol: Volume, name: str) -> list[dict[str, object]]:
    return [e for e in vol.audit_events() if e["event"] == name]


@pytest.mark.slow
def test_two_volumes_ride_out_the_leader_fail_closed_without_quorum_and_come_back(
    cluster: OpenBaoCluster, tmp_path: Path
) -> None:
    key, token_file = host_token(cluster, tmp_path)
    first = cluster.leader()
    order = [first, *(i for i in range(3) if i != first)]  # the leader first: it will die
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["VAULT_CACERT"] = str(cluster.ca_file)
    vols: list[Volume] = []
    for name in ("a", "b"):
        mountpoint = tmp_path / f"{name}-plain"
        mountpoint.mkdir()
        vol = Volume(
            cipher_dir=tmp_path / f"{name}-cipher",
            mountpoint=mountpoint,
            vault_url=cluster.url_for(key, first),
            env=env,
            log_file=tmp_path / f"{name}.log",
            audit_log=tmp_path / f"{name}.audit",
        )
        vols.append(vol)
    try:
        for vol in vols:
            encfs("init", vol.cipher_dir, "--vault", vol.vault_url, "--token-file", token_file,
                  *vol.audit_args(), env=env, check=True)  # fmt: skip
            nodes = [a for i in order[1:] for a in ("--vault", cluster.url_for(key, i))]
            vol.mount(*nodes, "--token-file", str(token_file), "--check-interval",
                      str(INTERVAL), "--offline-grace", str(GRACE))  # fmt: skip
            assert status(vol)["vault_addresses"] == [cluster.addrs[i] for i in order]

        # (a) kill -9 the leader while both volumes are under I/O
        workers = [Exerciser(vol.mountpoint) for vol in vols]
        time.sleep(2)
        killed_at = time.time()
        cluster.kill(first)
        new_leader = cluster.leader()
        assert new_leader != first

        def answered_after_the_kill(vol: Volume) -> bool:
            s = status(vol)
            last = s.get("last_check_time")
            return (
                isinstance(last, float)
                and last > killed_at + 1
                and s["vault_reachable"] is True
                and s["vault_node"] not in ("", cluster.addrs[first])
            )

        for vol in vols:
            assert wait_until(lambda v=vol: answered_after_the_kill(v), timeout=30), status(vol)
        time.sleep(2 * INTERVAL)  # a few more checks and operations on the new leader
        for worker in workers:
            worker.stop()
        for vol, worker in zip(vols, workers, strict=True):
            assert worker.failures == [], worker.failures
            assert worker.ops > 50, worker.ops
            s = status(vol)
            assert s["state"] == "active", s
            assert not events(vol, "suspend"), "the leader's death suspended a volume"

        # (b) two of three gone: no quorum, no leader, no answer — grace, then fail closed
        second = new_leader
        cluster.kill(second)
        lost_at = time.monotonic()
        for vol in vols:
            assert wait_until(lambda v=vol: status(v)["state"] == "offline-grace", timeout=15)
            assert (vol.mountpoint / "io").is_dir()  # still serving within the grace
        for vol in vols:
            assert wait_until(lambda v=vol: status(v)["state"] == "suspended", timeout=GRACE + 15)
        took = time.monotonic() - lost_at
        assert took >= GRACE - INTERVAL, f"suspended after {took:.1f} s, before the grace"
        for vol in vols:
            s = status(vol)
            assert "vault unreachable" in str(s["reason"]), s
            with pytest.raises(PermissionError) as info:
                os.listdir(vol.mountpoint / "io")
            assert info.value.errno == errno.EACCES
            [suspend] = events(vol, "suspend")
            assert suspend["revoked"] is False

        # (c) the two nodes back: a leader again, and the volumes resume by themselves
        cluster.restart(first)
        cluster.restart(second)
        cluster.leader()
        for vol in vols:
            assert wait_until(lambda v=vol: status(v)["state"] == "active", timeout=40), status(vol)
        for worker in workers:
            for path, data in worker.written.items():
                assert path.read_bytes() == data
        for vol in vols:
            assert events(vol, "resume")
            vol.unmount()
    finally:
        for vol in vols:
            force_unmount(vol.mountpoint)
        for i in range(3):
            if not cluster.running(i):
                cluster.restart(i)


def test_serve_joins_a_cluster_only_with_its_key_and_ca(tmp_path: Path) -> None:
    """A joining node refuses to start without what it must be given by hand."""
    from encfs.bao import serve
    from tests.openbao import free_port

    data = tmp_path / "n1"
    data.mkdir(mode=0o700)
    listen = (f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    join = "https://127.0.0.1:8200"
    with pytest.raises(errors.VaultConfigError, match=r"init\.json") as info:
        serve.start_serve(data, listen[0], cluster_listen=listen[1], node_id="n1", join=join)
    assert "copy init.json" in info.value.hint
    (data / "init.json").write_text("{}")
    os.chmod(data / "init.json", 0o600)
    with pytest.raises(errors.VaultConfigError, match="needs the cluster's CA"):
        serve.start_serve(data, listen[0], cluster_listen=listen[1], node_id="n1", join=join)
    with pytest.raises(errors.VaultConfigError, match="not the address of a node"):
        serve.start_serve(data, listen[0], node_id="n1", join="http://127.0.0.1:8200")
    with pytest.raises(errors.VaultConfigError, match="node id"):
        serve.start_serve(data, listen[0], node_id="../n1")
    assert sorted(p.name for p in data.iterdir()) == ["init.json"]  # nothing else written
