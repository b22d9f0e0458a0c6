#!/bin/bash
# The README's "Install on a Debian server", pasted block by block into a fresh Debian 12
# booted under systemd (systemd-nspawn --boot), then checked: both services running,
# every operator command working as printed, a reload applied when `systemctl reload`
# returns (tests/install/checks.sh). Run as root from anywhere:
#
#   tests/install/run-in-nspawn.sh
#
# It says where it stopped: "STOPPED at README.md:<line> (install block N): <command>",
# or "FAILED check: ...", then the services' journal. Exit 0 only when all passed.
#
# What it keeps: the debootstrap tree of a fresh Debian 12 and download caches (apt
# .debs, pip wheels) under $PBX_INSTALL_CACHE (default /var/tmp/pbx-relay-debootstrap-cache),
# so a second run skips the 1-minute debootstrap. What it removes: the machine's
# directory and the container. PBX_INSTALL_KEEP=1 leaves the container running instead,
# and says how to enter it and how to remove it.
#
# The one departure from a real server, and why: README block 1 (apt-get, pip) needs the
# package registries, and the rest must not share this host's network (the services bind
# 0.0.0.0:5060, 127.0.0.1:9090, 8443, 9091 and would collide with anything else running
# here, tests included). So block 1 runs in the same tree with the host's network but not
# booted (it installs files and needs no systemd); the tree is then booted with a private
# network (loopback only, plus 203.0.113.10 as the server's "public" address) for the
# blocks after it. Two stand-ins for the person at the keyboard: `<this repository>` is a
# git snapshot of this checkout (working tree as it is), and `editor` is
# tests/install/editor, which changes the CHANGE lines.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PUBLIC_IP=203.0.113.10  # TEST-NET-3: the container's own, on its loopback
T0=$(date +%s)

say() { printf '[install-test %3ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
[ "$(id -u)" = 0 ] || { echo "run-in-nspawn.sh: needs root (debootstrap, systemd-nspawn)" >&2; exit 2; }

# The cached Debian 12 tree, a machine copied from it, cleaned up at exit: nspawn-lib.sh.
. "$HERE/nspawn-lib.sh"

# What the test brings in: the README's blocks as scripts, the checkout as a git repo.
T=$M/root/install-test
mkdir -p "$T/bin" "$T/pbx-relay.git"
nblocks=$(python3 "$HERE/readme_blocks.py" "$ROOT/README.md" list | grep -c '^step ')
for n in $(seq "$nblocks"); do
  python3 "$HERE/readme_blocks.py" "$ROOT/README.md" script "$n" "$T/block-$n.sh"
done
python3 "$HERE/readme_blocks.py" "$ROOT/README.md" raw renewal-hook "$T/renewal-hook"
sed -i 's|<this repository>|/root/install-test/pbx-relay.git|g' "$T/block-1.sh"
install -m 0755 "$HERE/editor" "$T/bin/editor"
install -m 0755 "$HERE/checks.sh" "$T/checks.sh"
install -m 0644 "$HERE/inside.py" "$T/inside.py"
cat > "$T/run-block.sh" <<'SH'
#!/bin/bash
# One README block in a fresh root login shell's environment; its output also in block-N.out.
cd /root
bash "/root/install-test/block-$1.sh" 2>&1 | tee "/root/install-test/block-$1.out"
exit "${PIPESTATUS[0]}"
SH
snapshot_checkout "$T/pbx-relay.git"

ENV=(env -i HOME=/root LANG=C.UTF-8 TERM=dumb
     PATH=/root/install-test/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)

# ------------------------------------------------------------------ block 1: host network, not booted
say "README install block 1 (host network, not booted: it only installs files)"
systemd-nspawn -q -D "$M" -M "$NAME-1" --register=no --keep-unit --as-pid2 --console=pipe \
    --bind="$CACHE/apt-archives:/var/cache/apt/archives" --bind="$CACHE/pip:/root/.cache/pip" \
    "${ENV[@]}" /bin/bash /root/install-test/run-block.sh 1 < /dev/null \
  || { echo "install-test: STOPPED in README install block 1 (above)" >&2; exit 1; }

# ------------------------------------------------------------------ boot
say "booting $NAME (systemd-nspawn --boot, private network)"
systemd-nspawn --boot -D "$M" -M "$NAME" --private-network --register=no --keep-unit \
    --console=read-only > "$WORK/console.log" 2>&1 < /dev/null &
NSPAWN_PID=$!
for _ in $(seq 100); do
  # The container's PID 1 is nspawn's child once it has become systemd (before that the
  # child is a short-lived copy of nspawn).
  LEADER=$(pgrep -P "$NSPAWN_PID" -x systemd | head -1 || true)
  [ -n "$LEADER" ] && break
  kill -0 "$NSPAWN_PID" 2>/dev/null || break
  sleep 0.1
done
[ -n "$LEADER" ] || { cat "$WORK/console.log" >&2; echo "install-test: STOPPED: the container did not start" >&2; exit 1; }
inside() { nsenter -t "$LEADER" -a -- "${ENV[@]}" "$@"; }
for _ in $(seq 300); do  # systemd answers on its private socket once it is up
  inside test -S /run/systemd/private 2>/dev/null && break
  kill -0 "$NSPAWN_PID" 2>/dev/null || break
  sleep 0.1
done
state=$(timeout 120 nsenter -t "$LEADER" -a -- "${ENV[@]}" systemctl is-system-running --wait 2>&1 || true)
case $state in
  running) ;;
  degraded) inside systemctl --failed --no-legend --no-pager >&2 || true ;;  # said, not fatal: not ours
  *) tail -30 "$WORK/console.log" >&2; echo "install-test: STOPPED: boot ended '$state'" >&2; exit 1 ;;
esac
say "booted: systemd $(inside systemctl --version | head -1 | awk '{print $2}'), system $state"
inside ip addr add "$PUBLIC_IP/32" dev lo

journal() {
  echo "--- journal of pbx-relay and pbx-push (last 60 lines)" >&2
  inside journalctl -u pbx-relay -u pbx-push --no-pager -n 60 >&2 || true
}

# ------------------------------------------------------------------ the other blocks, booted
for n in $(seq 2 "$nblocks"); do
  say "README install block $n"
  inside /bin/bash /root/install-test/run-block.sh "$n" < /dev/null \
    || { journal; echo "install-test: STOPPED in README install block $n (above)" >&2; exit 1; }
done

say "checks"
inside /bin/bash /root/install-test/checks.sh < /dev/null \
  || { journal; echo "install-test: STOPPED in the checks (above)" >&2; exit 1; }
say "install test passed"
