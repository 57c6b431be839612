#!/usr/bin/env bash
# A one-node Slurm in a scratch directory, for tests/slurm/run_slurm_chain.sh (sourced, not run).
#   slurm_up DIR     installs slurm-wlm + munge from Debian when missing (needs root), writes a munge
#                    key and a minimal slurm.conf under DIR, starts munged, slurmctld and slurmd there
#                    in the background, exports SLURM_CONF, waits until the node is idle
#   slurm_down DIR   stops the daemons slurm_up started (by the PIDs it recorded)
# Nothing is written outside DIR: the daemons' sockets, state, spool, logs and PID files live there,
# and the ports are chosen free at start so a system Slurm on the same host is not disturbed.

slurm_install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
     && command -v sbatch >/dev/null; then
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "slurm-wlm and munge are not installed and this is not root: apt-get install slurm-wlm munge" >&2
    return 1
  fi
  echo "installing slurm-wlm and munge (Debian packages)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurm-wlm munge >/dev/null
}

_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

slurm_up() {
  local dir=$1 host cpus
  slurm_install || return 1
  mkdir -p "$dir"/{munge,state,spool,log}
  chmod 700 "$dir/munge"
  # munged refuses a key that others can read, and a socket directory others can write.
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1 count=1024 status=none
  chmod 400 "$dir/munge/munge.key"
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.sock" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed" \
    || return 1
  host=$(hostname -s)
  # Declared CPUs, at least 8 whatever the host has (config_overrides below lets slurmd accept it):
  # the requeue test's job runs beside the chain's jobs, which share the real cores.
  cpus=$(nproc --all)  # not nproc: it honours OMP_NUM_THREADS
  [ "$cpus" -ge 8 ] || cpus=8
  cat > "$dir/slurm.conf" <<CONF
ClusterName=mutest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(_free_port)
SlurmdPort=$(_free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.sock
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
MinJobAge=300
KillWait=5
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
  export SLURM_CONF=$dir/slurm.conf
  slurmctld -f "$SLURM_CONF" -i || return 1
  slurmd -f "$SLURM_CONF" || return 1
  local i
  for i in $(seq 1 100); do
    if sinfo -h -o %t 2>/dev/null | grep -qx idle; then return 0; fi
    sleep 0.2
  done
  echo "slurm did not come up; logs in $dir/log" >&2
  return 1
}

slurm_down() {
  local dir=$1 f pid i
  for f in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || continue
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
}
