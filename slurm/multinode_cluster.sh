#!/usr/bin/env bash
# A SLURM cluster of several nodes on one machine (root only): the controller and each compute node live in
# network namespaces of their own, joined by a bridge, so that jobs really span nodes: separate addresses,
# MASTER_ADDR from the node list, gloo across hosts, array tasks on different nodes, a node that dies.
#
#   slurm/multinode_cluster.sh up [--nodes N]   N compute nodes node1..nodeN (default 2), wait until all idle
#   slurm/multinode_cluster.sh down             stop every daemon by pid, remove what `up` created
#   slurm/multinode_cluster.sh status           daemons, nodes, queue
#   slurm/multinode_cluster.sh kill-node NAME   SIGKILL every process of node NAME (its slurmd and its tasks),
#                                               as a node that loses power
#   slurm/multinode_cluster.sh start-node NAME  start node NAME's slurmd again (the node returns to service)
#
# Layout: bridge c2s-br0 holds $NET.1 in this namespace (sbatch, squeue and the tests reach the cluster
# through it); namespace c2s-ctl runs slurmctld on $NET.2; namespace c2s-nodeK runs `slurmd -N nodeK` on
# $NET.(10+K), its veth pair c2s-vK (bridge side) / eth0 (node side). Each namespace has its own hosts file
# (/etc/netns/NS/hosts, bound over /etc/hosts in the daemons' mount namespace: every node by name, and this
# machine's host name as the node itself, so that a task on nodeK sees itself as nodeK). munged runs in this namespace; its socket is a file every namespace shares.
# Only addresses inside $NET.0/24 are used, all of them on namespaces and links this script creates; every
# name created is recorded in $STATE/run/created and only those are removed (also after a crash: `up`
# first removes the leftovers its record names). Defaults: C2SEG_SLURM_NODES_DIR=/tmp/c2seg-slurm-nodes,
# C2SEG_SLURM_NODES_NET=10.203.0, C2SEG_SLURM_NODES_PORT=6827 (slurmctld; slurmd uses the next port), so the
# one-node cluster of slurm/local_cluster.sh can run beside it.
set -euo pipefail

STATE=${C2SEG_SLURM_NODES_DIR:-/tmp/c2seg-slurm-nodes}
NET=${C2SEG_SLURM_NODES_NET:-10.203.0}
PORT=${C2SEG_SLURM_NODES_PORT:-6827}
CONF=$STATE/etc/slurm.conf
CREATED=$STATE/run/created
BRIDGE=c2s-br0
CTL_NS=c2s-ctl
export SLURM_CONF=$CONF
TAG=multinode_cluster
# shellcheck source=slurm/cluster_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/cluster_lib.sh"

node_ns() { echo "c2s-$1"; }            # node_ns node2 -> c2s-node2
node_addr() { echo "$NET.$((10 + ${1#node}))"; }
record() { echo "$1 $2" >>"$CREATED"; }  # record KIND NAME: something to remove on `down`
nodes() { sed -n 's/^node \(.*\)/\1/p' "$CREATED" 2>/dev/null; }

remove_created() {  # everything the record names, newest first
  [ -s "$CREATED" ] || return 0
  local kind name
  tac "$CREATED" | while read -r kind name; do
    case $kind in
      netns) ip netns pids "$name" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
             ip netns del "$name" 2>/dev/null || true ;;
      link) ip link del "$name" 2>/dev/null || true ;;
      hosts) rm -rf "/etc/netns/$name" ;;
    esac
  done
  rm -f "$CREATED"
}

make_namespace() {  # make_namespace NS INDEX ADDR HOSTS: a namespace on the bridge through veth c2s-vINDEX
  local ns=$1 veth=c2s-v$2
  ip netns add "$ns" && record netns "$ns"
  ip link add "$veth" type veth peer name "$veth-n" && record link "$veth"
  ip link set "$veth" master "$BRIDGE" up
  ip link set "$veth-n" netns "$ns"
  ip -n "$ns" link set "$veth-n" name eth0
  ip -n "$ns" addr add "$3/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  mkdir -p "/etc/netns/$ns" && record hosts "$ns"
  printf '%s\n' "$4" >"/etc/netns/$ns/hosts"
}

write_config() {  # write_config N
  local cpus mem k
  cpus=$(nproc)
  mem=$(awk -v n="$1" '/MemTotal/ {printf "%d", $2 / 1024 * 0.9 / n}' /proc/meminfo)
  mkdir -p "$STATE"/{etc,run,log,state,spool,munge}
  {
    cat <<EOF
# Written by slurm/multinode_cluster.sh: $1 nodes in network namespaces, $cpus CPUs each (the same machine's).
ClusterName=c2seg-nodes
SlurmctldHost=localhost($NET.2)
SlurmdSpoolDir=$STATE/spool/%n
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmdLogFile=$STATE/log/slurmd-%n.log
# least loaded nodes first: the tasks of an array spread over the nodes
SelectTypeParameters=CR_Core,CR_LLN
# a node silent for 10 s is down: its jobs are requeued (--requeue) or ended, never left waiting
SlurmdTimeout=10
$(common_config)
EOF
    for k in $(seq "$1"); do
      echo "NodeName=node$k NodeAddr=$(node_addr "node$k") CPUs=$cpus RealMemory=$mem State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=node[1-$1] Default=YES MaxTime=INFINITE State=UP"
  } >"$CONF"
}

in_namespace() {  # in_namespace NS CMD...: CMD in NS's network namespace, with NS's hosts file as /etc/hosts
  # (a mount namespace of its own for that; unlike `ip netns exec`, /sys and its cgroups stay as they are,
  # which slurmd needs)
  nsenter --net="/run/netns/$1" unshare --mount --propagation private \
    sh -c 'mount --bind "/etc/netns/$0/hosts" /etc/hosts && exec "$@"' "$1" "${@:2}"
}

start_node() {  # start_node NAME: its slurmd, in its namespace
  alive "$STATE/run/slurmd-$1.pid" && return 0
  mkdir -p "$STATE/spool/$1"
  in_namespace "$(node_ns "$1")" /usr/sbin/slurmd -N "$1" || die "slurmd of $1 did not start; see $STATE/log/slurmd-$1.log"
}

node_states() { sinfo -h -N -o '%N %T' 2>/dev/null; }

wait_idle() {  # wait_idle NODE...: each node idle (or running jobs) within 60 s
  local node
  for node in "$@"; do wait_node "$node" "$STATE/log/slurmd-$node.log"; done
}

all_slurmd_alive() {
  local node
  for node in $(nodes); do alive "$STATE/run/slurmd-$node.pid" || return 1; done
}

up() {
  local n=$1 k hosts
  [ "$(id -u)" = 0 ] || die "network namespaces need root; use slurm/local_cluster.sh for a one-node cluster"
  install_if_missing
  if alive "$STATE/run/slurmctld.pid" && [ "$(nodes | wc -l)" = "$n" ] && all_slurmd_alive; then
    say "already up ($CONF): $(node_states | tr '\n' ' ')"
    return 0
  fi
  down >/dev/null
  mkdir -p "$STATE/run"
  ip link add "$BRIDGE" type bridge && record link "$BRIDGE"
  ip addr add "$NET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  hosts="127.0.0.1 localhost"$'\n'"$NET.2 c2s-ctl"
  for k in $(seq "$n"); do hosts+=$'\n'"$(node_addr "node$k") node$k"; done
  make_namespace "$CTL_NS" 0 "$NET.2" "$hosts"
  for k in $(seq "$n"); do
    record node "node$k"
    make_namespace "$(node_ns "node$k")" "$k" "$(node_addr "node$k")" \
      "$hosts"$'\n'"$(node_addr "node$k") $(hostname)"
  done
  write_config "$n"
  start_munge
  in_namespace "$CTL_NS" /usr/sbin/slurmctld -c -i || die "slurmctld did not start; see $STATE/log/slurmctld.log"
  for k in $(seq "$n"); do start_node "node$k"; done
  mapfile -t all < <(nodes)
  wait_idle "${all[@]}"
  say "up: ${all[*]} on $NET.11-$((10 + n)), controller $NET.2:$PORT; config $CONF"
  say "for sbatch/squeue in your shell: export SLURM_CONF=$CONF"
}

kill_node() {  # kill_node NAME: every process in the node's namespace, by pid
  local ns pids
  ns=$(node_ns "$1")
  grep -qx "node $1" "$CREATED" 2>/dev/null || die "no node $1 in this cluster (nodes: $(nodes | tr '\n' ' '))"
  pids=$(ip netns pids "$ns" | tr '\n' ' ')
  [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
  rm -f "$STATE/run/slurmd-$1.pid"
  say "killed node $1 (pids ${pids:-none})"
}

down() {
  local node
  if alive "$STATE/run/slurmctld.pid"; then scancel --quiet --user "$(id -un)" 2>/dev/null || true; fi
  for node in $(nodes); do stop_pidfile "slurmd of $node" "$STATE/run/slurmd-$node.pid"; done
  stop_pidfile slurmctld "$STATE/run/slurmctld.pid"
  stop_pidfile munged "$STATE/munge/munged.pid"
  remove_created
  say "down"
}

status() {
  local rc=0 node
  if alive "$STATE/run/slurmctld.pid"; then say "slurmctld running (pid $(cat "$STATE/run/slurmctld.pid"))"
  else say "slurmctld not running"; rc=1; fi
  for node in $(nodes); do
    if alive "$STATE/run/slurmd-$node.pid"; then say "slurmd of $node running (pid $(cat "$STATE/run/slurmd-$node.pid"))"
    else say "slurmd of $node not running"; rc=1; fi
  done
  if alive "$STATE/run/slurmctld.pid"; then say "config $CONF"; sinfo -N; squeue; fi
  return $rc
}

case "${1:-}" in
  up)
    nodes_wanted=2
    if [ "${2:-}" = --nodes ]; then nodes_wanted=${3:?--nodes needs a number}; fi
    [[ $nodes_wanted =~ ^[1-9][0-9]?$ ]] || die "--nodes must be 1..99, got '$nodes_wanted'"
    up "$nodes_wanted" ;;
  down) down ;;
  status) status ;;
  kill-node) kill_node "${2:?kill-node needs a node name}" ;;
  start-node) start_node "${2:?start-node needs a node name}"; wait_idle "$2"; say "node $2 is back" ;;
  *) echo "usage: $0 up [--nodes N] | down | status | kill-node NAME | start-node NAME" \
          "(state under \$C2SEG_SLURM_NODES_DIR, default /tmp/c2seg-slurm-nodes)" >&2; exit 2 ;;
esac
