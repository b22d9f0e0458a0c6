#!/bin/bash
# The README's "First call in five minutes", as printed, on a fresh Debian 12 (the cached
# debootstrap tree of run-in-nspawn.sh, not booted: the quick start needs no systemd):
# terminal 1's `./dev.sh run` in the background, terminal 2's block pasted line by line,
# SIPp as the PBX phoning home and as a softphone calling it, `./dev.sh pbxs` showing the
# PBX online. Run as root from anywhere:
#
#   tests/install/quickstart-in-nspawn.sh
#
# It says where it stopped ("STOPPED at README.md:<line> (quickstart-terminal-2): ...",
# or "STOPPED: ..."), then terminal 1's output. Exit 0 only when the call went through.
#
# Departures from a person at a fresh machine, and why: the machine starts as the README
# says (root, Python 3.11, a clone of this repository: python3 and git are installed
# first, `<this repository>` is a git snapshot of this checkout). Downloads (dev.sh's
# virtualenv and packages, terminal 2's apt-get) happen in a first pass with the host's
# network; the quick start then runs with a private network (loopback only), because
# `run` binds 127.0.0.1:5060, 9090, 8443, ... which would collide with this host's. There
# dev.sh finds its packages installed and apt-get finds SIPp installed, as they would on a
# second try.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
T0=$(date +%s)

say() { printf '[quickstart-test %3ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
[ "$(id -u)" = 0 ] || { echo "quickstart-in-nspawn.sh: needs root (debootstrap, systemd-nspawn)" >&2; exit 2; }

. "$HERE/nspawn-lib.sh"

Q=$M/root/quickstart-test
mkdir -p "$Q"
snapshot_checkout "$Q/pbx-relay.git"
for kind in quickstart-terminal-1 quickstart-terminal-2; do
  python3 "$HERE/readme_blocks.py" "$ROOT/README.md" pasted "$kind" "$Q/$kind.sh"
done

cat > "$Q/downloads.sh" <<'SH'
# The fresh machine the README starts from, then what the quick start downloads.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends python3 git ca-certificates >/dev/null
git clone -q /root/quickstart-test/pbx-relay.git /root/pbx-relay
cd /root/pbx-relay
./dev.sh --version                     # dev.sh's set-up: python3-venv, .venv, the packages
apt-get install -y -qq sip-tester >/dev/null   # terminal 2's first line
SH

cat > "$Q/quickstart.sh" <<'SH'
# Terminal 1 in the background, terminal 2 once the relay says where to point a softphone.
cd /root/pbx-relay
# Its own process group, as a terminal's: Ctrl-C (SIGINT to the group) stops the relay.
setsid bash /root/quickstart-test/quickstart-terminal-1.sh > /root/quickstart-test/terminal-1.out 2>&1 &
T1=$!
for _ in $(seq 600); do
  grep -q "Point a softphone" /root/quickstart-test/terminal-1.out 2>/dev/null && break
  kill -0 "$T1" 2>/dev/null || break
  sleep 0.1
done
if ! grep -q "Point a softphone" /root/quickstart-test/terminal-1.out; then
  echo "STOPPED: terminal 1 (./dev.sh run) did not start the relay" >&2
  exit 1
fi
bash /root/quickstart-test/quickstart-terminal-2.sh > /root/quickstart-test/terminal-2.out 2>&1
rc=$?
cat /root/quickstart-test/terminal-2.out
if [ "$rc" = 0 ] && ! grep -Eq "^0123456789 +online +tcp:127.0.0.1:" /root/quickstart-test/terminal-2.out; then
  echo "STOPPED: ./dev.sh pbxs does not show 0123456789 online" >&2
  rc=1
fi
kill -INT -- "-$T1" 2>/dev/null || true
for _ in $(seq 100); do kill -0 "$T1" 2>/dev/null || break; sleep 0.1; done
kill -KILL -- "-$T1" 2>/dev/null || true
exit "$rc"
SH

ENV=(env -i HOME=/root LANG=C.UTF-8 TERM=dumb PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)
say "machine $NAME: python3, git, a clone; dev.sh's downloads and SIPp (host network)"
systemd-nspawn -q -D "$M" -M "$NAME-1" --register=no --keep-unit --as-pid2 --console=pipe \
    --bind="$CACHE/apt-archives:/var/cache/apt/archives" --bind="$CACHE/pip:/root/.cache/pip" \
    "${ENV[@]}" /bin/bash /root/quickstart-test/downloads.sh < /dev/null \
  || { echo "quickstart-test: STOPPED in the downloads (above)" >&2; exit 1; }

say "the quick start as printed (private network)"
if ! systemd-nspawn -q -D "$M" -M "$NAME" --private-network --register=no --keep-unit --as-pid2 \
    --console=pipe "${ENV[@]}" /bin/bash /root/quickstart-test/quickstart.sh < /dev/null; then
  echo "--- terminal 1 (last 40 lines)" >&2
  tail -40 "$Q/terminal-1.out" >&2 || true
  echo "quickstart-test: STOPPED in the quick start (above)" >&2
  exit 1
fi
say "quick start passed: a PBX registered and a call set up and hung up through the relay"
