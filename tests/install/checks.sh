#!/bin/bash
# After the README's install blocks, inside the booted container (root): both services
# run, every operator command works as printed (no token given), and a reload is applied
# by the time `systemctl reload` returns. Prints "check: ..." per check; the first that
# fails prints "FAILED check: ..." with what it saw, and the script exits 1.
# Needs, in $T (default /root/install-test): inside.py, renewal-hook, block-5.out.
set -u
T=${T:-/root/install-test}
SERIAL=0123456789
USERNAME=201
export PYTHONPATH=/usr/local/src/pbx-relay
PY=/opt/pbx-relay/bin/python3

fail() { echo "FAILED check: $current: $*" >&2; exit 1; }
check() { current=$1; echo "check: $1"; }
# run CMD...: its output in $out; fail unless it exits 0
run() {
  out=$("$@" 2>&1) || fail "\`$*\` exited $?: $out"
  printf '%s\n' "$out" | sed 's/^/    /'
}
has() { case $out in *"$1"*) ;; *) fail "expected \"$1\" in the output above" ;; esac; }

check "both services active, with their STATUS lines"
run systemctl is-active pbx-relay pbx-push
run systemctl show -p StatusText --value pbx-relay pbx-push
has "Serving:"

check "the PBX added in README step 5 phones home (its secret from that step's output)"
secret=$(awk '$1 == "secret" { print $2 }' "$T/block-5.out")
[ -n "$secret" ] || fail "no secret line in README step 5's output"
mkfifo "$T/pbx.in"
"$PY" "$T/inside.py" pbx-online "$SERIAL" "$secret" < "$T/pbx.in" > "$T/pbx.out" 2>&1 &
pbx_pid=$!
exec 9> "$T/pbx.in"  # the PBX holds its connection until this closes
trap 'exec 9>&-; wait $pbx_pid 2>/dev/null' EXIT
for _ in $(seq 50); do
  grep -q registered "$T/pbx.out" && break
  kill -0 $pbx_pid 2>/dev/null || fail "$(cat "$T/pbx.out")"
  sleep 0.2
done
grep -q registered "$T/pbx.out" || fail "no registration within 10 s: $(cat "$T/pbx.out")"
sed 's/^/    /' "$T/pbx.out"

check "pbx-relay pbxs / pbx list / pbx show"
run pbx-relay pbxs
has "1 in the directory, 1 online"
run pbx-relay pbx list
has "$SERIAL"
run pbx-relay pbx show "$SERIAL"
has "state       online"
has "devices     0"

check "a device registered as the relay does it (push API, the relay's own token)"
. /etc/pbx-relay/secrets.env
body='{"provider": "fcm", "token": "install-test-push-token", "param": "test.install.app",
       "serial": "'$SERIAL'", "username": "'$USERNAME'", "ip": "198.51.100.20", "port": 5060, "transport": "tcp"}'
run curl -fsS -X PUT -H "Authorization: Bearer $PBX_RELAY_PUSH_TOKEN" -H "Content-Type: application/json" \
  -d "$body" http://127.0.0.1:8443/v1/devices
device=$(printf '%s' "$out" | sed -n 's/.*"device_id": *"\([^"]*\)".*/\1/p')
[ -n "$device" ] || fail "no device_id"

check "pbx-relay devices / device / pbx show / log / export, without PBX_RELAY_OPERATOR_TOKEN"
[ -z "${PBX_RELAY_OPERATOR_TOKEN:-}" ] || fail "the test's own environment has an operator token"
run pbx-relay devices
has "$device"
run pbx-relay device "$device"
has "198.51.100.20"
run pbx-relay pbx show "$SERIAL"
has "devices     1"
run pbx-relay log "$SERIAL" "$USERNAME"
run pbx-relay export "$SERIAL" "$USERNAME"
has "$device"
case $out in *install-test-push-token*) fail "export shows the push token" ;; esac

check "pbx-push devices / device / log / export / config check, and pbx-relay config check"
run pbx-push devices
has "$device"
run pbx-push device "$device"
has "$USERNAME"
run pbx-push log "$SERIAL" "$USERNAME"
run pbx-push export "$SERIAL" "$USERNAME"
has "$device"
run pbx-push config check
run pbx-relay config check

check "pbx-relay erase, then pbx-push erase (a device registered again)"
run pbx-relay erase "$SERIAL" "$USERNAME"
has "1 device(s)"
run pbx-push devices --json
[ "$out" = "[]" ] || fail "devices left after erase"
run curl -fsS -X PUT -H "Authorization: Bearer $PBX_RELAY_PUSH_TOKEN" -H "Content-Type: application/json" \
  -d "$body" http://127.0.0.1:8443/v1/devices
run pbx-push erase "$SERIAL" "$USERNAME"
has "1 device(s)"
unset PBX_RELAY_PUSH_TOKEN

for unit in pbx-relay pbx-push; do
  check "systemctl reload $unit does not return before the service reloaded (held by SIGSTOP for 3 s)"
  before=$(cat "/run/$unit/reloads")
  systemctl kill --kill-who=main -s SIGSTOP "$unit"
  timeout 3 systemctl reload "$unit"; rc=$?
  systemctl kill --kill-who=main -s SIGCONT "$unit"
  [ $rc = 124 ] || fail "systemctl reload returned (exit $rc) while $unit was stopped and could not reload"
  for _ in $(seq 50); do  # the reload job goes on without the client that timed out
    [ "$(systemctl show -p ActiveState --value "$unit")" = active ] && break
    sleep 0.1
  done
  run systemctl reload "$unit"
  run cat "/run/$unit/reloads"
  echo "    (before: $before)"
  [ "$(echo "$out" | awk '{ print $3 - $2 }')" = 0 ] || fail "a reload still under way"
  [ "$(echo "$out" | awk '{ print $3 }')" -ge "$(( $(echo "$before" | awk '{ print $3 }') + 2 ))" ] \
    || fail "not two more reloads done"
done

check "certificate renewal: the README's deploy hook, and the new certificate is served when it returns"
install -D -m 0755 "$T/renewal-hook" /etc/letsencrypt/renewal-hooks/deploy/pbx-relay
# The operator's one-time change: relay.toml points at the files the hook installs.
sed -i -e 's|^# tls_cert = |tls_cert = |' -e 's|^# tls_key = |tls_key = |' /etc/pbx-relay/relay.toml
grep -q '^tls_cert = "/etc/pbx-relay/tls/fullchain.pem"' /etc/pbx-relay/relay.toml || fail "tls_cert not in relay.toml"
for round in first second; do
  run "$PY" "$T/inside.py" renew /etc/letsencrypt/live/relay.test /etc/letsencrypt/renewal-hooks/deploy/pbx-relay
done

check "systemctl reload pbx-push: FCM credentials live when it returns"
"$PY" "$T/inside.py" fcm-account /etc/pbx-push/firebase-sa.json
chgrp pbx-push /etc/pbx-push/firebase-sa.json && chmod 0640 /etc/pbx-push/firebase-sa.json
sed -i 's|^# service_account = .*|service_account = "/etc/pbx-push/firebase-sa.json"|' /etc/pbx-push/push.toml
run systemctl show -p StatusText --value pbx-push
has "FCM dry-run"
run systemctl reload pbx-push
run systemctl show -p StatusText --value pbx-push  # at once
has "FCM live"

check "journald keeps 30 days (README step 6)"
# The settings in force, not the commented-out defaults.
out=$(systemd-analyze cat-config systemd/journald.conf | grep -v '^#' | grep .) || fail "cat-config: $out"
printf '%s\n' "$out" | sed 's/^/    /'
has "MaxRetentionSec=30day"
has "MaxFileSec=1day"
run systemctl is-active systemd-journald

check "pbx remove; restart and stop return, with the PBX connected"
run pbx-relay pbx remove "$SERIAL"
has "removed $SERIAL"
run systemctl restart pbx-relay
run systemctl is-active pbx-relay
run systemctl stop pbx-relay pbx-push
out=$(systemctl is-active pbx-relay pbx-push)
[ "$(echo $out)" = "inactive inactive" ] || fail "after stop: $out"
echo "all checks passed"
