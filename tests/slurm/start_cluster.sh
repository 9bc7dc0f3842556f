#!/usr/bin/env bash
# Start a real single-node SLURM cluster on this machine, for `pytest -m slurm`.
#
#   bash tests/slurm/start_cluster.sh      # idempotent: a running cluster is left as it is
#   bash tests/slurm/stop_cluster.sh       # stops exactly the daemons started here
#
# Needs root and Debian's packages (installed here when missing: apt-get).
# Everything it writes (configs, munge key, MariaDB datadir, spool, state,
# logs, pid files) lives under one directory, $PEFT_SLURM_DIR (default
# /tmp/peft-slurm). The daemons run as root: munged, mariadbd (own datadir,
# 127.0.0.1 only), slurmdbd, slurmctld, slurmd, each writing <name>.pid there.
#
# Where jobs find the config: SLURM's job step plugin used by Snakemake strips
# every SLURM_* variable, SLURM_CONF included, before its `srun`, so the config
# must sit at the compiled-in default /etc/slurm/slurm.conf. This script makes
# /etc/slurm/slurm.conf (and gres.conf beside it) symlinks to the files in
# $PEFT_SLURM_DIR/etc; it refuses to replace a slurm.conf that is not such a
# symlink (a real site configuration).
#
# The cluster: one node (this host) with $PEFT_SLURM_CPUS CPUs (default 2),
# 3/4 of the machine's memory, two fake GPUs (gres gpu:2, device files are
# symlinks to /dev/null: jobs get CUDA_VISIBLE_DEVICES, nothing more), two
# partitions on that node: `debug` (the default) and $PEFT_SLURM_PARTITION
# (default `ci`, not the default: a job lands there only when asked to),
# accounting through slurmdbd (the Snakemake executor polls sacct).
# JobRequeue=0: only jobs submitted with `sbatch --requeue` are requeueable,
# so the tests can tell that the profile asks for it.
# Ports: $PEFT_SLURM_PORT (default 6817) for slurmctld, +1 slurmd, +2 slurmdbd,
# +3 MariaDB.
set -euo pipefail

DIR=${PEFT_SLURM_DIR:-/tmp/peft-slurm}
CPUS=${PEFT_SLURM_CPUS:-2}
PARTITION=${PEFT_SLURM_PARTITION:-ci}
PORT=${PEFT_SLURM_PORT:-6817}
DEADLINE_S=${PEFT_SLURM_START_TIMEOUT:-90}
CLUSTER=peftci
PACKAGES=(slurm-wlm slurmctld slurmd slurmdbd slurm-client munge mariadb-server)

die() {
    echo "start_cluster: $*" >&2
    echo "start_cluster: logs are in $DIR/log" >&2
    exit 1
}
log() { echo "start_cluster: $*" >&2; }

[ "$(id -u)" = 0 ] || die "must run as root (the SLURM daemons run as root here)"

# ----------------------------------------------------------------- packages
missing=()
for bin in munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sbatch sacct; do
    command -v "$bin" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
    log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    apt-get update >/dev/null || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${PACKAGES[@]}" >/dev/null \
        || die "apt-get install ${PACKAGES[*]} failed"
fi
export PATH=$PATH:/usr/sbin:/sbin

# ----------------------------------------------------------------- helpers
# pid_alive NAME COMM: the daemon whose pid file is $DIR/NAME.pid runs, and is a COMM process.
pid_alive() {
    local pidfile=$DIR/$1.pid pid
    [ -s "$pidfile" ] || return 1
    pid=$(cat "$pidfile")
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}

# wait_for SECONDS WHAT CMD...: run CMD (each try bounded by `timeout 5`) until it succeeds.
wait_for() {
    local secs=$1 what=$2
    shift 2
    local end=$((SECONDS + secs))
    until timeout 5 "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $end ] || return 1
        sleep 0.5
    done
}

mkdir -p "$DIR"/{etc,log,munge,mysql,state,spool,dev}
chmod 0755 "$DIR"
chmod 0700 "$DIR/munge"

HOST=$(hostname -s)
MEM_TOTAL_MB=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
REAL_MEM_MB=$((MEM_TOTAL_MB * 3 / 4))
DEF_MEM_PER_CPU=$((REAL_MEM_MB / CPUS / 4))
CTLD_PORT=$PORT
SLURMD_PORT=$((PORT + 1))
DBD_PORT=$((PORT + 2))
DB_PORT=$((PORT + 3))
MUNGE_SOCKET=$DIR/munge/munge.socket
DB_SOCKET=$DIR/mysql.sock
DB_PASS=peft-slurm-ci

# ----------------------------------------------------------------- configuration
[ -s "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null
chmod 0600 "$DIR/munge/munge.key"

for i in 0 1; do
    ln -sfn /dev/null "$DIR/dev/nvidia$i"
done

cat >"$DIR/etc/slurm.conf.new" <<EOF
# Written by tests/slurm/start_cluster.sh: a single-node test cluster.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups on these machines
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEF_MEM_PER_CPU
ReturnToService=2
# jobs are requeueable only when submitted with --requeue
JobRequeue=0
# keep finished jobs visible to scontrol show job for an hour
MinJobAge=3600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCKET
AccountingStorageTRES=gres/gpu
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEM_MB Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=$PARTITION Nodes=$HOST Default=NO MaxTime=INFINITE State=UP
EOF

# A changed slurm.conf reaches running daemons through `scontrol reconfigure` below.
conf_changed=0
if ! cmp -s "$DIR/etc/slurm.conf.new" "$DIR/etc/slurm.conf"; then
    conf_changed=1
    mv "$DIR/etc/slurm.conf.new" "$DIR/etc/slurm.conf"
else
    rm -f "$DIR/etc/slurm.conf.new"
fi

cat >"$DIR/etc/gres.conf" <<EOF
# Written by tests/slurm/start_cluster.sh. Fake GPUs: slurmd needs device files, and rejects regular files.
Name=gpu File=$DIR/dev/nvidia[0-1]
EOF

cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
chmod 0600 "$DIR/etc/slurmdbd.conf"

# Jobs (and every client without SLURM_CONF) read /etc/slurm/slurm.conf.
mkdir -p /etc/slurm
for f in slurm.conf gres.conf; do
    target=/etc/slurm/$f
    # ours: absent, or a link (possibly dangling) to a file this script wrote
    if [ -e "$target" ] || [ -L "$target" ]; then
        if [ ! -L "$target" ] || { [ -e "$target" ] && ! grep -q "tests/slurm/start_cluster.sh" "$target"; }; then
            die "$target exists and is not a link made by this script: refusing to replace a site configuration"
        fi
    fi
    ln -sfn "$DIR/etc/$f" "$target"
done
export SLURM_CONF=$DIR/etc/slurm.conf

# ----------------------------------------------------------------- munged
if ! pid_alive munged munged; then
    log "starting munged"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed" || die "munged did not start"
fi
wait_for 15 munge bash -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'" \
    || die "munge does not answer on $MUNGE_SOCKET"

# ----------------------------------------------------------------- mariadbd
DB=(mariadb --no-defaults --socket="$DB_SOCKET" -uroot)
if ! pid_alive mariadbd mariadbd; then
    if [ ! -d "$DIR/mysql/mysql" ]; then
        log "initialising MariaDB in $DIR/mysql"
        mariadb-install-db --no-defaults --user=root --datadir="$DIR/mysql" \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$DIR/log/mariadb-install-db.log" 2>&1 || die "mariadb-install-db failed"
    fi
    log "starting mariadbd"
    nohup mariadbd --no-defaults --user=root --datadir="$DIR/mysql" --socket="$DB_SOCKET" \
        --pid-file="$DIR/mariadbd.pid" --bind-address=127.0.0.1 --port="$DB_PORT" \
        --log-error="$DIR/log/mariadbd.log" --innodb-buffer-pool-size=64M \
        </dev/null >/dev/null 2>&1 &
fi
wait_for 60 mariadb "${DB[@]}" -e "SELECT 1" || die "mariadbd does not answer on $DB_SOCKET"
timeout 20 "${DB[@]}" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
       CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
       CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
       GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
       GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || die "could not create slurm_acct_db"

# ----------------------------------------------------------------- slurmdbd
if ! pid_alive slurmdbd slurmdbd; then
    log "starting slurmdbd"
    slurmdbd || die "slurmdbd did not start"
fi
wait_for 30 slurmdbd sacctmgr -n list cluster || die "slurmdbd does not answer (sacctmgr list cluster)"

# ----------------------------------------------------------------- slurmctld
if ! pid_alive slurmctld slurmctld; then
    log "starting slurmctld"
    slurmctld || die "slurmctld did not start"
elif [ "$conf_changed" = 1 ]; then
    log "slurm.conf changed: scontrol reconfigure"
    timeout 20 scontrol reconfigure || die "scontrol reconfigure failed"
fi
wait_for 30 slurmctld scontrol ping || die "slurmctld does not answer (scontrol ping)"

# ----------------------------------------------------------------- slurmd
if ! pid_alive slurmd slurmd; then
    log "starting slurmd"
    slurmd || die "slurmd did not start"
fi

# ----------------------------------------------------------------- ready?
node_idle() {
    local state
    state=$(timeout 5 sinfo -h -N -n "$HOST" -p "$PARTITION" -o %T 2>/dev/null) || return 1
    case "$state" in
        idle | mixed | allocated) return 0 ;;
        drain* | down*)
            # a node left drained or down by an earlier run: return it to service
            timeout 5 scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
            return 1
            ;;
        *) return 1 ;;
    esac
}
end=$((SECONDS + DEADLINE_S))
until node_idle; do
    if [ $SECONDS -ge $end ]; then
        timeout 5 sinfo -N -l >&2 || true
        timeout 5 scontrol show node "$HOST" >&2 || true
        die "node $HOST is not idle after ${DEADLINE_S}s"
    fi
    sleep 1
done
wait_for 30 sacct sacct -n -X -S now-1hours || die "sacct does not work (accounting through slurmdbd)"

log "cluster up: partition '$PARTITION' on node $HOST ($CPUS CPUs, ${REAL_MEM_MB} MB, gpu:2), state in $DIR"
