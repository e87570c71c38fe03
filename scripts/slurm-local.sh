#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for trying `ablate.py --launcher slurm` (and for its test):
#   sudo scripts/slurm-local.sh start    # munge + slurmctld + slurmd, one partition "local" with this machine's CPUs
#   sudo scripts/slurm-local.sh stop     # stops the daemons this script started
# Needs Debian's slurm-wlm and munge (apt-get install slurm-wlm munge). Writes its state under $SLURM_LOCAL
# (default /tmp/slurm-local) and /etc/slurm/slurm.conf; runs as root.
set -euo pipefail
STATE=${SLURM_LOCAL:-/tmp/slurm-local}
CONF=/etc/slurm/slurm.conf

start() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null || { echo "error: slurm-wlm and munge are not installed (apt-get install slurm-wlm munge)" >&2; exit 2; }
    mkdir -p "$STATE"/{ctld,d,log,munge} /etc/munge /etc/slurm /run/munge
    [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chmod 400 /etc/munge/munge.key
    : > "$STATE/pids"  # the daemons this script starts, for stop
    if ! pgrep -x munged >/dev/null; then
        munged --force --socket=/run/munge/munge.socket.2 --log-file="$STATE/log/munged.log"
        pgrep -nx munged >> "$STATE/pids"
    fi
    local host cpus mem
    host=$(hostname -s); cpus=$(nproc); mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    cat > "$CONF" <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    slurmctld && sleep 0.5 && pgrep -nx slurmctld >> "$STATE/pids"
    slurmd && sleep 0.5 && pgrep -nx slurmd >> "$STATE/pids"
    for _ in $(seq 60); do
        if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mixed|alloc"; then echo "slurm-local: partition 'local' up ($cpus CPUs)"; return 0; fi
        sleep 0.5
    done
    echo "error: the local cluster did not come up; see $STATE/log/" >&2; exit 1
}

stop() {
    local pids
    pids=$(tac "$STATE/pids" 2>/dev/null || true)
    [ -n "$pids" ] && kill $pids 2>/dev/null || true
    for _ in $(seq 40); do  # the daemons shut down in a few seconds
        alive=0; for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break; sleep 0.5
    done
    : > "$STATE/pids" 2>/dev/null || true
    echo "slurm-local: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
