#!/usr/bin/env bash
# A one-node Slurm cluster for tests (Debian's slurm-wlm + munge), everything under DIR, nothing in /etc:
#   tests/slurm/cluster.sh start DIR   -> writes DIR/slurm.conf, starts munged, slurmctld, slurmd; waits for the node
#   tests/slurm/cluster.sh stop DIR    -> stops the three daemons it started (by their pid files)
# Clients use the cluster with SLURM_CONF=DIR/slurm.conf. proctrack/linuxproc and task/none: no cgroups, no systemd;
# cred_expire=10: a requeued job may start again after 10 s (Slurm's default: 120 s).
set -euo pipefail
cmd=${1:?start|stop}; dir=$(realpath -m "${2:?DIR}")

stop() {
  # jobs first: their slurmstepd processes outlive slurmd otherwise
  if [[ -f $dir/slurmctld.pid ]] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
    export SLURM_CONF=$dir/slurm.conf
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [[ -n ${jobs// /} ]]; then
      scancel --full $jobs 2>/dev/null || true
      for _ in $(seq 150); do
        [[ -z $(squeue -h -t running,completing -o %A 2>/dev/null) ]] && break
        sleep 0.2
      done
    fi
  fi
  for d in slurmd slurmctld munged; do
    if [[ -f $dir/$d.pid ]]; then kill "$(cat "$dir/$d.pid")" 2>/dev/null || true; fi
  done
  for d in slurmd slurmctld munged; do  # wait for each to be gone (slurmctld saves its state first)
    for _ in $(seq 100); do
      [[ -f $dir/$d.pid ]] && kill -0 "$(cat "$dir/$d.pid")" 2>/dev/null || break
      sleep 0.1
    done
    rm -f "$dir/$d.pid"
  done
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start() {
  mkdir -p "$dir"/{state,spool,log}
  chmod 700 "$dir"
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {print int($2/1024/2)}' /proc/meminfo)
  # munge: its own key, socket, pid and seed files
  mungekey -c -f -k "$dir/munge.key" 2>/dev/null || dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 2>/dev/null
  chmod 600 "$dir/munge.key"
  munged -f --key-file="$dir/munge.key" --socket="$dir/munge.socket" --pid-file="$dir/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/munged.seed"
  cat > "$dir/slurm.conf" <<CONF
ClusterName=t2itest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
PlugStackConfig=/dev/null
SchedulerParameters=sched_interval=1
MessageTimeout=30
MinJobAge=600
KillWait=5
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
  export SLURM_CONF=$dir/slurm.conf
  slurmctld -i
  slurmd
  for _ in $(seq 300); do
    if sinfo -h -N -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; then exit 0; fi
    sleep 0.2
  done
  echo "cluster.sh: the node did not come up; logs in $dir/log" >&2
  tail -n 20 "$dir"/log/*.log >&2 || true
  stop
  exit 1
}

"$cmd"
