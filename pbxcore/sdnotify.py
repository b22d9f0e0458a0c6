"""sd_notify(3) without libsystemd: READY, STATUS, RELOADING, STOPPING and WATCHDOG to $NOTIFY_SOCKET.

The protocol is one datagram per notification on the AF_UNIX socket systemd names
in ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket), holding
newline-separated ``VARIABLE=value`` assignments. With ``NotifyAccess=main`` systemd
accepts them only from the main process, which is us: ExecStart runs the Python
entry point directly. Outside systemd (``pbx-relay run`` in a terminal) the variable
is unset and every call here does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

import trio

log = logging.getLogger("pbxcore.sdnotify")


class Notifier:
    """The service manager's side channel; see :func:`Notifier.from_environ`."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None):
        self.address = _socket_address(address) if address else None
        # sd_watchdog_enabled(3): ping at half the timeout, so that one late ping is
        # not yet a missed one.
        self.watchdog_interval: float | None = watchdog_usec / 2e6 if watchdog_usec else None
        self._sock: socket.socket | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, pid: int | None = None) -> Notifier:
        """From ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID`` (the watchdog is
        ours only when WATCHDOG_PID is unset or is our pid: a child must not ping for us)."""
        env = os.environ if environ is None else environ
        usec: int | None = None
        raw_pid = env.get("WATCHDOG_PID", "")
        if raw_pid in ("", str(os.getpid() if pid is None else pid)):
            try:
                usec = int(env.get("WATCHDOG_USEC", "")) or None
            except ValueError:
                usec = None
        return cls(env.get("NOTIFY_SOCKET") or None, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``VARIABLE=value`` lines in one datagram; False when not sent (never raises:
        a service must not stop because its supervisor is not listening)."""
        if self.address is None:
            return False
        data = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(data, self.address)
        except OSError as e:
            log.debug("event=notify_failed error=%s", e)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        """RELOADING=1 with MONOTONIC_USEC (what systemd ≥ 253 wants for Type=notify-reload);
        :meth:`ready` ends the reload."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *_status(status))

    def status(self, text: str) -> bool:
        return self.send(*_status(text))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str | None) -> list[str]:
    # STATUS is one line: a newline would start a new (bogus) assignment.
    return [] if text is None else ["STATUS=" + " ".join(text.split())]


def _socket_address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]  # Linux abstract namespace
    if value.startswith("/"):
        return value
    log.warning("event=notify_socket_unsupported address=%r", value)  # e.g. vsock: (systemd ≥ 254)
    return None


Check = Callable[[], Awaitable[str | None]]


async def keep_watchdog(notifier: Notifier, check: Check) -> None:
    """WATCHDOG=1 every watchdog interval, but only after ``check()`` said the service is
    healthy (returned None; else it returns what is wrong) within half an interval. A
    blocked event loop, a stuck task or a store that stopped answering thus withholds the
    ping, and systemd restarts the service after ``WatchdogSec``. Returns at once when
    the watchdog is off."""
    interval = notifier.watchdog_interval
    if interval is None or not notifier.enabled:
        return
    withheld: str | None = None
    while True:
        deadline = trio.current_time() + interval
        problem: str | None = "health check did not answer in time"
        with trio.move_on_after(interval / 2):
            try:
                problem = await check()
            except Exception as e:  # a failing check is a reason to withhold, not to crash
                problem = f"health check failed: {type(e).__name__}"
        if problem is None:
            notifier.watchdog()
            if withheld is not None:
                log.warning("event=watchdog_resumed")
                withheld = None
        elif problem != withheld:
            log.error("event=watchdog_withheld reason=%r", problem)
            withheld = problem
        await trio.sleep_until(deadline)
