"""The Prometheus text exposition of mounts' status: ``encfs status --prometheus`` and the
textfile-collector file a daemon refreshes (``mount --metrics-file``).

Pure: it turns the status reports the daemons answer (``daemon.LiveMount.status``) into
the text format 0.0.4 (``# HELP`` / ``# TYPE`` lines, then one sample per line), named the
Prometheus way: an ``encfs_`` prefix, base units in the name (``_seconds``, ``_bytes``),
``_total`` on counters, ``_timestamp_seconds`` on Unix times. Every sample is labelled with
the mount's ``mountpoint`` and ``volume_id``. No secret is in a report, so none is here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["CONTENT_TYPE", "STATES", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATES = ("starting", "active", "offline-grace", "suspended", "stopping")
"""Every state a mount can be in (``watcher.MountState``): ``encfs_state`` has a sample for
each, 1 for the one it is in."""

Report = Mapping[str, Any]


@dataclass(frozen=True)
class _Family:
    name: str
    kind: str  # gauge | counter
    help: str
    value: Callable[[Report], float | int | bool | None]
    """The sample's value in a report; None: no sample for that mount."""


def _get(*path: str) -> Callable[[Report], Any]:
    def value(report: Report) -> Any:
        node: Any = report
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        return node

    return value


_FAMILIES = (
    _Family(
        "encfs_state_since_timestamp_seconds",
        "gauge",
        "When the mount entered its current state (Unix time).",
        _get("since_time"),
    ),
    _Family(
        "encfs_start_time_seconds",
        "gauge",
        "When the daemon serving the mount started (Unix time).",
        _get("started_time"),
    ),
    _Family(
        "encfs_vault_reachable",
        "gauge",
        "1 if the vault answered the last check, 0 if it could not be reached.",
        _get("vault_reachable"),
    ),
    _Family(
        "encfs_last_check_timestamp_seconds",
        "gauge",
        "When the watcher last heard from the vault (Unix time).",
        _get("last_check_time"),
    ),
    _Family(
        "encfs_check_duration_seconds",
        "gauge",
        "How long the watcher's last check of the key with the vault took.",
        _get("last_check_duration"),
    ),
    _Family(
        "encfs_checks_total",
        "counter",
        "Checks of the key with the vault since the mount.",
        _get("checks"),
    ),
    _Family(
        "encfs_check_failures_total",
        "counter",
        "Checks the vault refused or could not answer.",
        _get("check_failures"),
    ),
    _Family(
        "encfs_check_interval_seconds",
        "gauge",
        "The longest time between two checks (--check-interval).",
        _get("check_interval"),
    ),
    _Family(
        "encfs_offline_grace_seconds",
        "gauge",
        "How long an unreachable vault is trusted (--offline-grace).",
        _get("offline_grace"),
    ),
    _Family(
        "encfs_token_ttl_seconds",
        "gauge",
        "Seconds the host's vault token has left, when it expires.",
        _get("token", "ttl"),
    ),
    _Family(
        "encfs_kek_version",
        "gauge",
        "The KEK version the volume key is wrapped with.",
        _get("kek_version"),
    ),
    _Family(
        "encfs_key_memory_locked",
        "gauge",
        "1 if the keys are in locked (mlock) memory.",
        _get("memory", "locked"),
    ),
    _Family(
        "encfs_reads_total",
        "counter",
        "Read requests served.",
        _get("counters", "reads"),
    ),
    _Family(
        "encfs_read_bytes_total",
        "counter",
        "Plaintext bytes read.",
        _get("counters", "bytes_read"),
    ),
    _Family(
        "encfs_writes_total",
        "counter",
        "Write requests served.",
        _get("counters", "writes"),
    ),
    _Family(
        "encfs_written_bytes_total",
        "counter",
        "Plaintext bytes written.",
        _get("counters", "bytes_written"),
    ),
    _Family(
        "encfs_integrity_errors_total",
        "counter",
        "Blocks, names or values that failed authentication (tampering or damage).",
        _get("counters", "integrity_errors"),
    ),
)


def render(reports: Iterable[Report]) -> str:
    """The exposition of ``reports`` (one per mount): each family once, with a sample per
    mount that has a value for it. Ends with a newline; empty for no mounts."""
    reports = list(reports)
    if not reports:
        return ""
    lines: list[str] = [
        "# HELP encfs_state The mount's state: 1 for the state it is in, 0 for the others.",
        "# TYPE encfs_state gauge",
    ]
    for report in reports:
        for state in STATES:
            labels = _labels(report, state=state)
            lines.append(f"encfs_state{labels} {int(report.get('state') == state)}")
    lines += [
        "# HELP encfs_vault_node_info The vault address that answered the last check.",
        "# TYPE encfs_vault_node_info gauge",
    ]
    lines += [
        f"encfs_vault_node_info{_labels(r, node=str(r['vault_node']))} 1"
        for r in reports
        if r.get("vault_node")
    ]
    for family in _FAMILIES:
        samples = [(r, family.value(r)) for r in reports]
        lines.append(f"# HELP {family.name} {family.help}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        lines += [
            f"{family.name}{_labels(r)} {_number(v)}"
            for r, v in samples
            if isinstance(v, int | float)
        ]
    return "\n".join(lines) + "\n"


def _labels(report: Report, **extra: str) -> str:
    pairs = {
        "mountpoint": str(report.get("mountpoint", "")),
        "volume_id": str(report.get("volume_id") or ""),
        **extra,
    }
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs.items()) + "}"


def _escape(value: str) -> str:
    """A label value as the text format writes it: backslash, double quote and newline
    escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float | int | bool) -> str:
    if isinstance(value, bool | int):
        return str(int(value))
    return repr(float(value))
