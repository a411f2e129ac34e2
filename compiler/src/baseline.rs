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
}

/// Loads `model` with tract-onnx `loads` times and runs it `runs` times on a fixed input.
pub fn baseline(
    model: &Path,
    input_shape: Option<Vec<usize>>,
    loads: usize,
    runs: usize,
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
    Ok(Baseline {
        model: model.display().to_string(),
        input_shape: shape,
        load_ms,
        inference_ms,
    })
}
