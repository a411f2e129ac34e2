//! `neoc inspect`: what is inside an artifact.

use crate::error::{tract, Result};
use neo_runtime::artifact::MODEL_FILE;
use neo_runtime::{Artifact, Manifest};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Cursor;
use std::path::Path;
use tract_onnx::prelude::*;

/// Summary of an artifact.
#[derive(Debug, serde::Serialize)]
pub struct Inspection {
    pub manifest: Manifest,
    pub artifact_bytes: u64,
    /// Operator name → node count, in the stored graph as the device loads it (decluttered).
    pub ops: BTreeMap<String, usize>,
    /// Number of constant values (weights, biases, other constants).
    pub parameters: u64,
    pub parameter_bytes: u64,
    /// The compile report of a quantized model (per-layer precision, ranges, accuracy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization: Option<crate::quantize::QuantReport>,
}

/// Verifies an artifact and summarizes its graph.
pub fn inspect(path: &Path) -> Result<Inspection> {
    let bytes = std::fs::read(path).map_err(|source| crate::CompileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let artifact = Artifact::from_bytes(&path.display().to_string(), &bytes)?;
    let nnef = artifact.file(MODEL_FILE).unwrap_or_default();
    let graph = neo_runtime::nnef()
        .model_for_read(&mut Cursor::new(&*neo_runtime::int8::unpack(nnef)?))
        .map_err(tract("read the stored NNEF graph"))?
        // Loading NNEF leaves identity casts around constants; declutter as the device does.
        .into_decluttered()
        .map_err(tract("declutter the stored graph"))?;
    let mut ops = BTreeMap::new();
    let (mut parameters, mut parameter_bytes) = (0u64, 0u64);
    for node in graph.nodes() {
        if let Some(k) = node.op_as::<tract_onnx::tract_core::ops::konst::Const>() {
            parameters += k.val().len() as u64;
            parameter_bytes += (k.val().len() * k.val().datum_type().size_of()) as u64;
            continue;
        }
        if node.op_is::<tract_onnx::tract_core::ops::source::TypedSource>() {
            continue;
        }
        *ops.entry(node.op.name().to_string()).or_insert(0) += 1;
    }
    let quantization = match &artifact.manifest.quantization {
        Some(q) => {
            let json = artifact.file(&q.report).ok_or_else(|| {
                crate::CompileError::Quantize(format!(
                    "the manifest names a report '{}' the artifact does not hold",
                    q.report
                ))
            })?;
            Some(serde_json::from_slice(json).map_err(|e| {
                crate::CompileError::Quantize(format!(
                    "the report '{}' is unreadable: {e}",
                    q.report
                ))
            })?)
        }
        None => None,
    };
    Ok(Inspection {
        quantization,
        manifest: artifact.manifest,
        artifact_bytes: bytes.len() as u64,
        ops,
        parameters,
        parameter_bytes,
    })
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

impl Inspection {
    /// Human-readable report.
    pub fn render(&self) -> String {
        let m = &self.manifest;
        let mut s = String::new();
        let _ = writeln!(s, "{} (artifact format v{})", m.name, m.format_version);
        let _ = writeln!(
            s,
            "  compiled by   {} {} (tract {}) from {} (sha256 {}…, {})",
            m.compiler.name,
            m.compiler.version,
            m.compiler.tract_version,
            m.source.file,
            m.source.sha256.chars().take(12).collect::<String>(),
            mib(m.source.bytes)
        );
        let _ = writeln!(
            s,
            "  target        {} ({}, cpu {}), precision {}, {} threads, budget {} MiB",
            m.target.board,
            m.target.triple,
            m.target.cpu,
            m.target.precision,
            m.target.threads,
            m.target.memory_budget_mb
        );
        for i in &m.inputs {
            let _ = writeln!(
                s,
                "  input         {} {:?} {:?} {:?}",
                i.name, i.shape, i.dtype, i.layout
            );
            if let Some(p) = &i.preprocess {
                let _ = writeln!(
                    s,
                    "    preprocess  resize {:?} ({:?}), crop {:?}, channels {:?}, (x*{} - mean {:?}) / std {:?}",
                    p.resize, p.interpolation, p.crop, p.channels, p.scale, p.mean, p.std
                );
                if let Some(k) = p.flatten {
                    let _ = writeln!(
                        s,
                        "                local mean over {k}x{k} subtracted after resizing"
                    );
                }
                if p.standardize {
                    let _ = writeln!(
                        s,
                        "                each image standardized (mean 128, std 48) before the normalization"
                    );
                }
            }
        }
        for o in &m.outputs {
            let _ = write!(
                s,
                "  output        {} {:?} {:?} {:?}",
                o.name, o.shape, o.dtype, o.task
            );
            if let Some(sc) = o.scores {
                let _ = write!(s, ", scores {sc:?}");
            }
            if !o.labels.is_empty() {
                let _ = write!(s, ", {} labels ({}, …)", o.labels.len(), o.labels[0]);
            }
            let _ = writeln!(s);
        }
        if let Some(a) = &m.anomaly {
            let _ = writeln!(
                s,
                "  anomaly       map '{}' from {:?} ({} values per patch, {}x{} average), bank {} rows from {} good images",
                a.map_output, a.layers, a.feature_dim, a.aggregation, a.aggregation, a.memory_rows, a.training_images
            );
            let border = if a.score_border > 0 {
                format!(", {} border cells left out", a.score_border)
            } else {
                String::new()
            };
            let top_k = if a.score_top_k > 1 {
                format!(", score = mean of the {} largest cells", a.score_top_k)
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "    threshold   {} ({}){border}{top_k}",
                a.threshold, a.threshold_method
            );
            if let Some(t) = &a.defect_types {
                let _ = writeln!(
                    s,
                    "    types       {} (linear head on the {} most anomalous cells' features, from {} labelled images)",
                    t.labels.join(", "),
                    t.pool_cells,
                    t.trained_on.len()
                );
            }
        }
        let _ = writeln!(
            s,
            "  size          artifact {}, parameters {} ({})",
            mib(self.artifact_bytes),
            self.parameters,
            mib(self.parameter_bytes)
        );
        for (name, f) in &m.files {
            let _ = writeln!(
                s,
                "  file          {name} {} sha256 {}",
                mib(f.bytes),
                f.sha256
            );
        }
        if let Some(q) = &self.quantization {
            s += &q.summary();
            let _ = writeln!(
                s,
                "  {:<34} {:<6} {:<18} {:<9} {:>9}  {:>23}  {:>10}",
                "layer",
                "op",
                "weight shape",
                "precision",
                "w rel.err",
                "activation min..max",
                "act scale"
            );
            for l in &q.layers {
                let _ = writeln!(
                    s,
                    "  {:<34} {:<6} {:<18} {:<9} {:>9.2e}  {:>10.3}..{:<11.3}  {:>10.3e}",
                    l.name,
                    l.op,
                    format!("{:?}", l.shape),
                    if l.int8_compute {
                        "int8 comp"
                    } else {
                        l.precision.as_str()
                    },
                    l.weight_relative_error,
                    l.activation.min,
                    l.activation.max,
                    l.activation.scale
                );
            }
        }
        let total: usize = self.ops.values().sum();
        let _ = writeln!(s, "  operators     {total} nodes");
        let mut ops: Vec<_> = self.ops.iter().collect();
        ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (op, n) in ops {
            let _ = writeln!(s, "    {n:>5}  {op}");
        }
        s
    }
}
