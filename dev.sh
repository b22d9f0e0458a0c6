#!/bin/sh
# Set-up and entry point for a fresh Debian 12 machine (root, Python 3.11).
#   ./dev.sh run   -- install what the product needs, then `pbx-relay run`
#   ./dev.sh test  -- install what the tests need (SIPp, nftables, ...), run them all
# Extra arguments go to pbx-relay / pytest.
set -eu
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
cmd=${1:-}
[ $# -gt 0 ] && shift

need_python() {
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3-venv
  fi
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
}

apt_install() {
  missing=""
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
  done
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "dev.sh: need root to install Debian packages:$missing" >&2; exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

case "$cmd" in
  run)
    need_python
    "$VENV/bin/python" -m pip install -q -e . >/dev/null
    exec "$VENV/bin/pbx-relay" run "$@"
    ;;
  test)
    # sip-tester: SIPp plays PBX and softphone; iproute2/nftables/conntrack:
    # the NAT tests build network namespaces with masquerade; baresip-core: a
    # real softphone carrying audio through the relay; systemd: systemd-analyze
    # and systemd-sysusers check the unit files (a container's image lacks them);
    # curl: the phone fetching provisioning files through the relay.
    # libnftables1: the kernel media backend loads it (nftables pulls it in too).
    apt_install sip-tester iproute2 nftables libnftables1 conntrack baresip-core systemd curl
    need_python
    "$VENV/bin/python" -m pip install -q -e '.[test]' >/dev/null
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: ./dev.sh run|test [args]" >&2; exit 2
    ;;
esac
