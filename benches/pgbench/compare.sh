#!/usr/bin/env bash
# pgbench throughput of direct PostgreSQL, PgBouncer and pgstash, side by side.
#
# Starts PgBouncer (transaction mode, plus a session-mode pool for the
# prepared-statement row) and pgstash (release build, transaction mode) on
# free ports in front of the same PostgreSQL, initialises a pgbench database
# there, runs each workload against each target in turn and prints TPS and
# the ratios pgstash/direct and pgstash/PgBouncer.
#
#   usage: benches/pgbench/compare.sh
#   env:   SCALE=10 CLIENTS=8 JOBS=2 DURATION=20 (seconds per run)
#          POOL_SIZE=$CLIENTS  server connections per pooler
#          ROUNDS=1            repeat every run; the table shows the median
#          PGHOST_UPSTREAM=127.0.0.1 PGPORT_UPSTREAM=5432
#          PGBOUNCER=/usr/sbin/pgbouncer PGBOUNCER_USER=postgres (when root)
#          KEEP_DB=1           leave the pgbench database behind
set -euo pipefail
cd "$(dirname "$0")/../.."

SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-8}
JOBS=${JOBS:-2}
DURATION=${DURATION:-20}
POOL_SIZE=${POOL_SIZE:-$CLIENTS}
ROUNDS=${ROUNDS:-1}
UP_HOST=${PGHOST_UPSTREAM:-127.0.0.1}
UP_PORT=${PGPORT_UPSTREAM:-5432}
bouncer_bin=${PGBOUNCER:-/usr/sbin/pgbouncer}
bouncer_user=${PGBOUNCER_USER:-postgres}
DB=pgstash_compare_$$

# The caller's PG* settings (a password, a service, PGOPTIONS) would apply
# to some targets differently than to others.
while read -r var; do unset "$var"; done < <(compgen -e | grep '^PG' || true)

for tool in pgbench psql "$bouncer_bin"; do
    command -v "$tool" >/dev/null || { echo "compare.sh: $tool not found (deploy/local-services.sh installs it)" >&2; exit 1; }
done

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

pgstash_port=$(free_port)
cat >"$work/pgstash.toml" <<EOF
log_level = "warn"

[pool]
mode = "transaction"
size = $POOL_SIZE
EOF
./target/release/pgstash --config "$work/pgstash.toml" --listen "127.0.0.1:$pgstash_port" \
    --upstream "postgres://postgres@$UP_HOST:$UP_PORT" >"$logs/pgstash.log" 2>&1 &
pids+=($!)
wait_ready "$pgstash_port" pgstash "$DB"

workloads=("select-only simple" "select-only prepared" "TPC-B simple")
workload_args=("-S -M simple" "-S -M prepared" "-M simple")
targets=(direct pgbouncer pgstash)
declare -A tps

# Prints TPS, or FAIL if pgbench failed or reported failed transactions.
run_pgbench() {
    local log=$1
    shift
    # Each run starts from the same flushed state, not in the middle of
    # the previous run's checkpoint.
    psql -X -q -h "$UP_HOST" -p "$UP_PORT" -U postgres -d "$DB" -c CHECKPOINT >/dev/null
    if pgbench "$@" >"$log" 2>&1 && grep -q '^number of failed transactions: 0 ' "$log" \
        && ! grep -q 'aborted' "$log"; then
        awk '/^tps = / { print $3 }' "$log"
    else
        echo FAIL
    fi
}

echo "pgbench: -c $CLIENTS -j $JOBS -T $DURATION, pool size $POOL_SIZE, $ROUNDS round(s)"
for round in $(seq 1 "$ROUNDS"); do
    for w in "${!workloads[@]}"; do
        for target in "${targets[@]}"; do
            host=127.0.0.1
            dbname=$DB
            case $target in
                direct) host=$UP_HOST port=$UP_PORT ;;
                pgbouncer)
                    port=$bouncer_port
                    [[ ${workload_args[$w]} == *prepared* ]] && dbname=${DB}_session
                    ;;
                pgstash) port=$pgstash_port ;;
            esac
            log="$logs/$(echo "${workloads[$w]}" | tr ' ' '-')-$target-$round.log"
            # shellcheck disable=SC2086 # workload_args holds several words
            result=$(run_pgbench "$log" -h "$host" -p "$port" -U postgres -c "$CLIENTS" -j "$JOBS" \
                -T "$DURATION" ${workload_args[$w]} "$dbname")
            printf '  round %d  %-22s %-10s %s tps\n' "$round" "${workloads[$w]}" "$target" "$result"
            tps["$w,$target"]+="$result "
        done
    done
done

# The middle value of the rounds; FAIL if any round failed.
median() {
    local values=$1
    if [[ $values == *FAIL* ]]; then
        echo FAIL
        return
    fi
    tr ' ' '\n' <<<"$values" | grep . | sort -g | awk '{ v[NR] = $1 } END { printf "%.0f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

ratio() {
    if [[ $1 == FAIL || $2 == FAIL ]]; then
        echo "n/a"
    else
        awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'
    fi
}

echo
echo "PostgreSQL $(psql -X -At -h "$UP_HOST" -p "$UP_PORT" -U postgres -d "$DB" -c 'SHOW server_version'), $("$bouncer_bin" --version | head -1), pgstash $(./target/release/pgstash --version | awk '{ print $2 }')"
echo "scale $SCALE, $CLIENTS clients, $JOBS threads, ${DURATION}s per run, pool size $POOL_SIZE, median of $ROUNDS round(s)"
echo
printf '%-24s %10s %10s %10s %16s %18s\n' workload direct pgbouncer pgstash pgstash/direct pgstash/pgbouncer
for w in "${!workloads[@]}"; do
    d=$(median "${tps["$w,direct"]}")
    b=$(median "${tps["$w,pgbouncer"]}")
    s=$(median "${tps["$w,pgstash"]}")
    name=${workloads[$w]}
    [[ ${workload_args[$w]} == *prepared* ]] && name="$name *"
    printf '%-24s %10s %10s %10s %16s %18s\n' "$name" "$d" "$b" "$s" "$(ratio "$s" "$d")" "$(ratio "$s" "$b")"
done
echo
echo "* PgBouncer runs this row in session mode: 1.18's transaction mode cannot serve -M prepared."
echo "  pgstash stays in transaction mode for every row."
echo "pgbench logs: $logs/"
