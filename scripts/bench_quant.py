#!/usr/bin/env python3
"""Issue 3's benchmark: neo f32 vs neo int8 (int8 weights; int8 compute) vs onnxruntime f32 vs onnxruntime int8
(quantize_static, same calibration images), side by side in one run, on SqueezeNet 1.1 and
EfficientNet-Lite0; also onnxruntime running neoc's own QDQ export (--emit-qdq). Prints a
Markdown table for docs/benchmarks.md and writes the raw figures as JSON.

  cargo build --release -p neoc -p neo-runtime --bins
  pip install onnxruntime onnx numpy
  python3 scripts/bench_quant.py [--runs 50] [--data ../shared/data] [--json out.json]

Calibration: ../shared/data/images/mvtec_bottle/train/good (neoc holds 20 % out for its
gate). Agreement is measured on images neither saw: mvtec_bottle/test/* (83 images), each
preprocessed once by neo (`neo-run dump`) so every runtime gets the same input tensor.
"""
import argparse, json, os, platform, subprocess, sys, tempfile, time
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import pct  # noqa: E402  (the same percentile as the f32 benchmark)


def ort_child(model, npy, runs, threads):
    """Runs in a child process so its peak RSS is its own."""
    import onnxruntime as ort
    x = np.load(npy)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    t = time.perf_counter()
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    load = (time.perf_counter() - t) * 1e3
    feed = {sess.get_inputs()[0].name: x}
    times = []
    for i in range(runs + 5):
        t = time.perf_counter()
        sess.run(None, feed)
        if i >= 5:
            times.append((time.perf_counter() - t) * 1e3)
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({"load_ms": load, "p50": pct(times, 50), "p99": pct(times, 99),
                      "peak_rss_mib": hwm / 1024}))


def run_json(cmd):
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def dump(neo_run, art, folders, out):
    """Preprocessed inputs and raw outputs of every image in `folders`, by image."""
    res = {}
    for f in folders:
        d = os.path.join(out, os.path.basename(f))
        subprocess.run([neo_run, "dump", art, f, "-o", d], check=True)
        for stem in sorted(os.listdir(d)):  # one folder per image file
            res[f"{os.path.basename(f)}/{stem}"] = (
                np.load(os.path.join(d, stem, "input.npy")),
                np.load(os.path.join(d, stem, "output_0.npy")).ravel())
    return res


def agreement(ref, got):
    top1 = np.mean([ref[k].argmax() == got[k].argmax() for k in ref])
    cos = [float(ref[k] @ got[k] / (np.linalg.norm(ref[k]) * np.linalg.norm(got[k]))) for k in ref]
    diff = max(float(np.abs(ref[k] - got[k]).max()) for k in ref)
    return {"top1_agreement": float(top1), "cosine_mean": float(np.mean(cos)),
            "cosine_min": float(np.min(cos)), "max_abs_diff": diff}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--ort-child":
        return ort_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static, CalibrationMethod)
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release"))
    ap.add_argument("--data", default=os.environ.get("NEO_DATA", os.path.join(ROOT, "../shared/data")))
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args()
    neoc, neo_run = os.path.join(a.bin, "neoc"), os.path.join(a.bin, "neo-run")
    calib = os.path.join(a.data, "images/mvtec_bottle/train/good")
    test_root = os.path.join(a.data, "images/mvtec_bottle/test")
    tests = [os.path.join(test_root, d) for d in sorted(os.listdir(test_root))]
    image = os.path.join(a.data, "models/squeezenet1.1/sanity/bald_eagle.jpeg")
    models = [
        ("squeezenet1.1", os.path.join(a.data, "models/squeezenet1.1/squeezenet1.1_fp32_derived.onnx"),
         os.path.join(ROOT, "models/cards/squeezenet1.1.toml"), []),
        ("efficientnet-lite0", os.path.join(a.data, "models/efficientnet_lite0/efficientnet_lite0_derived.onnx"),
         os.path.join(ROOT, "models/cards/efficientnet_lite0.toml"), ["--mixed-precision"]),
    ]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, onnx_path, card, qflags in models:
            f32 = os.path.join(tmp, name + ".neo")
            i8 = os.path.join(tmp, name + ".int8.neo")
            c8 = os.path.join(tmp, name + ".int8-compute.neo")
            qdq = os.path.join(tmp, name + ".neoc-qdq.onnx")
            subprocess.run([neoc, "compile", onnx_path, "--card", card, "-t", "x86_64", "-o", f32],
                           check=True, stderr=subprocess.DEVNULL)
            t = time.perf_counter()
            gate = subprocess.run([neoc, "compile", onnx_path, "--card", card, "-t", "x86_64", "-o", i8,
                                   "--quantize", "int8", "--calibration", calib, "--emit-qdq", qdq, *qflags],
                                  check=True, capture_output=True, text=True).stdout
            compile_s = time.perf_counter() - t
            # The int8-compute scheme (what boards with int8_compute get), same calibration.
            gate_c8 = subprocess.run([neoc, "compile", onnx_path, "--card", card, "-t", "x86_64", "-o", c8,
                                      "--quantize", "int8", "--calibration", calib, "--scheme", "int8-compute",
                                      *qflags], check=True, capture_output=True, text=True).stdout
            report = json.loads(subprocess.run([neo_run, "verify", i8], check=True, capture_output=True,
                                               text=True).stdout)["quantization"]
            # Same preprocessed inputs for everyone.
            ref = dump(neo_run, f32, tests, os.path.join(tmp, name + "-f32"))
            got = dump(neo_run, i8, tests, os.path.join(tmp, name + "-int8"))
            got_c8 = dump(neo_run, c8, tests, os.path.join(tmp, name + "-int8-compute"))
            cal = dump(neo_run, f32, [calib], os.path.join(tmp, name + "-cal"))
            inputs = {k: v[0] for k, v in ref.items()}
            ref_out = {k: v[1] for k, v in ref.items()}
            # onnxruntime int8: quantize_static on the same calibration images (its defaults:
            # QDQ, per-channel int8 weights, uint8 activations, minmax).
            sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
            in_name = sess.get_inputs()[0].name

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.it = iter([{in_name: v[0]} for v in cal.values()])

                def get_next(self):
                    return next(self.it, None)

            ort_i8 = os.path.join(tmp, name + ".ort-int8.onnx")
            pre = onnx_path
            import onnx
            m = onnx.load(onnx_path)
            if next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) < 13:
                # quantize_static mishandles old opsets (it lifts SqueezeNet's 7 to 11 but
                # writes per-axis DequantizeLinear, an opset-13 feature): convert first.
                from onnx import version_converter
                pre = os.path.join(tmp, name + ".opset13.onnx")
                onnx.save(version_converter.convert_version(m, 13), pre)
            src = pre
            try:
                from onnxruntime.quantization.shape_inference import quant_pre_process
                src = pre
                pre = os.path.join(tmp, name + ".pre.onnx")
                quant_pre_process(src, pre)
            except Exception as e:  # older opsets: quantize the model as it is
                print(f"note: quant_pre_process skipped for {name}: {e}", file=sys.stderr)
                pre = src
            quantize_static(pre, ort_i8, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)

            def ort_outputs(path):
                s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
                n = s.get_inputs()[0].name
                return {k: s.run(None, {n: x})[0].ravel() for k, x in inputs.items()}

            x_path = os.path.join(tmp, "x.npy")
            np.save(x_path, next(iter(inputs.values())))
            row = {"model": name, "compile_int8_s": compile_s, "gate": gate, "gate_int8_compute": gate_c8,
                   "quantization": report,
                   "sizes": {"neo_f32": os.path.getsize(f32), "neo_int8": os.path.getsize(i8),
                             "neo_int8_compute": os.path.getsize(c8),
                             "onnx_f32": os.path.getsize(onnx_path), "ort_int8": os.path.getsize(ort_i8),
                             "neoc_qdq": os.path.getsize(qdq)},
                   "agreement": {"neo_int8": agreement(ref_out, {k: v[1] for k, v in got.items()}),
                                 "neo_int8_compute": agreement(ref_out, {k: v[1] for k, v in got_c8.items()}),
                                 "ort_f32": agreement(ref_out, ort_outputs(onnx_path)),
                                 "ort_int8": agreement(ref_out, ort_outputs(ort_i8)),
                                 "ort_on_neoc_qdq": agreement(ref_out, ort_outputs(qdq))},
                   "speed": {}}
            for key, art in [("neo_f32", f32), ("neo_int8", i8), ("neo_int8_compute", c8)]:
                b = run_json([neo_run, "bench", art, "--image", image, "--runs", str(a.runs),
                              "--threads", str(a.threads), "--loads", "1"])
                row["speed"][key] = {"load_ms": b["load_ms"]["p50"], "p50": b["inference_ms"]["p50"],
                                     "p99": b["inference_ms"]["p99"], "peak_rss_mib": b["peak_rss_mib"]}
            for key, path in [("ort_f32", onnx_path), ("ort_int8", ort_i8), ("ort_on_neoc_qdq", qdq)]:
                row["speed"][key] = run_json([sys.executable, __file__, "--ort-child", path, x_path,
                                              str(a.runs), str(a.threads)])
            results.append(row)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    print(f"Machine: {cpu}, {os.cpu_count()} cores; onnxruntime {ort.__version__}; {a.threads} thread(s); "
          f"{a.runs} timed runs after 5 warm-up runs; agreement on {len(ref)} mvtec_bottle test images.\n")
    labels = {"neo_f32": "neo f32", "neo_int8": "neo int8 (int8 weights, f32 compute)",
              "neo_int8_compute": "neo int8 compute (neo_q8_conv)",
              "ort_f32": "onnxruntime f32", "ort_int8": "onnxruntime int8 (quantize_static QDQ)",
              "ort_on_neoc_qdq": "onnxruntime on neoc's QDQ export"}
    size_key = {"neo_f32": "neo_f32", "neo_int8": "neo_int8", "neo_int8_compute": "neo_int8_compute",
                "ort_f32": "onnx_f32", "ort_int8": "ort_int8",
                "ort_on_neoc_qdq": "neoc_qdq"}
    print("| model | runtime | file MiB | load ms | p50 ms | p99 ms | peak RSS MiB | top-1 agr. vs neo f32 | cosine mean / min |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        for key in ["neo_f32", "neo_int8", "neo_int8_compute", "ort_f32", "ort_int8", "ort_on_neoc_qdq"]:
            s = r["speed"][key]
            g = r["agreement"].get(key)
            agr = f"{g['top1_agreement'] * 100:.1f} %" if g else "(reference)"
            cos = f"{g['cosine_mean']:.4f} / {g['cosine_min']:.4f}" if g else ""
            print(f"| {r['model']} | {labels[key]} | {r['sizes'][size_key[key]] / 2**20:.2f} | {s['load_ms']:.1f} | "
                  f"{s['p50']:.2f} | {s['p99']:.2f} | {s['peak_rss_mib']:.0f} | {agr} | {cos} |")
    for r in results:
        print(f"\n{r['model']}: compile --quantize int8 {r['compile_int8_s']:.1f} s; "
              f"{r['quantization']['int8_layers']} int8 layers, f32: {r['quantization']['f32_layers']}\n{r['gate']}"
              f"\nint8 compute:\n{r['gate_int8_compute']}")
    if a.json:
        json.dump(results, open(a.json, "w"), indent=2, default=str)


if __name__ == "__main__":
    main()
