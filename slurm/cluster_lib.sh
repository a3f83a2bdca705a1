# Shared by slurm/local_cluster.sh (one node on localhost) and slurm/multinode_cluster.sh (N nodes in network
# namespaces): messages, pid files, installing slurm-wlm + munge, starting munged. Callers set STATE and TAG.

say() { echo "[$TAG] $*"; }
die() { echo "[$TAG] error: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the process named in PIDFILE runs (a zombie, dead but not yet reaped, does not)
  local pid
  [ -s "$1" ] && pid=$(cat "$1") && kill -0 "$pid" 2>/dev/null || return 1
  [ "$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)" != Z ]
}

install_if_missing() {
  local missing=0 bin
  for bin in slurmctld slurmd munged sbatch; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing=1
  done
  [ $missing = 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    die "slurm-wlm and munge are not installed; as root run: apt-get install slurm-wlm munge (or use your cluster)"
  fi
  command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and apt-get is not available to install them"
  say "installing slurm-wlm and munge with apt-get (one time, ~1 min)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
    || die "apt-get install slurm-wlm munge failed"
}

start_munge() {
  local pidfile=$STATE/munge/munged.pid key=/etc/munge/munge.key
  alive "$pidfile" && return 0
  if [ ! -s "$key" ]; then
    [ "$(id -u)" = 0 ] || die "$key is missing (create it as root with: mungekey -c)"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey -c -k "$key"; else dd if=/dev/urandom of="$key" bs=1024 count=1 2>/dev/null; fi
    chown munge:munge "$key" 2>/dev/null || true
    chmod 400 "$key"
  fi
  local -a args=(--socket="$STATE/munge/munge.socket.2" --pid-file="$pidfile" --log-file="$STATE/munge/munged.log"
                 --seed-file="$STATE/munge/munged.seed" --key-file="$key")
  if [ "$(id -u)" = 0 ] && id munge >/dev/null 2>&1; then
    chown munge:munge "$STATE/munge"
    chmod 755 "$STATE/munge"
    runuser -u munge -- /usr/sbin/munged "${args[@]}" || die "munged did not start; see $STATE/munge/munged.log"
  else
    munged "${args[@]}" || die "munged did not start; see $STATE/munge/munged.log"
  fi
  for _ in $(seq 50); do [ -S "$STATE/munge/munge.socket.2" ] && return 0; sleep 0.1; done
  die "munged socket $STATE/munge/munge.socket.2 did not appear; see $STATE/munge/munged.log"
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE
  local pid
  alive "$2" || { rm -f "$2"; return 0; }
  pid=$(cat "$2")
  kill "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || { say "stopped $1 (pid $pid)"; rm -f "$2"; return 0; }; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  say "killed $1 (pid $pid) after 10 s"
  rm -f "$2"
}


common_config() {  # the slurm.conf lines both clusters share (STATE and PORT set by the caller)
  cat <<EOF
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=$(id -un)
SlurmdUser=root
AuthType=auth/munge
# cred_expire: a requeued job may start again after 10 s (default 120)
AuthInfo=socket=$STATE/munge/munge.socket.2,cred_expire=10
CredType=cred/munge
StateSaveLocation=$STATE/state
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
InactiveLimit=0
Waittime=0
EOF
}

wait_node() {  # wait_node NODE SLURMD_LOG: the node idle (or running jobs) within 60 s; resumed if down/drained
  local state=""
  for _ in $(seq 300); do
    state=$(sinfo -h -n "$1" -o %T 2>/dev/null | head -1)
    case "$state" in
      idle*|mixed*|allocated*) return 0 ;;
      down*|drain*) scontrol update nodename="$1" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.2
  done
  die "node $1 is '${state:-unknown}' after 60 s; see $STATE/log/slurmctld.log and $2"
}
