//! `neoc compile --quantize int8`: calibrated post-training quantization, checked against the
//! f32 model before anything is written.
//!
//! The board profile picks the scheme (`--scheme` overrides it). A board without fast int8
//! dot products gets int8 *weight storage* with f32 compute: a quarter of the bytes, the f32
//! speed. Boards with dot-product CPUs (marked `int8_compute` in their profile) get int8
//! *compute*: convolutions become `neo_q8_conv` nodes (see [`compute`]) that run on the
//! CPU's int8 dot-product instructions, with the input ranges calibration measured (per
//! tensor, by min/max, percentile or entropy). tract's own int8 operators are not used: they
//! ran 7–70x slower than its f32 ones (`neoc baseline --profile`, docs/benchmarks.md).
//!
//! Steps: calibration images (preprocessed per the manifest) → activation ranges → int8
//! weights per output channel → the accuracy gate on held-out images (top-1 agreement, abs
//! diffs, cosine) → optionally layers kept in f32, most sensitive first, until the gate
//! holds → `report.json`.

pub mod calib;
pub mod compute;
pub mod gate;
pub mod qdq;
pub mod weights;

use crate::error::{tract, CompileError, Result};
use neo_boards::BoardProfile;
use neo_runtime::manifest::{InputSpec, OutputSpec, QuantizationInfo};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;
use tract_onnx::prelude::*;

pub use calib::Method;
pub use gate::Budget;

/// The artifact file holding the compile report of a quantized model.
pub const REPORT_FILE: &str = "report.json";
/// Version of `report.json`'s layout.
pub const REPORT_VERSION: u32 = 1;
/// int8 weights, f32 compute.
pub const SCHEME_INT8_WEIGHTS: &str = "int8-weights";
/// int8 weights, convolutions computed in int8.
pub const SCHEME_INT8_COMPUTE: &str = "int8-compute";

/// What `--quantize int8` was asked to do.
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    pub calibration: PathBuf,
    pub method: Method,
    /// Share of the calibration images kept aside for the accuracy gate.
    pub holdout: f64,
    /// At most this many images are read (evenly spread over the folder).
    pub max_images: usize,
    pub budget: Budget,
    /// Keep the most sensitive layers in f32 until the budget holds, instead of failing.
    pub mixed_precision: bool,
    /// Also write the calibrated model as QDQ ONNX here.
    pub emit_qdq: Option<PathBuf>,
    /// Whose conventions the QDQ file follows (`None`: by the board, see
    /// [`qdq::QdqStyle::for_board`]).
    pub qdq_style: Option<qdq::QdqStyle>,
    /// Take back the mean output shift of int8 weights through the layers' biases.
    pub bias_correction: bool,
    /// Layers whose name starts with one of these stay f32 (e.g. a detector's memory bank,
    /// whose row norms are precomputed from the f32 rows).
    pub exclude_prefixes: Vec<String>,
    /// Largest image-AUROC loss allowed for anomaly detectors (checked by `train anomaly`
    /// when defective images are given).
    pub max_auroc_drop: f64,
    /// int8 compute (`Some(true)`), int8 weights only (`Some(false)`), or as the board's
    /// profile says (`None`).
    pub int8_compute: Option<bool>,
}

impl QuantizeOptions {
    pub fn new(calibration: PathBuf) -> Self {
        QuantizeOptions {
            calibration,
            method: Method::Percentile(99.99),
            holdout: 0.2,
            max_images: 200,
            budget: Budget::default(),
            mixed_precision: false,
            emit_qdq: None,
            qdq_style: None,
            bias_correction: true,
            exclude_prefixes: Vec::new(),
            max_auroc_drop: 0.01,
            int8_compute: None,
        }
    }
}

/// One layer's line in the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerReport {
    pub name: String,
    pub op: String,
    pub weight: String,
    pub shape: Vec<usize>,
    /// "int8" or "f32".
    pub precision: String,
    /// Why a layer stayed f32, or why an int8 layer computes in f32 under int8 compute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether the layer computes in int8 (`neo_q8_conv`), not only stores its weight so.
    #[serde(default)]
    pub int8_compute: bool,
    /// Axis the per-channel scales run along (none: one scale).
    pub channel_axis: Option<usize>,
    pub weight_scale_min: f32,
    pub weight_scale_max: f32,
    /// ‖w − dequantized(w)‖ / ‖w‖.
    pub weight_relative_error: f64,
    /// Range of the activation the layer reads, from calibration.
    pub activation: calib::ActivationRange,
    /// Output distance (mean 1 − cosine) with only this layer quantized; measured when the
    /// gate needed mixed precision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sensitivity: Option<f64>,
}

/// `report.json`: what quantization did and what it cost.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuantReport {
    pub version: u32,
    pub board: String,
    pub scheme: String,
    pub compute: String,
    /// Why the board got this scheme.
    pub scheme_reason: String,
    pub method: String,
    pub calibration_dir: String,
    pub calibration_images: usize,
    pub holdout_images: usize,
    pub budget: Budget,
    pub accuracy: Vec<gate::OutputAgreement>,
    pub layers: Vec<LayerReport>,
    /// Bytes of the weights that were quantized, as f32 and as stored.
    pub quantized_weights_f32_bytes: u64,
    pub quantized_weights_stored_bytes: u64,
    /// Weight tensors the artifact stores as int8 + scales (a layer's weight may be split
    /// into several by the NNEF writer).
    pub packed_tensors: usize,
    /// The NNEF graph file, f32 and quantized.
    pub graph_bytes_f32: u64,
    pub graph_bytes: u64,
    pub seconds: f64,
    /// The QDQ ONNX export, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qdq: Option<qdq::QdqSummary>,
    /// For anomaly detectors: the int8 detector against the f32 one on held-out images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomaly: Option<AnomalyAgreement>,
}

/// An int8 anomaly detector against the same detector in f32 (same memory bank).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AnomalyAgreement {
    pub good_images: usize,
    pub defect_images: usize,
    /// Image AUROC (needs defective images).
    pub auroc_f32: Option<f64>,
    pub auroc_int8: Option<f64>,
    pub max_auroc_drop: f64,
    /// Thresholds each detector's own scores give, and the relative shift.
    pub threshold_f32: f32,
    pub threshold_int8: f32,
    pub threshold_shift: f64,
    /// Largest relative difference of an image score.
    pub max_score_change: f64,
    pub passed: bool,
}

impl QuantReport {
    /// The manifest's summary of this report.
    pub fn info(&self) -> QuantizationInfo {
        QuantizationInfo {
            scheme: self.scheme.clone(),
            compute: self.compute.clone(),
            method: self.method.clone(),
            calibration_images: self.calibration_images,
            holdout_images: self.holdout_images,
            int8_layers: self.layers.iter().filter(|l| l.precision == "int8").count(),
            f32_layers: self
                .layers
                .iter()
                .filter(|l| l.precision != "int8")
                .map(|l| l.name.clone())
                .collect(),
            report: REPORT_FILE.into(),
        }
    }

    /// Human-readable summary for stdout.
    pub fn summary(&self) -> String {
        let int8 = self.layers.iter().filter(|l| l.precision == "int8").count();
        let mut s = format!(
            "quantization: {} ({} compute) for {}: {}\n  calibration: {} images from {} \
             ({}), {} held out for the accuracy check\n  layers: {int8} of {} int8",
            self.scheme,
            self.compute,
            self.board,
            self.scheme_reason,
            self.calibration_images,
            self.calibration_dir,
            self.method,
            self.holdout_images,
            self.layers.len()
        );
        let kept: Vec<&str> = self
            .layers
            .iter()
            .filter(|l| l.precision != "int8")
            .map(|l| l.name.as_str())
            .collect();
        if !kept.is_empty() {
            s += &format!(" (kept in f32: {})", kept.join(", "));
        }
        if self.scheme == SCHEME_INT8_COMPUTE {
            let n = self.layers.iter().filter(|l| l.int8_compute).count();
            s += &format!("; {n} compute in int8, the rest in f32");
        }
        s += &format!(
            "\n  weights: {:.2} MiB f32 → {:.2} MiB int8 ({} tensors); graph file {:.2} → {:.2} MiB ({:.0} %)\n",
            mib(self.quantized_weights_f32_bytes),
            mib(self.quantized_weights_stored_bytes),
            self.packed_tensors,
            mib(self.graph_bytes_f32),
            mib(self.graph_bytes),
            100.0 * self.graph_bytes as f64 / self.graph_bytes_f32.max(1) as f64
        );
        s += &gate::table(&self.accuracy, self.budget);
        if let Some(a) = &self.anomaly {
            s += &format!(
                "  detector: int8 vs f32 on {} good + {} defective held-out images: AUROC {} vs {}, \
                 threshold {:.4} vs {:.4} ({:+.2} %), largest score change {:.2} % — {}\n",
                a.good_images,
                a.defect_images,
                a.auroc_int8.map_or("-".into(), |v| format!("{v:.4}")),
                a.auroc_f32.map_or("-".into(), |v| format!("{v:.4}")),
                a.threshold_int8,
                a.threshold_f32,
                a.threshold_shift * 100.0,
                a.max_score_change * 100.0,
                if a.passed { "ok" } else { "FAIL" }
            );
        }
        if let Some(q) = &self.qdq {
            s += &format!(
                "  QDQ ONNX: {} ({} layers, {} activations, opset {}{}, for {})\n",
                q.path,
                q.quantized_layers,
                q.quantized_activations,
                q.opset,
                if q.opset_from != q.opset {
                    format!(", lifted from {}", q.opset_from)
                } else {
                    String::new()
                },
                if q.style.is_empty() {
                    "tensorrt"
                } else {
                    &q.style
                }
            );
            if !q.accuracy.is_empty() {
                s += "  the QDQ export with int8 activations (read back by tract-onnx) vs f32 \
                      (informative; the gate checks the artifact):\n";
                s += &gate::table(&q.accuracy, self.budget);
            }
        }
        s
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// The scheme a board gets (or the one asked for), and why.
pub fn scheme_for(
    board: &BoardProfile,
    requested: Option<bool>,
) -> (&'static str, &'static str, String) {
    match (requested, board.int8_compute) {
        (Some(true), _) | (None, true) => (
            SCHEME_INT8_COMPUTE,
            "int8",
            if requested.is_some() {
                format!(
                    "int8 compute asked for with --scheme (profile: int8_compute = {}): \
                     convolutions run on neo's int8 kernels (VNNI on x86_64, the dot product \
                     on aarch64, portable code elsewhere), other layers keep int8 weights",
                    board.int8_compute
                )
            } else {
                format!(
                    "{} has fast int8 dot products (profile: int8_compute = true): \
                     convolutions run on neo's int8 kernels, other layers keep int8 weights \
                     with f32 compute",
                    board.cpu
                )
            },
        ),
        (Some(false), _) | (None, false) => (
            SCHEME_INT8_WEIGHTS,
            "f32",
            if requested.is_some() {
                "int8 weights with f32 compute asked for with --scheme".to_string()
            } else {
                format!(
                    "{} has no fast int8 dot products (profile: int8_compute = false; \
                     without VNNI or the Arm dot product int8 compute is no faster than \
                     f32): weights are stored int8 and computed in f32",
                    board.cpu
                )
            },
        ),
    }
}

/// A quantized graph and its report (graph sizes filled in by the caller).
pub struct Quantized {
    pub model: TypedModel,
    /// `model` optimized and planned (what the gate ran).
    pub plan: Arc<TypedSimplePlan>,
    pub report: QuantReport,
    /// The calibration images (for the QDQ export).
    pub set: calib::CalibrationSet,
    /// Bias corrections applied, by layer (for the QDQ export).
    /// (layer, shift, the layer's f32 weight: the export applies a shift only to the same
    /// weight, not to one tract folded a following scale into).
    pub bias_shifts: Vec<(String, Vec<f32>, Tensor)>,
}

/// Optimizes and plans a graph as the device does.
pub fn device_plan(model: &TypedModel) -> Result<Arc<TypedSimplePlan>> {
    model
        .clone()
        .into_optimized()
        .map_err(tract("optimize the quantized graph"))?
        .into_runnable()
        .map_err(tract("plan the quantized graph"))
}

/// Calibrates and quantizes `typed` (f32; for the int8-compute scheme the typed graph before
/// decluttering, see [`compute`]), checks it against `reference` (the f32 plan) on held-out
/// images, and returns the graph to write (decluttered).
pub fn quantize(
    typed: &TypedModel,
    reference: &Arc<TypedSimplePlan>,
    input: &InputSpec,
    outputs: &[OutputSpec],
    board: &BoardProfile,
    opts: &QuantizeOptions,
) -> Result<Quantized> {
    let start = Instant::now();
    let (scheme, compute, scheme_reason) = scheme_for(board, opts.int8_compute);
    let int8_compute = scheme == SCHEME_INT8_COMPUTE;
    let set = calib::load(&opts.calibration, input, opts.holdout, opts.max_images)?;
    let layers: Vec<weights::Layer> = weights::find_layers(typed)?
        .into_iter()
        .filter(|l| {
            !opts
                .exclude_prefixes
                .iter()
                .any(|p| l.name.starts_with(p.as_str()))
        })
        .collect();
    if layers.is_empty() {
        return Err(CompileError::Quantize(
            "the model has no quantizable layer (no convolution or matrix product with a \
             constant f32 weight of 64 values or more): compile it without --quantize"
                .into(),
        ));
    }
    let mut tensors: Vec<OutletId> = Vec::new();
    for l in &layers {
        if !tensors.contains(&l.activation) {
            tensors.push(l.activation);
        }
    }
    let channel_axes: Vec<Option<usize>> = tensors
        .iter()
        .map(|t| {
            layers
                .iter()
                .find(|l| l.activation == *t)
                .and_then(|l| l.bias.as_ref())
                .map(|b| b.activation_axis)
        })
        .collect();
    let (ranges, means) = calib::activation_stats(
        typed,
        &tensors,
        &channel_axes,
        &set.calibration,
        opts.method,
    )?;
    let quantized: Vec<weights::QuantizedWeight> = layers
        .iter()
        .map(|l| {
            let value = typed
                .node(l.weight_node)
                .op_as::<tract_onnx::tract_core::ops::konst::Const>()
                .map(|c| c.val().clone())
                .ok_or_else(|| CompileError::Quantize(format!("'{}' lost its weight", l.name)))?;
            weights::quantize_weight(&value, l.channel_axis)
        })
        .collect::<Result<_>>()?;
    // Bias correction: take back the mean output shift the int8 weights cause.
    let shifts: Vec<Option<Vec<f32>>> = layers
        .iter()
        .zip(&quantized)
        .map(|(l, q)| {
            let k = tensors.iter().position(|t| *t == l.activation)?;
            let m = means[k].as_ref()?;
            let value = typed
                .node(l.weight_node)
                .op_as::<tract_onnx::tract_core::ops::konst::Const>()?
                .val()
                .clone();
            weights::output_shift(l, &value, q, m)
        })
        .collect();

    let holdout: Vec<Tensor> = set.holdout.iter().map(|(_, t)| t.clone()).collect();
    let refs = gate::Reference::new(reference, &holdout)?;
    let range_of = |l: &weights::Layer| -> &calib::ActivationRange {
        let k = tensors
            .iter()
            .position(|t| *t == l.activation)
            .expect("every layer's activation was measured");
        &ranges[k]
    };
    // The graph with every layer but `f32_layers` quantized (those in `weights_only` with f32
    // compute), and the names of the layers computing in int8.
    let build_with =
        |f32_layers: &[usize], weights_only: &[usize]| -> Result<(TypedModel, Vec<String>)> {
            let chosen: Vec<_> = layers
                .iter()
                .zip(&quantized)
                .enumerate()
                .filter(|(i, _)| !f32_layers.contains(i))
                .map(|(i, (l, q))| {
                    let shift = if opts.bias_correction {
                        shifts[i].as_ref()
                    } else {
                        None
                    };
                    (l, q, shift, range_of(l))
                })
                .collect();
            if int8_compute {
                let names: Vec<&str> = weights_only
                    .iter()
                    .map(|i| layers[*i].name.as_str())
                    .collect();
                compute::with_int8_compute(typed, &chosen, &names)
            } else {
                let chosen: Vec<_> = chosen.into_iter().map(|(l, q, s, _)| (l, q, s)).collect();
                Ok((weights::with_int8_weights(typed, &chosen)?, Vec::new()))
            }
        };
    let build = |f32_layers: &[usize]| -> Result<TypedModel> { Ok(build_with(f32_layers, &[])?.0) };
    let evaluate = |model: &TypedModel, images: &[Tensor]| -> Result<Vec<Vec<Vec<f32>>>> {
        gate::run_all(&device_plan(model)?, images)
    };

    let mut f32_layers: Vec<usize> = Vec::new();
    // Under int8 compute, layers taken out of it that keep int8 weights (f32 compute).
    let mut weights_only: Vec<usize> = Vec::new();
    // The chosen model's plan is kept: the compile's self-check compares against it.
    let (mut model, mut computed) = build_with(&f32_layers, &weights_only)?;
    let mut plan = device_plan(&model)?;
    let mut accuracy = refs.compare(&gate::run_all(&plan, &holdout)?, outputs, opts.budget);
    let mut sensitivity: Vec<Option<f64>> = vec![None; layers.len()];
    if !accuracy.iter().all(|a| a.passed) {
        if !opts.mixed_precision {
            return Err(CompileError::AccuracyGate {
                table: gate::table(&accuracy, opts.budget),
                hint: "add --mixed-precision to keep the most sensitive layers in f32, or \
                       relax --max-drop / --min-cosine"
                    .into(),
            });
        }
        // Each layer alone, on a few held-out images: how far does it move the outputs?
        let probe = &holdout[..holdout.len().min(8)];
        let probe_refs = gate::Reference::new(reference, probe)?;
        for (i, slot) in sensitivity.iter_mut().enumerate() {
            let others: Vec<usize> = (0..layers.len()).filter(|j| *j != i).collect();
            *slot = Some(probe_refs.distance(&evaluate(&build(&others)?, probe)?));
        }
        let mut order: Vec<usize> = (0..layers.len()).collect();
        order.sort_by(|a, b| {
            sensitivity[*b]
                .partial_cmp(&sensitivity[*a])
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        for &i in &order {
            f32_layers.push(i);
            if f32_layers.len() == layers.len() {
                break;
            }
            (model, computed) = build_with(&f32_layers, &weights_only)?;
            plan = device_plan(&model)?;
            accuracy = refs.compare(&gate::run_all(&plan, &holdout)?, outputs, opts.budget);
            if accuracy.iter().all(|a| a.passed) {
                break;
            }
        }
        // Under int8 compute, a layer taken out of it may still hold with int8 weights and f32
        // compute (a quarter of the bytes): try each, least sensitive first, keep what passes.
        if int8_compute && f32_layers.len() < layers.len() {
            for i in f32_layers.clone().into_iter().rev() {
                let fewer: Vec<usize> = f32_layers.iter().copied().filter(|j| *j != i).collect();
                let mut more = weights_only.clone();
                more.push(i);
                let (m, c) = build_with(&fewer, &more)?;
                let p = device_plan(&m)?;
                let a = refs.compare(&gate::run_all(&p, &holdout)?, outputs, opts.budget);
                if a.iter().all(|a| a.passed) {
                    (model, computed, plan, accuracy) = (m, c, p, a);
                    (f32_layers, weights_only) = (fewer, more);
                }
            }
        }
        if f32_layers.len() == layers.len() {
            return Err(CompileError::AccuracyGate {
                table: gate::table(&accuracy, opts.budget),
                hint: "even with all but one layer in f32 the budget does not hold: compile \
                       without --quantize, or relax --max-drop / --min-cosine"
                    .into(),
            });
        }
    }

    let mut layer_reports = Vec::new();
    let (mut f32_bytes, mut stored_bytes) = (0u64, 0u64);
    for (i, (l, q)) in layers.iter().zip(&quantized).enumerate() {
        let int8 = !f32_layers.contains(&i);
        let elements: usize = l.shape.iter().product();
        if int8 {
            f32_bytes += 4 * elements as u64;
            stored_bytes += elements as u64 + 4 * q.scales.len() as u64;
        }
        let range = range_of(l).clone();
        let in_int8 = computed.contains(&l.name);
        let reason = if !int8 {
            Some("kept in f32 by --mixed-precision (among the most sensitive layers)".into())
        } else if int8_compute && !in_int8 {
            Some(format!(
                "int8 weight, f32 compute: {}",
                if weights_only.contains(&i) {
                    "kept out of int8 compute by --mixed-precision (among the most sensitive)"
                } else {
                    compute::unsupported(typed, l).unwrap_or("its input's range is empty")
                }
            ))
        } else {
            None
        };
        layer_reports.push(LayerReport {
            name: l.name.clone(),
            op: l.op.into(),
            weight: l.weight_name.clone(),
            shape: l.shape.clone(),
            precision: if int8 { "int8" } else { "f32" }.into(),
            reason,
            int8_compute: in_int8,
            channel_axis: l.channel_axis,
            weight_scale_min: q.scale_min,
            weight_scale_max: q.scale_max,
            weight_relative_error: q.relative_error,
            activation: range,
            sensitivity: sensitivity[i],
        });
    }
    if int8_compute {
        // Written as every graph is: decluttered (the device optimizes it).
        model = model
            .into_decluttered()
            .map_err(tract("declutter the int8-compute graph"))?;
    }
    Ok(Quantized {
        model,
        plan,
        report: QuantReport {
            version: REPORT_VERSION,
            board: board.name.clone(),
            scheme: scheme.into(),
            compute: compute.into(),
            scheme_reason,
            method: opts.method.name(),
            calibration_dir: set.dir.display().to_string(),
            calibration_images: set.calibration.len(),
            holdout_images: set.holdout.len(),
            budget: opts.budget,
            accuracy,
            layers: layer_reports,
            quantized_weights_f32_bytes: f32_bytes,
            quantized_weights_stored_bytes: stored_bytes,
            packed_tensors: 0,
            graph_bytes_f32: 0,
            graph_bytes: 0,
            seconds: start.elapsed().as_secs_f64(),
            qdq: None,
            anomaly: None,
        },
        set,
        bias_shifts: layers
            .iter()
            .zip(&shifts)
            .enumerate()
            .filter(|(i, _)| opts.bias_correction && !f32_layers.contains(i))
            .filter_map(|(_, (l, s))| {
                let weight = typed
                    .node(l.weight_node)
                    .op_as::<tract_onnx::tract_core::ops::konst::Const>()?
                    .val()
                    .clone()
                    .into_tensor();
                Some((l.name.clone(), s.clone()?, weight))
            })
            .collect(),
    })
}
