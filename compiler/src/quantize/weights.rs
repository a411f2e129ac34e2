//! Which weights can be stored in int8, per-output-channel symmetric quantization, and the
//! graph rewrite that stores them so: each f32 weight constant becomes an int8 constant, a
//! cast to f32 and a multiplication by its channel scales. The device folds that chain back
//! into an f32 constant at load time (`neo_runtime::model`), so compute stays f32 while the
//! artifact carries a quarter of the bytes.

use crate::error::{tract, CompileError, Result};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::cnn::conv::KernelFormat;
use tract_onnx::tract_core::ops::cnn::Conv;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::konst::Const;

/// Weights smaller than this stay f32: the scales would cost as much as they save.
const MIN_WEIGHT_ELEMENTS: usize = 64;

/// A layer whose weight is a constant the compiler can quantize.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The consuming node (a convolution or a matrix product).
    pub name: String,
    /// "conv" or "matmul".
    pub op: &'static str,
    /// The constant node holding the weight.
    pub weight_node: usize,
    pub weight_name: String,
    pub shape: Vec<usize>,
    /// Axis of the weight that indexes output channels (scales are per index on it).
    pub channel_axis: Option<usize>,
    /// The activation the layer reads (what int8 compute would quantize per tensor).
    pub activation: OutletId,
    /// Where the layer's bias is and how its input channels line up, for bias correction.
    pub bias: Option<BiasSite>,
}

/// How a layer's weight error shifts its output and where that shift can be taken back.
#[derive(Debug, Clone)]
pub struct BiasSite {
    /// Axis of the activation that indexes input channels.
    pub activation_axis: usize,
    /// Axis of the weight that indexes input channels (within a group).
    pub weight_in_axis: usize,
    /// Convolution groups (1 for matrix products).
    pub group: usize,
    /// The input of `node` at `slot` is a constant bias, broadcast along `axis`.
    pub node: usize,
    pub slot: usize,
    pub axis: usize,
}

/// Convolutions and matrix products with a constant f32 weight, in graph order.
pub fn find_layers(model: &TypedModel) -> Result<Vec<Layer>> {
    let mut layers = Vec::new();
    let mut seen_weights = std::collections::HashSet::new();
    for &id in &model.eval_order().map_err(tract("order the graph"))? {
        let node = model.node(id);
        let (op, weight_slot, data_slot, channel_axis) = if let Some(conv) = node.op_as::<Conv>() {
            if conv.q_params.is_some() {
                continue;
            }
            let axis = match conv.kernel_fmt {
                KernelFormat::OIHW | KernelFormat::OHWI => 0,
                KernelFormat::HWIO => usize::MAX, // last: resolved below
            };
            ("conv", 1, 0, Some(axis))
        } else if let Some(einsum) = node.op_as::<EinSum>() {
            if einsum.q_params.is_some() || node.inputs.len() != 2 {
                continue;
            }
            let konst = |slot: usize| {
                model
                    .outlet_fact(node.inputs[slot])
                    .map(|f| f.konst.is_some())
                    .unwrap_or(false)
            };
            let slot = match (konst(0), konst(1)) {
                (false, true) => 1,
                (true, false) => 0,
                _ => continue,
            };
            // Per channel along the weight axis that reaches the output but not the other
            // operand (the output features of a Gemm).
            let other = 1 - slot;
            let axis = einsum.axes.iter_all_axes().find_map(|a| {
                (a.inputs[slot].len() == 1 && a.inputs[other].is_empty() && a.outputs[0].len() == 1)
                    .then(|| a.inputs[slot][0])
            });
            ("matmul", slot, other, axis)
        } else {
            continue;
        };
        let weight = node.inputs[weight_slot];
        let wnode = model.node(weight.node);
        let Some(konst) = wnode.op_as::<Const>() else {
            continue;
        };
        let value = konst.val();
        if value.datum_type() != f32::datum_type() || value.len() < MIN_WEIGHT_ELEMENTS {
            continue;
        }
        if !seen_weights.insert(weight.node) {
            continue; // shared weight: quantized once, for its first user
        }
        let rank = value.rank();
        let channel_axis = channel_axis.map(|a| if a == usize::MAX { rank - 1 } else { a });
        let bias = channel_axis.and_then(|out_axis| bias_site(model, node, out_axis, rank));
        layers.push(Layer {
            name: node.name.clone(),
            op,
            weight_node: weight.node,
            weight_name: wnode.name.clone(),
            shape: value.shape().to_vec(),
            channel_axis,
            activation: node.inputs[data_slot],
            bias,
        });
    }
    Ok(layers)
}

fn konst_at(model: &TypedModel, outlet: OutletId) -> bool {
    model.node(outlet.node).op_is::<Const>()
}

/// Where a layer's output shift can be compensated: a convolution's own constant bias, or the
/// constant of an Add right after a matrix product (how 1x1 convolutions and Gemm come out of
/// decluttering).
fn bias_site(
    model: &TypedModel,
    node: &TypedNode,
    out_axis: usize,
    rank: usize,
) -> Option<BiasSite> {
    if let Some(conv) = node.op_as::<Conv>() {
        let fmt = conv.pool_spec.data_format;
        if conv.kernel_fmt != KernelFormat::OIHW || node.inputs.len() < 3 || out_axis != 0 {
            return None;
        }
        if !konst_at(model, node.inputs[2]) {
            return None;
        }
        let data_rank = model.outlet_fact(node.inputs[0]).ok()?.rank();
        let c_axis = if fmt.c_is_last() {
            data_rank - 1
        } else if fmt.has_n() {
            1
        } else {
            0
        };
        return Some(BiasSite {
            activation_axis: c_axis,
            weight_in_axis: 1,
            group: conv.group,
            node: node.id,
            slot: 2,
            axis: 0,
        });
    }
    let einsum = node.op_as::<EinSum>()?;
    if rank != 2 {
        return None;
    }
    let wslot = (0..2).find(|s| konst_at(model, node.inputs[*s]))?;
    let other = 1 - wslot;
    // The contracted axis: in both operands, not in the output.
    let contracted = einsum.axes.iter_all_axes().find(|a| {
        a.inputs[wslot].len() == 1 && a.inputs[other].len() == 1 && a.outputs[0].is_empty()
    })?;
    let out = einsum
        .axes
        .iter_all_axes()
        .find(|a| a.inputs[wslot].as_slice() == [out_axis] && a.outputs[0].len() == 1)?;
    let out_pos = out.outputs[0][0];
    // The single reader must be an Add with a constant whose only non-1 axis is the output
    // channel axis.
    let succ = model.single_succ(node.id).ok()??;
    let add = succ.op_as::<tract_onnx::tract_core::ops::binary::TypedBinOp>()?;
    if add.0.name() != "Add" || succ.inputs.len() != 2 {
        return None;
    }
    let slot = (0..2).find(|s| konst_at(model, succ.inputs[*s]))?;
    let fact = model.outlet_fact(succ.inputs[slot]).ok()?;
    let shape = fact.shape.as_concrete()?.to_vec();
    let out_rank = model.outlet_fact(OutletId::new(node.id, 0)).ok()?.rank();
    if shape.len() != out_rank
        || shape
            .iter()
            .enumerate()
            .any(|(i, d)| i != out_pos && *d != 1)
    {
        return None;
    }
    Some(BiasSite {
        activation_axis: contracted.inputs[other][0],
        weight_in_axis: contracted.inputs[wslot][0],
        group: 1,
        node: succ.id,
        slot,
        axis: out_pos,
    })
}

/// The expected shift of each output channel that int8 weights cause, given the mean of each
/// input channel: Σ (dequantized − original) × mean (Nagel et al.'s bias correction).
pub fn output_shift(
    layer: &Layer,
    original: &Tensor,
    q: &QuantizedWeight,
    means: &[f64],
) -> Option<Vec<f32>> {
    let site = layer.bias.as_ref()?;
    let out_axis = layer.channel_axis?;
    let w = original.to_plain_array_view::<f32>().ok()?;
    let d = q.dequantized.to_plain_array_view::<f32>().ok()?;
    let outs = layer.shape[out_axis];
    let ins_per_group = layer.shape[site.weight_in_axis];
    let per_group_out = outs / site.group.max(1);
    if per_group_out == 0 || ins_per_group * site.group != means.len() {
        return None;
    }
    let mut shift = vec![0f64; outs];
    for ((idx, a), b) in w.indexed_iter().zip(d.iter()) {
        let o = idx[out_axis];
        let i = (o / per_group_out) * ins_per_group + idx[site.weight_in_axis];
        shift[o] += (*b as f64 - *a as f64) * means[i];
    }
    Some(shift.into_iter().map(|v| v as f32).collect())
}

/// An int8 weight: values, one scale per output channel (or one), and how far it is from f32.
#[derive(Debug, Clone)]
pub struct QuantizedWeight {
    pub values: Tensor,
    /// Shaped to broadcast against the weight (1 everywhere but the channel axis).
    pub scales: Tensor,
    /// `values × scales` in f32: the weight the device computes with.
    pub dequantized: Tensor,
    pub scale_min: f32,
    pub scale_max: f32,
    /// ‖w − dequantized(w)‖ / ‖w‖.
    pub relative_error: f64,
}

/// Symmetric narrow-range (−127..127) quantization per output channel.
/// A tensor's values as f32 (cast first when it holds another type), in memory order.
pub fn f32_values(t: &Tensor) -> Result<Vec<f32>> {
    let t = t.cast_to::<f32>().map_err(tract("read a constant"))?;
    Ok(t.to_plain_array_view::<f32>()
        .map_err(tract("read a constant"))?
        .iter()
        .copied()
        .collect())
}

pub fn quantize_weight(weight: &Tensor, channel_axis: Option<usize>) -> Result<QuantizedWeight> {
    quantize_weight_with_floors(weight, channel_axis, &[])
}

/// Like [`quantize_weight`], with a smallest allowed scale per channel (`floors`, empty for
/// none).
pub fn quantize_weight_with_floors(
    weight: &Tensor,
    channel_axis: Option<usize>,
    floors: &[f32],
) -> Result<QuantizedWeight> {
    let shape = weight.shape().to_vec();
    let data = f32_values(weight)?;
    let (channels, inner) = match channel_axis {
        Some(a) => (shape[a], shape[a + 1..].iter().product::<usize>()),
        None => (1, data.len()),
    };
    let channel_of = |i: usize| (i / inner) % channels;
    let mut absmax = vec![0f32; channels];
    for (i, v) in data.iter().enumerate() {
        if !v.is_finite() {
            return Err(CompileError::Options(format!(
                "a weight holds {v}: the model is broken, retrain or re-export it"
            )));
        }
        let c = channel_of(i);
        absmax[c] = absmax[c].max(v.abs());
    }
    let scales: Vec<f32> = absmax
        .iter()
        .enumerate()
        .map(|(c, m)| {
            let s = if *m > 0.0 { m / 127.0 } else { 1.0 };
            s.max(floors.get(c).copied().unwrap_or(0.0))
        })
        .collect();
    let mut q = Vec::with_capacity(data.len());
    let mut dequantized = Vec::with_capacity(data.len());
    let (mut err2, mut norm2) = (0f64, 0f64);
    for (i, v) in data.iter().enumerate() {
        let s = scales[channel_of(i)];
        let qv = (v / s).round().clamp(-127.0, 127.0);
        q.push(qv as i8);
        dequantized.push(qv * s);
        let d = (qv * s - v) as f64;
        err2 += d * d;
        norm2 += (*v as f64) * (*v as f64);
    }
    let mut scale_shape = vec![1usize; shape.len()];
    if let Some(a) = channel_axis {
        scale_shape[a] = channels;
    }
    Ok(QuantizedWeight {
        values: Tensor::from_shape(&shape, &q).map_err(tract("build an int8 weight"))?,
        scales: Tensor::from_shape(&scale_shape, &scales).map_err(tract("build scales"))?,
        dequantized: Tensor::from_shape(&shape, &dequantized)
            .map_err(tract("build a dequantized weight"))?,
        scale_min: scales.iter().copied().fold(f32::INFINITY, f32::min),
        scale_max: scales.iter().copied().fold(0.0, f32::max),
        relative_error: if norm2 > 0.0 {
            (err2 / norm2).sqrt()
        } else {
            0.0
        },
    })
}

/// The model with the chosen layers' weights replaced by their dequantized values (int8 ×
/// channel scale, exactly representable): what the device computes with. The artifact writer
/// stores such tensors as int8 + scales (`neo_runtime::int8`).
pub fn with_int8_weights(
    model: &TypedModel,
    layers: &[(&Layer, &QuantizedWeight, Option<&Vec<f32>>)],
) -> Result<TypedModel> {
    let mut model = model.clone();
    // Bias corrections first: node ids stay valid until the weight patches run.
    for (layer, _, shift) in layers {
        let (Some(site), Some(shift)) = (&layer.bias, shift) else {
            continue;
        };
        let err = tract("correct a bias");
        let outlet = model.node(site.node).inputs[site.slot];
        let old = model
            .node(outlet.node)
            .op_as::<Const>()
            .map(|c| c.val().clone())
            .ok_or_else(|| CompileError::Quantize("a bias is no longer constant".into()))?;
        let values = f32_values(&old)?;
        let n = shift.len();
        let corrected: Vec<f32> = match values.len() {
            1 => shift.iter().map(|s| values[0] - s).collect(),
            len if len == n => values
                .iter()
                .zip(shift.iter())
                .map(|(v, s)| v - s)
                .collect(),
            _ => continue,
        };
        let shape = if values.len() == n {
            old.shape().to_vec()
        } else if old.rank() > 1 {
            let mut s = vec![1; old.rank()];
            s[site.axis] = n;
            s
        } else {
            vec![n]
        };
        let tensor = Tensor::from_shape(&shape, &corrected).map_err(&err)?;
        let konst = model
            .add_const(format!("{}.bias_corrected", layer.name), tensor)
            .map_err(&err)?;
        model
            .add_edge(konst, InletId::new(site.node, site.slot))
            .map_err(&err)?;
    }
    for (layer, q, _) in layers {
        let err = tract("replace a weight by its int8 values");
        let mut patch = TypedModelPatch::default();
        let weight = patch
            .add_const(layer.weight_name.clone(), q.dequantized.clone())
            .map_err(&err)?;
        patch
            .shunt_outside(&model, OutletId::new(layer.weight_node, 0), weight)
            .map_err(&err)?;
        patch.apply(&mut model).map_err(&err)?;
    }
    model.compact().map_err(tract("tidy the graph"))?;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat<T: Datum + Copy>(t: &Tensor) -> Vec<T> {
        t.to_plain_array_view::<T>()
            .unwrap()
            .iter()
            .copied()
            .collect()
    }

    #[test]
    fn per_channel_scales_follow_each_channels_range() {
        // Two output channels of very different magnitude: per-channel keeps both precise.
        let w = Tensor::from_shape(
            &[2, 1, 1, 4],
            &[0.5f32, -1.0, 0.25, 0.0, 100.0, -50.0, 25.0, 1.0],
        )
        .unwrap();
        let q = quantize_weight(&w, Some(0)).unwrap();
        assert_eq!(q.scales.shape(), &[2, 1, 1, 1]);
        let s = flat::<f32>(&q.scales);
        assert!((s[0] - 1.0 / 127.0).abs() < 1e-9);
        assert!((s[1] - 100.0 / 127.0).abs() < 1e-6);
        assert_eq!(flat::<i8>(&q.values)[..4], [64, -127, 32, 0]);
        assert!(q.relative_error < 0.01, "{}", q.relative_error);
        // One scale for the whole tensor crushes the small channel.
        let t = quantize_weight(&w, None).unwrap();
        assert_eq!(flat::<i8>(&t.values)[..4], [1, -1, 0, 0]);
    }

    #[test]
    fn a_non_finite_weight_is_refused() {
        let w = Tensor::from_shape(&[1, 2], &[1.0f32, f32::NAN]).unwrap();
        assert!(quantize_weight(&w, None).is_err());
    }
}
