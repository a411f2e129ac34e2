#!/usr/bin/env python3
"""Builds models/bottle-classifier: EfficientNet-Lite0 stages 1-4 (ImageNet weights,
Apache-2.0) as a frozen backbone, plus a logistic-regression head on pooled stage4 features,
trained on MVTec AD "bottle" (good vs defective). Also copies held-out sample images.

Reproduce:  pip install onnx onnxruntime numpy pillow
            python3 models/tools/make_bottle_classifier.py [SHARED_DATA_DIR]
(SHARED_DATA_DIR defaults to $NEO_DATA or ../shared/data.)
"""
import glob, json, os, sys
import numpy as np
import onnx
from onnx import helper, numpy_helper, TensorProto
import onnxruntime as ort
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("NEO_DATA", os.path.join(ROOT, "..", "shared", "data"))
SRC = os.path.join(DATA, "models/efficientnet_lite0/efficientnet_lite0_derived.onnx")
IMAGES = os.path.join(DATA, "images/mvtec_bottle")
OUT = os.path.join(ROOT, "models/bottle-classifier")
SAMPLES = os.path.join(ROOT, "models/samples")

# 1. Backbone: the sub-graph from `input` to `stage4`.
backbone_path = "/tmp/neo_bottle_backbone.onnx"
onnx.utils.extract_model(SRC, backbone_path, ["input"], ["stage4"])
sess = ort.InferenceSession(backbone_path)

def preprocess(path):
    im = Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR)
    return ((np.asarray(im, dtype=np.float32) - 127.0) / 128.0).transpose(2, 0, 1)[None]

def features(path):
    s4 = sess.run(["stage4"], {"input": preprocess(path)})[0][0]
    return np.concatenate([s4.mean((1, 2)), s4.max((1, 2))])

paths = sorted(glob.glob(os.path.join(IMAGES, "*/*/*.png")))
meta = [(p, p.split(os.sep)[-3], p.split(os.sep)[-2]) for p in paths]
X = np.stack([features(p) for p, _, _ in meta])
y = np.array([0 if cls == "good" else 1 for _, _, cls in meta])
test = np.array([i for i, (_, split, _) in enumerate(meta) if split == "test"])
hold = test[::3]  # every third test image is held out, never trained on
train = np.setdiff1d(np.arange(len(meta)), hold)

# 2. Class-balanced, L2-regularized logistic regression on standardized features.
mu, sd = X[train].mean(0), X[train].std(0) + 1e-6
Z = (X[train] - mu) / sd
w, b = np.zeros(Z.shape[1]), 0.0
cw = np.where(y[train] == 1, (y[train] == 0).sum() / (y[train] == 1).sum(), 1.0)
for _ in range(3000):
    p = 1 / (1 + np.exp(-(Z @ w + b)))
    g = (p - y[train]) * cw
    w -= 0.1 * (Z.T @ g / len(g) + 1e-2 * w)
    b -= 0.1 * g.mean()
zh = ((X[hold] - mu) / sd) @ w + b
acc = float(((zh > 0) == y[hold]).mean())
print(f"held-out accuracy {acc:.3f} on {len(hold)} images ({int(y[hold].sum())} defective)")

# 3. Head in ONNX: logits = [-z/2, z/2] so that softmax gives p(defect) = sigmoid(z).
W1 = w / sd                              # fold standardization into the weights
b1 = b - float((w * mu / sd).sum())
gemm_w = np.stack([-W1 / 2, W1 / 2]).astype(np.float32)   # [2, 160]
gemm_b = np.array([-b1 / 2, b1 / 2], dtype=np.float32)
m = onnx.load(backbone_path)
g = m.graph
g.node.extend([
    helper.make_node("GlobalAveragePool", ["stage4"], ["head/avg"], name="head/avg"),
    helper.make_node("GlobalMaxPool", ["stage4"], ["head/max"], name="head/max"),
    helper.make_node("Concat", ["head/avg", "head/max"], ["head/pooled"], axis=1, name="head/concat"),
    helper.make_node("Flatten", ["head/pooled"], ["head/flat"], axis=1, name="head/flatten"),
    helper.make_node("Gemm", ["head/flat", "head/W", "head/B"], ["head/logits"], transB=1, name="head/gemm"),
    helper.make_node("Softmax", ["head/logits"], ["scores"], axis=1, name="head/softmax"),
])
g.initializer.extend([numpy_helper.from_array(gemm_w, "head/W"), numpy_helper.from_array(gemm_b, "head/B")])
del g.output[:]
g.output.extend([helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 2])])
g.name = "bottle_classifier"
m.producer_name = "neo models/tools/make_bottle_classifier.py"
onnx.checker.check_model(m)
os.makedirs(OUT, exist_ok=True)
onnx.save(m, os.path.join(OUT, "model.onnx"))

# 4. Check the saved model end to end against the numpy head.
full = ort.InferenceSession(os.path.join(OUT, "model.onnx"))
for i in hold[:5]:
    p_onnx = full.run(["scores"], {"input": preprocess(meta[i][0])})[0][0, 1]
    p_np = 1 / (1 + np.exp(-(((X[i] - mu) / sd) @ w + b)))
    assert abs(p_onnx - p_np) < 1e-4, (p_onnx, p_np)

# 5. Held-out sample images (never trained on), as small JPEGs.
os.makedirs(SAMPLES, exist_ok=True)
chosen = {}
for i in hold:
    cls = meta[i][2]
    if len([k for k in chosen if k.startswith(cls)]) < (2 if cls == "good" else 1):
        chosen[f"{cls}_{os.path.basename(meta[i][0])[:-4]}"] = i
expected = {}
for name, i in sorted(chosen.items()):
    Image.open(meta[i][0]).convert("RGB").save(os.path.join(SAMPLES, f"bottle_{name}.png"), optimize=True)
    expected[f"bottle_{name}.png"] = "good" if y[i] == 0 else "defect"
with open(os.path.join(OUT, "holdout.json"), "w") as f:
    json.dump({"held_out_images": len(hold), "held_out_defective": int(y[hold].sum()),
               "held_out_accuracy": round(acc, 4), "samples": expected}, f, indent=2)
print(json.dumps(expected, indent=2))
