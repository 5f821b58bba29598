#!/usr/bin/env bash
# Memory per idle client: starts pgstash (release build) against the local
# Postgres, opens N client connections that finish startup and then sit
# idle, and prints pgstash's RSS before and after.
#   usage: benches/idle_clients.sh [N ...]     (default: 1000 10000)
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n "$(ulimit -Hn)"
port=${PORT:-6611}
cargo build --release --quiet
./target/release/pgstash --upstream postgres://postgres@127.0.0.1:5432 --listen "127.0.0.1:$port" 2>/dev/null &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 -p "$port" && break; sleep 0.1; done

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }

for n in "${@:-1000 10000}"; do
for count in $n; do
python3 - "$port" "$count" "$pid" <<'PY'
import socket, struct, sys, time
port, count, pid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def rss():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])

def startup(sock):
    body = struct.pack("!i", 196608) + b"user\0postgres\0database\0postgres\0\0"
    sock.sendall(struct.pack("!i", len(body) + 4) + body)
    buf = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            raise SystemExit("server closed during startup")
        buf += chunk
        # ReadyForQuery is the last message of a successful startup.
        if len(buf) >= 6 and buf[-6:-1] == b"Z\0\0\0\x05":
            return
        if buf[:1] == b"E":
            raise SystemExit(f"startup refused: {buf!r}")

before = rss()
socks = []
for _ in range(count):
    s = socket.create_connection(("127.0.0.1", port))
    startup(s)
    socks.append(s)
time.sleep(1)
after = rss()
print(f"{count} idle clients: RSS {before} kB -> {after} kB, {(after - before) * 1024 / count:.0f} bytes per client")
for s in socks:
    s.close()
PY
done
done
