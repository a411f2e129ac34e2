//! `neoc eval`: how well a detector separates good from defective images on a labelled set.

use super::dataset::Dataset;
use crate::error::{CompileError, Result};
use neo_runtime::anomaly::Verdict;
use neo_runtime::{preprocess, Model};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// Area under the ROC curve of `scores` for `positive` labels (Mann-Whitney U with tied
/// scores sharing their average rank); NaN when either class is empty. O(n log n).
pub fn auroc(scores: &[f32], positive: &[bool]) -> f64 {
    let mut pairs: Vec<(f32, bool)> = scores
        .iter()
        .copied()
        .zip(positive.iter().copied())
        .collect();
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n_pos = pairs.iter().filter(|p| p.1).count() as f64;
    let n_neg = pairs.len() as f64 - n_pos;
    if n_pos == 0.0 || n_neg == 0.0 {
        return f64::NAN;
    }
    let mut rank_sum = 0f64;
    let mut i = 0;
    while i < pairs.len() {
        let mut j = i;
        while j < pairs.len() && pairs[j].0 == pairs[i].0 {
            j += 1;
        }
        let avg_rank = (i + 1 + j) as f64 / 2.0;
        rank_sum += avg_rank * pairs[i..j].iter().filter(|p| p.1).count() as f64;
        i = j;
    }
    (rank_sum - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg)
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
    /// Over every pixel of the test images, where the dataset has defect masks (good images
    /// count as all-normal); `None` without masks.
    pub pixel_auroc: Option<f64>,
    /// At the stored threshold (normalized score 1.0).
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub confusion: Confusion,
    pub per_type: BTreeMap<String, TypeResult>,
    /// With a defect-type head: how it names the defective test images it was not trained on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub defect_types: Option<TypeAccuracy>,
    /// Decode → preprocess → model (backbone + kNN) → map analysis, per image.
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    pub scores: Vec<ScoredImage>,
}

/// The defect-type head on a dataset's defective images.
#[derive(Debug, Serialize)]
pub struct TypeAccuracy {
    /// Defective test images whose type is one of the head's labels and that it was not
    /// trained on.
    pub images: usize,
    pub correct: usize,
    /// `None` when no defective test image has a type the head knows.
    pub accuracy: Option<f64>,
    /// Defective images left out because the head was trained on them.
    pub skipped_trained: usize,
    /// Defective images of a kind the head has no label for.
    pub unknown_kind: usize,
    /// True type → predicted type → count.
    pub confusion: BTreeMap<String, BTreeMap<String, usize>>,
}

/// The head's label for a dataset's defect kind (case-insensitive; `MT_` prefixes ignored).
fn label_for<'a>(labels: &'a [String], kind: &str) -> Option<&'a String> {
    let norm = |s: &str| s.trim_start_matches("MT_").to_lowercase();
    labels.iter().find(|l| norm(l) == norm(kind))
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((p / 100.0) * (sorted.len() - 1) as f64).round() as usize]
}

/// Scores every test image of `dataset` with the detector at `artifact`. `train_good` is the
/// number of good images the detector was trained on in a magnetic-tile layout (they are not
/// tested); MVTec layouts carry their own split.
pub fn eval_anomaly(
    artifact: &Path,
    dataset: &Path,
    train_good: Option<usize>,
) -> Result<EvalReport> {
    let model = Model::load(artifact)?;
    if model.manifest().anomaly.is_none() {
        return Err(CompileError::Options(format!(
            "{} is not an anomaly detector (train one with `neoc train anomaly`)",
            artifact.display()
        )));
    }
    let samples = Dataset::open(dataset, train_good)?.test;
    let with_masks = samples.iter().any(|s| s.defective && s.mask.is_some());
    let (mut pixel_scores, mut pixel_labels) = (Vec::new(), Vec::new());
    let mut scores = Vec::new();
    let mut latencies = Vec::new();
    let head = model
        .manifest()
        .anomaly
        .as_ref()
        .and_then(|a| a.defect_types.clone());
    let mut type_eval = head.as_ref().map(|_| TypeAccuracy {
        images: 0,
        correct: 0,
        accuracy: None,
        skipped_trained: 0,
        unknown_kind: 0,
        confusion: BTreeMap::new(),
    });
    for s in &samples {
        let start = Instant::now();
        let img = preprocess::load(&s.path)?;
        let (preds, _) = model.predict(&img, 1)?;
        latencies.push(start.elapsed().as_secs_f64() * 1e3);
        let result = preds
            .iter()
            .find_map(|p| p.anomaly.as_ref())
            .ok_or_else(|| CompileError::Options("the detector gave no anomaly map".into()))?;
        if let (Some(t), Some(te)) = (&head, type_eval.as_mut()) {
            let file = s
                .path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            match (s.defective, label_for(&t.labels, &s.kind)) {
                (false, _) => {}
                (true, None) => te.unknown_kind += 1,
                (true, Some(label)) if t.trained_on.contains(&format!("{label}/{file}")) => {
                    te.skipped_trained += 1
                }
                (true, Some(label)) => {
                    // The runtime names the type of every image (not only NG ones).
                    let got = result.defect_type.as_ref().map_or_else(
                        || "(none: features not finite)".to_string(),
                        |g| g.label.clone(),
                    );
                    te.images += 1;
                    te.correct += (&got == label) as usize;
                    *te.confusion
                        .entry(label.clone())
                        .or_default()
                        .entry(got)
                        .or_default() += 1;
                }
            }
        }
        debug_assert_eq!(result.verdict == Verdict::Ng, result.score > 1.0);
        scores.push(result.score);
        if with_masks && (s.mask.is_some() || !s.defective) {
            let (w, h) = (img.width(), img.height());
            let window = model.input_window(w, h);
            pixel_scores.extend(result.map.to_pixels(window, w, h));
            match &s.mask {
                Some(m) => {
                    let mask = preprocess::load(m)?.to_luma8();
                    if mask.dimensions() != (w, h) {
                        return Err(CompileError::Options(format!(
                            "mask {} is {}x{} but its image is {w}x{h}",
                            m.display(),
                            mask.width(),
                            mask.height()
                        )));
                    }
                    pixel_labels.extend(mask.pixels().map(|p| p.0[0] > 0));
                }
                None => pixel_labels.extend(std::iter::repeat_n(false, (w * h) as usize)),
            }
        }
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
        pixel_auroc: with_masks.then(|| auroc(&pixel_scores, &pixel_labels)),
        precision,
        recall,
        f1,
        confusion,
        per_type,
        defect_types: type_eval.map(|mut t| {
            t.accuracy = (t.images > 0).then(|| t.correct as f64 / t.images as f64);
            t
        }),
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
        // Ties between classes count half: one pair of four is tied.
        assert_eq!(
            auroc(&[0.1, 0.5, 0.5, 0.9], &[false, false, true, true]),
            0.875
        );
    }
}
