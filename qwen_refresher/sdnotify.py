"""systemd's notify protocol (``Type=notify``, ``WatchdogSec=``) without libsystemd.

The protocol is one unix datagram of ``KEY=value`` lines sent to the socket named by
``$NOTIFY_SOCKET``; a name starting with ``@`` is in the abstract namespace (a leading NUL byte
on the wire). Outside systemd the variable is unset and every call is a cheap no-op returning
False, so the daemon can call these unconditionally. A failure to notify is never fatal: the
worst case is systemd restarting us, which is what it is for. Stdlib only.
"""

from __future__ import annotations

import os
import socket

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"


def _address(name: str) -> str | bytes | None:
    """The socket address for a ``$NOTIFY_SOCKET`` value; None if we cannot speak to it."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    return None  # e.g. "vsock:..." (systemd in a VM): not supported


def notify(*lines: str) -> bool:
    """Send ``lines`` (``"READY=1"``, ``"STATUS=..."``) as one datagram; True if it was sent."""
    name = os.environ.get(NOTIFY_SOCKET, "")
    address = _address(name) if name else None
    if address is None or not lines:
        return False
    payload = "\n".join(line.replace("\n", " ") for line in lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(payload, address)
    except OSError:
        return False
    return True


def ready() -> bool:
    """Start-up is over: the first scan is done and refreshes are scheduled."""
    return notify("READY=1")


def set_status(text: str) -> bool:
    """The one-line summary ``systemctl status`` shows."""
    return notify(f"STATUS={text}")


def stopping() -> bool:
    """We are shutting down on purpose; systemd should not count it as a crash."""
    return notify("STOPPING=1")


def watchdog_ping() -> bool:
    """The main loop is alive; systemd restarts us if these stop for ``WatchdogSec``."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None if not asked for.

    ``WATCHDOG_PID``, when set, names the process systemd watches; if that is not us (the
    variable leaked into a child), we must not ping on its behalf.
    """
    watched = os.environ.get(WATCHDOG_PID, "").strip()
    if watched and watched != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get(WATCHDOG_USEC, "").strip())
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000
