"""Two network namespaces for the kernel media backend: the relay in one, the test's peers in the other.

The kernel backend writes nftables rules (table ``inet pbx_relay``) and forwards
packets: it must never run in the host's own network namespace. Here the relay
process runs in ``<prefix>relay`` and every peer of the test - the sockets this
process opens, SIPp - in ``<prefix>peers``, linked by one veth pair::

    [<prefix>peers] 10.78.0.2 (phone, PBX), 10.78.0.3 (a stranger, a phone that moved)
         │ veth
    [<prefix>relay] 10.78.0.1 (SIP, admin, media), ip_forward=1

The test's own thread enters the peers' namespace (setns(2) on this thread only)
for as long as the peers live, so sockets it opens and programs it starts are
there; the relay's admin endpoint is reached over the veth. A relayed packet
leaves the relay namespace by the interface it came in on, so ICMP redirects
are switched off there (a router would tell the peer to go direct otherwise).
Nothing here has a route anywhere else; ``down`` deletes both namespaces.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.realpeers import RelayProc, start_relay, stop_relay, write_config

RELAY_IP = "10.78.0.1"
PEER_IP = "10.78.0.2"
OTHER_IP = "10.78.0.3"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def why_no_kernel() -> str | None:
    """Why the kernel backend cannot be tested here (None: it can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (network namespaces, nftables)"
    if shutil.which("ip") is None or shutil.which("nft") is None:
        return "needs ip and nft (iproute2, nftables)"
    try:
        ctypes.CDLL("libnftables.so.1")
    except OSError:
        return "needs libnftables.so.1 (Debian nftables)"
    return None


def why_no_fast_path() -> str | None:
    """Why the kernel backend's eBPF lane cannot run here (None: it can): a program
    loaded and dropped again, attached nowhere."""
    from relay.media.ebpf import EbpfUnavailable, FastPath

    try:
        FastPath((10000, 10010), []).close()
    except EbpfUnavailable as e:
        return str(e)
    return None


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def run(*cmd: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    out = subprocess.run(full, capture_output=True, text=True, timeout=20)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(full)}: {out.stderr}")
    return out


@contextmanager
def inside(ns: str) -> Iterator[None]:
    """This thread (and what it starts) in network namespace ``ns``, then back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


@dataclass
class KernelNet:
    prefix: str

    @property
    def relay_ns(self) -> str:
        return f"{self.prefix}relay"

    @property
    def peers_ns(self) -> str:
        return f"{self.prefix}peers"

    def up(self, forwarding: bool = True) -> None:
        self.down()
        for ns in (self.relay_ns, self.peers_ns):
            run("ip", "netns", "add", ns)
            run("ip", "link", "set", "lo", "up", ns=ns)
        run("ip", "link", "add", "kmr0", "netns", self.relay_ns, "type", "veth",
            "peer", "name", "kmp0", "netns", self.peers_ns)
        run("ip", "addr", "add", f"{RELAY_IP}/24", "dev", "kmr0", ns=self.relay_ns)
        run("ip", "link", "set", "kmr0", "up", ns=self.relay_ns)
        for ip in (PEER_IP, OTHER_IP):
            run("ip", "addr", "add", f"{ip}/24", "dev", "kmp0", ns=self.peers_ns)
        run("ip", "link", "set", "kmp0", "up", ns=self.peers_ns)
        for key in (f"net.ipv4.ip_forward={int(forwarding)}", "net.ipv4.conf.all.send_redirects=0",
                    "net.ipv4.conf.default.send_redirects=0", "net.ipv4.conf.kmr0.send_redirects=0"):
            run("sysctl", "-qw", key, ns=self.relay_ns)

    def down(self) -> None:
        for ns in (self.relay_ns, self.peers_ns):
            if Path(f"/run/netns/{ns}").exists():
                run("ip", "netns", "del", ns, check=False)

    def inside_peers(self) -> AbstractContextManager[None]:
        """This thread (and what it starts) in the peers' namespace, then back."""
        return inside(self.peers_ns)

    def nft(self, *args: str) -> str:
        """``nft args`` in the relay's namespace (what the relay's table holds)."""
        return run("nft", *args, ns=self.relay_ns).stdout

    def relay_table(self) -> str:
        out = run("nft", "list", "table", "inet", "pbx_relay", ns=self.relay_ns, check=False)
        return out.stdout if out.returncode == 0 else ""


def start_kernel_relay(net: KernelNet, state: Path, serials: tuple[str, ...] = ("0123456789",),
                       media: str = "", backend: str = "kernel") -> RelayProc:
    """``pbx-relay run`` in the relay namespace with ``[media] backend``; its admin
    endpoint is reached from the peers' namespace (enter it before calling metrics)."""
    state.mkdir(parents=True, exist_ok=True)
    r = RelayProc(state, RELAY_IP, 5060, 5060, 5061, 9090, netns=net.relay_ns, peer_host=PEER_IP)
    media = f'backend = "{backend}"\n{media}'
    # The peers' namespace is where every test peer lives, many calls a second from
    # one address: exempt like loopback is for the tests on lo.
    exempt = f'[transport]\nexempt = ["127.0.0.1", "::1", "{PEER_IP}"]\n'
    write_config(r, exempt, media=media)
    for s in serials:
        r.add_pbx(s)
    start_relay(r, exempt, media=media)
    r.netns = None  # its admin endpoint: over the veth, from the test's (peers') namespace
    return r


@contextmanager
def kernel_relay(prefix: str, state: Path, media: str = "") -> Iterator[tuple[KernelNet, RelayProc]]:
    """Namespaces up, the relay started with the kernel backend, this thread among
    the peers; all of it undone afterwards, whatever happened."""
    net = KernelNet(prefix)
    relay: RelayProc | None = None
    try:
        net.up()
        relay = start_kernel_relay(net, state, media=media)
        with net.inside_peers():
            yield net, relay
    finally:
        if relay is not None:
            stop_relay(relay)
        net.down()
