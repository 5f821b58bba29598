#!/usr/bin/env bash
# Demo on a fresh Debian machine: installs PostgreSQL, Redis and pgbench if
# missing, builds pgstash, runs it in front of the local Postgres and puts
# pgbench through it. Ctrl-C stops it; everything started here is stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/local-services.sh
cargo build --release --quiet

port=${PGSTASH_DEMO_PORT:-6432}
./target/release/pgstash --upstream postgres://postgres@127.0.0.1:5432 --listen "127.0.0.1:$port" &
pgstash_pid=$!
trap 'kill -TERM $pgstash_pid 2>/dev/null; wait $pgstash_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 -p "$port" && break; sleep 0.1; done

psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'pgstash_demo'" | grep -q 1 \
    || psql -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE pgstash_demo"
export PGHOST=127.0.0.1 PGPORT=$port PGUSER=postgres
echo "== pgbench -i through pgstash on port $port"
pgbench -i -q -s 10 pgstash_demo
echo "== select-only, prepared statements, transaction pooling"
pgbench -S -M prepared -c 8 -j 2 -T 10 pgstash_demo | grep -E "tps|failed|latency average"
echo "== TPC-B-like, simple protocol"
pgbench -c 8 -j 2 -T 10 pgstash_demo | grep -E "tps|failed|latency average"
echo
echo "pgstash is listening on 127.0.0.1:$port — try: psql -h 127.0.0.1 -p $port -U postgres pgstash_demo"
echo "Press Ctrl-C to stop."
wait $pgstash_pid
