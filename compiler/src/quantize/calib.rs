//! Calibration: the images (preprocessed exactly as the manifest says, so statistics match
//! what the device will feed), the split into calibration and held-out images, and per-tensor
//! activation ranges with the three usual ways to pick a clipping threshold.

use crate::error::{tract, CompileError, Result};
use neo_runtime::manifest::InputSpec;
use neo_runtime::preprocess;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tract_onnx::prelude::*;

/// Images needed to calibrate, and to check accuracy on images calibration never saw.
pub const MIN_CALIBRATION_IMAGES: usize = 10;
pub const MIN_HOLDOUT_IMAGES: usize = 5;
/// Bins of the |x| histograms the percentile and entropy methods work on.
const BINS: usize = 2048;
/// Levels an int8 tensor has on one side of zero (the entropy method's target).
const LEVELS: usize = 128;

/// How an activation's clipping threshold is chosen from its calibration values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    /// The largest |x| seen.
    MinMax,
    /// The given percentile of |x| (e.g. 99.99): rare outliers are clipped.
    Percentile(f64),
    /// The threshold whose int8 histogram is closest to the f32 one (KL divergence).
    Entropy,
}

impl Method {
    pub fn name(&self) -> String {
        match self {
            Method::MinMax => "minmax".into(),
            Method::Percentile(p) => format!("percentile {p}"),
            Method::Entropy => "entropy (KL)".into(),
        }
    }
}

/// The calibration folder, preprocessed and split.
pub struct CalibrationSet {
    pub dir: PathBuf,
    /// Used to collect statistics.
    pub calibration: Vec<(PathBuf, Tensor)>,
    /// Kept out of calibration, used by the accuracy gate.
    pub holdout: Vec<(PathBuf, Tensor)>,
    /// Files in the folder that are not images (by extension), ignored.
    pub ignored_files: usize,
}

/// Reads every image in `dir` (and its direct subfolders when it has none), preprocesses it
/// with `spec` and keeps an evenly spread `holdout` fraction aside. Refuses what would make a
/// calibration meaningless: no folder, no images, too few, images that do not decode.
pub fn load(
    dir: &Path,
    spec: &InputSpec,
    holdout: f64,
    max_images: usize,
) -> Result<CalibrationSet> {
    let needed = MIN_CALIBRATION_IMAGES + MIN_HOLDOUT_IMAGES;
    if !dir.is_dir() {
        return Err(CompileError::Calibration(format!(
            "{} is not a folder: give --calibration a folder of at least {needed} images like \
             the ones the device will see",
            dir.display()
        )));
    }
    let all_files = count_files(dir);
    let paths = crate::anomaly::train::collect_images(&[dir.to_path_buf()])?;
    if paths.is_empty() {
        return Err(CompileError::Calibration(format!(
            "{} holds no images ({all_files} other files; readable: {}): calibration needs at \
             least {needed} images like the ones the device will see",
            dir.display(),
            preprocess::IMAGE_EXTENSIONS.join(", ")
        )));
    }
    if paths.len() < needed {
        return Err(CompileError::Calibration(format!(
            "{} holds {} images; calibration needs at least {needed} \
             ({MIN_CALIBRATION_IMAGES} to calibrate, {MIN_HOLDOUT_IMAGES} held out to check \
             accuracy); 100 or more give steadier ranges",
            dir.display(),
            paths.len()
        )));
    }
    let paths: Vec<PathBuf> = spread(&paths, max_images.max(needed));
    let mut bad = Vec::new();
    let mut tensors = Vec::new();
    for p in &paths {
        let result = preprocess::load(p)
            .and_then(|img| preprocess::image_to_input(spec, &img))
            .and_then(|v| {
                Tensor::from_shape(&spec.shape, &v)
                    .map_err(|e| neo_runtime::RuntimeError::Model(e.to_string()))
            });
        match result {
            Ok(t) => tensors.push((p.clone(), t)),
            Err(e) => bad.push(format!("{}: {e}", p.display())),
        }
    }
    if !bad.is_empty() {
        let shown: Vec<&str> = bad.iter().take(3).map(String::as_str).collect();
        return Err(CompileError::Calibration(format!(
            "{} of {} calibration images cannot be read (fix or remove them): {}{}",
            bad.len(),
            paths.len(),
            shown.join("; "),
            if bad.len() > 3 { "; …" } else { "" }
        )));
    }
    let n = tensors.len();
    let n_holdout = ((n as f64 * holdout).round() as usize)
        .max(MIN_HOLDOUT_IMAGES)
        .min(n - MIN_CALIBRATION_IMAGES);
    // Every k-th image is held out, so both parts cover the whole folder.
    let held: std::collections::HashSet<usize> = (0..n_holdout)
        .map(|i| (i * n) / n_holdout + n / (2 * n_holdout))
        .map(|i| i.min(n - 1))
        .collect();
    let (mut calibration, mut holdout_set) = (Vec::new(), Vec::new());
    for (i, item) in tensors.into_iter().enumerate() {
        if held.contains(&i) {
            holdout_set.push(item);
        } else {
            calibration.push(item);
        }
    }
    Ok(CalibrationSet {
        dir: dir.to_path_buf(),
        calibration,
        holdout: holdout_set,
        ignored_files: all_files.saturating_sub(paths.len()),
    })
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok())
                .filter(|e| e.path().is_file())
                .count()
        })
        .unwrap_or(0)
}

/// At most `max` items, evenly spread over `items`.
fn spread<T: Clone>(items: &[T], max: usize) -> Vec<T> {
    if items.len() <= max {
        return items.to_vec();
    }
    (0..max)
        .map(|i| items[i * items.len() / max].clone())
        .collect()
}

/// What calibration learned about one activation tensor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ActivationRange {
    pub min: f32,
    pub max: f32,
    /// Clipping threshold on |x| chosen by the method.
    pub threshold: f32,
    /// int8 step: threshold/127 (signed tensors) or threshold/255 (non-negative ones).
    pub scale: f32,
    /// int8 zero point: 0 (signed) or −128 (non-negative: the full 0..threshold range).
    pub zero_point: i32,
    /// Share of calibration values beyond the threshold (clipped by int8 compute).
    pub clipped: f64,
}

/// Runs the f32 model over the calibration images and measures `tensors`.
pub fn activation_ranges(
    model: &TypedModel,
    tensors: &[OutletId],
    images: &[(PathBuf, Tensor)],
    method: Method,
) -> Result<Vec<ActivationRange>> {
    Ok(activation_stats(model, tensors, &vec![None; tensors.len()], images, method)?.0)
}

/// Per-channel means of the measured tensors (where a channel axis was given).
pub type ChannelMeans = Vec<Option<Vec<f64>>>;

/// Like [`activation_ranges`], with the mean of each tensor per index of `channel_axes[i]`
/// (where given): what bias correction needs.
pub fn activation_stats(
    model: &TypedModel,
    tensors: &[OutletId],
    channel_axes: &[Option<usize>],
    images: &[(PathBuf, Tensor)],
    method: Method,
) -> Result<(Vec<ActivationRange>, ChannelMeans)> {
    let mut probe = model.clone();
    probe
        .select_output_outlets(tensors)
        .map_err(tract("expose the activations"))?;
    let plan = probe
        .into_optimized()
        .map_err(tract("optimize the calibration graph"))?
        .into_runnable()
        .map_err(tract("plan the calibration graph"))?;
    let run = |t: &Tensor| super::gate::run_f32(&plan, t);
    let n = tensors.len();
    let (mut min, mut max) = (vec![f32::INFINITY; n], vec![f32::NEG_INFINITY; n]);
    let mut sums: Vec<Option<(Vec<f64>, u64)>> = vec![None; n];
    for (_, image) in images {
        for (i, (shape, values)) in run(image)?.iter().enumerate() {
            for v in values {
                min[i] = min[i].min(*v);
                max[i] = max[i].max(*v);
            }
            if let Some(axis) = channel_axes
                .get(i)
                .copied()
                .flatten()
                .filter(|a| *a < shape.len())
            {
                let (channels, inner) = (shape[axis], shape[axis + 1..].iter().product::<usize>());
                let entry = sums[i].get_or_insert_with(|| (vec![0.0; channels], 0));
                if entry.0.len() == channels && channels > 0 && inner > 0 {
                    for (k, v) in values.iter().enumerate() {
                        entry.0[(k / inner) % channels] += *v as f64;
                    }
                    entry.1 += (values.len() / channels) as u64;
                }
            }
        }
    }
    let means: Vec<Option<Vec<f64>>> = sums
        .into_iter()
        .map(|s| {
            s.filter(|(_, c)| *c > 0)
                .map(|(v, c)| v.iter().map(|x| x / c as f64).collect())
        })
        .collect();
    let absmax: Vec<f32> = (0..n).map(|i| min[i].abs().max(max[i].abs())).collect();
    let mut hist = vec![vec![0u64; BINS]; n];
    if method != Method::MinMax {
        for (_, image) in images {
            for (i, (_, values)) in run(image)?.iter().enumerate() {
                if absmax[i] <= 0.0 {
                    continue;
                }
                let k = BINS as f32 / absmax[i];
                for v in values {
                    hist[i][((v.abs() * k) as usize).min(BINS - 1)] += 1;
                }
            }
        }
    }
    // Share of tensor i's calibration values beyond a threshold.
    let clipped_by = |i: usize, threshold: f32| -> f64 {
        if absmax[i] <= 0.0 {
            return 0.0;
        }
        let edge = ((threshold / absmax[i]) * BINS as f32) as usize;
        let total: u64 = hist[i].iter().sum();
        let beyond: u64 = hist[i][edge.min(BINS)..].iter().sum();
        if total > 0 {
            beyond as f64 / total as f64
        } else {
            0.0
        }
    };
    let ranges = (0..n)
        .map(|i| {
            let threshold = if absmax[i] <= 0.0 || !absmax[i].is_finite() {
                absmax[i].max(f32::MIN_POSITIVE)
            } else {
                let bin = absmax[i] / BINS as f32;
                match method {
                    Method::MinMax => absmax[i],
                    Method::Percentile(p) => percentile_bin(&hist[i], p) as f32 * bin,
                    Method::Entropy => entropy_or_percentile_bins(&hist[i]) as f32 * bin,
                }
            };
            let clipped = clipped_by(i, threshold);
            let non_negative = min[i] >= 0.0;
            ActivationRange {
                min: min[i],
                max: max[i],
                threshold,
                scale: threshold / if non_negative { 255.0 } else { 127.0 },
                zero_point: if non_negative { -128 } else { 0 },
                clipped,
            }
        })
        .collect();
    Ok((ranges, means))
}

/// Largest share of values the entropy method may clip before it gives way to a percentile.
const ENTROPY_MAX_CLIPPED: f64 = 0.01;

/// The entropy method's bins, unless they clip more than [`ENTROPY_MAX_CLIPPED`] of the
/// values: KL divergence misjudges a tensor with a spike at its maximum (ReLU6 outputs
/// saturated at 6: it clipped 22 % of one of EfficientNet-Lite0's to 0.7, and int8 compute
/// then lost the model), so such tensors get the 99.99th percentile.
fn entropy_or_percentile_bins(hist: &[u64]) -> usize {
    let keep = entropy_bins(hist);
    let total: u64 = hist.iter().sum();
    let beyond: u64 = hist[keep.min(hist.len())..].iter().sum();
    if total > 0 && beyond as f64 / total as f64 > ENTROPY_MAX_CLIPPED {
        percentile_bin(hist, 99.99)
    } else {
        keep
    }
}

/// The number of bins (from zero) holding `p` percent of the values.
fn percentile_bin(hist: &[u64], p: f64) -> usize {
    let total: u64 = hist.iter().sum();
    let want = (total as f64 * p / 100.0).ceil() as u64;
    let mut seen = 0;
    for (i, c) in hist.iter().enumerate() {
        seen += c;
        if seen >= want {
            return i + 1;
        }
    }
    hist.len()
}

/// The number of bins (from zero) to keep so that squeezing them into 128 levels loses the
/// least information: the KL divergence between the clipped reference distribution and its
/// quantized version is smallest (the method TensorRT popularized).
fn entropy_bins(hist: &[u64]) -> usize {
    let mut best = (f64::INFINITY, hist.len());
    let total_after = |from: usize| hist[from..].iter().sum::<u64>() as f64;
    for keep in LEVELS..=hist.len() {
        let mut p: Vec<f64> = hist[..keep].iter().map(|c| *c as f64).collect();
        p[keep - 1] += total_after(keep);
        // Merge the kept bins into LEVELS levels, spread each level's mass over the bins that
        // held something.
        let mut q = vec![0f64; keep];
        for level in 0..LEVELS {
            let (a, b) = (level * keep / LEVELS, (level + 1) * keep / LEVELS);
            let mass: f64 = hist[a..b].iter().map(|c| *c as f64).sum();
            let used = hist[a..b].iter().filter(|c| **c > 0).count();
            if used > 0 {
                for j in a..b {
                    if hist[j] > 0 {
                        q[j] = mass / used as f64;
                    }
                }
            }
        }
        let (ps, qs): (f64, f64) = (p.iter().sum(), q.iter().sum());
        if ps <= 0.0 || qs <= 0.0 {
            continue;
        }
        let mut kl = 0.0;
        for (pi, qi) in p.iter().zip(&q) {
            if *pi > 0.0 {
                let (pn, qn) = (pi / ps, (qi / qs).max(1e-12));
                kl += pn * (pn / qn).ln();
            }
        }
        if kl < best.0 {
            best = (kl, keep);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_clips_rare_outliers() {
        let mut hist = vec![0u64; BINS];
        hist[..100].iter_mut().for_each(|c| *c = 1000);
        hist[BINS - 1] = 1; // one outlier at the far end
        assert_eq!(percentile_bin(&hist, 100.0), BINS);
        assert_eq!(percentile_bin(&hist, 99.99), 100);
    }

    #[test]
    fn entropy_keeps_the_bulk_and_drops_a_far_tail() {
        // A half-normal bulk in the first 400 bins and a thin tail to the end.
        let mut hist = vec![0u64; BINS];
        for (i, c) in hist.iter_mut().enumerate() {
            let x = i as f64 / 130.0;
            *c = (1e6 * (-x * x / 2.0).exp()) as u64 + u64::from(i % 97 == 0);
        }
        let keep = entropy_bins(&hist);
        assert!((300..1200).contains(&keep), "kept {keep} bins");
    }

    #[test]
    fn entropy_does_not_clip_a_saturated_spike() {
        // ReLU6-like: most values 0, a decaying bulk, and a share stuck at the maximum.
        let mut hist = vec![0u64; BINS];
        for (i, c) in hist.iter_mut().enumerate() {
            *c = (1e5 * (-(i as f64) / 40.0).exp()) as u64;
        }
        let bulk: u64 = hist.iter().sum();
        hist[0] += 3 * bulk;
        hist[BINS - 1] = bulk / 2;
        // KL alone would cut the spike off.
        assert!(
            entropy_bins(&hist) < BINS / 2,
            "KL kept {}",
            entropy_bins(&hist)
        );
        let keep = entropy_or_percentile_bins(&hist);
        let beyond: u64 = hist[keep..].iter().sum();
        assert!(
            beyond as f64 / hist.iter().sum::<u64>() as f64 <= ENTROPY_MAX_CLIPPED,
            "kept {keep} bins"
        );
        assert_eq!(keep, BINS);
    }

    #[test]
    fn spread_keeps_the_ends_of_the_folder() {
        let v: Vec<usize> = (0..10).collect();
        assert_eq!(spread(&v, 5), vec![0, 2, 4, 6, 8]);
        assert_eq!(spread(&v, 20), v);
    }
}
