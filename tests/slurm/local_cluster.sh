#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests (tests/test_slurm.py) and for trying
# the SLURM launcher without a cluster: slurmctld + slurmd + slurmdbd (accounting, so that
# `sacct`, which submitit watches jobs with, answers) over a private MariaDB, authenticated by a
# private munged. Everything lives in one state folder; the daemons are started and stopped by
# their pid files there, and nothing in /etc is changed.
#
#   tests/slurm/local_cluster.sh install          # apt-get the packages where absent (root)
#   tests/slurm/local_cluster.sh start [DIR]      # start it (DIR: $OWDFA_SLURM_DIR or
#                                                 #   /tmp/owdfa-slurm); prints SLURM_CONF=...
#   tests/slurm/local_cluster.sh stop [DIR]       # stop every daemon it started
#   tests/slurm/local_cluster.sh status [DIR]
#
# Clients find the cluster through SLURM_CONF=DIR/slurm.conf. The node has this machine's CPUs
# and 90% of its memory; jobs run as the user who started it. Debian's slurm-wlm 22.05 tested.
set -euo pipefail

DIR="${2:-${OWDFA_SLURM_DIR:-/tmp/owdfa-slurm}}"
PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)
CLUSTER=owdfa-local
NODE="$(hostname -s)"
# ports: fixed offsets from a base the caller may move (two clusters on one machine)
BASE_PORT="${OWDFA_SLURM_PORT:-16817}"
CTLD_PORT=$BASE_PORT
SLURMD_PORT=$((BASE_PORT + 1))
DBD_PORT=$((BASE_PORT + 2))
DB_PORT=$((BASE_PORT + 3))

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

install() {
    local missing=()
    for bin in slurmctld slurmd slurmdbd sbatch sacct munged mariadbd mariadb-install-db; do
        command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        log "slurm, munge and mariadb are installed"
        return
    fi
    [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}: run as root, or apt-get install ${PACKAGES[*]}"
    log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

alive() {  # alive PIDFILE: the process named in it runs
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...
    local limit=$1 what=$2
    shift 2
    for _ in $(seq $((limit * 10))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    die "$what did not come up in ${limit} s (logs in $DIR/log)"
}

write_configs() {
    local cpus mem_mb user
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc honours OMP_NUM_THREADS
    mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    user=$(id -un)
    mkdir -p "$DIR"/{log,state,spool,munge,run}
    chmod 755 "$DIR/munge"  # the socket must be reachable; the key itself is 0400
    cat > "$DIR/slurm.conf" <<CONF
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
DefMemPerCPU=2048
KillWait=10
MinJobAge=10
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$DIR/munge/munge.socket
JobAcctGatherType=jobacct_gather/none
NodeName=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
    cat > "$DIR/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=$user
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StorageLoc=slurm_acct_db
CONF
    chmod 600 "$DIR/slurmdbd.conf"
}

start_munge() {
    alive "$DIR/run/munged.pid" && return
    [ -s "$DIR/munge/munge.key" ] || { head -c 1024 /dev/urandom > "$DIR/munge/munge.key"; chmod 400 "$DIR/munge/munge.key"; }
    munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed"
    wait_for 10 munged munge --socket="$DIR/munge/munge.socket" -n
}

start_mariadb() {
    alive "$DIR/run/mariadb.pid" && return
    if [ ! -d "$DIR/db/mysql" ]; then
        mariadb-install-db --no-defaults --datadir="$DIR/db" --user="$(id -un)" \
            --auth-root-authentication-method=socket > "$DIR/log/mariadb-install.log" 2>&1
    fi
    mariadbd --no-defaults --datadir="$DIR/db" --user="$(id -un)" --bind-address=127.0.0.1 \
        --port=$DB_PORT --socket="$DIR/run/mariadb.sock" --pid-file="$DIR/run/mariadb.pid" \
        --log-error="$DIR/log/mariadb.log" --skip-log-bin &
    wait_for 30 mariadb mariadb --no-defaults --socket="$DIR/run/mariadb.sock" -e "SELECT 1"
    # the accounting database's user: local TCP only, no password (a throwaway test database)
    mariadb --no-defaults --socket="$DIR/run/mariadb.sock" -e \
        "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

start() {
    install
    write_configs
    export SLURM_CONF="$DIR/slurm.conf"
    start_munge
    start_mariadb
    alive "$DIR/run/slurmdbd.pid" || slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
    sacctmgr -i -n list cluster format=cluster | grep -qw "$CLUSTER" \
        || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    alive "$DIR/run/slurmctld.pid" || slurmctld -f "$SLURM_CONF"
    wait_for 30 slurmctld scontrol ping
    alive "$DIR/run/slurmd.pid" || slurmd -f "$SLURM_CONF"
    wait_for 60 "the node" bash -c "sinfo -h -N -o %T | grep -qE '^(idle|mixed|allocated)'"
    log "up: $(sinfo -h -N -o '%N %T %c CPUs %m MB')"
    echo "SLURM_CONF=$SLURM_CONF"
}

stop() {
    # the daemons by their pid files, the clients' side first
    for name in slurmd slurmctld slurmdbd mariadb munged; do
        local pidfile="$DIR/run/$name.pid"
        if alive "$pidfile"; then
            local pid
            pid=$(cat "$pidfile")
            kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
            log "stopped $name ($pid)"
        fi
        rm -f "$pidfile"
    done
}

status() {
    for name in munged mariadb slurmdbd slurmctld slurmd; do
        if alive "$DIR/run/$name.pid"; then echo "$name: running"; else echo "$name: stopped"; fi
    done
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 install|start|stop|status [DIR]" >&2; exit 2 ;;
esac
