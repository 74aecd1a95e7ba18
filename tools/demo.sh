#!/usr/bin/env bash
# `make demo`: a small lab (3 nodes x 2 pods in network namespaces, the real
# node agent and the real fan plugin), checked with the ping matrix printed,
# then torn down -- always, whether the check passed, failed or was
# interrupted. Exit code: the check's (0 when everything held).
#
#   DEMO_PREFIX=...  lab name prefix (default fandemo-)
#   DEMO_NODES=3 DEMO_PODS=2 DEMO_FANMAP=bpf DEMO_ENCAP=vxlan
#   DEMO_OVERLAY6=fd00:50::/48  dual-stack pods (the IPv6 overlay); empty for IPv4 only
#   DEMO_KEEP=1      leave the lab up afterwards (then: cni-fan lab down --prefix ...)
set -uo pipefail
cd "$(dirname "$0")/.."

CNI_FAN=${CNI_FAN:-.venv/bin/cni-fan}
PREFIX=${DEMO_PREFIX:-fandemo-}
NODES=${DEMO_NODES:-3}
PODS=${DEMO_PODS:-2}
FANMAP=${DEMO_FANMAP:-bpf}
ENCAP=${DEMO_ENCAP:-vxlan}
OVERLAY6=${DEMO_OVERLAY6-fd00:50::/48}
[ "$ENCAP" = ipip ] && OVERLAY6=""  # IPIP carries IPv4 only

if [ "$(id -u)" != 0 ]; then
    echo "demo: run as root (it creates network namespaces)" >&2
    exit 1
fi

teardown() {
    local rc=$?
    trap - EXIT INT TERM HUP
    if [ "${DEMO_KEEP:-0}" = 1 ]; then
        echo "demo: lab $PREFIX left up (DEMO_KEEP=1); remove it with: $CNI_FAN lab down --prefix $PREFIX" >&2
    else
        echo "== lab down" >&2
        "$CNI_FAN" lab down --prefix "$PREFIX" || echo "demo: lab down reported a problem (see above)" >&2
    fi
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

echo "== lab up: $NODES nodes x $PODS pods (encap $ENCAP, fanmap $FANMAP${OVERLAY6:+, dual-stack $OVERLAY6}), prefix $PREFIX" >&2
# --force: a lab left behind by an earlier, killed demo is replaced.
"$CNI_FAN" lab up --nodes "$NODES" --pods-per-node "$PODS" --encap "$ENCAP" --fanmap "$FANMAP" \
    ${OVERLAY6:+--overlay6 "$OVERLAY6"} --prefix "$PREFIX" --force || exit 1

echo >&2
echo "== lab check" >&2
"$CNI_FAN" lab check --prefix "$PREFIX"
