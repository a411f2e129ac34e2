#!/usr/bin/env bash
# Cross-build neo's device crates for an ARM board and run their tests under qemu-user, with
# no Docker (the recipe of ../shared/docs/cross.md, as a script).
#
#   scripts/cross.sh TARGET [setup|build|test|smoke|env]
#     TARGET: aarch64-unknown-linux-gnu (Raspberry Pi 4/5 64-bit, Jetson, i.MX8)
#             armv7-unknown-linux-gnueabihf (Raspberry Pi 32-bit)
#     setup   install what is missing (cross gcc, qemu-user-static, the target's std)
#     build   release build of the device binaries (neo-run, neo-gateway) for TARGET
#     test    build + the device crates' tests under qemu (neo-sensor, neo-runtime, and the
#             neo-gateway library tests)
#     smoke   build + run `neo-run --version` and one sensor replay under qemu
#     compare build + the compiled models' outputs here vs on the target (f32, int8 weights and
#             int8 compute, within 1e-4)
#     bundle  build + `neoc bundle` for $BOARD (default rpi4, rpi4-32 for armv7), installed into an empty root,
#             the installed daemon started under qemu
#     env     print the environment a cross cargo needs (eval "$(scripts/cross.sh T env)")
#
# Toolchain: rustup's target when `rustup target add` works (it did here), else Debian's
# rustc-web/cargo-web with the target std from Debian (libstd-rust-web-dev:<arch>). Output
# goes to target/cross/<TARGET>/release (its own target dir: the two toolchains never share
# artifacts). Everything runs in release: tract is unusably slow unoptimized, even more so
# under emulation.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: scripts/cross.sh TARGET [setup|build|test|smoke|env]}
mode=${2:-test}
export CARGO_TARGET_DIR=${CROSS_TARGET_DIR:-target/cross}

case $target in
  aarch64-unknown-linux-gnu)
    arch=arm64; gcc=aarch64-linux-gnu-gcc; pkgs=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
    qemu=qemu-aarch64-static; sysroot=/usr/aarch64-linux-gnu ;;
  armv7-unknown-linux-gnueabihf)
    arch=armhf; gcc=arm-linux-gnueabihf-gcc; pkgs=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross)
    qemu=qemu-arm-static; sysroot=/usr/arm-linux-gnueabihf ;;
  *) echo "error: unknown target '$target' (aarch64-unknown-linux-gnu or armv7-unknown-linux-gnueabihf)" >&2; exit 2 ;;
esac
TARGET_ENV=$(echo "$target" | tr 'a-z-' 'A-Z_')

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
missing() { local m=(); for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || m+=("$p"); done; echo "${m[@]:-}"; }

# Which toolchain: rustup's target if it is (or can be) installed, else Debian's.
toolchain() {
  if rustup target list --installed 2>/dev/null | grep -qx "$target"; then echo rustup; return; fi
  if [ "$mode" = setup ] && timeout 300 rustup target add "$target" >/dev/null 2>&1; then echo rustup; return; fi
  if [ -x /usr/bin/rustc ] && /usr/bin/rustc --print sysroot >/dev/null 2>&1 \
     && [ -d "$(/usr/bin/rustc --print sysroot)/lib/rustlib/$target" ]; then echo debian; return; fi
  echo none
}

setup() {
  local need; need=$(missing "${pkgs[@]}" qemu-user-static)
  if [ -n "$need" ]; then sudo_ apt-get update -q && sudo_ apt-get install -y -q --no-install-recommends $need; fi
  if [ "$(toolchain)" = none ]; then
    # Debian's toolchain with the target's std of exactly the same version.
    sudo_ dpkg --add-architecture "$arch"
    sudo_ apt-get update -q
    local ver; ver=$(apt-cache policy rustc-web | awk '/Candidate:/{print $2}')
    sudo_ apt-get install -y -q --no-install-recommends "rustc-web=$ver" "cargo-web=$ver" "libstd-rust-web-dev:$arch=$ver"
  fi
  echo "toolchain for $target: $(toolchain)"
}

cross_env() {
  local tc; tc=$(toolchain)
  [ "$tc" != none ] || { echo "error: no Rust toolchain for $target: run scripts/cross.sh $target setup" >&2; exit 1; }
  echo "export CARGO_TARGET_DIR=$CARGO_TARGET_DIR"
  echo "export CARGO_TARGET_${TARGET_ENV}_LINKER=$gcc"
  # The C parts (ring, zstd ...) need the cross compiler too.
  echo "export CC_${target//-/_}=$gcc AR_${target//-/_}=${gcc%-gcc}-ar"
  if [ "$tc" = rustup ]; then
    echo "export CARGO=cargo"
    # No target libc is installed: qemu finds it in the cross sysroot.
    echo "export CARGO_TARGET_${TARGET_ENV}_RUNNER='$qemu -L $sysroot'"
    # Tests that start a binary start it through the same runner.
    echo "export NEO_TEST_RUNNER='$qemu -L $sysroot'"
  else
    echo "export CARGO=/usr/bin/cargo RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc"
    # libstd-rust-web-dev:<arch> brought the target libc: -L would mix two loaders (threads hang).
    echo "export CARGO_TARGET_${TARGET_ENV}_RUNNER=$qemu"
    echo "export NEO_TEST_RUNNER=$qemu"
  fi
}

device_build() {
  eval "$(cross_env)"
  $CARGO build --release --locked --target "$target" -p neo-runtime -p neo-gateway --bins
  local out=$CARGO_TARGET_DIR/$target/release
  for b in neo-run neo-gateway; do
    printf '%s: %s\n' "$b" "$(file -b "$out/$b" | cut -d, -f1-2)"
  done
}

case $mode in
  setup) setup ;;
  env) cross_env ;;
  build) device_build ;;
  test)
    device_build
    eval "$(cross_env)"
    # The sensor crate's and the runtime's tests (the latter run neo-run through
    # NEO_TEST_RUNNER), and the gateway's library tests (spool, commands, deployment slots,
    # telemetry; none needs a broker).
    $CARGO test --release --locked --target "$target" -p neo-sensor -p neo-runtime -p neo-gateway --lib --test runtime
    ;;
  smoke)
    device_build
    eval "$(cross_env)"
    out=$CARGO_TARGET_DIR/$target/release
    runner_var=CARGO_TARGET_${TARGET_ENV}_RUNNER
    ${!runner_var} "$out/neo-run" --version
    # A sensor model trained on this machine, replayed on the target: the same state changes.
    host_bin=${HOST_BIN:-target/debug}
    tmp=$(mktemp -d)
    "$host_bin/neoc" train sensor --normal models/pump-sensor/normal.csv --window 5 --stats mean,std --model pca -o "$tmp/pump.neo" 2>/dev/null
    "$host_bin/neo-run" sensor "$tmp/pump.neo" models/pump-sensor/replay.csv > "$tmp/host.jsonl"
    ${!runner_var} "$out/neo-run" sensor "$tmp/pump.neo" models/pump-sensor/replay.csv > "$tmp/target.jsonl"
    if ! diff -q <(grep -v summary "$tmp/host.jsonl") <(grep -v summary "$tmp/target.jsonl") >/dev/null; then
      echo "error: $target replays the pump recording differently from this machine" >&2
      diff <(grep -v summary "$tmp/host.jsonl") <(grep -v summary "$tmp/target.jsonl") | head >&2
      exit 1
    fi
    echo "$target: pump replay identical to x86_64 ($(grep -c previous "$tmp/host.jsonl") state changes)"
    rm -rf "$tmp"
    ;;
  compare)
    # The same artifacts give the same outputs here and on the target (f32 within 1e-4):
    # the shipped bottle classifier, plus SqueezeNet and EfficientNet-Lite0 when the shared
    # data is there. Exercises tract's NEON kernels for real.
    device_build
    eval "$(cross_env)"
    out=$CARGO_TARGET_DIR/$target/release
    runner_var=CARGO_TARGET_${TARGET_ENV}_RUNNER
    host_bin=${HOST_BIN:-target/debug}
    data=${NEO_DATA:-../shared/data}
    tmp=$(mktemp -d)
    models=("bottle-classifier|models/bottle-classifier/model.onnx||models/samples/bottle_broken_large_000.png")
    if [ -d "$data/models" ]; then
      models+=("squeezenet1.1|$data/models/squeezenet1.1/squeezenet1.1_fp32_derived.onnx|--card models/cards/squeezenet1.1.toml|$data/models/squeezenet1.1/sanity/bald_eagle.jpeg")
      models+=("efficientnet-lite0|$data/models/efficientnet_lite0/efficientnet_lite0_derived.onnx|--card models/cards/efficientnet_lite0.toml|$data/models/squeezenet1.1/sanity/pelican.jpeg")
      # The int8 artifacts (int8 weights rebuilt at load on the device): the gate is not what
      # is checked here (budget opened), the device reading the packed weights is.
      calib="--quantize int8 --calibration $data/images/mvtec_bottle/train/good --max-images 40 --max-drop 99 --min-cosine 0"
      models+=("squeezenet1.1-int8|$data/models/squeezenet1.1/squeezenet1.1_fp32_derived.onnx|--card models/cards/squeezenet1.1.toml $calib|$data/models/squeezenet1.1/sanity/bald_eagle.jpeg")
      models+=("efficientnet-lite0-int8|$data/models/efficientnet_lite0/efficientnet_lite0_derived.onnx|--card models/cards/efficientnet_lite0.toml $calib|$data/models/squeezenet1.1/sanity/pelican.jpeg")
      # int8 compute (neo_q8_conv): the dot-product kernel there, VNNI or portable here; the
      # integer sums are exact, so the outputs agree as closely as the f32 ones.
      models+=("squeezenet1.1-int8-compute|$data/models/squeezenet1.1/squeezenet1.1_fp32_derived.onnx|--card models/cards/squeezenet1.1.toml $calib --scheme int8-compute|$data/models/squeezenet1.1/sanity/bald_eagle.jpeg")
      models+=("efficientnet-lite0-int8-compute|$data/models/efficientnet_lite0/efficientnet_lite0_derived.onnx|--card models/cards/efficientnet_lite0.toml $calib --scheme int8-compute|$data/models/squeezenet1.1/sanity/pelican.jpeg")
    else
      echo "($data/models not found: comparing the shipped classifier only)"
    fi
    for m in "${models[@]}"; do
      IFS='|' read -r name onnx card image <<< "$m"
      # shellcheck disable=SC2086
      "$host_bin/neoc" compile "$onnx" --target x86_64 $card -o "$tmp/$name.neo" >/dev/null 2>&1
      "$host_bin/neo-run" dump "$tmp/$name.neo" "$image" -o "$tmp/x86_64/$name"
      t0=$(date +%s)
      ${!runner_var} "$out/neo-run" dump "$tmp/$name.neo" "$image" -o "$tmp/$target/$name"
      echo "== $name ($(( $(date +%s) - t0 )) s under qemu): x86_64 vs $target"
      python3 scripts/compare_npy.py "$tmp/x86_64/$name" "$tmp/$target/$name" --tol 1e-4
    done
    rm -rf "$tmp"
    ;;
  bundle)
    # `neoc bundle` for BOARD (default rpi4) with the cross-built daemon and the demo station,
    # installed into an empty root; the installed daemon starts under qemu.
    device_build
    eval "$(cross_env)"
    case $target in aarch64-*) default_board=rpi4 ;; *) default_board=rpi4-32 ;; esac
    board=${BOARD:-$default_board}
    runner_var=CARGO_TARGET_${TARGET_ENV}_RUNNER
    host_bin=${HOST_BIN:-target/debug}
    tmp=$(mktemp -d)
    "$host_bin/neoc" compile models/bottle-classifier/model.onnx --target "$board" -o "$tmp/bottle.neo" 2>/dev/null
    "$host_bin/neoc" train sensor --normal models/pump-sensor/normal.csv --window 5 --stats mean,std --model pca -o "$tmp/pump.neo" 2>/dev/null
    sed -e "s|\"out/bottle-classifier.neo\"|\"$tmp/bottle.neo\"|" -e "s|\"out/pump.neo\"|\"$tmp/pump.neo\"|" \
        -e "s|\"models/|\"$PWD/models/|g" station.toml > "$tmp/station.toml"
    "$host_bin/neoc" bundle --board "$board" --config "$tmp/station.toml" \
        --daemon "$CARGO_TARGET_DIR/$target/release/neo-gateway" -o "$tmp/gateway-$board.tar"
    mkdir -p "$tmp/unpacked" "$tmp/root"
    tar xf "$tmp/gateway-$board.tar" -C "$tmp/unpacked"
    sh "$tmp/unpacked/opt/neo/install.sh" "$tmp/root"
    ${!runner_var} "$tmp/root/opt/neo/bin/neo-gateway" --version
    echo "bundle for $board: $(du -h "$tmp/gateway-$board.tar" | cut -f1), installed and started under qemu"
    rm -rf "$tmp"
    ;;
  *) echo "error: unknown mode '$mode' (setup|build|test|smoke|compare|bundle|env)" >&2; exit 2 ;;
esac
