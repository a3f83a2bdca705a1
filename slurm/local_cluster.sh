#!/usr/bin/env bash
# A one-node SLURM cluster on localhost (munge + slurmctld + slurmd), for trying `c2seg slurm submit` on a
# workstation and for the test suite.
#
#   slurm/local_cluster.sh up       install slurm-wlm + munge when missing (root: apt-get), write the config,
#                                   start the daemons, wait until node `localhost` is idle
#   slurm/local_cluster.sh down     stop the daemons by their pid files
#   slurm/local_cluster.sh status   daemons, node state, queue
#
# Everything lives under $C2SEG_SLURM_DIR (default /tmp/c2seg-slurm): etc/slurm.conf, run/*.pid, log/*.log,
# state/, spool/, munge/. Clients find the config through SLURM_CONF=$C2SEG_SLURM_DIR/etc/slurm.conf (printed
# by `up`; `c2seg slurm` sets it by itself); as root, /etc/slurm/slurm.conf is linked to it when absent.
# Ports: $C2SEG_SLURM_PORT (slurmctld, default 6817) and the next one (slurmd). Idempotent: `up` on a running
# cluster and `down` on a stopped one do nothing.
set -euo pipefail

STATE=${C2SEG_SLURM_DIR:-/tmp/c2seg-slurm}
PORT=${C2SEG_SLURM_PORT:-6817}
CONF=$STATE/etc/slurm.conf
SYSTEM_CONF=/etc/slurm/slurm.conf
export SLURM_CONF=$CONF

TAG=local_cluster
# shellcheck source=slurm/cluster_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/cluster_lib.sh"

write_config() {
  local cpus mem
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
  mkdir -p "$STATE"/{etc,run,log,state,spool,munge}
  cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh: one node 'localhost' with this machine's $cpus CPUs.
ClusterName=c2seg-local
SlurmctldHost=localhost
SlurmdSpoolDir=$STATE/spool
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmdLogFile=$STATE/log/slurmd.log
SelectTypeParameters=CR_Core
SlurmdTimeout=300
$(common_config)
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() { sinfo -h -n localhost -o %T 2>/dev/null | head -1; }

up() {
  install_if_missing
  if alive "$STATE/run/slurmctld.pid" && alive "$STATE/run/slurmd.pid"; then
    say "already up ($CONF), node localhost: $(node_state)"
    return 0
  fi
  write_config
  if [ "$(id -u)" = 0 ] && [ -d /etc/slurm ] && [ ! -e "$SYSTEM_CONF" ]; then ln -s "$CONF" "$SYSTEM_CONF"; fi
  start_munge
  if ! alive "$STATE/run/slurmctld.pid"; then
    /usr/sbin/slurmctld -c -i || die "slurmctld did not start; see $STATE/log/slurmctld.log"
  fi
  if ! alive "$STATE/run/slurmd.pid"; then
    /usr/sbin/slurmd -N localhost || die "slurmd did not start; see $STATE/log/slurmd.log"
  fi
  wait_node localhost "$STATE/log/slurmd.log"
  say "up: node localhost $(node_state) with $(nproc) CPUs, partition debug; config $CONF"
  say "for sbatch/squeue in your shell: export SLURM_CONF=$CONF"
}

down() {
  if alive "$STATE/run/slurmctld.pid"; then
    scancel --quiet --user "$(id -un)" 2>/dev/null || true
  fi
  stop_pidfile slurmd "$STATE/run/slurmd.pid"
  stop_pidfile slurmctld "$STATE/run/slurmctld.pid"
  stop_pidfile munged "$STATE/munge/munged.pid"
  if [ -L "$SYSTEM_CONF" ] && [ "$(readlink "$SYSTEM_CONF")" = "$CONF" ]; then rm -f "$SYSTEM_CONF"; fi
  say "down"
}

status() {
  local name file rc=0
  for name in munged slurmctld slurmd; do
    file=$STATE/run/$name.pid
    [ $name = munged ] && file=$STATE/munge/munged.pid
    if alive "$file"; then say "$name running (pid $(cat "$file"))"; else say "$name not running"; rc=1; fi
  done
  if [ $rc = 0 ]; then
    say "config $CONF"
    sinfo
    squeue
  fi
  return $rc
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status   (state under \$C2SEG_SLURM_DIR, default /tmp/c2seg-slurm)" >&2; exit 2 ;;
esac
