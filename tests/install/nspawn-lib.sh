# Sourced by run-in-nspawn.sh and quickstart-in-nspawn.sh (tests/install): the tools, the
# cached debootstrap tree of a fresh Debian 12, a machine copied from it ($WORK, $M, $NAME)
# removed at exit, and snapshot_checkout. Expects HERE, ROOT and say().
CACHE=${PBX_INSTALL_CACHE:-/var/tmp/pbx-relay-debootstrap-cache}
MIRROR=${PBX_INSTALL_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm

# ------------------------------------------------------------------ tools
missing=""
command -v systemd-nspawn >/dev/null || missing="$missing systemd-container"
command -v debootstrap >/dev/null || missing="$missing debootstrap"
command -v nsenter >/dev/null || missing="$missing util-linux"
if [ -n "$missing" ]; then
  say "installing$missing"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# ------------------------------------------------------------------ the cached tree
mkdir -p "$CACHE/apt-archives/partial" "$CACHE/pip"
TREE=$CACHE/$SUITE
exec 8>"$CACHE/lock"
flock 8  # one debootstrap at a time; a half-built tree is never used
if [ ! -e "$TREE/.complete" ]; then
  say "debootstrap $SUITE from $MIRROR into $TREE (once; about a minute)"
  rm -rf "$TREE.tmp"
  debootstrap "$SUITE" "$TREE.tmp" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; echo "install-test: STOPPED: debootstrap failed ($CACHE/debootstrap.log)" >&2; exit 1; }
  touch "$TREE.tmp/.complete"
  rm -rf "$TREE" && mv "$TREE.tmp" "$TREE"
fi
flock -u 8

# ------------------------------------------------------------------ the machine
WORK=$(mktemp -d /var/tmp/pbx-relay-install.XXXXXX)
M=$WORK/root
NAME=pbxinst-$(basename "$WORK" | sed 's/.*\.//' | tr 'A-Z' 'a-z')
NSPAWN_PID=""
LEADER=""
cleanup() {
  local rc=$?
  if [ -n "${PBX_INSTALL_KEEP:-}" ] && [ -n "$LEADER" ]; then
    echo "install-test: container left running (PBX_INSTALL_KEEP): enter with"
    echo "  nsenter -t $LEADER -a env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin bash"
    echo "  remove with: kill $NSPAWN_PID; rm -rf $WORK /run/systemd/nspawn/propagate/$NAME"
    exit $rc
  fi
  if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
    kill -TERM "$NSPAWN_PID" 2>/dev/null || true  # nspawn asks the container's systemd to power off
    for _ in $(seq 60); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$NSPAWN_PID" 2>/dev/null || true
    wait "$NSPAWN_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK" "/run/systemd/nspawn/propagate/$NAME" "/run/systemd/nspawn/propagate/$NAME-1"
  say "cleaned up (kept: $CACHE)"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "machine $NAME in $WORK"
cp -a --reflink=auto "$TREE" "$M"
rm -f "$M/.complete"
echo "$NAME" > "$M/etc/hostname"
# This host reaches the registries through its own CAs (e.g. a TLS-inspecting egress):
# the container trusts them too (ca-certificates, installed by block 1, adds them to the
# bundle) and so does pip, which otherwise trusts only its own bundled list.
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
  install -d "$M/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$M/usr/local/share/ca-certificates/"
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$M/etc/pip.conf"
fi

# A git repository at $1 holding this checkout's working tree as it is (tracked and
# untracked files, not ignored ones): what `git clone <this repository>` gets inside.
snapshot_checkout() {
  mkdir -p "$1"
  (cd "$ROOT" && git ls-files -z -co --exclude-standard) \
    | while IFS= read -r -d '' f; do [ -e "$ROOT/$f" ] && printf '%s\0' "$f"; done \
    | (cd "$ROOT" && tar --null -T - -cf -) | tar -C "$1" -xf -
  git -C "$1" init -q
  git -C "$1" add -A
  git -C "$1" -c user.name=install-test -c user.email=install-test@localhost commit -qm "checkout as tested"
}
