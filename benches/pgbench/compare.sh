#!/usr/bin/env bash
# pgbench throughput and latency of direct PostgreSQL, PgBouncer and pgstash
# with its result cache off and on, side by side.
#
# Starts PgBouncer (transaction mode, plus a session-mode pool for the
# prepared-statement rows) and two pgstash instances (release build,
# transaction mode; one with the cache off, one with it on) on free ports in
# front of the same PostgreSQL, initialises a pgbench database there, runs
# each workload against each target in turn and prints TPS, latency for the
# single-client rows, the cache hit ratio of every cache-on run and the
# ratios between targets.
#
# Before every cache-on run of a read-only workload, a sweep reads every
# account once through the cache-on instance, in the protocol the workload
# uses, so that the run measures a warm cache. Workloads that write are not
# warmed: pgstash invalidates by table, so their first UPDATE of
# pgbench_accounts makes everything cached from that table unreachable.
#
#   usage: benches/pgbench/compare.sh
#   env:   SCALE=10 CLIENTS=8 JOBS=2 DURATION=20 (seconds per run)
#          POOL_SIZE=$CLIENTS  server connections per pooler
#          ROUNDS=1            repeat every run; the tables show the median
#          WORKLOADS="select_simple select_prepared single single_prepared tpcb mix90 mix50"
#                              the rows to run, in this order (any subset)
#          WARMUP=1            0 skips the sweep (cache-on then starts cold)
#          CACHE_BYTES         local tier size of the cache-on instance;
#                              default fits both protocols' sweeps
#          PGHOST_UPSTREAM=127.0.0.1 PGPORT_UPSTREAM=5432
#          PGBOUNCER=/usr/sbin/pgbouncer PGBOUNCER_USER=postgres (when root)
#          KEEP_DB=1           leave the pgbench database behind
#
# Workloads (pgbench -c $CLIENTS -j $JOBS -T $DURATION unless noted):
#   select_simple    -S -M simple
#   select_prepared  -S -M prepared          (PgBouncer in session mode)
#   single           -S -M simple   -c 1 -j 1, latency
#   single_prepared  -S -M prepared -c 1 -j 1, latency (PgBouncer session)
#   tpcb             the built-in TPC-B-like script, -M simple
#   mix90            90% point SELECT / 10% point UPDATE of pgbench_accounts
#   mix50            50% / 50% of the same
#
# A quick run: SCALE=1 DURATION=10 WORKLOADS="select_simple single" \
#   benches/pgbench/compare.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-8}
JOBS=${JOBS:-2}
DURATION=${DURATION:-20}
POOL_SIZE=${POOL_SIZE:-$CLIENTS}
ROUNDS=${ROUNDS:-1}
WORKLOADS=${WORKLOADS:-select_simple select_prepared single single_prepared tpcb mix90 mix50}
WARMUP=${WARMUP:-1}
ACCOUNTS=$((100000 * SCALE))
# A stored result weighs about 190 bytes (payload plus moka's per-entry
# charge of 128); 512 per account and protocol leaves room for both sweeps
# and for what the write mixes fill.
CACHE_BYTES=${CACHE_BYTES:-$((ACCOUNTS * 2 * 512 > 268435456 ? ACCOUNTS * 2 * 512 : 268435456))}
UP_HOST=${PGHOST_UPSTREAM:-127.0.0.1}
UP_PORT=${PGPORT_UPSTREAM:-5432}
bouncer_bin=${PGBOUNCER:-/usr/sbin/pgbouncer}
bouncer_user=${PGBOUNCER_USER:-postgres}
DB=pgstash_compare_$$

# The caller's PG* settings (a password, a service, PGOPTIONS, and any
# PGSTASH_* override) would apply to some targets differently than to
# others.
while read -r var; do unset "$var"; done < <(compgen -e | grep '^PG' || true)

for tool in pgbench psql "$bouncer_bin"; do
    command -v "$tool" >/dev/null || { echo "compare.sh: $tool not found (deploy/local-services.sh installs it)" >&2; exit 1; }
done

# name → label, pgbench arguments, and the protocol a warm-up sweep uses
# (empty: the workload writes, so it is not warmed). The mixes pass -s
# because custom scripts take :scale from it (the built-in ones count
# pgbench_branches instead).
declare -A w_label w_args w_warm
w_label[select_simple]="select-only simple"
w_args[select_simple]="-S -M simple"
w_warm[select_simple]=simple
w_label[select_prepared]="select-only prepared"
w_args[select_prepared]="-S -M prepared"
w_warm[select_prepared]=prepared
w_label[single]="1 client select simple"
w_args[single]="-S -M simple"
w_warm[single]=simple
w_label[single_prepared]="1 client select prep."
w_args[single_prepared]="-S -M prepared"
w_warm[single_prepared]=prepared
w_label[tpcb]="TPC-B simple"
w_args[tpcb]="-M simple"
w_warm[tpcb]=
w_label[mix90]="mix 90r/10w simple"
w_args[mix90]="-M simple -s $SCALE -f @work@/read.sql@90 -f @work@/write.sql@10"
w_warm[mix90]=
w_label[mix50]="mix 50r/50w simple"
w_args[mix50]="-M simple -s $SCALE -f @work@/read.sql@50 -f @work@/write.sql@50"
w_warm[mix50]=
read -r -a workloads <<<"$WORKLOADS"
for w in "${workloads[@]}"; do
    [[ -n ${w_label[$w]+set} ]] || { echo "compare.sh: unknown workload '$w' (known: ${!w_label[*]})" >&2; exit 1; }
done
[[ ${#workloads[@]} -gt 0 ]] || { echo "compare.sh: WORKLOADS is empty" >&2; exit 1; }

# Single-client rows measure latency: one client, one thread.
is_single() { [[ $1 == single* ]]; }

work=$(mktemp -d /tmp/pgstash-compare.XXXXXX)
logs=target/pgbench-compare
mkdir -p "$logs"
pids=()

cleanup() {
    local status=$?
    set +e
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null
    done
    if [ -z "${KEEP_DB:-}" ]; then
        psql -X -q -h "$UP_HOST" -p "$UP_PORT" -U postgres -d postgres \
            -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A port nothing listens on; bash's /dev/tcp fails to connect to it.
free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
}

wait_ready() {
    local port=$1 name=$2 dbname=$3
    for _ in $(seq 1 100); do
        if psql -X -q -At -h 127.0.0.1 -p "$port" -U postgres -d "$dbname" -c 'SELECT 1' >/dev/null 2>&1; then
            return
        fi
        sleep 0.1
    done
    echo "compare.sh: $name did not come up on port $port" >&2
    exit 1
}

echo "building pgstash (release)..."
cargo build --release --quiet

echo "creating and initialising $DB at scale $SCALE..."
psql -X -q -h "$UP_HOST" -p "$UP_PORT" -U postgres -d postgres -c "CREATE DATABASE $DB"
pgbench -q -i -s "$SCALE" -h "$UP_HOST" -p "$UP_PORT" -U postgres "$DB" >"$logs/init.log" 2>&1 \
    || { cat "$logs/init.log" >&2; exit 1; }

# The mixes' SELECT is the text of pgbench's built-in select-only script.
cat >"$work/read.sql" <<'EOF'
\set aid random(1, 100000 * :scale)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
EOF
cat >"$work/write.sql" <<'EOF'
\set aid random(1, 100000 * :scale)
UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;
EOF
# The warm-up sweep: client k reads aids k+1, k+1+clients, ... so that the
# clients together read every account exactly once (variables keep their
# values from one transaction of a client to the next; -D i=0 starts the
# count). The SELECT is, byte for byte, the one pgbench -S sends, so its
# cache key is the same in either protocol. No comment may go in this
# file: it would become part of the statement text.
cat >"$work/sweep.sql" <<'EOF'
\set i :i + 1
\set aid (:i - 1) * :clients + :client_id + 1
\if :aid <= :accounts
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
\endif
EOF

bouncer_port=$(free_port)
cat >"$work/userlist.txt" <<EOF
"postgres" ""
EOF
# $DB pools in transaction mode; ${DB}_session is the same database in
# session mode, because PgBouncer 1.18's transaction mode cannot serve
# protocol-level prepared statements.
cat >"$work/pgbouncer.ini" <<EOF
[databases]
$DB = host=$UP_HOST port=$UP_PORT dbname=$DB
${DB}_session = host=$UP_HOST port=$UP_PORT dbname=$DB pool_mode=session

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bouncer_port
unix_socket_dir =
auth_type = trust
auth_file = $work/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_client_conn = 1000
logfile = $work/pgbouncer.log
pidfile = $work/pgbouncer.pid
EOF
# PgBouncer refuses to run as root; it drops to PGBOUNCER_USER itself and
# then needs to read its files and write its log.
if [ "$(id -u)" = 0 ]; then
    chown -R "$bouncer_user" "$work"
    chmod 755 "$work"
    "$bouncer_bin" -u "$bouncer_user" "$work/pgbouncer.ini" >"$logs/pgbouncer.out" 2>&1 &
else
    "$bouncer_bin" "$work/pgbouncer.ini" >"$logs/pgbouncer.out" 2>&1 &
fi
pids+=($!)
wait_ready "$bouncer_port" PgBouncer "$DB"
wait_ready "$bouncer_port" "PgBouncer (session pool)" "${DB}_session"

# Two pgstash processes rather than one restarted: each keeps its own
# pool, and the cache-on one keeps its cache from one workload to the next.
off_port=$(free_port)
on_port=$(free_port)
metrics_port=$(free_port)
cat >"$work/pgstash-off.toml" <<EOF
log_level = "warn"

[pool]
mode = "transaction"
size = $POOL_SIZE

[cache]
enabled = false
EOF
# The default TTL (60 s) is shorter than a sweep at scale 10 plus a run:
# the first entries would expire before the run starts. An hour outlasts
# any run; writes through pgstash still invalidate at once.
cat >"$work/pgstash-on.toml" <<EOF
log_level = "warn"
metrics_listen = "127.0.0.1:$metrics_port"

[pool]
mode = "transaction"
size = $POOL_SIZE

[cache]
enabled = true
default_ttl = "1h"
capacity_bytes = $CACHE_BYTES
EOF
for variant in off on; do
    port_var=${variant}_port
    ./target/release/pgstash --config "$work/pgstash-$variant.toml" --listen "127.0.0.1:${!port_var}" \
        --upstream "postgres://postgres@$UP_HOST:$UP_PORT" >"$logs/pgstash-$variant.log" 2>&1 &
    pids+=($!)
    wait_ready "${!port_var}" "pgstash (cache $variant)" "$DB"
done

# The cache-on instance's lookup counters: "hits misses bypasses", or
# nothing if the endpoint cannot be read (the ratio then shows n/a rather
# than the run stopping). The endpoint answers one request per connection
# and then closes it.
lookups() {
    {
        (
            exec 3<>"/dev/tcp/127.0.0.1/$metrics_port"
            printf 'GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
            cat <&3
        ) 2>/dev/null || true
    } | awk '
        /^pgstash_cache_lookups_total\{outcome="hit"\}/ { h = $2; seen = 1 }
        /^pgstash_cache_lookups_total\{outcome="miss"\}/ { m = $2; seen = 1 }
        /^pgstash_cache_lookups_total\{outcome="bypass"\}/ { b = $2; seen = 1 }
        END { if (seen) printf "%.0f %.0f %.0f\n", h, m, b }'
}

# Percentage of lookups between two `lookups` readings that were hits.
hit_ratio() {
    local before after
    read -r -a before <<<"$1"
    read -r -a after <<<"$2"
    if [[ ${#before[@]} -ne 3 || ${#after[@]} -ne 3 ]]; then
        echo n/a
        return
    fi
    awk -v h=$((after[0] - before[0])) -v m=$((after[1] - before[1])) -v b=$((after[2] - before[2])) \
        'BEGIN { t = h + m + b; if (t == 0) print "n/a"; else printf "%.1f\n", 100 * h / t }'
}

# Reads every account once through the cache-on instance in `protocol`.
warm_up() {
    local protocol=$1 log=$2 per_client before after start
    per_client=$(((ACCOUNTS + CLIENTS - 1) / CLIENTS))
    before=$(lookups)
    start=$(date +%s.%N)
    pgbench -n -h 127.0.0.1 -p "$on_port" -U postgres -c "$CLIENTS" -j "$JOBS" -t "$per_client" \
        -D i=0 -D clients="$CLIENTS" -D accounts="$ACCOUNTS" -M "$protocol" -f "$work/sweep.sql" \
        "$DB" >"$log" 2>&1 || { echo "compare.sh: warm-up failed, see $log" >&2; exit 1; }
    after=$(lookups)
    printf '  warm-up %-8s %d accounts in %.1fs, %s%% already cached\n' "$protocol" "$ACCOUNTS" \
        "$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { print e - s }')" "$(hit_ratio "$before" "$after")"
}

declare -A tps lat hits

# Prints "TPS LATENCY_MS", or FAIL if pgbench failed or reported failed
# transactions.
run_pgbench() {
    local log=$1
    shift
    # Each run starts from the same flushed state, not in the middle of
    # the previous run's checkpoint.
    psql -X -q -h "$UP_HOST" -p "$UP_PORT" -U postgres -d "$DB" -c CHECKPOINT >/dev/null
    if pgbench "$@" >"$log" 2>&1 && grep -q '^number of failed transactions: 0 ' "$log" \
        && ! grep -q 'aborted' "$log"; then
        awk '/^tps = / { t = $3 } /^latency average = / { l = $4 } END { print t, l }' "$log"
    else
        echo FAIL
    fi
}

targets=(direct pgbouncer off on)
echo "pgbench: -c $CLIENTS -j $JOBS -T $DURATION (single: -c 1 -j 1), pool size $POOL_SIZE, $ROUNDS round(s)"
echo "workloads: ${workloads[*]}"
for round in $(seq 1 "$ROUNDS"); do
    for w in "${workloads[@]}"; do
        args=${w_args[$w]//@work@/$work}
        clients=$CLIENTS jobs=$JOBS
        is_single "$w" && clients=1 jobs=1
        for target in "${targets[@]}"; do
            host=127.0.0.1
            dbname=$DB
            case $target in
                direct) host=$UP_HOST port=$UP_PORT ;;
                pgbouncer)
                    port=$bouncer_port
                    [[ $args == *prepared* ]] && dbname=${DB}_session
                    ;;
                off) port=$off_port ;;
                on) port=$on_port ;;
            esac
            log="$logs/$w-$target-$round.log"
            if [[ $target == on && $WARMUP != 0 && -n ${w_warm[$w]} ]]; then
                warm_up "${w_warm[$w]}" "$logs/$w-warmup-$round.log"
            fi
            [[ $target == on ]] && before=$(lookups)
            # shellcheck disable=SC2086 # args holds several words
            result=$(run_pgbench "$log" -h "$host" -p "$port" -U postgres -c "$clients" -j "$jobs" \
                -T "$DURATION" $args "$dbname")
            read -r t l <<<"$result"
            extra=""
            if [[ $target == on ]]; then
                h=$(hit_ratio "$before" "$(lookups)")
                hits["$w"]+="$h "
                extra=", hit $h%"
            fi
            is_single "$w" && [[ $t != FAIL ]] && extra=", latency $l ms$extra"
            printf '  round %d  %-22s %-10s %s tps%s\n' "$round" "${w_label[$w]}" "$target" "$t" "$extra"
            tps["$w,$target"]+="$t "
            lat["$w,$target"]+="${l:-FAIL} "
        done
    done
done

# The middle value of the rounds; FAIL if any round failed.
median() {
    local values=$1 digits=${2:-0}
    if [[ $values == *FAIL* ]]; then
        echo FAIL
        return
    fi
    if [[ $values == *n/a* ]]; then
        echo n/a
        return
    fi
    tr ' ' '\n' <<<"$values" | grep . | sort -g | awk -v d="$digits" \
        '{ v[NR] = $1 } END { printf "%.*f", d, (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

ratio() {
    if [[ $1 == FAIL || $2 == FAIL ]]; then
        echo "n/a"
    else
        awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'
    fi
}

# One table row: label, then direct, pgbouncer, off, on, hit ratio.
row() {
    local name=$1 d=$2 b=$3 f=$4 o=$5 h=$6
    printf '%-25s %9s %9s %9s %9s %6s %9s %7s %7s %10s %8s\n' "$name" "$d" "$b" "$f" "$o" "$h" \
        "$(ratio "$o" "$d")" "$(ratio "$o" "$f")" "$(ratio "$o" "$b")" "$(ratio "$f" "$d")" "$(ratio "$f" "$b")"
}
header() {
    printf '%-25s %9s %9s %9s %9s %6s %9s %7s %7s %10s %8s\n' "$1" direct pgbouncer cache-off cache-on hit% \
        on/direct on/off on/pgb off/direct off/pgb
}
label() {
    local name=${w_label[$1]}
    [[ ${w_args[$1]} == *prepared* ]] && name="$name *"
    echo "$name"
}

echo
echo "PostgreSQL $(psql -X -At -h "$UP_HOST" -p "$UP_PORT" -U postgres -d "$DB" -c 'SHOW server_version'), $("$bouncer_bin" --version | head -1), pgstash $(./target/release/pgstash --version | awk '{ print $2 }')"
echo "scale $SCALE ($ACCOUNTS accounts), $CLIENTS clients, $JOBS threads, ${DURATION}s per run, pool size $POOL_SIZE, median of $ROUNDS round(s)"
echo "cache-on: warm-up sweep $([[ $WARMUP != 0 ]] && echo on || echo off), default_ttl 1h, capacity $CACHE_BYTES bytes"
echo
header "TPS"
for w in "${workloads[@]}"; do
    row "$(label "$w")" "$(median "${tps["$w,direct"]}")" "$(median "${tps["$w,pgbouncer"]}")" \
        "$(median "${tps["$w,off"]}")" "$(median "${tps["$w,on"]}")" "$(median "${hits[$w]}" 1)"
done
singles=()
for w in "${workloads[@]}"; do is_single "$w" && singles+=("$w"); done
if [[ ${#singles[@]} -gt 0 ]]; then
    echo
    header "latency average (ms)"
    for w in "${singles[@]}"; do
        row "$(label "$w")" "$(median "${lat["$w,direct"]}" 3)" "$(median "${lat["$w,pgbouncer"]}" 3)" \
            "$(median "${lat["$w,off"]}" 3)" "$(median "${lat["$w,on"]}" 3)" "$(median "${hits[$w]}" 1)"
    done
    echo "  (latency ratios below 1 mean the first target answers faster)"
fi
echo
echo "hit% is hits / lookups of the cache-on run itself, from its /metrics."
echo "* PgBouncer runs this row in session mode: 1.18's transaction mode cannot serve -M prepared."
echo "  pgstash stays in transaction mode for every row."
echo "pgbench logs: $logs/"
