//! `neoc train sensor` and `neoc eval sensor`: fit a vibration / process baseline on
//! normal recordings, package it as a `.neo` artifact, and evaluate it on SKAB (outlier
//! detection F1, FAR, MAR exactly as SKAB computes them) or CWRU (detection rate per fault
//! type, false alarms on held-out normal data).

use crate::compile::{compiler_info, target_info};
use crate::error::{CompileError, Result};
use neo_boards::Boards;
use neo_runtime::artifact::sha256_hex;
use neo_runtime::manifest::{Manifest, SourceInfo};
use neo_runtime::SensorArtifact;
use neo_sensor::features::{AccelUnit, Bearing, ProcessConfig, ProcessStat, VibrationConfig};
use neo_sensor::model::{fit_with_threshold, FitOptions, ModelKind, ThresholdRule};
use neo_sensor::{
    AlarmPolicy, Commissioning, Event, Extractor, FeatureConfig, Health, Monitor, Recording,
    SensorSpec, TrainingInfo, TrainingSource, WindowOutcome, SPEC_VERSION,
};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What `neoc train sensor` needs.
#[derive(Debug, Clone)]
pub struct SensorTrainOptions {
    /// Normal recordings (.csv process data or .mat vibration).
    pub normal: Vec<PathBuf>,
    /// Channels to use (CSV columns; MAT variables or `DE`/`FE`/`BA`) [default: all].
    pub channels: Option<Vec<String>>,
    /// Share of each normal recording to train on, from its start (the rest is left for
    /// evaluation), e.g. 0.5.
    pub use_fraction: f64,
    /// Vibration sampling rate (required for .mat input).
    pub sample_rate_hz: Option<f64>,
    pub units: AccelUnit,
    pub window: Option<usize>,
    pub hop: Option<usize>,
    /// Bearing geometry (adds envelope features at its fault frequencies).
    pub bearing: Option<Bearing>,
    /// Process statistics per window [default: mean].
    pub stats: Vec<ProcessStat>,
    pub model: ModelKind,
    /// Held-out share, quantile and margin for the threshold.
    pub threshold: ThresholdRule,
    /// Learn the baseline on the device from the first N frames of each stream.
    pub commission_frames: Option<u64>,
    pub alarm: AlarmPolicy,
    pub target: String,
    pub name: Option<String>,
    pub output: PathBuf,
}

/// What training did.
#[derive(Debug, Clone, Serialize)]
pub struct SensorTrainReport {
    pub output: String,
    pub model: ModelKind,
    pub channels: Vec<String>,
    pub features: usize,
    pub features_used: usize,
    pub constant_features: Vec<String>,
    pub windows: usize,
    pub holdout_windows: usize,
    pub threshold: f64,
    pub threshold_method: String,
    pub skipped_windows: usize,
    pub repaired_samples: usize,
    pub train_ms: f64,
}

fn opt_err(m: impl Into<String>) -> CompileError {
    CompileError::Options(m.into())
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Windows of one recording through a fresh extractor: (feature rows, skipped, repaired).
fn windows(config: &FeatureConfig, rec: &Recording) -> Result<(Vec<Vec<f64>>, usize, usize)> {
    let mut ex = Extractor::new(config.clone(), rec.channels.clone())?;
    let (mut rows, mut skipped, mut repaired) = (Vec::new(), 0, 0);
    for i in 0..rec.frames() {
        let t = rec.times.as_ref().map(|t| t[i]);
        match ex.push(rec.frame(i), t)? {
            Some(WindowOutcome::Features(w)) => {
                repaired += w.repaired;
                rows.push(w.values);
            }
            Some(WindowOutcome::Skipped { .. }) => skipped += 1,
            None => {}
        }
    }
    Ok((rows, skipped, repaired))
}

/// Feature configuration from the options and the first recording.
fn feature_config(
    opts: &SensorTrainOptions,
    first: &Path,
    rec: &Recording,
) -> Result<FeatureConfig> {
    let is_mat = first
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("mat"));
    // Raw vibration: MATLAB recordings, or any recording given a sampling rate.
    if is_mat || opts.sample_rate_hz.is_some() {
        let fs = opts.sample_rate_hz.ok_or_else(|| {
            opt_err("vibration recordings (.mat) carry no sampling rate: give --sample-rate HZ (CWRU: 12000 or 48000)")
        })?;
        let mut c = VibrationConfig::for_rate(fs, opts.units);
        if let Some(w) = opts.window {
            c.window = w;
            c.hop = (w / 8).max(1);
            // Shorter windows have coarser bins: keep the default bands at least two wide.
            let df = fs / w as f64;
            c.bands_hz.retain(|[lo, hi]| hi - lo >= 2.0 * df);
        }
        if let Some(h) = opts.hop {
            c.hop = h;
        }
        c.bearing = opts.bearing.clone();
        Ok(FeatureConfig::Vibration(c))
    } else {
        let period = rec
            .times
            .as_ref()
            .and_then(|t| {
                let mut d: Vec<f64> = t
                    .windows(2)
                    .map(|w| w[1] - w[0])
                    .filter(|d| d.is_finite() && *d > 0.0)
                    .collect();
                d.sort_by(f64::total_cmp);
                d.get(d.len() / 2).copied()
            })
            .unwrap_or(1.0);
        let window = opts.window.unwrap_or(1);
        let stats = if opts.stats.is_empty() {
            vec![ProcessStat::Mean]
        } else {
            opts.stats.clone()
        };
        Ok(FeatureConfig::Process(ProcessConfig {
            window,
            hop: opts.hop.unwrap_or(1),
            stats,
            period_s: period,
            max_gap_periods: 5.0,
        }))
    }
}

/// Trains a sensor model and writes the artifact.
pub fn train_sensor(opts: &SensorTrainOptions, boards: &Boards) -> Result<SensorTrainReport> {
    let start = Instant::now();
    let first = opts
        .normal
        .first()
        .ok_or_else(|| opt_err("no normal recordings: give --normal FILE (repeatable)"))?;
    if !(opts.use_fraction > 0.0 && opts.use_fraction <= 1.0) {
        return Err(opt_err(format!(
            "--use-fraction must be in (0, 1], got {}",
            opts.use_fraction
        )));
    }
    opts.threshold.validate()?;
    opts.alarm.validate().map_err(opt_err)?;
    let board = boards.get(&opts.target)?;
    let mut config: Option<FeatureConfig> = None;
    let mut channels: Option<Vec<String>> = None;
    let mut per_recording: Vec<Vec<Vec<f64>>> = Vec::new();
    let (mut skipped, mut repaired) = (0, 0);
    let mut sources = Vec::new();
    for path in &opts.normal {
        let rec = neo_sensor::recording::load(path, opts.channels.as_deref())?;
        if let Some(ch) = &channels {
            if *ch != rec.channels {
                return Err(opt_err(format!(
                    "{} has channels {:?}, the first recording {:?}: give --channels to pick the same ones",
                    path.display(),
                    rec.channels,
                    ch
                )));
            }
        }
        let used = ((rec.frames() as f64) * opts.use_fraction).round() as usize;
        let rec = rec.slice(0, used);
        let cfg = match &config {
            Some(c) => c.clone(),
            None => feature_config(opts, first, &rec)?,
        };
        let (rows, s, r) = windows(&cfg, &rec)?;
        skipped += s;
        repaired += r;
        per_recording.push(rows);
        let bytes = std::fs::read(path).map_err(|source| CompileError::Io {
            path: path.clone(),
            source,
        })?;
        sources.push(TrainingSource {
            file: file_name(path),
            sha256: sha256_hex(&bytes),
            frames: [0, used as u64],
        });
        channels.get_or_insert(rec.channels.clone());
        config.get_or_insert(cfg);
    }
    let (Some(config), Some(channels)) = (config, channels) else {
        return Err(opt_err("no normal recordings"));
    };
    if let Some(frames) = opts.commission_frames {
        // The device must get enough windows out of its commissioning period to fit.
        let (window, hop) = match &config {
            FeatureConfig::Vibration(c) => (c.window as u64, c.hop as u64),
            FeatureConfig::Process(c) => (c.window as u64, c.hop as u64),
        };
        let windows = if frames >= window {
            (frames - window) / hop + 1
        } else {
            0
        };
        let needed = (10.0 / (1.0 - opts.threshold.holdout)).ceil() as u64 + 1;
        if windows < needed {
            return Err(opt_err(format!(
                "--commission {frames} gives {windows} windows of {window} frames (hop {hop}); fitting needs at least {needed}: \
                 commission on at least {} frames",
                window + (needed - 1) * hop
            )));
        }
    }
    let defs = config.features(&channels);
    let fit_opts = FitOptions {
        kind: opts.model,
        ..FitOptions::default()
    };
    let (model, fit_report) =
        fit_with_threshold(defs.clone(), &per_recording, &fit_opts, &opts.threshold)?;
    let threshold = model.threshold;
    let threshold_method = fit_report.threshold_method.clone();
    let holdout_windows = fit_report.holdout_windows;
    let spec = SensorSpec {
        version: SPEC_VERSION,
        channels: channels.clone(),
        features: config,
        model: opts.model,
        alarm: opts.alarm.clone(),
        threshold_method: threshold_method.clone(),
        training: TrainingInfo {
            sources,
            windows: fit_report.windows,
            holdout_windows,
            constant_features: fit_report.constant.clone(),
        },
        commissioning: opts.commission_frames.map(|frames| Commissioning {
            frames,
            threshold: opts.threshold.clone(),
        }),
    };
    let source_bytes = std::fs::read(first).map_err(|source| CompileError::Io {
        path: first.clone(),
        source,
    })?;
    let name = opts.name.clone().unwrap_or_else(|| {
        first
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "sensor".into())
    });
    let manifest = Manifest {
        format_version: neo_runtime::manifest::format_version_for(false, false, &[], None),
        name,
        compiler: compiler_info(),
        source: SourceInfo {
            file: file_name(first),
            format: first
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default(),
            sha256: sha256_hex(&source_bytes),
            bytes: source_bytes.len() as u64,
        },
        target: {
            let mut t = target_info(board);
            t.precision = "f64".into();
            t
        },
        inputs: Vec::new(),
        outputs: Vec::new(),
        files: BTreeMap::new(),
        anomaly: None,
        sensor: Some(spec),
        quantization: None,
    };
    let artifact = SensorArtifact::to_artifact(manifest, &model)?;
    artifact.write(&opts.output)?;
    Ok(SensorTrainReport {
        output: opts.output.display().to_string(),
        model: opts.model,
        channels,
        features: defs.len(),
        features_used: model.used.len(),
        constant_features: fit_report.constant,
        windows: fit_report.windows,
        holdout_windows,
        threshold,
        threshold_method,
        skipped_windows: skipped,
        repaired_samples: repaired,
        train_ms: start.elapsed().as_secs_f64() * 1e3,
    })
}

/// Binary outlier-detection counts, summed over files as SKAB's evaluation does.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Binary {
    pub tp: u64,
    pub fp: u64,
    pub fn_: u64,
    pub tn: u64,
}

impl Binary {
    fn add(&mut self, truth: bool, predicted: bool) {
        match (truth, predicted) {
            (true, true) => self.tp += 1,
            (false, true) => self.fp += 1,
            (true, false) => self.fn_ += 1,
            (false, false) => self.tn += 1,
        }
    }
    /// SKAB: F1 = TP / (TP + (FN + FP) / 2).
    pub fn f1(&self) -> f64 {
        let d = self.tp as f64 + (self.fn_ + self.fp) as f64 / 2.0;
        if d > 0.0 {
            self.tp as f64 / d
        } else {
            0.0
        }
    }
    /// False alarm rate, % of normal points flagged.
    pub fn far(&self) -> f64 {
        100.0 * self.fp as f64 / ((self.fp + self.tn) as f64).max(1.0)
    }
    /// Missing alarm rate, % of anomalous points not flagged.
    pub fn mar(&self) -> f64 {
        100.0 * self.fn_ as f64 / ((self.fn_ + self.tp) as f64).max(1.0)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BinaryReport {
    pub f1: f64,
    pub far_pct: f64,
    pub mar_pct: f64,
    pub counts: Binary,
}

impl From<Binary> for BinaryReport {
    fn from(b: Binary) -> Self {
        BinaryReport {
            f1: b.f1(),
            far_pct: b.far(),
            mar_pct: b.mar(),
            counts: b,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SkabFile {
    pub file: String,
    pub rows: usize,
    pub anomalous_rows: usize,
    /// Decided by the alarm state (Warning or Alarm = anomaly).
    pub alarm: BinaryReport,
}

/// Throughput of features + scoring on this machine.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub windows: u64,
    pub frames: u64,
    pub seconds: f64,
    pub windows_per_s: f64,
    pub us_per_window: f64,
    /// Share of one core a live stream at the model's rate would use (vibration), %.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub core_pct_at_stream_rate: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "dataset", rename_all = "snake_case")]
pub enum SensorEvalReport {
    Skab {
        model: ModelKind,
        files: Vec<SkabFile>,
        /// Every point labelled by the alarm state (persistence + hysteresis).
        alarm: BinaryReport,
        /// Every point labelled by its window's score alone (score >= threshold).
        window: BinaryReport,
        /// Window-score AUROC over all points.
        auroc: f64,
        throughput: Throughput,
    },
    Cwru {
        model: ModelKind,
        /// Held-out normal windows and the share flagged (false alarms).
        normal_file: String,
        normal_windows: usize,
        /// Windows scored at or above the threshold, %.
        false_alarm_pct: f64,
        /// Windows in Warning or Alarm state (persistence applied), %.
        false_alarm_state_pct: f64,
        faults: Vec<CwruFault>,
        /// The threshold that flags 1 % of the held-out normal windows, normalized units.
        threshold_at_1pct_far: f64,
        throughput: Throughput,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct CwruFault {
    pub fault: String,
    pub file: String,
    pub windows: usize,
    /// Share of windows scored at or above the model's threshold, %.
    pub detected_pct: f64,
    /// Share of windows above the threshold that gives 1 % false alarms on normal data, %.
    pub detected_pct_at_1pct_far: f64,
    /// Share of windows in Warning or Alarm state, %.
    pub alarm_pct: f64,
    /// Most frequent top contributor.
    pub top_feature: String,
}

/// Every file under `dir` with extension `ext`, sorted.
fn files_with(dir: &Path, ext: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|source| CompileError::Io {
            path: d.clone(),
            source,
        })?;
        for e in entries {
            let p = e
                .map_err(|source| CompileError::Io {
                    path: d.clone(),
                    source,
                })?
                .path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x.eq_ignore_ascii_case(ext)) {
                out.push(p);
            }
        }
    }
    out.sort_by_key(|p| natural_key(p));
    Ok(out)
}

/// Sorts `valve1/2.csv` before `valve1/10.csv`.
fn natural_key(p: &Path) -> (PathBuf, u64, String) {
    let stem = p
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    (
        p.parent().map(Path::to_path_buf).unwrap_or_default(),
        stem.parse().unwrap_or(u64::MAX),
        stem,
    )
}

struct Replay {
    /// Per assessed window: (end frame, normalized score, health, top feature).
    windows: Vec<(u64, f64, Health, String)>,
    seconds: f64,
    frames: u64,
    /// Commissioning: the last frame learned from (not scored, left out of the metrics).
    learned_until: Option<u64>,
}

fn replay(artifact: &SensorArtifact, rec: &Recording) -> Result<Replay> {
    let mut monitor: Monitor = artifact.monitor()?;
    let mut windows = Vec::new();
    let mut learned_until = None;
    let start = Instant::now();
    for i in 0..rec.frames() {
        let t = rec.times.as_ref().map(|t| t[i]);
        match monitor.push(rec.frame(i), t)? {
            Some(Event::Assessed(a)) => {
                let top = a
                    .score
                    .top
                    .first()
                    .map(|c| c.feature.clone())
                    .unwrap_or_default();
                windows.push((a.end, a.score.normalized, a.transition.health, top));
            }
            Some(Event::Learning { end, .. } | Event::Learned { end, .. }) => {
                learned_until = Some(end)
            }
            Some(Event::Skipped { .. }) | None => {}
        }
    }
    if monitor.is_learning() {
        return Err(opt_err(format!(
            "{}: the recording ended before commissioning did ({} frames): shorten --commission",
            rec.file,
            rec.frames()
        )));
    }
    Ok(Replay {
        windows,
        seconds: start.elapsed().as_secs_f64(),
        frames: rec.frames() as u64,
        learned_until,
    })
}

fn throughput(spec: &SensorSpec, windows: u64, frames: u64, seconds: f64) -> Throughput {
    let rate = match &spec.features {
        FeatureConfig::Vibration(c) => Some(c.sample_rate_hz),
        FeatureConfig::Process(_) => None,
    };
    Throughput {
        windows,
        frames,
        seconds,
        windows_per_s: windows as f64 / seconds.max(1e-9),
        us_per_window: 1e6 * seconds / (windows.max(1) as f64),
        core_pct_at_stream_rate: rate.map(|r| 100.0 * seconds / (frames as f64 / r)),
    }
}

/// Evaluates a sensor artifact on a SKAB-style folder (CSV files with an `anomaly`
/// column) or a CWRU folder (`Normal/*.mat` plus fault folders).
pub fn eval_sensor(model: &Path, dataset: &Path) -> Result<SensorEvalReport> {
    let artifact = SensorArtifact::open(model)?;
    let spec = artifact.spec().clone();
    let channels = Some(spec.channels.as_slice());
    let mats = files_with(dataset, "mat")?;
    if !mats.is_empty() {
        return eval_cwru(&artifact, &spec, dataset, &mats);
    }
    let csvs = files_with(dataset, "csv")?;
    if csvs.is_empty() {
        return Err(opt_err(format!(
            "{} holds no .csv (SKAB) or .mat (CWRU) files",
            dataset.display()
        )));
    }
    let (mut alarm, mut window) = (Binary::default(), Binary::default());
    let (mut all_scores, mut all_truth) = (Vec::new(), Vec::new());
    let mut files = Vec::new();
    let (mut secs, mut nwin, mut nframes) = (0.0, 0u64, 0u64);
    let mut unlabelled = Vec::new();
    for path in &csvs {
        let rec = neo_sensor::recording::load(path, channels)?;
        // Files without labels (SKAB's anomaly-free.csv beside the experiments) are skipped.
        let Some(labels) = rec.label("anomaly") else {
            unlabelled.push(path.display().to_string());
            continue;
        };
        let truth: Vec<bool> = labels.iter().map(|v| *v >= 0.5).collect();
        let r = replay(&artifact, &rec)?;
        secs += r.seconds;
        nwin += r.windows.len() as u64;
        nframes += r.frames;
        // Each row takes the decision of the latest window that ends at or before it
        // (rows before the first full window: normal).
        let mut file_alarm = Binary::default();
        let mut k = 0;
        let mut current: Option<(f64, Health)> = None;
        let mut scored_rows = 0;
        let mut scored_anomalous = 0;
        for (i, &t) in truth.iter().enumerate() {
            while k < r.windows.len() && r.windows[k].0 as usize <= i {
                current = Some((r.windows[k].1, r.windows[k].2));
                k += 1;
            }
            // Rows learned from during commissioning are training data, not test data.
            if r.learned_until.is_some_and(|l| i as u64 <= l) {
                continue;
            }
            scored_rows += 1;
            scored_anomalous += usize::from(t);
            let (score, health) = current.unwrap_or((0.0, Health::Healthy));
            let flagged = health != Health::Healthy;
            alarm.add(t, flagged);
            file_alarm.add(t, flagged);
            window.add(t, score >= 1.0);
            all_scores.push(score as f32);
            all_truth.push(t);
        }
        files.push(SkabFile {
            file: path
                .strip_prefix(dataset)
                .unwrap_or(path)
                .display()
                .to_string(),
            rows: scored_rows,
            anomalous_rows: scored_anomalous,
            alarm: file_alarm.into(),
        });
    }
    if files.is_empty() {
        return Err(opt_err(format!(
            "no file under {} has an `anomaly` column to evaluate against ({} without)",
            dataset.display(),
            unlabelled.len()
        )));
    }
    if !unlabelled.is_empty() {
        eprintln!(
            "note: skipped {} file(s) without an `anomaly` column: {}",
            unlabelled.len(),
            unlabelled.join(", ")
        );
    }
    Ok(SensorEvalReport::Skab {
        model: spec.model,
        files,
        alarm: alarm.into(),
        window: window.into(),
        auroc: crate::anomaly::eval::auroc(&all_scores, &all_truth),
        throughput: throughput(&spec, nwin, nframes, secs),
    })
}

fn eval_cwru(
    artifact: &SensorArtifact,
    spec: &SensorSpec,
    dataset: &Path,
    mats: &[PathBuf],
) -> Result<SensorEvalReport> {
    if spec.commissioning.is_some() {
        return Err(opt_err(
            "this model learns its baseline from each stream's first frames (--commission): on CWRU every \
             fault file would commission on the fault itself; evaluate a model trained without --commission",
        ));
    }
    let channels = Some(spec.channels.as_slice());
    let is_normal = |p: &Path| {
        p.components()
            .any(|c| c.as_os_str().eq_ignore_ascii_case("normal"))
    };
    let normal = mats.iter().find(|p| is_normal(p)).ok_or_else(|| {
        opt_err(format!(
            "{}: no Normal/*.mat recording to measure false alarms on",
            dataset.display()
        ))
    })?;
    let rec = neo_sensor::recording::load(normal, channels)?;
    // Skip the frames the model was trained on.
    let trained_until = spec
        .training
        .sources
        .iter()
        .filter(|s| s.file == file_name(normal))
        .map(|s| s.frames[1] as usize)
        .max()
        .unwrap_or(0);
    if trained_until >= rec.frames() {
        return Err(opt_err(format!(
            "the model was trained on all of {}; retrain with --use-fraction 0.5 to leave normal data for the false-alarm rate",
            file_name(normal)
        )));
    }
    let held = rec.slice(trained_until, rec.frames());
    let r = replay(artifact, &held)?;
    let (mut secs, mut nwin, mut nframes) = (r.seconds, r.windows.len() as u64, r.frames);
    let normal_scores: Vec<f64> = r.windows.iter().map(|w| w.1).collect();
    if normal_scores.is_empty() {
        return Err(opt_err(
            "the held-out normal data is shorter than one window".to_string(),
        ));
    }
    let false_alarm_pct = 100.0 * normal_scores.iter().filter(|s| **s >= 1.0).count() as f64
        / normal_scores.len() as f64;
    let false_alarm_state_pct = 100.0
        * r.windows.iter().filter(|w| w.2 != Health::Healthy).count() as f64
        / normal_scores.len() as f64;
    // Smallest threshold with at most 1 % of normal windows at or above it.
    let mut sorted = normal_scores.clone();
    sorted.sort_by(f64::total_cmp);
    let allowed = (sorted.len() as f64 * 0.01).floor() as usize;
    let t1 = sorted[sorted.len() - 1 - allowed.min(sorted.len() - 1)] * (1.0 + 1e-9);
    let mut faults = Vec::new();
    for path in mats.iter().filter(|p| !is_normal(p)) {
        let rel = path.strip_prefix(dataset).unwrap_or(path);
        // `12k_Drive_End_Bearing_Fault_Data/IR/007/105_0.mat` → `IR 007`.
        let parts: Vec<String> = rel
            .parent()
            .map(|p| {
                p.components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let fault = parts
            .iter()
            .skip_while(|p| !["B", "IR", "OR"].contains(&p.as_str()))
            .cloned()
            .collect::<Vec<_>>()
            .join(" ");
        let fault = if fault.is_empty() {
            rel.display().to_string()
        } else {
            fault
        };
        let rec = neo_sensor::recording::load(path, channels)?;
        let r = replay(artifact, &rec)?;
        secs += r.seconds;
        nwin += r.windows.len() as u64;
        nframes += r.frames;
        let n = r.windows.len().max(1) as f64;
        let mut tops: BTreeMap<&str, usize> = BTreeMap::new();
        for w in &r.windows {
            *tops.entry(w.3.as_str()).or_default() += 1;
        }
        faults.push(CwruFault {
            fault,
            file: file_name(path),
            windows: r.windows.len(),
            detected_pct: 100.0 * r.windows.iter().filter(|w| w.1 >= 1.0).count() as f64 / n,
            detected_pct_at_1pct_far: 100.0 * r.windows.iter().filter(|w| w.1 >= t1).count() as f64
                / n,
            alarm_pct: 100.0 * r.windows.iter().filter(|w| w.2 != Health::Healthy).count() as f64
                / n,
            top_feature: tops
                .into_iter()
                .max_by_key(|(_, c)| *c)
                .map(|(f, _)| f.to_string())
                .unwrap_or_default(),
        });
    }
    faults.sort_by(|a, b| a.fault.cmp(&b.fault));
    Ok(SensorEvalReport::Cwru {
        model: spec.model,
        normal_file: file_name(normal),
        normal_windows: normal_scores.len(),
        false_alarm_pct,
        false_alarm_state_pct,
        faults,
        threshold_at_1pct_far: t1,
        throughput: throughput(spec, nwin, nframes, secs),
    })
}
