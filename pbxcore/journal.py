"""Log lines for a terminal or for journald: under systemd, syslog priorities and no timestamp of our own."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping

TERMINAL_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# journald stamps each line itself; "<N>" at the start of a line is its priority
# (sd-daemon(3), SyslogLevelPrefix=yes is the default), so `journalctl -p warning` works.
JOURNAL_FORMAT = "%(levelname)s %(name)s %(message)s"
PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class TerminalFormatter(logging.Formatter):
    """The stock format, with the date and time text made once per second, not per line."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
        return f"{self._stamp},{int(record.msecs):03d}"


class JournalFormatter(logging.Formatter):
    """Every line of a record (tracebacks too) carries the record's priority prefix."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def stderr_is_journal(environ: Mapping[str, str] | None = None) -> bool:
    """True when stderr is the journal stream systemd connected (``$JOURNAL_STREAM`` is
    "<device>:<inode>" of it; a redirected stderr keeps the variable but not the inode)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def configure_logging(level: str) -> None:
    """Root logger at ``level`` ("debug", "info", ...) writing to stderr.

    Neither format shows a record's thread, process or source line, so the records do
    not collect them: the knobs of the logging documentation's "Optimization" section
    (https://docs.python.org/3/howto/logging.html#optimization). At 400 calls/s the relay
    writes ~1,200 lines a second; this made each one cheaper (bench/RESULTS.md, issue 9).
    """
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # documented there: no sys._getframe() walk per record
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter(JOURNAL_FORMAT))
    else:
        handler.setFormatter(TerminalFormatter(TERMINAL_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def set_level(level: str) -> bool:
    """Change the root logger's level (SIGHUP); True when it changed."""
    root = logging.getLogger()
    new = logging.getLevelName(level.upper())
    if root.level == new:
        return False
    root.setLevel(new)
    return True
