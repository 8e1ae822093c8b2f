#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the cluster tests and for trying `--executor slurm`.
#
#   bash scripts/slurm_node.sh start [DIR] [--accounting] [--term-preemption]
#       installs munge + Slurm (Debian packages) if missing, writes DIR/slurm.conf and starts
#       munged, slurmctld and slurmd
#   bash scripts/slurm_node.sh stop [DIR]    stops them (by the pids they wrote)
#
# DIR (default /tmp/asl-slurm) holds the configuration, state, logs and pids; `export
# SLURM_CONF=DIR/slurm.conf` points sbatch, squeue, scancel and sacct at it. The node has this
# machine's CPUs and memory, process tracking without cgroups (proctrack/linuxproc), two
# partitions: `low` (the default) whose jobs are requeued when a job of `high` needs the node, and
# `high`. Preemption sends the jobs SIGUSR2 first (preempt_send_user_signal), as submitit asks;
# with --term-preemption it sends only Slurm's default SIGTERM, as on clusters without that setting.
# Without --accounting the cluster keeps no job accounting (sacct fails, as on many small
# clusters); with it, a private MariaDB (DIR/mysql, 127.0.0.1 only) and slurmdbd keep it.
# Needs root (apt-get, the daemons). Exits 3 when the packages cannot be installed, 4 when
# MariaDB cannot be started here (the daemons started so far are left to `stop`).
set -euo pipefail
USAGE="usage: scripts/slurm_node.sh start|stop [DIR] [--accounting] [--term-preemption]"
CMD=${1:?$USAGE}
shift
D=/tmp/asl-slurm ACCOUNTING=0 USER_SIGNAL=1
for a in "$@"; do
  case $a in
    --accounting) ACCOUNTING=1 ;;
    --term-preemption) USER_SIGNAL=0 ;;
    -*) echo "$USAGE"; exit 2 ;;
    *) D=$a ;;
  esac
done
D=$(mkdir -p "$D" && cd "$D" && pwd)
DB_PORT=${ASL_SLURM_DB_PORT:-3307}

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
  end_daemon slurmdbd
  end_daemon mariadbd
  end_daemon munged
}

if [ "$CMD" = stop ]; then
  stop
  echo "[slurm] stopped the daemons of $D"
  exit 0
fi
[ "$CMD" = start ] || { echo "usage: scripts/slurm_node.sh start|stop [DIR]"; exit 2; }

PACKAGES="munge slurmctld slurmd slurm-client"
NEEDED="slurmctld slurmd sbatch munged"
if [ $ACCOUNTING = 1 ]; then PACKAGES="$PACKAGES slurmdbd mariadb-server"; NEEDED="$NEEDED slurmdbd mariadbd sacct"; fi
for c in $NEEDED; do
  command -v "$c" >/dev/null && continue
  echo "[slurm] installing $PACKAGES (Debian packages)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PACKAGES; } \
    > "$D/apt.log" 2>&1 || { tail -n 20 "$D/apt.log"; echo "[slurm] could not install $PACKAGES; full log in $D/apt.log"; exit 3; }
  break
done
stop  # a cluster left from an earlier start

# A private MariaDB on 127.0.0.1:DB_PORT with its data in DIR/mysql, slurmdbd on top of it, and
# the cluster registered; sacct answers once this returns.
start_accounting() {
  local sock=$D/mysqld.sock
  if [ ! -d "$D/mysql/mysql" ]; then
    mariadb-install-db --user=root --datadir="$D/mysql" --auth-root-authentication-method=socket \
      > "$D/mariadb-install.log" 2>&1 || { tail -n 20 "$D/mariadb-install.log"; echo "[slurm] no MariaDB data folder"; exit 4; }
  fi
  setsid mariadbd --user=root --datadir="$D/mysql" --socket="$sock" --port="$DB_PORT" --bind-address=127.0.0.1 \
    --pid-file="$D/mariadbd.pid" --log-error="$D/mariadbd.log" --innodb-buffer-pool-size=64M \
    --innodb-lock-wait-timeout=900 < /dev/null > /dev/null 2>&1 &
  for _ in $(seq 1 60); do mariadb-admin --socket="$sock" ping > /dev/null 2>&1 && break; sleep 0.5; done
  mariadb --socket="$sock" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'asl-slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" \
    || { tail -n 20 "$D/mariadbd.log" 2>/dev/null; echo "[slurm] MariaDB did not start; log in $D/mariadbd.log"; exit 4; }
  cat > "$D/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=$HOST
SlurmUser=root
PidFile=$D/slurmdbd.pid
LogFile=$D/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=asl-slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$D/slurmdbd.conf"
  slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
  for _ in $(seq 1 60); do sacctmgr -n list cluster > /dev/null 2>&1 && break; sleep 0.5; done
  sacctmgr -i add cluster asl > /dev/null 2>&1 || true  # already there after an earlier start
  sacctmgr -n list cluster format=cluster | grep -qw asl \
    || { tail -n 20 "$D/slurmdbd.log"; echo "[slurm] slurmdbd did not start; log in $D/slurmdbd.log"; exit 1; }
}

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
$([ $USER_SIGNAL = 1 ] && echo SlurmctldParameters=preempt_send_user_signal)
$(if [ $ACCOUNTING = 1 ]; then echo "AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$HOST"; else echo AccountingStorageType=accounting_storage/none; fi)
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
if [ $ACCOUNTING = 1 ]; then start_accounting; fi
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
