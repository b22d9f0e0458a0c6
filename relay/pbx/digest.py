"""Digest authentication of PBXs (RFC 3261 §22, RFC 7616, SHA-256 for SIP per RFC 8760).

Nonces are stateless: ``<issued-at>.<mac>`` signed with the relay's key, so
any number of challenges cost no memory and a restart keeps nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
from collections.abc import Mapping

from relay.sip.headers import parse_params

ALGORITHMS = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}

# How long a nonce is good for. Kamailio's auth module defaults to 300 s; a
# PBX re-registers far less often, so an older nonce is answered stale=true
# and the PBX retries at once without asking its user for anything.
NONCE_LIFETIME = 300.0


def ha1(algorithm: str, username: str, realm: str, secret: str) -> str:
    """H(username:realm:password): what the directory stores instead of the secret."""
    return ALGORITHMS[algorithm](f"{username}:{realm}:{secret}".encode()).hexdigest()


def new_secret() -> str:
    # 128 bits from the OS CSPRNG, URL-safe so it pastes into any PBX web form.
    return secrets.token_urlsafe(16)


class DigestAuth:
    def __init__(self, key: bytes, realm: str, algorithms: tuple[str, ...]):
        for a in algorithms:
            if a not in ALGORITHMS:
                raise ValueError(f"unknown digest algorithm {a}")
        self.key = key
        self.realm = realm
        self.algorithms = algorithms

    def nonce(self, now: float, bind: str = "") -> str:
        """``bind`` ties the nonce to the client (its transport and IP): a
        REGISTER captured on the way cannot be replayed from elsewhere."""
        stamp = struct.pack("!d", now)
        mac = hmac.new(self.key, b"nonce" + stamp + bind.encode(), hashlib.sha256).digest()[:12]
        return base64.urlsafe_b64encode(stamp + mac).decode("ascii").rstrip("=")

    def nonce_age(self, nonce: str, now: float, bind: str = "") -> float | None:
        """Seconds since we issued ``nonce``; None if we did not issue it."""
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (ValueError, TypeError):
            return None
        if len(raw) != 20:
            return None
        stamp, mac = raw[:8], raw[8:]
        good = hmac.new(self.key, b"nonce" + stamp + bind.encode(), hashlib.sha256).digest()[:12]
        if not hmac.compare_digest(mac, good):
            return None
        issued: float = struct.unpack("!d", stamp)[0]
        return now - issued

    def challenges(self, now: float, stale: bool = False, bind: str = "") -> list[str]:
        """One WWW-Authenticate value per algorithm, most preferred first (RFC 8760 §2.4)."""
        nonce = self.nonce(now, bind)
        extra = ", stale=true" if stale else ""
        return [
            f'Digest realm="{self.realm}", nonce="{nonce}", algorithm={a}, qop="auth"{extra}'
            for a in self.algorithms
        ]

    def check(
        self, authorization: str, method: str, ha1s: Mapping[str, str] | None, now: float,
        bind: str = "",
    ) -> tuple[str, str | None]:
        """Verify one Authorization value.

        Returns (verdict, username) with verdict "ok", "stale" (good response,
        old nonce: challenge again with stale=true), "unknown_nonce" (not one
        of ours for this client: challenge afresh) or "fail" (wrong response,
        unknown user or unusable credentials).
        """
        if not authorization[:7].lower() == "digest ":
            return "fail", None
        p = {k: _unquote(v) for k, v in _digest_params(authorization[7:]).items()}
        username = p.get("username")
        algorithm = (p.get("algorithm") or "MD5").upper()
        if algorithm == "SHA256":
            algorithm = "SHA-256"
        if (
            not username or algorithm not in self.algorithms
            or p.get("realm") != self.realm or not p.get("nonce") or not p.get("response")
        ):
            return "fail", username
        age = self.nonce_age(p["nonce"] or "", now, bind)
        if age is None or age < -5:
            return "unknown_nonce", username
        if ha1s is None or algorithm not in ha1s:
            # unknown PBX: same answer as a wrong secret, nothing to enumerate
            return "fail", username
        h = ALGORITHMS[algorithm]
        ha2 = h(f"{method}:{p.get('uri', '')}".encode()).hexdigest()
        qop = p.get("qop")
        if qop:
            if qop != "auth" or not p.get("nc") or not p.get("cnonce"):
                return "fail", username
            data = f"{ha1s[algorithm]}:{p['nonce']}:{p['nc']}:{p['cnonce']}:{qop}:{ha2}"
        else:
            data = f"{ha1s[algorithm]}:{p['nonce']}:{ha2}"
        expected = h(data.encode()).hexdigest()
        if not hmac.compare_digest(expected, (p["response"] or "").lower()):
            return "fail", username
        if age > NONCE_LIFETIME:
            return "stale", username
        return "ok", username


def _unquote(v: str | None) -> str | None:
    if v is not None and len(v) >= 2 and v[0] == '"' and v[-1] == '"':
        return v[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return v


def _digest_params(text: str) -> dict[str, str | None]:
    # Digest params are comma-separated (RFC 7616 §3.4); reuse the ';' parser.
    out: dict[str, str | None] = {}
    quoted = False
    start = 0
    parts = []
    for i, ch in enumerate(text):
        if ch == '"' and (i == 0 or text[i - 1] != "\\"):
            quoted = not quoted
        elif ch == "," and not quoted:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    for part in parts:
        out.update(parse_params(part.strip()))
    return out
