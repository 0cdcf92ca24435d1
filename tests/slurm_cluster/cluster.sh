#!/usr/bin/env bash
# A real SLURM cluster (slurm-wlm 22.05, Debian 12) on this one machine, for the test suite.
#
#   cluster.sh up [--no-accounting] [--preempt-user-signal]
#                                     install (apt) if needed, start everything, idempotent; the first
#                                     `up` keeps a copy of /etc/hosts and /etc/slurm as it found them
#   cluster.sh down                   cancel all jobs, stop the daemons this script started, put
#                                     /etc/hosts and /etc/slurm back exactly as the first `up` found them
#   cluster.sh status                 which daemons run, sinfo
#   cluster.sh logs [N]               last N (default 40) lines of every daemon log
#   cluster.sh env                    the client environment (export SLURM_CONF=...)
#
# Everything lives under one state folder, $TLA_SLURM_STATE (default /var/tmp/tla-slurm):
#   etc/slurm.conf (master copy, also installed as /etc/slurm/slurm.conf), etc/slurmdbd.conf,
#   munge/ (own key; socket: the default /run/munge/munge.socket.2), mysql/ (private mariadb datadir, socket; TCP 127.0.0.1:3307),
#   ctld/ (StateSaveLocation), spool/n1 spool/n2, run/*.pid, log/*.log
# Runs as root. See README.md next to this file.
set -euo pipefail

STATE=${TLA_SLURM_STATE:-/var/tmp/tla-slurm}
CLUSTER=tla
MYSQL_PORT=${TLA_SLURM_MYSQL_PORT:-3307}
CTLD_PORT=${TLA_SLURM_CTLD_PORT:-6817}
DBD_PORT=${TLA_SLURM_DBD_PORT:-6819}
N1_PORT=${TLA_SLURM_N1_PORT:-6818}
N2_PORT=${TLA_SLURM_N2_PORT:-6820}
NODE_CPUS=4
NODE_MEM_MB=8192
NODES=(n1 n2)

ETC=$STATE/etc
CONF=$ETC/slurm.conf
DBD_CONF=$ETC/slurmdbd.conf
RUN=$STATE/run
LOG=$STATE/log
MUNGE_DIR=$STATE/munge
# Slurm 22.05's sacctmgr ignores AuthInfo=socket=..., so every component uses munge's default socket.
MUNGE_SOCKET=/run/munge/munge.socket.2
MYSQL_DIR=$STATE/mysql
MYSQL_SOCKET=$MYSQL_DIR/mysqld.sock
SYSTEM_CONF=/etc/slurm/slurm.conf
MARKER="# managed by tests/slurm_cluster/cluster.sh (tla)"
HOSTS_TAG="# tla-slurm test cluster"
# What the first `up` found (restored by `down`): hosts (a copy of /etc/hosts), etc-slurm.tar (of
# /etc/slurm, when it existed), found (written last: the backup is complete).
BACKUP=$STATE/host-backup
GRACE_TIME=${TLA_SLURM_GRACE_TIME:-20}

# Our own client calls always use the master copy, whatever /etc/slurm holds.
export SLURM_CONF=$CONF

say() { printf '[tla-slurm] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# wait_for SECONDS DESCRIPTION CMD... : poll CMD every 0.2 s until it succeeds.
wait_for() {
    local timeout=$1 what=$2; shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            say "timed out after ${timeout}s waiting for: $what"
            return 1
        fi
        sleep 0.2
    done
}

# ---------------------------------------------------------------- processes

# pid_alive PIDFILE COMM : the pid in PIDFILE is running and its command name is COMM
pid_alive() {
    local pidfile=$1 comm=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid ]] || return 1
    [[ -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
    # a killed daemon whose parent has not reaped it yet is a zombie: dead
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]]
}

# stop_pid NAME PIDFILE COMM [NAME PIDFILE COMM]... : SIGTERM to all of them at once, wait up to
# $STOP_TIMEOUT (default 30) seconds for them to exit, then SIGKILL what is left. Pid files are removed.
stop_pid() {
    local names=() pids=() pid comm
    while (($# >= 3)); do
        if pid_alive "$2" "$3"; then
            pid=$(tr -dc '0-9' <"$2")
            say "stopping $1 (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            names+=("$1")
            pids+=("$pid:$3")
        fi
        rm -f "$2"
        shift 3
    done
    local deadline=$((SECONDS + ${STOP_TIMEOUT:-30})) left i
    while :; do
        left=()
        for i in "${!pids[@]}"; do
            pid=${pids[$i]%%:*} comm=${pids[$i]#*:}
            [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] && left+=("$i")
        done
        ((${#left[@]})) || return 0
        if ((SECONDS >= deadline)); then
            for i in "${left[@]}"; do
                say "${names[$i]} did not stop, SIGKILL"
                kill -KILL "${pids[$i]%%:*}" 2>/dev/null || true
            done
            sleep 0.2
            return 0
        fi
        sleep 0.1
    done
}

munge_pidfile() { echo "$RUN/munged.pid"; }
mysql_pidfile() { echo "$RUN/mariadbd.pid"; }
dbd_pidfile() { echo "$RUN/slurmdbd.pid"; }
ctld_pidfile() { echo "$RUN/slurmctld.pid"; }
slurmd_pidfile() { echo "$RUN/slurmd-$1.pid"; }

munge_alive() { pid_alive "$(munge_pidfile)" munged; }
mysql_alive() { pid_alive "$(mysql_pidfile)" mariadbd; }
dbd_alive() { pid_alive "$(dbd_pidfile)" slurmdbd; }
ctld_alive() { pid_alive "$(ctld_pidfile)" slurmctld; }
slurmd_alive() { pid_alive "$(slurmd_pidfile "$1")" slurmd; }

# ---------------------------------------------------------------- install

ensure_packages() {
    local missing=0 b
    for b in slurmctld slurmd slurmdbd sbatch sacct sacctmgr munged mariadbd mariadb-install-db mariadb; do
        command -v "$b" >/dev/null 2>&1 || missing=1
    done
    ((missing)) || return 0
    [[ $(id -u) == 0 ]] || die "packages missing and not root"
    say "installing slurm-wlm, munge, mariadb with apt-get (log: $LOG/apt-install.log)"
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# temporary, from tests/slurm_cluster/cluster.sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created_policy=1
    fi
    local rc=0
    {
        export DEBIAN_FRONTEND=noninteractive
        apt-get -o DPkg::Lock::Timeout=300 update -q >/dev/null &&
            apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 \
                -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
                slurmctld slurmd slurm-client slurmdbd munge mariadb-server mariadb-client
    } >"$LOG/apt-install.log" 2>&1 || rc=$?
    ((created_policy)) && rm -f "$policy"
    if ((rc != 0)); then
        tail -n 30 "$LOG/apt-install.log" >&2
        die "apt-get install failed (rc=$rc, log: $LOG/apt-install.log)"
    fi
}

# ---------------------------------------------------------------- host setup

ensure_dirs() {
    mkdir -p "$STATE"
    chmod 755 "$STATE"
    mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/ctld" "$STATE/spool/n1" "$STATE/spool/n2" "$STATE/tmp"
    chmod 755 "$ETC" "$RUN" "$LOG" "$STATE/ctld" "$STATE/spool" "$STATE/spool/n1" "$STATE/spool/n2"
    chmod 1777 "$STATE/tmp"
    mkdir -p "$MUNGE_DIR" "$MYSQL_DIR"
    chmod 700 "$MUNGE_DIR"
    chmod 755 "$MYSQL_DIR"
}

ensure_hosts() {
    # n1 and n2 resolve to loopback, so a job can use its first node name as torch.distributed MASTER_ADDR.
    local h missing=()
    for h in "${NODES[@]}"; do
        getent hosts "$h" >/dev/null 2>&1 || missing+=("$h")
    done
    ((${#missing[@]})) || return 0
    local sep=
    [[ -s /etc/hosts && -n $(tail -c 1 /etc/hosts) ]] && sep=$'\n'  # the file's last line has no newline
    if printf '%s127.0.0.1 %s  %s\n' "$sep" "${missing[*]}" "$HOSTS_TAG" >>/etc/hosts 2>/dev/null; then
        say "added '127.0.0.1 ${missing[*]}' to /etc/hosts"
    else
        say "WARNING: cannot write /etc/hosts; ${missing[*]} do not resolve"
    fi
}


# ---------------------------------------------------------------- the host's files, as found

# backup_host_files: the first `up` (no complete backup yet) keeps /etc/hosts and /etc/slurm as they are.
backup_host_files() {
    [[ -e $BACKUP/found ]] && return 0
    rm -rf "$BACKUP"
    mkdir -p "$BACKUP"
    chmod 700 "$BACKUP"
    if [[ -e /etc/hosts ]]; then
        cp -p /etc/hosts "$BACKUP/hosts"
    fi
    if [[ -d /etc/slurm ]]; then
        tar -C /etc -cpf "$BACKUP/etc-slurm.tar" slurm
    fi
    date +%s >"$BACKUP/found"
}

# restore_host_files: /etc/hosts and /etc/slurm back as the first `up` found them; the backup is dropped.
restore_host_files() {
    [[ -e $BACKUP/found ]] || return 0
    if [[ -e $BACKUP/hosts ]]; then
        local ours
        ours=$(mktemp)
        grep -vF "$HOSTS_TAG" /etc/hosts >"$ours" || true
        # Our line was appended, maybe after a newline we added: without it the file must be the copy
        # (in place: /etc/hosts can be a bind mount that a rename would not replace).
        if cmp -s "$ours" "$BACKUP/hosts" || cmp -s "$ours" <(cat "$BACKUP/hosts"; echo); then
            cmp -s /etc/hosts "$BACKUP/hosts" || cat "$BACKUP/hosts" >/etc/hosts
            say "restored /etc/hosts"
        else
            # someone else changed it since `up`: take out only our line, keep their change
            cat "$ours" >/etc/hosts
            say "removed our line from /etc/hosts (it was changed by something else since up)"
        fi
        chmod --reference="$BACKUP/hosts" /etc/hosts
        rm -f "$ours"
    fi
    rm -rf /etc/slurm
    if [[ -e $BACKUP/etc-slurm.tar ]]; then
        tar -C /etc -xpf "$BACKUP/etc-slurm.tar"
        say "restored /etc/slurm"
    else
        say "removed /etc/slurm (there was none before up)"
    fi
    rm -rf "$BACKUP"
}

# ---------------------------------------------------------------- munge

munge_works() { munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }

start_munge() {
    munge_alive && return 0
    if munge_works; then
        # A munged we did not start (e.g. the system one) already serves the default socket: use it.
        say "using the munged already listening on $MUNGE_SOCKET"
        return 0
    fi
    local key=$MUNGE_DIR/munge.key
    if [[ ! -s $key ]]; then
        head -c 1024 /dev/urandom >"$key.tmp"
        chmod 400 "$key.tmp"
        mv "$key.tmp" "$key"
    fi
    mkdir -p "$(dirname "$MUNGE_SOCKET")"
    chmod 755 "$(dirname "$MUNGE_SOCKET")"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    say "starting munged (own key $key, socket $MUNGE_SOCKET)"
    munged --force --socket="$MUNGE_SOCKET" --key-file="$key" --pid-file="$(munge_pidfile)" \
        --log-file="$LOG/munged.log" --seed-file="$MUNGE_DIR/munged.seed" --num-threads=10
    wait_for 15 "munged" munge_works || die "munged did not start (see $LOG/munged.log)"
    wait_for 5 "munged pid file" munge_alive || die "munged did not start (see $LOG/munged.log)"
}

# ---------------------------------------------------------------- mariadb + slurmdbd

# shellcheck disable=SC2120  # called with arguments through wait_for
mysql_cli() { mariadb --no-defaults --socket="$MYSQL_SOCKET" -u root "$@"; }

start_mysql() {
    mysql_alive && return 0
    local data=$MYSQL_DIR/data
    if [[ ! -d $data/mysql ]]; then
        say "initialising private mariadb datadir $data"
        rm -rf "$data"
        mariadb-install-db --no-defaults --user=root --datadir="$data" --basedir=/usr \
            --auth-root-authentication-method=socket --skip-test-db --skip-name-resolve \
            >"$LOG/mariadb-install-db.log" 2>&1 || die "mariadb-install-db failed (see $LOG/mariadb-install-db.log)"
    fi
    rm -f "$MYSQL_SOCKET"
    say "starting mariadbd (127.0.0.1:$MYSQL_PORT, socket $MYSQL_SOCKET)"
    setsid mariadbd --no-defaults --user=root --datadir="$data" --basedir=/usr \
        --socket="$MYSQL_SOCKET" --port="$MYSQL_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --pid-file="$(mysql_pidfile)" --log-error="$LOG/mariadb.log" --skip-log-bin \
        --innodb-buffer-pool-size=512M --innodb-log-file-size=32M --innodb-lock-wait-timeout=900 \
        --max-connections=100 --performance-schema=OFF \
        </dev/null >>"$LOG/mariadb.log" 2>&1 &
    wait_for 60 "mariadb" mysql_cli -e 'SELECT 1' || die "mariadb did not start (see $LOG/mariadb.log)"
    wait_for 5 "mariadb pid file" mysql_alive || die "mariadb pid file missing (see $LOG/mariadb.log)"
    local pass
    pass=$(db_password)
    # shellcheck disable=SC2119
    mysql_cli <<SQL || die "cannot create the slurm database user"
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pass';
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL
}

db_password() {
    local f=$MYSQL_DIR/slurm.pass
    if [[ ! -s $f ]]; then
        (umask 077 && head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$f")
    fi
    cat "$f"
}

write_dbd_conf() {
    local tmp=$DBD_CONF.tmp
    cat >"$tmp" <<EOF
$MARKER
AuthType=auth/munge
DbdHost=$(hostname -s)
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$LOG/slurmdbd.log
PidFile=$(dbd_pidfile)
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=$(db_password)
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$tmp"
    if cmp -s "$tmp" "$DBD_CONF"; then
        rm -f "$tmp"
        return 1
    fi
    mv "$tmp" "$DBD_CONF"
    return 0
}

dbd_ready() { sacctmgr -n -P show cluster format=cluster >/dev/null 2>&1; }

start_dbd() {
    local changed=$1
    if dbd_alive && ((changed)); then
        stop_pid slurmdbd "$(dbd_pidfile)" slurmdbd
    fi
    if ! dbd_alive; then
        say "starting slurmdbd (127.0.0.1:$DBD_PORT)"
        # slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF
        SLURM_CONF=$CONF slurmdbd || die "slurmdbd failed to start (see $LOG/slurmdbd.log)"
    fi
    wait_for 60 "slurmdbd" dbd_ready || die "slurmdbd not answering (see $LOG/slurmdbd.log)"
}

register_accounting() {
    local out
    out=$(sacctmgr -n -P show cluster "$CLUSTER" format=cluster 2>/dev/null || true)
    if [[ $out != "$CLUSTER" ]]; then
        say "registering cluster '$CLUSTER' in the accounting database"
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
    out=$(sacctmgr -n -P show account "$CLUSTER" format=account 2>/dev/null || true)
    if [[ $out != "$CLUSTER" ]]; then
        sacctmgr -i add account "$CLUSTER" Cluster="$CLUSTER" Description="tla test account" Organization=tla >/dev/null
    fi
    out=$(sacctmgr -n -P show assoc where cluster="$CLUSTER" account="$CLUSTER" user=root format=user 2>/dev/null || true)
    if [[ $out != root* ]]; then
        sacctmgr -i add user root Account="$CLUSTER" Cluster="$CLUSTER" >/dev/null
    fi
}

# ---------------------------------------------------------------- slurm.conf

# write_slurm_conf MODE(accounting|none) USER_SIGNAL(0|1); returns 0 when the file changed
write_slurm_conf() {
    local mode=$1 user_signal=$2 host tmp=$CONF.tmp acct ctld_params=
    host=$(hostname -s)
    if [[ $mode == accounting ]]; then
        acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
    else
        acct="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
    fi
    # Most sites do not set preempt_send_user_signal: a preempted job's tasks get SIGTERM, and the
    # job's own --signal only comes at its time. `up --preempt-user-signal` is the other kind.
    if ((user_signal)); then
        ctld_params="SlurmctldParameters=preempt_send_user_signal"
    fi
    cat >"$tmp" <<EOF
$MARKER
# Master copy: $CONF (copied to $SYSTEM_CONF for plain client commands).
# Accounting mode: $mode; preempt_send_user_signal: $user_signal
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$N1_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
LaunchType=launch/slurm
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$(ctld_pidfile)
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
TmpFS=$STATE/tmp
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=30
InactiveLimit=0
Waittime=0
SlurmctldTimeout=60
SlurmdTimeout=60
MessageTimeout=10
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
$ctld_params
$acct
JobCompType=jobcomp/none

NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$N1_PORT CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$N2_PORT CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB State=UNKNOWN

PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=04:00:00 PriorityTier=1 PreemptMode=OFF State=UP
PartitionName=low Nodes=n1 MaxTime=04:00:00 PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_TIME State=UP
PartitionName=lownograce Nodes=n1 MaxTime=04:00:00 PriorityTier=1 PreemptMode=REQUEUE GraceTime=0 State=UP
PartitionName=high Nodes=n1 MaxTime=04:00:00 PriorityTier=10 PreemptMode=OFF State=UP
EOF
    chmod 644 "$tmp"
    if cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 1
    fi
    mv "$tmp" "$CONF"
    return 0
}

install_system_conf() {
    mkdir -p /etc/slurm  # what was there before is in $BACKUP, put back by `down`
    cmp -s "$CONF" "$SYSTEM_CONF" || install -m 644 "$CONF" "$SYSTEM_CONF"
}

# ---------------------------------------------------------------- slurmctld + slurmd

ctld_ready() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

CTLD_LOG_OFFSET=

# $1 = clear: drop the jobs of the saved state (slurmctld -c).
start_ctld() {
    ctld_alive && return 0
    CTLD_LOG_OFFSET=$(stat -c %s "$LOG/slurmctld.log" 2>/dev/null || echo 0)
    local clear=()
    [[ ${1:-} == clear ]] && clear=(-c)
    say "starting slurmctld (127.0.0.1:$CTLD_PORT)${clear:+, without the jobs of an earlier life}"
    slurmctld -f "$CONF" "${clear[@]}" || die "slurmctld failed to start (see $LOG/slurmctld.log)"
    wait_for 60 "slurmctld" ctld_ready || die "slurmctld not answering (see $LOG/slurmctld.log)"
}

# The main scheduler of a fresh slurmctld makes its first pass a few seconds after start (it logs its
# SchedulerParameters then); wait for it so that the first job submitted after `up` starts at once.
sched_started() { tail -c +$((CTLD_LOG_OFFSET + 1)) "$LOG/slurmctld.log" | grep -q 'SchedulerParameters='; }

wait_scheduler() {
    [[ -n $CTLD_LOG_OFFSET ]] || return 0
    wait_for 15 "the first scheduling pass" sched_started || true
}

start_slurmd() {
    local n=$1
    slurmd_alive "$n" && return 0
    say "starting slurmd -N $n"
    slurmd -f "$CONF" -N "$n" || die "slurmd -N $n failed to start (see $LOG/slurmd-$n.log)"
    wait_for 10 "slurmd $n pid file" slurmd_alive "$n" || die "slurmd -N $n died (see $LOG/slurmd-$n.log)"
}

# node_state NODE : compact state, e.g. idle, mix, alloc, down*, drain, unk*
node_state() { sinfo -h -N -n "$1" -o '%t' 2>/dev/null | head -n1; }

node_usable() {
    local s
    s=$(node_state "$1")
    case $s in
        idle | mix | mixed | alloc | allocated | comp | completing) return 0 ;;
        *) return 1 ;;
    esac
}

wait_nodes() {
    local n s
    for n in "${NODES[@]}"; do
        if ! wait_for 20 "node $n to register" node_usable "$n"; then
            s=$(node_state "$n")
            case $s in
                drain* | drng* | down* | fail*)
                    say "node $n is '$s', resuming it"
                    scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true
                    wait_for 20 "node $n to become usable" node_usable "$n" ||
                        die "node $n is '$(node_state "$n")' (see $LOG/slurmd-$n.log, $LOG/slurmctld.log)"
                    ;;
                *) die "node $n is '$s' (see $LOG/slurmd-$n.log, $LOG/slurmctld.log)" ;;
            esac
        fi
    done
}

# ---------------------------------------------------------------- commands

all_up() {
    local n
    munge_works && ctld_alive || return 1
    for n in "${NODES[@]}"; do slurmd_alive "$n" || return 1; done
    if [[ $1 == accounting ]]; then
        mysql_alive && dbd_alive || return 1
    fi
    return 0
}

cmd_up() {
    local mode=accounting user_signal=0
    while (($#)); do
        case $1 in
            --no-accounting) mode=none ;;
            --preempt-user-signal) user_signal=1 ;;
            *) die "up: unknown option $1" ;;
        esac
        shift
    done
    [[ $(id -u) == 0 ]] || die "must run as root"
    local t0=$SECONDS
    ensure_dirs
    backup_host_files
    ensure_packages
    ensure_hosts

    # A cold start (no slurmctld running) begins with an empty queue: jobs saved by an earlier life
    # that ended without `down` (a killed test session, a rebooted machine) would otherwise come back,
    # requeued, and take the nodes the next session's tests need. A restart for a changed config
    # (below) keeps its jobs.
    local cold=
    ctld_alive || cold=clear
    local conf_changed=0 dbd_changed=0
    write_slurm_conf "$mode" "$user_signal" && conf_changed=1
    install_system_conf

    if ((!conf_changed)) && all_up "$mode"; then
        if ctld_ready && node_usable n1 && node_usable n2; then
            say "already up (accounting: ${mode/accounting/slurmdbd}); state in $STATE, logs in $LOG"
            return 0
        fi
    fi

    start_munge
    if [[ $mode == accounting ]]; then
        start_mysql
        write_dbd_conf && dbd_changed=1
        start_dbd "$dbd_changed"
        register_accounting
    fi

    if ((conf_changed)); then
        # AccountingStorageType/JobAcctGatherType need a daemon restart; running jobs survive it.
        stop_pid slurmctld "$(ctld_pidfile)" slurmctld \
            "slurmd n1" "$(slurmd_pidfile n1)" slurmd "slurmd n2" "$(slurmd_pidfile n2)" slurmd
    fi
    start_ctld "$cold"
    local n
    for n in "${NODES[@]}"; do start_slurmd "$n"; done
    wait_nodes
    wait_scheduler

    if [[ $mode == none ]]; then
        stop_pid slurmdbd "$(dbd_pidfile)" slurmdbd
        STOP_TIMEOUT=60 stop_pid mariadb "$(mysql_pidfile)" mariadbd
    fi
    say "up in $((SECONDS - t0))s (accounting: ${mode/accounting/slurmdbd}): cluster '$CLUSTER', nodes n1 n2 ($NODE_CPUS CPUs each), partitions debug(default) low (GraceTime ${GRACE_TIME}s) lownograce high; preempt_send_user_signal: $user_signal"
    say "config $CONF (copied to $SYSTEM_CONF); state $STATE; logs in $LOG (cluster.sh logs)"
}

cmd_down() {
    local n
    if ctld_alive; then
        local ids
        ids=$(squeue -h -o '%A' 2>/dev/null | sort -u | tr '\n' ' ' || true)
        if [[ -n ${ids// /} ]]; then
            say "cancelling jobs: $ids"
            # shellcheck disable=SC2086
            scancel $ids 2>/dev/null || true
            wait_for 30 "jobs to finish" test -z "$(squeue -h -o '%A' 2>/dev/null)" || true
        fi
    fi
    stop_pid "slurmd n1" "$(slurmd_pidfile n1)" slurmd "slurmd n2" "$(slurmd_pidfile n2)" slurmd \
        slurmctld "$(ctld_pidfile)" slurmctld
    kill_stray_stepds
    stop_pid slurmdbd "$(dbd_pidfile)" slurmdbd
    STOP_TIMEOUT=60 stop_pid mariadb "$(mysql_pidfile)" mariadbd
    stop_pid munged "$(munge_pidfile)" munged
    restore_host_files
    say "down; logs kept in $LOG"
}

# descendants PID... : all descendant pids of the given pids
descendants() {
    local p c
    for p in "$@"; do
        for c in $(pgrep -P "$p" 2>/dev/null || true); do
            echo "$c"
            descendants "$c"
        done
    done
}

# slurmstepd processes of our nodes (they hold our slurmd log open) that survived scancel, e.g. because
# slurmctld was dead: kill them with their whole process tree (the job's processes).
kill_stray_stepds() {
    local pid fd found=()
    for pid in $(pgrep -x slurmstepd 2>/dev/null || true); do
        for fd in /proc/"$pid"/fd/*; do
            if [[ $(readlink "$fd" 2>/dev/null) == "$STATE"/* ]]; then
                found+=("$pid")
                break
            fi
        done
    done
    ((${#found[@]})) || return 0
    local tree
    tree=$(descendants "${found[@]}" | tr '\n' ' ')
    say "killing leftover slurmstepd ${found[*]} and their processes ${tree}"
    kill -STOP "${found[@]}" 2>/dev/null || true
    # shellcheck disable=SC2086
    kill -KILL $tree "${found[@]}" 2>/dev/null || true
}

cmd_status() {
    local rc=0 n
    show() {
        if "$2"; then
            printf '  %-14s running (pid %s)\n' "$1" "$(tr -dc '0-9' <"$3")"
        else
            printf '  %-14s stopped\n' "$1"
            rc=1
        fi
    }
    echo "state folder: $STATE"
    if [[ -s $CONF ]]; then
        echo "accounting:   $(sed -n "s/^AccountingStorageType=accounting_storage\///p" "$CONF")"
    fi
    show munged munge_alive "$(munge_pidfile)"
    show mariadb mysql_alive "$(mysql_pidfile)"
    show slurmdbd dbd_alive "$(dbd_pidfile)"
    show slurmctld ctld_alive "$(ctld_pidfile)"
    for n in "${NODES[@]}"; do
        # shellcheck disable=SC2317
        _sd() { slurmd_alive "$n"; }
        show "slurmd $n" _sd "$(slurmd_pidfile "$n")"
    done
    if ctld_alive; then
        echo
        sinfo || true
    fi
    return 0
}

cmd_logs() {
    local lines=${1:-40} f
    for f in "$LOG"/*.log; do
        [[ -e $f ]] || continue
        [[ $f == *-install*.log ]] && continue # apt-install.log, mariadb-install-db.log: one-off setup
        echo "===== $f (last $lines lines)"
        tail -n "$lines" "$f"
    done
}

cmd_env() {
    echo "export SLURM_CONF=$CONF"
}

usage() {
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
}

main() {
    local cmd=${1:-}
    [[ $# -gt 0 ]] && shift
    case $cmd in
        up) cmd_up "$@" ;;
        down) cmd_down "$@" ;;
        status) cmd_status "$@" ;;
        logs) cmd_logs "$@" ;;
        env) cmd_env "$@" ;;
        -h | --help | help) usage ;;
        *)
            usage
            exit 2
            ;;
    esac
}

main "$@"
