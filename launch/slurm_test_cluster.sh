#!/usr/bin/env bash
# A real single-node SLURM cluster (with accounting) for tests, on one Debian machine.
#
#   bash launch/slurm_test_cluster.sh start    # install packages if needed, start, wait until usable
#   bash launch/slurm_test_cluster.sh status   # daemons, sinfo, squeue
#   bash launch/slurm_test_cluster.sh stop     # cancel jobs, stop exactly the daemons `start` started
#   bash launch/slurm_test_cluster.sh env      # print the `export SLURM_CONF=...` line only
#
# Everything lives in a private state folder (configs, munge key and socket, MariaDB datadir,
# spool, logs, pid files); nothing under /etc is written and no system service is used, so it
# runs in containers without systemd and beside a system SLURM/MariaDB/munge, if any.
#
# Environment (all optional):
#   SPARSE_DETR_SLURM_DIR        state folder                        [/tmp/sparse-detr-slurm]
#   SPARSE_DETR_SLURM_PORT_BASE  slurmctld port; slurmd +1, slurmdbd +2   [16817]
#   SPARSE_DETR_SLURM_DB_PORT    private MariaDB port on 127.0.0.1   [16306]
#   SPARSE_DETR_SLURM_CPUS       CPUs the node announces             [max(nproc, 4)]
#   SPARSE_DETR_SLURM_GPUS       fake GPUs (gres/gpu) on the node    [2]
#
# Exit codes: 0 ok, 1 failure (see the logs it names), 2 usage,
#             3 cannot run here (not root, not Debian, packages missing and not installable).
set -euo pipefail

STATE_DIR="${SPARSE_DETR_SLURM_DIR:-/tmp/sparse-detr-slurm}"
PORT_BASE="${SPARSE_DETR_SLURM_PORT_BASE:-16817}"
DB_PORT="${SPARSE_DETR_SLURM_DB_PORT:-16306}"
NUM_GPUS="${SPARSE_DETR_SLURM_GPUS:-2}"

CLUSTER_NAME="sparsedetr"
ACCOUNT="sparse"
PARTITION="debug"
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

ETC="$STATE_DIR/etc"
LOG="$STATE_DIR/log"
PIDS="$STATE_DIR/pids"
MUNGE_DIR="$STATE_DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
DB_DIR="$STATE_DIR/mariadb"
DB_SOCKET="$DB_DIR/mariadb.sock"
DB_USER="slurm"
DB_PASS="slurm-test-only"
SLURM_CONF_FILE="$ETC/slurm.conf"

# Start order; `stop` goes in reverse.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

# Every SLURM command (ours, the tests', the jobs') must read our config, not /etc/slurm.
export SLURM_CONF="$SLURM_CONF_FILE"

log() { printf '[slurm-test-cluster] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# wait_for WHAT SECONDS CMD...: poll CMD every 0.5 s until it succeeds; fail after SECONDS.
wait_for() {
    local what="$1" limit="$2"; shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${limit}s waiting for: $what"
            return 1
        fi
        sleep 0.5
    done
}

# ---------------------------------------------------------------- packages

missing_packages() {
    local pkg
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
    done
}

ensure_packages() {
    command -v dpkg-query >/dev/null || { log "not a Debian system (no dpkg-query)"; exit 3; }
    local missing
    missing="$(missing_packages | tr '\n' ' ')"
    [[ -z "${missing// /}" ]] && return 0
    if [[ $EUID -ne 0 ]]; then
        log "packages missing ($missing) and not root: cannot apt-get install"
        exit 3
    fi
    command -v apt-get >/dev/null || { log "packages missing ($missing) and no apt-get"; exit 3; }
    log "installing: $missing"
    # --no-install-recommends keeps it small; the daemons the packages may try to start
    # (system munge/mariadb/slurm) are not used: ours run on private sockets and ports.
    mkdir -p "$LOG"
    if ! { apt-get update -qq &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
               "${PACKAGES[@]}"; } >"$LOG/apt.log" 2>&1; then
        tail -n 20 "$LOG/apt.log" >&2
        log "apt-get install failed (full log: $LOG/apt.log)"
        exit 3
    fi
}

# ---------------------------------------------------------------- pid bookkeeping

pid_of() { cat "$PIDS/$1.pid" 2>/dev/null || true; }

# True when the recorded pid of daemon $1 is alive AND still that program (pids get reused).
# A zombie counts as dead: the daemons are reparented to PID 1, which may reap them late.
daemon_alive() {
    local pid comm state
    pid="$(pid_of "$1")"
    [[ -n "$pid" && -d "/proc/$pid" ]] || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
    state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
    [[ "$comm" == "$1"* && -n "$state" && "$state" != Z ]]
}

all_alive() {
    local d
    for d in "${DAEMONS[@]}"; do daemon_alive "$d" || return 1; done
}

any_alive() {
    local d
    for d in "${DAEMONS[@]}"; do daemon_alive "$d" && return 0; done
    return 1
}

# Run a daemon in the foreground of a new session, detached from our stdin/stdout (a caller
# that captures our output, like pytest's subprocess.run, would otherwise wait for it forever)
# and from the lock on fd 9 (it would hold the lock for its lifetime), and record its exact pid.
spawn() {
    local name="$1"; shift
    setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1 9>&- &
    echo $! >"$PIDS/$name.pid"
    log "started $name (pid $!)"
}

# ---------------------------------------------------------------- configuration

node_name() { hostname -s; }

node_cpus() {
    local n; n="$(nproc)"
    # Announce at least 4 CPUs even on a 2-core machine so that 2-3 one-CPU test jobs run side
    # by side; SlurmdParameters=config_overrides makes slurmd accept more than it detects.
    echo "${SPARSE_DETR_SLURM_CPUS:-$((n > 4 ? n : 4))}"
}

# MiB of currently available memory minus a margin for the daemons and the test process.
node_memory_mb() {
    local avail_kb mb
    avail_kb="$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)"
    mb=$((avail_kb / 1024 - 2048))
    echo $((mb > 1024 ? mb : 1024))
}

write_configs() {
    mkdir -p "$ETC" "$LOG" "$PIDS" "$STATE_DIR/spool/ctld" "$STATE_DIR/spool/d" "$STATE_DIR/dev"
    local node cpus mem defmem gres_line="" node_gres=""
    node="$(node_name)"; cpus="$(node_cpus)"; mem="$(node_memory_mb)"
    # Without DefMemPerCPU a job that gives no --mem is allotted the node's whole memory under
    # CR_CPU_Memory, so a second job could never start beside it.
    defmem=$((mem / cpus)); ((defmem > 2048)) && defmem=2048

    if ((NUM_GPUS > 0)); then
        # Fake GPUs: gres/gpu needs File= to name existing files, else `sbatch --gpus=1` is
        # rejected ("Requested node configuration is not available"). Character devices (same
        # numbers as /dev/null, harmless if opened) also let slurmd number them and set
        # CUDA_VISIBLE_DEVICES in jobs; plain files work too but slurmd logs an error per file.
        local i f files=()
        for ((i = 0; i < NUM_GPUS; i++)); do
            f="$STATE_DIR/dev/gpu$i"
            if [[ ! -c "$f" ]]; then
                rm -f "$f"
                mknod "$f" c 1 3 2>/dev/null || : >"$f"
            fi
            files+=("$f")
        done
        {
            echo "# Fake GPUs for tests (written by slurm_test_cluster.sh)"
            echo "AutoDetect=off"
            for f in "${files[@]}"; do echo "NodeName=$node Name=gpu File=$f"; done
        } >"$ETC/gres.conf"
        gres_line="GresTypes=gpu"
        node_gres="Gres=gpu:$NUM_GPUS"
    else
        echo "AutoDetect=off" >"$ETC/gres.conf"
    fi

    : >"$ETC/plugstack.conf"   # keep /etc/slurm/plugstack.conf (system SPANK plugins) out

    cat >"$SLURM_CONF_FILE" <<EOF
# Single-node SLURM test cluster (written by launch/slurm_test_cluster.sh; rewritten on start).
ClusterName=$CLUSTER_NAME
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$PORT_BASE
SlurmdPort=$((PORT_BASE + 1))
SlurmUser=root
SlurmdUser=root

AuthType=auth/munge
CredType=cred/munge
# Private munge socket; cred_expire is also how long a requeued job is held (default 120 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10

StateSaveLocation=$STATE_DIR/spool/ctld
SlurmdSpoolDir=$STATE_DIR/spool/d
SlurmctldPidFile=$PIDS/slurmctld.daemon.pid
SlurmdPidFile=$PIDS/slurmd.daemon.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$ETC/plugstack.conf
MailProg=/bin/true

# Containers: no cgroups, no systemd.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
MpiDefault=none
SwitchType=switch/none
# Trust the node line below (more CPUs than cores is deliberate).
SlurmdParameters=config_overrides
ReturnToService=2

# Schedule often so tests see state changes within seconds.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$defmem
KillWait=5
MinJobAge=300
InactiveLimit=0
$gres_line

# Accounting through slurmdbd: submitit reads job states with sacct.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((PORT_BASE + 2))
# Clients (sacct, sacctmgr, slurmctld) authenticate to slurmdbd through the munge socket named
# here, not the one in AuthInfo; without it they look for /run/munge/munge.socket.2.
AccountingStoragePass=$MUNGE_SOCKET
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none

NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem $node_gres State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=01:00:00 State=UP
EOF

    # slurmdbd reads slurmdbd.conf from the folder of SLURM_CONF and insists on mode 600.
    cat >"$ETC/slurmdbd.conf" <<EOF
# slurmdbd for the test cluster (written by launch/slurm_test_cluster.sh).
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((PORT_BASE + 2))
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$PIDS/slurmdbd.daemon.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$ETC/slurmdbd.conf"

    echo "export SLURM_CONF=$SLURM_CONF_FILE" >"$STATE_DIR/env.sh"
}

# ---------------------------------------------------------------- daemons

start_munge() {
    mkdir -p "$MUNGE_DIR"
    # munged refuses a socket/key folder that others can write to; readable lets non-root
    # local users submit too (the key itself stays 0400).
    chmod 755 "$MUNGE_DIR"
    if [[ ! -s "$MUNGE_DIR/munge.key" ]]; then
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
        chmod 400 "$MUNGE_DIR/munge.key"
    fi
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    spawn munged munged --foreground \
        --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_DIR/munged.pid" --seed-file="$MUNGE_DIR/munged.seed" \
        --log-file="$LOG/munged.log"
    wait_for "munged socket" 15 bash -c "munge -S '$MUNGE_SOCKET' -n </dev/null | unmunge -S '$MUNGE_SOCKET'"
}

db_client() { mariadb --no-defaults --socket="$DB_SOCKET" -uroot "$@"; }

start_mariadb() {
    mkdir -p "$DB_DIR"
    if [[ ! -d "$DB_DIR/data/mysql" ]]; then
        log "initialising MariaDB datadir"
        # root authenticates through the unix socket (we are root); slurmdbd gets its own user.
        mariadb-install-db --no-defaults --datadir="$DB_DIR/data" --user=root \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$LOG/mariadb-install-db.log" 2>&1 || die "mariadb-install-db failed, see $LOG/mariadb-install-db.log"
    fi
    rm -f "$DB_SOCKET"
    # Small, fast, TCP only on loopback at a non-default port so a system MariaDB is not touched.
    # innodb_lock_wait_timeout=900 is what slurmdbd asks for; durability is not needed here.
    spawn mariadbd mariadbd --no-defaults --user=root --datadir="$DB_DIR/data" \
        --socket="$DB_SOCKET" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --pid-file="$DB_DIR/mariadbd.pid" --log-error="$LOG/mariadbd.log" --skip-log-bin \
        --innodb-buffer-pool-size=256M --innodb-log-file-size=64M \
        --innodb-lock-wait-timeout=900 --innodb-flush-log-at-trx-commit=0
    wait_for "mariadbd" 60 db_client -e "SELECT 1" || die "mariadbd did not come up, see $LOG/mariadbd.log"
    db_client -e "
        CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
        GRANT ALL ON slurm_acct_db.* TO '$DB_USER'@'127.0.0.1';"
}

start_slurmdbd() {
    spawn slurmdbd slurmdbd -D
    # First start creates the accounting tables (a few seconds).
    wait_for "slurmdbd" 60 sacctmgr -n list cluster || die "slurmdbd did not come up, see $LOG/slurmdbd.log"
}

# Register cluster, account and user (idempotent) so `sbatch -A sparse` works and sacct sees jobs.
register_accounting() {
    if [[ -z "$(sacctmgr -n -P list cluster "$CLUSTER_NAME" format=cluster)" ]]; then
        sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
    fi
    if [[ -z "$(sacctmgr -n -P list account "$ACCOUNT" format=account)" ]]; then
        sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER_NAME" \
            Description="sparse-detr tests" Organization=sparse-detr >/dev/null
    fi
    local user; user="$(id -un)"
    if [[ -z "$(sacctmgr -n -P list assoc cluster="$CLUSTER_NAME" account="$ACCOUNT" user="$user" format=user)" ]]; then
        sacctmgr -i add user "$user" Account="$ACCOUNT" Cluster="$CLUSTER_NAME" >/dev/null
    fi
}

start_slurmctld() {
    spawn slurmctld slurmctld -D
    wait_for "slurmctld" 30 scontrol ping || die "slurmctld did not come up, see $LOG/slurmctld.log"
}

start_slurmd() {
    spawn slurmd slurmd -D -N "$(node_name)"
}

node_state() { sinfo -h -N -n "$(node_name)" -o %T 2>/dev/null | head -n 1; }
node_idle() { [[ "$(node_state)" == idle ]]; }
ctld_registered_with_dbd() {
    [[ -n "$(sacctmgr -n -P list cluster "$CLUSTER_NAME" format=controlhost 2>/dev/null)" ]]
}

wait_until_ready() {
    # A node left drained/down by an earlier run is brought back.
    case "$(node_state)" in
        drain* | down* | fail*) scontrol update nodename="$(node_name)" state=resume || true ;;
    esac
    wait_for "node $(node_name) idle" 60 node_idle ||
        die "node is '$(node_state)', see $LOG/slurmd.log and $LOG/slurmctld.log"
    wait_for "slurmctld registered with slurmdbd" 30 ctld_registered_with_dbd ||
        die "slurmctld not registered with slurmdbd, see $LOG/slurmctld.log"
}

# ---------------------------------------------------------------- commands

print_usage_hint() {
    cat <<EOF

SLURM test cluster '$CLUSTER_NAME' is up (state folder: $STATE_DIR).
Use it from a shell with:
    export SLURM_CONF=$SLURM_CONF_FILE
    sinfo; sbatch -p $PARTITION -A $ACCOUNT --wrap 'hostname'; squeue; sacct
Partition '$PARTITION' (default, 1 h max), $(node_cpus) CPUs, $NUM_GPUS fake GPUs (--gpus=1 is accepted, there is no GPU).
Logs: $LOG/   Stop: bash $0 stop
EOF
    echo "export SLURM_CONF=$SLURM_CONF_FILE"
}

cmd_start() {
    if all_alive; then
        log "already running"
        cmd_status
        echo "export SLURM_CONF=$SLURM_CONF_FILE"
        return 0
    fi
    if any_alive; then
        log "partly running: stopping the rest first"
        cmd_stop
    fi
    if [[ $EUID -ne 0 ]]; then
        # The daemons run as root (SlurmUser=root, MariaDB --user=root): no service accounts needed.
        log "must run as root"
        exit 3
    fi
    ensure_packages
    local t0=$SECONDS
    write_configs
    start_munge
    start_mariadb
    start_slurmdbd
    register_accounting
    start_slurmctld
    start_slurmd
    wait_until_ready
    log "ready in $((SECONDS - t0)) s"
    print_usage_hint
}

# Stop one daemon we started: SIGTERM, wait, then SIGKILL. Only the recorded pid is touched.
stop_daemon() {
    local name="$1" pid i
    pid="$(pid_of "$name")"
    if daemon_alive "$name"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 40; i++)); do
            daemon_alive "$name" || break
            sleep 0.25
        done
        if daemon_alive "$name"; then
            log "$name (pid $pid) ignored SIGTERM: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        log "stopped $name (pid $pid)"
    fi
    rm -f "$PIDS/$name.pid"
}

cmd_stop() {
    if daemon_alive slurmctld; then
        # Cancel jobs first so their slurmstepd processes end with them instead of lingering.
        timeout 10 scancel --partition="$PARTITION" 2>/dev/null || true
        sleep 1
    fi
    local i
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_daemon "${DAEMONS[i]}"; done
}

cmd_status() {
    local d
    for d in "${DAEMONS[@]}"; do
        if daemon_alive "$d"; then
            printf '%-10s running (pid %s)\n' "$d" "$(pid_of "$d")"
        else
            printf '%-10s not running\n' "$d"
        fi
    done
    if daemon_alive slurmctld; then
        echo "--- sinfo"; sinfo || true
        echo "--- squeue"; squeue || true
    fi
    echo "SLURM_CONF=$SLURM_CONF_FILE"
    all_alive
}

# Two callers (e.g. two test sessions) starting or stopping at once would race on the same
# pid files and ports: serialise them.
lock_state_dir() {
    mkdir -p "$STATE_DIR"
    exec 9>"$STATE_DIR/.lock"
    flock -w 600 9 || die "could not lock $STATE_DIR/.lock"
}

main() {
    case "${1:-}" in
        start) lock_state_dir; cmd_start ;;
        stop) lock_state_dir; cmd_stop ;;
        status) cmd_status ;;
        env) echo "export SLURM_CONF=$SLURM_CONF_FILE" ;;
        *) echo "usage: $0 {start|stop|status|env}" >&2; exit 2 ;;
    esac
}

main "$@"
