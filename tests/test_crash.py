"""A killed daemon never costs more than the write in flight: kill -9 at random moments
during appends, overwrites and metadata churn, then fsck, ``fsck --repair``, remount, and
check every fsynced byte and that every file reads."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from encfs.cli import ExitCode
from tests.harness import MakeVolume, Volume, encfs, force_unmount, is_mounted, wait_until

BS = 4096
FILES = ("log-a", "log-b", "ow")
OW_SIZE = 1 << 20
CAP = 2 << 20

# The writer runs in its own process (it is killed with the daemon). Before each write it
# journals its intent (file, offset, length, seed) and after each fsync a sync mark, each
# line flushed to a journal outside the mount: every byte it ever wrote is derivable from
# (seed, position), so the checker knows what each file may hold.
WRITER = r"""
import os, random, sys
mount, journal, seed, ow_size, cap, repo = sys.argv[1:7]
sys.path.insert(0, repo)
from tests.test_crash import _data
ow_size, cap = int(ow_size), int(cap)
rng = random.Random(int(seed))
j = open(journal, "a", buffering=1)
fds = {name: os.open(os.path.join(mount, name), os.O_RDWR) for name in ("log-a", "log-b", "ow")}
sizes = {name: os.fstat(fd).st_size for name, fd in fds.items()}
while True:
    op = rng.random()
    if op < 0.55:
        name = rng.choice(("log-a", "log-b"))
        length = rng.choice((1, 7, 100, 1000, 4096, 5000, 70000, 1 << 18, 1 << 20))
        off = sizes[name]
        if off > cap:  # keep the files small enough to check byte by byte
            off = rng.randrange(0, off - length)
    elif op < 0.85:
        name = "ow"
        off = rng.randrange(0, ow_size - 1)
        length = min(rng.choice((1, 50, 3000, 4096, 9000, 300000)), ow_size - off)
    else:
        p = os.path.join(mount, "churn", "f" + str(rng.randrange(20)))
        if rng.random() < 0.5:
            with open(p, "wb") as f:
                f.write(b"c" * rng.randrange(10000))
        else:
            try:
                os.rename(p, p + "x")
                os.unlink(p + "x")
            except FileNotFoundError:
                pass
        continue
    s = rng.getrandbits(31)
    j.write(f"W {name} {off} {length} {s}\n")
    os.pwrite(fds[name], _data(s, off, length), off)
    sizes[name] = max(sizes[name], off + length)
    if rng.random() < 0.3:
        os.fsync(fds[name])
        j.write(f"S {name}\n")
"""


def _data(seed: int, off: int, length: int) -> bytes:
    r = random.Random(seed)
    base = bytes(r.getrandbits(8) for _ in range(251))
    k = off % 251
    return (base * (length // 251 + 2))[k : k + length]


class _Model:
    """What each file may hold after the crash: per byte, the value as of the file's last
    fsync, plus every value a later (unsynced) write may have left."""

    def __init__(self, initial: dict[str, bytes]) -> None:
        self.synced = {name: bytearray(data) for name, data in initial.items()}
        self.pending: dict[str, list[tuple[int, int, int]]] = {n: [] for n in initial}

    def replay(self, journal: Path) -> None:
        current = {name: bytearray(data) for name, data in self.synced.items()}
        for line in journal.read_text().splitlines():
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "W" and len(parts) == 5:
                name, off, length, seed = parts[1], int(parts[2]), int(parts[3]), int(parts[4])
                buf = current[name]
                if len(buf) < off + length:
                    buf.extend(bytes(off + length - len(buf)))
                buf[off : off + length] = _data(seed, off, length)
                self.pending[name].append((off, length, seed))
            elif parts[0] == "S" and len(parts) == 2:
                self.synced[parts[1]] = bytearray(current[parts[1]])
                self.pending[parts[1]] = []

    def unsynced(self, name: str, pos: int) -> bool:
        """Whether the byte at ``pos`` was never fsynced with its current value: beyond
        the synced size, or overwritten by a write since the last fsync."""
        return pos >= len(self.synced[name]) or any(
            o <= pos < o + n for o, n, _ in self.pending[name]
        )

    def violations(self, name: str, got: bytes) -> list[int]:
        """Offsets in ``got`` that hold a value no write (synced or pending) can explain."""
        synced = self.synced[name]
        pending = self.pending[name]
        max_len = max([len(synced)] + [o + n for o, n, _ in pending])
        bad = list(range(len(got), len(synced)))  # fsynced bytes missing at the end
        if len(got) > max_len:
            bad.append(max_len)
        candidates = [(o, o + n, _data(s, o, n)) for o, n, s in pending]
        for pos in range(len(got)):
            value = got[pos]
            if pos < len(synced) and synced[pos] == value:
                continue
            if any(lo <= pos < hi and data[pos - lo] == value for lo, hi, data in candidates):
                continue
            bad.append(pos)
        return bad


def _kill_round(vol: Volume, journal: Path, seed: int, rng: random.Random) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WRITER,
            str(vol.mountpoint),
            str(journal),
            str(seed),
            str(OW_SIZE),
            str(CAP),
            str(Path(__file__).resolve().parent.parent),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started = wait_until(lambda: journal.exists() and journal.stat().st_size > 0, timeout=30)
    assert started, "the writer never wrote"
    time.sleep(rng.uniform(0.0, 0.8))
    pid = vol.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait(timeout=30)
    assert wait_until(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10)
    force_unmount(vol.mountpoint)
    assert not is_mounted(vol.mountpoint)


def _read_files(vol: Volume) -> dict[str, bytes]:
    return {name: (vol.mountpoint / name).read_bytes() for name in FILES}


@pytest.mark.slow
def test_kill_9_loses_at_most_the_write_in_flight(make_volume: MakeVolume, tmp_path: Path) -> None:
    """50 rounds of kill -9 of the daemon under a random writer. After each: fsck either
    finds nothing, or only blocks that a torn write left (a fatal signal cuts a large
    write short at a page boundary); ``fsck --repair`` then restores a block torn in the
    middle of its rewrite from its undo record, cuts a torn tail or zeroes a torn block,
    naming each range given up. Afterwards every file reads without error, every byte is
    what was fsynced or written after, except in the ranges given up, and those hold only
    bytes that were never fsynced (at most one block per file)."""
    vol: Volume = make_volume()
    m = vol.mountpoint
    (m / "churn").mkdir()
    for name in ("log-a", "log-b"):
        (m / name).write_bytes(b"")
    (m / "ow").write_bytes(_data(1, 0, OW_SIZE))
    with open(m / "ow", "rb+") as f:
        os.fsync(f.fileno())
    model = _Model({"log-a": b"", "log-b": b"", "ow": _data(1, 0, OW_SIZE)})
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    torn_rounds = 0
    restored_blocks = 0
    for round_no in range(50):
        journal = tmp_path / f"journal-{round_no}"
        _kill_round(vol, journal, rng.getrandbits(31), rng)
        model.replay(journal)
        proc = encfs("fsck", vol.cipher_dir, "--json", env=vol.env)
        repaired: dict[str, list[tuple[int, int]]] = {}
        if proc.returncode != ExitCode.OK:
            assert proc.returncode == ExitCode.CORRUPT, proc.stderr
            torn_rounds += 1
            fix = encfs("fsck", vol.cipher_dir, "--repair", "--json", env=vol.env)
            assert fix.returncode == ExitCode.OK, fix.stdout + fix.stderr
            for line in fix.stdout.splitlines():
                item = json.loads(line)
                if item.get("kind") == "summary":
                    continue
                assert item["kind"] == "block" and item["repaired"], item
                name = os.path.basename(item["plain_path"])
                lost = item["lost"]
                if lost is None:  # restored from its undo record
                    restored_blocks += 1
                    continue
                repaired.setdefault(name, []).append((lost[0], lost[1]))
            again = encfs("fsck", vol.cipher_dir, env=vol.env)
            assert again.returncode == ExitCode.OK, again.stdout
        vol.mount()
        got = _read_files(vol)  # every file reads: no EIO anywhere
        for name, data in got.items():
            ranges = repaired.get(name, [])
            assert sum(hi - lo for lo, hi in ranges) <= BS, (round_no, name, ranges)
            for lo, hi in ranges:  # a repair gives up only what was never fsynced
                synced_lost = [p for p in range(lo, hi) if not model.unsynced(name, p)]
                assert not synced_lost, (round_no, name, (lo, hi), synced_lost[:5])
            bad = [
                pos
                for pos in model.violations(name, data)
                if not any(lo <= pos < hi for lo, hi in ranges)
            ]
            assert not bad, (round_no, name, bad[:5], ranges)
            # What is on disk now is what the next round starts from (repairs included).
            model.synced[name] = bytearray(data)
            model.pending[name] = []
        for path in (m / "churn").iterdir():
            path.read_bytes()
        for name in FILES:
            with open(m / name, "rb+") as f:
                os.fsync(f.fileno())
    print(f"rounds that needed a repair: {torn_rounds} of 50, blocks restored: {restored_blocks}")
    digest = hashlib.sha256(b"".join(_read_files(vol).values())).hexdigest()
    assert digest
