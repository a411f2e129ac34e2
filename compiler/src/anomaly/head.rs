//! ONNX graph surgery for memory-bank detectors: on top of a backbone, add the patch feature
//! head (local average of each layer, resize to the finest grid, concat, one row per patch)
//! and, for the detector, the nearest-neighbour search against the memory bank. Standard ONNX
//! operators only, so the whole detector goes through the ordinary compile path, runs as one
//! tract graph on the device, and can be checked against onnxruntime.

use crate::error::{CompileError, Result};
use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto,
};

/// Name of the patch feature output ([grid_h * grid_w, feature_dim]).
pub const PATCHES: &str = "neo_patches";
/// Name of the anomaly map output ([1, 1, grid_h, grid_w]).
pub const ANOMALY_MAP: &str = "anomaly_map";

/// Shape of one backbone layer: channels, height, width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerShape {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attribute: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute,
        ..Default::default()
    }
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

fn string(name: &str, s: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::String as i32,
        s: s.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn f32_tensor(name: &str, dims: &[usize], data: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.iter().map(|d| *d as i64).collect(),
        data_type: DataType::Float as i32,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn i64_tensor(name: &str, data: &[i64]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: vec![data.len() as i64],
        data_type: DataType::Int64 as i32,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn output(name: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        ..Default::default()
    }
}

fn graph_mut(model: &mut ModelProto) -> Result<&mut GraphProto> {
    model
        .graph
        .as_mut()
        .ok_or_else(|| CompileError::Options("the backbone has no graph".into()))
}

/// The ONNX operator set the model imports (default domain).
pub fn opset(model: &ModelProto) -> i64 {
    model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(0, |o| o.version)
}

/// Replaces the declared shape of the graph's first real input (not an initializer) with
/// `shape`. Valid for the fully convolutional part of a backbone: feature layers then come
/// out at the new resolution.
pub fn set_input_shape(model: &mut ModelProto, shape: &[usize]) -> Result<()> {
    use tract_onnx::pb::tensor_shape_proto::{dimension, Dimension};
    use tract_onnx::pb::type_proto;
    let g = graph_mut(model)?;
    let initializers: Vec<String> = g.initializer.iter().map(|t| t.name.clone()).collect();
    let input = g
        .input
        .iter_mut()
        .find(|i| !initializers.contains(&i.name))
        .ok_or_else(|| CompileError::Options("the backbone has no input".into()))?;
    let Some(type_proto::Value::TensorType(t)) =
        input.r#type.as_mut().and_then(|t| t.value.as_mut())
    else {
        return Err(CompileError::Options(format!(
            "input '{}' is not a tensor",
            input.name
        )));
    };
    let dims = t.shape.get_or_insert_with(Default::default);
    dims.dim = shape
        .iter()
        .map(|d| Dimension {
            value: Some(dimension::Value::DimValue(*d as i64)),
            ..Default::default()
        })
        .collect();
    Ok(())
}

/// Every tensor name the graph produces (node outputs), for "which layers are there".
pub fn tensor_names(model: &ModelProto) -> Vec<String> {
    model
        .graph
        .iter()
        .flat_map(|g| g.node.iter().flat_map(|n| n.output.iter().cloned()))
        .collect()
}

/// Adds the patch feature head; the graph's only output becomes [`PATCHES`]
/// ([grid_h * grid_w, sum of channels]). `shapes` are the layers' shapes; the first layer
/// must have the finest grid.
pub fn add_patch_head(
    model: &mut ModelProto,
    layers: &[String],
    shapes: &[LayerShape],
    aggregation: usize,
) -> Result<(usize, usize, usize)> {
    if opset(model) < 13 {
        return Err(CompileError::Options(format!(
            "the backbone uses ONNX opset {}; anomaly heads need opset 13 or newer (re-export it with opset_version=13)",
            opset(model)
        )));
    }
    let grid = shapes[0];
    if shapes
        .iter()
        .any(|s| s.height > grid.height || s.width > grid.width)
    {
        return Err(CompileError::Options(
            "list the layer with the finest grid first (e.g. --layers stage3,stage5)".into(),
        ));
    }
    let dim: usize = shapes.iter().map(|s| s.channels).sum();
    let pad = (aggregation / 2) as i64;
    let g = graph_mut(model)?;
    let mut concat_inputs = Vec::new();
    for (i, (layer, shape)) in layers.iter().zip(shapes).enumerate() {
        let pooled = format!("neo_head/pool{i}");
        g.node.push(node(
            "AveragePool",
            &pooled,
            &[layer],
            &[&pooled],
            vec![
                ints("kernel_shape", &[aggregation as i64; 2]),
                ints("strides", &[1, 1]),
                ints("pads", &[pad; 4]),
                int("count_include_pad", 0),
            ],
        ));
        if (shape.height, shape.width) == (grid.height, grid.width) {
            concat_inputs.push(pooled);
        } else {
            let sizes = format!("neo_head/sizes{i}");
            g.initializer.push(i64_tensor(
                &sizes,
                &[
                    1,
                    shape.channels as i64,
                    grid.height as i64,
                    grid.width as i64,
                ],
            ));
            let resized = format!("neo_head/resize{i}");
            g.node.push(node(
                "Resize",
                &resized,
                &[&pooled, "", "", &sizes],
                &[&resized],
                vec![
                    string("mode", "linear"),
                    string("coordinate_transformation_mode", "half_pixel"),
                ],
            ));
            concat_inputs.push(resized);
        }
    }
    let refs: Vec<&str> = concat_inputs.iter().map(String::as_str).collect();
    g.node.push(node(
        "Concat",
        "neo_head/concat",
        &refs,
        &["neo_head/concat"],
        vec![int("axis", 1)],
    ));
    let cells = grid.height * grid.width;
    g.initializer
        .push(i64_tensor("neo_head/shape_dc", &[dim as i64, cells as i64]));
    g.node.push(node(
        "Reshape",
        "neo_head/flatten",
        &["neo_head/concat", "neo_head/shape_dc"],
        &["neo_head/dc"],
        vec![],
    ));
    g.node.push(node(
        "Transpose",
        PATCHES,
        &["neo_head/dc"],
        &[PATCHES],
        vec![ints("perm", &[1, 0])],
    ));
    g.output.clear();
    g.output.push(output(PATCHES));
    Ok((grid.height, grid.width, dim))
}

/// The bank with each row rounded to int8 × its own scale (symmetric, absmax/127): values an
/// int8 store reproduces exactly.
pub fn int8_rows(bank: &[f32], dim: usize) -> Vec<f32> {
    bank.chunks(dim)
        .flat_map(|row| {
            let m = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = if m > 0.0 { m / 127.0 } else { 1.0 };
            row.iter()
                .map(move |v| (v / s).round().clamp(-127.0, 127.0) * s)
        })
        .collect()
}

/// Adds the nearest-neighbour search against `bank` (`rows` x `dim`, row-major) after the
/// patch head; the graph's only output becomes [`ANOMALY_MAP`] [1, 1, grid_h, grid_w] holding
/// each patch's Euclidean distance to its nearest memory row.
pub fn add_knn(
    model: &mut ModelProto,
    bank: &[f32],
    rows: usize,
    dim: usize,
    grid: (usize, usize),
) -> Result<()> {
    let g = graph_mut(model)?;
    // |q - m|^2 = |q|^2 + |m|^2 - 2 q.m ; the min over m does not depend on |q|^2.
    let mut bank_t = vec![0f32; rows * dim];
    let mut norms = vec![0f32; rows];
    for r in 0..rows {
        let row = &bank[r * dim..(r + 1) * dim];
        norms[r] = row.iter().map(|v| v * v).sum();
        for (d, v) in row.iter().enumerate() {
            bank_t[d * rows + r] = -2.0 * v;
        }
    }
    g.initializer
        .push(f32_tensor("neo_knn/bank_t_x_minus2", &[dim, rows], &bank_t));
    g.initializer
        .push(f32_tensor("neo_knn/bank_norms", &[1, rows], &norms));
    g.initializer
        .push(f32_tensor("neo_knn/ones", &[dim, 1], &vec![1.0; dim]));
    g.initializer.push(i64_tensor(
        "neo_knn/map_shape",
        &[1, 1, grid.0 as i64, grid.1 as i64],
    ));
    let steps: [(&str, &[&str], Vec<AttributeProto>); 9] = [
        ("MatMul", &[PATCHES, "neo_knn/bank_t_x_minus2"], vec![]),
        ("Add", &["neo_knn/matmul", "neo_knn/bank_norms"], vec![]),
        (
            "ReduceMin",
            &["neo_knn/add"],
            vec![ints("axes", &[1]), int("keepdims", 1)],
        ),
        ("Mul", &[PATCHES, PATCHES], vec![]),
        ("MatMul", &["neo_knn/mul", "neo_knn/ones"], vec![]),
        ("Add", &["neo_knn/reducemin", "neo_knn/matmul2"], vec![]),
        ("Relu", &["neo_knn/add2"], vec![]),
        ("Sqrt", &["neo_knn/relu"], vec![]),
        ("Reshape", &["neo_knn/sqrt", "neo_knn/map_shape"], vec![]),
    ];
    let names = [
        "neo_knn/matmul",
        "neo_knn/add",
        "neo_knn/reducemin",
        "neo_knn/mul",
        "neo_knn/matmul2",
        "neo_knn/add2",
        "neo_knn/relu",
        "neo_knn/sqrt",
        ANOMALY_MAP,
    ];
    for ((op, inputs, attrs), name) in steps.into_iter().zip(names) {
        g.node.push(node(op, name, inputs, &[name], attrs));
    }
    g.output.clear();
    g.output.push(output(ANOMALY_MAP));
    Ok(())
}
