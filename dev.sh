#!/bin/sh
# Set-up and entry point for a fresh Debian 12 machine (root, Python 3.11).
#   ./dev.sh run [options]   -- install what the product needs, then `pbx-relay run [options]`
#   ./dev.sh test [args]     -- install what the tests need (SIPp, nftables, ...), run pytest [args]
#   ./dev.sh VERB [args]     -- any other pbx-relay command: ./dev.sh pbx add 0123456789,
#                               ./dev.sh pbxs, ./dev.sh config check, ./dev.sh --help
# It says what it installs while it does; the Python packages are installed again only
# when pyproject.toml changed since the last time (a stamp in the virtualenv).
set -eu
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
cmd=${1:-}
[ $# -gt 0 ] && shift

say() { echo "dev.sh: $*" >&2; }

apt_install() {
  missing=""
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
  done
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" != 0 ]; then
    say "need root to install Debian packages:$missing"; exit 1
  fi
  say "installing Debian packages:$missing (apt-get, a minute or two)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  say "Debian packages installed"
}

need_python() {
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3-venv
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating the virtualenv $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  fi
}

# pip install -e ".$1" unless the stamp says it was done with this pyproject.toml.
need_packages() {
  extra=$1
  stamp="$VENV/.installed$extra"
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  say "installing the Python packages (pip install -e .$extra, a minute the first time)"
  "$VENV/bin/python" -m pip install -q -e ".$extra" >/dev/null
  echo "$want" > "$stamp"
  say "Python packages installed"
}

case "$cmd" in
  test)
    # sip-tester: SIPp plays PBX and softphone; iproute2/nftables/conntrack:
    # the NAT tests build network namespaces with masquerade; baresip-core: a
    # real softphone carrying audio through the relay; systemd: systemd-analyze
    # and systemd-sysusers check the unit files (a container's image lacks them);
    # curl: the phone fetching provisioning files through the relay; fail2ban: its
    # fail2ban-regex checks the filter in systemd/fail2ban.
    # libnftables1: the kernel media backend loads it (nftables pulls it in too).
    # redis-server: the shared state of relay nodes (relay/cluster) against a real Redis.
    apt_install sip-tester iproute2 nftables libnftables1 conntrack baresip-core systemd curl fail2ban redis-server
    need_python
    need_packages "[test]"
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  "")
    echo "usage: ./dev.sh run|test|VERB [args]   (VERB: any pbx-relay command, e.g. pbx add SERIAL)" >&2
    exit 2
    ;;
  *)
    # run, and every other pbx-relay command (pbx add, pbxs, config check, --help, ...).
    need_python
    need_packages ""
    # The banner prints operator commands as this checkout runs them.
    PBX_RELAY_COMMAND=./dev.sh exec "$VENV/bin/pbx-relay" "$cmd" "$@"
    ;;
esac
