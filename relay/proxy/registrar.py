"""PBX phone-home: digest-authenticated REGISTERs and the live registry serial → flow (RFC 3261 §10, §22)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from relay.pbx.digest import DigestAuth
from relay.proxy.authbans import AuthBans
from relay.proxy.counters import Counters
from relay.proxy.effects import ClaimPbx, ReleasePbx, Send, ShareBan
from relay.proxy.flow import Flow
from relay.proxy.identity import RelayIdentity
from relay.proxy.replies import Replies
from relay.sip.headers import NameAddr, format_host
from relay.sip.message import Request
from relay.sip.uri import SipUri

log = logging.getLogger("relay.pbx")

# What a REGISTER gives: the answer, and what the cluster learns (a claim, a ban).
Registered = Send | ClaimPbx | ReleasePbx | ShareBan
Ha1s = Mapping[str, str]  # digest algorithm → H(serial:realm:secret)


@dataclass(slots=True)
class PbxRegistration:
    """What the relay keeps of a PBX: its serial and current flow (DESIGN §3), until when."""

    serial: str
    flow: Flow  # transport + current external IP and port + our socket
    expires_at: float


@dataclass(frozen=True, slots=True)
class ExpiryPolicy:
    """RFC 3261 §10.3: what a PBX gets when it asks for no expiry, the least it may ask
    for (423 below) and the most it gets."""

    default: int = 3600
    minimum: int = 60
    maximum: int = 3600


class PbxRegistry:
    """serial ↔ flow, in memory only: a restart forgets every binding and PBXs register
    again. A new registration replaces the old one; no earlier address is kept
    (DESIGN §3)."""

    def __init__(self) -> None:
        self._by_serial: dict[str, PbxRegistration] = {}
        self._by_flow: dict[Flow, str] = {}

    def __len__(self) -> int:
        return len(self._by_serial)

    def bind(self, serial: str, flow: Flow, expires_at: float) -> PbxRegistration:
        old = self._by_serial.get(serial)
        if old is not None and old.flow != flow:
            self._by_flow.pop(old.flow, None)
        prev_serial = self._by_flow.get(flow)
        if prev_serial is not None and prev_serial != serial:
            self._by_serial.pop(prev_serial, None)
        reg = PbxRegistration(serial, flow, expires_at)
        self._by_serial[serial] = reg
        self._by_flow[flow] = serial
        return reg

    def unbind(self, serial: str) -> bool:
        reg = self._by_serial.pop(serial, None)
        if reg is not None:
            self._by_flow.pop(reg.flow, None)
        return reg is not None

    def lookup(self, serial: str, now: float) -> PbxRegistration | None:
        """The PBX's live registration, or None (an expired one is dropped here)."""
        reg = self._by_serial.get(serial)
        if reg is not None and reg.expires_at <= now:
            self.unbind(serial)
            return None
        return reg

    def serial_of(self, flow: Flow) -> str | None:
        return self._by_flow.get(flow)

    def expire(self, now: float) -> list[str]:
        gone = [s for s, r in self._by_serial.items() if r.expires_at <= now]
        for s in gone:
            self.unbind(s)
        return gone

    def snapshot(self) -> list[PbxRegistration]:
        return list(self._by_serial.values())


# Bytes of a UDP 401 per byte of the REGISTER it answers, at most (while more than one
# challenge is left to drop). A spoofed bare REGISTER drew 2.6x its size at d9440f1
# (issue 10); 2x keeps both challenges for a PBX's ordinary REGISTER (Contact,
# Expires, User-Agent: ~450 bytes) and gives a bare probe one challenge, the first.
REFLECTION_FACTOR = 2


class PbxRegistrar:
    """Answers PBXs' REGISTERs for ``sip:<serial>@<domain>`` and owns the registry and
    the directory snapshot (serial → digest hashes) the shell hands in."""

    def __init__(self, auth: DigestAuth, replies: Replies, counters: Counters,
                 expiry: ExpiryPolicy, identity: RelayIdentity, bans: AuthBans | None = None,
                 shared: bool = False) -> None:
        self.auth = auth
        self.replies = replies
        self.counters = counters
        self.expiry = expiry
        self.registry = PbxRegistry()
        self.directory: Mapping[str, Ha1s] = {}
        self.identity = identity
        self.bans = bans or AuthBans()
        # Wall clock minus ``now`` (Proxy.start): nonces carry wall-clock stamps, so that
        # another node of a cluster can tell a nonce's age (relay/pbx/digest.py).
        self.wall_offset = 0.0
        # Cluster (docs/cluster.md): each bind gives a ClaimPbx, each unbind a ReleasePbx,
        # each ban a ShareBan.
        self.shared = shared

    def directory_entry(self, serial: str) -> Ha1s | None:
        """The digest hashes of ``serial`` in the current directory, or None."""
        return self.directory.get(serial)

    def set_directory(self, directory: Mapping[str, Ha1s]) -> None:
        """A new snapshot of the PBX directory; PBXs no longer in it are forgotten now."""
        self.directory = directory
        for reg in self.registry.snapshot():
            if reg.serial not in directory:
                self.registry.unbind(reg.serial)

    def known(self, serial: str) -> bool:
        return serial in self.directory

    def lookup(self, serial: str, now: float) -> PbxRegistration | None:
        return self.registry.lookup(serial, now)

    def flow_closed(self, flow: Flow) -> list[ReleasePbx]:
        serial = self.registry.serial_of(flow)
        if serial is None:
            return []
        self.registry.unbind(serial)
        self.counters.inc("pbx_unregistered_total", "flow_closed")
        return [ReleasePbx(serial)] if self.shared else []

    def expire(self, now: float) -> list[ReleasePbx]:
        gone = self.registry.expire(now)
        if gone:
            self.counters.inc("pbx_unregistered_total", "expired", n=len(gone))
        return [ReleasePbx(s) for s in gone] if self.shared else []

    # ------------------------------------------------------------- REGISTER
    def register(self, req: Request, ruri: SipUri, source: Flow, now: float) -> list[Registered]:
        """A REGISTER addressed to the relay itself: authenticate, then bind, unbind or answer a query."""
        to_uri = SipUri.parse(NameAddr.parse(req.get("to") or "").uri)
        serial = to_uri.user or ruri.user
        if not serial or (ruri.user and ruri.user != serial) or not self.identity.is_us(to_uri):
            return list(self.replies.refuse(req, source, 404, "Not Found"))
        if source.node_link:
            # A PBX registers with the node it is connected to, never through another
            # (and a node's address must never collect digest failures and a ban).
            return list(self.replies.refuse(req, source, 403, "Forbidden"))
        refused = self._authenticate(req, serial, source, now)
        if refused is not None:
            return list(refused)
        contacts = req.get_all("contact")
        expires_hdr = req.get("expires")
        if contacts == ["*"]:
            if expires_hdr is None or expires_hdr.strip() != "0":
                return list(self.replies.refuse(req, source, 400, "Contact * needs Expires: 0"))
            return self._unbind(req, serial, source)
        if not contacts:
            return [self._query(req, serial, source, now)]
        return self._bind(req, serial, contacts[0], expires_hdr, source, now)

    def _failed(self, source: Flow, serial: str, now: float) -> list[ShareBan]:
        banned = self.bans.failed(source.remote_ip, now)
        if banned is None:
            return []
        self.counters.inc("pbx_auth_bans_total")
        # One line per ban, for fail2ban (systemd/fail2ban/filter.d/pbx-relay.conf).
        log.warning("event=auth_banned source=%s serial=%s failures=%d seconds=%g transport=%s",
                    banned.ip, serial, banned.failures, banned.seconds, source.transport)
        return [ShareBan(banned.ip, banned.seconds)] if self.shared else []

    def impose_ban(self, ip: str, seconds: float, now: float) -> None:
        """Another node banned ``ip``: it is banned here too (no log line: the banning
        node wrote the one fail2ban reads)."""
        if self.bans.impose(ip, seconds, now):
            self.counters.inc("pbx_auth_bans_shared_total")

    def _authenticate(self, req: Request, serial: str, source: Flow, now: float,
                      ) -> list[Registered] | None:
        """None when the request carries good credentials; else the 401 or 403 to send."""
        if self.bans.banned(source.remote_ip, now):
            # Banned for guessing: refused without looking, the right secret too.
            self.counters.inc("pbx_auth_refused_total", "banned")
            return list(self.replies.refuse(req, source, 403, "Forbidden"))
        authorization = req.get("authorization")
        bind = f"{source.transport}:{source.remote_ip}"
        verdict = "none"
        if authorization:
            verdict, username = self.auth.check(authorization, "REGISTER", self.directory.get(serial),
                                                now + self.wall_offset, bind)
            if verdict == "ok" and username != serial:
                verdict = "fail"
        if verdict == "ok":
            self.bans.succeeded(source.remote_ip)
            return None
        if verdict == "fail":
            # Wrong secret and unknown serial get the same answer: nobody can
            # use the relay to find out which serials exist.
            self.counters.inc("pbx_auth_failures_total")
            return [*self.replies.refuse(req, source, 403, "Forbidden"), *self._failed(source, serial, now)]
        # RFC 3261 §22.4: challenge; stale=true when only the nonce aged.
        extra = [("WWW-Authenticate", c)
                 for c in self.auth.challenges(now + self.wall_offset, verdict == "stale", bind)]
        answer = self.replies.reply(req, source, 401, "Unauthorized", extra=extra)
        if source.transport == "udp":
            # A spoofed source must not turn the relay into an amplifier: over UDP the
            # challenge stays within REFLECTION_FACTOR x the request, the algorithms
            # offered last dropped first (the first one is what most clients read).
            limit = REFLECTION_FACTOR * (req.wire_size or len(req.serialise()))
            while len(answer.data) > limit and len(extra) > 1:
                extra.pop()
                answer = self.replies.reply(req, source, 401, "Unauthorized", extra=extra)
        return [answer]

    def _unbind(self, req: Request, serial: str, source: Flow) -> list[Registered]:
        self.registry.unbind(serial)
        self.counters.inc("pbx_unregistered_total", "request")
        answer = self.replies.reply(req, source, 200, "OK")
        return [answer, ReleasePbx(serial)] if self.shared else [answer]

    def _query(self, req: Request, serial: str, source: Flow, now: float) -> Send:
        """A REGISTER without Contact: tell the PBX whether it is bound."""
        reg = self.registry.lookup(serial, now)
        extra = []
        if reg is not None:
            extra.append(("Contact", f"<sip:{serial}@{format_host(reg.flow.remote_ip)}:"
                          f"{reg.flow.remote_port}>;expires={int(reg.expires_at - now)}"))
        return self.replies.reply(req, source, 200, "OK", extra=extra)

    def _bind(
        self, req: Request, serial: str, contact_value: str, expires_hdr: str | None, source: Flow,
        now: float,
    ) -> list[Registered]:
        contact = NameAddr.parse(contact_value)
        raw_expires = contact.params.get("expires") or expires_hdr
        try:
            expires = int(raw_expires) if raw_expires is not None else self.expiry.default
        except ValueError:
            return list(self.replies.refuse(req, source, 400, "Bad Expires"))
        if expires == 0:
            return self._unbind(req, serial, source)
        if expires < self.expiry.minimum:
            return list(self.replies.refuse(req, source, 423, "Interval Too Brief",
                                            extra=[("Min-Expires", str(self.expiry.minimum))]))
        expires = min(expires, self.expiry.maximum)
        if self.registry.lookup(serial, now) is None:
            log.info("event=pbx_registered serial=%s flow=%s expires=%d", serial, source, expires)
        self.registry.bind(serial, source, now + expires)
        self.counters.inc("pbx_registrations_total")
        # RFC 3261 §10.3 step 8: the binding as granted, its other parameters kept.
        params = "".join(
            f";{k}" if v is None else f";{k}={v}" for k, v in contact.params.items() if k != "expires"
        )
        value = f"<{contact.uri}>{params};expires={expires}"
        answer = self.replies.reply(req, source, 200, "OK", extra=[("Contact", value)])
        return [answer, ClaimPbx(serial, source, expires)] if self.shared else [answer]
