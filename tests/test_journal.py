"""pbxcore/journal.py: the formatters' lines are the stock ones; the handler batches its writes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from pbxcore.journal import (
    CHUNK,
    JOURNAL_FORMAT,
    TERMINAL_FORMAT,
    BatchedStreamHandler,
    JournalFormatter,
    TerminalFormatter,
    line_chunks,
)

ROOT = Path(__file__).resolve().parent.parent


def _record(created: float) -> logging.LogRecord:
    rec = logging.LogRecord("relay.calls", logging.INFO, __file__, 1, "event=x n=%d", (7,), None)
    rec.created = created
    rec.msecs = (created - int(created)) * 1000
    return rec


def test_terminal_lines_match_the_stock_formatter_across_seconds() -> None:
    ours, stock = TerminalFormatter(TERMINAL_FORMAT), logging.Formatter(TERMINAL_FORMAT)
    # within one second, across a second, a minute and a day, and back in time
    for t in (1_796_000_000.001, 1_796_000_000.999, 1_796_000_001.5, 1_796_000_059.999,
              1_796_000_060.0, 1_796_083_200.25, 1_796_000_000.5):
        assert ours.format(_record(t)) == stock.format(_record(t))


def test_stock_lines_for_tracebacks_and_multiline_messages_too() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        exc = sys.exc_info()
    for fmt_cls, fmt in ((TerminalFormatter, TERMINAL_FORMAT), (JournalFormatter, JOURNAL_FORMAT)):
        rec = _record(1_796_000_000.25)
        rec.exc_info = exc
        multi = _record(1_796_000_000.5)
        multi.msg = "event=x\nsecond line %d"
        got = [fmt_cls(fmt).format(r) for r in (_record(1_796_000_000.1), rec, multi)]
        stock = [logging.Formatter(fmt).format(r) for r in (_record(1_796_000_000.1), rec, multi)]
        if fmt_cls is JournalFormatter:  # the stock text, each line with the record's priority
            stock = ["\n".join("<6>" + line for line in s.splitlines()) for s in stock]
        assert got == stock
        assert "Traceback" in got[1] and "ValueError: boom" in got[1]


def _piped_logger(seconds: float = 0.3) -> tuple[logging.Logger, int, BatchedStreamHandler]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    handler = BatchedStreamHandler(os.fdopen(w, "w"), seconds=seconds, batched=("test.batched.",))
    handler.setFormatter(JournalFormatter(JOURNAL_FORMAT))
    logger = logging.getLogger(f"test.batched.{r}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger, r, handler


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 20)
    except BlockingIOError:
        return b""


def test_info_lines_wait_a_moment_and_a_warning_writes_them_all_in_order() -> None:
    logger, r, handler = _piped_logger(seconds=30)  # the flusher would not come in this test
    for i in range(5):
        logger.info("event=call n=%d", i)
    assert _read(r) == b""  # nothing written yet: one write later for all of them
    logger.warning("event=trouble")
    assert _read(r).decode().splitlines() == [f"<6>INFO {logger.name} event=call n={i}" for i in range(5)] + [
        f"<4>WARNING {logger.name} event=trouble"]
    logger.info("event=late")
    handler.flush()  # what logging.shutdown() does at exit
    assert _read(r) == f"<6>INFO {logger.name} event=late\n".encode()


def test_lines_of_other_loggers_are_written_at_once_after_what_waited() -> None:
    """Only the per-call loggers' lines wait: a lifecycle line (a reload, a worker's
    start) is in the log when the action that wrote it returns."""
    logger, r, handler = _piped_logger(seconds=30)
    other = logging.getLogger(f"test.lifecycle.{r}")
    other.propagate = False
    other.setLevel(logging.INFO)
    other.addHandler(handler)
    logger.info("event=call")
    assert _read(r) == b""
    other.info("event=reloaded")
    assert _read(r).decode().splitlines() == [f"<6>INFO {logger.name} event=call",
                                              f"<6>INFO {other.name} event=reloaded"]


def test_info_lines_are_written_within_the_flush_interval_without_anything_else() -> None:
    logger, r, _ = _piped_logger(seconds=0.2)
    for round_ in range(2):  # the flusher sleeps after a flush and wakes for the next line
        logger.info("event=call round=%d", round_)
        got = b""
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
            got = _read(r)
        assert got == f"<6>INFO {logger.name} event=call round={round_}\n".encode()


def test_many_lines_are_written_in_pipe_atomic_chunks_of_whole_lines() -> None:
    lines = [f"event=call n={i} " + "x" * (i % 300) for i in range(400)] + ["y" * 9000]
    chunks = line_chunks(lines)
    assert b"".join(chunks) == "".join(line + "\n" for line in lines).encode()
    assert all(c.endswith(b"\n") for c in chunks)
    assert all(len(c) <= CHUNK for c in chunks[:-1]) and len(chunks[-1]) == 9001  # a long line alone
    assert len(chunks) < 40  # not one write per line


def test_an_info_line_logged_just_before_exit_is_written(tmp_path: Path) -> None:
    code = ("import logging; from pbxcore.journal import configure_logging; configure_logging('info');"
            "logging.getLogger('relay').info('event=last')")
    out = tmp_path / "stderr"
    with open(out, "wb") as f:
        subprocess.run([sys.executable, "-c", code], stderr=f, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       check=True, timeout=30)
    assert out.read_text().endswith(" INFO relay event=last\n")
