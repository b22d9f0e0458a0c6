"""The dry-run gateway: records a push instead of sending it.

The default for a provider with no credentials configured (DESIGN §5: push
gateways log until credentials are configured). It keeps the last pushes in
memory (:attr:`LogGateway.sent`, bounded) and logs one line per push naming the
device by its id, never by its push token. :func:`~push.gateways.base.deliver`
turns its answers into ``Outcome.DRY_RUN``.
"""

from __future__ import annotations

import logging
import os
from collections import deque

from push.model import Attempt, PushMessage

log = logging.getLogger("push")

# Pushes kept in memory for inspection (tests, `pbx-relay run` demos).
SENT_MAX = 1000


class LogGateway:
    """Dry-run stand-in for the ``stands_for`` provider ("apns" or "fcm").

    ``provider`` is ``"log"`` (that is how ``deliver`` knows to answer DRY_RUN);
    ``device_key`` is the service's device-id key, so the logged id matches the
    push log's (a random per-process key when not given).
    """

    provider = "log"

    def __init__(self, stands_for: str, *, device_key: bytes | None = None, max_sent: int = SENT_MAX):
        self.stands_for = stands_for
        self._device_key = device_key if device_key is not None else os.urandom(32)
        self.sent: deque[PushMessage] = deque(maxlen=max_sent)

    async def send_once(self, msg: PushMessage) -> Attempt:
        self.sent.append(msg)
        log.info(
            "event=push_dry_run provider=%s device=%s ttl=%d",
            self.stands_for, msg.device_id or msg.target.device_id(self._device_key), msg.ttl,
        )
        return Attempt("ok", None, "dry_run")

    def credentials_expired(self) -> None:
        """Nothing cached: nothing to drop."""

    async def aclose(self) -> None:
        """Nothing open."""
