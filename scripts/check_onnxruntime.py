#!/usr/bin/env python3
"""Checks compiled .neo artifacts against onnxruntime on exactly the same preprocessed input.

For each model: `neoc compile` it, `neo-run dump` the preprocessed input and the artifact's
outputs for each image, run onnxruntime on that input with the source ONNX model, and compare.
Fails (exit 1) if the max abs difference exceeds 1e-4 or a sanity image gets the wrong class.

Then, with ../shared/data, the int8 path: `neoc compile --quantize int8 --emit-qdq` on
mvtec_bottle calibration images; onnxruntime must load the QDQ export, give each sanity
image its class, and agree with the int8 artifact (cosine >= 0.95: the export quantizes
activations too, the artifact only weights).

  pip install onnxruntime numpy
  python3 scripts/check_onnxruntime.py [--bin target/release] [--data ../shared/data]

onnxruntime is used only here and in scripts/bench.py, never by the product.
"""
import argparse, json, os, subprocess, sys, tempfile
import numpy as np
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def models(data):
    sq = os.path.join(data, "models/squeezenet1.1")
    labels = os.path.join(sq, "squeeze-labels.txt")
    sanity = [(os.path.join(sq, "sanity/bald_eagle.jpeg"), 22), (os.path.join(sq, "sanity/pelican.jpeg"), 144)]
    samples = json.load(open(os.path.join(ROOT, "models/bottle-classifier/holdout.json")))["samples"]
    bottle_images = [(os.path.join(ROOT, "models/samples", f), ["good", "defect"].index(c)) for f, c in sorted(samples.items())]
    out = [("bottle-classifier", os.path.join(ROOT, "models/bottle-classifier/model.onnx"), [], "scores", bottle_images)]
    if os.path.isdir(data):
        out += [
            ("squeezenet1.1", os.path.join(sq, "squeezenet1.1_fp32_derived.onnx"),
             ["--card", os.path.join(ROOT, "models/cards/squeezenet1.1.toml"), "--labels", labels], "softmaxout_1", sanity),
            ("efficientnet-lite0", os.path.join(data, "models/efficientnet_lite0/efficientnet_lite0_derived.onnx"),
             ["--card", os.path.join(ROOT, "models/cards/efficientnet_lite0.toml"), "--labels", labels], "logits", sanity),
        ]
    else:
        print(f"note: {data} not found; checking the shipped model only")
    return out

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/debug"))
    ap.add_argument("--data", default=os.environ.get("NEO_DATA", os.path.join(ROOT, "../shared/data")))
    ap.add_argument("--tolerance", type=float, default=1e-4)
    a = ap.parse_args()
    neoc, neo_run = os.path.join(a.bin, "neoc"), os.path.join(a.bin, "neo-run")
    failures = 0
    print(f"{'model':<20} {'image':<30} {'class':>5} {'expected':>8} {'max abs diff':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, onnx_path, flags, output, images in models(a.data):
            art = os.path.join(tmp, name + ".neo")
            subprocess.run([neoc, "compile", onnx_path, "-t", "x86_64", "-o", art, *flags], check=True,
                           stderr=subprocess.DEVNULL)
            sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
            in_name = sess.get_inputs()[0].name
            for image, want in images:
                d = os.path.join(tmp, "dump")
                subprocess.run([neo_run, "dump", art, image, "-o", d], check=True)
                x = np.load(os.path.join(d, "input.npy"))
                ours = np.load(os.path.join(d, "output_0.npy"))
                ref = sess.run([output], {in_name: x})[0]
                diff = float(np.abs(ours.reshape(ref.shape) - ref).max())
                cls = int(ours.reshape(-1).argmax())
                ok = diff <= a.tolerance and cls == want
                failures += not ok
                print(f"{name:<20} {os.path.basename(image):<30} {cls:>5} {want:>8} {diff:>13.2e}{'' if ok else '  FAIL'}")
        if os.path.isdir(a.data):
            calib = os.path.join(a.data, "images/mvtec_bottle/train/good")
            print(f"\n{'int8 model':<20} {'image':<30} {'class':>5} {'ort qdq':>7} {'expected':>8} {'cosine':>8}")
            for name, onnx_path, flags, output, images in models(a.data):
                art = os.path.join(tmp, name + ".int8.neo")
                qdq = os.path.join(tmp, name + ".qdq.onnx")
                extra = ["--mixed-precision"] if name == "efficientnet-lite0" else []
                subprocess.run([neoc, "compile", onnx_path, "-t", "x86_64", "-o", art, *flags, "--quantize", "int8",
                                "--calibration", calib, "--max-images", "60", "--emit-qdq", qdq, *extra], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                sess = ort.InferenceSession(qdq, providers=["CPUExecutionProvider"])
                in_name = sess.get_inputs()[0].name
                for image, want in images:
                    d = os.path.join(tmp, "dump8")
                    subprocess.run([neo_run, "dump", art, image, "-o", d], check=True)
                    x = np.load(os.path.join(d, "input.npy"))
                    ours = np.load(os.path.join(d, "output_0.npy")).reshape(-1)
                    theirs = sess.run([output], {in_name: x})[0].reshape(-1)
                    cos = float(ours @ theirs / (np.linalg.norm(ours) * np.linalg.norm(theirs)))
                    cls, ort_cls = int(ours.argmax()), int(theirs.argmax())
                    ok = cls == want and ort_cls == want and cos >= 0.95
                    failures += not ok
                    print(f"{name:<20} {os.path.basename(image):<30} {cls:>5} {ort_cls:>7} {want:>8} {cos:>8.4f}{'' if ok else '  FAIL'}")
    print(f"{'all agree' if not failures else f'{failures} FAILED'} (tolerance {a.tolerance})")
    sys.exit(1 if failures else 0)

if __name__ == "__main__":
    main()
