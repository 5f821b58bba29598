#!/usr/bin/env bash
# pgbench throughput and latency of direct PostgreSQL, PgBouncer and pgstash
# with its result cache off, on (local tier), on its Redis tier alone and on
# both tiers, side by side; and what the Redis tier adds to a miss.
#
# Starts PgBouncer (transaction mode, plus a session-mode pool for the
# prepared-statement rows) and one pgstash instance per selected pgstash
# target (release build, transaction mode) on free ports in front of the
# same PostgreSQL, initialises a pgbench database there, runs each workload
# against each target in turn and prints TPS, latency for the single-client
# rows, the cache hit ratio of every cache run and the ratios between
# targets.
#
# Targets (TARGETS selects and orders them):
#   direct        PostgreSQL itself
#   pgbouncer     PgBouncer, transaction mode (session mode for -M prepared)
#   off           pgstash, [cache] enabled = false
#   on            pgstash, local tier only (moka, CACHE_BYTES), TTL 1h
#   redis-only    pgstash, Redis tier only: [redis] url set and the local
#                 tier disabled with capacity_bytes = 0, so hits come from
#                 Redis (the redis% column shows the share that did)
#   local+redis   pgstash, both tiers (local CACHE_BYTES, then Redis), TTL 1h
#   miss-local    pgstash, local tier only, default_ttl = MISS_TTL (1h),
#                 its cache flushed (CACHE FLUSH) before every run: pgbench
#                 reads random accounts, so nearly every lookup is a first
#                 miss (hit% shows the repeats)
#   miss-redis    the same with the Redis tier on: miss-redis / miss-local
#                 is what Redis adds to a miss (a lookup that skips Redis
#                 for entries nobody announced, and the store, written
#                 behind the client in batches)
#   miss-reuse    miss-redis with [redis] admit = "reuse": only results
#                 read again through the instance are stored in Redis
# After the rounds, miss-local and the miss-redis and miss-reuse targets
# run select-only prepared at a fixed rate (MISS_RATE) once per round, and
# the CPU that pgstash, Redis, Postgres and pgbench spent per transaction
# is read from /proc: at full load the rounds differ by more than what
# Redis adds to a miss, and the fixed-rate figure says which process pays.
# Redis targets remember up to 4,000,000 announced entries
# (presence_capacity), more than the runs store, so lookups of entries
# nobody stored keep skipping Redis across rounds.
# Every Redis target has its own key prefix, pgstash_compare_<pid>_<time>_
# followed by ro:, lr: or miss:, so no target sees another's entries; every
# key under it is deleted on exit, however the script ends.
#
# Before the first run of a read-only workload on on, redis-only or
# local+redis, a sweep reads every account once through that instance, in
# the protocol the workload uses, so that the run measures a warm cache;
# the sweep is repeated only after a workload that writes. Workloads that
# write are not warmed: pgstash invalidates by table, so their first UPDATE
# of pgbench_accounts makes everything cached from that table unreachable.
# Around the sweeps of the Redis targets, Redis's used_memory (INFO memory)
# and the number of result keys under the target's prefix are read: their
# growth gives the bytes of Redis memory per cached pgbench row.
#
#   usage: benches/pgbench/compare.sh
#   env:   SCALE=10 CLIENTS=8 JOBS=2 DURATION=20 (seconds per run)
#          POOL_SIZE=$CLIENTS  server connections per pooler
#          ROUNDS=1            repeat every run; the tables show the median
#          WORKLOADS="select_simple select_prepared single single_prepared tpcb mix90 mix50"
#                              the rows to run, in this order (any subset)
#          TARGETS="direct pgbouncer off on redis-only local+redis miss-local miss-redis miss-reuse"
#                              the targets to run, in this order (any subset)
#          BUSY_POLL=50us      [redis] busy_poll of the Redis targets: Redis
#                              runs on this host, where polling for its
#                              replies saves a wake-up per lookup; 0s is
#                              the shipped default
#          WORKERS=1           pgstash's worker_threads: one, like PgBouncer's
#                              single thread and a sidecar given one core;
#                              0 is one per CPU
#          WARMUP=1            0 skips the sweep (the warmed targets then start cold)
#          CACHE_BYTES         local tier size of the on, local+redis and
#                              miss-* instances; default fits both
#                              protocols' sweeps
#          MISS_TTL=1h         default_ttl of the miss-* instances
#          MISS_RATE=8000      TPS of the fixed-rate miss runs that measure
#                              each process's CPU per miss (miss-local and
#                              a miss-redis or miss-reuse target, select-only
#                              prepared, once per round); 0 skips them
#          REDIS_URL=redis://127.0.0.1:6379  for the Redis targets (needs
#                              redis-cli). Each of redis-only and
#                              local+redis holds some 250 bytes per account
#                              and protocol swept until the script exits.
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
# The shared tier against its references:
#   SCALE=1 DURATION=10 WORKLOADS="select_simple select_prepared single single_prepared" \
#   TARGETS="direct on redis-only local+redis miss-local miss-redis miss-reuse" benches/pgbench/compare.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-8}
JOBS=${JOBS:-2}
DURATION=${DURATION:-20}
POOL_SIZE=${POOL_SIZE:-$CLIENTS}
ROUNDS=${ROUNDS:-1}
WORKLOADS=${WORKLOADS:-select_simple select_prepared single single_prepared tpcb mix90 mix50}
TARGETS=${TARGETS:-direct pgbouncer off on redis-only local+redis miss-local miss-redis miss-reuse}
WORKERS=${WORKERS:-1}
BUSY_POLL=${BUSY_POLL:-50us}
WARMUP=${WARMUP:-1}
MISS_TTL=${MISS_TTL:-1h}
MISS_RATE=${MISS_RATE:-8000}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
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
# Every Redis key of this run starts with this; cleanup deletes them all.
REDIS_PREFIX=pgstash_compare_$$_$(date +%s)_

# The caller's PG* settings (a password, a service, PGOPTIONS, and any
# PGSTASH_* override) would apply to some targets differently than to
# others.
while read -r var; do unset "$var"; done < <(compgen -e | grep '^PG' || true)

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

# pgstash target → [cache] enabled, capacity_bytes, default_ttl, and
# [redis] prefix (none: no Redis tier).
declare -A t_cache t_bytes t_ttl t_prefix
t_cache[off]=false
t_cache[on]=true t_bytes[on]=$CACHE_BYTES t_ttl[on]=1h
t_cache[redis-only]=true t_bytes[redis-only]=0 t_ttl[redis-only]=1h t_prefix[redis-only]=${REDIS_PREFIX}ro:
t_cache[local+redis]=true t_bytes[local+redis]=$CACHE_BYTES t_ttl[local+redis]=1h t_prefix[local+redis]=${REDIS_PREFIX}lr:
t_cache[miss-local]=true t_bytes[miss-local]=$CACHE_BYTES t_ttl[miss-local]=$MISS_TTL
t_cache[miss-redis]=true t_bytes[miss-redis]=$CACHE_BYTES t_ttl[miss-redis]=$MISS_TTL t_prefix[miss-redis]=${REDIS_PREFIX}miss:
t_cache[miss-reuse]=true t_bytes[miss-reuse]=$CACHE_BYTES t_ttl[miss-reuse]=$MISS_TTL t_prefix[miss-reuse]=${REDIS_PREFIX}reuse:
declare -A t_admit=([miss-reuse]=reuse)
known_targets="direct pgbouncer off on redis-only local+redis miss-local miss-redis miss-reuse"
read -r -a targets <<<"$TARGETS"
[[ ${#targets[@]} -gt 0 ]] || { echo "compare.sh: TARGETS is empty" >&2; exit 1; }
uses_bouncer=0 uses_redis=0
declare -A selected
for target in "${targets[@]}"; do
    [[ " $known_targets " == *" $target "* ]] || { echo "compare.sh: unknown target '$target' (known: $known_targets)" >&2; exit 1; }
    [[ -z ${selected[$target]:-} ]] || { echo "compare.sh: target '$target' is listed twice" >&2; exit 1; }
    selected[$target]=1
    [[ $target == pgbouncer ]] && uses_bouncer=1
    [[ -n ${t_prefix[$target]:-} ]] && uses_redis=1
done
# pgstash targets with a cache report hit ratios; the warm ones are swept.
is_pgstash() { [[ -n ${t_cache[$1]:-} ]]; }
is_cache() { [[ ${t_cache[$1]:-} == true ]]; }
is_warm() { [[ $1 == on || $1 == redis-only || $1 == local+redis ]]; }

tools=(pgbench psql)
[[ $uses_bouncer == 1 ]] && tools+=("$bouncer_bin")
[[ $uses_redis == 1 ]] && tools+=(redis-cli)
for tool in "${tools[@]}"; do
    command -v "$tool" >/dev/null || { echo "compare.sh: $tool not found (deploy/local-services.sh installs it)" >&2; exit 1; }
done
rcli() { redis-cli -u "$REDIS_URL" "$@"; }
if [[ $uses_redis == 1 && $(rcli PING 2>/dev/null) != PONG ]]; then
    echo "compare.sh: Redis does not answer at $REDIS_URL (set REDIS_URL, or leave the Redis targets out of TARGETS)" >&2
    exit 1
fi
# What else Redis holds shapes what a store costs (a large keyspace makes
# every SET dearer, and growing it rehashes), so the report states it.
redis_before=
if [[ $uses_redis == 1 ]]; then
    redis_before="Redis held $(rcli DBSIZE) keys ($(rcli INFO memory | tr -d '\r' | awk -F: '$1 == "used_memory_human" { print $2 }')) before the run"
fi

# Single-client rows measure latency: one client, one thread.
is_single() { [[ $1 == single* ]]; }

work=$(mktemp -d /tmp/pgstash-compare.XXXXXX)
logs=target/pgbench-compare
mkdir -p "$logs"
pids=()

cleanup() {
    local status=$?
    set +e
    # A second Ctrl-C must not cut the cleanup short.
    trap '' INT TERM
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null
    done
    # Only once no pgstash is left to write. The prefix is this run's
    # alone; its keys hold no blanks or quotes, so xargs passes them whole.
    if [[ $uses_redis == 1 ]]; then
        # shellcheck disable=SC2016 # expanded by the inner shell
        timeout 300 bash -c 'redis-cli -u "$1" --scan --pattern "$2*" \
            | xargs -r -n 1000 redis-cli -u "$1" UNLINK >/dev/null' _ "$REDIS_URL" "$REDIS_PREFIX" 2>/dev/null
        local left
        left=$(timeout 60 redis-cli -u "$REDIS_URL" --scan --pattern "${REDIS_PREFIX}*" 2>/dev/null | wc -l)
        if [[ $left != 0 ]]; then
            echo "compare.sh: $left Redis keys are left under ${REDIS_PREFIX}; delete them with" >&2
            echo "  redis-cli --scan --pattern '${REDIS_PREFIX}*' | xargs -r redis-cli del" >&2
        fi
    fi
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
# Ports handed out earlier are not handed out again, even before anything
# listens on them.
taken_ports=" "
free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 40000))
        [[ $taken_ports == *" $port "* ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            taken_ports+="$port "
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

# Every pooler keeps its server connections open between runs, beside the
# direct runs' own: more than Postgres admits would fail a run midway
# ("too many clients"), so the limit is checked before anything starts.
# PgBouncer has two pools: POOL_SIZE in transaction mode, and one server
# connection per client in session mode; a few more are for psql.
pgstash_targets=0
for target in "${targets[@]}"; do
    is_pgstash "$target" && pgstash_targets=$((pgstash_targets + 1))
done
wanted=$((CLIENTS + uses_bouncer * (POOL_SIZE + CLIENTS) + pgstash_targets * POOL_SIZE + 3))
admitted=$(psql -X -q -At -h "$UP_HOST" -p "$UP_PORT" -U postgres -d postgres -c "
    SELECT current_setting('max_connections')::int
         - CASE WHEN (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN 0
                ELSE current_setting('superuser_reserved_connections')::int END
         - (SELECT count(*) FROM pg_stat_activity
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid())")
if [[ $wanted -gt $admitted ]]; then
    echo "compare.sh: these targets hold up to $wanted connections to Postgres, which has $admitted free" >&2
    echo "  (max_connections less those open now); lower CLIENTS or POOL_SIZE, run fewer targets" >&2
    echo "  at once, or raise max_connections" >&2
    exit 1
fi

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
# cache key is the same as the run's in the same protocol. No comment may
# go in this file: it would become part of the statement text.
cat >"$work/sweep.sql" <<'EOF'
\set i :i + 1
\set aid (:i - 1) * :clients + :client_id + 1
\if :aid <= :accounts
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
\endif
EOF

if [[ $uses_bouncer == 1 ]]; then
    bouncer_port=$(free_port)
    cat >"$work/userlist.txt" <<EOF
"postgres" ""
EOF
    # $DB pools in transaction mode; ${DB}_session is the same database in
    # session mode, because PgBouncer 1.18's transaction mode cannot serve
    # protocol-level prepared statements. A session holds its server
    # connection until the client leaves, so that pool has one per client
    # (with fewer, the clients beyond it wait out the whole run).
    cat >"$work/pgbouncer.ini" <<EOF
[databases]
$DB = host=$UP_HOST port=$UP_PORT dbname=$DB
${DB}_session = host=$UP_HOST port=$UP_PORT dbname=$DB pool_mode=session pool_size=$CLIENTS

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
    # PgBouncer refuses to run as root; it drops to PGBOUNCER_USER itself
    # and then needs to read its files and write its log.
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
fi

# One pgstash process per target rather than one restarted: each keeps its
# own pool, and each cache keeps its contents from one workload to the
# next. The long TTL (1h) outlasts a sweep at scale 10 plus a run, which
# the default (60 s) does not; writes through pgstash still invalidate at
# once. The Redis settings other than url and prefix are the defaults
# (timeout 25ms, on_failure pass-through): Redis errors are counted per run.
declare -A port_of metrics_of pid_of
for target in "${targets[@]}"; do
    is_pgstash "$target" || continue
    port_of[$target]=$(free_port)
    config="$work/pgstash-$target.toml"
    {
        echo 'log_level = "warn"'
        echo "worker_threads = $WORKERS"
        if is_cache "$target"; then
            metrics_of[$target]=$(free_port)
            echo "metrics_listen = \"127.0.0.1:${metrics_of[$target]}\""
        fi
        printf '\n[pool]\nmode = "transaction"\nsize = %s\n\n[cache]\nenabled = %s\n' "$POOL_SIZE" "${t_cache[$target]}"
        if is_cache "$target"; then
            printf 'default_ttl = "%s"\ncapacity_bytes = %s\n' "${t_ttl[$target]}" "${t_bytes[$target]}"
        fi
        if [[ -n ${t_prefix[$target]:-} ]]; then
            printf '\n[redis]\nurl = "%s"\nprefix = "%s"\npresence_capacity = 4000000\nadmit = "%s"\nbusy_poll = "%s"\n' \
                "$REDIS_URL" "${t_prefix[$target]}" "${t_admit[$target]:-fill}" "$BUSY_POLL"
        fi
    } >"$config"
    ./target/release/pgstash --config "$config" --listen "127.0.0.1:${port_of[$target]}" \
        --upstream "postgres://postgres@$UP_HOST:$UP_PORT" >"$logs/pgstash-$target.log" 2>&1 &
    pids+=($!)
    pid_of[$target]=$!
    wait_ready "${port_of[$target]}" "pgstash ($target)" "$DB"
done

# A cache instance's counters: "hits misses bypasses local-tier-hits
# redis-tier-hits redis-errors", or nothing if its endpoint cannot be read
# (the ratios then show n/a rather than the run stopping). A counter not
# yet exported counts 0. The endpoint answers one request per connection
# and then closes it.
lookups() {
    local port=$1
    {
        (
            exec 3<>"/dev/tcp/127.0.0.1/$port"
            printf 'GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
            cat <&3
        ) 2>/dev/null || true
    } | awk '
        /^pgstash_cache_lookups_total\{outcome="hit"\}/ { h = $2; seen = 1 }
        /^pgstash_cache_lookups_total\{outcome="miss"\}/ { m = $2; seen = 1 }
        /^pgstash_cache_lookups_total\{outcome="bypass"\}/ { b = $2; seen = 1 }
        /^pgstash_cache_hits_total\{tier="local"\}/ { l = $2 }
        /^pgstash_cache_hits_total\{tier="redis"\}/ { r = $2 }
        /^pgstash_redis_errors_total[ {]/ { e = $NF }
        END { if (seen) printf "%.0f %.0f %.0f %.0f %.0f %.0f\n", h, m, b, l, r, e }'
}

# What happened between two `lookups` readings: "HITS LOOKUPS LOCAL REDIS
# ERRORS", or nothing if either reading is missing.
lookup_delta() {
    local before after
    read -r -a before <<<"$1"
    read -r -a after <<<"$2"
    [[ ${#before[@]} -eq 6 && ${#after[@]} -eq 6 ]] || return 0
    echo $((after[0] - before[0])) \
        $((after[0] + after[1] + after[2] - before[0] - before[1] - before[2])) \
        $((after[3] - before[3])) $((after[4] - before[4])) $((after[5] - before[5]))
}

# Percentage a / b with one decimal, n/a when b is 0 or missing.
percent() {
    if [[ -z ${1:-} || -z ${2:-} || ${2:-0} == 0 ]]; then
        echo n/a
    else
        awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f\n", 100 * a / b }'
    fi
}

# Percentage of lookups between two `lookups` readings that were hits.
hit_ratio() {
    local counts
    read -r -a counts <<<"$(lookup_delta "$1" "$2")"
    percent "${counts[0]:-}" "${counts[1]:-}"
}

redis_used_memory() {
    rcli INFO memory | tr -d '\r' | awk -F: '$1 == "used_memory" { print $2 }'
}

# Result keys under a prefix (generation keys are not counted).
result_keys() {
    rcli --scan --pattern "${1}r:*" | wc -l
}

# Redis growth during the sweeps that added keys: "target protocol keys
# bytes" lines.
mem_rows=()

# Reads every account once through a warmed target in `protocol`.
warm_up() {
    local target=$1 protocol=$2 log=$3 prefix=${t_prefix[$1]:-} per_client before after start elapsed
    local mem0 keys0 mem1 keys1 added grown note=""
    per_client=$(((ACCOUNTS + CLIENTS - 1) / CLIENTS))
    before=$(lookups "${metrics_of[$target]}")
    if [[ -n $prefix ]]; then
        mem0=$(redis_used_memory)
        keys0=$(result_keys "$prefix")
    fi
    start=$(date +%s.%N)
    pgbench -n -h 127.0.0.1 -p "${port_of[$target]}" -U postgres -c "$CLIENTS" -j "$JOBS" -t "$per_client" \
        -D i=0 -D clients="$CLIENTS" -D accounts="$ACCOUNTS" -M "$protocol" -f "$work/sweep.sql" \
        "$DB" >"$log" 2>&1 || { echo "compare.sh: warm-up failed, see $log" >&2; exit 1; }
    elapsed=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { print e - s }')
    after=$(lookups "${metrics_of[$target]}")
    if [[ -n $prefix ]]; then
        # A fill is written to Redis in the background once its client has
        # the answer; let the last ones land.
        sleep 1
        mem1=$(redis_used_memory)
        keys1=$(result_keys "$prefix")
        added=$((keys1 - keys0))
        grown=$((mem1 - mem0))
        note=$(awk -v k="$added" -v g="$grown" 'BEGIN {
            printf ", Redis +%d keys, used_memory %+.1f MB", k, g / 1048576
            if (k > 0) printf " (%.0f bytes/key)", g / k }')
        # Only a sweep that stored (nearly) every account measures a row's
        # size; later rounds add a few keys beside unrelated changes.
        [[ $added -ge $((ACCOUNTS / 2)) ]] && mem_rows+=("$target $protocol $added $grown")
    fi
    printf '  warm-up %-11s %-8s %d accounts in %.1fs, %s%% already cached%s\n' "$target" "$protocol" \
        "$ACCOUNTS" "$elapsed" "$(hit_ratio "$before" "$after")" "$note"
}

declare -A tps lat hits rshare rerrs
# target,protocol → set once a sweep has filled that cache and no write
# has run since: later rounds' runs then follow each other closely, and
# the machine's drift between a target's run and the next target's is
# seconds, not the length of a sweep.
declare -A swept

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

# Machine CPU per miss at a fixed rate. At full load this machine's rounds
# differ by more than the few percent Redis adds to a miss, and Redis's own
# CPU competes with Postgres for the same cores; at a rate every target
# sustains, the CPU each process spends per transaction is steadier, and
# shows which process pays what.

# Clock ticks (user + system) of every process listed; a process that has
# gone counts nothing.
cpu_ticks() {
    local pid sum=0 t
    for pid in "$@"; do
        t=$(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null) || continue
        sum=$((sum + ${t:-0}))
    done
    echo "$sum"
}

declare -A cpu_rows
# Runs select-only prepared at MISS_RATE through a miss target after a
# flush, and appends "pgstash redis postgres pgbench" microseconds of CPU
# per transaction to cpu_rows[target].
miss_cpu_run() {
    local target=$1 round=$2 log="$logs/miss-cpu-$1-$2.log" bench before after tps window hz
    psql -X -q -At -h 127.0.0.1 -p "${port_of[$target]}" -U postgres -d pgstash -c 'CACHE FLUSH' >/dev/null
    psql -X -q -h "$UP_HOST" -p "$UP_PORT" -U postgres -d "$DB" -c CHECKPOINT >/dev/null
    pgbench -n -h 127.0.0.1 -p "${port_of[$target]}" -U postgres -c "$CLIENTS" -j "$JOBS" \
        -T "$DURATION" -R "$MISS_RATE" -S -M prepared "$DB" >"$log" 2>&1 &
    bench=$!
    # The first and last second are left out: connections open and close.
    sleep 1
    sample() {
        echo "$(cpu_ticks "${pid_of[$target]}") $(cpu_ticks $(pgrep -x redis-server)) $(cpu_ticks $(pgrep -x postgres)) $(cpu_ticks "$bench")"
    }
    before=$(sample)
    window=$((DURATION - 2))
    sleep "$window"
    after=$(sample)
    wait "$bench" || { echo "compare.sh: pgbench at a fixed rate failed, see $log" >&2; return; }
    tps=$(awk '/^tps = / { print $3 }' "$log")
    hz=$(getconf CLK_TCK)
    cpu_rows[$target]+=$(awk -v b="$before" -v a="$after" -v tps="$tps" -v w="$window" -v hz="$hz" 'BEGIN {
        split(b, x, " "); split(a, y, " ")
        for (i = 1; i <= 4; i++) printf "%.1f,", (y[i] - x[i]) / hz * 1e6 / (tps * w)
        printf " " }')
    printf '  round %d  miss CPU at %s TPS     %-11s %s tps\n' "$round" "$MISS_RATE" "$target" "$tps"
}

# The median over rounds of field $2 (1 pgstash, 2 redis, 3 postgres,
# 4 pgbench, 0 their sum, 5 pgstash + redis) of a target's CPU rows.
cpu_median() {
    local target=$1 field=$2 row values=""
    for row in ${cpu_rows[$target]:-}; do
        values+="$(awk -v r="$row" -v f="$field" 'BEGIN {
            split(r, v, ",")
            if (f == 5) { print v[1] + v[2]; exit }
            if (f > 0) { print v[f]; exit }
            print v[1] + v[2] + v[3] + v[4] }') "
    done
    median "$values" 1
}

# What a target's pgstash and Redis spend per miss beyond miss-local's, in
# percent of miss-local's whole miss: the share the shared tier adds. The
# other processes' CPU does not depend on the tier and only adds noise.
cpu_added() {
    awk -v a="$(cpu_median miss-local 5)" -v b="$(cpu_median "$1" 5)" -v t="$(cpu_median miss-local 0)" \
        'BEGIN { if (t > 0) printf "%+.1f", 100 * (b - a) / t; else print "n/a" }'
}

echo "pgbench: -c $CLIENTS -j $JOBS -T $DURATION (single: -c 1 -j 1), pool size $POOL_SIZE, $ROUNDS round(s)"
echo "workloads: ${workloads[*]}"
echo "targets: ${targets[*]}"
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
                *) port=${port_of[$target]} ;;
            esac
            log="$logs/$w-$target-$round.log"
            if is_warm "$target" && [[ $WARMUP != 0 && -n ${w_warm[$w]} && -z ${swept["$target,${w_warm[$w]}"]:-} ]]; then
                warm_up "$target" "${w_warm[$w]}" "$logs/$w-$target-warmup-$round.log"
                swept["$target,${w_warm[$w]}"]=1
            fi
            if [[ $target == miss-* ]]; then
                # Cold again: every entry of earlier runs, in both tiers,
                # becomes unreachable.
                psql -X -q -At -h 127.0.0.1 -p "$port" -U postgres -d pgstash -c 'CACHE FLUSH' >/dev/null
            fi
            is_cache "$target" && before=$(lookups "${metrics_of[$target]}")
            # shellcheck disable=SC2086 # args holds several words
            result=$(run_pgbench "$log" -h "$host" -p "$port" -U postgres -c "$clients" -j "$jobs" \
                -T "$DURATION" $args "$dbname")
            read -r t l <<<"$result"
            extra=""
            if is_cache "$target"; then
                read -r -a delta <<<"$(lookup_delta "$before" "$(lookups "${metrics_of[$target]}")")"
                h=$(percent "${delta[0]:-}" "${delta[1]:-}")
                hits["$w,$target"]+="$h "
                extra=", hit $h%"
                if [[ -n ${t_prefix[$target]:-} ]]; then
                    s=$(percent "${delta[3]:-}" "${delta[1]:-}")
                    rshare["$w,$target"]+="$s "
                    [[ ${delta[4]:-0} == 0 ]] || rerrs["$w,$target"]=$((${rerrs["$w,$target"]:-0} + delta[4]))
                    extra+=", from Redis $s% (of ${delta[1]:-?} lookups: ${delta[2]:-?} local-tier hits, ${delta[3]:-?} Redis-tier hits, ${delta[4]:-?} Redis errors)"
                fi
            fi
            is_single "$w" && [[ $t != FAIL ]] && extra=", latency $l ms$extra"
            printf '  round %d  %-22s %-11s %s tps%s\n' "$round" "${w_label[$w]}" "$target" "$t" "$extra"
            tps["$w,$target"]+="$t "
            lat["$w,$target"]+="${l:-FAIL} "
        done
        # A write invalidates what the sweeps filled (through pgstash) or
        # makes it stale (around it): the next read-only run sweeps again.
        if [[ -z ${w_warm[$w]} ]]; then
            swept=()
        fi
    done
done

if [[ $MISS_RATE != 0 && -n ${selected[miss-local]:-} && -n ${selected[miss-redis]:-}${selected[miss-reuse]:-} ]]; then
    for round in $(seq 1 "$ROUNDS"); do
        for target in miss-local miss-redis miss-reuse; do
            [[ -n ${selected[$target]:-} ]] && miss_cpu_run "$target" "$round"
        done
    done
fi

# The middle value of the rounds; FAIL if any round failed, - if the
# target did not run.
median() {
    local values=$1 digits=${2:-0}
    if [[ -z ${values// /} ]]; then
        echo -
        return
    fi
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

is_number() { [[ $1 =~ ^[0-9]+(\.[0-9]+)?$ ]]; }

ratio() {
    if is_number "$1" && is_number "$2" && [[ ! $2 =~ ^0*(\.0*)?$ ]]; then
        awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'
    else
        echo "n/a"
    fi
}

# What the second of two measurements costs over the first, in percent of
# the first: from TPS (time per transaction a/b - 1) or from latency
# (b/a - 1).
added_cost() {
    local kind=$1 a=$2 b=$3
    if ! is_number "$a" || ! is_number "$b" || [[ $a =~ ^0*(\.0*)?$ || $b =~ ^0*(\.0*)?$ ]]; then
        echo n/a
    elif [[ $kind == tps ]]; then
        awk -v a="$a" -v b="$b" 'BEGIN { printf "%+.1f", 100 * (a / b - 1) }'
    else
        awk -v a="$a" -v b="$b" 'BEGIN { printf "%+.1f", 100 * (b / a - 1) }'
    fi
}

# The median of a workload's metric on a target: tps or lat.
m() {
    local kind=$1 w=$2 target=$3
    if [[ $kind == tps ]]; then
        median "${tps["$w,$target"]:-}"
    else
        median "${lat["$w,$target"]:-}" 3
    fi
}
# The median over rounds of each round's TPS ratio of target $2 to
# target $3 on workload $1. The two runs of a round follow each other
# within seconds, so the machine's drift over a whole run (which moves
# every target of a round together) cancels in it as it does not in a
# ratio of medians.
paired() {
    per_round 2 ratio "$@"
}
# The same for what target $3 adds over target $2, in percent (added_cost
# of their TPS).
paired_cost() {
    local c
    c=$(per_round 1 "added_cost tps" "$@")
    is_number "${c#-}" && c=$(awk -v c="$c" 'BEGIN { printf "%+.1f", c }')
    echo "$c"
}
# Applies $2 (a command and its leading arguments) to each round's TPS of
# targets $4 and $5 on workload $3; the median of what it printed, with
# $1 decimals.
per_round() {
    local digits=$1 f=$2 w=$3 a b values=""
    read -r -a a <<<"${tps["$w,$4"]:-}"
    read -r -a b <<<"${tps["$w,$5"]:-}"
    for i in "${!a[@]}"; do
        # shellcheck disable=SC2086 # f holds a command and its arguments
        values+="$($f "${a[$i]}" "${b[$i]:-}") "
    done
    median "$values" "$digits"
}
mh() { median "${hits["$1,$2"]:-}" 1; }
ms() { median "${rshare["$1,$2"]:-}" 1; }

# Table 1: direct, pgbouncer, off, on, on's hit ratio, ratios.
row() {
    local name=$1 d=$2 b=$3 f=$4 o=$5 h=$6
    printf '%-25s %9s %9s %9s %9s %6s %9s %7s %7s %10s %8s\n' "$name" "$d" "$b" "$f" "$o" "$h" \
        "$(ratio "$o" "$d")" "$(ratio "$o" "$f")" "$(ratio "$o" "$b")" "$(ratio "$f" "$d")" "$(ratio "$f" "$b")"
}
header() {
    printf '%-25s %9s %9s %9s %9s %6s %9s %7s %7s %10s %8s\n' "$1" direct pgbouncer cache-off cache-on hit% \
        on/direct on/off on/pgb off/direct off/pgb
}
# Table 2, hits from the shared tier: direct, on, redis-only with its hit
# ratio and the share of its lookups the Redis tier answered, local+redis
# with the same, ratios.
hits_row() {
    local kind=$1 w=$2 name=$3 d o r l
    d=$(m "$kind" "$w" direct) o=$(m "$kind" "$w" on)
    r=$(m "$kind" "$w" redis-only) l=$(m "$kind" "$w" local+redis)
    printf '%-25s %9s %9s %10s %6s %6s %11s %6s %6s %9s %6s %9s %6s\n' "$name" "$d" "$o" \
        "$r" "$(mh "$w" redis-only)" "$(ms "$w" redis-only)" "$l" "$(mh "$w" local+redis)" "$(ms "$w" local+redis)" \
        "$(ratio "$r" "$d")" "$(ratio "$r" "$o")" "$(ratio "$l" "$d")" "$(ratio "$l" "$o")"
}
hits_header() {
    printf '%-25s %9s %9s %10s %6s %6s %11s %6s %6s %9s %6s %9s %6s\n' "$1" direct cache-on \
        redis-only hit% redis% local+redis hit% redis% ro/direct ro/on lr/direct lr/on
}
# Table 3, misses: off, miss-local, miss-redis and miss-reuse (with their
# hit ratios), what Redis adds to a miss under either admission, and what
# the local tier's miss path costs over no cache at all.
miss_row() {
    local kind=$1 w=$2 name=$3 f a b u
    f=$(m "$kind" "$w" off) a=$(m "$kind" "$w" miss-local) b=$(m "$kind" "$w" miss-redis) u=$(m "$kind" "$w" miss-reuse)
    printf '%-25s %9s %10s %6s %10s %6s %10s %6s %9s %9s %11s\n' "$name" "$f" "$a" "$(mh "$w" miss-local)" \
        "$b" "$(mh "$w" miss-redis)" "$u" "$(mh "$w" miss-reuse)" \
        "$(added_cost "$kind" "$a" "$b")" "$(added_cost "$kind" "$a" "$u")" "$(added_cost "$kind" "$f" "$a")"
}
miss_header() {
    printf '%-25s %9s %10s %6s %10s %6s %10s %6s %9s %9s %11s\n' "$1" cache-off miss-local hit% miss-redis hit% \
        miss-reuse hit% "redis+%" "reuse+%" "local+%"
}
label() {
    local name=${w_label[$1]}
    [[ ${w_args[$1]} == *prepared* ]] && name="$name *"
    echo "$name"
}

singles=()
for w in "${workloads[@]}"; do is_single "$w" && singles+=("$w"); done

echo
versions="PostgreSQL $(psql -X -At -h "$UP_HOST" -p "$UP_PORT" -U postgres -d "$DB" -c 'SHOW server_version')"
[[ $uses_bouncer == 1 ]] && versions+=", $("$bouncer_bin" --version | head -1)"
[[ $uses_redis == 1 ]] && versions+=", Redis $(rcli INFO server | tr -d '\r' | awk -F: '$1 == "redis_version" { print $2 }')"
echo "$versions, pgstash $(./target/release/pgstash --version | awk '{ print $2 }')"
[[ -n $redis_before ]] && echo "$redis_before"
echo "scale $SCALE ($ACCOUNTS accounts), $CLIENTS clients, $JOBS threads, ${DURATION}s per run, pool size $POOL_SIZE, median of $ROUNDS round(s), pgstash worker_threads $WORKERS, Redis busy_poll $BUSY_POLL"
echo "warm-up sweep $([[ $WARMUP != 0 ]] && echo "on (once per instance and protocol, again after a write)" || echo off) (on, redis-only, local+redis), default_ttl 1h, local capacity $CACHE_BYTES bytes (redis-only: 0); miss-*: default_ttl $MISS_TTL"
echo
header "TPS"
for w in "${workloads[@]}"; do
    row "$(label "$w")" "$(m tps "$w" direct)" "$(m tps "$w" pgbouncer)" \
        "$(m tps "$w" off)" "$(m tps "$w" on)" "$(mh "$w" on)"
done
if [[ ${#singles[@]} -gt 0 ]]; then
    echo
    header "latency average (ms)"
    for w in "${singles[@]}"; do
        row "$(label "$w")" "$(m lat "$w" direct)" "$(m lat "$w" pgbouncer)" \
            "$(m lat "$w" off)" "$(m lat "$w" on)" "$(mh "$w" on)"
    done
    echo "  (latency ratios below 1 mean the first target answers faster)"
fi

if [[ -n ${selected[redis-only]:-}${selected[local+redis]:-} ]]; then
    echo
    echo "Shared tier, hits (ro = redis-only, lr = local+redis)"
    hits_header "TPS"
    for w in "${workloads[@]}"; do hits_row tps "$w" "$(label "$w")"; done
    if [[ ${#singles[@]} -gt 0 ]]; then
        echo
        hits_header "latency average (ms)"
        for w in "${singles[@]}"; do hits_row lat "$w" "$(label "$w")"; done
    fi
fi

if [[ -n ${selected[miss-local]:-}${selected[miss-redis]:-}${selected[miss-reuse]:-} ]]; then
    echo
    echo "Shared tier, misses (cache flushed before each run, default_ttl $MISS_TTL: random reads, first lookups miss)"
    miss_header "TPS"
    for w in "${workloads[@]}"; do miss_row tps "$w" "$(label "$w")"; done
    if [[ ${#singles[@]} -gt 0 ]]; then
        echo
        miss_header "latency average (ms)"
        for w in "${singles[@]}"; do miss_row lat "$w" "$(label "$w")"; done
    fi
    echo "  redis+% is the time per transaction (from TPS) or the latency that Redis adds to"
    echo "  the local tier's miss (admit = \"fill\"), reuse+% the same with admit = \"reuse\";"
    echo "  local+% what the local tier's miss adds to cache-off."
fi

if [[ -n ${cpu_rows[miss-local]:-} ]]; then
    echo
    echo "Shared tier, CPU per miss at $MISS_RATE TPS (select-only prepared, cache flushed before each run;"
    echo "  microseconds of CPU per transaction, by process, median of $ROUNDS round(s))"
    printf '  %-11s %8s %8s %9s %8s %8s %9s %9s\n' target pgstash redis postgres pgbench total "total+%" "tier+%"
    base=$(cpu_median miss-local 0)
    for target in miss-local miss-redis miss-reuse; do
        [[ -n ${cpu_rows[$target]:-} ]] || continue
        total=$(cpu_median "$target" 0)
        vs="" tier=""
        [[ $target != miss-local ]] && vs="$(added_cost lat "$base" "$total")%" tier="$(cpu_added "$target")%"
        printf '  %-11s %8s %8s %9s %8s %8s %9s %9s\n' "$target" "$(cpu_median "$target" 1)" "$(cpu_median "$target" 2)" \
            "$(cpu_median "$target" 3)" "$(cpu_median "$target" 4)" "$total" "$vs" "$tier"
    done
    echo "  redis: every redis-server process on this machine (0 when Redis runs elsewhere);"
    echo "  total+%: the whole machine's CPU per miss over miss-local's; tier+%: what pgstash"
    echo "  and Redis spend beyond miss-local's, in percent of miss-local's whole miss"
fi

if [[ ${#mem_rows[@]} -gt 0 ]]; then
    echo
    echo "Redis memory per cached pgbench row (used_memory growth during a sweep / result keys it added)"
    printf '  %-12s %-9s %9s %12s %10s\n' target protocol keys "bytes" bytes/key
    for r in "${mem_rows[@]}"; do
        read -r target protocol added grown <<<"$r"
        printf '  %-12s %-9s %9d %12d %10s\n' "$target" "$protocol" "$added" "$grown" \
            "$(awk -v g="$grown" -v k="$added" 'BEGIN { printf "%.0f", g / k }')"
    done
fi

# The goals the shared tier is held to, for the rows that ran.
if [[ -n ${selected[direct]:-} && -n ${selected[redis-only]:-} ]]; then
    echo
    echo "goal: a Redis-tier hit serves select-only at >= 1.20x direct TPS"
    for w in select_simple select_prepared; do
        [[ " ${workloads[*]} " == *" $w "* ]] || continue
        r=$(ratio "$(m tps "$w" redis-only)" "$(m tps "$w" direct)")
        p=$(paired "$w" redis-only direct)
        # Met only when both readings say so.
        verdict="NOT met"
        is_number "$r" && is_number "$p" && awk -v r="$r" -v p="$p" 'BEGIN { exit !(r >= 1.20 && p >= 1.20) }' && verdict=met
        is_number "$r" && is_number "$p" || verdict="n/a"
        printf '  %-25s redis-only/direct %5s, per round %5s  %s (%s%% of its lookups answered by Redis)\n' \
            "$(label "$w")" "$r" "$p" "$verdict" "$(ms "$w" redis-only)"
    done
fi
for target in miss-redis miss-reuse; do
    [[ -n ${selected[miss-local]:-} && -n ${selected[$target]:-} ]] || continue
    echo "goal: the shared tier adds <= 5 % to a miss ($target, admit = \"${t_admit[$target]:-fill}\")"
    for w in "${workloads[@]}"; do
        kind=tps
        is_single "$w" && kind=lat
        c=$(added_cost "$kind" "$(m "$kind" "$w" miss-local)" "$(m "$kind" "$w" "$target")")
        # Latency rows have no per-round pairing here: the median alone.
        p=$c
        [[ $kind == tps ]] && p=$(paired_cost "$w" miss-local "$target")
        verdict="NOT met"
        [[ $c != n/a && $p != n/a ]] && awk -v c="$c" -v p="$p" 'BEGIN { exit !(c <= 5 && p <= 5) }' && verdict=met
        [[ $c == n/a || $p == n/a ]] && verdict="n/a"
        printf '  %-25s %-7s %6s%%, per round %6s%%  %s\n' "$(label "$w")" "$([[ $kind == tps ]] && echo TPS || echo latency)" \
            "$c" "$p" "$verdict"
    done
done

if [[ -n ${cpu_rows[miss-local]:-} ]]; then
    for target in miss-redis miss-reuse; do
        [[ -n ${cpu_rows[$target]:-} ]] || continue
        c=$(cpu_added "$target")
        verdict="NOT met"
        [[ $c != n/a ]] && awk -v c="$c" 'BEGIN { exit !(c <= 5) }' && verdict=met
        [[ $c == n/a ]] && verdict="n/a"
        printf 'goal: the shared tier adds <= 5 %% to a miss, CPU at %s TPS (%s, tier+%%): %s%%  %s\n' "$MISS_RATE" "$target" "$c" "$verdict"
    done
fi

echo
echo "hit% is hits / lookups of the run itself, from the instance's /metrics; redis% is the"
echo "  share of those lookups that the Redis tier answered (pgstash_cache_hits_total{tier=\"redis\"})."
if [[ $uses_redis == 1 ]]; then
    if [[ -n ${rerrs[*]:-} ]]; then
        echo "Redis errors (pgstash_redis_errors_total), by workload,target:$(for k in "${!rerrs[@]}"; do printf ' %s=%s' "$k" "${rerrs[$k]}"; done)"
    else
        echo "No Redis errors during the runs (pgstash_redis_errors_total)."
    fi
fi
if [[ $uses_bouncer == 1 ]]; then
    echo "* PgBouncer runs this row in session mode: 1.18's transaction mode cannot serve -M prepared."
    echo "  pgstash stays in transaction mode for every row."
fi
echo "pgbench logs: $logs/"
