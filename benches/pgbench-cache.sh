#!/usr/bin/env bash
# pgbench-cache.sh: Zipfian point reads through Shardline with its point-read
# result cache on, the same through Shardline with the cache off, and the same
# directly against PostgreSQL, all in one run.
#
# Starts `shardline dev --shards 1 --replicas 0` in a temporary directory (one
# PostgreSQL holding every row, a metadata node and the proxy), tops the demo
# table `accounts` up to ROWS rows directly on that PostgreSQL, and runs one
# pgbench custom script, a point SELECT by `random_zipfian(1, ROWS, SKEW)`,
# against three targets: direct PostgreSQL, Shardline after `CACHE DISABLE
# accounts` + `CACHE FLUSH`, and Shardline after those and `CACHE ENABLE
# accounts` (once the cache has served its first hit), so every cache-on run
# starts from an empty cache. The target order rotates by one each
# round so machine drift hits all alike; every run is preceded by WARMUP
# seconds of the same load. Latency percentiles come from pgbench's
# per-transaction logs (-l); the cache hit ratio from `SHOW CACHE` on the
# admin console before and after every cache-on run. Prints markdown tables
# and whether the cache's goals hold: cache-on TPS >= 1.5x direct, and
# cache-on p99 below direct's. Everything started here is stopped by PID on
# exit, also on failure or Ctrl-C.
#
# Usage: benches/pgbench-cache.sh                    (about 2.5 minutes plus the build)
#        DURATION=3 ROUNDS=1 benches/pgbench-cache.sh   (quick check of the script)
#
# Environment (defaults in brackets):
#   DURATION       seconds per measured pgbench run [10]
#   ROUNDS         repetitions; the summary takes medians across them [3]
#   CLIENTS        pgbench -c [16]
#   JOBS           pgbench -j [2]
#   ROWS           rows in `accounts`, ids 1..ROWS [100000]
#   SKEW           random_zipfian parameter; PostgreSQL 12+ wants it in
#                  [1.001, 1000], larger is more skewed [1.1]
#   WARMUP         seconds of the same load before every measured run [3]
#   POOL           shardline dev --pool-size [20]
#   CACHE_WAIT     seconds the cache may take after CACHE ENABLE to serve
#                  its first hit (its WAL change feed must connect) [30]
#   SHARDLINE_BIN  use this binary instead of `cargo build --release`
#   KEEP           1 keeps the temporary directory (logs, pgbench logs) [0]
#
# Needs: pgbench, psql (PostgreSQL 12 or later), Linux. When run as root,
# `shardline dev` runs PostgreSQL as the `postgres` OS user.

set -euo pipefail

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-16}
JOBS=${JOBS:-2}
ROWS=${ROWS:-100000}
SKEW=${SKEW:-1.1}
WARMUP=${WARMUP:-3}
POOL=${POOL:-20}
CACHE_WAIT=${CACHE_WAIT:-30}
KEEP=${KEEP:-0}

TABLE=accounts
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

for v in DURATION ROUNDS CLIENTS JOBS ROWS POOL CACHE_WAIT; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive whole number, not '${!v}'"
done
[[ $WARMUP =~ ^[0-9]+$ ]] || die "WARMUP must be a whole number, not '$WARMUP'"
[[ $SKEW =~ ^[0-9]+(\.[0-9]+)?$ ]] && awk -v s="$SKEW" 'BEGIN { exit !(s >= 1.001 && s <= 1000) }' ||
    die "SKEW must be a number in [1.001, 1000] (pgbench's random_zipfian), not '$SKEW'"
((JOBS <= CLIENTS)) || die "JOBS ($JOBS) must not exceed CLIENTS ($CLIENTS)"

command -v pgbench >/dev/null || die "pgbench not found"
command -v psql >/dev/null || die "psql not found"

# --- cleanup -----------------------------------------------------------------

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pgbench-cache.XXXXXX")
chmod 755 "$WORK"
mkdir -p "$WORK/logs"
DEV_PID=
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
    local rc=$? pg_pid
    set +e
    trap - EXIT INT TERM
    stop_pid "$PGBENCH_PID" TERM 5 pgbench
    # cargo and its rustc children share the process group setsid gave them.
    [[ -n $BUILD_PID ]] && kill -TERM -- "-$BUILD_PID" 2>/dev/null
    # SIGINT: shardline dev stops the proxy, then its PostgreSQL.
    stop_pid "$DEV_PID" INT 30 "shardline dev"
    [[ -n $DEV_PID ]] && wait "$DEV_PID" 2>/dev/null
    # Had shardline dev to be killed, its PostgreSQL is still up: fast shutdown.
    if [[ -f $WORK/dev/pgdata/postmaster.pid ]]; then
        pg_pid=$(head -n 1 "$WORK/dev/pgdata/postmaster.pid" 2>/dev/null)
        [[ $pg_pid =~ ^[0-9]+$ ]] && stop_pid "$pg_pid" INT 30 postgres
    fi
    if [[ $KEEP == 1 || $rc -ne 0 ]]; then
        log "logs kept in $WORK"
        cp "$WORK/dev/pgdata/postgres.log" "$WORK/logs/" 2>/dev/null
        rm -rf "$WORK/dev/pgdata" 2>/dev/null
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

# --- helpers -----------------------------------------------------------------

# A TCP port on 127.0.0.1 that nothing listens on.
free_port() {
    local p i
    for ((i = 0; i < 200; i++)); do
        p=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null &&
            ! ss -Htan "sport = :$p" 2>/dev/null | grep -q .; then
            echo "$p"
            return 0
        fi
    done
    die "no free port found"
}

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

export PGCONNECT_TIMEOUT=30

# --- shardline dev -----------------------------------------------------------

PORT=$(free_port)
log "shardline dev --shards 1 --replicas 0 on 127.0.0.1:$PORT (in $WORK/dev)"
# setsid: a session, so a scheduling group, apart from pgbench's (see
# pgbench-compare.sh).
RUST_LOG=${RUST_LOG:-info} setsid "$SHARDLINE_BIN" dev --dir "$WORK/dev" --port "$PORT" \
    --shards 1 --replicas 0 --pool-size "$POOL" >"$WORK/dev.out" 2>"$WORK/dev.err" &
DEV_PID=$!
for ((i = 0; i < 1200; i++)); do
    grep -q '^metadata:' "$WORK/dev.out" 2>/dev/null && break
    kill -0 "$DEV_PID" 2>/dev/null || { tail -n 20 "$WORK/dev.err" >&2; die "shardline dev exited during startup"; }
    sleep 0.1
done
PROXY_URL=$(grep -m1 '^postgres://' "$WORK/dev.out") || die "shardline dev printed no URL within 120s"
PG_PORT=$(sed -n 's/.*shard 0 is PostgreSQL on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$WORK/dev.err" | head -n 1)
[[ -n $PG_PORT ]] || die "could not find shard 0's port in $WORK/dev.err"
PASSWORD=$(<"$WORK/dev/password")
DIRECT_URL="postgres://shardline:$PASSWORD@127.0.0.1:$PG_PORT/app"
ADMIN_URL="postgres://shardline:$PASSWORD@127.0.0.1:$PORT/shardline"

# `accounts` on the shard is hash-partitioned by id under its own name, so the
# same statements work directly and through the proxy.
log "loading $TABLE to ids 1..$ROWS directly on PostgreSQL (127.0.0.1:$PG_PORT)"
psql -X -q -v ON_ERROR_STOP=1 "$DIRECT_URL" >"$WORK/logs/load.log" 2>&1 <<EOF ||
INSERT INTO $TABLE (id, owner, balance)
SELECT id, (ARRAY['alice','bob','carol','dave','erin','frank','grace','heidi'])[1 + id % 8],
       (id * 7919 % 100000) * 0.01
FROM generate_series(1, $ROWS) AS id
ON CONFLICT (id) DO NOTHING;
DELETE FROM $TABLE WHERE id > $ROWS;
VACUUM ANALYZE $TABLE;
EOF
    { cat "$WORK/logs/load.log" >&2; die "loading $TABLE failed"; }
for t in direct proxy; do
    [[ $t == direct ]] && url=$DIRECT_URL || url=$PROXY_URL
    out=$(psql -X -qAt "$url" -c "SELECT count(*) FROM $TABLE" 2>&1) || die "$t: cannot query $TABLE: $out"
    [[ $out == "$ROWS" ]] || die "$t: expected $ROWS rows in $TABLE, got '$out'"
done

# --- admin console -----------------------------------------------------------

# admin SQL: runs one command on the proxy's admin console; its output
# (unaligned, tab-separated, with the header) on stdout.
admin() {
    psql -X -q -A -F $'\t' -P footer=off -v ON_ERROR_STOP=1 "$ADMIN_URL" -c "$1" 2>&1
}

# The cache commands may not exist in this build yet: say so plainly.
require_admin() {
    local out
    out=$(admin "$1") ||
        die "the admin console did not accept '$1': $(tr '\n' ' ' <<<"$out")-- this Shardline build does not (yet) answer the cache commands (CACHE ENABLE/DISABLE <table>, CACHE FLUSH, SHOW CACHE)"
    printf '%s\n' "$out"
}

# cache_stats: "hits misses entries bytes hit_ratio" from SHOW CACHE. Call it
# as `x=$(cache_stats)`: a failure then ends the script (set -e).
cache_stats() {
    local out
    out=$(require_admin "SHOW CACHE") || exit 1
    awk -F'\t' '
        NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
        NR == 2 {
            for (n = split("hits misses entries bytes hit_ratio", want, " "); n > 0; n--)
                if (!(want[n] in col)) { print "SHOW CACHE has no column " want[n] > "/dev/stderr"; exit 1 }
            print $col["hits"], $col["misses"], $col["entries"], $col["bytes"], $col["hit_ratio"]; found = 1
        }
        END { if (!found) exit 1 }' <<<"$out" ||
        die "SHOW CACHE did not return one row with hits, misses, entries, bytes and hit_ratio: $(tr '\n' ' ' <<<"$out")"
}

# One point read through the proxy, outside a transaction, simple protocol.
point_read() { psql -X -qAt "$PROXY_URL" -c "SELECT id, owner, balance FROM $TABLE WHERE id = $1" >/dev/null; }

CACHE_STATE=unknown
FLUSH_LEFT= # entries SHOW CACHE still counted right after each CACHE FLUSH
cache_off() {
    local s entries
    [[ $CACHE_STATE == off ]] && return 0
    require_admin "CACHE DISABLE $TABLE" >/dev/null
    require_admin "CACHE FLUSH" >/dev/null
    s=$(cache_stats)
    read -r _ _ entries _ <<<"$s"
    FLUSH_LEFT+="${FLUSH_LEFT:+, }$entries"
    CACHE_STATE=off
}

# Enables the cache and waits until it serves a hit: its change feed has to
# connect first, and until then reads bypass it.
cache_on() {
    local i s hits0 hits
    [[ $CACHE_STATE == on ]] && return 0
    require_admin "CACHE ENABLE $TABLE" >/dev/null
    s=$(cache_stats)
    read -r hits0 _ <<<"$s"
    for ((i = 0; i < CACHE_WAIT * 10; i++)); do
        point_read 1 && point_read 1 || die "a point read through the proxy failed after CACHE ENABLE"
        s=$(cache_stats)
        read -r hits _ <<<"$s"
        if ((hits > hits0)); then
            CACHE_STATE=on
            return 0
        fi
        sleep 0.1
    done
    die "the cache served no hit within ${CACHE_WAIT}s of CACHE ENABLE $TABLE (SHOW CACHE hits misses entries bytes hit_ratio: $s); see $WORK/dev.err"
}

log "checking the admin console's cache commands"
cache_off
s=$(cache_stats)
log "SHOW CACHE answers (hits misses entries bytes hit_ratio: $s)"
cache_on
# The cache must answer what PostgreSQL answers: the hottest ids, twice each
# (the second read is served from the cache).
for id in 1 2 3 4 5 6 7 8 9 10 "$ROWS"; do
    q="SELECT id, owner, balance FROM $TABLE WHERE id = $id"
    want=$(psql -X -qAt "$DIRECT_URL" -c "$q")
    for _ in 1 2; do
        got=$(psql -X -qAt "$PROXY_URL" -c "$q")
        [[ $got == "$want" ]] || die "id $id: the proxy with the cache on answered '$got', PostgreSQL '$want'"
    done
done

# --- runs --------------------------------------------------------------------

cat >"$WORK/zipf.sql" <<EOF
\\set id random_zipfian(1, $ROWS, $SKEW)
SELECT id, owner, balance FROM $TABLE WHERE id = :id;
EOF

TARGETS=(direct cache-off cache-on)
declare -A URL=([direct]=$DIRECT_URL [cache-off]=$PROXY_URL [cache-on]=$PROXY_URL)
RESULTS=$WORK/results.tsv # round target tps p50_ms p99_ms txns failed hits misses problems avg_ms
: >"$RESULTS"

# run_pgbench TARGET OUTFILE ARGS...: the Zipfian script against a target. In
# the background plus `wait`, so a signal stops the script at once.
run_pgbench() {
    local t=$1 outfile=$2 rc=0
    shift 2
    pgbench -n -M simple -c "$CLIENTS" -j "$JOBS" -f "$WORK/zipf.sql" "$@" "${URL[$t]}" >"$outfile" 2>&1 &
    PGBENCH_PID=$!
    wait "$PGBENCH_PID" || rc=$?
    PGBENCH_PID=
    return "$rc"
}

# Lines in a pgbench output that report trouble.
problem_lines() {
    grep -Ei 'error|fatal|abort|fail|could not|timeout' "$1" |
        grep -Ev '^number of failed transactions: 0 ' || true
}

# latencies DIR: "p50_ms p99_ms" over the per-transaction logs in DIR (third
# column: latency in µs; failed transactions say "failed" there instead).
latencies() {
    cat "$1"/pgbench_log.* 2>/dev/null | awk '$3 ~ /^[0-9]+$/ { print $3 }' | sort -n |
        awk 'function at(p,    i) { i = int(p * NR); if (i < p * NR) i++; return i < 1 ? a[1] : a[i] }
             { a[NR] = $1 }
             END { if (NR == 0) print "0 0"; else printf "%.3f %.3f\n", at(0.50) / 1000, at(0.99) / 1000 }'
}

LOAD_BEFORE=$(loadavg)
UPTIME_BEFORE=$(uptime)
log "3 targets x $ROUNDS round(s) x (${WARMUP}s warm-up + ${DURATION}s); $ROWS rows, zipfian skew $SKEW, -c $CLIENTS -j $JOBS; load average $LOAD_BEFORE"
for ((r = 0; r < ROUNDS; r++)); do
    order=("${TARGETS[@]:r % 3}" "${TARGETS[@]:0:r % 3}")
    for t in "${order[@]}"; do
        # Every cache-on run starts from an empty cache (as the first did),
        # not from what an earlier round left in it.
        case $t in
            cache-on) cache_off && cache_on ;;
            cache-off) cache_off ;;
        esac
        if ((WARMUP > 0)); then
            run_pgbench "$t" "$WORK/logs/warmup-r$r-$t.log" -T "$WARMUP" ||
                log "warning: warm-up against $t failed (see $WORK/logs/warmup-r$r-$t.log)"
        fi
        before=(- -)
        if [[ $t != direct ]]; then
            s=$(cache_stats)
            read -r -a before <<<"$s"
        fi
        dir=$WORK/logs/txlog-r$r-$t
        mkdir -p "$dir"
        f=$WORK/logs/run-r$r-$t.log
        load=$(loadavg)
        rc=0
        run_pgbench "$t" "$f" -T "$DURATION" -l --log-prefix="$dir/pgbench_log" || rc=$?
        kill -0 "$DEV_PID" 2>/dev/null || die "shardline dev (pid $DEV_PID) died during $f"
        hits=- misses=-
        if [[ $t != direct ]]; then
            s=$(cache_stats)
            read -r -a after <<<"$s"
            hits=$((after[0] - before[0])) misses=$((after[1] - before[1]))
        fi
        txns=$(awk -F': ' '/^number of transactions actually processed/ { split($2, a, "/"); print a[1] }' "$f")
        failed=$(awk -F': ' '/^number of failed transactions/ { split($2, a, " "); print a[1] }' "$f")
        tps=$(awk '/^tps = / { print $3 }' "$f" | tail -n 1)
        avg=$(awk '/^latency average = / { print $4 }' "$f")
        problems=$(problem_lines "$f" | grep -c . || true)
        ((rc == 0)) || problems=$((problems + 1))
        if [[ -z $txns || -z $tps || $txns == 0 ]]; then
            log "warning: $t: no result (pgbench exit $rc); tail of $f:"
            tail -n 5 "$f" >&2
            txns=0 tps=0 p50=0 p99=0 avg=0
        else
            read -r p50 p99 < <(latencies "$dir")
        fi
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$t" "$tps" "$p50" "$p99" \
            "$txns" "${failed:-0}" "$hits" "$misses" "$problems" "${avg:-0}" >>"$RESULTS"
        log "round $((r + 1))/$ROUNDS $t: tps $tps, p50 ${p50}ms, p99 ${p99}ms, avg ${avg}ms$([[ $hits == - ]] || echo ", cache hits $hits misses $misses"), load before $load$( ((problems == 0)) || echo ", problem lines $problems")"
        # Per-transaction logs are big; keep them only when asked to.
        [[ $KEEP == 1 ]] || rm -rf "$dir"
    done
done

LOAD_AFTER=$(loadavg)
UPTIME_AFTER=$(uptime)
s=$(cache_stats)
read -r -a FINAL <<<"$s"

# --- report ------------------------------------------------------------------

echo
echo "## Point-read cache: Zipfian point reads, direct PostgreSQL vs Shardline cache off vs cache on"
echo
echo "$(nproc) CPUs; PostgreSQL $(psql -X -qAt "$DIRECT_URL" -c 'SHOW server_version' | awk '{ print $1 }'), shardline $("$SHARDLINE_BIN" --version 2>/dev/null | awk '{ print $NF }'), one shard, no replicas, pool $POOL."
echo "\`SELECT id, owner, balance FROM $TABLE WHERE id = :id\` with \`random_zipfian(1, $ROWS, $SKEW)\`, \`pgbench -n -M simple -c $CLIENTS -j $JOBS -T $DURATION\`, ${WARMUP}s warm-up before every run, $ROUNDS round(s)$( ((ROUNDS > 1)) && echo ', target order rotating; medians across rounds')."
echo "Latency percentiles from pgbench's per-transaction logs, avg is pgbench's own. Load average (1/5/15 min) before: $LOAD_BEFORE, after: $LOAD_AFTER."
echo
awk -F'\t' '
function median(s,    a, n, i, j, x) {
    n = split(s, a, " ")
    for (i = 2; i <= n; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > x + 0; j--) a[j + 1] = a[j]; a[j + 1] = x }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
{
    tps[$2] = tps[$2] " " $3; p50[$2] = p50[$2] " " $4; p99[$2] = p99[$2] " " $5; avg[$2] = avg[$2] " " $11
    fail[$2] += $7; prob[$2] += $10
    if ($8 != "-") { hits[$2] += $8; misses[$2] += $9 }
}
END {
    name["direct"] = "direct PostgreSQL"; name["cache-off"] = "Shardline, cache off"; name["cache-on"] = "Shardline, cache on"
    print "| target | TPS | p50 (ms) | p99 (ms) | avg (ms) | TPS vs direct | cache hit ratio over the runs (hits / lookups) |"
    print "|---|---:|---:|---:|---:|---:|---|"
    d = median(tps["direct"])
    n = split("direct cache-off cache-on", ts, " ")
    for (j = 1; j <= n; j++) {
        t = ts[j]
        if (!(t in tps)) continue
        T[t] = median(tps[t]); P50[t] = median(p50[t]); P99[t] = median(p99[t])
        if (t in hits) {
            look = hits[t] + misses[t]
            hr = look > 0 ? sprintf("%.1f%% (%d / %d)", 100 * hits[t] / look, hits[t], look) : "no lookups (0 / 0)"
        } else hr = "-"
        flag = (prob[t] > 0 || fail[t] > 0) ? sprintf(" (%d failed, %d problem lines)", fail[t], prob[t]) : ""
        printf "| %s | %.0f%s | %.3f | %.3f | %.3f | %s | %s |\n", name[t], T[t], flag, P50[t], P99[t], median(avg[t]),
            (d > 0 ? sprintf("%.2f", T[t] / d) : "-"), hr
    }
    ratio = T["direct"] > 0 ? T["cache-on"] / T["direct"] : 0
    g1 = ratio >= 1.5
    g2 = P99["cache-on"] > 0 && P99["cache-on"] < P99["direct"]
    print ""
    print "### Goals"
    print ""
    printf "- cache-on TPS >= 1.5x direct PostgreSQL: %.2fx (%.0f vs %.0f): %s\n", ratio, T["cache-on"], T["direct"], g1 ? "HOLDS" : "MISSED"
    printf "- cache-on p99 below direct PostgreSQL: %.3f ms vs %.3f ms: %s\n", P99["cache-on"], P99["direct"], g2 ? "HOLDS" : "MISSED"
    if ("cache-off" in hits && hits["cache-off"] > 0)
        printf "- warning: the cache served %d hits while disabled\n", hits["cache-off"]
    if ("cache-on" in hits && hits["cache-on"] == 0)
        print "- warning: the cache served no hit during the cache-on runs"
}' "$RESULTS"

echo
echo "### Every run"
echo
echo "| round | target | TPS | p50 (ms) | p99 (ms) | avg (ms) | transactions | failed | cache hits | cache misses | hit ratio | problem lines |"
echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
awk -F'\t' '{
    hr = ($8 == "-") ? "-" : ($8 + $9 > 0 ? sprintf("%.1f%%", 100 * $8 / ($8 + $9)) : "-")
    printf "| %d | %s | %.0f | %.3f | %.3f | %.3f | %s | %s | %s | %s | %s | %s |\n", $1 + 1, $2, $3, $4, $5, $11, $6, $7, $8, $9, hr, $10
}' "$RESULTS"

# --- anything odd ------------------------------------------------------------

echo
echo "## Diagnostics"
echo
echo "- SHOW CACHE at the end: hits ${FINAL[0]}, misses ${FINAL[1]}, entries ${FINAL[2]}, bytes ${FINAL[3]}, hit_ratio ${FINAL[4]} (cache $CACHE_STATE)"
echo "- entries SHOW CACHE counted right after each CACHE FLUSH (should be 0): $FLUSH_LEFT"
echo "- uptime before: $UPTIME_BEFORE"
echo "- uptime after:  $UPTIME_AFTER"
shopt -s nullglob
for f in "$WORK"/logs/run-*.log "$WORK"/logs/warmup-*.log; do
    lines=$(problem_lines "$f" | sort | uniq -c | sort -rn | head -n 5 || true)
    [[ -n $lines ]] && printf -- '- %s:\n```\n%s\n```\n' "$(basename "$f")" "$lines"
done
for f in "$WORK/dev.err" "$WORK/dev/pgdata/postgres.log"; do
    [[ -f $f ]] || continue
    # Drop timestamps and peer addresses so repeated messages group together.
    lines=$(grep -Ei 'warn|error|fatal|panic|fail' "$f" |
        sed -E 's/\x1b\[[0-9;]*m//g; s/^[0-9TZ:. -]+(UTC|GMT)?//; s/127\.0\.0\.1:[0-9]+/127.0.0.1:PORT/g; s/pid=[0-9]+|\[[0-9]+\]/[pid]/g' |
        sort | uniq -c | sort -rn | head -n 10 || true)
    [[ -n $lines ]] && printf -- '- %s (warnings/errors, grouped):\n```\n%s\n```\n' "$(basename "$f")" "$lines"
done
echo "- full logs: $WORK$( [[ $KEEP == 1 ]] || echo ' (removed on exit; KEEP=1 keeps them)')"
