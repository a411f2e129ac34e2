#!/usr/bin/env bash
# The main job on embedded defaults: compile the shipped bottle classifier for a board and
# classify the shipped sample images with the device runtime.
#   ./scripts/demo.sh [BOARD]        (default board: x86_64; see `neoc boards`)
set -euo pipefail
cd "$(dirname "$0")/.."
board=${1:-x86_64}
cargo build --bins --quiet   # the same (dev) build `cargo test` uses; tract is optimized in it
mkdir -p out
echo "== neoc compile models/bottle-classifier/model.onnx --target $board"
./target/debug/neoc compile models/bottle-classifier/model.onnx --target "$board" -o out/bottle-classifier.neo
echo "== neoc inspect out/bottle-classifier.neo"
./target/debug/neoc inspect out/bottle-classifier.neo | head -12
echo "== neo-run classify out/bottle-classifier.neo models/samples/"
./target/debug/neo-run classify out/bottle-classifier.neo models/samples/ --top-k 1 |
  python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    if "error" in r:
        print(f"{r[\"file\"]}: ERROR {r[\"error\"]}"); continue
    top = r["predictions"][0]["top_k"][0]
    print(f"{r[\"file\"]:<48} {top[\"label\"]:<7} {top[\"score\"]:.3f}   {r[\"latency_ms\"][\"total\"]:.1f} ms")
' 2>/dev/null || ./target/debug/neo-run classify out/bottle-classifier.neo models/samples/ --top-k 1
