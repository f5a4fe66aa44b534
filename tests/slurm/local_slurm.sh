#!/usr/bin/env bash
# A real Slurm cluster on one machine, for CI and for trying slurm/*.sbatch without a cluster.
#
#   tests/slurm/local_slurm.sh up       install slurm-wlm + munge with apt if missing, write slurm.conf,
#                                       start munged, slurmctld and one slurmd per fake node, wait for idle
#   tests/slurm/local_slurm.sh down     cancel every job, stop every daemon by its PID file
#   tests/slurm/local_slurm.sh status
#
# Needs root (Debian/Ubuntu; no systemd needed). Knobs (environment):
#   SLURM_ROOT=/tmp/gdn2-slurm  all state, logs, PID files and the config live here
#   NNODES=2                    fake nodes node1..nodeN, one slurmd each, all on this host
#   CPUS_PER_NODE=16            advertised CPUs per node (default: 2 per GPU, at least the real count)
#   GPUS_PER_NODE=8             advertised GPUs per node (empty files, no devices): GPU job scripts are
#                               accepted unchanged, so their headers and fail-fast checks can be tested
#   CTLD_PORT=16817 NODE_PORT_BASE=17001
# Clients then need:  export SLURM_CONF=$SLURM_ROOT/etc/slurm.conf
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin   # the daemons live there; some root shells lack it

ROOT=${SLURM_ROOT:-/tmp/gdn2-slurm}
NNODES=${NNODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_NODE=${CPUS_PER_NODE:-$(( $(nproc) > 2 * GPUS_PER_NODE ? $(nproc) : 2 * GPUS_PER_NODE ))}
CTLD_PORT=${CTLD_PORT:-16817}
NODE_PORT_BASE=${NODE_PORT_BASE:-17001}
CONF=$ROOT/etc/slurm.conf
RUN=$ROOT/run
LOG=$ROOT/log
MUNGE_SOCK=$ROOT/munge/munge.socket.2
export SLURM_CONF=$CONF

log() { echo "[local_slurm $(date +%T)] $*" >&2; }

node_names() { seq -f 'node%g' 1 "$NNODES"; }

alive() { [ -r "/proc/$1/status" ] && ! grep -q '^State:.*zombie' "/proc/$1/status" 2>/dev/null; }

# The PID in a PID file, only if that process is alive and runs the expected program
# (a stale file from an earlier run must never make us signal an unrelated process).
pid_of() { # pidfile comm
  local p
  [ -s "$1" ] || return 1
  p=$(cat "$1")
  [ -r "/proc/$p/comm" ] && [ "$(cat "/proc/$p/comm")" = "$2" ] && alive "$p" && echo "$p"
}

stop_pidfile() { # pidfile comm
  local p
  p=$(pid_of "$1" "$2") || { rm -f "$1"; return 0; }
  log "stopping $2 (pid $p)"
  kill -TERM "$p" 2>/dev/null || true
  for _ in $(seq 100); do alive "$p" || break; sleep 0.1; done
  if alive "$p"; then log "$2 (pid $p) ignored TERM, sending KILL"; kill -KILL "$p" 2>/dev/null || true; fi
  rm -f "$1"
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null; then
    return 0
  fi
  command -v apt-get >/dev/null || { log "Slurm is not installed and there is no apt-get"; return 1; }
  log "installing slurm-wlm and munge with apt-get"
  apt-get update -qq
  # A policy-rc.d that exits 101 stops the packages' maintainer scripts from starting system daemons.
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod +x "$policy"
    made_policy=1
  fi
  local rc=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null || rc=$?
  [ "$made_policy" = 1 ] && rm -f "$policy"
  return "$rc"
}

write_conf() {
  mkdir -p "$ROOT"/{etc,state,spool,log,run,munge}
  chmod 755 "$ROOT" "$ROOT/munge"
  local mem i=0 n
  # Fake nodes share this machine's cores and memory (config_overrides keeps slurmd from draining
  # a node that advertises more than the hardware has): tiny CPU jobs oversubscribe.
  mem=$(( $(awk '/^MemTotal:/{print int($2 / 1024)}' /proc/meminfo) * 80 / 100 / NNODES ))
  {
    cat <<EOF
ClusterName=gdn2local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$MUNGE_SOCK,cred_expire=5
SlurmctldPort=$CTLD_PORT
SlurmdPort=$NODE_PORT_BASE
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
GresTypes=gpu
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Schedule within a second or two (defaults: 60 s main loop, 30 s backfill): requeued jobs restart fast.
SchedulerParameters=sched_interval=2,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=600
EOF
    for n in $(node_names); do
      echo "NodeName=$n NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((NODE_PORT_BASE + i))" \
        "CPUs=$CPUS_PER_NODE RealMemory=$mem Gres=gpu:$GPUS_PER_NODE State=UNKNOWN"
      i=$((i + 1))
      mkdir -p "$ROOT/spool/$n"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } > "$CONF.tmp"
  mv "$CONF.tmp" "$CONF"
  # Slurm drops GPUs without device files; empty files stand in for /dev/nvidia*.
  mkdir -p "$ROOT/dev"
  for i in $(seq 0 $((GPUS_PER_NODE - 1))); do : > "$ROOT/dev/gpu$i"; done
  echo "Name=gpu File=$ROOT/dev/gpu[0-$((GPUS_PER_NODE - 1))]" > "$ROOT/etc/gres.conf"
}

start_daemons() {
  if ! pid_of "$RUN/munged.pid" munged >/dev/null; then
    [ -s "$ROOT/munge/munge.key" ] || head -c 1024 /dev/urandom > "$ROOT/munge/munge.key"
    chmod 600 "$ROOT/munge/munge.key"
    munged --force --socket="$MUNGE_SOCK" --key-file="$ROOT/munge/munge.key" \
      --log-file="$LOG/munged.log" --pid-file="$RUN/munged.pid" --seed-file="$ROOT/munge/munged.seed" \
      || { log "munged did not start"; return 1; }
    log "munged pid $(cat "$RUN/munged.pid")"
  fi
  if ! pid_of "$RUN/slurmctld.pid" slurmctld >/dev/null; then
    rm -rf "$ROOT/state" && mkdir -p "$ROOT/state"   # every cold start is a fresh cluster
    slurmctld -f "$CONF"
    for _ in $(seq 100); do pid_of "$RUN/slurmctld.pid" slurmctld >/dev/null && break; sleep 0.1; done
    pid_of "$RUN/slurmctld.pid" slurmctld >/dev/null || { log "slurmctld did not start"; return 1; }
    log "slurmctld pid $(cat "$RUN/slurmctld.pid")"
  fi
  local n
  for n in $(node_names); do
    pid_of "$RUN/slurmd-$n.pid" slurmd >/dev/null && continue
    slurmd -f "$CONF" -N "$n"
    for _ in $(seq 100); do pid_of "$RUN/slurmd-$n.pid" slurmd >/dev/null && break; sleep 0.1; done
    pid_of "$RUN/slurmd-$n.pid" slurmd >/dev/null || { log "slurmd $n did not start"; return 1; }
    log "slurmd $n pid $(cat "$RUN/slurmd-$n.pid")"
  done
  for _ in $(seq 120); do
    if [ "$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)" -ge "$NNODES" ]; then
      sinfo -N >&2
      return 0
    fi
    sleep 0.5
  done
  log "nodes did not become idle"
  sinfo -N -l >&2 || true
  return 1
}

down() {
  if pid_of "$RUN/slurmctld.pid" slurmctld >/dev/null; then
    squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
    for _ in $(seq 60); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  local f
  for f in "$RUN"/slurmd-*.pid; do [ -e "$f" ] && stop_pidfile "$f" slurmd; done
  stop_pidfile "$RUN/slurmctld.pid" slurmctld
  stop_pidfile "$RUN/munged.pid" munged
}

up() {
  [ "$(id -u)" = 0 ] || { log "needs root (starts slurmd/munged, may apt-get install)"; return 1; }
  install_packages
  write_conf
  # A half-started cluster is worse than none: stop whatever did start.
  if ! start_daemons; then
    tail -n 20 "$LOG"/*.log >&2 || true
    down
    return 1
  fi
  log "ready: export SLURM_CONF=$CONF"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status)
    for f in "$RUN"/*.pid; do [ -e "$f" ] && echo "$(basename "$f" .pid) pid=$(cat "$f")"; done
    sinfo -N || true
    ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
