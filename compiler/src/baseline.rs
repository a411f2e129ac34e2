//! `neoc baseline`: plain tract-onnx on the source model (parse ONNX, optimize, run), the way
//! an application would use tract without neo. Benchmarks compare the artifact path against it.

use crate::compile::fix_input;
use crate::error::{tract, CompileError, Result};
use crate::import;
use std::path::Path;
use std::time::Instant;
use tract_onnx::prelude::*;

/// Timings of the plain tract-onnx path, in milliseconds.
#[derive(Debug, serde::Serialize)]
pub struct Baseline {
    pub model: String,
    pub input_shape: Vec<usize>,
    /// Read + parse ONNX + type + optimize + plan, per load.
    pub load_ms: Vec<f64>,
    /// Sorted per-run inference times.
    pub inference_ms: Vec<f64>,
    /// Where the time goes, when asked for.
    pub profile: Option<Profile>,
}

/// Per-node timings of the optimized plan.
#[derive(Debug, serde::Serialize)]
pub struct Profile {
    /// Per operator kind, slowest first.
    pub ops: Vec<OpTime>,
    /// The slowest nodes: name, operator and mean milliseconds per inference.
    pub nodes: Vec<(String, String, f64)>,
}

/// Where an inference spends its time: one kind of operator of the optimized plan.
#[derive(Debug, serde::Serialize)]
pub struct OpTime {
    /// tract's name of the operator (after optimization: the kernels that really run).
    pub op: String,
    /// Nodes of that kind in the plan.
    pub nodes: usize,
    /// Mean milliseconds per inference spent in them.
    pub ms: f64,
    /// The slowest node of that kind and its mean milliseconds.
    pub slowest: String,
    pub slowest_ms: f64,
}

/// Loads `model` with tract-onnx `loads` times and runs it `runs` times on a fixed input.
pub fn baseline(
    model: &Path,
    input_shape: Option<Vec<usize>>,
    loads: usize,
    runs: usize,
    profile: bool,
) -> Result<Baseline> {
    let mut load_ms = Vec::new();
    let mut plan = None;
    let mut shape = vec![];
    for _ in 0..loads.max(1) {
        let start = Instant::now();
        let mut imported = import::import(model)?.model;
        let (_, fixed, dt) = fix_input(&mut imported, input_shape.clone(), &mut vec![])?;
        shape = fixed;
        let p = imported
            .into_optimized()
            .map_err(tract("optimize the graph"))?
            .into_runnable()
            .map_err(tract("plan the graph"))?;
        load_ms.push(start.elapsed().as_secs_f64() * 1e3);
        plan = Some((p, dt));
    }
    let (plan, dt) =
        plan.ok_or_else(|| CompileError::Options("--loads must be at least 1".into()))?;
    let count: usize = shape.iter().product();
    let values: Vec<f32> = (0..count)
        .map(|i| ((i * 7919) % 255) as f32 / 255.0)
        .collect();
    let input = Tensor::from_shape(&shape, &values)
        .and_then(|t| t.cast_to_dt(dt).map(|c| c.into_owned()))
        .map_err(tract("build the input"))?;
    let mut inference_ms = Vec::new();
    for i in 0..runs.max(1) + 5 {
        let start = Instant::now();
        plan.run(tvec!(input.clone().into_tvalue()))
            .map_err(tract("run the graph"))?;
        if i >= 5 {
            inference_ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    inference_ms.sort_by(f64::total_cmp);
    load_ms.sort_by(f64::total_cmp);
    let profile = if profile {
        Some(profile_plan(&plan, &input, runs.max(1))?)
    } else {
        None
    };
    Ok(Baseline {
        model: model.display().to_string(),
        input_shape: shape,
        load_ms,
        inference_ms,
        profile,
    })
}

/// Runs the plan `runs` times timing every node, and sums the times per operator kind.
fn profile_plan(plan: &Arc<TypedSimplePlan>, input: &Tensor, runs: usize) -> Result<Profile> {
    use std::collections::HashMap;
    let mut per_node: HashMap<usize, (String, String, f64)> = HashMap::new();
    let mut state = plan.spawn().map_err(tract("start the plan"))?;
    for _ in 0..runs {
        state
            .run_plan_with_eval(
                tvec!(input.clone().into_tvalue()),
                |ctx, op_state, node, inputs| {
                    let start = Instant::now();
                    let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, inputs);
                    let ms = start.elapsed().as_secs_f64() * 1e3;
                    let entry = per_node
                        .entry(node.id)
                        .or_insert_with(|| (node.op().name().to_string(), node.name.clone(), 0.0));
                    entry.2 += ms;
                    out
                },
            )
            .map_err(tract("run the graph"))?;
    }
    let mut per_op: HashMap<String, OpTime> = HashMap::new();
    let mut nodes = Vec::new();
    for (op, node, total) in per_node.into_values() {
        let ms = total / runs as f64;
        nodes.push((node.clone(), op.clone(), ms));
        let t = per_op.entry(op.clone()).or_insert_with(|| OpTime {
            op,
            nodes: 0,
            ms: 0.0,
            slowest: String::new(),
            slowest_ms: -1.0,
        });
        t.nodes += 1;
        t.ms += ms;
        if ms > t.slowest_ms {
            t.slowest = node;
            t.slowest_ms = ms;
        }
    }
    let mut ops: Vec<OpTime> = per_op.into_values().collect();
    ops.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    nodes.sort_by(|a, b| b.2.total_cmp(&a.2));
    nodes.truncate(30);
    Ok(Profile { ops, nodes })
}
