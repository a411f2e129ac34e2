//! Baseline models learned from normal data only: Mahalanobis distance with a Ledoit-Wolf
//! shrunk covariance, and PCA with Hotelling's T² plus the Q statistic (squared prediction
//! error). Both standardize the (log-transformed where marked) features first, and both
//! say which features pushed a score up.

use crate::error::{Result, SensorError};
use crate::features::FeatureDef;
use crate::linalg::{self, Square};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    Mahalanobis,
    /// PCA T² + Q.
    Pca,
}

impl std::str::FromStr for ModelKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "mahalanobis" => Ok(ModelKind::Mahalanobis),
            "pca" | "t2q" | "pca-t2q" => Ok(ModelKind::Pca),
            other => Err(format!(
                "unknown model kind '{other}': use mahalanobis or pca"
            )),
        }
    }
}

/// The fitted parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Detector {
    Mahalanobis {
        /// Inverse of the shrunk covariance of the standardized features, row-major.
        precision: Vec<f64>,
        shrinkage: f64,
    },
    Pca {
        /// Principal axes (rows), in the standardized feature space.
        components: Vec<Vec<f64>>,
        eigenvalues: Vec<f64>,
        /// Share of the variance the kept components explain.
        explained: f64,
        /// T² and Q at the training quantile: each statistic is divided by its limit and
        /// the larger ratio is the raw score.
        t2_limit: f64,
        q_limit: f64,
    },
}

/// A fitted model over a feature vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SensorModel {
    /// Every feature the extractor produces, in order.
    pub features: Vec<FeatureDef>,
    /// Indices (into `features`) the model uses; constant features are left out.
    pub used: Vec<usize>,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    pub detector: Detector,
    /// Raw score at the decision threshold: normalized scores divide by it (1.0 = threshold).
    pub threshold: f64,
}

/// How much one feature added to a score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contribution {
    pub feature: String,
    /// Share of the score (0..1; the shares of all features sum to 1, negatives count 0).
    pub share: f64,
    /// The feature's standardized deviation from normal (in standard deviations).
    pub z: f64,
}

/// A window's score.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    pub raw: f64,
    /// `raw / threshold`: 1.0 is the threshold.
    pub normalized: f64,
    /// Top contributors, largest first.
    pub top: Vec<Contribution>,
}

/// Options for fitting.
#[derive(Debug, Clone)]
pub struct FitOptions {
    pub kind: ModelKind,
    /// PCA: keep components up to this share of the variance.
    pub pca_variance: f64,
    /// PCA: quantile of the training statistics used as the T² and Q limits.
    pub pca_limit_quantile: f64,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            kind: ModelKind::Mahalanobis,
            pca_variance: 0.9,
            pca_limit_quantile: 0.99,
        }
    }
}

/// Where the decision threshold goes: the tail `holdout` share of the normal windows (in
/// time order) is kept out of the fit, and the threshold is the `quantile` of their scores
/// times `margin`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdRule {
    pub holdout: f64,
    pub quantile: f64,
    pub margin: f64,
}

impl Default for ThresholdRule {
    fn default() -> Self {
        ThresholdRule {
            holdout: 0.2,
            quantile: 0.995,
            margin: 1.0,
        }
    }
}

impl ThresholdRule {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..0.9).contains(&self.holdout)
            || !(0.5..=1.0).contains(&self.quantile)
            || self.margin.is_nan()
            || self.margin <= 0.0
        {
            return Err(SensorError::Config(format!(
                "threshold rule needs holdout in [0, 0.9), quantile in [0.5, 1] and margin > 0 (got {}, {}, {})",
                self.holdout, self.quantile, self.margin
            )));
        }
        Ok(())
    }
}

/// What fitting noticed and the user should hear.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FitReport {
    /// Features constant in the normal data, left out of the model.
    pub constant: Vec<String>,
    pub windows: usize,
    /// Windows held out for the threshold.
    #[serde(default)]
    pub holdout_windows: usize,
    /// How the threshold was chosen, in words.
    #[serde(default)]
    pub threshold_method: String,
}

/// Fits on normal windows grouped by recording (each in time order) and sets the
/// threshold by `rule` on the tail of each recording.
pub fn fit_with_threshold(
    features: Vec<FeatureDef>,
    recordings: &[Vec<Vec<f64>>],
    opts: &FitOptions,
    rule: &ThresholdRule,
) -> Result<(SensorModel, FitReport)> {
    rule.validate()?;
    let (mut fit, mut hold) = (Vec::new(), Vec::new());
    for rows in recordings {
        let h = ((rows.len() as f64) * rule.holdout).round() as usize;
        let split = rows.len() - h.min(rows.len());
        fit.extend_from_slice(&rows[..split]);
        hold.extend_from_slice(&rows[split..]);
    }
    let (mut model, mut report) = SensorModel::fit(features, &fit, opts)?;
    let (rows, on) = if hold.is_empty() {
        (&fit, "the training windows (no hold-out)")
    } else {
        (&hold, "held-out normal windows")
    };
    model.set_threshold_quantile(rows, rule.quantile, rule.margin)?;
    report.holdout_windows = hold.len();
    report.threshold_method = format!(
        "{:.2} % quantile of the scores of {} {on}{}",
        rule.quantile * 100.0,
        rows.len(),
        if (rule.margin - 1.0).abs() > 1e-12 {
            format!(", times {}", rule.margin)
        } else {
            String::new()
        }
    );
    Ok((model, report))
}

fn transform(def: &FeatureDef, v: f64) -> f64 {
    if !v.is_finite() {
        // Never let `max` turn NaN into a plausible number.
        return f64::NAN;
    }
    if def.log {
        v.max(1e-12).ln()
    } else {
        v
    }
}

impl SensorModel {
    /// Fits on normal windows (raw feature vectors). The threshold is left at 1.0: set it
    /// with [`SensorModel::set_threshold_quantile`] on held-out normal windows.
    pub fn fit(
        features: Vec<FeatureDef>,
        rows: &[Vec<f64>],
        opts: &FitOptions,
    ) -> Result<(Self, FitReport)> {
        let d_all = features.len();
        if rows.iter().any(|r| r.len() != d_all) {
            return Err(SensorError::BadModel(
                "a feature row has the wrong length".into(),
            ));
        }
        let min_rows = 10;
        if rows.len() < min_rows {
            return Err(SensorError::TooLittleData(format!(
                "{} windows of normal data; at least {min_rows} are needed (give more normal data, or use shorter windows / a smaller hop)",
                rows.len()
            )));
        }
        let t: Vec<Vec<f64>> = rows
            .iter()
            .map(|r| {
                r.iter()
                    .zip(&features)
                    .map(|(v, f)| transform(f, *v))
                    .collect()
            })
            .collect();
        if t.iter().flatten().any(|v| !v.is_finite()) {
            return Err(SensorError::BadModel(
                "normal data produced a non-finite feature".into(),
            ));
        }
        let mean_all = linalg::column_means(&t);
        let mut used = Vec::new();
        let mut report = FitReport {
            windows: rows.len(),
            ..FitReport::default()
        };
        let mut std_all = vec![0.0; d_all];
        for j in 0..d_all {
            let var = t.iter().map(|r| (r[j] - mean_all[j]).powi(2)).sum::<f64>() / t.len() as f64;
            std_all[j] = var.sqrt();
            if std_all[j] > 1e-9 * (1.0 + mean_all[j].abs()) {
                used.push(j);
            } else {
                report.constant.push(features[j].name.clone());
            }
        }
        if used.is_empty() {
            return Err(SensorError::TooLittleData(
                "every feature is constant in the normal data: are the sensors connected?".into(),
            ));
        }
        let mean: Vec<f64> = used.iter().map(|&j| mean_all[j]).collect();
        let std: Vec<f64> = used.iter().map(|&j| std_all[j]).collect();
        let z: Vec<Vec<f64>> = t
            .iter()
            .map(|r| {
                used.iter()
                    .enumerate()
                    .map(|(k, &j)| (r[j] - mean[k]) / std[k])
                    .collect()
            })
            .collect();
        let d = used.len();
        let detector = match opts.kind {
            ModelKind::Mahalanobis => {
                let (cov, shrinkage) = linalg::ledoit_wolf(&z);
                let (vals, vecs) = linalg::symmetric_eigen(&cov);
                let floor = vals.first().copied().unwrap_or(1.0).max(1e-12) * 1e-9;
                let mut p = Square::zeros(d);
                for (k, &l) in vals.iter().enumerate() {
                    let inv = 1.0 / l.max(floor);
                    for i in 0..d {
                        for j in 0..d {
                            p.data[i * d + j] += vecs.get(k, i) * inv * vecs.get(k, j);
                        }
                    }
                }
                Detector::Mahalanobis {
                    precision: p.data,
                    shrinkage,
                }
            }
            ModelKind::Pca => {
                let cov = linalg::covariance(&z);
                let (vals, vecs) = linalg::symmetric_eigen(&cov);
                let total: f64 = vals.iter().map(|v| v.max(0.0)).sum::<f64>().max(1e-12);
                let mut k = 0;
                let mut acc = 0.0;
                while k < d && acc / total < opts.pca_variance {
                    acc += vals[k].max(0.0);
                    k += 1;
                }
                let k = k.clamp(1, d.saturating_sub(1).max(1));
                let explained = vals[..k].iter().map(|v| v.max(0.0)).sum::<f64>() / total;
                let components: Vec<Vec<f64>> = (0..k)
                    .map(|c| (0..d).map(|i| vecs.get(c, i)).collect())
                    .collect();
                let eigenvalues: Vec<f64> = vals[..k].iter().map(|v| v.max(1e-12)).collect();
                let mut det = Detector::Pca {
                    components,
                    eigenvalues,
                    explained,
                    t2_limit: 1.0,
                    q_limit: 1.0,
                };
                let stats: Vec<(f64, f64)> = z.iter().map(|r| pca_stats(&det, r)).collect();
                let t2: Vec<f64> = stats.iter().map(|s| s.0).collect();
                let q: Vec<f64> = stats.iter().map(|s| s.1).collect();
                if let Detector::Pca {
                    t2_limit, q_limit, ..
                } = &mut det
                {
                    *t2_limit = linalg::quantile(&t2, opts.pca_limit_quantile).max(1e-12);
                    *q_limit = linalg::quantile(&q, opts.pca_limit_quantile).max(1e-12);
                }
                det
            }
        };
        Ok((
            SensorModel {
                features,
                used,
                mean,
                std,
                detector,
                threshold: 1.0,
            },
            report,
        ))
    }

    /// Checks parameter shapes (a model read from an artifact).
    pub fn validate(&self) -> Result<()> {
        let d = self.used.len();
        let bad = |m: &str| Err(SensorError::BadModel(m.to_string()));
        if d == 0 || self.mean.len() != d || self.std.len() != d {
            return bad("mean/std do not match the used features");
        }
        if self.used.iter().any(|&j| j >= self.features.len()) {
            return bad("a used feature index is out of range");
        }
        if self.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
            || !(self.threshold.is_finite() && self.threshold > 0.0)
        {
            return bad("std and threshold must be positive");
        }
        match &self.detector {
            Detector::Mahalanobis { precision, .. } if precision.len() != d * d => {
                bad("precision matrix has the wrong size")
            }
            Detector::Pca {
                components,
                eigenvalues,
                t2_limit,
                q_limit,
                ..
            } if components.len() != eigenvalues.len()
                || components.is_empty()
                || components.iter().any(|c| c.len() != d)
                || eigenvalues.iter().any(|l| *l <= 0.0)
                || *t2_limit <= 0.0
                || *q_limit <= 0.0 =>
            {
                bad("PCA parameters are inconsistent")
            }
            _ => Ok(()),
        }
    }

    fn standardize(&self, values: &[f64]) -> Result<Vec<f64>> {
        if values.len() != self.features.len() {
            return Err(SensorError::BadModel(format!(
                "{} features given, the model expects {}",
                values.len(),
                self.features.len()
            )));
        }
        Ok(self
            .used
            .iter()
            .enumerate()
            .map(|(k, &j)| (transform(&self.features[j], values[j]) - self.mean[k]) / self.std[k])
            .collect())
    }

    /// Raw score of one window's features (no contributions: the fast path for thresholds
    /// and evaluation).
    pub fn raw_score(&self, values: &[f64]) -> Result<f64> {
        let z = self.standardize(values)?;
        let s = match &self.detector {
            Detector::Mahalanobis { precision, .. } => {
                let d = z.len();
                let mut acc = 0.0;
                for i in 0..d {
                    let row = &precision[i * d..(i + 1) * d];
                    acc += z[i] * row.iter().zip(&z).map(|(a, b)| a * b).sum::<f64>();
                }
                acc / d as f64
            }
            Detector::Pca {
                t2_limit, q_limit, ..
            } => {
                let (t2, q) = pca_stats(&self.detector, &z);
                (t2 / t2_limit).max(q / q_limit)
            }
        };
        if s.is_finite() {
            Ok(s)
        } else {
            Err(SensorError::BadModel("the score is not finite".into()))
        }
    }

    /// Score with the top `top_n` contributing features.
    pub fn score(&self, values: &[f64], top_n: usize) -> Result<Score> {
        let raw = self.raw_score(values)?;
        let z = self.standardize(values)?;
        let d = z.len();
        let contrib: Vec<f64> = match &self.detector {
            Detector::Mahalanobis { precision, .. } => (0..d)
                .map(|i| {
                    z[i] * precision[i * d..(i + 1) * d]
                        .iter()
                        .zip(&z)
                        .map(|(a, b)| a * b)
                        .sum::<f64>()
                })
                .collect(),
            Detector::Pca {
                components,
                eigenvalues,
                t2_limit,
                q_limit,
                ..
            } => {
                let t: Vec<f64> = components
                    .iter()
                    .map(|c| c.iter().zip(&z).map(|(a, b)| a * b).sum())
                    .collect();
                let mut recon = vec![0.0; d];
                for (c, tj) in components.iter().zip(&t) {
                    for (r, p) in recon.iter_mut().zip(c) {
                        *r += tj * p;
                    }
                }
                let (t2, q) = pca_stats(&self.detector, &z);
                if q / q_limit >= t2 / t2_limit {
                    (0..d).map(|i| (z[i] - recon[i]).powi(2)).collect()
                } else {
                    (0..d)
                        .map(|i| {
                            z[i] * components
                                .iter()
                                .zip(&t)
                                .zip(eigenvalues)
                                .map(|((c, tj), l)| c[i] * tj / l)
                                .sum::<f64>()
                        })
                        .collect()
                }
            }
        };
        let total: f64 = contrib.iter().map(|c| c.max(0.0)).sum::<f64>().max(1e-300);
        let mut order: Vec<usize> = (0..d).collect();
        order.sort_by(|&a, &b| contrib[b].total_cmp(&contrib[a]));
        let top = order
            .into_iter()
            .take(top_n)
            .map(|k| Contribution {
                feature: self.features[self.used[k]].name.clone(),
                share: contrib[k].max(0.0) / total,
                z: z[k],
            })
            .collect();
        Ok(Score {
            raw,
            normalized: raw / self.threshold,
            top,
        })
    }

    /// Sets the threshold at the `q` quantile of `rows`' raw scores (held-out normal data),
    /// times `margin`. Returns the threshold.
    pub fn set_threshold_quantile(
        &mut self,
        rows: &[Vec<f64>],
        q: f64,
        margin: f64,
    ) -> Result<f64> {
        if rows.is_empty() {
            return Err(SensorError::TooLittleData(
                "no held-out normal windows to set the threshold on".into(),
            ));
        }
        let scores = rows
            .iter()
            .map(|r| self.raw_score(r))
            .collect::<Result<Vec<_>>>()?;
        self.threshold = (linalg::quantile(&scores, q) * margin).max(1e-12);
        Ok(self.threshold)
    }
}

/// (T², Q) of a standardized vector.
fn pca_stats(det: &Detector, z: &[f64]) -> (f64, f64) {
    let Detector::Pca {
        components,
        eigenvalues,
        ..
    } = det
    else {
        return (0.0, 0.0);
    };
    let mut t2 = 0.0;
    let mut explained = 0.0;
    for (c, l) in components.iter().zip(eigenvalues) {
        let t: f64 = c.iter().zip(z).map(|(a, b)| a * b).sum();
        t2 += t * t / l;
        explained += t * t;
    }
    let q = (z.iter().map(|v| v * v).sum::<f64>() - explained).max(0.0);
    (t2, q)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Correlated 3-feature normal data: b follows a, c is independent.
    fn normal_rows(n: usize, seed: u64) -> Vec<Vec<f64>> {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Sum of uniforms ~ roughly normal.
            (0..6)
                .map(|_| (s >> 11) as f64 / (1u64 << 53) as f64)
                .sum::<f64>()
                - 3.0
        };
        (0..n)
            .map(|_| {
                let a = next();
                vec![a, a + 0.1 * next(), next(), 5.0]
            })
            .collect()
    }

    fn defs() -> Vec<FeatureDef> {
        ["a", "b", "c", "constant"]
            .iter()
            .map(|n| FeatureDef {
                name: n.to_string(),
                log: false,
            })
            .collect()
    }

    #[test]
    fn both_models_flag_a_broken_correlation_and_name_the_feature() {
        let rows = normal_rows(2000, 7);
        for kind in [ModelKind::Mahalanobis, ModelKind::Pca] {
            let opts = FitOptions {
                kind,
                ..FitOptions::default()
            };
            let (mut m, report) = SensorModel::fit(defs(), &rows, &opts).expect("fit");
            assert_eq!(report.constant, vec!["constant".to_string()]);
            m.set_threshold_quantile(&normal_rows(500, 99), 0.995, 1.0)
                .expect("threshold");
            m.validate().expect("valid");
            // Normal-looking point: under the threshold.
            let ok = m.score(&[0.5, 0.52, -0.3, 5.0], 2).expect("score");
            assert!(ok.normalized < 1.0, "{kind:?}: {ok:?}");
            // a and b disagree (each alone is within range): the correlation breaks.
            let bad = m.score(&[1.0, -1.0, 0.0, 5.0], 2).expect("score");
            assert!(bad.normalized > 3.0, "{kind:?}: {bad:?}");
            let names: Vec<&str> = bad.top.iter().map(|c| c.feature.as_str()).collect();
            assert!(
                names.contains(&"a") && names.contains(&"b"),
                "{kind:?}: {names:?}"
            );
        }
    }

    #[test]
    fn too_few_windows_and_all_constant_are_refused() {
        let e = SensorModel::fit(defs(), &normal_rows(5, 1), &FitOptions::default())
            .expect_err("refuse");
        assert!(e.to_string().contains("at least 10"), "{e}");
        let flat = vec![vec![1.0, 2.0, 3.0, 4.0]; 50];
        let e = SensorModel::fit(defs(), &flat, &FitOptions::default()).expect_err("refuse");
        assert!(e.to_string().contains("constant"), "{e}");
    }
}
