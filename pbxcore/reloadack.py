"""Reload acknowledgements: a service records the SIGHUP reloads it ran; ExecReload signals and waits for one.

Why: systemd ends ``systemctl reload`` when ExecReload exits. With
``ExecReload=/bin/kill -HUP $MAINPID`` that is as soon as the signal is sent, before the
service read anything again, so a certificate-renewal hook that reloads and then relies
on the new certificate races the service. ``Type=notify-reload``, where systemd itself
waits for the service's RELOADING=1 … READY=1, came in systemd 253; Debian 12 has 252
(systemd.service(5), "Type=notify-reload"; NEWS for 253). So both units run

    ExecReload=/opt/pbx-relay/bin/python3 -I -m pbxcore.reloadack $MAINPID

and the handshake is a file in the unit's ``RuntimeDirectory=`` (``$RUNTIME_DIRECTORY``,
set by systemd for ExecStart and ExecReload alike): ``reloads`` holds one line
``<pid> <started> <finished>``, replaced whole (rename) by the service when it starts
and when it finishes a reload (pbxcore.lifecycle). ExecReload reads ``started`` before
it sends SIGHUP and returns once ``finished`` passed it: that reload began after the
read, so it saw every file changed before ``systemctl reload`` ran, even when another
reload was under way (trio delivers a SIGHUP that arrives meanwhile once, after it).

Outside systemd (``pbx-relay run`` in a terminal) ``$RUNTIME_DIRECTORY`` is unset and
the service writes nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("pbxcore.reloadack")

FILE_NAME = "reloads"
# ExecReload's own limit, under the units' TimeoutStartSec=30 (which also bounds
# ExecReload), so the journal gets our sentence rather than systemd's kill.
WAIT_TIMEOUT = 25.0  # seconds
POLL = 0.02  # seconds between two reads of the file: a reload takes milliseconds


class ReloadNotConfirmed(Exception):
    """The service did not confirm the reload (gone, or not within the timeout)."""


@dataclass(frozen=True)
class ReloadCount:
    """One reading of the file: which process wrote it, reloads started and finished."""

    pid: int
    started: int
    finished: int

    def line(self) -> str:
        return f"{self.pid} {self.started} {self.finished}\n"

    @classmethod
    def parse(cls, text: str) -> ReloadCount | None:
        """None for anything but three integers (a file from something else)."""
        parts = text.split()
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            return None
        return cls(int(parts[0]), int(parts[1]), int(parts[2]))


def runtime_file(environ: Mapping[str, str] | None = None) -> Path | None:
    """``$RUNTIME_DIRECTORY/reloads`` (the first directory when the unit names several)."""
    env = os.environ if environ is None else environ
    first = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(first) / FILE_NAME if first else None


class ReloadLedger:
    """The service's side: counts reloads and publishes them in the runtime file."""

    def __init__(self, path: Path | None, pid: int | None = None):
        self.path = path
        self.count = ReloadCount(os.getpid() if pid is None else pid, 0, 0)
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> ReloadLedger:
        return cls(runtime_file(environ))

    def publish(self) -> None:
        """Write the current count (at start: nothing reloaded yet)."""
        self._write()

    def started(self) -> None:
        c = self.count
        self.count = ReloadCount(c.pid, c.started + 1, c.finished)
        self._write()

    def finished(self) -> None:
        c = self.count
        self.count = ReloadCount(c.pid, c.started, c.started)
        self._write()

    def _write(self) -> None:
        # A few bytes on a tmpfs: done inline, like the sd_notify datagrams. Never raises:
        # a reload must not fail because its acknowledgement could not be written.
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(self.count.line())
            os.replace(tmp, self.path)
        except OSError as e:
            if not self._warned:
                log.warning("event=reload_ack_unwritable path=%s error=%s", self.path, e.strerror or e)
                self._warned = True


def read(path: Path) -> ReloadCount | None:
    try:
        return ReloadCount.parse(path.read_text())
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists; not ours to signal (the SIGHUP would have said so)
    return True


def signal_and_wait(
    pid: int, path: Path, *, timeout: float = WAIT_TIMEOUT, poll: float = POLL,
    send: Callable[[int, int], None] = os.kill, alive: Callable[[int], bool] = _alive,
    clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
) -> ReloadCount:
    """Send SIGHUP to ``pid`` and return the count once a reload that started after this
    call finished. Raises :class:`ReloadNotConfirmed` when ``pid`` is gone or
    ``timeout`` seconds pass; ``ProcessLookupError`` when there is no ``pid`` to signal."""
    before = read(path)
    # A file from an earlier process of the unit (restarted) counts as nothing yet.
    started = before.started if before is not None and before.pid == pid else 0
    send(pid, signal.SIGHUP)
    deadline = clock() + timeout
    while True:
        now = read(path)
        if now is not None and now.pid == pid and now.finished > started:
            return now
        if not alive(pid):
            raise ReloadNotConfirmed(f"process {pid} exited before it confirmed the reload")
        if clock() >= deadline:
            seen = "nothing" if now is None else now.line().strip()
            raise ReloadNotConfirmed(
                f"process {pid} did not confirm the reload within {timeout:g} s ({path}: {seen})")
        sleep(poll)


def main(argv: list[str] | None = None) -> int:
    """``python -m pbxcore.reloadack MAINPID``: the units' ExecReload. Exit 0 once the
    reload ran, 1 (one line on stderr, so in the journal) when it was not confirmed."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python3 -m pbxcore.reloadack MAINPID", file=sys.stderr)
        return 2
    pid = int(args[0])
    path = runtime_file()
    try:
        if path is None:
            # No RuntimeDirectory=: nothing to wait on, so at least send the signal.
            os.kill(pid, signal.SIGHUP)
            print("reload: $RUNTIME_DIRECTORY unset: SIGHUP sent, not waiting for it", file=sys.stderr)
            return 0
        signal_and_wait(pid, path)
    except ProcessLookupError:
        print(f"reload: no process {pid}", file=sys.stderr)
        return 1
    except PermissionError:
        print(f"reload: not allowed to signal process {pid} (run as the service's user)", file=sys.stderr)
        return 1
    except ReloadNotConfirmed as e:
        print(f"reload: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
