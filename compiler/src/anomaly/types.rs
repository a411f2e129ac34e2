//! The optional defect-type head of a detector (`neoc train anomaly --defect-types DIR`): a
//! softmax regression on the mean patch feature of each image's most anomalous map cells,
//! trained here on labelled defect images (one folder per type). The device evaluates it with
//! `neo_runtime::anomaly::defect_type` on the patch features the detector graph also outputs.
//!
//! A linear head on ~150 pooled values needs no autodiff framework: full-batch gradient
//! descent on the cross-entropy with a small L2 penalty converges in a few hundred steps.

use super::head::PATCHES;
use super::train::collect_images;
use crate::error::{CompileError, Result};
use neo_runtime::anomaly::{linear_softmax, pooled_features};
use neo_runtime::manifest::{AnomalySpec, DefectTypes};
use neo_runtime::{preprocess, Model};
use std::path::{Path, PathBuf};

/// Most anomalous map cells whose features are averaged.
pub const POOL_CELLS: usize = 16;
/// Fewest images per type.
pub const MIN_PER_TYPE: usize = 2;
const STEPS: usize = 500;
const LEARNING_RATE: f32 = 0.5;
const L2: f32 = 1e-2;

fn opt(msg: String) -> CompileError {
    CompileError::Options(msg)
}

/// The labelled folders: one subfolder of `dir` per defect type, named after it.
pub fn type_folders(dir: &Path) -> Result<Vec<(String, Vec<PathBuf>)>> {
    let entries = std::fs::read_dir(dir).map_err(|source| CompileError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut types = Vec::new();
    for e in entries {
        let path = e
            .map_err(|source| CompileError::Io {
                path: dir.to_path_buf(),
                source,
            })?
            .path();
        if path.is_dir() {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            types.push((name, collect_images(std::slice::from_ref(&path))?));
        }
    }
    types.sort();
    if types.len() < 2 {
        return Err(opt(format!(
            "--defect-types {} needs one folder per defect type (at least 2, e.g. crack/ and scratch/), found {}",
            dir.display(),
            types.len()
        )));
    }
    if let Some((name, images)) = types.iter().find(|(_, i)| i.len() < MIN_PER_TYPE) {
        return Err(opt(format!(
            "defect type '{name}' has {} image(s); give each type at least {MIN_PER_TYPE}",
            images.len()
        )));
    }
    Ok(types)
}

/// Softmax regression weights [classes, dim] and biases on standardized features.
struct Fit {
    weights: Vec<f32>,
    bias: Vec<f32>,
}

fn fit(x: &[Vec<f32>], y: &[usize], classes: usize) -> Fit {
    let dim = x.first().map_or(0, Vec::len);
    let n = x.len().max(1) as f32;
    let mut w = vec![0f32; classes * dim];
    let mut b = vec![0f32; classes];
    for _ in 0..STEPS {
        let mut gw = vec![0f32; classes * dim];
        let mut gb = vec![0f32; classes];
        for (xi, &yi) in x.iter().zip(y) {
            let p = linear_softmax(&w, &b, xi);
            for k in 0..classes {
                let err = p[k] - (k == yi) as u8 as f32;
                gb[k] += err;
                for (g, v) in gw[k * dim..(k + 1) * dim].iter_mut().zip(xi) {
                    *g += err * v;
                }
            }
        }
        for (wk, g) in w.iter_mut().zip(&gw) {
            *wk -= LEARNING_RATE * (g / n + L2 * *wk);
        }
        for (bk, g) in b.iter_mut().zip(&gb) {
            *bk -= LEARNING_RATE * g / n;
        }
    }
    Fit {
        weights: w,
        bias: b,
    }
}

fn argmax(p: &[f32]) -> usize {
    p.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// Per-feature mean and standard deviation (floored so constant features stay finite).
fn standardizer(x: &[Vec<f32>]) -> (Vec<f32>, Vec<f32>) {
    let dim = x.first().map_or(0, Vec::len);
    let n = x.len().max(1) as f64;
    let mut mean = vec![0f64; dim];
    let mut sq = vec![0f64; dim];
    for xi in x {
        for j in 0..dim {
            mean[j] += xi[j] as f64;
            sq[j] += (xi[j] as f64).powi(2);
        }
    }
    let mean: Vec<f64> = mean.iter().map(|m| m / n).collect();
    let std: Vec<f32> = sq
        .iter()
        .zip(&mean)
        .map(|(s, m)| ((s / n - m * m).max(0.0).sqrt()).max(1e-3) as f32)
        .collect();
    (mean.iter().map(|m| *m as f32).collect(), std)
}

fn standardized(x: &[Vec<f32>], mean: &[f32], std: &[f32]) -> Vec<Vec<f32>> {
    x.iter()
        .map(|xi| {
            xi.iter()
                .zip(mean.iter().zip(std))
                .map(|(v, (m, s))| (v - m) / s)
                .collect()
        })
        .collect()
}

/// Trains a head on standardized features and folds the standardization into it.
fn train_folded(x: &[Vec<f32>], y: &[usize], classes: usize) -> Fit {
    let (mean, std) = standardizer(x);
    let f = fit(&standardized(x, &mean, &std), y, classes);
    let dim = mean.len();
    let mut weights = f.weights;
    let mut bias = f.bias;
    for k in 0..classes {
        for j in 0..dim {
            weights[k * dim + j] /= std[j];
            bias[k] -= weights[k * dim + j] * mean[j];
        }
    }
    Fit { weights, bias }
}

/// What training the head gave.
pub struct TypeHead {
    pub types: DefectTypes,
    /// Images right when classified by a head trained without them (cross-validation).
    pub cv_correct: usize,
    /// "leave-one-out" or "10-fold".
    pub validation: &'static str,
    pub images: usize,
}

/// Up to this many labelled images the head is checked leave-one-out, above 10-fold.
const LEAVE_ONE_OUT_UP_TO: usize = 100;

/// Trains the head on the detector's pooled patch features of every labelled image.
pub fn train_head(
    model: &Model,
    spec: &AnomalySpec,
    folders: &[(String, Vec<PathBuf>)],
) -> Result<TypeHead> {
    let (mut x, mut y, mut trained_on) = (Vec::new(), Vec::new(), Vec::new());
    for (label, (name, images)) in folders.iter().enumerate() {
        for p in images {
            let img = preprocess::load(p)?;
            let outputs = model.run(vec![model.image_tensor(&img)?])?;
            let (map, h, w, features) = model.map_and_features(&outputs, PATCHES)?;
            x.push(pooled_features(spec, POOL_CELLS, &map, h, w, &features)?);
            y.push(label);
            let file = p
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            trained_on.push(format!("{name}/{file}"));
        }
    }
    let classes = folders.len();
    let folds = if x.len() <= LEAVE_ONE_OUT_UP_TO {
        x.len()
    } else {
        10
    };
    let cv_correct = (0..folds)
        .map(|fold| {
            let (train, test): (Vec<usize>, Vec<usize>) =
                (0..x.len()).partition(|i| i % folds != fold);
            let xs: Vec<Vec<f32>> = train.iter().map(|&i| x[i].clone()).collect();
            let ys: Vec<usize> = train.iter().map(|&i| y[i]).collect();
            let f = train_folded(&xs, &ys, classes);
            test.iter()
                .filter(|&&i| argmax(&linear_softmax(&f.weights, &f.bias, &x[i])) == y[i])
                .count()
        })
        .sum();
    let f = train_folded(&x, &y, classes);
    Ok(TypeHead {
        types: DefectTypes {
            features_output: PATCHES.to_string(),
            labels: folders.iter().map(|(n, _)| n.clone()).collect(),
            pool_cells: POOL_CELLS,
            weights: f.weights,
            bias: f.bias,
            trained_on,
        },
        cv_correct,
        validation: if folds == x.len() {
            "leave-one-out"
        } else {
            "10-fold"
        },
        images: x.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_separates_two_clusters_and_folds_its_standardization() {
        // Two types apart in feature 1 only, on a large offset and scale (standardization
        // must make that learnable and the folded head must give the same answers raw).
        let x: Vec<Vec<f32>> = (0..20)
            .map(|i| {
                let t = (i % 2) as f32;
                vec![
                    1000.0 + (i as f32 * 0.37).sin(),
                    50.0 + 4.0 * t + (i as f32).cos(),
                ]
            })
            .collect();
        let y: Vec<usize> = (0..20).map(|i| i % 2).collect();
        let f = train_folded(&x, &y, 2);
        for (xi, yi) in x.iter().zip(&y) {
            let p = linear_softmax(&f.weights, &f.bias, xi);
            assert_eq!(argmax(&p), *yi, "{p:?}");
        }
        // A point far on type 1's side is type 1 with high confidence.
        let p = linear_softmax(&f.weights, &f.bias, &[1000.0, 60.0]);
        assert!(p[1] > 0.95, "{p:?}");
    }

    #[test]
    fn too_few_folders_or_images_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("crack")).unwrap();
        let err = type_folders(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("at least 2") && err.contains("found 1"),
            "{err}"
        );
        std::fs::create_dir(dir.path().join("scratch")).unwrap();
        let err = type_folders(dir.path()).unwrap_err().to_string();
        assert!(err.contains("has 0 image(s)"), "{err}");
    }
}
