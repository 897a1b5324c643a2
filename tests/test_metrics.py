"""Prometheus metrics of a mount (``encfs.metrics``): ``encfs status --prometheus`` and the
daemon's ``--metrics-file``, checked against the text format's grammar line by line (a
small strict parser here), and their values against what the mount did."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import pytest

from encfs import metrics
from tests.harness import MakeVolume, Volume, encfs, wait_until

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf"({_NAME})(\{{{_LABEL}(?:,{_LABEL})*\}})? (\S+)")
_HELP = re.compile(rf"# HELP ({_NAME}) (.+)")
_TYPE = re.compile(rf"# TYPE ({_NAME}) (gauge|counter)")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """The samples of an exposition, refusing anything the text format 0.0.4 does not
    allow or our conventions forbid: a sample before its family's TYPE, a family declared
    twice, a counter not named ``_total``, an unparsable value, a duplicate series."""
    assert text == "" or text.endswith("\n")
    samples: Samples = {}
    types: dict[str, str] = {}
    helped: set[str] = set()
    for line in text.splitlines():
        if m := _HELP.fullmatch(line):
            assert m.group(1) not in helped, f"HELP twice: {line}"
            helped.add(m.group(1))
        elif m := _TYPE.fullmatch(line):
            name, kind = m.groups()
            assert name not in types, f"TYPE twice: {line}"
            assert name in helped, f"TYPE before HELP: {line}"
            assert name.startswith("encfs_")
            assert name.endswith("_total") == (kind == "counter"), line
            types[name] = kind
        else:
            m = _SAMPLE.fullmatch(line)
            assert m, f"not a sample line: {line!r}"
            name, labels, value = m.groups()
            assert name in types, f"sample before its TYPE: {line}"
            pairs = tuple(
                (k, _unescape(v))
                for k, v in re.findall(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"', labels or "")
            )
            key = (name, pairs)
            assert key not in samples, f"series twice: {line}"
            samples[key] = float(value)
            assert not math.isnan(samples[key])
    return samples


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)]
    assert len(found) == 1, (name, labels, found)
    return found[0]


REPORT = {
    "mountpoint": '/srv/da"ta\\x\nnew',
    "volume_id": "ab12",
    "state": "offline-grace",
    "since_time": 1_800_000_000.25,
    "started_time": 1_799_999_000.0,
    "vault_reachable": False,
    "vault_node": "https://10.0.0.2:8200",
    "last_check_time": 1_800_000_100.5,
    "last_check_duration": 0.0021,
    "checks": 7,
    "check_failures": 2,
    "check_interval": 5.0,
    "offline_grace": 300.0,
    "token": {"ttl": None},
    "kek_version": 3,
    "memory": {"locked": True},
    "counters": {"reads": 4, "bytes_read": 8192, "writes": 1, "bytes_written": 10,
                 "integrity_errors": 0},
}  # fmt: skip


def test_the_exposition_is_valid_and_says_what_the_report_says() -> None:
    text = metrics.render([REPORT, {**REPORT, "mountpoint": "/b", "state": "active"}])
    samples = parse(text)
    mp = REPORT["mountpoint"]
    assert isinstance(mp, str)
    states = {s: value(samples, "encfs_state", mountpoint=mp, state=s) for s in metrics.STATES}
    assert states == {s: float(s == "offline-grace") for s in metrics.STATES}
    assert value(samples, "encfs_state", mountpoint="/b", state="active") == 1
    assert value(samples, "encfs_vault_reachable", mountpoint=mp) == 0
    assert value(samples, "encfs_last_check_timestamp_seconds", mountpoint=mp) == 1_800_000_100.5
    assert value(samples, "encfs_check_duration_seconds", mountpoint=mp) == 0.0021
    assert value(samples, "encfs_checks_total", mountpoint=mp) == 7
    assert value(samples, "encfs_check_failures_total", mountpoint=mp) == 2
    assert value(samples, "encfs_read_bytes_total", mountpoint=mp, volume_id="ab12") == 8192
    assert value(samples, "encfs_key_memory_locked", mountpoint=mp) == 1
    assert value(samples, "encfs_vault_node_info", mountpoint=mp, node="https://10.0.0.2:8200")
    assert not [k for k in samples if k[0] == "encfs_token_ttl_seconds"]  # no TTL: no sample
    assert metrics.render([]) == ""


def test_status_prometheus_and_the_metrics_file_follow_the_mount(
    make_volume: MakeVolume, tmp_path: Path
) -> None:
    vol: Volume = make_volume(mount=False)
    prom = tmp_path / "textfile" / "encfs-data.prom"
    prom.parent.mkdir()
    vol.mount("--check-interval", "0.5", "--metrics-file", str(prom))
    mp = str(vol.mountpoint)

    def scrape() -> Samples:
        proc = encfs("status", vol.mountpoint, "--prometheus", check=True)
        return parse(proc.stdout)

    assert wait_until(lambda: value(scrape(), "encfs_checks_total", mountpoint=mp) >= 2)
    before = scrape()
    assert value(before, "encfs_state", mountpoint=mp, state="active") == 1
    assert value(before, "encfs_vault_reachable", mountpoint=mp) == 1
    assert abs(value(before, "encfs_last_check_timestamp_seconds", mountpoint=mp) - time.time()) < 5
    assert 0 < value(before, "encfs_check_duration_seconds", mountpoint=mp) < 2

    data = bytes(range(256)) * 64  # 16 KiB
    (vol.mountpoint / "f").write_bytes(data)
    for _ in range(3):
        with open(vol.mountpoint / "f", "rb", buffering=0) as f:
            f.read()
    after = scrape()
    assert value(after, "encfs_written_bytes_total", mountpoint=mp) >= value(
        before, "encfs_written_bytes_total", mountpoint=mp
    ) + len(data)
    assert value(after, "encfs_reads_total", mountpoint=mp) > value(
        before, "encfs_reads_total", mountpoint=mp
    )
    assert value(after, "encfs_checks_total", mountpoint=mp) >= value(
        before, "encfs_checks_total", mountpoint=mp
    )

    # the textfile collector's file: valid, the same mount, refreshed, gone at unmount
    assert wait_until(prom.exists)
    assert oct(prom.stat().st_mode & 0o777) == oct(0o644)
    first = value(parse(prom.read_text()), "encfs_checks_total", mountpoint=mp)
    assert wait_until(
        lambda: value(parse(prom.read_text()), "encfs_checks_total", mountpoint=mp) > first,
        timeout=10,
    )
    assert not [p for p in prom.parent.iterdir() if p.name != prom.name]  # no temp files left
    vol.unmount()
    assert not prom.exists()


@pytest.mark.parametrize("mountpoint", ["/srv/a b", '/srv/q"uote', "/srv/back\\slash"])
def test_label_values_are_escaped(mountpoint: str) -> None:
    samples = parse(metrics.render([{**REPORT, "mountpoint": mountpoint}]))
    assert value(samples, "encfs_checks_total", mountpoint=mountpoint) == 7
