"""The push service's HTTP API (JWT bearer, JSON) and its unauthenticated admin endpoint.

Who may do what — the token's ``scope`` claim:

- ``relay``: the SIP relay. Registers and unregisters devices, wakes them.
- ``pbx``: one PBX, named by the ``serial`` claim. The same verbs as the relay and the
  privacy verbs, but only for devices and users of its own serial.
- ``operator``: everything, including listing devices and per-user export/erase.

A device is a push target (provider, token, param) registered by one user (``username``)
at one PBX (``serial``): its id covers all five, so the verbs that name a device by its
target (unregister, wake) take ``serial`` and ``username`` too, and a PBX registering a
token that another PBX also uses gets its own device, never the other's.

Tokens are HS256 JWTs (RFC 7519) signed with the API secret; ``exp`` is required.
Errors follow RFC 6750 §3: 401 with ``WWW-Authenticate: Bearer`` for a missing, bad or
expired token, 403 ``insufficient_scope`` when the token does not allow the request.
Every error body is ``{"error": "<message>"}``. Logs name devices by their id only:
no push token and no JWT ever reaches a log line.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import jwt
import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pbxcore.admin import AdminAnswer, AdminRequest, Routes
from pbxcore.metrics import CONTENT_TYPE
from pbxcore.wire import (
    MAX_FIELD,
    WakeResult,
    WireError,
    device_ref_from_json,
    device_update_from_json,
    digits,
    number,
    wake_request_from_json,
    wake_result_json,
)
from push.service import PushError, PushService, WakeRequest
from push.store import Device, StoreUnavailable

log = logging.getLogger("push.api")

SCOPES = ("relay", "pbx", "operator")
ALGORITHM = "HS256"
REALM = "pbx-push"
# Largest request body. A device registration or a wake is a few hundred bytes even
# with a 4 KiB token; 16 KiB is h11's default buffer (and nginx's client_body_buffer_size
# on 64-bit), far above any legitimate request, small enough that a flood costs nothing.
MAX_BODY = 16 * 1024
# Leeway for exp/nbf against the verifier's clock (RFC 7519 §4.1.4 allows "some small leeway").
CLOCK_LEEWAY = 30.0
READY_TIMEOUT = 2.0  # seconds /readyz waits for the store


class ApiError(Exception):
    """An HTTP error with a JSON body ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _unauthorized(message: str, error: str | None = "invalid_token") -> ApiError:
    challenge = f'Bearer realm="{REALM}"' + (f', error="{error}"' if error else "")
    return ApiError(401, message, {"WWW-Authenticate": challenge})


def _forbidden(message: str) -> ApiError:
    return ApiError(403, message, {"WWW-Authenticate": f'Bearer realm="{REALM}", error="insufficient_scope"'})


# ------------------------------------------------------------------ tokens


def mint_token(
    secret: bytes | str, scope: str, sub: str, serial: str | None = None, ttl: int = 3600,
    *, now: float | None = None,
) -> str:
    """A bearer token for the API: HS256, ``scope``/``sub``/``iat``/``exp`` (+ ``serial``)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
    if scope == "pbx" and not serial:
        raise ValueError("a pbx token needs the PBX's serial")
    if ttl <= 0:
        raise ValueError("ttl must be > 0 seconds")
    iat = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"scope": scope, "sub": sub, "iat": iat, "exp": iat + int(ttl)}
    if serial:
        claims["serial"] = serial
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


@dataclass(frozen=True, slots=True)
class Claims:
    scope: str
    sub: str
    serial: str | None  # set for pbx tokens

    def may(self, *scopes: str) -> bool:
        return self.scope in scopes


def verify_token(secret: bytes | str, token: str, now: float) -> Claims:
    """Claims of a valid token, else :class:`ApiError` 401. Time is checked against
    ``now`` (the API's clock), not pyjwt's."""
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM],
            options={"require": ["exp", "scope", "sub"], "verify_exp": False, "verify_nbf": False,
                     "verify_iat": False},
        )
    except jwt.InvalidTokenError as e:
        raise _unauthorized(f"invalid token: {_jwt_reason(e)}") from None
    exp, nbf = claims.get("exp"), claims.get("nbf")
    if not isinstance(exp, int | float) or not number(exp):
        raise _unauthorized("invalid token: exp is not a number")
    if exp + CLOCK_LEEWAY <= now:
        raise _unauthorized("token expired")
    if nbf is not None and (not number(nbf) or nbf - CLOCK_LEEWAY > now):
        raise _unauthorized("token not valid yet")
    scope, sub, serial = claims.get("scope"), claims.get("sub"), claims.get("serial")
    if scope not in SCOPES:
        raise _unauthorized(f"invalid token: scope must be one of {', '.join(SCOPES)}")
    if not isinstance(sub, str):
        raise _unauthorized("invalid token: sub is not a string")
    if scope == "pbx":
        if not isinstance(serial, str) or not serial:
            raise _unauthorized("invalid token: a pbx token needs a serial")
        return Claims(scope, sub, serial)
    return Claims(scope, sub, None)


def _jwt_reason(e: jwt.InvalidTokenError) -> str:
    # pyjwt's messages never echo the token; keep them short and fixed.
    if isinstance(e, jwt.InvalidSignatureError):
        return "bad signature"
    if isinstance(e, jwt.MissingRequiredClaimError):
        return f"missing claim {e.claim}"
    if isinstance(e, jwt.InvalidAlgorithmError):
        return f"algorithm must be {ALGORITHM}"
    if isinstance(e, jwt.DecodeError):
        return "not a JWT"
    return type(e).__name__


# ------------------------------------------------------------------ input


async def _json_body(request: Request) -> dict[str, Any]:
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "Content-Type must be application/json")
    length = request.headers.get("content-length")
    if length is not None and digits(length) and int(length) > MAX_BODY:
        raise ApiError(413, f"body larger than {MAX_BODY} bytes")
    body = bytearray()
    async with aclosing(request.stream()) as chunks:  # closed at once when we stop early
        async for chunk in chunks:
            body += chunk
            if len(body) > MAX_BODY:
                raise ApiError(413, f"body larger than {MAX_BODY} bytes")
    try:
        data = json.loads(bytes(body), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise ApiError(400, "body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "body must be a JSON object")
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _segment(value: str, what: str) -> str:
    if not value or len(value) > MAX_FIELD[what]:
        raise ApiError(400, f"{what} must be 1..{MAX_FIELD[what]} characters")
    return value


# ------------------------------------------------------------------ the API


class _Handlers:
    """The API's routes over one service; each checks the bearer token's scope itself."""

    def __init__(self, service: PushService, secret: bytes | str, clock: Callable[[], float]):
        self.service = service
        self.secret = secret
        self.clock = clock

    def claims_of(self, request: Request) -> Claims:
        auth = request.headers.get("authorization")
        if not auth:
            raise _unauthorized("missing bearer token (Authorization: Bearer <jwt>)", error=None)
        kind, _, token = auth.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise _unauthorized("Authorization must be 'Bearer <jwt>'", error="invalid_request")
        return verify_token(self.secret, token.strip(), self.clock())

    def need(self, claims: Claims, *scopes: str) -> None:
        if not claims.may(*scopes):
            raise _forbidden(f"a {claims.scope} token may not do this (needs {' or '.join(scopes)})")

    def own_serial(self, claims: Claims, serial: str) -> None:
        if claims.scope == "pbx" and serial != claims.serial:
            raise _forbidden("a pbx token may only touch its own serial's devices and users")

    async def device_or_404(self, device_id: str) -> Device:
        device = await self.service.store.get_device(_segment(device_id, "device_id"))
        if device is None:
            raise ApiError(404, "no such device")
        return device

    async def put_device(self, request: Request) -> Response:
        claims = self.claims_of(request)
        self.need(claims, "relay", "pbx", "operator")
        update = device_update_from_json(await _json_body(request))
        self.own_serial(claims, update.serial)
        device = await self.service.register_device(update)
        return JSONResponse({"device_id": device.device_id})

    async def unregister_device(self, request: Request) -> Response:
        claims = self.claims_of(request)
        self.need(claims, "relay", "pbx", "operator")
        ref = device_ref_from_json(await _json_body(request))
        self.own_serial(claims, ref.serial)
        device_id = self.service.device_id(ref.target, ref.serial, ref.username)
        return JSONResponse({"deleted": await self.service.unregister_device(device_id)})

    async def list_devices(self, request: Request) -> Response:
        claims = self.claims_of(request)
        self.need(claims, "pbx", "operator")
        serial = request.query_params.get("serial") or None
        username = request.query_params.get("username") or None
        if claims.scope == "pbx":
            if serial is not None:
                self.own_serial(claims, serial)
            serial = claims.serial
        return JSONResponse([d.public() for d in await self.service.store.devices(serial, username)])

    async def get_device(self, request: Request) -> Response:
        claims = self.claims_of(request)
        self.need(claims, "pbx", "operator")
        device = await self.device_or_404(request.path_params["device_id"])
        self.own_serial(claims, device.serial)
        return JSONResponse(device.public())

    async def delete_device(self, request: Request) -> Response:
        claims = self.claims_of(request)
        self.need(claims, "pbx", "operator")
        device = await self.device_or_404(request.path_params["device_id"])
        self.own_serial(claims, device.serial)
        why = "operator" if claims.scope == "operator" else "pbx"
        deleted = await self.service.unregister_device(device.device_id, why)
        if not deleted:
            raise ApiError(404, "no such device")
        return JSONResponse({"deleted": True})

    async def wake(self, request: Request) -> Response:
        claims = self.claims_of(request)
        self.need(claims, "relay", "pbx", "operator")
        wire = wake_request_from_json(await _json_body(request))
        device_id = wire.resolve(self.service.key)
        serial = wire.serial
        if claims.scope == "pbx":
            if serial:
                self.own_serial(claims, serial)
            serial = claims.serial or ""  # the service wakes none of another PBX's devices
            device = await self.service.store.get_device(device_id)
            if device is not None:
                self.own_serial(claims, device.serial)
        result = await self.service.wake(WakeRequest(
            device_id=device_id, call_id=wire.call_id, caller=wire.caller, callee=wire.callee, src=wire.src,
            ring_timeout=wire.ring_timeout, serial=serial))
        return JSONResponse(wake_result_json(WakeResult(
            device_id, result.outcome, result.status, result.reason, result.attempts, result.latency_ms)))

    def user_of(self, request: Request, claims: Claims) -> tuple[str, str]:
        self.need(claims, "pbx", "operator")
        serial = _segment(request.path_params["serial"], "serial")
        username = _segment(request.path_params["username"], "username")
        self.own_serial(claims, serial)
        return serial, username

    async def user_log(self, request: Request) -> Response:
        serial, username = self.user_of(request, self.claims_of(request))
        return JSONResponse(await self.service.user_log(serial, username))

    async def user_export(self, request: Request) -> Response:
        serial, username = self.user_of(request, self.claims_of(request))
        return JSONResponse(
            await self.service.export_user(serial, username),
            headers={"Content-Disposition": 'attachment; filename="push-export.json"'},
        )

    async def user_erase(self, request: Request) -> Response:
        serial, username = self.user_of(request, self.claims_of(request))
        return JSONResponse(await self.service.erase_user(serial, username))


def make_api(
    service: PushService, secret: bytes | str, *, clock: Callable[[], float] = time.time
) -> Starlette:
    """The JWT-protected API over ``service``; ``clock`` checks token expiry."""
    h = _Handlers(service, secret, clock)
    routes = [
        Route("/v1/devices", h.put_device, methods=["PUT"]),
        Route("/v1/devices", h.list_devices, methods=["GET"]),
        Route("/v1/devices/unregister", h.unregister_device, methods=["POST"]),
        Route("/v1/devices/{device_id}", h.get_device, methods=["GET"]),
        Route("/v1/devices/{device_id}", h.delete_device, methods=["DELETE"]),
        Route("/v1/wake", h.wake, methods=["POST"]),
        Route("/v1/users/{serial}/{username}/log", h.user_log, methods=["GET"]),
        Route("/v1/users/{serial}/{username}/export", h.user_export, methods=["GET"]),
        Route("/v1/users/{serial}/{username}", h.user_erase, methods=["DELETE"]),
    ]
    return Starlette(routes=routes, exception_handlers=_HANDLERS)


# ------------------------------------------------------------------ admin


def admin_routes(service: PushService) -> Routes:
    """/metrics, /healthz, /readyz for pbxcore's admin endpoint: no authentication, meant for loopback."""

    async def metrics(request: AdminRequest) -> AdminAnswer:
        return AdminAnswer(200, await service.metrics_text(), CONTENT_TYPE)

    async def healthz(request: AdminRequest) -> AdminAnswer:
        return AdminAnswer.text("ok")

    async def readyz(request: AdminRequest) -> AdminAnswer:
        try:
            with trio.fail_after(READY_TIMEOUT):
                await service.store.counts()
        except Exception as e:  # any store failure means "not ready", never a 500
            log.warning("event=not_ready error=%s", type(e).__name__)
            return AdminAnswer.text("store not answering", 503)
        return AdminAnswer.text("ready")

    return {("GET", "/metrics"): metrics, ("GET", "/healthz"): healthz, ("GET", "/readyz"): readyz}


# ------------------------------------------------------------------ errors


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


async def _bad_input(request: Request, exc: Exception) -> Response:
    # PushError and WireError messages name the field, never echo a token.
    return JSONResponse({"error": str(exc)}, status_code=400)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    messages = {404: "no such resource", 405: f"method {request.method} not allowed here",
                413: f"body larger than {MAX_BODY} bytes"}
    return JSONResponse({"error": messages.get(exc.status_code, str(exc.detail))},
                        status_code=exc.status_code, headers=dict(exc.headers or {}))


async def _store_unavailable(request: Request, exc: Exception) -> Response:
    # A shared store (Redis) not answering: another worker, or this one a moment later, may.
    log.warning("event=store_unavailable path=%s error=%s", request.url.path, exc)
    return JSONResponse({"error": "store not answering"}, status_code=503, headers={"Retry-After": "1"})


async def _internal_error(request: Request, exc: Exception) -> Response:
    # The traceback goes to hypercorn's error log (push.http); the body says nothing more.
    log.error("event=api_error path=%s error=%s", request.url.path, type(exc).__name__)
    return JSONResponse({"error": "internal error"}, status_code=500)


_HANDLERS: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
    ApiError: _api_error,
    PushError: _bad_input,
    WireError: _bad_input,
    HTTPException: _http_error,
    StoreUnavailable: _store_unavailable,
    Exception: _internal_error,
}
