#!/usr/bin/env python3
"""Writes the tiny ONNX fixtures the bad-input tests use (models/fixtures/). Deterministic.

  python3 models/tools/make_fixtures.py
"""
import os
import numpy as np
import onnx
from onnx import helper, numpy_helper, TensorProto

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
os.makedirs(OUT, exist_ok=True)
rng = np.random.default_rng(7)

def conv_model(name, input_shape, extra_nodes=(), out="y"):
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["y" if not extra_nodes else "f"], name="flatten"),
        *extra_nodes,
    ]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        [w],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="neo fixtures")
    m.ir_version = 8
    onnx.save(m, os.path.join(OUT, f"{name}.onnx"))

# Height and width are symbolic: compiling needs --input-shape.
conv_model("dynamic_hw", [1, 3, "H", "W"])
# A fixed-shape model that is fine (for the happy path of small tests).
conv_model("tiny_conv", [1, 3, 8, 8])
# A real ONNX operator that tract does not implement.
conv_model("unsupported_op", [1, 3, 8, 8],
           [helper.make_node("Det", ["f"], ["y"], name="determinant_of_features")])

# No layer with weights to quantize (for `--quantize` refusing it).
graph = helper.make_graph(
    [helper.make_node("Relu", ["x"], ["r"], name="relu"),
     helper.make_node("GlobalAveragePool", ["r"], ["y"], name="gap")],
    "no_weights",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
)
m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="neo fixtures")
m.ir_version = 8
onnx.save(m, os.path.join(OUT, "no_weights.onnx"))

# Two convolutions; the second has, in every output channel, a huge weight on an input channel
# the first one never lets through (a dead ReLU). f32 does not care; int8 per-channel scales
# grow with that weight and crush the others: the layer mixed precision must keep in f32.
w_a = (0.01 * rng.standard_normal((8, 3, 3, 3))).astype(np.float32)
b_a = np.zeros(8, np.float32)
b_a[6:] = -1e4
w_b = rng.standard_normal((8, 8, 1, 1)).astype(np.float32)
w_b[:, 6] = 1000.0
graph = helper.make_graph(
    [helper.make_node("Conv", ["x", "w_a", "b_a"], ["a"], pads=[1, 1, 1, 1], name="conv_a"),
     helper.make_node("Relu", ["a"], ["r"], name="relu"),
     helper.make_node("Conv", ["r", "w_b"], ["y"], name="conv_b")],
    "outlier_weights",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    [numpy_helper.from_array(w_a, "w_a"), numpy_helper.from_array(b_a, "b_a"),
     numpy_helper.from_array(w_b, "w_b")],
)
m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="neo fixtures")
m.ir_version = 8
onnx.save(m, os.path.join(OUT, "outlier_weights.onnx"))
# A classifier whose every run is deliberately slow (no weights: an 8x8 frame tiled into a
# 2048 x 1536 matrix, then eight 2048^3 matrix products, about 150 GFLOP): the station's
# watchdog tests need a stage that stalls.
scale = numpy_helper.from_array(np.array(1.0 / 2048, np.float32), "scale")
repeats = numpy_helper.from_array(np.array([2048, 8], np.int64), "repeats")
flat_shape = numpy_helper.from_array(np.array([1, 192], np.int64), "flat_shape")
nodes = [
    helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
    helper.make_node("Tile", ["flat", "repeats"], ["a"]),
    helper.make_node("Transpose", ["a"], ["at"], perm=[1, 0]),
    helper.make_node("MatMul", ["a", "at"], ["m0r"]),
    helper.make_node("Mul", ["m0r", "scale"], ["m0"]),
]
prev = "m0"
for i in range(1, 9):
    nodes += [
        helper.make_node("MatMul", [prev, prev], [f"m{i}r"]),
        helper.make_node("Mul", [f"m{i}r", "scale"], [f"m{i}"]),
    ]
    prev = f"m{i}"
nodes += [
    helper.make_node("ReduceMean", [prev], ["mean"], axes=[0, 1], keepdims=1),
    helper.make_node("Neg", ["mean"], ["neg"]),
    helper.make_node("Concat", ["mean", "neg"], ["y"], axis=1),
]
graph = helper.make_graph(
    nodes, "slow_matmul",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    [scale, repeats, flat_shape],
)
m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="neo fixtures")
m.ir_version = 8
onnx.save(m, os.path.join(OUT, "slow_matmul.onnx"))

print(sorted(os.listdir(OUT)))
