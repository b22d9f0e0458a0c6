#!/bin/bash
# Remove the namespaces up.sh created (and with them their veths, NAT tables
# and conntrack state). Same PRT_NS_PREFIX as up.sh (default "prt-").
# Processes still running inside them are not killed here: stop what you
# started in them (by PID) before calling this.
P=${PRT_NS_PREFIX:-prt-}
case "$P" in
  *[!A-Za-z0-9_.-]*|'') echo "down.sh: bad PRT_NS_PREFIX '$P'" >&2; exit 2 ;;
esac
for role in phone nat1 pub nat2 pbx; do
  ns="$P$role"
  if ip netns list | awk '{print $1}' | grep -qxF "$ns"; then
    pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
    [ -n "${pids// /}" ] && echo "down.sh: warning: processes still in $ns: $pids" >&2
    ip netns del "$ns" && echo "down.sh: removed $ns"
  fi
done
exit 0
