//! `neoc eval`: how well a detector separates good from defective images on a labelled set.

use crate::error::{CompileError, Result};
use neo_runtime::anomaly::Verdict;
use neo_runtime::{preprocess, Model};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One labelled test image.
#[derive(Debug, Clone)]
pub struct Sample {
    pub path: PathBuf,
    /// Defect type, or "good".
    pub kind: String,
    pub defective: bool,
}

/// Finds the test images of an MVTec AD layout (`test/<type>/*`, `good` is normal).
pub fn discover(dataset: &Path) -> Result<Vec<Sample>> {
    let test = dataset.join("test");
    if !test.is_dir() {
        return Err(CompileError::Options(format!(
            "{} has no test/ folder; expected the MVTec AD layout test/good/, test/<defect type>/",
            dataset.display()
        )));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CompileError::Io { path, source }
    };
    let mut kinds: Vec<PathBuf> = std::fs::read_dir(&test)
        .map_err(io(&test))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    kinds.sort();
    let mut out = Vec::new();
    for dir in kinds {
        let kind = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for path in preprocess::list_images(&dir).map_err(io(&dir))? {
            out.push(Sample {
                path,
                defective: kind != "good",
                kind: kind.clone(),
            });
        }
    }
    if !out.iter().any(|s| s.defective) || out.iter().all(|s| s.defective) {
        return Err(CompileError::Options(format!(
            "{} needs both good and defective test images",
            test.display()
        )));
    }
    Ok(out)
}

/// Area under the ROC curve of `scores` for `positive` labels (ties count half).
pub fn auroc(scores: &[f32], positive: &[bool]) -> f64 {
    let pos: Vec<f32> = scores
        .iter()
        .zip(positive)
        .filter(|(_, p)| **p)
        .map(|(s, _)| *s)
        .collect();
    let neg: Vec<f32> = scores
        .iter()
        .zip(positive)
        .filter(|(_, p)| !**p)
        .map(|(s, _)| *s)
        .collect();
    if pos.is_empty() || neg.is_empty() {
        return f64::NAN;
    }
    let mut wins = 0f64;
    for p in &pos {
        for n in &neg {
            wins += if p > n {
                1.0
            } else if p == n {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / (pos.len() * neg.len()) as f64
}

#[derive(Debug, Serialize)]
pub struct Confusion {
    pub true_ng: usize,
    pub false_ng: usize,
    pub true_ok: usize,
    pub false_ok: usize,
}

#[derive(Debug, Serialize)]
pub struct TypeResult {
    pub images: usize,
    pub flagged_ng: usize,
}

#[derive(Debug, Serialize)]
pub struct ScoredImage {
    pub file: String,
    pub kind: String,
    pub defective: bool,
    pub score: f32,
}

/// Evaluation of a detector on a labelled dataset.
#[derive(Debug, Serialize)]
pub struct EvalReport {
    pub detector: String,
    pub dataset: String,
    pub images: usize,
    pub defective: usize,
    pub image_auroc: f64,
    /// At the stored threshold (normalized score 1.0).
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub confusion: Confusion,
    pub per_type: BTreeMap<String, TypeResult>,
    /// Decode → preprocess → model (backbone + kNN) → map analysis, per image.
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    pub scores: Vec<ScoredImage>,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((p / 100.0) * (sorted.len() - 1) as f64).round() as usize]
}

/// Scores every test image of `dataset` with the detector at `artifact`.
pub fn eval_anomaly(artifact: &Path, dataset: &Path) -> Result<EvalReport> {
    let model = Model::load(artifact)?;
    if model.manifest().anomaly.is_none() {
        return Err(CompileError::Options(format!(
            "{} is not an anomaly detector (train one with `neoc train anomaly`)",
            artifact.display()
        )));
    }
    let samples = discover(dataset)?;
    let mut scores = Vec::new();
    let mut latencies = Vec::new();
    for s in &samples {
        let start = Instant::now();
        let img = preprocess::load(&s.path)?;
        let (preds, _) = model.predict(&img, 1)?;
        latencies.push(start.elapsed().as_secs_f64() * 1e3);
        let result = preds
            .iter()
            .find_map(|p| p.anomaly.as_ref())
            .ok_or_else(|| CompileError::Options("the detector gave no anomaly map".into()))?;
        debug_assert_eq!(result.verdict == Verdict::Ng, result.score > 1.0);
        scores.push(result.score);
    }
    let labels: Vec<bool> = samples.iter().map(|s| s.defective).collect();
    let ng = |score: f32| score > 1.0;
    let count = |want_def: bool, want_ng: bool| {
        samples
            .iter()
            .zip(&scores)
            .filter(|(s, sc)| s.defective == want_def && ng(**sc) == want_ng)
            .count()
    };
    let confusion = Confusion {
        true_ng: count(true, true),
        false_ng: count(false, true),
        true_ok: count(false, false),
        false_ok: count(true, false),
    };
    let precision =
        confusion.true_ng as f64 / (confusion.true_ng + confusion.false_ng).max(1) as f64;
    let recall = confusion.true_ng as f64 / (confusion.true_ng + confusion.false_ok).max(1) as f64;
    let f1 = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    let mut per_type: BTreeMap<String, TypeResult> = BTreeMap::new();
    for (s, sc) in samples.iter().zip(&scores) {
        let e = per_type.entry(s.kind.clone()).or_insert(TypeResult {
            images: 0,
            flagged_ng: 0,
        });
        e.images += 1;
        e.flagged_ng += ng(*sc) as usize;
    }
    latencies.sort_by(f64::total_cmp);
    Ok(EvalReport {
        detector: artifact.display().to_string(),
        dataset: dataset.display().to_string(),
        images: samples.len(),
        defective: labels.iter().filter(|d| **d).count(),
        image_auroc: auroc(&scores, &labels),
        precision,
        recall,
        f1,
        confusion,
        per_type,
        latency_ms_p50: pct(&latencies, 50.0),
        latency_ms_p99: pct(&latencies, 99.0),
        scores: samples
            .iter()
            .zip(&scores)
            .map(|(s, sc)| ScoredImage {
                file: s.path.display().to_string(),
                kind: s.kind.clone(),
                defective: s.defective,
                score: *sc,
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_counts_pairs_and_ties() {
        assert_eq!(
            auroc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]),
            1.0
        );
        assert_eq!(
            auroc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]),
            0.0
        );
        assert_eq!(auroc(&[0.5, 0.5], &[false, true]), 0.5);
        assert!(auroc(&[0.5], &[true]).is_nan());
    }
}
