#!/usr/bin/env bash
# A real one-node Slurm cluster on localhost, for tests and for trying `--profile slurm` on one machine.
#
#   scripts/slurm_local.sh start    install (if missing), configure and start munged, slurmctld, slurmd
#   scripts/slurm_local.sh stop     stop only the daemons this script started
#   scripts/slurm_local.sh status   exit 0 when our cluster is up and the node answers, 1 otherwise
#
# Needs root and Debian's packages (slurmctld slurmd slurm-client munge, Slurm 22.05 on bookworm).
# Daemons run as root in the foreground under setsid (no systemd here). Without an accounting database
# sacct cannot answer, so MinJobAge is long enough for the snakemake executor to poll squeue instead.
# Exit codes: 0 ok, 1 failure, 2 usage, 3 cannot install the packages (no root, no apt, no registry).
set -euo pipefail

ROOT=${MCT_SLURM_ROOT:-/tmp/mct-slurm}
RUN=$ROOT/run
LOG=$ROOT/log
PIDS=$RUN/pids                       # "<name> <pid>" for each daemon we started
CONF=/etc/slurm/slurm.conf           # where Debian's Slurm looks without SLURM_CONF
MARK="# written by mct scripts/slurm_local.sh"
WAIT_S=${MCT_SLURM_WAIT_S:-60}
MUNGE_SOCKET=/run/munge/munge.socket.2

die() { echo "slurm_local: $*" >&2; exit 1; }

# A start that fails shows the daemons' logs and stops what it started, so nothing half-up stays behind.
fail_start() {
    log_tails
    cmd_stop >/dev/null 2>&1 || true
    die "$@"
}

log_tails() {
    local f
    for f in "$LOG"/munged.log "$LOG"/slurmctld.log "$LOG"/slurmd.log; do
        [ -f "$f" ] || continue
        echo "---- tail of $f" >&2
        tail -n 20 "$f" >&2
    done
}

# True when pid is alive and runs the named program (guards against a reused pid).
pid_is() {
    local name=$1 pid=$2
    [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]
}

recorded_alive() {
    # Prints "name pid" for each recorded daemon that is still running.
    [ -f "$PIDS" ] || return 0
    local name pid
    while read -r name pid; do
        [ -n "${pid:-}" ] && pid_is "$name" "$pid" && echo "$name $pid"
    done <"$PIDS"
    return 0
}

node_state() { sinfo --noheader --nodes=localhost --format=%t 2>/dev/null | head -n 1 | tr -d ' *~#'; }

is_up() {
    local alive
    alive=$(recorded_alive)
    echo "$alive" | grep -q '^slurmctld ' && echo "$alive" | grep -q '^slurmd ' || return 1
    case "$(node_state)" in idle | mix | alloc | completing | comp) return 0 ;; *) return 1 ;; esac
}

ensure_packages() {
    local missing=0 b
    for b in slurmctld slurmd sbatch sinfo squeue scontrol munged munge; do
        command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing=1
    done
    [ "$missing" = 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 || { echo "slurm_local: Slurm is not installed and apt-get is missing" >&2; exit 3; }
    echo "slurm_local: installing slurmctld slurmd slurm-client munge" >&2
    # Debian containers ship a policy-rc.d that stops postinst from starting services; that is what we want.
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get -o DPkg::Lock::Timeout=300 update -qq >"$LOG/apt.log" 2>&1 ||
        ! apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
            slurmctld slurmd slurm-client munge >>"$LOG/apt.log" 2>&1; then
        tail -n 20 "$LOG/apt.log" >&2
        echo "slurm_local: could not install the Slurm packages (see $LOG/apt.log)" >&2
        exit 3
    fi
}

munge_works() { [ -S "$MUNGE_SOCKET" ] && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        # 1024 random bytes, as mungekey would write; munged refuses a key others can read.
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    if munge_works; then
        echo "slurm_local: using the munged that already answers on $MUNGE_SOCKET" >&2
        return 0
    fi
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    setsid setpriv --reuid=munge --regid=munge --init-groups \
        munged --foreground --socket="$MUNGE_SOCKET" --log-file="$LOG/munged.log" \
        </dev/null >>"$LOG/munged.log" 2>&1 9>&- &
    echo "munged $!" >>"$PIDS"
    local i
    for i in $(seq 1 50); do
        munge_works && return 0
        sleep 0.1
    done
    fail_start "munged did not answer on $MUNGE_SOCKET"
}

check_conf_is_ours() {
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite it"
    fi
}

write_conf() {
    check_conf_is_ours
    local cpus mem_mb tmp
    cpus=$(nproc)
    # Leave a tenth of the memory to the system; with config_overrides slurmd trusts these numbers.
    mem_mb=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
    install -d -m 0755 /etc/slurm
    tmp=$(mktemp "$CONF.XXXXXX")
    cat >"$tmp" <<EOF
$MARK
ClusterName=mct
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# No cgroups: this container has no systemd and no delegated cgroup tree, so no cgroup.conf either.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# Finished jobs stay visible to squeue for 10 minutes: the executor's status polls need that.
MinJobAge=600
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    chmod 0644 "$tmp"
    mv -f "$tmp" "$CONF"
}

start_daemon() {
    local name=$1
    shift
    setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1 9>&- &
    echo "$name $!" >>"$PIDS"
}

cmd_start() {
    mkdir -p "$RUN" "$LOG" "$ROOT/state" "$ROOT/spool"
    if is_up; then
        echo "slurm_local: already running (node $(node_state))"
        return 0
    fi
    # Anything of ours left from a half-started cluster goes first, so the pid file stays truthful.
    cmd_stop >/dev/null 2>&1 || true
    check_conf_is_ours
    ensure_packages
    start_munge
    write_conf
    start_daemon slurmctld slurmctld -D -i
    start_daemon slurmd slurmd -D -N localhost
    local t0=$SECONDS state=""
    while [ $((SECONDS - t0)) -lt "$WAIT_S" ]; do
        state=$(node_state)
        case "$state" in
            idle | mix | alloc) echo "slurm_local: up (node $state after $((SECONDS - t0)) s)"; return 0 ;;
            # A node that slurmctld remembers as down from a previous run comes back on request.
            down | drain | drng | fail) scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
        esac
        local alive
        alive=$(recorded_alive)
        echo "$alive" | grep -q '^slurmctld ' && echo "$alive" | grep -q '^slurmd ' ||
            fail_start "a Slurm daemon exited during start-up (see $LOG)"
        sleep 0.5
    done
    fail_start "node not idle after $WAIT_S s (last state: '${state:-no answer}'; logs in $LOG)"
}

cmd_stop() {
    local alive name pid
    alive=$(recorded_alive)
    if [ -z "$alive" ]; then
        rm -f "$PIDS"
        echo "slurm_local: nothing of ours is running"
        return 0
    fi
    # Cancel this cluster's jobs first so that no slurmstepd outlives its slurmd.
    if echo "$alive" | grep -q '^slurmctld '; then
        scancel --full --quiet --partition=debug >/dev/null 2>&1 || true
    fi
    # TERM all at once (each takes a second or two to shut down), then KILL whatever is left after 10 s.
    while read -r name pid; do kill -TERM "$pid" 2>/dev/null || true; done <<<"$alive"
    local i left
    for i in $(seq 1 100); do
        left=0
        while read -r name pid; do pid_is "$name" "$pid" && left=1; done <<<"$alive"
        [ "$left" = 0 ] && break
        sleep 0.1
    done
    while read -r name pid; do
        if pid_is "$name" "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    done <<<"$alive"
    rm -f "$PIDS"
    echo "slurm_local: stopped"
}

cmd_status() {
    if is_up; then
        echo "running (node $(node_state))"
        recorded_alive
        return 0
    fi
    echo "not running"
    recorded_alive
    return 1
}

# One start or stop at a time (two test sessions may ask together); status needs no lock.
# The daemons are started with fd 9 closed, or they would hold the lock for their lifetime.
lock() { mkdir -p "$RUN"; exec 9>"$RUN/lock"; flock -w 900 9 || die "could not lock $RUN/lock"; }

case "${1:-}" in
    start) [ "$(id -u)" = 0 ] || { echo "slurm_local: start needs root" >&2; exit 3; }; lock; cmd_start ;;
    stop) lock; cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
