"""Signals as flags plus a wake-up socket: nothing runs inside a handler.

The handler is ``dict.__setitem__`` of ``Signals.received``: C code, which the interpreter
calls on the main thread between two bytecodes. It takes no lock, logs nothing and runs no
Python code, so a signal landing anywhere (inside ``Event.wait``, inside a lock, inside
another handler) can neither deadlock the main thread on a lock it holds nor nest handlers
into a RecursionError, however many arrive. The interpreter's own C-level handler writes the
signal number to the wake-up socket, which ends the main loop's ``poll`` at once; the bytes
only wake, what counts is the dict (a storm fills the socket and bytes are dropped,
``warn_on_full_buffer=False``).
"""

from __future__ import annotations

import contextlib
import signal
import socket
from types import FrameType

#: Signals that stop the daemon, and the one that reloads it.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_NOT_RECEIVED = object()


class Signals:
    def __init__(self) -> None:
        #: signals received and not acted on yet, filled by the handlers
        self.received: dict[int, FrameType | None] = {}
        self._wakeup: tuple[socket.socket, socket.socket] | None = None

    def install(self) -> socket.socket:
        """Install the recording handlers; returns the socket to poll."""
        receive, send = socket.socketpair()
        receive.setblocking(False)
        send.setblocking(False)
        signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
        self._wakeup = (receive, send)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self.received.__setitem__)
        return receive

    def uninstall(self) -> None:
        """Stop waking a loop that is gone; the recording handlers stay (a second SIGTERM
        during the last steps of the exit must not kill us with a non-zero status)."""
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            for sock in self._wakeup:
                sock.close()
            self._wakeup = None

    def take(self, wakeup: socket.socket) -> set[int]:
        """Empty the wake-up socket, then take the recorded signals (in this order: a signal
        after the draining leaves a byte for the next poll, so none is slept through)."""
        with contextlib.suppress(OSError):  # BlockingIOError: empty
            while wakeup.recv(4096):
                pass
        return {signum for signum in HANDLED_SIGNALS
                if self.received.pop(signum, _NOT_RECEIVED) is not _NOT_RECEIVED}
