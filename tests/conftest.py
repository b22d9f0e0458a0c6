"""Fixtures shared by the tests that run real processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.realpeers import COMPILED_SITE, SIPP, RelayProc, free_port, start_relay, stop_relay


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under tests/test_compiled.py (RELAY_TEST_COMPILED_SITE set) the core must be the compiled
    one from that folder: a run that silently tested the checkout's Python proves nothing."""
    if COMPILED_SITE:
        from relay.proxy import core

        where = core.__file__ or ""
        if not (where.startswith(COMPILED_SITE) and where.endswith(".so")):
            raise pytest.UsageError(f"RELAY_TEST_COMPILED_SITE={COMPILED_SITE}, relay.proxy.core is {where}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if COMPILED_SITE:
        from relay.proxy import core

        where = os.path.dirname(core.__file__ or "")
        terminalreporter.write_line(f"compiled core: relay.proxy.core from {where}")


@pytest.fixture
def relay_factory(tmp_path: Path) -> Iterator[object]:
    started: list[RelayProc] = []

    def make(
        extra: str = "", serials: tuple[str, ...] = ("0123456789",), log_level: str = "info",
        media: str = "", push: str | None = None,
    ) -> RelayProc:
        """``extra``: lines for [sip]; ``media``: lines for [media]; ``push``: lines for
        [push] of the relay's config (None: push off)."""
        state = tmp_path / f"relay{len(started)}"
        state.mkdir()
        r = RelayProc(state, "127.0.0.1", free_port(), free_port(), free_port(), free_port(),
                      log_level=log_level)
        from tests.realpeers import write_config

        write_config(r, extra, media, push)
        for s in serials:
            r.add_pbx(s)
        for attempt in range(3):
            try:
                start_relay(r, extra, media, push)
                break
            except AssertionError as e:
                # free_port() says what was free when asked; another test's peer (or an
                # ephemeral port) can take it before the relay binds. Other ports, again.
                if attempt == 2 or "Address already in use" not in str(e):
                    raise
                r.udp, r.tcp, r.tls, r.admin = free_port(), free_port(), free_port(), free_port()
        started.append(r)
        return r

    yield make
    for r in started:
        stop_relay(r)


@pytest.fixture
def relay(relay_factory) -> RelayProc:  # type: ignore[no-untyped-def]
    return relay_factory()  # type: ignore[no-any-return]


needs_sipp = pytest.mark.skipif(SIPP is None, reason="sipp not installed (./dev.sh test installs it)")
