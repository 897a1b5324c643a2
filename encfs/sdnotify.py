"""systemd's service notification protocol (sd_notify), spoken without libsystemd.

A datagram of ``KEY=VALUE`` lines to the AF_UNIX socket in ``$NOTIFY_SOCKET`` (a leading
``@`` means the abstract namespace). ``READY=1`` once the service works, ``STATUS=`` a line
for ``systemctl status``, ``WATCHDOG=1`` to feed ``WatchdogSec=``, ``STOPPING=1`` when it
begins to stop. Without ``$NOTIFY_SOCKET`` (not under systemd) every call does nothing.
Best effort: a failed send is never an error for the service.
"""

from __future__ import annotations

import contextlib
import os
import socket


def notify(**fields: str | int) -> bool:
    """Send ``fields`` (``READY=1``, ``STATUS="..."``) to systemd; True if it was sent.

    Keyword names are upper-cased: ``notify(ready=1, status="mounted")``. Newlines in values
    are replaced by spaces (the protocol is line-based).
    """
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr or not fields:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    payload = "".join(
        f"{key.upper()}={str(value).replace(chr(10), ' ')}\n" for key, value in fields.items()
    )
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(payload.encode())
        return True
    return False


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings systemd expects (half of ``WatchdogSec=``), or
    None when no watchdog is set for this process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) <= 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
