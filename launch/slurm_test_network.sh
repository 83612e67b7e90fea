# The private network of the two-node SLURM test cluster: a bridge with the controller's address
# and, per node, a network namespace with its own address, linked to the bridge by a veth pair.
# Sourced by slurm_test_cluster.sh, whose settings it uses (SUBNET, BRIDGE, CTL_NET_ADDR,
# TWO_NODES, NET_FILE, ETC); only objects it records in NET_FILE are ever removed.

netns_of() { echo "sdslurm-$1"; }

# Make the bridge and, per node, a network namespace linked to it, and record each object in
# NET_FILE as it is made, so that `stop` (or a failed start) removes exactly those. Fails, with
# the reason on stderr, where namespaces, bridges or veth pairs cannot be made.
make_network() {
    local i node ns
    command -v ip >/dev/null || { echo "no 'ip' command (package iproute2)"; return 1; }
    command -v unshare >/dev/null || { echo "no 'unshare' command (package util-linux)"; return 1; }
    if ip -4 -o addr show | grep -q " inet $SUBNET\." || [[ -n "$(ip -4 route show "$SUBNET.0/24" 2>/dev/null)" ]]; then
        echo "the subnet $SUBNET.0/24 is already in use here; set SPARSE_DETR_SLURM_SUBNET to a free one"
        return 1
    fi
    ip link add "$BRIDGE" type bridge 2>&1 || { echo "cannot create a bridge (needs CAP_NET_ADMIN)"; return 1; }
    echo "link $BRIDGE" >>"$NET_FILE"
    ip addr add "$CTL_NET_ADDR/24" dev "$BRIDGE" && ip link set "$BRIDGE" up || return 1
    for i in "${!TWO_NODES[@]}"; do
        node="${TWO_NODES[i]}"; ns="$(netns_of "$node")"
        ip netns add "$ns" 2>&1 || { echo "cannot create network namespace $ns (needs CAP_SYS_ADMIN)"; return 1; }
        echo "netns $ns" >>"$NET_FILE"
        ip link add "sdslurm-v$((i + 1))" type veth peer name eth0 netns "$ns" 2>&1 || return 1
        echo "link sdslurm-v$((i + 1))" >>"$NET_FILE"
        ip link set "sdslurm-v$((i + 1))" master "$BRIDGE" up &&
            ip -n "$ns" link set lo up &&
            ip -n "$ns" addr add "$SUBNET.$((i + 1))/24" dev eth0 &&
            ip -n "$ns" link set eth0 up || return 1
    done
    # The nodes' own hosts file: the host's entries, then the nodes (so MASTER_ADDR=node1 resolves).
    { cat /etc/hosts
      echo "# slurm_test_cluster.sh: the test cluster's private network"
      for i in "${!TWO_NODES[@]}"; do echo "$SUBNET.$((i + 1)) ${TWO_NODES[i]}"; done
    } >"$ETC/hosts"
    # Try what start_slurmds will do, so that a machine that allows the network but not the other
    # namespaces a node needs falls back to one node instead of failing to start.
    for node in "${TWO_NODES[@]}"; do
        set_node_prefix "$node"
        "${NODE_PREFIX[@]}" true 2>&1 || { echo "cannot enter $node's namespaces (nsenter, unshare --uts --mount)"; return 1; }
    done
}

# NODE_PREFIX: the command prefix that runs a command as node $1: in its network namespace, and in
# UTS and mount namespaces of its own where the host name is the node's and /etc/hosts is the
# private one (a bind mount seen by that command and its children only). Every step execs, so the
# command keeps the pid. nsenter rather than `ip netns exec`, which would mount a sysfs of its own
# without /sys/fs/cgroup, where slurmd's cgroup plugin fails to start.
set_node_prefix() {
    NODE_PREFIX=(nsenter --net="/run/netns/$(netns_of "$1")" unshare --uts --mount --propagation private --
                 sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"' sh "$1" "$ETC/hosts")
}

# Remove what make_network recorded, newest first (a namespace's veth end goes with it).
remove_network() {
    [[ -f "$NET_FILE" ]] || return 0
    local kind name
    while read -r kind name; do
        case "$kind" in
            netns) ip netns del "$name" 2>/dev/null && log "removed network namespace $name" || true ;;
            link) ip link del "$name" 2>/dev/null && log "removed link $name" || true ;;
        esac
    done < <(tac "$NET_FILE")
    rm -f "$NET_FILE"
}
