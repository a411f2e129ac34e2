//! `--emit-qdq FILE`: the calibrated model as standard QDQ ONNX (QuantizeLinear /
//! DequantizeLinear pairs), so the same calibration serves onnxruntime, TensorRT or any
//! QDQ-aware runtime. Weights of convolutions and matrix products: int8, symmetric, per output
//! channel. The activations they read: int8, symmetric, per tensor (what TensorRT requires),
//! with the threshold the calibration method chose. Layers kept in f32 by mixed precision stay
//! f32 here too.
//!
//! Per-channel DequantizeLinear needs opset 13. Older models are lifted to 13 when every
//! operator they use means the same there (Dropout, an inference no-op, is removed; Softmax
//! gets its axis spelled out where that keeps its meaning); otherwise the export is refused
//! with the operator that blocks it.

use super::calib::{self, Method};
use crate::error::{tract, CompileError, Result};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
};
use tract_onnx::prelude::*;

/// A file written for the user that goes away again if the compile fails later (nothing
/// half-done is left behind): removed on drop unless [`Written::keep`] is called.
#[derive(Debug)]
pub struct Written(Option<PathBuf>);

impl Written {
    pub fn new(path: &std::path::Path) -> Self {
        Written(Some(path.to_path_buf()))
    }

    /// The compile succeeded: the file stays.
    pub fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Written {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// What the export wrote.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QdqSummary {
    pub path: String,
    /// Whose conventions the Q/DQ placement follows ("tensorrt" or "onnxruntime").
    #[serde(default)]
    pub style: String,
    pub quantized_layers: usize,
    pub quantized_activations: usize,
    /// The model's opset, and the one written.
    pub opset_from: i64,
    pub opset: i64,
    /// The export run by tract-onnx (Q/DQ executed as written: int8 activations included)
    /// against the f32 model on the held-out images: what int8 compute would give.
    #[serde(default)]
    pub accuracy: Vec<super::gate::OutputAgreement>,
}

/// Whose conventions the exported Q/DQ placement follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QdqStyle {
    /// int8 activations, symmetric (zero point 0: TensorRT refuses others), quantized where
    /// the layers read them; a layer's output read only by an activation function is left to
    /// the fused pair.
    TensorRt,
    /// uint8 activations, asymmetric (non-negative tensors use 0..255 over 0..threshold), and
    /// every layer's output quantized after its activation function, so onnxruntime fuses each
    /// DQ → Conv → (Relu) → Q group into QLinearConv (its x86 kernels take uint8 activations).
    OnnxRuntime,
}

impl QdqStyle {
    /// TensorRT's conventions for boards with a GPU (Jetson), onnxruntime's elsewhere.
    pub fn for_board(board: &neo_boards::BoardProfile) -> QdqStyle {
        if board.gpu.is_some() {
            QdqStyle::TensorRt
        } else {
            QdqStyle::OnnxRuntime
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QdqStyle::TensorRt => "tensorrt",
            QdqStyle::OnnxRuntime => "onnxruntime",
        }
    }
}

fn err(msg: String) -> CompileError {
    CompileError::Quantize(format!("--emit-qdq: {msg}"))
}

fn default_opset(proto: &ModelProto) -> i64 {
    proto
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(1, |o| o.version)
}

fn attr_i(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

fn int_attr(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

/// How tract names the node an ONNX node becomes: its name, or its first output's when it
/// has none.
fn node_key(n: &NodeProto) -> &str {
    if n.name.is_empty() {
        n.output.first().map_or("", String::as_str)
    } else {
        &n.name
    }
}

fn float_values(t: &TensorProto) -> Result<Vec<f32>> {
    if t.data_location == Some(1) {
        return Err(err(format!(
            "initializer '{}' lives in external data, which the export does not handle",
            t.name
        )));
    }
    if !t.float_data.is_empty() {
        return Ok(t.float_data.clone());
    }
    if !t.raw_data.len().is_multiple_of(4) {
        return Err(err(format!("initializer '{}' has a broken size", t.name)));
    }
    Ok(t.raw_data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn tensor(name: String, dt: DataType, dims: Vec<i64>, raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name,
        data_type: dt as i32,
        dims,
        raw_data: raw,
        ..Default::default()
    }
}

fn node(op: &str, name: String, inputs: Vec<String>, outputs: Vec<String>) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name,
        input: inputs,
        output: outputs,
        ..Default::default()
    }
}

/// Lifts a graph of opset < 13 to 13 where that keeps its meaning.
fn lift_to_13(graph: &mut GraphProto, typed: &TypedModel, from: i64) -> Result<()> {
    const SAME: &[&str] = &[
        "Conv",
        "Relu",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "Concat",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Gemm",
        "MatMul",
        "Flatten",
        "Identity",
        "Sigmoid",
        "Tanh",
    ];
    // Dropout is the identity at inference: drop it, rewiring its readers.
    let mut rename: HashMap<String, String> = HashMap::new();
    let outputs: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    let mut kept = Vec::new();
    for mut n in std::mem::take(&mut graph.node) {
        for i in n.input.iter_mut() {
            if let Some(r) = rename.get(i) {
                *i = r.clone();
            }
        }
        match n.op_type.as_str() {
            "Dropout" if n.domain.is_empty() => {
                if outputs.contains(&n.output[0]) {
                    n.op_type = "Identity".into();
                    n.input.truncate(1);
                    n.output.truncate(1);
                    n.attribute.clear();
                    kept.push(n);
                } else {
                    rename.insert(n.output[0].clone(), n.input[0].clone());
                }
            }
            "Softmax" | "LogSoftmax" if n.domain.is_empty() => {
                // Before 13: flatten to 2-D at `axis` (default 1); from 13: one axis. The same
                // when every dimension after `axis` is 1.
                let axis = attr_i(&n, "axis").unwrap_or(1);
                let node = typed.nodes().iter().find(|t| t.name == node_key(&n));
                let shape = node
                    .and_then(|t| typed.outlet_fact(OutletId::new(t.id, 0)).ok())
                    .and_then(|f| f.shape.as_concrete().map(|s| s.to_vec()));
                let Some(shape) = shape else {
                    return Err(err(format!(
                        "cannot lift {} '{}' from opset {from} to 13 without its shape; \
                         re-export the model with opset 13",
                        n.op_type, n.name
                    )));
                };
                let a = if axis < 0 {
                    axis + shape.len() as i64
                } else {
                    axis
                } as usize;
                if shape
                    .get(a + 1..)
                    .is_some_and(|rest| rest.iter().all(|d| *d == 1))
                {
                    n.attribute.retain(|x| x.name != "axis");
                    n.attribute.push(int_attr("axis", a as i64));
                    kept.push(n);
                } else {
                    return Err(err(format!(
                        "{} '{}' of shape {shape:?} means something else in opset 13; \
                         re-export the model with opset 13",
                        n.op_type, n.name
                    )));
                }
            }
            op if n.domain.is_empty() && SAME.contains(&op) => kept.push(n),
            op => {
                return Err(err(format!(
                    "the model is opset {from}; per-channel QDQ needs 13 and operator '{op}' \
                     (node '{}') may mean something else there: re-export the model with \
                     opset 13",
                    n.name
                )))
            }
        }
    }
    graph.node = kept;
    Ok(())
}

/// What the export keeps from the quantization it follows.
pub struct ExportPlan<'a> {
    /// How activation ranges are chosen (the calibration's method).
    pub method: Method,
    pub style: QdqStyle,
    /// Layers left in f32 (tract node names; an ONNX node is kept f32 when one of them is its
    /// name or starts with its name and a dot).
    pub f32_layers: &'a [String],
    /// Bias corrections by layer (see [`super::Quantized::bias_shifts`]).
    pub bias_shifts: &'a [(String, Vec<f32>, Tensor)],
}

/// Writes the QDQ model for `proto` (the source ONNX; `model` is it parsed with the input
/// shape fixed), calibrated on `images`, to `path`.
pub fn export(
    proto: &ModelProto,
    model: &InferenceModel,
    images: &[(PathBuf, Tensor)],
    plan: &ExportPlan,
    path: &std::path::Path,
) -> Result<QdqSummary> {
    let ExportPlan {
        method,
        style,
        f32_layers,
        bias_shifts,
    } = *plan;
    let mut proto = proto.clone();
    let from = default_opset(&proto);
    let mut graph = proto
        .graph
        .take()
        .ok_or_else(|| err("the model has no graph".into()))?;
    if from < 7 {
        return Err(err(format!(
            "the model is opset {from}: its Add/Mul/Gemm broadcasting rules predate opset 7; \
             re-export the model with opset 13"
        )));
    }
    if from < 13 {
        // Shapes (for Softmax's axis), typed only when there is something to lift.
        let typed = model
            .clone()
            .into_typed()
            .map_err(tract("type the graph for the export"))?;
        lift_to_13(&mut graph, &typed, from)?;
    }

    let init: HashMap<String, usize> = graph
        .initializer
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    let kept_f32 = |name: &str| {
        f32_layers
            .iter()
            .any(|l| l == name || l.strip_prefix(name).is_some_and(|r| r.starts_with('.')))
    };
    // Layers: (node index, weight initializer, per-channel axis).
    let mut layers = Vec::new();
    for (ix, n) in graph.node.iter().enumerate() {
        if !n.domain.is_empty() || n.input.len() < 2 || kept_f32(node_key(n)) {
            continue;
        }
        let Some(&w) = init.get(&n.input[1]) else {
            continue;
        };
        let t = &graph.initializer[w];
        if t.data_type != DataType::Float as i32 || t.dims.iter().product::<i64>() < 64 {
            continue;
        }
        let axis = match n.op_type.as_str() {
            "Conv" => 0,
            "Gemm" if attr_i(n, "transB").unwrap_or(0) == 1 => 0,
            "Gemm" => 1,
            "MatMul" if t.dims.len() == 2 => 1,
            _ => continue,
        };
        layers.push((ix, w, axis));
    }
    if layers.is_empty() {
        return Err(err(
            "no convolution or matrix product with a constant weight".into(),
        ));
    }

    // The tensors int8 compute keeps in int8: what each layer reads and what it writes
    // (graph outputs stay f32, under their names). Thresholds measured on the ONNX tensors.
    // An output read only by an activation function (Relu, Clip, …) is not quantized
    // itself: runtimes fuse the pair and quantize the activation's output, whose range is the
    // useful one (int8 steps over a pre-ReLU6 range of ±50 would leave 15 levels for 0..6).
    let graph_outputs: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    let readers = |t: &str| -> Vec<&NodeProto> {
        graph
            .node
            .iter()
            .filter(|n| n.input.iter().any(|i| i == t))
            .collect()
    };
    let layer_outputs: HashSet<&str> = layers
        .iter()
        .map(|(ix, _, _)| graph.node[*ix].output[0].as_str())
        .collect();
    let mut act_names: Vec<String> = Vec::new();
    for (ix, _, _) in &layers {
        let n = &graph.node[*ix];
        let out = &n.output[0];
        let fused = readers(out).iter().all(|r| {
            matches!(
                r.op_type.as_str(),
                "Relu" | "Clip" | "Sigmoid" | "LeakyRelu" | "HardSigmoid"
            )
        }) && !readers(out).is_empty();
        let mut tensors = vec![&n.input[0]];
        if !fused {
            tensors.push(out);
        } else if style == QdqStyle::OnnxRuntime {
            // onnxruntime fuses Conv → Relu → Q (the Relu folded into the uint8 range) when
            // the activation's output goes on to quantized compute (another layer, or a
            // Concat / MaxPool in front of one). The last layers' outputs (class scores
            // before pooling) stay f32: a per-tensor range from the calibration images would
            // clip classes those images never show.
            tensors.extend(readers(out).iter().map(|r| &r.output[0]).filter(|t| {
                readers(t).iter().any(|c| {
                    layer_outputs.contains(c.output[0].as_str())
                        || matches!(c.op_type.as_str(), "Concat" | "MaxPool")
                })
            }));
        }
        for t in tensors {
            if !act_names.contains(t) && !graph_outputs.contains(t) {
                act_names.push(t.clone());
            }
        }
    }
    let mut probe = model.clone();
    probe
        .select_outputs_by_name(&act_names)
        .map_err(tract("expose the activations for the export"))?;
    let probe = probe
        .into_typed()
        .map_err(tract("type the calibration graph"))?
        .into_decluttered()
        .map_err(tract("declutter the calibration graph"))?;
    let outlets = probe.outputs.clone();
    let ranges = calib::activation_ranges(&probe, &outlets, images, method)?;

    let mut new_inits = Vec::new();
    // New nodes to place after node i (usize::MAX: before everything, for graph inputs).
    let mut after: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut act_scale: HashMap<String, f32> = HashMap::new();
    let mut rewired: HashMap<String, String> = HashMap::new();
    for (k, name) in act_names.iter().enumerate() {
        let producer = graph
            .node
            .iter()
            .position(|n| n.output.iter().any(|o| o == name))
            .unwrap_or(usize::MAX);
        let r = &ranges[k];
        // (scale, zero point as stored, zero point's type)
        let (scale, zero, zero_type) = match style {
            QdqStyle::TensorRt => (r.threshold / 127.0, 0u8, DataType::Int8),
            QdqStyle::OnnxRuntime if r.min >= 0.0 => (r.threshold / 255.0, 0u8, DataType::Uint8),
            QdqStyle::OnnxRuntime => (r.threshold / 127.5, 128u8, DataType::Uint8),
        };
        let scale = scale.max(f32::MIN_POSITIVE);
        let (s, z, q, dq) = (
            format!("{name}_act_scale"),
            format!("{name}_act_zero_point"),
            format!("{name}_quantized"),
            format!("{name}_dequantized"),
        );
        new_inits.push(tensor(
            s.clone(),
            DataType::Float,
            vec![],
            scale.to_le_bytes().to_vec(),
        ));
        new_inits.push(tensor(z.clone(), zero_type, vec![], vec![zero]));
        after.entry(producer).or_default().extend([
            node(
                "QuantizeLinear",
                format!("{name}_QuantizeLinear"),
                vec![name.clone(), s.clone(), z.clone()],
                vec![q.clone()],
            ),
            node(
                "DequantizeLinear",
                format!("{name}_DequantizeLinear"),
                vec![q, s, z],
                vec![dq.clone()],
            ),
        ]);
        act_scale.insert(name.clone(), scale);
        rewired.insert(name.clone(), dq);
    }
    // Every reader of a quantized tensor reads its dequantized twin.
    for n in graph.node.iter_mut() {
        for i in n.input.iter_mut() {
            if let Some(dq) = rewired.get(i) {
                *i = dq.clone();
            }
        }
    }
    let mut before: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut replaced_weights = HashSet::new();
    // Same values, in whatever layout tract keeps them (a 1x1 convolution becomes a
    // transposed matrix product): same count, same sums. A BatchNorm scale tract folded into
    // its copy would change them.
    let sums = |t: &Tensor| {
        t.to_plain_array_view::<f32>().ok().map(|v| {
            v.iter().fold((0f64, 0f64), |(a, q), x| {
                (a + x.abs() as f64, q + (*x as f64) * (*x as f64))
            })
        })
    };
    let same = |a: &Tensor, b: &Tensor| match (sums(a), sums(b)) {
        (Some((a1, a2)), Some((b1, b2))) => {
            a.len() == b.len()
                && (a1 - b1).abs() <= 1e-9 * a1.max(b1)
                && (a2 - b2).abs() <= 1e-9 * a2.max(b2)
        }
        _ => false,
    };
    for (ix, w, axis) in &layers {
        let t = graph.initializer[*w].clone();
        let shape: Vec<usize> = t.dims.iter().map(|d| *d as usize).collect();
        let value = Tensor::from_shape(&shape, &float_values(&t)?)
            .map_err(tract("read a weight for the export"))?;
        let channels = shape[*axis];
        // The layer's input scale and its 1-D bias, bias-corrected when exactly one compiled
        // layer came from this node and it was measured on this very weight.
        let x_scale = graph.node[*ix].input[0]
            .strip_suffix("_dequantized")
            .and_then(|orig| act_scale.get(orig))
            .copied();
        let bias_ix = graph.node[*ix]
            .input
            .get(2)
            .and_then(|b| init.get(b))
            .copied();
        let mut bias: Option<(TensorProto, Vec<f32>)> = None;
        if let Some(b) = bias_ix {
            let bt = graph.initializer[b].clone();
            let mut bv = float_values(&bt)?;
            let onnx_name = node_key(&graph.node[*ix]).to_string();
            let mut from_node = bias_shifts.iter().filter(|(l, _, _)| {
                *l == onnx_name
                    || l.strip_prefix(onnx_name.as_str())
                        .is_some_and(|r| r.starts_with('.'))
            });
            if let (Some((_, shift, weight)), None) = (from_node.next(), from_node.next()) {
                if shift.len() == bv.len() && same(weight, &value) {
                    bv.iter_mut().zip(shift).for_each(|(b, s)| *b -= s);
                }
            }
            if bt.dims.len() == 1 && bv.len() == channels {
                bias = Some((bt, bv));
            }
        }
        // An int32 bias is stored at input scale × weight scale: a channel whose weights are
        // all but zero (common after BatchNorm folding) gets a weight scale large enough for
        // its bias to fit, as QDQ runtimes expect; its weights then round to zero.
        let floors: Vec<f32> = match (&bias, x_scale) {
            (Some((_, bv)), Some(xs)) if xs > 0.0 => bv
                .iter()
                .map(|b| b.abs() / (xs * (1u32 << 30) as f32))
                .collect(),
            _ => vec![0.0; channels],
        };
        let q = super::weights::quantize_weight_with_floors(&value, Some(*axis), &floors)?;
        let w_scales = super::weights::f32_values(&q.scales)?;
        let values: Vec<u8> = q
            .values
            .to_plain_array_view::<i8>()
            .map_err(tract("read int8 weights"))?
            .iter()
            .map(|v| *v as u8)
            .collect();
        let base = &t.name;
        let (wq, ws, wz, wdq) = (
            format!("{base}_quantized"),
            format!("{base}_scale"),
            format!("{base}_zero_point"),
            format!("{base}_dequantized"),
        );
        if replaced_weights.insert(base.clone()) {
            let scale_bytes = w_scales.iter().flat_map(|s| s.to_le_bytes()).collect();
            new_inits.push(tensor(wq.clone(), DataType::Int8, t.dims.clone(), values));
            new_inits.push(tensor(
                ws.clone(),
                DataType::Float,
                vec![channels as i64],
                scale_bytes,
            ));
            new_inits.push(tensor(
                wz.clone(),
                DataType::Int8,
                vec![channels as i64],
                vec![0; channels],
            ));
            let mut dq = node(
                "DequantizeLinear",
                format!("{base}_DequantizeLinear"),
                vec![wq, ws, wz],
                vec![wdq.clone()],
            );
            dq.attribute.push(int_attr("axis", *axis as i64));
            before.entry(*ix).or_default().push(dq);
        }
        graph.node[*ix].input[1] = wdq;
        let Some((bt, bv)) = bias else {
            continue;
        };
        let bname = format!("{}_for_{}", bt.name, node_key(&graph.node[*ix]));
        let scales: Vec<f32> = w_scales
            .iter()
            .map(|s| s * x_scale.unwrap_or(0.0))
            .collect();
        let fits = scales
            .iter()
            .zip(&bv)
            .all(|(s, b)| s.is_normal() && (b / s).abs() < i32::MAX as f32);
        replaced_weights.insert(bt.name.clone());
        if !fits {
            // No usable int32 form: the (corrected) bias stays f32.
            let name = format!("{bname}_corrected");
            new_inits.push(tensor(
                name.clone(),
                DataType::Float,
                bt.dims.clone(),
                bv.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ));
            graph.node[*ix].input[2] = name;
            continue;
        }
        let q: Vec<u8> = bv
            .iter()
            .zip(&scales)
            .map(|(v, s)| (v / s).round() as i32)
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let (bq, bs, bz, bdq) = (
            format!("{bname}_quantized"),
            format!("{bname}_scale"),
            format!("{bname}_zero_point"),
            format!("{bname}_dequantized"),
        );
        new_inits.push(tensor(bq.clone(), DataType::Int32, bt.dims.clone(), q));
        new_inits.push(tensor(
            bs.clone(),
            DataType::Float,
            bt.dims.clone(),
            scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
        ));
        new_inits.push(tensor(
            bz.clone(),
            DataType::Int32,
            bt.dims.clone(),
            vec![0; 4 * bv.len()],
        ));
        let mut dq = node(
            "DequantizeLinear",
            format!("{bname}_DequantizeLinear"),
            vec![bq, bs, bz],
            vec![bdq.clone()],
        );
        dq.attribute.push(int_attr("axis", 0));
        before.entry(*ix).or_default().push(dq);
        graph.node[*ix].input[2] = bdq;
    }
    // Weights no node reads any more go; the new nodes go right before their first reader.
    let still_read: HashSet<&String> = graph.node.iter().flat_map(|n| n.input.iter()).collect();
    let unused: HashSet<String> = replaced_weights
        .iter()
        .filter(|w| !still_read.contains(w))
        .cloned()
        .collect();
    graph.initializer.retain(|t| !unused.contains(&t.name));
    // Old exporters list initializers among the inputs too, which keeps runtimes from
    // treating them as constants.
    let constants: HashSet<String> = graph.initializer.iter().map(|t| t.name.clone()).collect();
    graph
        .input
        .retain(|i| !unused.contains(&i.name) && !constants.contains(&i.name));
    graph.initializer.extend(new_inits);
    let mut nodes = after.remove(&usize::MAX).unwrap_or_default();
    for (ix, n) in std::mem::take(&mut graph.node).into_iter().enumerate() {
        if let Some(pre) = before.remove(&ix) {
            nodes.extend(pre);
        }
        nodes.push(n);
        if let Some(post) = after.remove(&ix) {
            nodes.extend(post);
        }
    }
    graph.node = nodes;
    proto.graph = Some(graph);
    let opset = from.max(13);
    proto
        .opset_import
        .retain(|o| !(o.domain.is_empty() || o.domain == "ai.onnx"));
    proto.opset_import.push(OperatorSetIdProto {
        domain: String::new(),
        version: opset,
    });
    proto.ir_version = proto.ir_version.max(7);
    proto.producer_name = "neoc".into();
    proto.producer_version = env!("CARGO_PKG_VERSION").into();
    let bytes = prost::Message::encode_to_vec(&proto);
    let tmp = path.with_extension("onnx.partial");
    if let Err(source) = std::fs::write(&tmp, &bytes).and_then(|_| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(CompileError::Io {
            path: path.to_path_buf(),
            source,
        });
    }
    Ok(QdqSummary {
        path: path.display().to_string(),
        style: style.name().to_string(),
        quantized_layers: layers.len(),
        quantized_activations: act_names.len(),
        opset_from: from,
        opset,
        accuracy: Vec::new(),
    })
}

/// Loads the written QDQ model with tract-onnx (an independent reading of the file) and
/// compares it with the f32 model on the held-out images.
pub fn check(
    path: &std::path::Path,
    input_shape: &[usize],
    outputs: &[neo_runtime::manifest::OutputSpec],
    holdout: &[Tensor],
    reference: &Arc<TypedSimplePlan>,
    budget: super::gate::Budget,
) -> Result<Vec<super::gate::OutputAgreement>> {
    let mut model = crate::import::onnx_framework()
        .model_for_path(path)
        .map_err(tract("read back the QDQ export"))?;
    model
        .set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), input_shape))
        .map_err(tract("set the QDQ export's input"))?;
    let names: Vec<String> = outputs.iter().map(|o| o.name.clone()).collect();
    model
        .select_outputs_by_name(&names)
        .map_err(tract("select the QDQ export's outputs"))?;
    let plan = model
        .into_optimized()
        .map_err(tract("optimize the QDQ export"))?
        .into_runnable()
        .map_err(tract("plan the QDQ export"))?;
    let refs = super::gate::Reference::new(reference, holdout)?;
    let got = super::gate::run_all(&plan, holdout)?;
    Ok(refs.compare(&got, outputs, budget))
}
