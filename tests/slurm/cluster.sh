#!/usr/bin/env bash
# A real one-node Slurm cluster for tests, from Debian packages, with all its state under
# one directory: munge, MariaDB + slurmdbd (so sacct works), slurmctld, slurmd, and two
# fake GPUs (gres on mknod'ed device files; Slurm sets CUDA_VISIBLE_DEVICES 0/1 for them).
#
#   tests/slurm/cluster.sh start DIR   install the packages if missing, start the daemons,
#                                      wait until the node is idle
#   tests/slurm/cluster.sh env DIR     print the shell exports that point clients at it
#   tests/slurm/cluster.sh stop DIR    cancel its jobs, stop every daemon it started (pid files)
#
# Root only (daemons run as root; mknod). Partitions: debug (default) and gpu; account
# "saepipe" (root's default). The jobstep plugin strips SLURM_CONF before its inner srun,
# so DIR/bin holds wrappers of the client commands that export it: put DIR/bin first on
# PATH (`env` does). Nothing is installed as a service and nothing outside DIR is written
# (apart from the apt install).
set -euo pipefail

ACTION=${1:-}
DIR=${2:-}
PACKAGES="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
CLIENTS="sbatch srun squeue sacct sacctmgr scancel sinfo scontrol salloc"
DAEMONS="slurmd slurmctld slurmdbd mariadbd munged"  # stop order

die() { echo "cluster.sh: $*" >&2; exit 1; }
usage() { die "usage: $0 start|stop|env DIR"; }
[[ -n "$ACTION" && -n "$DIR" ]] || usage
DIR=$(mkdir -p "$DIR" && cd "$DIR" && pwd)
CONF="$DIR/etc/slurm.conf"
HOST=$(hostname -s)

# Wait until a command succeeds: wait_for SECONDS WHAT CMD... (WHAT: a daemon's name, or
# any text). Gives up at once, showing its log, when daemon WHAT has died.
wait_for() {
    local seconds=$1 what=$2 pidfile="$DIR/run/$2.pid"
    shift 2
    for _ in $(seq $((seconds * 4))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        if [[ -s "$pidfile" ]] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            tail -5 "$DIR/log/$what.log" >&2 || true
            die "$what died while starting (log: $DIR/log/$what.log)"
        fi
        sleep 0.25
    done
    die "timed out after ${seconds}s waiting for $what (logs in $DIR/log)"
}

install_packages() {
    local missing=""
    for cmd in slurmctld slurmd sbatch munged slurmdbd mariadbd; do
        command -v "$cmd" >/dev/null || [[ -x /usr/sbin/$cmd ]] || missing=yes
    done
    [[ -z "$missing" ]] && return 0
    echo "cluster.sh: installing $PACKAGES" >&2
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $PACKAGES >&2 \
        || { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends $PACKAGES >&2; } \
        || die "could not install $PACKAGES with apt-get"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_config() {
    local cpus mem_mb ctld_port slurmd_port dbd_port
    cpus=$(nproc)
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
    ctld_port=$(free_port); slurmd_port=$(free_port); dbd_port=$(free_port)
    MYSQL_PORT=$(free_port)
    mkdir -p "$DIR"/{etc,run,log,bin,dev,munge,spool/ctld,spool/d,mysql}
    for i in 0 1; do  # fake GPUs: character devices like /dev/null
        [[ -c "$DIR/dev/fakegpu$i" ]] || mknod "$DIR/dev/fakegpu$i" c 1 3 \
            || die "mknod failed: the fake GPUs need device files (CAP_MKNOD; plain files do not work)"
    done
    cat > "$CONF" <<EOF
ClusterName=saepipe-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.sock
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=600
KillWait=5
GresTypes=gpu
JobAcctGatherType=jobacct_gather/none
AccountingStoreFlags=job_comment
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
AccountingStoragePass=$DIR/munge/munge.sock
AccountingStorageTRES=gres/gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb Gres=gpu:fake:2 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST MaxTime=INFINITE State=UP
EOF
    echo "NodeName=$HOST Name=gpu Type=fake File=$DIR/dev/fakegpu[0-1]" > "$DIR/etc/gres.conf"
    cat > "$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.sock
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=slurm-test
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/etc/slurmdbd.conf"
    for cmd in $CLIENTS; do  # clients that find this cluster even without SLURM_CONF
        printf '#!/bin/sh\nexport SLURM_CONF=%s\nexec /usr/bin/%s "$@"\n' "$CONF" "$cmd" > "$DIR/bin/$cmd"
        chmod +x "$DIR/bin/$cmd"
    done
}

start_munge() {
    mungekey -c -k "$DIR/munge/munge.key" 2>/dev/null || [[ -s "$DIR/munge/munge.key" ]]
    chmod 700 "$DIR/munge"
    munged --force -S "$DIR/munge/munge.sock" --key-file="$DIR/munge/munge.key" \
        --log-file="$DIR/log/munged.log" --pid-file="$DIR/run/munged.pid" \
        --seed-file="$DIR/munge/munge.seed"
    wait_for 10 munged test -S "$DIR/munge/munge.sock"
}

start_mariadb() {
    local sock="$DIR/mysql/mysqld.sock"
    mariadb-install-db --user=root --datadir="$DIR/mysql/data" --skip-test-db \
        --auth-root-authentication-method=socket >"$DIR/log/mariadb-install.log" 2>&1 \
        || die "mariadb-install-db failed: see $DIR/log/mariadb-install.log"
    mariadbd --user=root --datadir="$DIR/mysql/data" --socket="$sock" --port="$MYSQL_PORT" \
        --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$DIR/run/mariadbd.pid" \
        --log-error="$DIR/log/mariadbd.log" --innodb-buffer-pool-size=64M </dev/null >/dev/null 2>&1 &
    echo $! > "$DIR/run/mariadbd.pid"  # at once, so that stop finds it even if start fails
    wait_for 60 mariadbd mariadb --socket="$sock" -e "select 1"
    mariadb --socket="$sock" <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm-test';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm-test';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

start() {
    [[ $(id -u) == 0 ]] || die "must run as root (it starts Slurm daemons as root and calls mknod)"
    [[ -e "$DIR/run/slurmctld.pid" ]] && die "a cluster seems to be running in $DIR: stop it first"
    install_packages
    export SLURM_CONF=$CONF
    write_config
    start_munge
    start_mariadb
    slurmdbd
    wait_for 60 slurmdbd sacctmgr -n list cluster
    sacctmgr -i add cluster saepipe-test >/dev/null
    sacctmgr -i add account saepipe Cluster=saepipe-test Description=test Organization=test >/dev/null
    sacctmgr -i add user root Account=saepipe DefaultAccount=saepipe Cluster=saepipe-test >/dev/null
    slurmctld -i
    wait_for 30 slurmctld scontrol ping
    slurmd
    wait_for 60 "node $HOST to be idle" bash -c "sinfo -h -n $HOST -o %T | grep -qx idle"
    echo "cluster.sh: Slurm cluster up in $DIR (SLURM_CONF=$CONF)" >&2
}

stop() {
    if [[ -x "$DIR/bin/scancel" && -e "$DIR/run/slurmctld.pid" ]]; then
        "$DIR/bin/scancel" --user=root >/dev/null 2>&1 || true  # this test cluster's jobs only
    fi
    local pids=() daemon pid
    for daemon in $DAEMONS; do  # all at once: each takes about 2 s to shut down
        [[ -s "$DIR/run/$daemon.pid" ]] || continue
        pid=$(cat "$DIR/run/$daemon.pid")
        kill "$pid" 2>/dev/null && pids+=("$pid")
        rm -f "$DIR/run/$daemon.pid"
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -9 "$pid" 2>/dev/null || true
    done
}

case "$ACTION" in
    start) start ;;
    stop) stop ;;
    env) printf 'export SLURM_CONF=%q\nexport PATH=%q:"$PATH"\n' "$CONF" "$DIR/bin" ;;
    *) usage ;;
esac
