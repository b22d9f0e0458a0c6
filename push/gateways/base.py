"""What every push gateway offers, and the retry policy they all share.

A gateway (:mod:`~push.gateways.apns`, :mod:`~push.gateways.fcm`,
:mod:`~push.gateways.log`) turns one :class:`~push.model.PushMessage` into one
HTTP request and classifies the answer as an :class:`~push.model.Attempt`; it
never retries and never raises for the network's sake. :func:`deliver` owns the
retries, in two layers like the rest of the code base:

- :func:`next_step` is the policy, a pure function of the last attempt, how many
  retries were made, ``now`` and the deadline: it returns what to do next
  (finish with an outcome, renew credentials and retry at once, or sleep and
  retry). Tests walk it through hours of 503s in microseconds.
- :func:`deliver` is the trio shell: it bounds each request by the deadline
  (``trio.move_on_at``), sleeps on trio's clock and records the history.

The policy follows the providers' own advice: Apple ("Handling notification
responses from APNs": retry 5xx with back-off, ``TooManyRequests`` after a
delay, never ``BadDeviceToken``/``Unregistered``;
https://developer.apple.com/documentation/usernotifications/handling-notification-responses-from-apns)
and Google ("FCM ErrorCode": honour ``Retry-After`` on ``QUOTA_EXCEEDED`` and
``UNAVAILABLE``, exponential back-off on ``INTERNAL``;
https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode).
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from push.gateways.http2 import Http2Client, RequestNotProcessed, RequestOutcomeUnknown
from push.model import Attempt, Outcome, PushMessage, PushResult

log = logging.getLogger("push")

# Back-off between retries of one push: 0.2 s, doubling, at most 5 s. A VoIP push
# is worth delivering only while the phone rings (typically 30-60 s), so the
# ceiling stays far below the minutes Google suggests for bulk senders; the
# deadline, not an attempt count, ends the retries.
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 5.0
# A provider's Retry-After above this is treated as this: it can only end the
# retries (the deadline is shorter), and a garbage header must not overflow.
RETRY_AFTER_MAX = 3600.0
# Reasons come from the provider's body; they go into logs and the push log, so
# they are cut to a short token of safe characters (no log injection, no echo of
# whatever a misbehaving server puts there).
REASON_MAX = 64
_REASON_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")

# What an attempt came to (Attempt.kind). "retry": not processed, try again after a
# back-off (429, 5xx, the FCM token endpoint unreachable); "not_processed": the
# provider provably did not process it (RST_STREAM REFUSED_STREAM, above GOAWAY's
# last-stream-id, no connection): again at once; "unknown": the request left and no
# answer came, so it may have been processed.
KINDS = ("ok", "unregistered", "retry", "not_processed", "unknown", "rejected", "auth_expired")


class Gateway(Protocol):
    """One provider's client: one request per call, no retries, no exceptions for
    network trouble (those are ``Attempt("retry", None, <exception class>)``)."""

    provider: str  # "apns" | "fcm" | "log"

    async def send_once(self, msg: PushMessage) -> Attempt: ...

    def credentials_expired(self) -> None:
        """Drop the cached provider token (APNs JWT, FCM access token) so that the
        next send mints a new one."""

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Step:
    """What :func:`deliver` does after an attempt: finish with ``outcome``, or
    (``outcome`` None) wait ``delay`` seconds and try again, first dropping the
    cached credentials when ``renew_credentials``."""

    outcome: Outcome | None
    delay: float = 0.0
    renew_credentials: bool = False


def backoff(retries: int, jitter: float) -> float:
    """Seconds to wait before retry number ``retries`` (0-based): 0.2 s doubling up
    to 5 s, scaled into [50 %, 100 %] by ``jitter`` in [0, 1) so that many pushes
    failing together do not come back together."""
    base = min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** min(retries, 32))
    return base * (0.5 + 0.5 * min(max(jitter, 0.0), 1.0))


def next_step(
    attempt: Attempt,
    *,
    retries: int,
    auth_renewed: bool,
    now: float,
    deadline: float,
    jitter: float,
    dry_run: bool = False,
) -> Step:
    """The retry policy. ``retries``: how many retries were already made (not
    counting a credentials renewal); ``auth_renewed``: whether this push already
    renewed its credentials once; ``now``/``deadline`` on trio's clock.

    A push whose fate is unknown is never sent again: both providers deliver a
    duplicate (APNs ``apns-collapse-id`` and FCM ``collapse_key`` only merge
    notifications still *waiting* for an offline device), and a second VoIP push
    is a second CallKit call — the phone rings twice. It ends as
    ``sent_unconfirmed``, which the relay treats as sent: it holds the call for the
    phone rather than dropping it. A push the provider provably did not process is
    sent again at once the first time, then after the usual back-off (a provider
    refusing every stream must not be hammered)."""
    kind = attempt.kind
    if kind == "ok":
        return Step(Outcome.DRY_RUN if dry_run else Outcome.SENT)
    if kind == "unregistered":
        return Step(Outcome.UNREGISTERED)
    if kind == "unknown":
        return Step(Outcome.SENT_UNCONFIRMED)
    if kind == "auth_expired":
        # One fresh token per push: if the provider refuses that one too, the
        # problem is the credentials themselves, not their age.
        if auth_renewed:
            return Step(Outcome.REJECTED)
        return Step(None, 0.0, renew_credentials=True)
    if kind in ("retry", "not_processed"):
        delay = 0.0 if kind == "not_processed" and retries == 0 else backoff(retries, jitter)
        if attempt.retry_after is not None:
            delay = max(delay, min(attempt.retry_after, RETRY_AFTER_MAX))
        if now + delay >= deadline:
            return Step(Outcome.FAILED)
        return Step(None, delay)
    # "rejected", and any kind a gateway should not have produced.
    return Step(Outcome.REJECTED)


_jitter = random.Random()


async def deliver(
    gateway: Gateway, msg: PushMessage, deadline: float, *, started: float | None = None
) -> PushResult:
    """Send ``msg`` through ``gateway``, retrying as :func:`next_step` says until
    ``deadline`` (trio clock). Never raises for the provider's or the network's
    sake. ``started`` (trio clock, default now) is where ``latency_ms`` counts from."""
    t0 = trio.current_time() if started is None else started
    dry_run = gateway.provider == "log"
    history: list[Attempt] = []
    retries = 0
    auth_renewed = False
    while True:
        attempt = await _send_bounded(gateway, msg, deadline)
        history.append(attempt)
        # A first attempt that worked is the common case, and the service logs the
        # push's outcome anyway: that line only at DEBUG (INFO logging is a visible
        # share of a busy relay's CPU).
        log.log(
            logging.DEBUG if attempt.kind == "ok" and len(history) == 1 else logging.INFO,
            "event=push_attempt provider=%s attempt=%d kind=%s status=%s reason=%s",
            gateway.provider, len(history), attempt.kind,
            "-" if attempt.status is None else attempt.status, attempt.reason or "-",
        )
        step = next_step(
            attempt, retries=retries, auth_renewed=auth_renewed, now=trio.current_time(),
            deadline=deadline, jitter=_jitter.random(), dry_run=dry_run,
        )
        if step.outcome is not None:
            return PushResult(
                outcome=step.outcome, status=attempt.status, reason=attempt.reason,
                attempts=len(history), latency_ms=(trio.current_time() - t0) * 1000.0,
                history=history,
            )
        if step.renew_credentials:
            auth_renewed = True
            gateway.credentials_expired()
        else:
            retries += 1
            await trio.sleep(step.delay)


async def _send_bounded(gateway: Gateway, msg: PushMessage, deadline: float) -> Attempt:
    attempt: Attempt | None = None
    with trio.move_on_at(deadline):
        try:
            attempt = await gateway.send_once(msg)
        except Exception as exc:
            # A gateway bug, not the network (gateways turn those into "retry"): end
            # this push rather than the caller's task, and do not retry a bug. Only the
            # class name is logged: the message may quote a URL, hence a device token.
            log.error("event=push_gateway_error provider=%s error=%s", gateway.provider, type(exc).__name__)
            return Attempt("rejected", None, type(exc).__name__)
    if attempt is None:
        return Attempt("retry", None, "DeadlineExceeded")
    return attempt


# ---------------------------------------------------------------- helpers for gateways


class CachedToken:
    """A provider credential (APNs JWT, FCM access token) with its bookkeeping.

    Each token gets a generation number. A send remembers the generation it used;
    when the provider refuses it (``auth_expired``) the gateway calls
    :meth:`refused`, and :meth:`drop` (what ``credentials_expired`` does) forgets
    the cached token only if it is that refused one or older. So a burst of
    concurrent sends that all hit an expired token mints *one* new token, not one
    per send: Apple answers ``TooManyProviderTokenUpdates`` to frequent refreshes.
    With no refusal recorded, :meth:`drop` always forgets.
    """

    __slots__ = ("value", "expires_at", "generation", "_refused")

    def __init__(self) -> None:
        self.value: str | None = None
        self.expires_at = 0.0  # wall clock; when to stop using this token
        self.generation = 0
        self._refused = -1

    def set(self, value: str, expires_at: float) -> int:
        self.value = value
        self.expires_at = expires_at
        self.generation += 1
        return self.generation

    def valid(self, now: float) -> str | None:
        return self.value if self.value is not None and now < self.expires_at else None

    def refused(self, generation: int) -> None:
        self._refused = max(self._refused, generation)

    def drop(self) -> None:
        if self._refused < 0 or self._refused >= self.generation:
            self.value = None



def collapse_id(call_id: str) -> str:
    """The id both providers collapse a call's pushes under (APNs
    ``apns-collapse-id``, at most 64 bytes; FCM ``android.collapse_key``): a
    SHA-256 prefix of the Call-ID, so that it fits and is plain ASCII whatever
    the Call-ID looks like."""
    return hashlib.sha256(call_id.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def clean_reason(text: object) -> str:
    """A provider's reason/errorCode made safe for logs: short, no odd characters."""
    if not isinstance(text, str):
        return ""
    return _REASON_UNSAFE.sub("_", text)[:REASON_MAX]


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from an HTTP ``Retry-After`` header (RFC 9110 §10.2.3: delay-seconds
    or an HTTP-date, compared with ``now``, wall-clock Unix seconds)."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - now
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX)


async def post(
    client: Http2Client, path: str, body: bytes, headers: list[tuple[bytes, bytes]],
    classify: Callable[[int, bytes, float | None], Attempt], clock: Callable[[], float],
    per_request: tuple[tuple[bytes, bytes], ...] = (),
) -> Attempt:
    """One POST to a provider, its answer classified by the provider's table. No
    answer is ``not_processed`` or ``unknown``, as the HTTP/2 facts say
    (:mod:`push.gateways.http2`). ``headers`` repeat across pushes, ``per_request``
    ones do not (see :meth:`~push.gateways.http2.H2Session.open`)."""
    try:
        resp = await client.request(path, headers, body, per_request)
    except RequestNotProcessed as exc:
        return Attempt("not_processed", None, exc.reason)
    except RequestOutcomeUnknown as exc:
        return Attempt("unknown", None, exc.reason)
    retry_after = parse_retry_after(resp.headers.get("retry-after"), clock())
    return classify(resp.status, resp.body, retry_after)


def network_attempt(exc: BaseException) -> Attempt:
    """A request that got no HTTP answer: retry later. Only the exception's class
    name is kept; its text may carry the URL, hence an APNs device token."""
    return Attempt("retry", None, type(exc).__name__)


class _HttpxUrlRedaction(logging.Filter):
    """httpx logs every request at INFO with its full URL, and an APNs URL ends
    with the device token (``/3/device/<token>``). Keep the host, drop the path."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 2 and str(record.msg).startswith("HTTP Request:"):
            url = str(args[1])
            scheme, sep, rest = url.partition("://")
            host = rest.split("/", 1)[0]
            record.args = (args[0], f"{scheme}{sep}{host}/…", *args[2:])
        return True


class _DropHeaderDumps(logging.Filter):
    """hpack logs every header it encodes or decodes at DEBUG, values included:
    the ``authorization`` bearer token and the ``:path`` with the device token."""

    def filter(self, record: logging.LogRecord) -> bool:
        return False


# Loggers of the HTTP stack that would write a token somewhere, and their filter.
_LOG_GUARDS: tuple[tuple[str, type[logging.Filter]], ...] = (
    ("httpx", _HttpxUrlRedaction),
    ("hpack.hpack", _DropHeaderDumps),
    ("hpack.table", _DropHeaderDumps),
)


def protect_logs() -> None:
    """Keep push tokens, provider tokens and payloads out of the HTTP stack's own
    logs (process-wide, idempotent): every gateway calls it when made."""
    for name, guard in _LOG_GUARDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, guard) for f in logger.filters):
            logger.addFilter(guard())
