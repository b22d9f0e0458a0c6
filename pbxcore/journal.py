"""Log lines for a terminal or for journald: under systemd, syslog priorities and no timestamp of our own."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import TextIO

TERMINAL_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# journald stamps each line itself; "<N>" at the start of a line is its priority
# (sd-daemon(3), SyslogLevelPrefix=yes is the default), so `journalctl -p warning` works.
JOURNAL_FORMAT = "%(levelname)s %(name)s %(message)s"
PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}
# The loggers whose INFO and DEBUG lines wait to be written together: the lines a call
# writes (two per call at INFO). Every other line (lifecycle, registrations, reloads, bans)
# is written at once, with what waited before it, so that what an operator or a script
# reads right after `systemctl reload` or before a crash is there.
BATCHED_LOGGERS = ("relay.calls",)
# How long such a line may wait to be written with others, and how many may wait.
FLUSH_SECONDS = 0.1
FLUSH_LINES = 256
# One write(2) of at most this many bytes, of whole lines: writes of up to PIPE_BUF to a
# pipe are atomic (pipe(7)), so the lines of workers sharing the parent's stderr do not
# interleave mid-line.
CHUNK = 4096


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

    def format(self, record: logging.LogRecord) -> str:
        """The stock result; a plain line (no traceback) without the generic machinery."""
        if record.exc_info or record.exc_text or record.stack_info or self._fmt != TERMINAL_FORMAT:
            return super().format(record)
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        return f"{record.asctime} {record.levelname} {record.name} {record.message}"


class JournalFormatter(logging.Formatter):
    """Every line of a record (tracebacks too) carries the record's priority prefix."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{PRIORITY.get(record.levelno, 6)}>"
        if not (record.exc_info or record.exc_text or record.stack_info) and self._fmt == JOURNAL_FORMAT:
            record.message = record.getMessage()
            if "\n" not in record.message:  # the usual line, without the generic machinery
                return f"{prefix}{record.levelname} {record.name} {record.message}"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


class BatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that writes the per-call lines (``batched`` loggers, below WARNING)
    together: at most FLUSH_SECONDS late, when FLUSH_LINES wait, at exit
    (``logging.shutdown``), and with any other line, which is written at once.

    At 400 calls/s the relay writes 800 per-call lines a second; one write(2) and a text
    layer flush per line cost ~40 µs of a call's CPU in situ (bench/RESULTS.md, issue 13,
    "the shell's share"). A line is formatted when it is logged (its text and time are
    those of the event); only the write waits, on a thread that sleeps while nothing
    waits. A relay killed with SIGKILL loses at most FLUSH_SECONDS of per-call lines;
    journald stamps a line when it reads it, so a per-call line's journal time is up to
    FLUSH_SECONDS late (the terminal format carries the event's own time).
    """

    def __init__(self, stream: TextIO, seconds: float = FLUSH_SECONDS, lines: int = FLUSH_LINES,
                 batched: tuple[str, ...] = BATCHED_LOGGERS) -> None:
        super().__init__(stream)
        self._waiting: list[str] = []
        self._seconds = seconds
        self._lines = lines
        self._batched = batched
        self._pending = threading.Event()
        threading.Thread(target=self._flusher, name="log-flusher", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        try:
            self._waiting.append(self.format(record))
        except Exception:
            self.handleError(record)
            return
        if (record.levelno >= logging.WARNING or not record.name.startswith(self._batched)
                or len(self._waiting) >= self._lines):
            self._write()  # worker tags make "relay.calls[w1]": still a per-call line
        elif len(self._waiting) == 1:
            self._pending.set()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            self._write()

    def _write(self) -> None:
        if not self._waiting:
            return
        lines, self._waiting = self._waiting, []
        try:
            fd = self.stream.fileno()
        except (AttributeError, OSError, ValueError):
            fd = -1
        try:
            if fd < 0:  # not a file (a test's StringIO): through the text layer
                self.stream.write("".join(line + "\n" for line in lines))
                self.stream.flush()
                return
            self.stream.flush()  # what others wrote through sys.stderr comes first
            for chunk in line_chunks(lines):
                while chunk:
                    chunk = chunk[os.write(fd, chunk):]
        except Exception:  # noqa: S110  # a broken stderr must not stop the relay, and is where it would say so
            pass

    def _flusher(self) -> None:
        while True:
            self._pending.wait()
            time.sleep(self._seconds)
            self._pending.clear()  # a line logged from here on either is written below or sets it again
            self.flush()


def line_chunks(lines: list[str]) -> list[bytes]:
    """The lines as bytes, newline-terminated, in chunks of at most CHUNK bytes of whole
    lines (a longer line is a chunk of its own)."""
    chunks: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for line in lines:
        data = line.encode("utf-8", "backslashreplace") + b"\n"
        if current and size + len(data) > CHUNK:
            chunks.append(b"".join(current))
            current, size = [], 0
        current.append(data)
        size += len(data)
    if current:
        chunks.append(b"".join(current))
    return chunks


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
    handler = BatchedStreamHandler(sys.stderr)
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
