#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the cluster tests and for trying `--executor slurm`.
#
#   bash scripts/slurm_node.sh start [DIR]   installs munge + Slurm (Debian packages) if missing, writes
#                                            DIR/slurm.conf and starts munged, slurmctld and slurmd
#   bash scripts/slurm_node.sh stop [DIR]    stops them (by the pids they wrote)
#
# DIR (default /tmp/asl-slurm) holds the configuration, state, logs and pids; `export
# SLURM_CONF=DIR/slurm.conf` points sbatch, squeue and scancel at it. The node has this machine's
# CPUs and memory, process tracking without cgroups (proctrack/linuxproc), no accounting, two
# partitions: `low` (the default) whose jobs are requeued when a job of `high` needs the node, and
# `high`. Preemption sends the jobs SIGUSR2 first (preempt_send_user_signal), as submitit asks.
# Needs root (apt-get, the daemons). Exits 3 when the packages cannot be installed.
set -euo pipefail
CMD=${1:?usage: scripts/slurm_node.sh start|stop [DIR]}
D=${2:-/tmp/asl-slurm}
D=$(mkdir -p "$D" && cd "$D" && pwd)

# Ends a daemon by its pid file: SIGTERM, up to 15 s to exit, then SIGKILL.
end_daemon() {
  local f=$D/$1.pid pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$f"
}

stop() {
  # jobs first, while slurmctld and munge can still see them end; then the daemons, each gone
  # before the next stops (a job step left without munge would keep slurmd waiting)
  if [ -f "$D/slurmctld.pid" ] && kill -0 "$(cat "$D/slurmctld.pid")" 2>/dev/null; then
    SLURM_CONF=$D/slurm.conf scancel --user "$(id -un)" 2>/dev/null || true
    for _ in $(seq 1 30); do
      [ -z "$(SLURM_CONF=$D/slurm.conf squeue -h 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  end_daemon slurmd
  pkill -9 -f "slurmstepd" 2>/dev/null || true  # steps of this node that outlived slurmd
  end_daemon slurmctld
  end_daemon munged
}

if [ "$CMD" = stop ]; then
  stop
  echo "[slurm] stopped the daemons of $D"
  exit 0
fi
[ "$CMD" = start ] || { echo "usage: scripts/slurm_node.sh start|stop [DIR]"; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
  echo "[slurm] installing munge and Slurm (Debian packages)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      munge slurmctld slurmd slurm-client; } > "$D/apt.log" 2>&1 || {
    tail -n 20 "$D/apt.log"; echo "[slurm] could not install munge and Slurm; full log in $D/apt.log"; exit 3; }
fi
stop  # a cluster left from an earlier start

HOST=$(hostname -s)
CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p "$D/state" "$D/spool" "$D/munge" /run/munge
chmod 700 "$D/munge"
[ -f "$D/munge/munge.key" ] || { dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 2>/dev/null; chmod 400 "$D/munge/munge.key"; }
cat > "$D/slurm.conf" <<EOF
ClusterName=asl
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/slurmctld.log
SlurmdLogFile=$D/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=300
KillWait=10
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=low Nodes=$HOST Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE OverSubscribe=NO
PartitionName=high Nodes=$HOST MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
export SLURM_CONF=$D/slurm.conf

munged --key-file="$D/munge/munge.key" --pid-file="$D/munged.pid" --socket=/run/munge/munge.socket.2 \
  --log-file="$D/munged.log" --seed-file="$D/munge/munge.seed" -f 2>>"$D/munged.log"
slurmctld -c -f "$D/slurm.conf"
slurmd -f "$D/slurm.conf"
for _ in $(seq 1 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "[slurm] one-node cluster up: node $HOST, $CPUS CPUs, $MEM MB; export SLURM_CONF=$D/slurm.conf"
    exit 0
  fi
  sleep 1
done
echo "[slurm] the node did not become idle; logs in $D"
sinfo 2>&1 || true
tail -n 20 "$D/slurmctld.log" "$D/slurmd.log" 2>/dev/null || true
exit 1
