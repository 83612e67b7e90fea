#!/usr/bin/env bash
# A real SLURM cluster (with accounting) for tests, on one Debian machine: two nodes, node1 and
# node2, each slurmd in its own network namespace with its own address on a private bridge, so
# that a job spans two hosts as on a real cluster; one node (this host, on 127.0.0.1) where
# network namespaces cannot be made (the reason is logged and kept in the state folder).
#
#   bash launch/slurm_test_cluster.sh start    # install packages if needed, start, wait until usable
#   bash launch/slurm_test_cluster.sh status   # daemons, sinfo, squeue
#   bash launch/slurm_test_cluster.sh stop     # cancel jobs, stop exactly the daemons `start` started,
#                                              # remove the namespaces and bridge it made
#   bash launch/slurm_test_cluster.sh env      # print the `export SLURM_CONF=...` line only
#
# Everything lives in a private state folder (configs, munge key and socket, MariaDB datadir,
# spool, logs, pid files); nothing under /etc is written and no system service is used, so it
# runs in containers without systemd and beside a system SLURM/MariaDB/munge, if any. The nodes
# see node1/node2 in a private hosts file bind-mounted over /etc/hosts in their own mount
# namespace only; the host's /etc/hosts is untouched.
#
# Environment (all optional):
#   SPARSE_DETR_SLURM_DIR        state folder                        [/tmp/sparse-detr-slurm]
#   SPARSE_DETR_SLURM_PORT_BASE  slurmctld port; slurmd +1, slurmdbd +2   [16817]
#   SPARSE_DETR_SLURM_DB_PORT    private MariaDB port on 127.0.0.1   [16306]
#   SPARSE_DETR_SLURM_CPUS       CPUs each node announces            [max(nproc, 4)]
#   SPARSE_DETR_SLURM_GPUS       fake GPUs (gres/gpu), shared out over the nodes   [2]
#   SPARSE_DETR_SLURM_NODES      2 (node1, node2 in network namespaces) or 1 (this host)   [2]
#   SPARSE_DETR_SLURM_SUBNET     first three octets of the private bridge's /24   [10.218.18]
#
# Exit codes: 0 ok, 1 failure (see the logs it names), 2 usage,
#             3 cannot run here (not root, not Debian, packages missing and not installable).
set -euo pipefail

STATE_DIR="${SPARSE_DETR_SLURM_DIR:-/tmp/sparse-detr-slurm}"
PORT_BASE="${SPARSE_DETR_SLURM_PORT_BASE:-16817}"
DB_PORT="${SPARSE_DETR_SLURM_DB_PORT:-16306}"
NUM_GPUS="${SPARSE_DETR_SLURM_GPUS:-2}"
WANTED_NODES="${SPARSE_DETR_SLURM_NODES:-2}"
SUBNET="${SPARSE_DETR_SLURM_SUBNET:-10.218.18}"

CLUSTER_NAME="sparsedetr"
ACCOUNT="sparse"
PARTITION="debug"
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server iproute2)

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
NODES_FILE="$STATE_DIR/nodes"              # the node names of the cluster that was started
SINGLE_REASON_FILE="$STATE_DIR/single-node-reason"   # why it is one node, when it is
NET_FILE="$STATE_DIR/net"                  # the namespaces, links and bridge `start` made

# Private network of the two-node cluster: a bridge with the controller's address (.254) and one
# network namespace per node (.1, .2), linked to the bridge by a veth pair.
BRIDGE="sdslurm0"
CTL_NET_ADDR="$SUBNET.254"
TWO_NODES=(node1 node2)
PARTITION_NODES="node[1-2]"

# Start order; `stop` goes in reverse. One slurmd per node: slurmd-<node>.
BASE_DAEMONS=(munged mariadbd slurmdbd slurmctld)

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

# The nodes of the cluster last started (none before the first start).
cluster_nodes() { cat "$NODES_FILE" 2>/dev/null || true; }

# Every daemon of the cluster last started, in start order (slurmd-<node> runs program slurmd).
daemons() {
    local node
    printf '%s\n' "${BASE_DAEMONS[@]}"
    for node in $(cluster_nodes); do echo "slurmd-$node"; done
}

# True when the recorded pid of daemon $1 is alive AND still that program (pids get reused).
# A zombie counts as dead: the daemons are reparented to PID 1, which may reap them late.
daemon_alive() {
    local pid comm state program="${1%%-*}"
    pid="$(pid_of "$1")"
    [[ -n "$pid" && -d "/proc/$pid" ]] || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
    state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
    [[ "$comm" == "$program"* && -n "$state" && "$state" != Z ]]
}

all_alive() {
    local d
    [[ -s "$NODES_FILE" ]] || return 1
    for d in $(daemons); do daemon_alive "$d" || return 1; done
}

any_alive() {
    local d
    for d in $(daemons); do daemon_alive "$d" && return 0; done
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

# ---------------------------------------------------------------- nodes

# make_network, remove_network, set_node_prefix: the nodes' namespaces and bridge.
source "$(dirname "${BASH_SOURCE[0]}")/slurm_test_network.sh"

# Decide the nodes: two in namespaces when wanted and possible, else this host alone.
choose_nodes() {
    rm -f "$SINGLE_REASON_FILE"
    local reason=""
    if [[ "$WANTED_NODES" == 2 ]]; then
        if reason="$(make_network 2>&1)"; then
            printf '%s\n' "${TWO_NODES[@]}" >"$NODES_FILE"
            return 0
        fi
        remove_network
        reason="${reason:-could not set up the private network}"
        reason="two nodes need network namespaces and a bridge, which failed here: ${reason//$'\n'/; }"
    elif [[ "$WANTED_NODES" == 1 ]]; then
        reason="SPARSE_DETR_SLURM_NODES=1"
    else
        die "SPARSE_DETR_SLURM_NODES=$WANTED_NODES: valid values are 1 and 2"
    fi
    log "one node: $reason"
    echo "$reason" >"$SINGLE_REASON_FILE"
    hostname -s >"$NODES_FILE"
}

two_nodes() { [[ "$(cluster_nodes | wc -l)" == 2 ]]; }

# ---------------------------------------------------------------- configuration

node_cpus() {
    local n; n="$(nproc)"
    # Announce at least 4 CPUs even on a 2-core machine so that 2-3 one-CPU test jobs run side
    # by side; SlurmdParameters=config_overrides makes slurmd accept more than it detects.
    echo "${SPARSE_DETR_SLURM_CPUS:-$((n > 4 ? n : 4))}"
}

# MiB of currently available memory minus a margin for the daemons and the test process,
# shared out over the nodes (they all live on this machine).
node_memory_mb() {
    local avail_kb mb
    avail_kb="$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)"
    mb=$(((avail_kb / 1024 - 2048) / $(cluster_nodes | wc -l)))
    echo $((mb > 1024 ? mb : 1024))
}

# The controller's address as the nodes reach it: the bridge for two nodes, else loopback.
ctl_addr() { if two_nodes; then echo "$CTL_NET_ADDR"; else echo 127.0.0.1; fi; }

# slurm.conf's NodeName line of node $2 (the $1-th, from 0), with its share of the fake GPUs.
node_line() {
    local index="$1" node="$2" gpus="$3" addr=127.0.0.1
    two_nodes && addr="$SUBNET.$((index + 1))"
    echo "NodeName=$node NodeAddr=$addr CPUs=$(node_cpus) RealMemory=$(node_memory_mb)${gpus:+ Gres=gpu:$gpus} State=UNKNOWN"
}

write_configs() {
    mkdir -p "$ETC" "$LOG" "$PIDS" "$STATE_DIR/spool/ctld" "$STATE_DIR/dev"
    local nodes cpus mem defmem gres_line="" per_node=0 node_lines="" partition_nodes i
    mapfile -t nodes < <(cluster_nodes)
    cpus="$(node_cpus)"; mem="$(node_memory_mb)"
    partition_nodes="${nodes[0]}"
    two_nodes && partition_nodes="$PARTITION_NODES"
    # Without DefMemPerCPU a job that gives no --mem is allotted the node's whole memory under
    # CR_CPU_Memory, so a second job could never start beside it.
    defmem=$((mem / cpus)); ((defmem > 2048)) && defmem=2048

    # The fake GPUs are shared out over the nodes (2 on one node, 1 on each of two), so the
    # cluster holds NUM_GPUS in all and a job asking for more is rejected.
    per_node=$((NUM_GPUS / ${#nodes[@]}))
    echo "AutoDetect=off" >"$ETC/gres.conf"
    if ((per_node > 0)); then
        # Fake GPUs: gres/gpu needs File= to name existing files, else `sbatch --gpus=1` is
        # rejected ("Requested node configuration is not available"). Character devices (same
        # numbers as /dev/null, harmless if opened) also let slurmd number them and set
        # CUDA_VISIBLE_DEVICES in jobs; plain files work too but slurmd logs an error per file.
        local g f
        echo "# Fake GPUs for tests (written by slurm_test_cluster.sh)" >>"$ETC/gres.conf"
        for ((g = 0; g < per_node * ${#nodes[@]}; g++)); do
            f="$STATE_DIR/dev/gpu$g"
            if [[ ! -c "$f" ]]; then
                rm -f "$f"
                mknod "$f" c 1 3 2>/dev/null || : >"$f"
            fi
            echo "NodeName=${nodes[g / per_node]} Name=gpu File=$f" >>"$ETC/gres.conf"
        done
        gres_line="GresTypes=gpu"
    else
        per_node=""
    fi
    for i in "${!nodes[@]}"; do
        node_lines+="$(node_line "$i" "${nodes[i]}" "$per_node")"$'\n'
    done

    : >"$ETC/plugstack.conf"   # keep /etc/slurm/plugstack.conf (system SPANK plugins) out

    cat >"$SLURM_CONF_FILE" <<EOF
# SLURM test cluster (written by launch/slurm_test_cluster.sh; rewritten on start).
ClusterName=$CLUSTER_NAME
SlurmctldHost=$(hostname -s)($(ctl_addr))
SlurmctldPort=$PORT_BASE
SlurmdPort=$((PORT_BASE + 1))
SlurmUser=root
SlurmdUser=root

AuthType=auth/munge
CredType=cred/munge
# Private munge socket; cred_expire is also how long a requeued job is held (default 120 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10

StateSaveLocation=$STATE_DIR/spool/ctld
# One spool folder, pid file and log per node (%n: the node's name).
SlurmdSpoolDir=$STATE_DIR/spool/d-%n
SlurmctldPidFile=$PIDS/slurmctld.daemon.pid
SlurmdPidFile=$PIDS/slurmd-%n.daemon.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
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

${node_lines}PartitionName=$PARTITION Nodes=$partition_nodes Default=YES MaxTime=01:00:00 State=UP
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

# One slurmd per node; with two nodes, each as its node (set_node_prefix), with its jobs.
start_slurmds() {
    local node
    for node in $(cluster_nodes); do
        mkdir -p "$STATE_DIR/spool/d-$node"
        if two_nodes; then
            set_node_prefix "$node"
            spawn "slurmd-$node" "${NODE_PREFIX[@]}" slurmd -D -N "$node"
        else
            spawn "slurmd-$node" slurmd -D -N "$node"
        fi
    done
}

node_state() { sinfo -h -N -n "$1" -o %T 2>/dev/null | head -n 1; }
nodes_idle() {
    local node
    for node in $(cluster_nodes); do [[ "$(node_state "$node")" == idle ]] || return 1; done
}
ctld_registered_with_dbd() {
    [[ -n "$(sacctmgr -n -P list cluster "$CLUSTER_NAME" format=controlhost 2>/dev/null)" ]]
}

wait_until_ready() {
    local node
    # A node left drained/down by an earlier run is brought back.
    for node in $(cluster_nodes); do
        case "$(node_state "$node")" in
            drain* | down* | fail*) scontrol update nodename="$node" state=resume || true ;;
        esac
    done
    wait_for "nodes $(cluster_nodes | paste -sd,) idle" 60 nodes_idle ||
        die "nodes not idle: $(sinfo -h -N -o '%N=%T' | paste -sd' '), see $LOG/slurmd-*.log and $LOG/slurmctld.log"
    wait_for "slurmctld registered with slurmdbd" 30 ctld_registered_with_dbd ||
        die "slurmctld not registered with slurmdbd, see $LOG/slurmctld.log"
}

# ---------------------------------------------------------------- commands

nodes_summary() {
    if two_nodes; then
        echo "nodes $PARTITION_NODES ($SUBNET.1, $SUBNET.2 on bridge $BRIDGE), $(node_cpus) CPUs each"
    else
        echo "node $(cluster_nodes) alone ($(cat "$SINGLE_REASON_FILE" 2>/dev/null)), $(node_cpus) CPUs"
    fi
}

print_usage_hint() {
    cat <<EOF

SLURM test cluster '$CLUSTER_NAME' is up (state folder: $STATE_DIR).
Use it from a shell with:
    export SLURM_CONF=$SLURM_CONF_FILE
    sinfo; sbatch -p $PARTITION -A $ACCOUNT --wrap 'hostname'; squeue; sacct
Partition '$PARTITION' (default, 1 h max): $(nodes_summary), $NUM_GPUS fake GPUs in all (--gpus=1 is accepted, there is no GPU).
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
    mkdir -p "$ETC" "$LOG" "$PIDS"
    remove_network   # left by a start that failed half-way
    choose_nodes
    write_configs
    start_munge
    start_mariadb
    start_slurmdbd
    register_accounting
    start_slurmctld
    start_slurmds
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
    local d
    for d in $(daemons | tac); do stop_daemon "$d"; done
    remove_network
}

cmd_status() {
    local d
    for d in $(daemons); do
        if daemon_alive "$d"; then
            printf '%-13s running (pid %s)\n' "$d" "$(pid_of "$d")"
        else
            printf '%-13s not running\n' "$d"
        fi
    done
    if daemon_alive slurmctld; then
        echo "--- $(nodes_summary)"
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
