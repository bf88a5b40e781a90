#!/usr/bin/env bash
# Two test "hosts" on one machine: network namespaces joined by a veth pair (needs root and iproute2).
#
#   tests/netns_two_hosts.sh up   NAME   -> creates namespaces NAME0 / NAME1, addresses 10.77.0.1 / 10.77.0.2
#                                          (inside the namespaces only) on interfaces NAMEa / NAMEb
#   tests/netns_two_hosts.sh down NAME   -> removes them (the veth pair goes with its namespaces)
#
# Then `ip netns exec NAME0 <cmd>` runs a command on host 0. Used by tests/test_multinode_netns.py to
# run one torchrun "node" per namespace, rendezvousing over the veth link. NAME must be short (veth
# interface names are limited to 15 characters).
set -euo pipefail

action=${1:?usage: $0 up|down NAME}
name=${2:?usage: $0 up|down NAME}

case "$action" in
  up)
    ip netns add "${name}0"
    ip netns add "${name}1"
    ip link add "${name}a" type veth peer name "${name}b"
    ip link set "${name}a" netns "${name}0"
    ip link set "${name}b" netns "${name}1"
    ip -n "${name}0" addr add 10.77.0.1/24 dev "${name}a"
    ip -n "${name}1" addr add 10.77.0.2/24 dev "${name}b"
    for i in 0 1; do
      ip -n "${name}${i}" link set lo up
    done
    ip -n "${name}0" link set "${name}a" up
    ip -n "${name}1" link set "${name}b" up
    ;;
  down)
    ip netns del "${name}0" 2>/dev/null || true
    ip netns del "${name}1" 2>/dev/null || true
    ;;
  *)
    echo "usage: $0 up|down NAME" >&2
    exit 2
    ;;
esac
