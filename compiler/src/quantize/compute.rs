//! The int8-compute scheme: convolutions become `neo_q8_conv` nodes
//! ([`neo_runtime::q8::Q8Conv`]), which quantize their input with the calibrated range,
//! multiply in int8 on the CPU's dot-product instructions and give f32 back. What they cannot
//! take (grouped convolutions, matrix products, layers without a usable range)
//! keeps int8 weights and f32 compute, as in the int8-weights scheme.
//!
//! The rewrite runs on the typed graph before decluttering, where every ONNX Conv is still one
//! NCHW convolution node with its weight and bias as constants.

use super::calib::ActivationRange;
use super::weights::{Layer, QuantizedWeight};
use crate::error::{tract, CompileError, Result};
use neo_runtime::q8::{Geometry, Q8Conv};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::cnn::conv::KernelFormat;
use tract_onnx::tract_core::ops::cnn::Conv;

/// A layer to rewrite: the layer, its int8 weight, its bias correction and its input's range.
pub type Chosen<'a> = (
    &'a Layer,
    &'a QuantizedWeight,
    Option<&'a Vec<f32>>,
    &'a ActivationRange,
);

/// The input quantization for a measured range: uint8 over 0..threshold for a non-negative
/// tensor, else centred on 128. `None` when the range is empty (a dead input).
pub fn input_quantization(range: &ActivationRange) -> Option<(f32, u8)> {
    if !(range.threshold.is_finite() && range.threshold > 0.0) {
        return None;
    }
    Some(if range.min >= 0.0 {
        (range.threshold / 255.0, 0)
    } else {
        (range.threshold / 127.5, 128)
    })
}

/// The clamp a convolution's only consumers apply to it: a `Max` with a constant (ReLU) and
/// then a `Min` with a constant (ReLU6), each the only consumer of the one before, keeping
/// the shape. Returns the bounds and the last outlet folded (the node's own without any).
fn clamp_after(model: &TypedModel, node: &TypedNode) -> (f32, f32, OutletId) {
    let (mut lo, mut hi) = (f32::NEG_INFINITY, f32::INFINITY);
    let mut last = OutletId::new(node.id, 0);
    let Ok(fact) = model.outlet_fact(last) else {
        return (lo, hi, last);
    };
    let shape = fact.shape.clone();
    for _ in 0..2 {
        if model.output_outlets().is_ok_and(|o| o.contains(&last)) {
            break;
        }
        let Ok(Some(succ)) = model.single_succ(last.node) else {
            break;
        };
        let Some(bin) = succ.op_as::<TypedBinOp>() else {
            break;
        };
        let (Some(a), Some(b)) = (succ.inputs.first(), succ.inputs.get(1)) else {
            break;
        };
        let other = if *a == last { *b } else { *a };
        let Some(c) = scalar_constant(model, other) else {
            break;
        };
        let same_shape = model
            .outlet_fact(OutletId::new(succ.id, 0))
            .is_ok_and(|f| f.shape == shape && f.datum_type == f32::datum_type());
        if !same_shape {
            break;
        }
        match bin.0.name() {
            "Max" if lo == f32::NEG_INFINITY && c <= hi => lo = c,
            "Min" if hi == f32::INFINITY && c >= lo => hi = c,
            _ => break,
        }
        last = OutletId::new(succ.id, 0);
    }
    (lo, hi, last)
}

/// The value of a constant whose elements are all the same.
fn scalar_constant(model: &TypedModel, outlet: OutletId) -> Option<f32> {
    let konst = model.outlet_fact(outlet).ok()?.konst.clone()?;
    let konst = konst.cast_to::<f32>().ok()?;
    let values = konst.to_plain_array_view::<f32>().ok()?;
    let first = *values.iter().next()?;
    values.iter().all(|v| *v == first).then_some(first)
}

/// The typed graph as the rewrite wants it: constants cast at load time (ONNX biases come
/// out of typing as a constant behind a Cast) folded into plain constants, so weights and
/// biases are found, corrected and read as constants.
pub fn prepare(model: &TypedModel) -> Result<TypedModel> {
    let err = tract("fold constant casts");
    let mut model = model.clone();
    let casts: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|n| n.op_is::<Cast>() && n.inputs.len() == 1)
        .map(|n| n.id)
        .collect();
    for id in casts {
        let node = model.node(id);
        let Some(cast) = node.op_as::<Cast>() else {
            continue;
        };
        let Some(value) = model
            .outlet_fact(node.inputs[0])
            .map_err(&err)?
            .konst
            .clone()
        else {
            continue;
        };
        let value = value.cast_to_dt(cast.to).map_err(&err)?.into_owned();
        let mut patch = TypedModelPatch::default();
        let konst = patch.add_const(node.name.clone(), value).map_err(&err)?;
        patch
            .shunt_outside(&model, OutletId::new(id, 0), konst)
            .map_err(&err)?;
        patch.apply(&mut model).map_err(&err)?;
    }
    model.compact().map_err(&err)?;
    Ok(model)
}

/// Why a layer cannot run in int8 (`None`: it can).
pub fn unsupported(model: &TypedModel, layer: &Layer) -> Option<&'static str> {
    let node = model.node_by_name(&layer.name).ok()?;
    let Some(conv) = node.op_as::<Conv>() else {
        return Some("not a convolution");
    };
    let fmt = conv.pool_spec.data_format;
    let spec = &conv.pool_spec;
    let depthwise = conv.group == spec.input_channels && conv.group == spec.output_channels;
    if conv.group != 1 && !depthwise {
        return Some("grouped convolution (only plain and depthwise ones compute in int8)");
    }
    if conv.q_params.is_some()
        || conv.kernel_fmt != KernelFormat::OIHW
        || !fmt.has_n()
        || fmt.c_is_last()
        || conv.pool_spec.kernel_shape.len() != 2
    {
        return Some("not a 2-D NCHW convolution");
    }
    let input = model.outlet_fact(node.inputs[0]).ok()?;
    if input.datum_type != f32::datum_type() || input.shape.as_concrete().is_none() {
        return Some("input is not f32 of a fixed shape");
    }
    if node.inputs.len() > 2 && model.outlet_fact(node.inputs[2]).ok()?.konst.is_none() {
        return Some("bias is not constant");
    }
    None
}

/// `model` with the chosen layers' weights in int8 (and biases corrected) and, where the
/// layer can and is not in `weights_only`, the convolution replaced by a `neo_q8_conv` node.
/// Returns the names of the layers that compute in int8.
pub fn with_int8_compute(
    model: &TypedModel,
    chosen: &[Chosen],
    weights_only: &[&str],
) -> Result<(TypedModel, Vec<String>)> {
    let weights: Vec<_> = chosen.iter().map(|(l, q, s, _)| (*l, *q, *s)).collect();
    // Biases corrected and weights dequantized first: the layers that stay f32 compute need
    // exactly that, and the rewritten ones read their corrected bias from it.
    let mut model = super::weights::with_int8_weights(model, &weights)?;
    let mut rewritten = Vec::new();
    for (layer, q, _, range) in chosen {
        if weights_only.contains(&layer.name.as_str()) || unsupported(&model, layer).is_some() {
            continue;
        }
        let Some((input_scale, input_zero)) = input_quantization(range) else {
            continue;
        };
        let err = tract("rewrite a convolution for int8 compute");
        let node = model.node_by_name(&layer.name).map_err(&err)?.clone();
        let conv = node.op_as::<Conv>().ok_or_else(|| {
            CompileError::Quantize(format!("'{}' is not a convolution", layer.name))
        })?;
        let input = model.outlet_fact(node.inputs[0]).map_err(&err)?;
        let shape = input
            .shape
            .as_concrete()
            .ok_or_else(|| {
                CompileError::Quantize(format!("'{}' has a symbolic input", layer.name))
            })?
            .to_vec();
        let spec = &conv.pool_spec;
        let padding = spec.computed_padding(&shape[2..]);
        let (cout, cin) = (spec.output_channels, spec.input_channels);
        let geometry = Geometry {
            input_channels: cin,
            output_channels: cout,
            group: conv.group,
            kernel: [spec.kernel_shape[0], spec.kernel_shape[1]],
            strides: [spec.strides()[0], spec.strides()[1]],
            dilations: [spec.dilations()[0], spec.dilations()[1]],
            padding: [
                padding[0].pad_before,
                padding[1].pad_before,
                padding[0].pad_after,
                padding[1].pad_after,
            ],
        };
        let bias = match node.inputs.get(2) {
            Some(b) => {
                let value = model
                    .outlet_fact(*b)
                    .map_err(&err)?
                    .konst
                    .clone()
                    .ok_or_else(|| CompileError::Quantize("a bias is no longer constant".into()))?;
                let v = super::weights::f32_values(&value)?;
                match v.len() {
                    1 => vec![v[0]; cout],
                    n if n == cout => v,
                    n => {
                        return Err(CompileError::Quantize(format!(
                            "'{}' has {n} bias values for {cout} channels",
                            layer.name
                        )))
                    }
                }
            }
            None => vec![0.0; cout],
        };
        let scales = super::weights::f32_values(&q.scales)?;
        let op = Q8Conv::new(
            geometry,
            input_scale,
            input_zero,
            q.values.clone().into_arc_tensor(),
            tensor1(&scales).into_arc_tensor(),
            tensor1(&bias).into_arc_tensor(),
        )
        .map_err(&err)?;
        // A ReLU / ReLU6 right after it (Max, then Min, with constants) is folded in.
        let (lo, hi, last) = clamp_after(&model, &node);
        let op = op.with_clamp(lo, hi).map_err(&err)?;
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(&model, node.inputs[0]).map_err(&err)?;
        let y = patch.wire_node(&node.name, op, &[x]).map_err(&err)?;
        patch.shunt_outside(&model, last, y[0]).map_err(&err)?;
        patch.apply(&mut model).map_err(&err)?;
        rewritten.push(layer.name.clone());
    }
    // Drops the weight and bias constants the new nodes no longer read.
    model.compact().map_err(tract("tidy the graph"))?;
    Ok((model, rewritten))
}
