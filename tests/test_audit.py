"""The audit trail: one JSON object per line in a private file, and the journal's native
protocol when running under systemd (a real datagram socket stands in for journald)."""

from __future__ import annotations

import json
import socket
import stat
import threading
from pathlib import Path

import pytest

from encfs import audit
from encfs.audit import AuditLog, AuditSettings


def test_events_are_private_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.log"
    log = AuditLog(AuditSettings(path=path), volume_id="ab" * 16, vault="transit+http://x/t/k")
    log.bind(identity="accessor-1")
    log.event("mount", read_only=False)
    log.error("unwrap", RuntimeError("vault said no"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert first["event"] == "mount" and first["result"] == "ok"
    assert first["identity"] == "accessor-1" and first["volume_id"] == "ab" * 16
    assert first["read_only"] is False and first["time"].endswith("Z") and first["pid"] > 0
    assert second["result"] == "error" and second["error"] == "RuntimeError"
    assert second["message"] == "vault said no"


def test_concurrent_writers_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(AuditSettings(path=path))

    def burst(n: int) -> None:
        for i in range(200):
            log.event("token_renew", worker=n, i=i, pad="x" * 500)

    threads = [threading.Thread(target=burst, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 800
    assert all(json.loads(line)["event"] == "token_renew" for line in lines)


def test_unwritable_log_warns_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    log = AuditLog(AuditSettings(path=blocker / "audit.log"))  # parent is a file
    log.event("mount")
    log.event("unmount")
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "cannot write audit log" in caplog.records[0].getMessage()


def test_journal_native_protocol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock_path = tmp_path / "journal.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journald:
        journald.bind(str(sock_path))
        journald.settimeout(5)
        monkeypatch.setattr(audit, "JOURNAL_SOCKET", str(sock_path))
        AuditLog(AuditSettings(journal=True), volume_id="v").error("rotate", ValueError("x"))
        datagram = journald.recv(65536).decode()
    fields = dict(line.split("=", 1) for line in datagram.strip().split("\n"))
    assert fields["SYSLOG_IDENTIFIER"] == "encfs-audit"
    assert fields["ENCFS_EVENT"] == "rotate" and fields["ENCFS_RESULT"] == "error"
    assert fields["PRIORITY"] == "4"
    assert json.loads(fields["MESSAGE"])["volume_id"] == "v"


def test_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert not audit.under_systemd()
    monkeypatch.setenv("INVOCATION_ID", "0123")
    assert audit.under_systemd()
