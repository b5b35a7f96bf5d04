#!/usr/bin/env bash
# pgbench-sharded.sh: point selects by key through a 2-shard Shardline,
# against the same script on one PostgreSQL directly.
#
# Starts `shardline dev --shards 2 --replicas 0` in a temporary directory
# (two local PostgreSQL shards without replicas, a metadata node, the proxy
# and the demo `accounts` table with 5000 rows spread over the shards),
# copies all 5000 rows into a plain table in a database `single` on shard
# 0's PostgreSQL, then runs the same pgbench custom script (a point SELECT by
# a random id) against Shardline and against `single`, alternating the two
# within each row. Prints a markdown table with TPS, average latency and the
# ratio Shardline / direct.
# Everything started here is stopped by PID on exit.
#
# Usage: benches/pgbench-sharded.sh         (about 2 minutes plus the build)
# Environment: DURATION [10] seconds per run, CLIENTS ["16 64"], MODES
# ["simple extended prepared"], ROUNDS [2], JOBS [2], SHARDLINE_BIN.

set -euo pipefail

DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-"16 64"}
MODES=${MODES:-"simple extended prepared"}
ROUNDS=${ROUNDS:-2}
JOBS=${JOBS:-2}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
command -v pgbench >/dev/null || die "pgbench not found"
command -v psql >/dev/null || die "psql not found"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pgbench-sharded.XXXXXX")
chmod 755 "$WORK"
DEV_PID=
cleanup() {
    local rc=$?
    set +e
    if [[ -n $DEV_PID ]] && kill -0 "$DEV_PID" 2>/dev/null; then
        kill -INT "$DEV_PID"
        for _ in $(seq 100); do kill -0 "$DEV_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$DEV_PID" 2>/dev/null
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -z ${SHARDLINE_BIN:-} ]]; then
    log "building shardline (cargo build --release)"
    (cd "$ROOT" && cargo build --release --bin shardline) >&2 || die "cargo build failed"
    SHARDLINE_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/shardline
fi

PORT=$((20000 + RANDOM % 40000))
log "starting shardline dev --shards 2 --replicas 0 on port $PORT"
# setsid: a session, so a scheduling group, apart from pgbench's (see
# pgbench-compare.sh).
setsid "$SHARDLINE_BIN" dev --dir "$WORK/dev" --shards 2 --replicas 0 --port "$PORT" --pool-size 20 \
    >"$WORK/dev.out" 2>"$WORK/dev.err" &
DEV_PID=$!
for _ in $(seq 600); do
    [[ -s $WORK/dev.out ]] && grep -q '^metadata:' "$WORK/dev.out" && break
    kill -0 "$DEV_PID" 2>/dev/null || die "shardline dev exited: $(tail -5 "$WORK/dev.err")"
    sleep 0.1
done
PROXY_URL=$(head -n 1 "$WORK/dev.out")
# "dev: shard 0 is", not "replica 0 of shard 0 is".
SHARD0_PORT=$(sed -n 's/.*dev: shard 0 is PostgreSQL on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$WORK/dev.err")
[[ -n $SHARD0_PORT ]] || die "could not find shard 0's port in $WORK/dev.err"
PASSWORD=$(cat "$WORK/dev/password")
DIRECT_URL="postgres://shardline:$PASSWORD@127.0.0.1:$SHARD0_PORT/single"

log "copying the demo rows into a plain table on one PostgreSQL"
psql -q "${PROXY_URL%/app}/app" -c "SELECT 1" >/dev/null
psql -q "postgres://shardline:$PASSWORD@127.0.0.1:$SHARD0_PORT/app" -c "CREATE DATABASE single"
psql -q "$DIRECT_URL" -c \
    "CREATE TABLE accounts (id int8 PRIMARY KEY, owner text NOT NULL, balance numeric NOT NULL DEFAULT 0)"
psql -qAt -F $'\t' "$PROXY_URL" -c "SELECT id, owner, balance FROM accounts" |
    psql -q "$DIRECT_URL" -c "COPY accounts FROM STDIN"
ROWS=$(psql -qAt "$DIRECT_URL" -c "SELECT count(*) FROM accounts")
psql -q "$DIRECT_URL" -c "VACUUM ANALYZE accounts"
log "direct table holds $ROWS rows"

SCRIPT=$WORK/point-select.sql
printf '\\set id random(1, %s)\nSELECT balance FROM accounts WHERE id = :id;\n' "$ROWS" >"$SCRIPT"

# Runs pgbench; prints "tps latency_ms".
run() {
    local url=$1 mode=$2 clients=$3 out
    out=$(pgbench -n -f "$SCRIPT" -M "$mode" -c "$clients" -j "$JOBS" -T "$DURATION" "$url" 2>&1) ||
        die "pgbench failed: $out"
    grep -q 'number of failed transactions: 0' <<<"$out" || die "failed transactions: $out"
    printf '%s %s\n' \
        "$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out")" \
        "$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' <<<"$out")"
}

echo "| mode | clients | direct TPS | shardline TPS | ratio | direct ms | shardline ms |"
echo "|---|---|---|---|---|---|---|"
for mode in $MODES; do
    for c in $CLIENTS; do
        d_tps=() s_tps=() d_lat=() s_lat=()
        for ((r = 0; r < ROUNDS; r++)); do
            # Alternate which target goes first, so drift hits both alike.
            if ((r % 2 == 0)); then
                read -r t l < <(run "$DIRECT_URL" "$mode" "$c"); d_tps+=("$t"); d_lat+=("$l")
                read -r t l < <(run "$PROXY_URL" "$mode" "$c"); s_tps+=("$t"); s_lat+=("$l")
            else
                read -r t l < <(run "$PROXY_URL" "$mode" "$c"); s_tps+=("$t"); s_lat+=("$l")
                read -r t l < <(run "$DIRECT_URL" "$mode" "$c"); d_tps+=("$t"); d_lat+=("$l")
            fi
        done
        median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
        dt=$(median "${d_tps[@]}") st=$(median "${s_tps[@]}")
        dl=$(median "${d_lat[@]}") sl=$(median "${s_lat[@]}")
        ratio=$(awk -v s="$st" -v d="$dt" 'BEGIN {printf "%.2f", s / d}')
        printf '| %s | %s | %.0f | %.0f | %s | %.3f | %.3f |\n' "$mode" "$c" "$dt" "$st" "$ratio" "$dl" "$sl"
    done
done
