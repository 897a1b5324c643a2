"""Audit trail of key use: one JSON object per line, to a file and to the systemd journal.

Events (``event`` field): ``init``, ``mount``, ``unwrap``, ``rotate``, ``unmount``,
``token_renew``, ``vault_error``. Every event has ``time`` (UTC, RFC 3339 with
milliseconds), ``event``, ``result`` (``ok`` or ``error``), ``host`` (host name), ``pid``,
and where known ``volume_id``, ``cipher_dir``, ``vault`` (URL), ``key_name``,
``kek_version``, ``identity`` (the transit token's ``accessor`` or the KMIP client
certificate's subject — never a secret), ``error`` (exception class) and ``message``.
A double-encrypted volume's events also carry ``vault2``, ``kek_version2`` and
``identity2``; an event about one of its KEKs says which (``kek``: 1 or 2) with that KEK's
``vault``.
The token accessor is what the vault's own audit device logs as ``auth.accessor``: join
the two on it (README, "Audit").

Writing never blocks the caller's job: a failure to append is logged once as a warning.
The file is opened for each event with ``O_APPEND`` (one ``write`` per line, so concurrent
writers never interleave) and created mode 0600 in a 0700 directory.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_AUDIT_LOG = Path("/var/log/encfs/audit.log")
JOURNAL_SOCKET = "/run/systemd/journal/socket"


@dataclass(frozen=True)
class AuditSettings:
    """Where audit events go; declared once by the CLI."""

    path: Path | None = None
    """JSON-lines file, or None for no file."""
    journal: bool = False
    """Also send each event to the systemd journal (``SYSLOG_IDENTIFIER=encfs-audit``)."""


def under_systemd() -> bool:
    """True when systemd started us as a service (then the journal is the place for logs)."""
    return bool(os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM"))


class AuditLog:
    """Appends audit events. Thread-safe; holds no file open between events."""

    def __init__(self, settings: AuditSettings, **context: Any) -> None:
        """``context`` fields (``volume_id``, ``vault``, ...) are added to every event."""
        self._settings = settings
        self._context = dict(context)
        self._lock = threading.Lock()
        self._warned = False
        self._host = socket.gethostname()

    @property
    def context(self) -> dict[str, Any]:
        """A copy of the fields carried by every event."""
        with self._lock:
            return dict(self._context)

    def bind(self, **context: Any) -> None:
        """Add or replace fields carried by every later event."""
        with self._lock:
            self._context.update(context)

    def event(self, event: str, *, result: str = "ok", **fields: Any) -> dict[str, Any]:
        """Record one event; returns it (for tests and the caller's own log line)."""
        now = time.time()
        record: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            + f".{int(now % 1 * 1000):03d}Z",
            "event": event,
            "result": result,
            "host": self._host,
            "pid": os.getpid(),
        }
        with self._lock:
            record.update(self._context)
        record.update({k: v for k, v in fields.items() if v is not None})
        line = json.dumps(record, sort_keys=False, default=str)
        with self._lock:
            if self._settings.path is not None:
                self._append(self._settings.path, line)
            if self._settings.journal:
                self._journal(line, event, result)
        return record

    def error(self, event: str, exc: BaseException, **fields: Any) -> dict[str, Any]:
        """Record a failed ``event`` with the exception's class and message."""
        return self.event(
            event, result="error", error=type(exc).__name__, message=str(exc), **fields
        )

    def _append(self, path: Path, line: str) -> None:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot write audit log %s: %s", path, exc.strerror or exc)

    def _journal(self, line: str, event: str, result: str) -> None:
        fields = (
            f"MESSAGE={line}\nSYSLOG_IDENTIFIER=encfs-audit\n"
            f"PRIORITY={6 if result == 'ok' else 4}\nENCFS_EVENT={event}\n"
            f"ENCFS_RESULT={result}\n"
        )
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(fields.encode(), JOURNAL_SOCKET)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot send audit events to the journal: %s", exc.strerror or exc)
