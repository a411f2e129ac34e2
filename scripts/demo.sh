#!/usr/bin/env bash
# The main job on embedded defaults: compile the shipped bottle classifier for a board and
# classify the shipped sample images with the device runtime.
#   ./scripts/demo.sh [BOARD]        (default board: x86_64; see `neoc boards`)
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
echo
echo "== neoc inspect out/bottle-classifier.neo"
"$bin/neoc" inspect out/bottle-classifier.neo
echo
echo "== neo-run classify out/bottle-classifier.neo models/samples/ --format text"
"$bin/neo-run" classify out/bottle-classifier.neo models/samples/ --format text
echo
echo "(JSON lines for programs: neo-run classify out/bottle-classifier.neo models/samples/)"
