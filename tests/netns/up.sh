#!/bin/bash
# NAT test topology for pbx-relay, in network namespaces with no link to the
# host's network (adapted from shared/testing/netns/up.sh; the project carries
# its own copy). Namespace names are "$PRT_NS_PREFIX<role>" (default prefix
# "prt-"), so they never collide with the shared "sb-" topology, and two runs
# with different prefixes never collide with each other:
#
#   <p>phone 10.77.1.2 ── 10.77.1.1 [<p>nat1] 203.0.113.2 ───┐
#                                                      203.0.113.1
#                                                    [<p>pub]  relay: 198.51.100.10 (on lo)
#                                                      203.0.113.129
#   <p>pbx   10.77.2.2 ── 10.77.2.1 [<p>nat2] 203.0.113.130 ─┘
#
# <p>pub is "the internet": it routes between the NATs' outside networks
# (203.0.113.0/25 and 203.0.113.128/25) and owns the relay address(es) in
# 198.51.100.0/24. The private 10.77.x networks exist only behind the NATs.
# 192.0.2.0/24 is deliberately unused: this machine's own eth0 is 192.0.2.2
# with gateway 192.0.2.1, and reusing those numbers would make a command run
# in the wrong namespace look right while hitting the real network.
# Nothing here has a route to the host or beyond: the namespaces are linked
# only to each other (veth pairs created directly inside them), so the host
# never even sees their interfaces, and interface names only need to be
# unique inside one namespace.
#
# Knobs (environment):
#   PRT_NS_PREFIX=prt-   namespace name prefix (must match down.sh's)
#   NAT_MODE=masq        masquerade, source port kept when free: one mapping per
#                        inside port, replies only from the contacted peer
#                        ("port-restricted cone" in practice)      [default]
#   NAT_MODE=random      masquerade random: a new random outside port per
#                        destination ("symmetric" NAT)
#   NAT_UDP_TIMEOUT=30   conntrack timeout of a UDP binding that has seen
#                        traffic one way only (kernel default 30 s)
#   NAT_UDP_STREAM_TIMEOUT=120  ... once traffic went both ways (kernel 120 s)
#   RELAY_ADDRS="198.51.100.10"  addresses the relay namespace owns
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
P=${PRT_NS_PREFIX:-prt-}
NAT_MODE=${NAT_MODE:-masq}
NAT_UDP_TIMEOUT=${NAT_UDP_TIMEOUT:-30}
NAT_UDP_STREAM_TIMEOUT=${NAT_UDP_STREAM_TIMEOUT:-120}
RELAY_ADDRS=${RELAY_ADDRS:-198.51.100.10}
PHONE=${P}phone NAT1=${P}nat1 PUB=${P}pub NAT2=${P}nat2 PBX=${P}pbx
NSS="$PHONE $NAT1 $PUB $NAT2 $PBX"

case "$P" in
  *[!A-Za-z0-9_.-]*|'') echo "up.sh: bad PRT_NS_PREFIX '$P'" >&2; exit 2 ;;
esac
case "$NAT_MODE" in
  masq|random) ;;
  *) echo "up.sh: NAT_MODE must be masq or random" >&2; exit 2 ;;
esac

for ns in $NSS; do
  if ip netns list | awk '{print $1}' | grep -qxF "$ns"; then
    echo "up.sh: $ns exists, tearing the old topology down first" >&2
    PRT_NS_PREFIX="$P" "$HERE/down.sh"; break
  fi
done

x() { ip netns exec "$@"; }
for ns in $NSS; do
  ip netns add "$ns"
  x "$ns" ip link set lo up
done

# veth pairs, both ends created inside the namespaces
ip link add prph0   netns "$PHONE" type veth peer name prn1in  netns "$NAT1"
ip link add prn1out netns "$NAT1"  type veth peer name prpub1  netns "$PUB"
ip link add prpbx0  netns "$PBX"   type veth peer name prn2in  netns "$NAT2"
ip link add prn2out netns "$NAT2"  type veth peer name prpub2  netns "$PUB"

addr() { x "$1" ip addr add "$3" dev "$2"; x "$1" ip link set "$2" up; }
addr "$PHONE" prph0   10.77.1.2/24
addr "$NAT1"  prn1in  10.77.1.1/24
addr "$NAT1"  prn1out 203.0.113.2/25
addr "$PUB"   prpub1  203.0.113.1/25
addr "$PUB"   prpub2  203.0.113.129/25
addr "$NAT2"  prn2out 203.0.113.130/25
addr "$NAT2"  prn2in  10.77.2.1/24
addr "$PBX"   prpbx0  10.77.2.2/24
for a in $RELAY_ADDRS; do x "$PUB" ip addr add "$a/32" dev lo; done

x "$PHONE" ip route add default via 10.77.1.1
x "$NAT1"  ip route add default via 203.0.113.1
x "$NAT2"  ip route add default via 203.0.113.129
x "$PBX"   ip route add default via 10.77.2.1
# $PUB: only its connected networks and the relay addresses; no default route
for ns in "$NAT1" "$PUB" "$NAT2"; do
  x "$ns" sysctl -qw net.ipv4.ip_forward=1
done

nat() {  # ns inside-if outside-if
  local masq="masquerade"
  [ "$NAT_MODE" = random ] && masq="masquerade random"
  x "$1" nft -f - <<NFT
table ip prtnat {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "$3" $masq
  }
  chain forward {
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "$2" oifname "$3" accept
  }
}
NFT
  # conntrack (and so its sysctls) is live in this namespace now
  x "$1" sysctl -qw net.netfilter.nf_conntrack_udp_timeout="$NAT_UDP_TIMEOUT"
  x "$1" sysctl -qw net.netfilter.nf_conntrack_udp_timeout_stream="$NAT_UDP_STREAM_TIMEOUT"
}
nat "$NAT1" prn1in prn1out
nat "$NAT2" prn2in prn2out

echo "up.sh: namespaces $NSS ready (NAT_MODE=$NAT_MODE, udp timeout ${NAT_UDP_TIMEOUT}s, stream ${NAT_UDP_STREAM_TIMEOUT}s)"
echo "  phone 10.77.1.2 -> NAT 203.0.113.2 | pbx 10.77.2.2 -> NAT 203.0.113.130 | relay $RELAY_ADDRS in $PUB"
