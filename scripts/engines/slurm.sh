#!/usr/bin/env bash
# Single-node Slurm cluster with slurmrestd (JWT) on loopback, for tests and CI.
#
# Usage: scripts/engines/slurm.sh start|stop|env|status|stop-rest|start-rest
#
#   start       install the Debian packages if missing (as root, non-interactive), write the
#               config into $SLURM_STATE_DIR, start munged, slurmctld, slurmd and slurmrestd,
#               mint a JWT for a non-root user, wait until a REST ping succeeds, then print the
#               env lines (same as `env`). Idempotent: a running cluster is reused.
#   env         print `export SLURM_URL=... SLURM_USER=... SLURM_JWT=... SLURM_JOB_DIR=...`
#   stop        stop every daemon this script started, by recorded pid.
#   status      exit 0 when slurmrestd answers a ping.
#   stop-rest   stop slurmrestd only (fault tests); start-rest starts it again.
#
# Only the `export` lines go to stdout, so `eval "$(scripts/engines/slurm.sh start)"` works;
# progress and errors go to stderr. Logs live in $SLURM_STATE_DIR/*.log.
#
# Knobs (env): SLURM_STATE_DIR (default /tmp/distributor-slurm), SLURM_REST_PORT (6820),
# SLURM_TEST_USER (distributor), SLURM_READY_SECS (60).
set -euo pipefail

STATE_DIR="${SLURM_STATE_DIR:-/tmp/distributor-slurm}"
PORT="${SLURM_REST_PORT:-6820}"
USER_NAME="${SLURM_TEST_USER:-distributor}"
READY_SECS="${SLURM_READY_SECS:-60}"
API="v0.0.38"
CONF="$STATE_DIR/slurm.conf"
JOB_DIR="$STATE_DIR/jobs"
export SLURM_CONF="$CONF"
unset SLURM_JWT

log() { echo "slurm.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

pid_alive() { # pidfile
  [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

# wait_until DESCRIPTION COMMAND...: polls COMMAND every 0.1 s until it succeeds or READY_SECS pass.
wait_until() {
  local what="$1"; shift
  local deadline=$((SECONDS + READY_SECS))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${READY_SECS}s waiting for $what (logs: $STATE_DIR/*.log)"
    sleep 0.1
  done
}

install_packages() {
  local pkgs=(slurmctld slurmd slurm-client slurmrestd munge slurm-wlm-jwt-plugin curl)
  local missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  [[ $(id -u) == 0 ]] || die "packages missing (${missing[*]}) and not root"
  log "installing ${missing[*]}"
  mkdir -p "$STATE_DIR"
  if ! { DEBIAN_FRONTEND=noninteractive apt-get update -q \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; } \
        >"$STATE_DIR/install.log" 2>&1; then
    tail -n 30 "$STATE_DIR/install.log" >&2
    die "apt-get failed"
  fi
}

write_config() {
  local host
  host="$(hostname -s)"
  mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/d" "$JOB_DIR"
  chown "$USER_NAME" "$JOB_DIR"
  chmod 755 "$STATE_DIR"
  if [[ ! -s "$STATE_DIR/jwt_hs256.key" ]]; then
    (umask 077; dd if=/dev/urandom of="$STATE_DIR/jwt_hs256.key" bs=32 count=1 status=none)
  fi
  cat >"$CONF" <<CONF
ClusterName=ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
AuthAltTypes=auth/jwt
AuthAltParameters=jwt_key=$STATE_DIR/jwt_hs256.key
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
MaxJobCount=100000
KillWait=2
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munge() {
  if [[ -s /run/munge/munged.pid ]] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
    return 0
  fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    (umask 077; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none)
    chown munge:munge /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 755 /run/munge
  runuser -u munge -- /usr/sbin/munged >>"$STATE_DIR/munged.log" 2>&1
  wait_until munged test -S /run/munge/munge.socket.2
  # Recorded so `stop` only kills the munged this script started.
  cp /run/munge/munged.pid "$STATE_DIR/munged.pid"
}

token() {
  if [[ ! -s "$STATE_DIR/jwt" ]]; then
    local out
    out="$(scontrol token username="$USER_NAME" lifespan=604800)" || die "scontrol token failed"
    (umask 077; echo "${out#SLURM_JWT=}" >"$STATE_DIR/jwt")
  fi
  cat "$STATE_DIR/jwt"
}

rest_ping() {
  curl -sf --max-time 2 -H "X-SLURM-USER-NAME: $USER_NAME" -H "X-SLURM-USER-TOKEN: $(cat "$STATE_DIR/jwt")" \
    "http://127.0.0.1:$PORT/slurm/$API/ping" >/dev/null
}

start_rest() {
  pid_alive "$STATE_DIR/slurmrestd.pid" && return 0
  SLURM_JWT=daemon setsid /usr/sbin/slurmrestd -f "$CONF" -u nobody -a rest_auth/jwt -s "openapi/$API" \
    "127.0.0.1:$PORT" </dev/null >>"$STATE_DIR/slurmrestd.log" 2>&1 &
  echo $! >"$STATE_DIR/slurmrestd.pid"
  wait_until "slurmrestd on 127.0.0.1:$PORT" rest_ping
}

node_idle() { sinfo -h -o %T | grep -Eq '^(idle|mixed|allocated)'; }

print_env() {
  [[ -s "$STATE_DIR/jwt" ]] || die "not started (no $STATE_DIR/jwt)"
  echo "export SLURM_URL=http://127.0.0.1:$PORT"
  echo "export SLURM_USER=$USER_NAME"
  echo "export SLURM_JWT=$(cat "$STATE_DIR/jwt")"
  echo "export SLURM_JOB_DIR=$JOB_DIR"
  echo "export SLURM_CONF=$CONF"
  echo "export SLURM_STATE_DIR=$STATE_DIR"
}

start() {
  if pid_alive "$STATE_DIR/slurmctld.pid" && pid_alive "$STATE_DIR/slurmd.pid" \
      && pid_alive "$STATE_DIR/slurmrestd.pid" && [[ -s "$STATE_DIR/jwt" ]] && rest_ping; then
    print_env
    return 0
  fi
  install_packages
  id -u "$USER_NAME" >/dev/null 2>&1 || useradd -m "$USER_NAME"
  mkdir -p "$STATE_DIR"
  # A fresh cluster every start: jobs saved by an earlier run (this machine is reused across
  # sessions and CI runs) would otherwise be recovered and queue ahead of the tests' jobs.
  stop
  rm -rf "$STATE_DIR/ctld" "$STATE_DIR/d" "$JOB_DIR"
  write_config
  start_munge
  pid_alive "$STATE_DIR/slurmctld.pid" || /usr/sbin/slurmctld -f "$CONF"
  pid_alive "$STATE_DIR/slurmd.pid" || /usr/sbin/slurmd -f "$CONF"
  wait_until "an idle node" node_idle
  token >/dev/null
  start_rest
  log "ready at http://127.0.0.1:$PORT (state $STATE_DIR)"
  print_env
}

stop_pid() { # name pidfile
  local f="$2"
  pid_alive "$f" || { rm -f "$f"; return 0; }
  local pid
  pid="$(cat "$f")"
  kill "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 15))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then kill -9 "$pid" 2>/dev/null || true; break; fi
    sleep 0.1
  done
  rm -f "$f"
}

stop() {
  stop_pid slurmrestd "$STATE_DIR/slurmrestd.pid"
  stop_pid slurmd "$STATE_DIR/slurmd.pid"
  stop_pid slurmctld "$STATE_DIR/slurmctld.pid"
  stop_pid munged "$STATE_DIR/munged.pid"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env) print_env ;;
  status) rest_ping ;;
  stop-rest) stop_pid slurmrestd "$STATE_DIR/slurmrestd.pid" ;;
  start-rest) start_rest ;;
  *) echo "usage: $0 start|stop|env|status|stop-rest|start-rest" >&2; exit 2 ;;
esac
