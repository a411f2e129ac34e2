//! The accuracy gate: the quantized model against the f32 one on held-out images, per output.

use crate::error::{tract, Result};
use neo_runtime::manifest::{OutputSpec, Task};
use serde::{Deserialize, Serialize};
use tract_onnx::prelude::*;

/// What the gate allows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// Largest loss of top-1 agreement with f32 allowed on classification outputs (0.01 = 1 %).
    pub max_top1_drop: f64,
    /// Smallest mean cosine similarity to f32 allowed on feature outputs.
    pub min_cosine: f64,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            max_top1_drop: 0.01,
            min_cosine: 0.99,
        }
    }
}

/// How one output of the quantized model compares with f32.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutputAgreement {
    pub output: String,
    /// Share of held-out images whose best class is the same (classification outputs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
    pub max_abs_diff: f32,
    pub mean_abs_diff: f32,
    /// Cosine similarity of the output vectors (feature maps), mean and worst over images.
    pub cosine_mean: f64,
    pub cosine_min: f64,
    pub passed: bool,
}

/// f32 outputs of the held-out images, computed once.
pub struct Reference {
    outputs: Vec<Vec<Vec<f32>>>,
}

/// Runs a model on one input; each output's shape and values as f32.
pub fn run_f32(plan: &Arc<TypedSimplePlan>, input: &Tensor) -> Result<Vec<(Vec<usize>, Vec<f32>)>> {
    let out = plan
        .run(tvec!(input.clone().into_tvalue()))
        .map_err(tract("run an image"))?;
    out.iter()
        .map(|v| Ok((v.shape().to_vec(), neo_runtime::tensor_to_f32(v)?)))
        .collect()
}

/// Runs a model over images; outputs as f32 vectors, per image and output.
pub fn run_all(plan: &Arc<TypedSimplePlan>, images: &[Tensor]) -> Result<Vec<Vec<Vec<f32>>>> {
    images
        .iter()
        .map(|t| Ok(run_f32(plan, t)?.into_iter().map(|(_, v)| v).collect()))
        .collect()
}

/// Cosine similarity; 1 when both are all zero, 0 when only one is, NaN with NaN inside.
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        dot += *x as f64 * *y as f64;
        na += *x as f64 * *x as f64;
        nb += *y as f64 * *y as f64;
    }
    if na > 0.0 && nb > 0.0 {
        dot / (na.sqrt() * nb.sqrt())
    } else if na == nb {
        1.0
    } else if na.is_nan() || nb.is_nan() {
        f64::NAN
    } else {
        0.0
    }
}

impl Reference {
    pub fn new(plan: &Arc<TypedSimplePlan>, images: &[Tensor]) -> Result<Reference> {
        Ok(Reference {
            outputs: run_all(plan, images)?,
        })
    }

    /// Compares `got` (per image, per output) with the f32 outputs.
    pub fn compare(
        &self,
        got: &[Vec<Vec<f32>>],
        specs: &[OutputSpec],
        budget: Budget,
    ) -> Vec<OutputAgreement> {
        specs
            .iter()
            .enumerate()
            .map(|(o, spec)| {
                let (mut agree, mut max_abs, mut sum_abs, mut count) = (0usize, 0f32, 0f64, 0usize);
                let mut saw_nan = false;
                let (mut cos_sum, mut cos_min) = (0f64, f64::INFINITY);
                for (want, have) in self.outputs.iter().zip(got) {
                    let (w, h) = (&want[o], &have[o]);
                    if argmax(w) == argmax(h) {
                        agree += 1;
                    }
                    for (a, b) in w.iter().zip(h) {
                        let d = (a - b).abs();
                        if d.is_nan() {
                            saw_nan = true;
                            continue;
                        }
                        max_abs = max_abs.max(d);
                        sum_abs += d as f64;
                    }
                    count += w.len();
                    let cos = cosine(w, h);
                    if cos.is_nan() {
                        saw_nan = true;
                    } else {
                        cos_sum += cos;
                        cos_min = cos_min.min(cos);
                    }
                }
                let n = self.outputs.len().max(1);
                let classification = spec.task == Task::Classification;
                let top1 = classification.then(|| agree as f64 / n as f64);
                let cosine_mean = cos_sum / n as f64;
                // NaN anywhere fails (and is reported as the worst finite values, so the
                // report stays valid JSON).
                let cosine_mean = if saw_nan { -1.0 } else { cosine_mean };
                let passed = !saw_nan
                    && match top1 {
                        Some(t) => 1.0 - t <= budget.max_top1_drop + 1e-12,
                        None => cosine_mean >= budget.min_cosine,
                    };
                OutputAgreement {
                    output: spec.name.clone(),
                    top1_agreement: top1,
                    max_abs_diff: if saw_nan { f32::MAX } else { max_abs },
                    mean_abs_diff: (sum_abs / count.max(1) as f64) as f32,
                    cosine_mean,
                    cosine_min: if saw_nan {
                        -1.0
                    } else if cos_min.is_finite() {
                        cos_min
                    } else {
                        1.0
                    },
                    passed,
                }
            })
            .collect()
    }

    /// Mean over outputs and images of (1 − cosine): how far a model strays, for ranking
    /// layers by sensitivity.
    pub fn distance(&self, got: &[Vec<Vec<f32>>]) -> f64 {
        let mut total = 0.0;
        let mut n = 0;
        for (want, have) in self.outputs.iter().zip(got) {
            for (w, h) in want.iter().zip(have) {
                // One output collapsed to zero (cosine 0) or NaN: as far as it gets.
                let c = cosine(w, h);
                total += if c.is_nan() { 1.0 } else { 1.0 - c };
                n += 1;
            }
        }
        total / n.max(1) as f64
    }
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, x)| {
            if *x > best.1 {
                (i, *x)
            } else {
                best
            }
        })
        .0
}

/// The gate's verdict as a table a person reads.
pub fn table(rows: &[OutputAgreement], budget: Budget) -> String {
    let mut s = format!(
        "{:<28} {:>10} {:>12} {:>12} {:>10} {:>10}  {}\n",
        "output", "top-1 agr", "max |diff|", "mean |diff|", "cos mean", "cos min", "verdict"
    );
    for r in rows {
        let verdict = match (r.passed, r.top1_agreement) {
            (true, _) => "ok".to_string(),
            (false, Some(t)) => format!(
                "FAIL: top-1 drop {:.2} % > {:.2} %",
                (1.0 - t) * 100.0,
                budget.max_top1_drop * 100.0
            ),
            (false, None) => format!(
                "FAIL: cosine {:.4} < {:.4}",
                r.cosine_mean, budget.min_cosine
            ),
        };
        s += &format!(
            "{:<28} {:>10} {:>12.3e} {:>12.3e} {:>10.5} {:>10.5}  {verdict}\n",
            r.output,
            r.top1_agreement
                .map_or("-".to_string(), |t| format!("{:.2} %", t * 100.0)),
            r.max_abs_diff,
            r.mean_abs_diff,
            r.cosine_mean,
            r.cosine_min
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use neo_runtime::manifest::{DType, Scores};

    fn spec(task: Task) -> OutputSpec {
        OutputSpec {
            name: "out".into(),
            shape: vec![1, 3],
            dtype: DType::F32,
            task,
            scores: Some(Scores::Logits),
            labels: vec![],
        }
    }

    #[test]
    fn a_flipped_class_fails_a_one_percent_budget() {
        let reference = Reference {
            outputs: vec![vec![vec![1.0, 0.0, 0.0]], vec![vec![0.0, 1.0, 0.0]]],
        };
        let same = reference.outputs.clone();
        let flipped = vec![vec![vec![1.0, 0.0, 0.0]], vec![vec![0.0, 0.4, 0.6]]];
        let budget = Budget::default();
        let ok = reference.compare(&same, &[spec(Task::Classification)], budget);
        assert!(ok[0].passed && ok[0].top1_agreement == Some(1.0));
        assert_eq!(ok[0].max_abs_diff, 0.0);
        let bad = reference.compare(&flipped, &[spec(Task::Classification)], budget);
        assert!(!bad[0].passed);
        assert_eq!(bad[0].top1_agreement, Some(0.5));
        assert!((bad[0].max_abs_diff - 0.6).abs() < 1e-6);
        assert!(table(&bad, budget).contains("FAIL: top-1 drop 50.00 %"));
        // As a feature map the same numbers are judged by cosine.
        let feat = reference.compare(&flipped, &[spec(Task::Features)], budget);
        assert!(!feat[0].passed && feat[0].cosine_min < 0.6);
    }
}
