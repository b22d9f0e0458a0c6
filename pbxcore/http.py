"""The operator commands' HTTP client: one JSON request to a running service, failures as typed errors.

Both CLIs (``pbx-relay``'s operator verbs, ``pbx-push``'s) call their services with
:func:`request_json`; what went wrong is told by the error's type, never its text:

- :class:`~pbxcore.errors.ServiceUnavailable`: nothing answered (refused, timed out,
  a TLS certificate that does not verify);
- :class:`~pbxcore.errors.Unauthorized`: HTTP 401 or 403;
- :class:`~pbxcore.errors.RequestRefused`: any other non-200 answer, or one that is not JSON.
"""

from __future__ import annotations

import ssl
from typing import Any

import httpx

from pbxcore.errors import RequestRefused, ServiceUnavailable, Unauthorized

DEFAULT_TIMEOUT = 30.0  # seconds: an export of a busy user may take a moment


def one_line(text: object) -> str:
    """``text`` with its whitespace folded: messages stay on one line."""
    return " ".join(str(text).split())


def request_json(
    url: str, *, what: str, method: str = "GET", token: str | None = None,
    verify: ssl.SSLContext | bool = True, params: dict[str, str] | None = None,
    json: Any = None, timeout: float = DEFAULT_TIMEOUT, hint: str = "",
) -> Any:
    """The JSON body of a 200 answer to ``method url``; ``what`` names the service in
    messages ("the push service"), ``hint`` is added when it does not answer."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with httpx.Client(verify=verify, timeout=timeout, trust_env=False) as client:
            resp = client.request(method, url, params=params, headers=headers, json=json)
    except httpx.HTTPError as e:
        extra = f" ({hint})" if hint else ""
        if _certificate_failed(e):
            extra = " (its TLS certificate does not verify: give the CA bundle)"
        raise ServiceUnavailable(f"cannot reach {what} at {url}: {type(e).__name__}{extra}") from None
    try:
        body = resp.json()
    except ValueError:
        body = None
    if resp.status_code != 200:
        message = body.get("error") if isinstance(body, dict) else None
        text = f"{what} at {url}: HTTP {resp.status_code}: {one_line(message or resp.reason_phrase)}"
        if resp.status_code in (401, 403):
            raise Unauthorized(text)
        raise RequestRefused(text, resp.status_code)
    if body is None:
        raise RequestRefused(f"{what} at {url}: the answer is not JSON (the right address?)",
                             resp.status_code)
    return body


def _certificate_failed(exc: BaseException) -> bool:
    """A certificate verification failure somewhere in the chain of causes."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
