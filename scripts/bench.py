#!/usr/bin/env python3
"""Benchmarks the artifact path (neo-run bench on a .neo) beside plain tract-onnx
(neoc baseline) and onnxruntime, on the same machine in the same run; prints a Markdown table
for docs/benchmarks.md and writes the raw figures as JSON.

  cargo build --release --bins
  pip install onnxruntime numpy
  python3 scripts/bench.py [--runs 50] [--data ../shared/data] [--json bench.json]
"""
import argparse, json, os, platform, subprocess, tempfile, time
import numpy as np
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, round(p / 100 * (len(v) - 1)))]

def ort_bench(onnx_path, x, runs, threads):
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    loads = []
    for _ in range(3):
        t = time.perf_counter()
        sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
        loads.append((time.perf_counter() - t) * 1e3)
    feed = {sess.get_inputs()[0].name: x}
    outs = [sess.get_outputs()[0].name]
    times = []
    for i in range(runs + 5):
        t = time.perf_counter()
        sess.run(outs, feed)
        if i >= 5:
            times.append((time.perf_counter() - t) * 1e3)
    return {"load_ms": {"p50": pct(loads, 50)}, "inference_ms": {"p50": pct(times, 50), "p99": pct(times, 99)}}

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release"))
    ap.add_argument("--data", default=os.environ.get("NEO_DATA", os.path.join(ROOT, "../shared/data")))
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--json")
    a = ap.parse_args()
    neoc, neo_run = os.path.join(a.bin, "neoc"), os.path.join(a.bin, "neo-run")
    sq = os.path.join(a.data, "models/squeezenet1.1")
    eagle = os.path.join(sq, "sanity/bald_eagle.jpeg")
    models = [("bottle-classifier", os.path.join(ROOT, "models/bottle-classifier/model.onnx"), [],
               os.path.join(ROOT, "models/samples/bottle_good_000.png"))]
    if os.path.isdir(a.data):
        models += [
            ("squeezenet1.1", os.path.join(sq, "squeezenet1.1_fp32_derived.onnx"),
             ["--card", os.path.join(ROOT, "models/cards/squeezenet1.1.toml")], eagle),
            ("efficientnet-lite0", os.path.join(a.data, "models/efficientnet_lite0/efficientnet_lite0_derived.onnx"),
             ["--card", os.path.join(ROOT, "models/cards/efficientnet_lite0.toml")], eagle),
        ]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, onnx_path, flags, image in models:
            art = os.path.join(tmp, name + ".neo")
            subprocess.run([neoc, "compile", onnx_path, "-t", "x86_64", "-o", art, *flags], check=True,
                           stderr=subprocess.DEVNULL)
            neo = json.loads(subprocess.run([neo_run, "bench", art, "--image", image, "--runs", str(a.runs), "--threads", "1"],
                                            check=True, capture_output=True, text=True).stdout)
            neo_mt = json.loads(subprocess.run([neo_run, "bench", art, "--image", image, "--runs", str(a.runs)],
                                               check=True, capture_output=True, text=True).stdout)
            base = json.loads(subprocess.run([neoc, "baseline", onnx_path, "--runs", str(a.runs)],
                                             check=True, capture_output=True, text=True).stdout)
            d = os.path.join(tmp, "dump")
            subprocess.run([neo_run, "dump", art, image, "-o", d], check=True)
            x = np.load(os.path.join(d, "input.npy"))
            r = {"model": name, "neo": neo, "neo_board_threads": neo_mt, "tract_onnx": base,
                 "onnxruntime_1_thread": ort_bench(onnx_path, x, a.runs, 1),
                 "onnxruntime_default_threads": ort_bench(onnx_path, x, a.runs, 0)}
            results.append(r)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    print(f"Machine: {cpu}, {os.cpu_count()} cores; onnxruntime {ort.__version__}; {a.runs} timed runs after 5 warm-up runs.\n")
    print("| model | runtime | load ms (p50) | inference ms p50 | inference ms p99 | preprocess ms p50 |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        n = r["neo"]
        print(f"| {r['model']} | neo artifact (tract NNEF, 1 thread) | {n['load_ms']['p50']:.1f} | {n['inference_ms']['p50']:.2f} | {n['inference_ms']['p99']:.2f} | {n['preprocess_ms']['p50']:.2f} |")
        n = r["neo_board_threads"]
        print(f"| {r['model']} | neo artifact (board threads: {n['threads']}) | {n['load_ms']['p50']:.1f} | {n['inference_ms']['p50']:.2f} | {n['inference_ms']['p99']:.2f} | {n['preprocess_ms']['p50']:.2f} |")
        b = r["tract_onnx"]
        print(f"| {r['model']} | tract-onnx from .onnx (1 thread) | {b['load_ms']['p50']:.1f} | {b['inference_ms']['p50']:.2f} | {b['inference_ms']['p99']:.2f} | |")
        for key, label in [("onnxruntime_1_thread", "onnxruntime, 1 thread"), ("onnxruntime_default_threads", "onnxruntime, default threads")]:
            o = r[key]
            print(f"| {r['model']} | {label} | {o['load_ms']['p50']:.1f} | {o['inference_ms']['p50']:.2f} | {o['inference_ms']['p99']:.2f} | |")
    if a.json:
        json.dump(results, open(a.json, "w"), indent=2)

if __name__ == "__main__":
    main()
