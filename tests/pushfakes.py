"""Local HTTP/2-over-TLS stand-ins for Apple's APNs provider API and Google's FCM
HTTP v1 API (with Google's OAuth 2.0 token endpoint), for testing our own push
clients (push/gateways/) without the network.

They check what Apple's and Google's documentation says the real services check,
answer like the real services, and can be told what to answer next. They follow
the providers' documentation, not our client code: when a client and a fake
disagree, the documentation decides.

Documentation followed (read through the stored copies of these pages):

* Apple, "Sending notification requests to APNs"
  https://developer.apple.com/documentation/usernotifications/sending-notification-requests-to-apns
  (HTTP/2 + TLS 1.2 or later; ``POST /3/device/<device token>``; the ``apns-*``
  request headers; the voip topic is ``<bundle id>.voip`` with
  ``apns-push-type: voip``; ``apns-priority`` 10, 5 or 1, 10 when absent;
  ``apns-expiration`` a UNIX epoch in seconds; ``apns-collapse-id`` at most 64
  bytes; payload at most 4096 bytes, 5120 bytes for VoIP).
* Apple, "Handling notification responses from APNs"
  https://developer.apple.com/documentation/usernotifications/handling-notification-responses-from-apns
  (200 with an empty body; errors carry a JSON body ``{"reason": ...}``, and 410
  also ``"timestamp"`` in milliseconds since the Epoch; ``apns-id`` header on every
  answer, echoing the request's or a new UUID; the status codes and reasons).
* Apple, "Establishing a token-based connection to APNs"
  https://developer.apple.com/documentation/usernotifications/establishing-a-token-based-connection-to-apns
  (``authorization: bearer <JWT>``; header ``alg: ES256`` + ``kid`` = the 10-character
  key id; claims ``iss`` = the 10-character team id and ``iat``; a token older than
  one hour is rejected; refresh no more than once every 20 minutes, else 429
  ``TooManyProviderTokenUpdates`` — the 429 is confirmed by an Apple engineer in
  https://developer.apple.com/forums/thread/675879).
* Google, "Send a message using FCM HTTP v1 API"
  https://firebase.google.com/docs/cloud-messaging/send/v1-api
  and the REST reference https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages
  (``POST /v1/projects/<project id>/messages:send``, ``Authorization: Bearer <OAuth 2.0
  access token>`` with scope ``https://www.googleapis.com/auth/firebase.messaging``;
  body ``{"message": {...}}`` with one of ``token``/``topic``/``condition``; ``data``
  is a map of strings; ``android.priority`` NORMAL/HIGH; ``android.ttl`` a
  google.protobuf.Duration string such as ``"3.5s"``, at most 4 weeks).
* Google, "FCM error codes" https://firebase.google.com/docs/cloud-messaging/error-codes
  and ``ErrorCode`` https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode
  (error body ``{"error": {"code", "message", "status", "details": [...]}}``, an
  ``type.googleapis.com/google.firebase.fcm.v1.FcmError`` detail with ``errorCode``:
  UNREGISTERED 404, INVALID_ARGUMENT 400, SENDER_ID_MISMATCH 403, QUOTA_EXCEEDED 429,
  UNAVAILABLE 503, INTERNAL 500, THIRD_PARTY_AUTH_ERROR 401; a bad field value is
  reported as INVALID_ARGUMENT with a ``google.rpc.BadRequest`` detail instead).
* Google, "Using OAuth 2.0 for Server to Server Applications"
  https://developers.google.com/identity/protocols/oauth2/service-account
  (JWT signed RS256 with the service account key, claims ``iss`` = client_email,
  ``scope`` space-delimited, ``aud`` = the token URI, ``exp`` at most one hour after
  ``iat``; POSTed form-encoded as ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer``
  and ``assertion``; answer ``access_token``/``expires_in``/``token_type``; a bad
  assertion gets 400 ``invalid_grant``).

Where the documentation is silent the fake says so in a comment and picks the
plainest behaviour (e.g. an HTTP/1.1 request to the APNs fake gets 505).

Usage, trio tests::

    async with FakeApns() as apns:                 # or: await nursery.start(apns.serve)
        ...
        recs = await apns.wait_for_async(1)

synchronous tests (the fake runs ``trio.run`` in a daemon thread)::

    with running(FakeFcm()) as fcm:                # or: fcm.start_in_thread() ... fcm.stop()
        fcm.write_service_account(tmp_path / "sa.json")
        ...
        fcm.wait_for(1)

Telling them what to answer: ``fake.script(device_token, *answers)`` queues answers
for one token (consumed one per well-formed request); ``fake.default = ...`` answers
every well-formed request whose queue is empty; ``fake.stop()`` closes the port (a
gateway that is down), and starting again reopens the same port.

Misbehaving at the connection level, as a provider's front end can:
``fake.fault(device_token, Fault.REFUSE_STREAM, ...)`` queues faults for one token
(``Fault`` from tests/pushwire.py: close after answering, GOAWAY below this stream,
refused stream, stall then reset, stall then close); ``fake.close_connections(goaway)``
closes the open connections (an idle close). A request the fake did not process is
not in ``fake.requests`` but in ``fake.not_processed``. The fakes serve HTTP/2 and
HTTP/1.1 over TLS with tests/pushwire.py, on the same h2/h11 state machines as
hypercorn.
"""

from __future__ import annotations

import collections
import datetime
import ipaddress
import json
import logging
import re
import secrets
import shutil
import socket
import ssl
import string
import tempfile
import threading
import time
import urllib.parse
import uuid
import weakref
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import jwt
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.pushwire import Fault, Handlers, WireRequest, WireResponse, WireServer

log = logging.getLogger("tests.pushfakes")

APNS_VOIP_MAX_PAYLOAD = 5120  # bytes, Apple: VoIP notifications
APNS_MAX_PAYLOAD = 4096  # bytes, Apple: other remote notifications
APNS_TOKEN_MAX_AGE = 3600.0  # s, Apple: "more than one hour old" -> ExpiredProviderToken
APNS_TOKEN_MIN_INTERVAL = 20 * 60.0  # s, Apple: refresh "no more than once every 20 minutes"
CLOCK_SKEW = 60.0  # s of "iat in the future" tolerated (not documented by either provider)
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"  # also grants FCM send
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_MAX_TTL = 28 * 24 * 3600  # s, Google: "The maximum time to live supported is 4 weeks"
FCM_MAX_DATA = 4096  # bytes of data keys + values, Google: "Message too big"

_A = TypeVar("_A", bound="_FakeServer")


# --------------------------------------------------------------------------- data


@dataclass
class Answer:
    """What a fake answers to one well-formed request.

    APNs: ``status`` + ``reason`` (Apple's reason string). FCM: ``reason`` is an FCM
    ``errorCode`` (UNREGISTERED ...) or a google.rpc status (UNAUTHENTICATED ...),
    and ``status`` may be None to take the documented HTTP status of that code.
    ``headers`` are added to the response (e.g. ``{"retry-after": "1"}``); ``delay``
    seconds pass before the answer is sent (a slow gateway); ``body`` replaces the
    JSON body entirely.
    """

    status: int | None = 200
    reason: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    body: Any = None


@dataclass
class Recorded:
    """One request a fake received, and what it answered."""

    method: str
    path: str
    http_version: str  # "2", "1.1"
    headers: dict[str, str]  # lower-case names; the last value when repeated
    raw_body: bytes
    received_at: float  # time.time(): wall clock, comparable with apns-expiration etc.
    received_mono: float  # time.monotonic(), comparable across threads/processes of this host
    received_trio: float  # trio.current_time() of the fake's trio run
    body: Any = None  # parsed JSON (None when not JSON)
    token: str = ""  # APNs device token / FCM message.token (or topic/condition)
    jwt_header: dict[str, Any] = field(default_factory=dict)  # APNs provider token / OAuth assertion
    jwt_claims: dict[str, Any] = field(default_factory=dict)
    access_token: str = ""  # FCM: the OAuth access token presented
    priority: Any = None  # APNs: int apns-priority (10 when absent); FCM: android.priority
    status: int = 0  # what the fake answered
    reason: str = ""  # APNs reason / FCM errorCode or status / OAuth error
    response_headers: dict[str, str] = field(default_factory=dict)
    response_body: Any = None
    scripted: bool = False  # True when the answer came from script()/default

    @property
    def topic(self) -> str | None:
        return self.headers.get("apns-topic")

    @property
    def push_type(self) -> str | None:
        return self.headers.get("apns-push-type")

    @property
    def expiration(self) -> int | None:
        v = self.headers.get("apns-expiration")
        return int(v) if v is not None and v.isdigit() else None

    @property
    def collapse_id(self) -> str | None:
        return self.headers.get("apns-collapse-id")

    @property
    def apns_id(self) -> str | None:
        return self.response_headers.get("apns-id")

    @property
    def message(self) -> dict[str, Any]:
        """FCM: the ``message`` object of the request body ({} when absent)."""
        if isinstance(self.body, dict) and isinstance(self.body.get("message"), dict):
            return self.body["message"]
        return {}


# The server (tests/pushwire.py) hands requests over and takes answers back in these.
_Request = WireRequest
_Response = WireResponse


# --------------------------------------------------------------------------- TLS


def _write_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate it signed, for 127.0.0.1 and localhost.

    Returns (ca_file, cert_file, key_file). A separate CA (rather than one
    self-signed leaf) keeps strict X.509 verification (VERIFY_X509_STRICT) happy.
    """
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pushfakes test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = directory / "ca.pem"
    cert_file = directory / "server.pem"
    key_file = directory / "server.key"
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    ca_file.write_bytes(ca_pem)
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + ca_pem)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_file.chmod(0o600)
    return ca_file, cert_file, key_file


def _reserve_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unverified_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a JWT without checking anything, {} for what won't parse."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        header = {}
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        claims = {}
    return dict(header), dict(claims)


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- server base


class _FakeServer:
    """Serving, recording, scripting and waiting shared by both fakes."""

    #: seconds a stalled request waits before Fault.STALL_THEN_RESET / STALL_THEN_CLOSE acts
    stall: float = 0.2

    def __init__(self, *, port: int = 0, workdir: str | Path | None = None) -> None:
        if workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="pushfake-"))
            # removed with the fake (or at exit), quietly
            self._cleanup: weakref.finalize | None = weakref.finalize(
                self, shutil.rmtree, str(self.workdir), ignore_errors=True
            )
        else:
            self._cleanup = None
            self.workdir = Path(workdir)
            self.workdir.mkdir(parents=True, exist_ok=True)
        ca, cert, key = _write_tls_files(self.workdir)
        self.ca_file: Path = ca
        self.cert_file: Path = cert
        self.key_file: Path = key
        # The port is chosen now (bound to 0, then released) so base_url, and files that
        # name it, exist before the server starts; stop/start keeps the same port.
        self.port: int = port or _reserve_port()
        self.requests: list[Recorded] = []
        self._cond = threading.Condition()
        self._scripts: dict[str, collections.deque[Answer]] = {}
        self._faults: dict[str, collections.deque[Fault]] = {}
        self.not_processed: list[tuple[str, Fault]] = []  # (token, fault) of requests never processed
        self._default: Answer | None = None
        self._wire: WireServer | None = None
        self._running = False
        self._shutdown: trio.Event | None = None
        self._stopped: trio.Event | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._loop_thread: int | None = None
        self._thread: threading.Thread | None = None
        self._exit_stack: AsyncExitStack | None = None

    # ---- addresses

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context trusting only this fake's CA (for httpx' ``verify=``)."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    @property
    def is_running(self) -> bool:
        return self._running

    # ---- scripting

    def _to_answer(self, spec: Any) -> Answer:
        raise NotImplementedError

    def script(self, token: str, *answers: Any) -> None:
        """Queue answers for requests to ``token``, one consumed per well-formed request;
        once the queue is empty the default (or success) applies again."""
        converted = [self._to_answer(a) for a in answers]
        with self._cond:
            self._scripts.setdefault(token, collections.deque()).extend(converted)

    def fault(self, token: str, *faults: Fault) -> None:
        """Queue connection-level misbehaviours for requests to ``token``
        (tests/pushwire.py's :class:`Fault`), one consumed per request; a request
        refused or above a GOAWAY is never processed, so it is not recorded (see
        :attr:`not_processed`), and its scripted answer stays queued."""
        with self._cond:
            self._faults.setdefault(token, collections.deque()).extend(faults)

    def _token_of(self, req: _Request) -> str:
        """The push target a request names (APNs: the path; FCM: message.token)."""
        raise NotImplementedError

    def _take_fault(self, req: _Request) -> Fault | None:
        with self._cond:
            if not self._faults:
                return None
            queue = self._faults.get(self._token_of(req))
            return queue.popleft() if queue else None

    def _note_not_processed(self, req: _Request, fault: Fault) -> None:
        with self._cond:
            self.not_processed.append((self._token_of(req), fault))
            self._cond.notify_all()

    def close_connections(self, goaway: bool = True) -> None:
        """Close the open HTTP/2 connections, with a GOAWAY (as a provider closing an
        idle connection does) or as a bare TCP close; the port stays open."""
        wire, token = self._wire, self._trio_token
        if wire is None or token is None:
            return
        if self._loop_thread == threading.get_ident():
            wire.close_connections(goaway)
        else:
            token.run_sync_soon(wire.close_connections, goaway)

    @property
    def connections_accepted(self) -> int:
        """TCP connections accepted since the fake started."""
        return self._wire.connections_accepted if self._wire is not None else 0

    @property
    def default(self) -> Answer | None:
        """The answer to every well-formed request with no scripted answer left
        (None: success). E.g. ``fake.default = (503, "ServiceUnavailable")``."""
        return self._default

    @default.setter
    def default(self, spec: Any) -> None:
        self._default = None if spec is None else self._to_answer(spec)

    def _next_answer(self, token: str) -> Answer | None:
        with self._cond:
            queue = self._scripts.get(token)
            if queue:
                return queue.popleft()
            return self._default

    def clear(self) -> None:
        """Forget recorded requests, scripts and the default."""
        with self._cond:
            self.requests.clear()
            self._scripts.clear()
            self._faults.clear()
            self.not_processed.clear()
            self._default = None

    # ---- recording / waiting

    def _record(self, rec: Recorded) -> None:
        with self._cond:
            self.requests.append(rec)
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = 5.0) -> list[Recorded]:
        """Block (threading) until at least ``n`` requests were recorded; return them all.
        Not from the trio thread the fake itself runs in (use wait_for_async there)."""
        if self._loop_thread == threading.get_ident():
            raise RuntimeError("wait_for() would block the fake's own trio loop: use wait_for_async()")
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(self._timeout_message(n, timeout))
                self._cond.wait(left)
            return list(self.requests)

    async def wait_for_async(self, n: int, timeout: float = 5.0) -> list[Recorded]:
        """Like wait_for, for trio code (the fake may run in this trio run or a thread)."""
        with trio.move_on_after(timeout):
            while True:
                with self._cond:
                    if len(self.requests) >= n:
                        return list(self.requests)
                await trio.sleep(0.005)
        raise TimeoutError(self._timeout_message(n, timeout))

    def _timeout_message(self, n: int, timeout: float) -> str:
        got = [f"{r.method} {r.path} -> {r.status} {r.reason}" for r in self.requests]
        return f"{type(self).__name__}: {len(got)} of {n} requests within {timeout} s: {got}"

    # ---- serving (trio)

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until stop() (or cancellation). ``await nursery.start(fake.serve)``
        returns base_url once the port is bound."""
        if self._running:
            raise RuntimeError(f"{type(self).__name__} is already running")
        self._shutdown = trio.Event()
        self._stopped = trio.Event()
        self._trio_token = trio.lowlevel.current_trio_token()
        self._loop_thread = threading.get_ident()
        shutdown = self._shutdown
        handlers = Handlers(fault=self._take_fault, answer=self._answer,
                            not_processed=self._note_not_processed, stall=lambda: self.stall)
        self._wire = WireServer(handlers, str(self.cert_file), str(self.key_file), self.port)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._wire.serve)
                self._running = True
                task_status.started(self.base_url)
                await shutdown.wait()
                nursery.cancel_scope.cancel()  # drop every connection: the gateway is down
        finally:
            self._running = False
            self._loop_thread = None
            self._stopped.set()

    async def __aenter__(self: _A) -> _A:
        stack = AsyncExitStack()
        nursery = await stack.enter_async_context(trio.open_nursery())
        await nursery.start(self.serve)
        self._exit_stack = stack
        return self

    async def __aexit__(self, *exc: object) -> None:
        stack, self._exit_stack = self._exit_stack, None
        self.stop()
        if stack is not None:
            await stack.__aexit__(None, None, None)

    async def stop_async(self) -> None:
        """Stop serving (close the port) and wait until it is closed (same trio run)."""
        self.stop()
        if self._stopped is not None:
            await self._stopped.wait()

    # ---- serving (thread, for synchronous tests)

    def start_in_thread(self: _A, timeout: float = 10.0) -> _A:
        """Run the fake in ``trio.run`` in a daemon thread; return once the port is bound."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError(f"{type(self).__name__} is already running in a thread")
        started = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.serve)
                    started.set()
            except BaseException as e:
                failure.append(e)
                raise
            finally:
                started.set()

        def run() -> None:
            try:
                trio.run(main)
            except BaseException:
                log.exception("%s thread failed", type(self).__name__)

        self._thread = threading.Thread(target=run, name=f"{type(self).__name__}-{self.port}", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise TimeoutError(f"{type(self).__name__} did not start within {timeout} s")
        if failure:
            raise RuntimeError(f"{type(self).__name__} failed to start") from failure[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving: the port closes and open connections drop (a gateway that is
        down). From any thread. Started in a thread: waits for the thread to end."""
        shutdown, token = self._shutdown, self._trio_token
        if shutdown is not None and not shutdown.is_set():
            if self._loop_thread == threading.get_ident() or token is None:
                shutdown.set()
            else:
                try:  # thread-safe, and works even from inside another trio run
                    token.run_sync_soon(shutdown.set)
                except trio.RunFinishedError:
                    pass
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            self._thread = None

    def __enter__(self: _A) -> _A:
        return self.start_in_thread()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def close(self) -> None:
        """Stop and delete the generated files (when the fake made its own tmp dir)."""
        self.stop()
        if self._cleanup is not None:
            self._cleanup()

    # ---- answering (called by tests/pushwire.py's server)

    def _answer(self, req: _Request) -> _Response:
        try:
            return self._handle(req)
        except Exception:
            log.exception("%s failed on %s %s", type(self).__name__, req.method, req.path)
            return _Response(500, {"content-type": "text/plain"}, b"fake failed, see log")

    def _new_record(self, req: _Request) -> Recorded:
        body: Any = None
        if req.body:
            try:
                body = json.loads(req.body)
            except ValueError:
                body = None
        return Recorded(
            method=req.method, path=req.path, http_version=req.http_version, headers=req.headers,
            raw_body=req.body, received_at=time.time(), received_mono=time.monotonic(),
            received_trio=trio.current_time(), body=body,
        )

    def _handle(self, req: _Request) -> _Response:
        raise NotImplementedError


@contextmanager
def running(fake: _A) -> Iterator[_A]:
    """``with running(FakeApns()) as apns:`` — serve in a daemon thread for the block."""
    fake.start_in_thread()
    try:
        yield fake
    finally:
        fake.stop()


# --------------------------------------------------------------------------- APNs

_APNS_PATH = re.compile(r"^/3/device/(?P<token>[^/]*)$")
_HEX = re.compile(r"^[0-9A-Fa-f]+$")
_CANONICAL_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# Apple's apns-push-type values ("Sending notification requests to APNs").
APNS_PUSH_TYPES = frozenset(
    {"alert", "background", "controls", "location", "voip", "complication", "fileprovider", "mdm",
     "liveactivity", "pushtotalk", "widgets"}
)

# The reasons of Apple's "Handling notification responses from APNs" table.
APNS_REASONS = frozenset(
    {"BadCollapseId", "BadDeviceToken", "BadExpirationDate", "BadMessageId", "BadPriority", "BadTopic",
     "DeviceTokenNotForTopic", "DuplicateHeaders", "IdleTimeout", "InvalidPushType", "MissingDeviceToken",
     "MissingTopic", "PayloadEmpty", "TopicDisallowed", "BadCertificate", "BadCertificateEnvironment",
     "ExpiredProviderToken", "Forbidden", "InvalidProviderToken", "MissingProviderToken",
     "UnrelatedKeyIdInToken", "BadEnvironmentKeyIdInToken", "BadPath", "MethodNotAllowed", "ExpiredToken",
     "Unregistered", "PayloadTooLarge", "TooManyProviderTokenUpdates", "TooManyRequests",
     "InternalServerError", "ServiceUnavailable", "Shutdown"}
)


def _random_apple_id() -> str:
    """A 10-character id like Apple's team and key ids."""
    return "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(10))


class FakeApns(_FakeServer):
    """Apple's APNs provider API (token-based authentication), on 127.0.0.1.

    ``topics``: the topics this team's key may push to (``apns-topic``).
    ``min_token_interval``: Apple's 20 minutes between provider-token changes; lower it
    in tests that legitimately make new tokens quickly.
    """

    def __init__(
        self,
        *,
        topics: set[str] | frozenset[str] | None = None,
        team_id: str | None = None,
        key_id: str | None = None,
        min_token_interval: float = APNS_TOKEN_MIN_INTERVAL,
        port: int = 0,
        workdir: str | Path | None = None,
    ) -> None:
        super().__init__(port=port, workdir=workdir)
        self.team_id = team_id or _random_apple_id()
        self.key_id = key_id or _random_apple_id()
        self.topics: set[str] = set(topics if topics is not None else {"com.example.app.voip"})
        self.min_token_interval = min_token_interval
        self.private_key = ec.generate_private_key(ec.SECP256R1())
        self.public_key = self.private_key.public_key()
        # Apple's .p8 file is the PKCS#8 PEM of the P-256 signing key.
        self.p8_pem: bytes = self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        # (iss, kid) -> (the provider token in use, monotonic time it was first seen)
        self._provider_tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self.provider_token_updates = 0  # distinct provider tokens accepted so far

    def write_p8(self, path: str | Path) -> Path:
        """Write the signing key as Apple hands it out; a directory gets AuthKey_<key id>.p8."""
        p = Path(path)
        if p.is_dir():
            p = p / f"AuthKey_{self.key_id}.p8"
        p.write_bytes(self.p8_pem)
        p.chmod(0o600)
        return p

    def make_provider_token(self, iat: float | None = None) -> str:
        """A valid provider token (for tests of the fake itself, not for the client)."""
        return jwt.encode(
            {"iss": self.team_id, "iat": int(time.time() if iat is None else iat)},
            self.private_key, algorithm="ES256", headers={"kid": self.key_id},
        )

    def _to_answer(self, spec: Any) -> Answer:
        if isinstance(spec, Answer):
            ans = spec
        elif isinstance(spec, int):
            ans = Answer(spec)
        elif isinstance(spec, tuple) and 1 <= len(spec) <= 3 and isinstance(spec[0], int):
            ans = Answer(spec[0], spec[1] if len(spec) > 1 else "", dict(spec[2]) if len(spec) > 2 else {})
        else:
            raise TypeError(f"not an APNs answer: {spec!r} (use (status, reason[, headers]) or Answer)")
        if ans.reason and ans.reason not in APNS_REASONS and ans.body is None:
            raise ValueError(f"{ans.reason!r} is not one of Apple's reasons (a typo?)")
        ans.headers = {k.lower(): str(v) for k, v in ans.headers.items()}
        return ans

    # ---- checks

    def _check_provider_token(self, req: _Request, rec: Recorded) -> tuple[int, str] | None:
        if req.header_count("authorization") > 1:
            return 400, "DuplicateHeaders"
        auth = req.headers.get("authorization", "").strip()
        if not auth:
            return 403, "MissingProviderToken"
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return 403, "InvalidProviderToken"
        rec.jwt_header, rec.jwt_claims = _unverified_jwt(token)
        header = rec.jwt_header
        if header.get("alg") != "ES256" or header.get("kid") != self.key_id:
            return 403, "InvalidProviderToken"
        try:
            claims = jwt.decode(
                token, self.public_key, algorithms=["ES256"],
                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False,
                         "verify_aud": False, "verify_iss": False},
            )
        except jwt.PyJWTError:
            return 403, "InvalidProviderToken"
        iat = claims.get("iat")
        if claims.get("iss") != self.team_id or not isinstance(iat, int | float) or isinstance(iat, bool):
            return 403, "InvalidProviderToken"
        now = time.time()
        if iat > now + CLOCK_SKEW:
            return 403, "InvalidProviderToken"
        if now - iat > APNS_TOKEN_MAX_AGE:
            return 403, "ExpiredProviderToken"
        # Apple: a provider token changed more often than every 20 minutes -> 429.
        key = (self.team_id, self.key_id)
        mono = time.monotonic()
        with self._cond:
            current = self._provider_tokens.get(key)
            if current is None or current[0] != token:
                if current is not None and mono - current[1] < self.min_token_interval:
                    return 429, "TooManyProviderTokenUpdates"
                self._provider_tokens[key] = (token, mono)
                self.provider_token_updates += 1
        return None

    def _check(self, req: _Request, rec: Recorded) -> tuple[int, str] | None:
        # Apple: "Use HTTP/2 and TLS 1.2 or later". What APNs answers to HTTP/1.x is not
        # documented; the fake answers 505 HTTP Version Not Supported.
        if not req.http_version.startswith("2"):
            return 505, "HTTP2Required"
        m = _APNS_PATH.match(req.path)
        if m is None:
            return 404, "BadPath"
        if req.method != "POST":
            return 405, "MethodNotAllowed"
        rec.token = m.group("token")
        for name in {k for k, _ in req.header_list if k.startswith("apns-")}:
            if req.header_count(name) > 1:
                return 400, "DuplicateHeaders"
        auth = self._check_provider_token(req, rec)
        if auth is not None:
            return auth
        h = req.headers
        topic = h.get("apns-topic")
        if not topic:  # required with token-based authentication
            return 400, "MissingTopic"
        if topic not in self.topics:
            return 400, "TopicDisallowed"
        if not rec.token:
            return 400, "MissingDeviceToken"
        if not _HEX.match(rec.token):
            return 400, "BadDeviceToken"
        push_type = h.get("apns-push-type")
        if topic.endswith(".voip"):
            if push_type != "voip":
                return 400, "InvalidPushType"
        elif push_type is not None and (push_type not in APNS_PUSH_TYPES or push_type == "voip"):
            return 400, "InvalidPushType"
        priority = h.get("apns-priority", "10")
        if priority not in ("10", "5", "1"):
            return 400, "BadPriority"
        rec.priority = int(priority)
        expiration = h.get("apns-expiration")
        if expiration is not None and not expiration.isdigit():
            return 400, "BadExpirationDate"
        apns_id = h.get("apns-id")
        if apns_id is not None and not _CANONICAL_UUID.match(apns_id):
            return 400, "BadMessageId"
        collapse_id = h.get("apns-collapse-id")
        if collapse_id is not None and len(collapse_id.encode()) > 64:
            return 400, "BadCollapseId"
        if not req.body:
            return 400, "PayloadEmpty"
        limit = APNS_VOIP_MAX_PAYLOAD if push_type == "voip" else APNS_MAX_PAYLOAD
        if len(req.body) > limit:
            return 413, "PayloadTooLarge"
        if not isinstance(rec.body, dict):
            # Apple documents no reason for a payload that is not a JSON dictionary;
            # the fake answers 400 "BadPayload".
            return 400, "BadPayload"
        return None

    def _token_of(self, req: _Request) -> str:
        m = _APNS_PATH.match(req.path)
        return m.group("token") if m else ""

    def _handle(self, req: _Request) -> _Response:
        rec = self._new_record(req)
        failed = self._check(req, rec)
        if failed is not None:
            answer = Answer(*failed)
        else:
            scripted = self._next_answer(rec.token)
            rec.scripted = scripted is not None
            answer = scripted or Answer(200)
            if answer.reason in ("ExpiredProviderToken", "InvalidProviderToken"):
                # The client was told its token is bad: its next, new token is no "update".
                with self._cond:
                    self._provider_tokens.pop((self.team_id, self.key_id), None)
        status = answer.status or 200
        apns_id = req.headers.get("apns-id")
        if apns_id is None or not _CANONICAL_UUID.match(apns_id):
            apns_id = str(uuid.uuid4())
        headers = {"apns-id": apns_id}
        body: bytes = b""
        response_body: Any = None
        if answer.body is not None:
            response_body = answer.body
        elif status != 200:
            response_body = {"reason": answer.reason}
            if status == 410:  # Apple: ms since the Epoch the token became invalid for the topic
                response_body["timestamp"] = int(time.time() * 1000)
        if response_body is not None:
            body = _json_bytes(response_body)
            headers["content-type"] = "application/json"
        headers.update(answer.headers)
        rec.status, rec.reason = status, answer.reason
        rec.response_headers, rec.response_body = headers, response_body
        self._record(rec)
        return _Response(status, headers, body, answer.delay)


# --------------------------------------------------------------------------- FCM

_FCM_SEND_PATH = re.compile(r"^/v1/projects/(?P<project>[^/]+)/messages:send$")
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
# Google's FCM ErrorCode table: errorCode -> (HTTP status, google.rpc status, message).
# The messages are the ones Google's API is seen to send; clients must not depend on them.
FCM_ERRORS: dict[str, tuple[int, str, str]] = {
    "UNREGISTERED": (404, "NOT_FOUND", "Requested entity was not found."),
    "INVALID_ARGUMENT": (
        400, "INVALID_ARGUMENT", "The registration token is not a valid FCM registration token"
    ),
    "SENDER_ID_MISMATCH": (403, "PERMISSION_DENIED", "SenderId mismatch"),
    "QUOTA_EXCEEDED": (429, "RESOURCE_EXHAUSTED", "Quota exceeded for sending messages."),
    "UNAVAILABLE": (503, "UNAVAILABLE", "The service is currently unavailable."),
    "INTERNAL": (500, "INTERNAL", "Internal error encountered."),
    "THIRD_PARTY_AUTH_ERROR": (401, "UNAUTHENTICATED", "Auth error from APNS or Web Push Service"),
    "UNSPECIFIED_ERROR": (500, "UNKNOWN", "Unknown error."),
}
# google.rpc statuses without an FcmError detail (e.g. the access token was rejected).
RPC_ERRORS: dict[str, tuple[int, str]] = {
    "UNAUTHENTICATED": (401, "Request had invalid authentication credentials. Expected OAuth 2 access "
                             "token, login cookie or other valid authentication credential."),
    "PERMISSION_DENIED": (403, "The caller does not have permission"),
    "NOT_FOUND": (404, "Requested entity was not found."),
    "RESOURCE_EXHAUSTED": (429, "Resource has been exhausted (e.g. check quota)."),
    "UNAVAILABLE": (503, "The service is currently unavailable."),
    "INTERNAL": (500, "Internal error encountered."),
    "INVALID_ARGUMENT": (400, "Request contains an invalid argument."),
}
# Names Google's JSON parser accepts in a message (proto field names and their lowerCamelCase).
_MESSAGE_FIELDS = {"name", "data", "notification", "android", "webpush", "apns", "fcm_options",
                   "fcmOptions", "token", "topic", "condition"}
_ANDROID_FIELDS = {"collapse_key", "collapseKey", "priority", "ttl", "restricted_package_name",
                   "restrictedPackageName", "data", "notification", "fcm_options", "fcmOptions",
                   "direct_boot_ok", "directBootOk", "bandwidth_constrained_ok", "bandwidthConstrainedOk",
                   "restricted_satellite_ok", "restrictedSatelliteOk"}
_DURATION = re.compile(r"^\d+(\.\d{1,9})?s$")
_FCM_TOKEN = re.compile(r"^[A-Za-z0-9_:.\-]+$")
_FCM_TOPIC = re.compile(r"^[a-zA-Z0-9\-_.~%]+$")  # Google's topic name pattern


class _Invalid(Exception):
    """An INVALID_ARGUMENT (400) answer."""

    def __init__(self, message: str, field_path: str | None = None, fcm: bool = False) -> None:
        super().__init__(message)
        self.message, self.field_path, self.fcm = message, field_path, fcm


class FakeFcm(_FakeServer):
    """Google's FCM HTTP v1 API and OAuth 2.0 token endpoint (``<base_url>/token``).

    ``project_id``: the Firebase project the service account belongs to.
    ``token_lifetime``: seconds an access token lives (Google: ``expires_in`` 3599).
    ``private_key``: the service account's RSA key (default: a new 2048-bit one).
    """

    def __init__(
        self,
        *,
        project_id: str = "pbx-relay-test",
        token_lifetime: int = 3599,
        private_key: rsa.RSAPrivateKey | None = None,
        port: int = 0,
        workdir: str | Path | None = None,
    ) -> None:
        super().__init__(port=port, workdir=workdir)
        self.project_id = project_id
        self.token_lifetime = token_lifetime
        # A new RSA key costs ~0.1 s; many tests may pass one key made once.
        self.private_key = private_key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_key = self.private_key.public_key()
        self.private_key_id = secrets.token_hex(20)
        self.client_email = f"firebase-adminsdk-fake@{project_id}.iam.gserviceaccount.com"
        self.client_id = str(secrets.randbelow(10**21 - 10**20) + 10**20)
        # access token -> (monotonic expiry, granted scopes)
        self._access_tokens: dict[str, tuple[float, frozenset[str]]] = {}
        self.auth_requests: list[Recorded] = []  # every POST /token, with its answer
        self._token_script: collections.deque[Answer] = collections.deque()

    @property
    def token_uri(self) -> str:
        return f"{self.base_url}/token"

    @property
    def service_account(self) -> dict[str, str]:
        """The service-account key file's content, as the Firebase console hands it out."""
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        return {
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": self.private_key_id,
            "private_key": pem,
            "client_email": self.client_email,
            "client_id": self.client_id,
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/"
            + urllib.parse.quote(self.client_email),
            "universe_domain": "googleapis.com",
        }

    def write_service_account(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(json.dumps(self.service_account, indent=2))
        p.chmod(0o600)
        return p

    @property
    def token_requests(self) -> int:
        """How many times the token endpoint was asked for an access token."""
        with self._cond:
            return len(self.auth_requests)

    def expire_tokens(self) -> None:
        """Make every access token issued so far invalid (a 401 on the next send)."""
        with self._cond:
            self._access_tokens.clear()

    def issue_access_token(self, scopes: frozenset[str] = frozenset({FCM_SCOPE})) -> str:
        """An access token without going through /token (for tests of the fake itself)."""
        token = "ya29.fake-" + secrets.token_urlsafe(24)
        with self._cond:
            self._access_tokens[token] = (time.monotonic() + self.token_lifetime, scopes)
        return token

    def make_assertion(self, **overrides: Any) -> str:
        """A valid OAuth JWT assertion (for tests of the fake itself); claims overridable."""
        now = int(time.time())
        claims = {"iss": self.client_email, "scope": FCM_SCOPE, "aud": self.token_uri,
                  "iat": now, "exp": now + 3600}
        claims.update(overrides)
        return jwt.encode(claims, self.private_key, algorithm="RS256",
                          headers={"kid": self.private_key_id})

    def script_token(self, *answers: Any) -> None:
        """Queue answers for the token endpoint: (status, error) e.g. (503, "unavailable"),
        or Answer; consumed one per well-formed token request."""
        for a in answers:
            if isinstance(a, Answer):
                ans = a
            elif isinstance(a, tuple) and len(a) in (2, 3):
                ans = Answer(a[0], a[1], dict(a[2]) if len(a) == 3 else {})
            else:
                raise TypeError(f"not a token-endpoint answer: {a!r}")
            with self._cond:
                self._token_script.append(ans)

    def _to_answer(self, spec: Any) -> Answer:
        if isinstance(spec, Answer):
            ans = spec
        elif isinstance(spec, str):
            ans = Answer(None, spec)
        elif isinstance(spec, tuple) and spec and isinstance(spec[0], str):
            ans = Answer(None, spec[0], dict(spec[1]) if len(spec) > 1 else {})
        elif isinstance(spec, tuple) and spec and isinstance(spec[0], int):
            ans = Answer(spec[0], spec[1] if len(spec) > 1 else "", dict(spec[2]) if len(spec) > 2 else {})
        else:
            raise TypeError(f"not an FCM answer: {spec!r} (use 'UNREGISTERED', (code, headers) or Answer)")
        ans.headers = {k.lower(): str(v) for k, v in ans.headers.items()}
        known = ans.reason in FCM_ERRORS or ans.reason in RPC_ERRORS or ans.reason in ("", "OK")
        if not known:
            raise ValueError(f"unknown FCM error code {ans.reason!r}")
        if ans.status is None:
            if ans.reason in FCM_ERRORS:
                ans.status = FCM_ERRORS[ans.reason][0]
            elif ans.reason in RPC_ERRORS:
                ans.status = RPC_ERRORS[ans.reason][0]
            else:
                ans.status = 200
        return ans

    # ---- routing

    def _token_of(self, req: _Request) -> str:
        try:
            message = json.loads(req.body).get("message")
        except (ValueError, AttributeError):
            return ""
        return str(message.get("token", "")) if isinstance(message, dict) else ""

    def _handle(self, req: _Request) -> _Response:
        if req.path == "/token":
            return self._handle_token(req)
        return self._handle_send(req)

    # ---- OAuth token endpoint

    def _token_error(self, rec: Recorded, status: int, error: str, description: str,
                     headers: dict[str, str] | None = None, delay: float = 0.0) -> _Response:
        body = {"error": error, "error_description": description}
        hdrs = {"content-type": "application/json; charset=utf-8", **(headers or {})}
        rec.status, rec.reason, rec.response_body, rec.response_headers = status, error, body, hdrs
        self._record_auth(rec)
        return _Response(status, hdrs, _json_bytes(body), delay)

    def _record_auth(self, rec: Recorded) -> None:
        with self._cond:
            self.auth_requests.append(rec)
            self._cond.notify_all()

    def _handle_token(self, req: _Request) -> _Response:
        rec = self._new_record(req)
        if req.method != "POST":
            return self._token_error(rec, 405, "invalid_request", "Only POST is supported")
        ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
        form = urllib.parse.parse_qs(req.body.decode("latin-1")) if ctype == (
            "application/x-www-form-urlencoded") else {}
        rec.body = {k: v[0] for k, v in form.items()}
        grant_type = rec.body.get("grant_type")
        if not grant_type:
            return self._token_error(rec, 400, "invalid_request", "Required parameter is missing: grant_type")
        if grant_type != JWT_BEARER_GRANT:
            return self._token_error(rec, 400, "unsupported_grant_type", f"Invalid grant_type: {grant_type}")
        assertion = rec.body.get("assertion", "")
        if not assertion:
            return self._token_error(rec, 400, "invalid_request", "Required parameter is missing: assertion")
        rec.jwt_header, rec.jwt_claims = _unverified_jwt(assertion)
        header = rec.jwt_header
        if header.get("alg") != "RS256" or ("kid" in header and header["kid"] != self.private_key_id):
            return self._token_error(rec, 400, "invalid_grant", "Invalid JWT Signature.")
        try:
            claims = jwt.decode(
                assertion, self.public_key, algorithms=["RS256"],
                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False,
                         "verify_aud": False, "verify_iss": False},
            )
        except jwt.PyJWTError:
            return self._token_error(rec, 400, "invalid_grant", "Invalid JWT Signature.")
        if claims.get("iss") != self.client_email:
            return self._token_error(rec, 400, "invalid_grant", "Invalid grant: account not found")
        if claims.get("aud") != self.token_uri:
            return self._token_error(rec, 400, "invalid_grant", "Invalid JWT: Failed audience check.")
        iat, exp = claims.get("iat"), claims.get("exp")
        now = time.time()
        if (
            not isinstance(iat, int | float) or not isinstance(exp, int | float)
            or exp - iat > 3600 or exp <= iat or exp < now or iat > now + CLOCK_SKEW
        ):
            return self._token_error(
                rec, 400, "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable "
                "timeframe. Check your iat and exp values in the JWT claim.",
            )
        scope = claims.get("scope")
        if not isinstance(scope, str) or not scope.split():
            # Google asks for a scope (or a target_audience, which FCM cannot use).
            return self._token_error(rec, 400, "invalid_scope",
                                     "Invalid OAuth scope or ID token audience provided.")
        with self._cond:
            scripted = self._token_script.popleft() if self._token_script else None
        if scripted is not None and (scripted.status or 200) != 200:
            rec.scripted = True
            return self._token_error(rec, scripted.status or 400, scripted.reason or "invalid_grant",
                                     f"scripted {scripted.reason}", scripted.headers, scripted.delay)
        # The token endpoint grants whatever scopes were asked; the FCM send checks them.
        token = self.issue_access_token(frozenset(scope.split()))
        body = {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"}
        hdrs = {"content-type": "application/json; charset=utf-8", "cache-control": "no-store"}
        rec.status, rec.response_body, rec.response_headers = 200, body, hdrs
        rec.scripted = scripted is not None
        self._record_auth(rec)
        return _Response(200, hdrs, _json_bytes(body), scripted.delay if scripted else 0.0)

    # ---- messages:send

    def _rpc_error(self, code: int, status: str, message: str,
                   details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        err: dict[str, Any] = {"code": code, "message": message, "status": status}
        if details:
            err["details"] = details
        return {"error": err}

    def _finish(self, rec: Recorded, status: int, body: Any, reason: str = "",
                headers: dict[str, str] | None = None, delay: float = 0.0) -> _Response:
        hdrs = {"content-type": "application/json; charset=UTF-8", **(headers or {})}
        rec.status, rec.reason, rec.response_body, rec.response_headers = status, reason, body, hdrs
        self._record(rec)
        return _Response(status, hdrs, _json_bytes(body), delay)

    def _handle_send(self, req: _Request) -> _Response:
        rec = self._new_record(req)
        m = _FCM_SEND_PATH.match(req.path)
        if m is None or req.method != "POST":
            body = self._rpc_error(404, "NOT_FOUND", "Method not found.")
            return self._finish(rec, 404, body, "NOT_FOUND")
        # Authorization: Bearer <OAuth 2.0 access token from the token endpoint>
        auth = req.headers.get("authorization", "").strip()
        scheme, _, access = auth.partition(" ")
        access = access.strip()
        rec.access_token = access
        www = {"www-authenticate": 'Bearer realm="https://accounts.google.com/"'}
        if not auth:
            body = self._rpc_error(
                401, "UNAUTHENTICATED",
                "Request is missing required authentication credential. Expected OAuth 2 access token, "
                "login cookie or other valid authentication credential.",
            )
            return self._finish(rec, 401, body, "UNAUTHENTICATED", www)
        with self._cond:
            grant = self._access_tokens.get(access) if scheme.lower() == "bearer" else None
        if grant is None or grant[0] <= time.monotonic():
            body = self._rpc_error(401, "UNAUTHENTICATED", RPC_ERRORS["UNAUTHENTICATED"][1])
            hdrs = {"www-authenticate": www["www-authenticate"] + ', error="invalid_token"'}
            return self._finish(rec, 401, body, "UNAUTHENTICATED", hdrs)
        if not grant[1] & {FCM_SCOPE, CLOUD_PLATFORM_SCOPE}:
            body = self._rpc_error(
                403, "PERMISSION_DENIED", "Request had insufficient authentication scopes.",
                [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                  "reason": "ACCESS_TOKEN_SCOPE_INSUFFICIENT", "domain": "googleapis.com"}],
            )
            return self._finish(rec, 403, body, "PERMISSION_DENIED", {
                "www-authenticate": www["www-authenticate"] + ', error="insufficient_scope"'})
        project = urllib.parse.unquote(m.group("project"))
        if project != self.project_id:
            body = self._rpc_error(
                403, "PERMISSION_DENIED",
                f"Permission 'cloudmessaging.messages.create' denied on resource "
                f"'//cloudresourcemanager.googleapis.com/projects/{project}' (or it may not exist).",
            )
            return self._finish(rec, 403, body, "PERMISSION_DENIED")
        try:
            message = self._check_message(rec)
        except _Invalid as e:
            if e.fcm:
                details = [{"@type": FCM_ERROR_TYPE, "errorCode": "INVALID_ARGUMENT"}]
            else:
                violation = {"field": e.field_path or "message", "description": e.message}
                details = [{"@type": BAD_REQUEST_TYPE, "fieldViolations": [violation]}]
            body = self._rpc_error(400, "INVALID_ARGUMENT", e.message, details)
            return self._finish(rec, 400, body, "INVALID_ARGUMENT")
        target = message.get("token") or message.get("topic") or message.get("condition") or ""
        rec.token = target
        scripted = self._next_answer(target)
        rec.scripted = scripted is not None
        if scripted is not None and scripted.status != 200:
            if scripted.body is not None:
                body = scripted.body
            elif scripted.reason in FCM_ERRORS:
                _, status, text = FCM_ERRORS[scripted.reason]
                body = self._rpc_error(scripted.status or 500, status, text,
                                       [{"@type": FCM_ERROR_TYPE, "errorCode": scripted.reason}])
            else:
                text = RPC_ERRORS.get(scripted.reason, (0, scripted.reason))[1]
                body = self._rpc_error(scripted.status or 500, scripted.reason or "UNKNOWN", text)
            return self._finish(rec, scripted.status or 500, body, scripted.reason,
                                scripted.headers, scripted.delay)
        msg_id = f"0:{int(time.time() * 1000)}%{secrets.token_hex(8)}"
        body = {"name": f"projects/{self.project_id}/messages/{msg_id}"}
        return self._finish(rec, 200, body, "", scripted.headers if scripted else None,
                            scripted.delay if scripted else 0.0)

    def _check_message(self, rec: Recorded) -> dict[str, Any]:
        """Google's checks of a send request's body; raises _Invalid (400 INVALID_ARGUMENT)."""
        if rec.body is None:
            raise _Invalid("Invalid JSON payload received. Unexpected token.")
        if not isinstance(rec.body, dict):
            raise _Invalid("Invalid JSON payload received. Expected an object.")
        for name in rec.body:
            if name not in ("message", "validate_only", "validateOnly"):
                raise _Invalid(f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.')
        message = rec.body.get("message")
        if not isinstance(message, dict):
            raise _Invalid("Request contains an invalid argument.", "message")
        for name in message:
            if name not in _MESSAGE_FIELDS:
                raise _Invalid(f'Invalid JSON payload received. Unknown name "{name}" at \'message\': '
                               "Cannot find field.", "message")
        targets = [k for k in ("token", "topic", "condition") if message.get(k) not in (None, "")]
        if not targets:
            raise _Invalid("Recipient of the message is not set.", "message", fcm=True)
        if len(targets) > 1:
            raise _Invalid(f"Invalid value at 'message' (oneof), oneof field 'target' is already set. "
                           f"Cannot set '{targets[1]}'", "message")
        for k in targets:
            if not isinstance(message[k], str):
                raise _Invalid(f"Invalid value at 'message.{k}' (TYPE_STRING), {json.dumps(message[k])}",
                               f"message.{k}")
        if "token" in targets and not _FCM_TOKEN.match(message["token"]):
            raise _Invalid("The registration token is not a valid FCM registration token", fcm=True)
        if "topic" in targets and not _FCM_TOPIC.match(message["topic"]):
            # Also catches a "/topics/" prefix, which the v1 API does not take.
            raise _Invalid("Invalid value at 'message.topic'", "message.topic", fcm=True)
        data_size = self._check_string_map(message, "data", "message")
        android = message.get("android")
        if android is not None:
            if not isinstance(android, dict):
                raise _Invalid("Invalid value at 'message.android'", "message.android")
            for name in android:
                if name not in _ANDROID_FIELDS:
                    raise _Invalid(f'Invalid JSON payload received. Unknown name "{name}" at '
                                   "'message.android': Cannot find field.", "message.android")
            data_size += self._check_string_map(android, "data", "message.android")
            priority = android.get("priority")
            if priority is not None:
                if not isinstance(priority, str) or priority.upper() not in ("NORMAL", "HIGH"):
                    raise _Invalid(
                        "Invalid value at 'message.android.priority' "
                        f"(type.googleapis.com/google.firebase.fcm.v1.AndroidMessagePriority), "
                        f"{json.dumps(priority)}", "message.android.priority")
                rec.priority = priority
            ttl = android.get("ttl")
            if ttl is not None:
                if not isinstance(ttl, str) or not _DURATION.match(ttl):
                    raise _Invalid(
                        "Invalid value at 'message.android.ttl' "
                        f"(type.googleapis.com/google.protobuf.Duration), {json.dumps(ttl)}",
                        "message.android.ttl")
                if float(ttl[:-1]) > FCM_MAX_TTL:
                    raise _Invalid("Invalid TTL: must be at most 4 weeks", "message.android.ttl", fcm=True)
        for section in ("apns", "webpush"):
            block = message.get(section)
            if block is not None:
                if not isinstance(block, dict):
                    raise _Invalid(f"Invalid value at 'message.{section}'", f"message.{section}")
                self._check_string_map(block, "headers", f"message.{section}")
        if data_size > FCM_MAX_DATA:
            raise _Invalid("Message too big: data exceeds 4096 bytes", "message.data", fcm=True)
        return message

    @staticmethod
    def _check_string_map(parent: dict[str, Any], name: str, where: str) -> int:
        """A protobuf map<string, string>: every value a JSON string. Returns its size in bytes."""
        value = parent.get(name)
        if value is None:
            return 0
        if not isinstance(value, dict):
            raise _Invalid(f"Invalid value at '{where}.{name}'", f"{where}.{name}")
        size = 0
        for i, (k, v) in enumerate(value.items()):
            if not isinstance(v, str):
                raise _Invalid(f"Invalid value at '{where}.{name}[{i}].value' (TYPE_STRING), {json.dumps(v)}",
                               f"{where}.{name}[{i}].value")
            if name == "data" and (k in ("from", "gcm") or k.startswith("google")):
                # Google: keys used internally by FCM are invalid data keys.
                raise _Invalid(f"Invalid data key: {k!r} is reserved", f"{where}.{name}", fcm=True)
            size += len(k.encode()) + len(v.encode())
        return size


__all__ = [
    "APNS_MAX_PAYLOAD", "APNS_REASONS", "APNS_VOIP_MAX_PAYLOAD", "Answer", "FCM_ERRORS", "FCM_SCOPE",
    "FakeApns", "FakeFcm", "Fault", "Recorded", "running",
]
