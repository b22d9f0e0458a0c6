"""A service's life under systemd: READY, STATUS and WATCHDOG while it runs, SIGHUP reloads, SIGTERM stops.

Signals, the way both units and a terminal use them:

- SIGHUP (``systemctl reload``): RELOADING=1, ``reload()``, READY=1 with a fresh STATUS,
  each reload counted in ``$RUNTIME_DIRECTORY/reloads`` so that the units' ExecReload
  returns only once it ran (pbxcore.reloadack). A reload never stops the service:
  ``reload()`` logs what it could not apply.
- SIGTERM (``systemctl stop``/``restart``): STOPPING=1, then ``drain()`` when the service
  has one (the relay lets calls finish, up to its drain limit), then stop.
- SIGINT (Ctrl-C in a terminal) and a second SIGTERM: STOPPING=1 and stop at once.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from pbxcore.reloadack import ReloadLedger
from pbxcore.sdnotify import Check, Notifier, keep_watchdog

log = logging.getLogger("pbxcore.lifecycle")

STATUS_EVERY = 10.0  # seconds between STATUS= updates (what `systemctl status` shows)
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def supervise(
    signals: AsyncIterator[int],
    notifier: Notifier,
    *,
    status: Callable[[], Awaitable[str]],
    check: Check,
    reload: Callable[[], Awaitable[None]],
    drain: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run a started service until it is told to stop; returns when it should be cancelled.

    ``signals`` comes from ``trio.open_signal_receiver(*SIGNALS)``, opened before the
    service started so that no signal is lost in between. ``status()`` is the one-line
    STATUS, ``check()`` the watchdog's health check (see :func:`keep_watchdog`)."""
    reloads = ReloadLedger.from_environ()
    reloads.publish()
    notifier.ready(await status())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_watchdog, notifier, check)
        if notifier.enabled:
            nursery.start_soon(_report_status, notifier, status)
        stopping = False
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                if stopping:
                    log.info("event=reload_ignored reason=stopping")
                    continue
                reloads.started()
                notifier.reloading("Reloading")
                await reload()
                notifier.ready(await status())
                reloads.finished()
            elif signum == signal.SIGTERM and drain is not None and not stopping:
                stopping = True
                log.info("event=stopping signal=%s drain=yes", name)
                notifier.stopping("Draining")
                nursery.start_soon(_drain_then_stop, drain, nursery.cancel_scope)
            else:
                log.info("event=stopping signal=%s%s", name, " drain=cut_short" if stopping else "")
                if not stopping:
                    notifier.stopping("Stopping")
                nursery.cancel_scope.cancel()
                return


async def _drain_then_stop(drain: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
    await drain()
    scope.cancel()


async def _report_status(notifier: Notifier, status: Callable[[], Awaitable[str]]) -> None:
    last = ""
    while True:
        await trio.sleep(STATUS_EVERY)
        text = await status()
        if text != last:
            notifier.status(text)
            last = text
