#!/usr/bin/env bash
# pgbench-replicas.sh: read throughput through Shardline with reads on the
# replica against reads pinned to the primary, in the same run, then the
# time from a primary's death to the first write that fails fast.
#
# Starts `shardline dev --shards 1 --replicas 1` in a temporary directory,
# loads pgbench's tables on the primary (they reach the replica by
# streaming replication), and runs the same point-select script through the
# proxy twice per round: as is (the proxy sends it to the replica) and with
# a `/* shardline: primary */` hint. The targets alternate every round so
# machine noise hits both alike. Then it kills the primary (SIGKILL) and
# times writes through the proxy until one fails with SQLSTATE 57P03.
# Everything started here is stopped by PID on exit.
#
# Usage: benches/pgbench-replicas.sh            (about 2 minutes plus the build)
# Environment: DURATION [10] s per run, ROUNDS [3], CLIENTS [16], SCALE [10],
#              SHARDLINE_BIN (skip the build), KEEP=1 keeps the directory.

set -euo pipefail

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-16}
SCALE=${SCALE:-10}
KEEP=${KEEP:-0}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

for v in DURATION ROUNDS CLIENTS SCALE; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive whole number"
done
command -v pgbench >/dev/null || die "pgbench not found"
command -v psql >/dev/null || die "psql not found"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pgbench-replicas.XXXXXX")
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
    if [[ $KEEP == 1 || $rc -ne 0 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -z ${SHARDLINE_BIN:-} ]]; then
    log "building shardline (cargo build --release)"
    (cd "$ROOT" && cargo build --release --bin shardline) >&2 || die "build failed"
    SHARDLINE_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/shardline
fi

PORT=$((20000 + RANDOM % 30000))
log "shardline dev --shards 1 --replicas 1 on port $PORT (in $WORK)"
# setsid: a session, so a scheduling group, apart from pgbench's (see
# pgbench-compare.sh).
setsid "$SHARDLINE_BIN" dev --dir "$WORK/dev" --port "$PORT" --shards 1 --replicas 1 \
    >"$WORK/dev.out" 2>"$WORK/dev.err" &
DEV_PID=$!
for _ in $(seq 600); do
    grep -q '^postgres://' "$WORK/dev.out" 2>/dev/null && break
    kill -0 "$DEV_PID" 2>/dev/null || { cat "$WORK/dev.err" >&2; die "shardline dev exited"; }
    sleep 0.1
done
URL=$(grep -m1 '^postgres://' "$WORK/dev.out") || die "shardline dev printed no URL"
PRIMARY_PORT=$(grep -m1 -oP 'shard 0 is PostgreSQL on 127.0.0.1:\K[0-9]+' "$WORK/dev.err")
PASSWORD=$(cat "$WORK/dev/password")
DIRECT="postgres://shardline:$PASSWORD@127.0.0.1:$PRIMARY_PORT/app"

log "pgbench -i -s $SCALE on the primary"
pgbench -i -q -s "$SCALE" "$DIRECT" >"$WORK/init.log" 2>&1 || { cat "$WORK/init.log" >&2; die "pgbench -i failed"; }
# The replica has the tables once a read through the proxy finds them there.
for _ in $(seq 300); do
    psql "$URL" -Atc "SELECT pg_is_in_recovery() FROM pgbench_branches LIMIT 1" 2>/dev/null | grep -q t && break
    sleep 0.1
done

cat >"$WORK/replica.sql" <<'EOF'
\set aid random(1, 100000 * :scale)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
EOF
cat >"$WORK/primary.sql" <<'EOF'
\set aid random(1, 100000 * :scale)
SELECT /* shardline: primary */ abalance FROM pgbench_accounts WHERE aid = :aid;
EOF

declare -A TPS
run() { # target round
    local out
    out=$(pgbench -n -M simple -c "$CLIENTS" -j 2 -T "$DURATION" -f "$WORK/$1.sql" "$URL" 2>&1) ||
        { echo "$out" >&2; die "pgbench failed for $1"; }
    TPS[$1,$2]=$(grep -oP 'tps = \K[0-9.]+' <<<"$out" | head -n 1)
    log "round $2 $1: ${TPS[$1,$2]} tps"
}
for ((r = 1; r <= ROUNDS; r++)); do
    if ((r % 2)); then run replica "$r"; run primary "$r"; else run primary "$r"; run replica "$r"; fi
done

median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
REPLICA=$(for ((r = 1; r <= ROUNDS; r++)); do echo "${TPS[replica,$r]}"; done | median)
PRIMARY=$(for ((r = 1; r <= ROUNDS; r++)); do echo "${TPS[primary,$r]}"; done | median)
echo
echo "| reads go to (pgbench -S, -c $CLIENTS, $DURATION s, median of $ROUNDS) | TPS |"
echo "|---|---|"
echo "| replica (default routing) | $REPLICA |"
echo "| primary (/* shardline: primary */) | $PRIMARY |"
echo "| ratio replica / primary | $(awk -v a="$REPLICA" -v b="$PRIMARY" 'BEGIN { printf "%.2f", a / b }') |"

# The primary dies: how long until a write through the proxy fails fast.
PG_PID=$(head -n 1 "$WORK/dev/pgdata/postmaster.pid")
log "killing the primary (postmaster pid $PG_PID)"
START=$(date +%s%N)
kill -KILL "$PG_PID"
while true; do
    if ! out=$(psql "$URL" -Atc "UPDATE pgbench_branches SET bbalance = bbalance WHERE bid = 1" 2>&1); then
        END=$(date +%s%N)
        break
    fi
    (( ($(date +%s%N) - START) > 30000000000 )) && die "writes still succeed 30 s after the primary died"
done
echo
echo "primary killed -> first failed write: $(( (END - START) / 1000000 )) ms"
echo "error: $(tr '\n' ' ' <<<"$out")"
