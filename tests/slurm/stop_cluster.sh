#!/usr/bin/env bash
# Stop the test cluster started by tests/slurm/start_cluster.sh: exactly the
# daemons whose pid files are in $PEFT_SLURM_DIR (default /tmp/peft-slurm),
# newest first, and nothing else. A pid is only signalled while it still
# belongs to a process of the expected name. State stays for the next start;
# `rm -rf "$PEFT_SLURM_DIR"` after stopping starts afresh.
set -uo pipefail

DIR=${PEFT_SLURM_DIR:-/tmp/peft-slurm}
status=0

# stop NAME: SIGTERM the process of $DIR/NAME.pid, wait up to 20 s, then SIGKILL.
stop() {
    local name=$1 pidfile=$DIR/$1.pid pid
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if [ -z "$pid" ] || [ ! -r "/proc/$pid/comm" ] || [ "$(cat "/proc/$pid/comm")" != "$name" ]; then
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 40); do
        [ -d "/proc/$pid" ] || break
        sleep 0.5
    done
    if [ -d "/proc/$pid" ]; then
        echo "stop_cluster: $name ($pid) ignored SIGTERM for 20 s: SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
        [ -d "/proc/$pid" ] && { echo "stop_cluster: $name ($pid) still runs" >&2; status=1; }
    fi
    rm -f "$pidfile"
    echo "stop_cluster: stopped $name ($pid)" >&2
}

for name in slurmd slurmctld slurmdbd mariadbd munged; do
    stop "$name"
done

# Remove the /etc/slurm links start_cluster.sh made, if they point here.
for f in slurm.conf gres.conf; do
    if [ -L "/etc/slurm/$f" ] && [ "$(readlink "/etc/slurm/$f")" = "$DIR/etc/$f" ]; then
        rm -f "/etc/slurm/$f"
    fi
done
exit $status
