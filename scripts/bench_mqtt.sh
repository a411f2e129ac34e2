#!/usr/bin/env bash
# Gateway throughput against a local Mosquitto: results through the spool (fsync'd group
# commits), QoS 1, received by a second connection. Prints the JSON report of `neo-gateway bench`.
# Usage: [PROTOCOL=5] scripts/bench_mqtt.sh [COUNT [RATE]]   (RATE results/s, 0 = burst; MQTT 3.1.1 unless
# PROTOCOL=5; needs `cargo build --release -p neo-gateway` first)
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${1:-50000}
RATE=${2:-0}
BIN=${CARGO_TARGET_DIR:-target}/release/neo-gateway
[ -x "$BIN" ] || { echo "error: $BIN not found; run: cargo build --release -p neo-gateway" >&2; exit 1; }
MOSQ=$(command -v mosquitto || echo /usr/sbin/mosquitto)
[ -x "$MOSQ" ] || { echo "error: mosquitto not found; install it: apt-get install mosquitto" >&2; exit 1; }
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000000\nuser root\nlog_dest none\n' "$port" > "$work/m.conf"
"$MOSQ" -c "$work/m.conf" & mpid=$!
trap 'kill $mpid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done
echo "== mosquitto $("$MOSQ" -h 2>/dev/null | head -1 | awk '{print $3}') on 127.0.0.1:$port, MQTT ${PROTOCOL:-3.1.1}, $COUNT results, rate $RATE/s (0: burst)" >&2
/usr/bin/time -v "$BIN" bench --protocol "${PROTOCOL:-3.1.1}" --broker "127.0.0.1:$port" --spool "${SPOOL_DIR:-$work/spool}" --count "$COUNT" --rate "$RATE" 2> "$work/time.txt"
grep -E "Maximum resident|Percent of CPU|Elapsed" "$work/time.txt" >&2
