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
        layers.push(Layer {
            name: node.name.clone(),
            op,
            weight_node: weight.node,
            weight_name: wnode.name.clone(),
            shape: value.shape().to_vec(),
            channel_axis,
            activation: node.inputs[data_slot],
        });
    }
    Ok(layers)
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
pub fn quantize_weight(weight: &Tensor, channel_axis: Option<usize>) -> Result<QuantizedWeight> {
    let shape = weight.shape().to_vec();
    let data: Vec<f32> = weight
        .to_plain_array_view::<f32>()
        .map_err(tract("read a weight"))?
        .iter()
        .copied()
        .collect();
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
        .map(|m| if *m > 0.0 { m / 127.0 } else { 1.0 })
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
    layers: &[(&Layer, &QuantizedWeight)],
) -> Result<TypedModel> {
    let mut model = model.clone();
    for (layer, q) in layers {
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
        let s = q
            .scales
            .to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect::<Vec<_>>();
        assert!((s[0] - 1.0 / 127.0).abs() < 1e-9);
        assert!((s[1] - 100.0 / 127.0).abs() < 1e-6);
        assert_eq!(
            q.values
                .to_plain_array_view::<i8>()
                .unwrap()
                .iter()
                .copied()
                .collect::<Vec<_>>()[..4],
            [64, -127, 32, 0]
        );
        assert!(q.relative_error < 0.01, "{}", q.relative_error);
        // One scale for the whole tensor crushes the small channel.
        let t = quantize_weight(&w, None).unwrap();
        assert_eq!(
            t.values
                .to_plain_array_view::<i8>()
                .unwrap()
                .iter()
                .copied()
                .collect::<Vec<_>>()[..4],
            [1, -1, 0, 0]
        );
    }

    #[test]
    fn a_non_finite_weight_is_refused() {
        let w = Tensor::from_shape(&[1, 2], &[1.0f32, f32::NAN]).unwrap();
        assert!(quantize_weight(&w, None).is_err());
    }
}
