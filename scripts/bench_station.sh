#!/usr/bin/env bash
# The station under load (issue 7): the EfficientNet-Lite0 bottle detector on the MVTec bottle
# test images replayed as a camera; capture -> inspection -> spool -> Mosquitto -> subscriber.
# Prints frames/s, dropped frames, capture-to-receive latency p50/p99 and the daemon's peak RSS.
#   scripts/bench_station.sh [FPS [SECONDS [THREADS]]]   (needs ../shared/data, release builds:
#   cargo build --release -p neoc -p neo-gateway)
set -euo pipefail
cd "$(dirname "$0")/.."
FPS=${1:-100}; DUR=${2:-30}; THREADS=${3:-2}
D=${NEO_DATA:-../shared/data}
R=${CARGO_TARGET_DIR:-target}/release
MOSQ=$(command -v mosquitto || echo /usr/sbin/mosquitto)
mkdir -p out
if [ ! -f out/bottle-detector.neo ]; then
  "$R/neoc" train anomaly --backbone "$D/models/efficientnet_lite0/efficientnet_lite0_derived.onnx" \
    --layers stage3,stage5 --card models/cards/efficientnet_lite0.toml --resize 224x224 \
    --normal "$D/images/mvtec_bottle/train/good" -o out/bottle-detector.neo >&2
fi
work=$(mktemp -d)
mkdir "$work/frames"
for d in "$D"/images/mvtec_bottle/test/*/; do
  for f in "$d"*.png; do cp "$f" "$work/frames/$(basename "$d")_$(basename "$f")"; done
done
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\nuser root\nlog_dest none\n' "$port" > "$work/m.conf"
"$MOSQ" -c "$work/m.conf" 2>/dev/null & mpid=$!
trap 'kill $mpid $wpid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done
cat > "$work/station.toml" <<TOML
[station]
name = "bench"
[[cameras]]
name = "cam0"
path = "$work/frames"
fps = $FPS
[inspection]
model = "$PWD/out/bottle-detector.neo"
threads = $THREADS
queue = 4
[reject]
delay_ms = 2000
[mqtt]
host = "127.0.0.1"
port = $port
site = "bench"
line = "l1"
device = "st1"
[spool]
dir = "$work/spool"
[samples]
ng = false
uncertain_band = 0.0
ok_fraction = 0.0
TOML
"$R/neo-gateway" watch --broker "127.0.0.1:$port" --filter 'neo/+/+/+/inspection' --json > "$work/rx.jsonl" 2>/dev/null & wpid=$!
sleep 0.5
/usr/bin/time -v "$R/neo-gateway" run --config "$work/station.toml" --quiet --duration "$DUR" 2> "$work/run.txt" >/dev/null
sleep 1
python3 - "$work" "$FPS" "$THREADS" <<'PY'
import json, sys, re
work, fps, threads = sys.argv[1], sys.argv[2], sys.argv[3]
run = open(f"{work}/run.txt").read()
summary = json.loads([l for l in run.splitlines() if l.startswith('{"frames"')][-1])
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run).group(1))
lat = []
for line in open(f"{work}/rx.jsonl"):
    m = json.loads(line)
    lat.append(m["rx_ms"] - m["payload"]["data"]["captured_ms"])
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(round((len(lat) - 1) * p)))]
print(json.dumps({
    "camera_fps": float(fps), "threads": int(threads), "seconds": round(summary["seconds"], 1),
    "frames": summary["frames"], "frames_per_s": round(summary["frames_per_s"], 2),
    "dropped": summary["dropped"], "received": len(lat),
    "capture_to_receive_ms_p50": q(0.5), "capture_to_receive_ms_p99": q(0.99),
    "capture_to_decision_ms_p50": round(summary["latency_ms_p50"], 1),
    "capture_to_decision_ms_p99": round(summary["latency_ms_p99"], 1),
    "peak_rss_mb": round(rss / 1024, 1),
}))
PY
