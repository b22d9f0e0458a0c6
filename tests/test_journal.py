"""pbxcore/journal.py: the terminal formatter's cached time text is the stock one."""

from __future__ import annotations

import logging

from pbxcore.journal import TERMINAL_FORMAT, TerminalFormatter


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
