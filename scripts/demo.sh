#!/usr/bin/env bash
# A working inspection line in one command: compile the shipped bottle classifier for a board,
# and a pump sensor model, then run the station on embedded defaults (station.toml): the shipped
# sample images replayed as a camera, OK/NG per part, reject pulses, the pump recording replayed
# into its sensor model (Healthy/Warning/Alarm), results over an in-process MQTT broker.
#   ./scripts/demo.sh [BOARD]        (default board: x86_64; see `neoc boards`)
# Runs until Ctrl-C; NEO_DEMO_SECONDS=N stops it after N seconds (CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
board=${1:-x86_64}
# The same dev build `cargo test --workspace` uses (tract is optimized in it), so the two
# README commands build once.
cargo build --workspace --all-targets --quiet
bin=${CARGO_TARGET_DIR:-target}/debug
mkdir -p out
echo "== neoc compile models/bottle-classifier/model.onnx --target $board -o out/bottle-classifier.neo"
"$bin/neoc" compile models/bottle-classifier/model.onnx --target "$board" -o out/bottle-classifier.neo
echo "== neoc train sensor --normal models/pump-sensor/normal.csv --window 5 --stats mean,std --model pca --name pump -o out/pump.neo"
"$bin/neoc" train sensor --normal models/pump-sensor/normal.csv --window 5 --stats mean,std --model pca --name pump -o out/pump.neo
echo
port=${NEO_DEMO_PORT:-1883}
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  echo "(port 1883 is taken; the embedded broker uses $port)"
fi
args=(run --mqtt-port "$port")
if [ -n "${NEO_DEMO_SECONDS:-}" ]; then args+=(--duration "$NEO_DEMO_SECONDS"); fi
echo "== neo-gateway ${args[*]}   (station.toml; in another terminal: $bin/neo-gateway watch --broker 127.0.0.1:$port)"
exec "$bin/neo-gateway" "${args[@]}"
