//! neo sensor anomaly detection (Monitron-like): streaming features over sliding windows
//! of vibration or process signals, baseline models learned from normal data only
//! (Mahalanobis with shrinkage, PCA T² + Q), Healthy/Warning/Alarm with persistence and
//! hysteresis plus an ISO 20816-style guard, and the readers for CSV replay (SKAB) and
//! MATLAB v5 files (CWRU).
//!
//! Small and dependency-light on purpose (serde, rustfft, miniz_oxide): it runs on the
//! device inside the gateway and is trained by `neoc train sensor`.
//!
//! ```text
//! samples ─► Extractor (windows → features) ─► SensorModel (score, contributors) ─► AlarmState
//! └──────────────────────────────── Monitor ────────────────────────────────────────────┘
//! ```

pub mod alarm;
pub mod csv;
mod error;
pub mod features;
pub mod linalg;
pub mod mat;
pub mod model;
pub mod recording;

pub use alarm::{AlarmPolicy, AlarmState, Health, MachineClass, Transition};
pub use error::{Result, SensorError};
pub use features::{Extractor, FeatureConfig, FeatureWindow, WindowOutcome};
pub use model::{Contribution, FitReport, ModelKind, Score, SensorModel, ThresholdRule};
pub use recording::Recording;

use serde::{Deserialize, Serialize};

/// Version of [`SensorSpec`]; bump on incompatible changes.
pub const SPEC_VERSION: u32 = 1;

/// What a sensor model artifact says about itself (it sits in the artifact manifest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SensorSpec {
    pub version: u32,
    /// Input channels in frame order (CSV column names, or the names given to raw streams).
    pub channels: Vec<String>,
    pub features: FeatureConfig,
    pub model: ModelKind,
    pub alarm: AlarmPolicy,
    /// How the threshold was chosen, in words.
    pub threshold_method: String,
    pub training: TrainingInfo,
    /// Learn the baseline on the device: every new stream first collects this many frames
    /// of (assumed normal) data, fits the model and threshold on them, then scores. The
    /// model in the artifact is then only the template (features, kind, alarm rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commissioning: Option<Commissioning>,
}

/// On-device baseline learning (how Monitron-style sensors start: the first days are
/// assumed normal).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Commissioning {
    /// Frames (samples or rows) to learn from.
    pub frames: u64,
    pub threshold: ThresholdRule,
}

/// Where the normal data came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingInfo {
    pub sources: Vec<TrainingSource>,
    /// Windows the model was fitted on, and held out for the threshold.
    pub windows: usize,
    pub holdout_windows: usize,
    /// Features constant in the normal data (left out of the model).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constant_features: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSource {
    /// File name (no directories).
    pub file: String,
    pub sha256: String,
    /// Frames (samples or rows) used: `[start, end)`.
    pub frames: [u64; 2],
}

/// One scored window.
#[derive(Debug, Clone, PartialEq)]
pub struct Assessment {
    /// Index of the window's last frame since the stream started.
    pub end: u64,
    pub time_s: Option<f64>,
    pub score: Score,
    pub transition: Transition,
    /// Largest velocity RMS over the channels (vibration), mm/s.
    pub vel_rms_mm_s: Option<f64>,
    /// Non-finite samples repaired in this window.
    pub repaired: usize,
}

/// What one pushed frame produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Assessed(Assessment),
    /// A window that could not be scored (too many bad samples).
    Skipped {
        end: u64,
        reason: String,
    },
    /// Commissioning: a window collected to learn the baseline from.
    Learning {
        end: u64,
        windows: usize,
    },
    /// Commissioning finished: the baseline was fitted and scoring starts.
    Learned {
        end: u64,
        report: FitReport,
        threshold: f64,
    },
}

/// Commissioning keeps at most this many windows while it waits for enough varied data.
pub const MAX_LEARNING_WINDOWS: usize = 100_000;

/// Features → score → alarm state, fed frame by frame: the streaming API the device's
/// sensor sources push into.
pub struct Monitor {
    extractor: Extractor,
    model: SensorModel,
    kind: ModelKind,
    /// Commissioning still under way: the rule and the windows collected so far.
    learning: Option<(Commissioning, Vec<Vec<f64>>)>,
    alarm: AlarmState,
    vel_features: Vec<usize>,
    /// Contributors reported per window.
    pub top_n: usize,
}

impl Monitor {
    pub fn new(spec: &SensorSpec, model: SensorModel) -> Result<Self> {
        if spec.version != SPEC_VERSION {
            return Err(SensorError::BadModel(format!(
                "sensor spec version {} (this runtime reads {SPEC_VERSION}); retrain with a matching neoc",
                spec.version
            )));
        }
        spec.alarm.validate().map_err(SensorError::Config)?;
        model.validate()?;
        let extractor = Extractor::new(spec.features.clone(), spec.channels.clone())?;
        let defs = extractor.feature_defs();
        if defs != model.features {
            return Err(SensorError::BadModel(
                "the model's features do not match its feature configuration".into(),
            ));
        }
        let vel_features = defs
            .iter()
            .enumerate()
            .filter(|(_, d)| d.name.ends_with(".vel_rms_10_1000_mm_s"))
            .map(|(i, _)| i)
            .collect();
        if let Some(c) = &spec.commissioning {
            c.threshold.validate()?;
        }
        Ok(Monitor {
            extractor,
            model,
            kind: spec.model,
            learning: spec.commissioning.clone().map(|c| (c, Vec::new())),
            alarm: AlarmState::new(spec.alarm.clone()),
            vel_features,
            top_n: 3,
        })
    }

    pub fn model(&self) -> &SensorModel {
        &self.model
    }

    pub fn extractor(&self) -> &Extractor {
        &self.extractor
    }

    pub fn health(&self) -> Health {
        self.alarm.health()
    }

    /// Whether the monitor is still learning its baseline.
    pub fn is_learning(&self) -> bool {
        self.learning.is_some()
    }

    /// Forgets buffered samples (the source restarted or had a gap).
    pub fn reset(&mut self) {
        self.extractor.reset();
    }

    /// One frame (a value per channel); `time_s` for timestamped process rows.
    pub fn push(&mut self, frame: &[f64], time_s: Option<f64>) -> Result<Option<Event>> {
        match self.extractor.push(frame, time_s)? {
            None => Ok(None),
            Some(w) => self.assess(w).map(Some),
        }
    }

    /// Interleaved frames; every event produced on the way.
    pub fn push_interleaved(&mut self, samples: &[f64]) -> Result<Vec<Event>> {
        self.extractor
            .push_interleaved(samples)?
            .into_iter()
            .map(|w| self.assess(w))
            .collect()
    }

    fn assess(&mut self, w: WindowOutcome) -> Result<Event> {
        match w {
            WindowOutcome::Skipped { end, reason } => Ok(Event::Skipped { end, reason }),
            WindowOutcome::Features(w) if self.learning.is_some() => {
                let Some((c, rows)) = &mut self.learning else {
                    unreachable!("checked by the guard")
                };
                rows.push(w.values);
                if w.end + 1 < c.frames {
                    return Ok(Event::Learning {
                        end: w.end,
                        windows: rows.len(),
                    });
                }
                let opts = model::FitOptions {
                    kind: self.kind,
                    ..model::FitOptions::default()
                };
                let fitted = model::fit_with_threshold(
                    self.model.features.clone(),
                    std::slice::from_ref(rows),
                    &opts,
                    &c.threshold,
                );
                let (fitted, report) = match fitted {
                    Ok(f) => f,
                    Err(_) => {
                        // Not enough (varied) data yet, e.g. windows were skipped: keep
                        // learning, on the most recent windows only (bounded memory).
                        let keep = MAX_LEARNING_WINDOWS;
                        if rows.len() > keep {
                            rows.drain(..rows.len() - keep);
                        }
                        return Ok(Event::Learning {
                            end: w.end,
                            windows: rows.len(),
                        });
                    }
                };
                let threshold = fitted.threshold;
                self.model = fitted;
                self.learning = None;
                Ok(Event::Learned {
                    end: w.end,
                    report,
                    threshold,
                })
            }
            WindowOutcome::Features(w) => {
                let score = match self.model.score(&w.values, self.top_n) {
                    Ok(s) => s,
                    // A feature overflowed (finite but huge samples): report, never score NaN.
                    Err(e) => {
                        return Ok(Event::Skipped {
                            end: w.end,
                            reason: e.to_string(),
                        })
                    }
                };
                let vel = self
                    .vel_features
                    .iter()
                    .map(|&i| w.values[i])
                    .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
                let transition = self.alarm.update(score.normalized, vel);
                Ok(Event::Assessed(Assessment {
                    end: w.end,
                    time_s: w.time_s,
                    score,
                    transition,
                    vel_rms_mm_s: vel,
                    repaired: w.repaired,
                }))
            }
        }
    }
}
