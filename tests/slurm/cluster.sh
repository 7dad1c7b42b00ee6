#!/usr/bin/env bash
# A throw-away single-node Slurm cluster on localhost, for tests (no systemd, run as root).
#
#   tests/slurm/cluster.sh start    install the Debian packages if missing, write a slurm.conf, start
#                                   munged, slurmctld, slurmd; wait until the node is idle
#   tests/slurm/cluster.sh stop     cancel the cluster's jobs, stop the daemons this script started
#                                   (by the PIDs in their pidfiles, nothing else)
#   tests/slurm/cluster.sh status   daemons alive? + sinfo
#   tests/slurm/cluster.sh env      print `export SLURM_CONF=...` (eval it to use sbatch/squeue/...)
#
# Environment: SMF_SLURM_DIR (state, spool, logs, pidfiles, slurm.conf; default
# ${TMPDIR:-/tmp}/smf-slurm), SMF_SLURMCTLD_PORT (6817), SMF_SLURMD_PORT (6818),
# SMF_SLURM_START_TIMEOUT (seconds to wait for the node to be idle, 60).
# Everything lives under SMF_SLURM_DIR; munged gets its own socket there, so a system munged or
# Slurm on the same machine is left alone.
set -euo pipefail

DIR=${SMF_SLURM_DIR:-${TMPDIR:-/tmp}/smf-slurm}
CTLD_PORT=${SMF_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SMF_SLURMD_PORT:-6818}
START_TIMEOUT=${SMF_SLURM_START_TIMEOUT:-60}
CONF=$DIR/slurm.conf
MUNGE_DIR=$DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { echo "cluster.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# process liveness: a pid is alive when /proc/PID exists and its state is not Z (zombie)
pid_alive() {
  local pid=$1 state
  [[ -n $pid && -r /proc/$pid/stat ]] || return 1
  # field 3 of /proc/PID/stat, after the ")" that closes the command name
  state=$(sed -e 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [[ -n $state && $state != Z && $state != X ]]
}

pidfile_pid() { if [[ -s $1 ]]; then tr -dc '0-9' <"$1"; fi; }

# ---------------------------------------------------------------------------------------------
install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  [[ $(id -u) == 0 ]] || die "packages missing (${missing[*]}) and not root"
  command -v apt-get >/dev/null || die "packages missing (${missing[*]}) and no apt-get"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # apt-get update only when the package lists are empty or the install fails (stale lists)
  if ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; then apt-get update -qq; fi
  if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# ---------------------------------------------------------------------------------------------
write_conf() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(slurmd -C | tr ' ' '\n' | sed -n 's/^RealMemory=//p')
  [[ -n $mem ]] || mem=1000
  # leave a little memory for the daemons themselves
  mem=$((mem > 2000 ? mem - 512 : mem))
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run"
  cat >"$CONF" <<EOF
# written by tests/slurm/cluster.sh
ClusterName=smftest
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s)
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=600
InactiveLimit=0
# schedule pending jobs every second (a requeued job waits for its BeginTime, then a cycle)
SchedulerParameters=sched_interval=1,bf_interval=1
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
  local pid
  pid=$(pidfile_pid "$MUNGE_DIR/munged.pid")
  if pid_alive "$pid"; then return 0; fi
  mkdir -p "$MUNGE_DIR"
  chown munge:munge "$MUNGE_DIR"
  chmod 0700 "$MUNGE_DIR"
  if [[ ! -s $MUNGE_DIR/munge.key ]]; then
    (umask 077; head -c 1024 /dev/urandom >"$MUNGE_DIR/munge.key")
    chown munge:munge "$MUNGE_DIR/munge.key"
    chmod 0400 "$MUNGE_DIR/munge.key"
  fi
  # the socket directory must be reachable by every user that talks to Slurm
  chmod 0755 "$MUNGE_DIR"
  # munged refuses to run as root ("Logfile is insecure"): run it as the munge user
  runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
    --log-file="$MUNGE_DIR/munged.log" --pid-file="$MUNGE_DIR/munged.pid" \
    --seed-file="$MUNGE_DIR/munged.seed" ||
    die "munged did not start: $(tail -n 3 "$MUNGE_DIR/munged.log" 2>/dev/null)"

  for _ in $(seq 50); do
    [[ -S $MUNGE_SOCKET ]] && munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "munged is not answering on $MUNGE_SOCKET"
}

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -n1; }

start() {
  [[ $(id -u) == 0 ]] || die "must run as root"
  local t0=$SECONDS
  install_packages
  mkdir -p "$DIR"
  chmod 0755 "$DIR"
  export SLURM_CONF=$CONF
  if daemons_alive; then
    log "already running (SLURM_CONF=$CONF)"
  else
    stop_daemons quiet
    write_conf
    start_munge
    # -c: fresh state (no jobs from an earlier run); both daemonise and write their pidfiles
    slurmctld -c -f "$CONF" || die "slurmctld did not start: $(tail -n 5 "$DIR/log/slurmctld.log")"
    slurmd -f "$CONF" -N "$(hostname -s)" || die "slurmd did not start: $(tail -n 5 "$DIR/log/slurmd.log")"
  fi
  # a failed controller still lets sinfo return 0: wait for the node to be idle
  local state=""
  while ((SECONDS - t0 < START_TIMEOUT)); do
    state=$(node_state)
    case $state in
      idle*|mixed*|allocated*) break ;;
      down*|drain*) scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    daemons_alive || die "a daemon died; see $DIR/log/ $(tail -n 5 "$DIR"/log/*.log 2>/dev/null)"
    sleep 0.5
  done
  case $state in
    idle*|mixed*|allocated*) ;;
    *) die "node not idle after ${START_TIMEOUT}s (state '${state}'); logs in $DIR/log" ;;
  esac
  log "up in $((SECONDS - t0))s; export SLURM_CONF=$CONF"
}

daemons_alive() {
  pid_alive "$(pidfile_pid "$MUNGE_DIR/munged.pid")" &&
    pid_alive "$(pidfile_pid "$DIR/run/slurmctld.pid")" &&
    pid_alive "$(pidfile_pid "$DIR/run/slurmd.pid")"
}

kill_pidfile() {
  local f=$1 pid
  pid=$(pidfile_pid "$f")
  if pid_alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do pid_alive "$pid" || break; sleep 0.1; done
    if pid_alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$f"
}

stop_daemons() {
  kill_pidfile "$DIR/run/slurmd.pid"
  kill_pidfile "$DIR/run/slurmctld.pid"
  kill_pidfile "$MUNGE_DIR/munged.pid"
}

stop() {
  export SLURM_CONF=$CONF
  if [[ -f $CONF ]] && pid_alive "$(pidfile_pid "$DIR/run/slurmctld.pid")"; then
    # the jobs' processes belong to this cluster: let Slurm end them before its daemons go
    local jobs
    jobs=$(squeue -h -o '%i' 2>/dev/null || true)
    if [[ -n $jobs ]]; then
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 150); do
        [[ -z $(squeue -h -o '%i' 2>/dev/null) ]] && break
        sleep 0.2
      done
    fi
  fi
  stop_daemons
  log "stopped"
}

status() {
  export SLURM_CONF=$CONF
  local name f
  for name in munged slurmctld slurmd; do
    case $name in munged) f=$MUNGE_DIR/munged.pid ;; *) f=$DIR/run/$name.pid ;; esac
    if pid_alive "$(pidfile_pid "$f")"; then echo "$name: running (pid $(pidfile_pid "$f"))"
    else echo "$name: stopped"; fi
  done
  daemons_alive && sinfo -N
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
