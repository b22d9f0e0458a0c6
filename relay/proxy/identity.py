"""Who the relay is on the wire: the names and ports that mean "us", and the URIs and Vias it writes."""

from __future__ import annotations

from relay.proxy.flow import CLUSTER, Flow
from relay.sip.headers import format_host
from relay.sip.uri import SipUri

MAGIC_COOKIE = "z9hG4bK"
OUR_BRANCH = MAGIC_COOKIE + "-pr"  # every branch the relay writes starts with this


class RelayIdentity:
    """``domain``: PBXs register ``sip:<serial>@domain`` and phones use
    ``<serial>.domain``; ``advertise``: the host (name or IP) in our Via, Record-Route
    and Path; ``ports``: transport → the port we advertise for it; ``local_names``:
    other hosts that mean us (the listen IPs)."""

    def __init__(self, domain: str, advertise: str, ports: dict[str, int],
                 local_names: frozenset[str] = frozenset()):
        self.domain = domain
        self.advertise = advertise
        self.ports = dict(ports)
        self._port_set = frozenset(ports.values())
        self._names = frozenset({domain.lower(), advertise.lower()} | {n.lower() for n in local_names})
        self._suffix = "." + domain.lower()

    def is_us(self, uri: SipUri) -> bool:
        """A URI naming the relay (its domain, advertised host or a listen IP, on one of its ports)."""
        if uri.host not in self._names:
            return False
        return uri.port is None or uri.port in self._port_set

    def serial_of_host(self, host: str) -> str | None:
        """``<serial>.<domain>`` → serial; any other host → None."""
        if host.endswith(self._suffix):
            label = host[: -len(self._suffix)]
            if label and "." not in label:
                return label
        return None

    def uri(self, token: str, facing: Flow) -> str:
        """A SIP URI of ours carrying ``token``, reachable from the side of ``facing``."""
        port = self.ports.get(facing.transport, 5060)
        wire = _wire(facing.transport)
        tp = "" if wire == "udp" else f";transport={wire}"
        return f"sip:{token}@{format_host(self.advertise)}:{port}{tp}"

    def via(self, target: Flow, branch: str, flow_token: str, call_mark: str) -> str:
        """Our Via for a request sent on ``target``; ``pf`` names the flow its answer goes
        back on, ``ci`` the call it belongs to (``Branches.call_mark``)."""
        port = self.ports.get(target.transport, 5060)
        return (f"SIP/2.0/{_wire(target.transport).upper()} {format_host(self.advertise)}:{port}"
                f";branch={branch};pf={flow_token};ci={call_mark}")


def _wire(transport: str) -> str:
    """The transport as SIP names it: a link between relay nodes is SIP over TCP."""
    return "tcp" if transport == CLUSTER else transport
