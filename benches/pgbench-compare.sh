#!/usr/bin/env bash
# pgbench-compare.sh: Shardline against PgBouncer and direct PostgreSQL.
#
# Creates a throwaway PostgreSQL cluster, PgBouncer and Shardline (both in
# transaction pooling mode with the same pool size) in a temporary directory,
# runs `pgbench -S` against all three, alternating the targets within each row
# so machine noise hits all of them alike, then runs a connection storm
# against both proxies. Prints markdown tables and whether Shardline's goals
# hold (TPS >= PgBouncer's, CPU per transaction <= PgBouncer's, in every row).
# Everything started here is stopped by PID on exit, also on failure or Ctrl-C.
#
# Usage: benches/pgbench-compare.sh          (about 4 minutes plus the build)
#        DURATION=3 benches/pgbench-compare.sh   (quick check of the script)
#
# Environment (defaults in brackets):
#   DURATION       seconds per pgbench run [15]
#   SCALE          pgbench -i scale factor [10]
#   POOL           server connections per pool, both proxies [20]
#   CLIENTS        pgbench client counts, one row each ["16 64"]
#   MODES          pgbench -M protocols ["simple extended"]
#   ROUNDS         repetitions of every row; the target order rotates by one
#                  each round; the summary takes medians [1]
#   JOBS           pgbench -j for the throughput rows [2]
#   WARMUP         seconds of pgbench per target before measuring, so pools
#                  are full and caches warm [3]
#   STORM_CLIENTS  clients in the connection storm [500]
#   STORM_JOBS     pgbench threads in the storm [STORM_CLIENTS]. pgbench opens
#                  connections one at a time per thread, so -j 2 would mean only
#                  two logins in flight; one thread per client makes them all
#                  arrive at once.
#   STORM_HOLD     seconds of the second storm, in which STORM_CLIENTS clients
#                  stay connected and run SELECTs over the pool [5]; 0 skips it
#   STORM_TARGETS  proxies to storm, in this order for the connect storm and
#                  reversed for the held one ["pgbouncer shardline"]
#   SHARDLINE_BIN  use this binary instead of `cargo build --release`
#   SHARDLINE_THREADS  Shardline's worker_threads: 0 is its default (one
#                  per two CPUs), 1 a single event loop as PgBouncer has,
#                  2 two event loops [0]
#   FLOOR          1 adds the target `floor`: benches/src/bin/tcp_forward.rs,
#                  a tokio TCP forwarder with SHARDLINE_THREADS workers that
#                  gives each client its own server connection and parses
#                  nothing. Its CPU/txn is what a tokio proxy costs before
#                  doing any work, so it splits Shardline's gap to PgBouncer
#                  into runtime and Shardline's own [0]
#   FLOOR_BIN      use this tcp_forward binary instead of building it
#   PG_BINDIR      PostgreSQL server binaries [pg_config --bindir, else
#                  the newest /usr/lib/postgresql/*/bin]
#   PGBOUNCER      PgBouncer binary [pgbouncer on PATH, else /usr/sbin/pgbouncer]
#   KEEP           1 keeps the temporary directory (logs, configs) [0]
#   PERF_STAT      1 also counts each proxy's system calls and context
#                  switches per transaction with `perf stat` (needs perf and
#                  perf_event_paranoid <= 2); they explain most of the CPU gap
#                  between two proxies that user-space profiles do not show [0]
#
# Needs: pgbench, psql, PgBouncer, PostgreSQL server binaries, setsid
# (util-linux), Linux /proc.
# When run as root, PostgreSQL and PgBouncer run as the `postgres` OS user
# (both refuse root); Shardline runs as the invoking user.

set -euo pipefail

DURATION=${DURATION:-15}
SCALE=${SCALE:-10}
POOL=${POOL:-20}
CLIENTS=${CLIENTS:-"16 64"}
MODES=${MODES:-"simple extended"}
ROUNDS=${ROUNDS:-1}
JOBS=${JOBS:-2}
WARMUP=${WARMUP:-3}
STORM_CLIENTS=${STORM_CLIENTS:-500}
STORM_JOBS=${STORM_JOBS:-$STORM_CLIENTS}
STORM_HOLD=${STORM_HOLD:-5}
STORM_TARGETS=${STORM_TARGETS:-"pgbouncer shardline"}
KEEP=${KEEP:-0}
PERF_STAT=${PERF_STAT:-0}
FLOOR=${FLOOR:-0}

DB=bench
DB_USER=bench
DB_PASSWORD=bench-secret
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

for v in DURATION SCALE POOL ROUNDS JOBS WARMUP STORM_CLIENTS STORM_JOBS STORM_HOLD; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number, not '${!v}'"
done
((DURATION > 0 && SCALE > 0 && POOL > 0 && ROUNDS > 0 && JOBS > 0)) ||
    die "DURATION, SCALE, POOL, ROUNDS and JOBS must be positive"
for m in $MODES; do
    [[ $m == simple || $m == extended || $m == prepared ]] || die "unknown mode '$m' in MODES"
done
for t in $STORM_TARGETS; do
    [[ $t == pgbouncer || $t == shardline ]] || die "unknown target '$t' in STORM_TARGETS"
done
for c in $CLIENTS; do [[ $c =~ ^[1-9][0-9]*$ ]] || die "bad client count '$c' in CLIENTS"; done

# --- tools -------------------------------------------------------------------

command -v pgbench >/dev/null || die "pgbench not found"
command -v psql >/dev/null || die "psql not found"
if [[ -z ${PG_BINDIR:-} ]]; then
    if command -v pg_config >/dev/null && [[ -x "$(pg_config --bindir)/initdb" ]]; then
        PG_BINDIR=$(pg_config --bindir)
    else
        PG_BINDIR=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    fi
fi
[[ -x ${PG_BINDIR:-}/initdb && -x $PG_BINDIR/postgres ]] ||
    die "no initdb/postgres found; set PG_BINDIR"
PGBOUNCER=${PGBOUNCER:-$(command -v pgbouncer || echo /usr/sbin/pgbouncer)}
[[ -x $PGBOUNCER ]] || die "pgbouncer not found; set PGBOUNCER"
CLK_TCK=$(getconf CLK_TCK)

# Runs a command as the owner of the database files: `postgres` when we are root.
if ((EUID == 0)); then
    id postgres >/dev/null 2>&1 || die "running as root needs a 'postgres' OS user"
    SERVICE_USER=postgres
    as_service() { runuser -u postgres -- "$@"; }
else
    SERVICE_USER=$(id -un)
    as_service() { "$@"; }
fi

# --- cleanup -----------------------------------------------------------------

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pgbench-compare.XXXXXX")
chmod 755 "$WORK"
PG_PID=
BOUNCER_PID=
SHARDLINE_PID=
FLOOR_PID=
PGBENCH_PID=
BUILD_PID=

# Sends `signal` to `pid` and waits up to `secs` for it to go, then SIGKILL.
stop_pid() {
    local pid=$1 signal=$2 secs=$3 name=$4 i
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill "-$signal" "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "$name (pid $pid) did not stop after SIG$signal; killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    stop_pid "$PGBENCH_PID" TERM 5 pgbench
    # cargo and its rustc children share the process group setsid gave them.
    [[ -n $BUILD_PID ]] && kill -TERM -- "-$BUILD_PID" 2>/dev/null
    stop_pid "$SHARDLINE_PID" TERM 10 shardline
    wait "$SHARDLINE_PID" 2>/dev/null
    stop_pid "$FLOOR_PID" TERM 10 tcp_forward
    stop_pid "$BOUNCER_PID" TERM 10 pgbouncer # SIGTERM: immediate shutdown
    stop_pid "$PG_PID" INT 30 postgres        # SIGINT: fast shutdown
    if [[ $KEEP == 1 || $rc -ne 0 ]]; then
        log "logs and configs kept in $WORK"
        rm -rf "$WORK/pgdata" 2>/dev/null
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- Shardline binary --------------------------------------------------------

if [[ -z ${SHARDLINE_BIN:-} ]]; then
    log "building shardline (cargo build --release)"
    (cd "$ROOT" && exec setsid cargo build --release --bin shardline) >&2 &
    BUILD_PID=$!
    wait "$BUILD_PID" || die "cargo build failed"
    BUILD_PID=
    SHARDLINE_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/shardline
fi
[[ -x $SHARDLINE_BIN ]] || die "no shardline binary at $SHARDLINE_BIN"
if [[ $FLOOR == 1 && -z ${FLOOR_BIN:-} ]]; then
    log "building tcp_forward (cargo build --release -p benches --bin tcp_forward)"
    (cd "$ROOT" && exec setsid cargo build --release -p benches --bin tcp_forward) >&2 &
    BUILD_PID=$!
    wait "$BUILD_PID" || die "cargo build failed"
    BUILD_PID=
    FLOOR_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/tcp_forward
fi
[[ $FLOOR != 1 || -x $FLOOR_BIN ]] || die "no tcp_forward binary at $FLOOR_BIN"

# --- helpers -----------------------------------------------------------------

# A TCP port on 127.0.0.1 that nothing listens on (and none we picked before).
USED_PORTS=" "
free_port() {
    local p i
    for ((i = 0; i < 200; i++)); do
        p=$((20000 + RANDOM % 40000))
        [[ $USED_PORTS == *" $p "* ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null &&
            ! ss -Htan "sport = :$p" 2>/dev/null | grep -q .; then
            USED_PORTS+="$p "
            echo "$p"
            return 0
        fi
    done
    die "no free port found"
}

# Waits until `pid` is alive and 127.0.0.1:`port` accepts connections.
wait_port() {
    local port=$1 pid=$2 name=$3 i
    for ((i = 0; i < 300; i++)); do
        kill -0 "$pid" 2>/dev/null || die "$name exited during startup (see its log in $WORK)"
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    die "$name did not listen on port $port within 30s"
}

# Fields of /proc/PID/stat after the parenthesised command name (which may
# hold spaces): the 3rd field is the 1st here.
stat_fields() {
    local stat
    stat=$(<"/proc/$1/stat")
    echo "${stat##*) }"
}

# Dies if PID is in this script's session (field 6), so shares pgbench's
# scheduling group (see the Shardline section).
own_session() {
    [[ $(stat_fields "$1" | awk '{ print $4 }') != $(stat_fields $$ | awk '{ print $4 }') ]] ||
        die "$2 (pid $1) shares pgbench's session, so its CPU figures would include pgbench's preemptions"
}

# utime + stime of a process (all its threads), in clock ticks: fields 14
# and 15.
cpu_ticks() { stat_fields "$1" | awk '{ print $12 + $13 }'; }

# Peak resident set (VmHWM) of a process, in kB.
peak_rss_kb() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# Kernel-wide count of connections dropped because a listen queue was full
# (TcpExt ListenOverflows + ListenDrops); clients see a 1s SYN retransmit.
listen_drops() {
    awk '/^TcpExt:/ { if (!h) { for (i = 2; i <= NF; i++) col[$i] = i; h = 1 } else print $col["ListenOverflows"] + $col["ListenDrops"] }' \
        /proc/net/netstat 2>/dev/null || echo 0
}

declare -A PORT PID
target_pid() { echo "${PID[$1]:-}"; }

export PGPASSWORD=$DB_PASSWORD PGCONNECT_TIMEOUT=30

# --- PostgreSQL --------------------------------------------------------------

PORT[direct]=$(free_port)
PORT[pgbouncer]=$(free_port)
PORT[shardline]=$(free_port)

log "PostgreSQL ($PG_BINDIR) on 127.0.0.1:${PORT[direct]}, data in $WORK/pgdata"
mkdir -p "$WORK/pgdata" "$WORK/sock" "$WORK/pglog" "$WORK/pgbouncer" "$WORK/logs"
chown "$SERVICE_USER" "$WORK/pgdata" "$WORK/sock" "$WORK/pglog" "$WORK/pgbouncer"
chmod 700 "$WORK/pgdata"
as_service "$PG_BINDIR/initdb" -D "$WORK/pgdata" -U postgres -E UTF8 --no-sync \
    --auth-local=trust --auth-host=scram-sha-256 >"$WORK/logs/initdb.log" 2>&1 ||
    { cat "$WORK/logs/initdb.log" >&2; die "initdb failed"; }
cat >>"$WORK/pgdata/postgresql.conf" <<EOF

# pgbench-compare.sh
listen_addresses = '127.0.0.1'
port = ${PORT[direct]}
unix_socket_directories = '$WORK/sock'
max_connections = 200
shared_buffers = 256MB
fsync = off
synchronous_commit = off
full_page_writes = off
logging_collector = off
log_min_messages = warning
EOF
as_service "$PG_BINDIR/pg_ctl" -D "$WORK/pgdata" -l "$WORK/pglog/postgres.log" -w -t 60 start \
    >/dev/null || { cat "$WORK/pglog/postgres.log" >&2; die "PostgreSQL did not start"; }
PG_PID=$(head -n 1 "$WORK/pgdata/postmaster.pid")
PID[direct]=
as_service psql -X -q -v ON_ERROR_STOP=1 -h "$WORK/sock" -p "${PORT[direct]}" -U postgres -d postgres \
    -c "CREATE ROLE $DB_USER LOGIN PASSWORD '$DB_PASSWORD'" \
    -c "CREATE DATABASE $DB OWNER $DB_USER" >/dev/null

log "pgbench -i -s $SCALE"
pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "${PORT[direct]}" -U "$DB_USER" "$DB" \
    >"$WORK/logs/pgbench-init.log" 2>&1 ||
    { cat "$WORK/logs/pgbench-init.log" >&2; die "pgbench -i failed"; }

# --- PgBouncer ---------------------------------------------------------------

B=$WORK/pgbouncer
printf '"%s" "%s"\n' "$DB_USER" "$DB_PASSWORD" >"$B/userlist.txt"
cat >"$B/pgbouncer.ini" <<EOF
[databases]
$DB = host=127.0.0.1 port=${PORT[direct]} dbname=$DB

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = ${PORT[pgbouncer]}
unix_socket_dir =
; PgBouncer's default; Shardline's tokio listener (mio) also listens with 128.
listen_backlog = 128
auth_type = trust
auth_file = $B/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
max_client_conn = 1000
logfile = $B/pgbouncer.log
pidfile = $B/pgbouncer.pid
log_connections = 0
log_disconnections = 0
EOF
chown -R "$SERVICE_USER" "$B"
chmod 600 "$B/userlist.txt"
log "PgBouncer ($("$PGBOUNCER" --version | head -n 1)) on 127.0.0.1:${PORT[pgbouncer]}"
# -d: PgBouncer daemonizes and writes its pidfile. The default soft limit of
# 1024 open files is too low for max_client_conn = 1000 plus server connections.
as_service sh -c 'ulimit -n 4096 2>/dev/null || ulimit -n "$(ulimit -Hn)"; exec "$0" "$@"' \
    "$PGBOUNCER" -d -q "$B/pgbouncer.ini" ||
    { cat "$B/pgbouncer.log" >&2 2>/dev/null; die "PgBouncer did not start"; }
for ((i = 0; i < 100; i++)); do [[ -s $B/pgbouncer.pid ]] && break; sleep 0.1; done
BOUNCER_PID=$(cat "$B/pgbouncer.pid" 2>/dev/null) || die "PgBouncer wrote no pidfile"
PID[pgbouncer]=$BOUNCER_PID
wait_port "${PORT[pgbouncer]}" "$BOUNCER_PID" pgbouncer
own_session "$BOUNCER_PID" pgbouncer

# --- Shardline ---------------------------------------------------------------

cat >"$WORK/shardline.toml" <<EOF
[proxy]
listen = "127.0.0.1:${PORT[shardline]}"
pool_mode = "transaction"
pool_size = $POOL
max_client_connections = 10000
worker_threads = ${SHARDLINE_THREADS:-0}

[[users]]
name = "$DB_USER"
auth = "trust"

[[databases]]
name = "$DB"
host = "127.0.0.1"
port = ${PORT[direct]}
dbname = "$DB"
server_user = "$DB_USER"
server_password = "$DB_PASSWORD"
EOF
log "Shardline ($SHARDLINE_BIN, worker_threads = ${SHARDLINE_THREADS:-0}) on 127.0.0.1:${PORT[shardline]}"
ulimit -n 4096 2>/dev/null || true
# setsid: every server gets a session of its own, as PgBouncer (-d) and
# PostgreSQL (pg_ctl) give themselves. Under autogroup scheduling (Linux's
# default, kernel.sched_autogroup_enabled = 1) a session is a scheduling
# group, and a proxy left in this script's session shares one with pgbench:
# pgbench's wakeups then preempt it twice as often as PgBouncer (0.55
# involuntary context switches per transaction against 0.28, measured with
# worker_threads = 1), which costs it about a tenth of its CPU per
# transaction and of its TPS. setsid execs in place here (a background job of
# a script does not lead its process group), so $! stays the server's PID.
RUST_LOG=${RUST_LOG:-info} setsid "$SHARDLINE_BIN" proxy --config "$WORK/shardline.toml" \
    >"$WORK/logs/shardline.log" 2>&1 &
SHARDLINE_PID=$!
PID[shardline]=$SHARDLINE_PID
wait_port "${PORT[shardline]}" "$SHARDLINE_PID" shardline
own_session "$SHARDLINE_PID" shardline

TARGETS=(direct pgbouncer shardline)
if [[ $FLOOR == 1 ]]; then
    PORT[floor]=$(free_port)
    log "tcp_forward ($FLOOR_BIN, ${SHARDLINE_THREADS:-0} worker threads) on 127.0.0.1:${PORT[floor]}"
    setsid "$FLOOR_BIN" "127.0.0.1:${PORT[floor]}" "127.0.0.1:${PORT[direct]}" "${SHARDLINE_THREADS:-0}" \
        >"$WORK/logs/tcp_forward.log" 2>&1 &
    FLOOR_PID=$!
    PID[floor]=$FLOOR_PID
    wait_port "${PORT[floor]}" "$FLOOR_PID" tcp_forward
    own_session "$FLOOR_PID" tcp_forward
    TARGETS+=(floor)
fi

for t in "${TARGETS[@]}"; do
    out=$(psql -X -qAt -h 127.0.0.1 -p "${PORT[$t]}" -U "$DB_USER" -d "$DB" \
        -c "SELECT count(*) FROM pgbench_branches" 2>&1) ||
        die "$t: cannot query through it: $out"
    [[ $out == "$SCALE" ]] || die "$t: expected $SCALE branches, got '$out'"
done

# --- throughput rows ---------------------------------------------------------

RESULTS=$WORK/results.tsv # round mode clients target tps lat_ms txns cpu_us rss_kb problems
: >"$RESULTS"
LOAD_BEFORE=$(loadavg)
UPTIME_BEFORE=$(uptime)

# run_pgbench TARGET LOGFILE ARGS...: pgbench against a target; output to
# LOGFILE. In the background plus `wait`, so a signal stops the script at once.
run_pgbench() {
    local t=$1 logfile=$2 rc=0
    shift 2
    pgbench -h 127.0.0.1 -p "${PORT[$t]}" -U "$DB_USER" "$@" "$DB" >"$logfile" 2>&1 &
    PGBENCH_PID=$!
    wait "$PGBENCH_PID" || rc=$?
    PGBENCH_PID=
    return "$rc"
}

# Lines in a pgbench log that report trouble.
problem_lines() {
    grep -Ei 'error|fatal|abort|fail|could not|timeout' "$1" |
        grep -Ev '^number of failed transactions: 0 ' || true
}
problems_in() { problem_lines "$1" | grep -c . || true; }

if ((WARMUP > 0)); then
    log "warm-up: ${WARMUP}s per target"
    for t in "${TARGETS[@]}"; do
        run_pgbench "$t" "$WORK/logs/warmup-$t.log" -S -n -T "$WARMUP" -c "$POOL" -j "$JOBS" ||
            log "warning: warm-up against $t failed (see $WORK/logs/warmup-$t.log)"
    done
fi

nrows=$(($(wc -w <<<"$MODES") * $(wc -w <<<"$CLIENTS")))
log "$nrows rows x ${#TARGETS[@]} targets x $ROUNDS round(s) x ${DURATION}s; load average $LOAD_BEFORE"
for ((r = 0; r < ROUNDS; r++)); do
    shift_by=$((r % ${#TARGETS[@]}))
    order=("${TARGETS[@]:shift_by}" "${TARGETS[@]:0:shift_by}")
    for mode in $MODES; do
        for c in $CLIENTS; do
            for t in "${order[@]}"; do
                pid=$(target_pid "$t")
                f=$WORK/logs/run-r$r-$mode-c$c-$t.log
                before=
                [[ -n $pid ]] && before=$(cpu_ticks "$pid")
                load=$(loadavg)
                rc=0
                perf_pid=
                if [[ $PERF_STAT == 1 && -n $pid ]]; then
                    perf stat -x, -o "$f.perf" -p "$pid" \
                        -e context-switches,raw_syscalls:sys_enter 2>/dev/null &
                    perf_pid=$!
                fi
                run_pgbench "$t" "$f" -S -n -T "$DURATION" -M "$mode" -c "$c" -j "$JOBS" || rc=$?
                if [[ -n $perf_pid ]]; then
                    kill -INT "$perf_pid" 2>/dev/null || true
                    wait "$perf_pid" 2>/dev/null || true
                fi
                cpu_us=- rss=-
                if [[ -n $pid ]]; then
                    kill -0 "$pid" 2>/dev/null || die "$t (pid $pid) died during $f"
                    after=$(cpu_ticks "$pid")
                    rss=$(peak_rss_kb "$pid")
                fi
                txns=$(awk -F': ' '/^number of transactions actually processed/ { split($2, a, "/"); print a[1] }' "$f")
                tps=$(awk '/^tps = / { print $3 }' "$f" | tail -n 1)
                lat=$(awk '/^latency average = / { print $4 }' "$f")
                problems=$(problems_in "$f")
                if [[ -z $txns || -z $tps || $txns == 0 ]]; then
                    log "warning: $t $mode c=$c: no result (pgbench exit $rc); tail of $f:"
                    tail -n 5 "$f" >&2
                    txns=0 tps=0 lat=0
                elif [[ -n $pid ]]; then
                    cpu_us=$(awk -v d=$((after - before)) -v hz="$CLK_TCK" -v n="$txns" \
                        'BEGIN { printf "%.1f", d / hz * 1e6 / n }')
                fi
                ((rc == 0)) || problems=$((problems + 1))
                printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
                    "$r" "$mode" "$c" "$t" "$tps" "$lat" "$txns" "$cpu_us" "$rss" "$problems" >>"$RESULTS"
                perf_note=
                if [[ -s $f.perf && $txns != 0 ]]; then
                    perf_note=$(awk -F, -v n="$txns" '
                        $3 == "context-switches" { cs = $1 }
                        $3 == "raw_syscalls:sys_enter" { sc = $1 }
                        END { printf ", syscalls/txn %.2f, context switches/txn %.2f", sc / n, cs / n }' "$f.perf")
                fi
                log "round $((r + 1))/$ROUNDS $mode c=$c $t: tps $tps, latency ${lat}ms, cpu/txn ${cpu_us}us$perf_note, load before $load$( ((problems == 0)) || echo ", problem lines $problems")"
            done
        done
    done
done

# --- connection storms -------------------------------------------------------

STORMS=$WORK/storms.tsv # kind target clients served failed seconds cpu_ms rss_kb
: >"$STORMS"
storm() {
    local kind=$1 t=$2 f pid before after start end rc=0 served failed txns tps drops
    pid=$(target_pid "$t")
    f=$WORK/logs/storm-$kind-$t.log
    before=$(cpu_ticks "$pid")
    drops=$(listen_drops)
    start=$(date +%s.%N)
    if [[ $kind == connect ]]; then
        # Every client connects, runs one SELECT, disconnects; all at once.
        run_pgbench "$t" "$f" -S -n -C -t 1 -c "$STORM_CLIENTS" -j "$STORM_JOBS" || rc=$?
    else
        # Every client connects (JOBS at a time) and stays, sharing POOL servers.
        run_pgbench "$t" "$f" -S -n -T "$STORM_HOLD" -c "$STORM_CLIENTS" -j "$JOBS" || rc=$?
    fi
    end=$(date +%s.%N)
    drops=$(($(listen_drops) - drops))
    kill -0 "$pid" 2>/dev/null || die "$t (pid $pid) died during the storm ($f)"
    after=$(cpu_ticks "$pid")
    txns=$(awk -F': ' '/^number of transactions actually processed/ { split($2, a, "/"); print a[1] }' "$f")
    tps=$(awk '/^tps = / { print $3 }' "$f" | tail -n 1)
    if [[ $kind == connect ]]; then
        served=${txns:-0}
        failed=$((STORM_CLIENTS - served))
    else
        # pgbench exits on the first failed initial connection; count aborted clients.
        served=${txns:-0}
        failed=$(grep -Eci 'aborted|could not create connection|connection to server' "$f" || true)
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$kind" "$t" "$STORM_CLIENTS" "$served" "$failed" \
        "$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')" \
        "$(awk -v d=$((after - before)) -v hz="$CLK_TCK" 'BEGIN { printf "%.0f", d / hz * 1000 }')" \
        "$(peak_rss_kb "$pid")" "${tps:--}" "$rc" "$drops" >>"$STORMS"
    log "storm $kind $t: served $served, failed $failed, listen queue drops $drops, pgbench exit $rc"
}
if ((STORM_CLIENTS > 0)); then
    log "connection storm: $STORM_CLIENTS clients (-C -t 1, $STORM_JOBS threads), pool $POOL"
    for t in $STORM_TARGETS; do storm connect "$t"; done
    if ((STORM_HOLD > 0)); then
        log "held storm: $STORM_CLIENTS clients connected for ${STORM_HOLD}s, pool $POOL"
        # Reverse order, so neither proxy always goes first.
        for t in $(tac -s ' ' <<<"$STORM_TARGETS " | xargs); do storm hold "$t"; done
    fi
fi

LOAD_AFTER=$(loadavg)
UPTIME_AFTER=$(uptime)

# --- report ------------------------------------------------------------------

echo
echo "## pgbench -S: direct PostgreSQL vs PgBouncer vs Shardline"
echo
echo "$(nproc) CPUs; PostgreSQL $("$PG_BINDIR/postgres" --version | awk '{ print $3 }'), $("$PGBOUNCER" --version | head -n 1), shardline $("$SHARDLINE_BIN" --version 2>/dev/null | awk '{ print $NF }')."
echo "scale $SCALE, pool $POOL, ${DURATION}s per run, -j $JOBS, $ROUNDS round(s)$( ((ROUNDS > 1)) && echo ' (medians; peak RSS is the maximum)')."
echo "Load average (1/5/15 min) before the runs: $LOAD_BEFORE, after the storms: $LOAD_AFTER."
[[ $FLOOR == 1 ]] &&
    echo "floor: tcp_forward, a tokio forwarder with ${SHARDLINE_THREADS:-0} worker threads (0: Shardline's default, one per two CPUs), one server connection per client, no parsing: what any tokio proxy costs."
echo
awk -F'\t' -v rounds="$ROUNDS" -v targets="${TARGETS[*]}" '
function median(s,    a, n, i, j, x) {
    n = split(s, a, " ")
    for (i = 2; i <= n; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > x + 0; j--) a[j + 1] = a[j]; a[j + 1] = x }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
{
    row = $2 SUBSEP $3
    if (!(row in seen)) { seen[row] = 1; rows[++nrows] = row }
    k = row SUBSEP $4
    tps[k] = tps[k] " " $5; lat[k] = lat[k] " " $6
    if ($8 != "-") cpu[k] = cpu[k] " " $8
    if ($9 != "-" && $9 + 0 > rss[k] + 0) rss[k] = $9
    prob[k] += $10
}
END {
    print "| mode | clients | target | TPS | avg latency (ms) | TPS vs direct | proxy CPU/txn (µs) | proxy peak RSS (MiB) |"
    print "|---|---:|---|---:|---:|---:|---:|---:|"
    tps_ok = 1; cpu_ok = 1
    for (i = 1; i <= nrows; i++) {
        split(rows[i], rc, SUBSEP)
        d = median(tps[rows[i] SUBSEP "direct"])
        n = split(targets, ts, " ")
        for (j = 1; j <= n; j++) {
            k = rows[i] SUBSEP ts[j]
            if (!(k in tps)) continue
            t = median(tps[k]); l = median(lat[k])
            c = (k in cpu) ? sprintf("%.1f", median(cpu[k])) : "-"
            m = (k in rss) ? sprintf("%.1f", rss[k] / 1024) : "-"
            ratio = d > 0 ? sprintf("%.2f", t / d) : "-"
            flag = prob[k] > 0 ? sprintf(" (%d problem lines)", prob[k]) : ""
            printf "| %s | %s | %s | %.0f%s | %.3f | %s | %s | %s |\n", rc[1], rc[2], ts[j], t, flag, l, ratio, c, m
            T[ts[j]] = t; C[ts[j]] = c
        }
        r1 = T["shardline"] >= T["pgbouncer"]
        r2 = C["shardline"] != "-" && C["pgbouncer"] != "-" && C["shardline"] + 0 <= C["pgbouncer"] + 0
        if (!r1) tps_ok = 0
        if (!r2) cpu_ok = 0
        goals = goals sprintf("- %s, %s clients: TPS shardline/pgbouncer = %.2f (%s); CPU/txn shardline %s µs vs pgbouncer %s µs (%s)\n",
            rc[1], rc[2], T["pgbouncer"] > 0 ? T["shardline"] / T["pgbouncer"] : 0, r1 ? "ok" : "MISSED",
            C["shardline"], C["pgbouncer"], r2 ? "ok" : "MISSED")
        delete T; delete C
    }
    print ""
    print "### Goals"
    print ""
    printf "%s", goals
    print ""
    printf "- Shardline TPS >= PgBouncer TPS in every row: %s\n", tps_ok ? "HOLDS" : "DOES NOT HOLD"
    printf "- Shardline CPU/txn <= PgBouncer CPU/txn in every row: %s\n", cpu_ok ? "HOLDS" : "DOES NOT HOLD"
}' "$RESULTS"

if ((ROUNDS > 1)); then
    echo
    echo "### Every run"
    echo
    echo "| round | mode | clients | target | TPS | avg latency (ms) | transactions | proxy CPU/txn (µs) | proxy peak RSS (MiB) | problem lines |"
    echo "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|"
    awk -F'\t' '{ printf "| %d | %s | %s | %s | %.0f | %.3f | %s | %s | %s | %s |\n", $1 + 1, $2, $3, $4, $5, $6, $7, $8,
        $9 == "-" ? "-" : sprintf("%.1f", $9 / 1024), $10 }' "$RESULTS"
fi

if [[ -s $STORMS ]]; then
    echo
    echo "## Connection storms: $STORM_CLIENTS clients, pool $POOL"
    echo
    echo "- connect: \`pgbench -S -n -C -t 1 -c $STORM_CLIENTS -j $STORM_JOBS\`, every client logs in at once, runs one SELECT, leaves."
    ((STORM_HOLD > 0)) &&
        echo "- hold: \`pgbench -S -n -T $STORM_HOLD -c $STORM_CLIENTS -j $JOBS\`, all clients stay connected and share the pool."
    echo "- listen queue drops: kernel-wide TcpExt ListenOverflows+ListenDrops during the storm; each drop costs that client a 1s SYN retransmit."
    echo
    echo "| storm | target | clients | served (transactions) | failed clients | wall time (s) | TPS | proxy CPU (ms) | proxy peak RSS (MiB) | listen queue drops | pgbench exit |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s | %.1f | %s | %s |\n", $1, $2, $3, $4, $5, $6,
        $9 == "-" ? "-" : sprintf("%.0f", $9), $7, $8 / 1024, $11, $10 }' "$STORMS"
fi

# --- anything odd ------------------------------------------------------------

echo
echo "## Diagnostics"
echo
echo "- uptime before: $UPTIME_BEFORE"
echo "- uptime after:  $UPTIME_AFTER"
shopt -s nullglob
for f in "$WORK"/logs/run-*.log "$WORK"/logs/storm-*.log "$WORK"/logs/warmup-*.log; do
    lines=$(problem_lines "$f" | sort | uniq -c | sort -rn | head -n 5 || true)
    [[ -n $lines ]] && printf -- '- %s:\n```\n%s\n```\n' "$(basename "$f")" "$lines"
done
for f in "$WORK/logs/shardline.log" "$B/pgbouncer.log" "$WORK/pglog/postgres.log"; do
    [[ -f $f ]] || continue
    # Drop timestamps and peer addresses so repeated messages group together.
    lines=$(grep -Eiv 'listening|^\s*$|LOG:  (database system|checkpoint|starting|listening)' "$f" |
        grep -Ei 'warn|error|fatal|panic|fail' |
        sed -E 's/^[0-9TZ:. -]+(UTC|GMT)?//; s/127\.0\.0\.1:[0-9]+/127.0.0.1:PORT/g; s/pid=[0-9]+|\[[0-9]+\]/[pid]/g' |
        sort | uniq -c | sort -rn | head -n 10 || true)
    [[ -n $lines ]] && printf -- '- %s (warnings/errors, grouped):\n```\n%s\n```\n' "$(basename "$f")" "$lines"
done
echo "- full logs: $WORK$( [[ $KEEP == 1 ]] || echo ' (removed on exit; KEEP=1 keeps them)')"
