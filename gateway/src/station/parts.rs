//! The station's moving parts: frame sources, the bounded frame queue, the decision, and the
//! reject output.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use neo_runtime::anomaly::{Region, Verdict};
use neo_runtime::manifest::Task;
use neo_runtime::Model;
use serde::Serialize;

use super::config::{FailSafe, RejectConfig, RejectKind};
use crate::message::now_ms;

/// One captured frame (or the failure to capture one: a part went by uninspected).
pub struct Frame {
    pub camera: String,
    pub index: u64,
    pub name: String,
    pub image: Result<image::DynamicImage, String>,
    pub captured: Instant,
    pub captured_ms: u64,
    pub capture_ms: f64,
    pub sample: bool,
}

/// Frames between capture and inference. Bounded: when full, the oldest frame is dropped and
/// counted, so a slow model never makes memory grow.
pub struct FrameQueue {
    frames: Mutex<VecDeque<Frame>>,
    ready: Condvar,
    capacity: usize,
    pub dropped: AtomicU64,
    closed: AtomicBool,
}

impl FrameQueue {
    pub fn new(capacity: usize) -> FrameQueue {
        FrameQueue {
            frames: Mutex::new(VecDeque::with_capacity(capacity)),
            ready: Condvar::new(),
            capacity: capacity.max(1),
            dropped: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Frame>> {
        self.frames.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn push(&self, frame: Frame) {
        let mut q = self.lock();
        if q.len() >= self.capacity {
            q.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        q.push_back(frame);
        self.ready.notify_one();
    }

    /// The oldest frame; `None` once closed and empty.
    pub fn pop(&self) -> Option<Frame> {
        let mut q = self.lock();
        loop {
            if let Some(f) = q.pop_front() {
                return Some(f);
            }
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            q = self
                .ready
                .wait_timeout(q, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// No more frames will come; `pop` drains what is there, then returns `None`.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_all();
    }
}

/// Images from a folder or a glob (`dir/*.png`), in name order.
pub struct FolderSource {
    pattern: PathBuf,
    files: Vec<PathBuf>,
    next: usize,
    pub repeat: bool,
}

impl FolderSource {
    pub fn new(pattern: &Path, repeat: bool) -> FolderSource {
        FolderSource {
            pattern: pattern.to_path_buf(),
            files: Vec::new(),
            next: 0,
            repeat,
        }
    }

    fn list(&self) -> Result<Vec<PathBuf>, String> {
        let p = &self.pattern;
        let name = p.file_name().map(|n| n.to_string_lossy().to_string());
        let files = match name.as_deref() {
            Some(n) if n.contains('*') => {
                let dir = p.parent().unwrap_or(Path::new("."));
                let (prefix, suffix) = n.split_once('*').unwrap_or((n, ""));
                let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                    .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|f| {
                        f.file_name()
                            .map(|n| n.to_string_lossy())
                            .is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
                    })
                    .collect();
                files.sort();
                files
            }
            _ => neo_runtime::preprocess::list_images(p)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?,
        };
        if files.is_empty() {
            return Err(format!("no images in {}", p.display()));
        }
        Ok(files)
    }

    /// The next image; `Ok(None)` at the end without `repeat`. A vanished folder or an
    /// unreadable file is an error for this frame; the next call tries again.
    pub fn next_frame(&mut self) -> Result<Option<(String, image::DynamicImage)>, String> {
        if self.next >= self.files.len() {
            if !self.files.is_empty() && !self.repeat {
                return Ok(None);
            }
            self.files = self.list()?;
            self.next = 0;
        }
        let path = self.files[self.next].clone();
        self.next += 1;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        match neo_runtime::preprocess::load(&path) {
            Ok(img) => Ok(Some((name, img))),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// What the station decided about one part.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub verdict: Verdict,
    /// Normalized: 1.0 is the decision threshold.
    pub score: f32,
    /// Classifier: probability of the NG labels; detector: the model's normalized score.
    pub raw_score: f32,
    pub threshold: f32,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<Region>,
}

/// How a model's output becomes OK/NG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    Classifier,
    Detector,
}

pub fn model_kind(model: &Model) -> ModelKind {
    if model.manifest().anomaly.is_some()
        || model
            .manifest()
            .outputs
            .iter()
            .any(|o| o.task == Task::Anomaly)
    {
        ModelKind::Detector
    } else {
        ModelKind::Classifier
    }
}

pub fn default_threshold(kind: ModelKind) -> f32 {
    match kind {
        ModelKind::Classifier => 0.5,
        ModelKind::Detector => 1.0,
    }
}

/// Runs the model on a frame and decides. Returns the decision and (preprocess, inference,
/// decide) milliseconds.
pub fn inspect(
    model: &Model,
    image: &image::DynamicImage,
    threshold: f32,
    ng_labels: &[String],
) -> Result<(Decision, [f64; 3]), String> {
    let (predictions, timings) = model
        .predict(image, usize::MAX)
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let decision = match model_kind(model) {
        ModelKind::Detector => {
            let a = predictions
                .iter()
                .find_map(|p| p.anomaly.as_ref())
                .ok_or("the detector gave no anomaly result")?;
            let score = a.score / threshold;
            let ng = score > 1.0;
            // The defect type, when the detector has a head, for NG parts only.
            let kind = a.defect_type.as_ref().filter(|_| ng);
            Decision {
                verdict: if ng { Verdict::Ng } else { Verdict::Ok },
                score,
                raw_score: a.score,
                threshold,
                reason: match (ng, kind) {
                    (false, _) => "within normal".into(),
                    (true, None) => {
                        format!("anomaly score {:.2} above threshold {threshold}", a.score)
                    }
                    (true, Some(t)) => format!(
                        "anomaly score {:.2} above threshold {threshold}: {} ({:.2})",
                        a.score, t.label, t.probability
                    ),
                },
                label: kind.map(|t| t.label.clone()),
                regions: a.regions.clone(),
            }
        }
        ModelKind::Classifier => {
            let top = predictions
                .iter()
                .find(|p| !p.top_k.is_empty())
                .ok_or("the model gave no classification")?;
            let p_ng: f32 = top
                .top_k
                .iter()
                .filter(|c| c.label.as_ref().is_some_and(|l| ng_labels.contains(l)))
                .map(|c| c.score)
                .sum();
            let best = top.top_k.first().and_then(|c| c.label.clone());
            let score = p_ng / threshold;
            Decision {
                verdict: if score >= 1.0 {
                    Verdict::Ng
                } else {
                    Verdict::Ok
                },
                score,
                raw_score: p_ng,
                threshold,
                reason: match (&best, score >= 1.0) {
                    (Some(l), true) => format!("classified {l} ({p_ng:.3})"),
                    (Some(l), false) => format!("classified {l}"),
                    (None, _) => "classified".into(),
                },
                label: best,
                regions: Vec::new(),
            }
        }
    };
    if !decision.raw_score.is_finite() {
        return Err(format!(
            "the model gave a non-finite score ({})",
            decision.raw_score
        ));
    }
    Ok((
        decision,
        [
            timings.preprocess_ms,
            timings.inference_ms,
            t0.elapsed().as_secs_f64() * 1e3,
        ],
    ))
}

/// The decision when the part could not be inspected.
pub fn fail_safe(mode: FailSafe, why: &str, threshold: f32) -> Decision {
    let verdict = match mode {
        FailSafe::RejectAll => Verdict::Ng,
        FailSafe::PassAll => Verdict::Ok,
    };
    Decision {
        verdict,
        score: f32::NAN,
        raw_score: f32::NAN,
        threshold,
        reason: format!("fail-safe ({mode:?}): {why}"),
        label: None,
        regions: Vec::new(),
    }
}

/// The ejector. A trait so that boards without GPIO log instead.
pub trait RejectOutput: Send {
    fn pulse(&mut self, part: &str, duration: Duration) -> Result<(), String>;
    fn describe(&self) -> String;
}

pub struct LogReject;

impl RejectOutput for LogReject {
    fn pulse(&mut self, part: &str, duration: Duration) -> Result<(), String> {
        tracing::info!("REJECT {part} ({} ms pulse)", duration.as_millis());
        Ok(())
    }
    fn describe(&self) -> String {
        "log".into()
    }
}

/// Appends `{"ts_ms", "part", "pulse_ms"}` per pulse.
pub struct FileReject {
    path: PathBuf,
}

impl RejectOutput for FileReject {
    fn pulse(&mut self, part: &str, duration: Duration) -> Result<(), String> {
        let line = serde_json::json!({ "ts_ms": now_ms(), "part": part, "pulse_ms": duration.as_millis() as u64 });
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        writeln!(f, "{line}").map_err(|e| format!("{}: {e}", self.path.display()))
    }
    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}

/// The configured reject output; a GPIO line that cannot be opened is an error (a station
/// that cannot reject must not pass parts as if it could).
pub fn reject_output(config: &RejectConfig) -> Result<Box<dyn RejectOutput>, String> {
    Ok(
        match (config.kind, &config.path, &config.chip, config.line) {
            (RejectKind::File, Some(path), _, _) => Box::new(FileReject { path: path.clone() }),
            (RejectKind::Gpio, _, Some(chip), Some(line)) => {
                Box::new(super::gpio::open_reject(chip, line, config.active_low)?)
            }
            _ => Box::new(LogReject),
        },
    )
}

/// Latency percentiles over the last frames.
pub struct Window {
    values: VecDeque<f64>,
    size: usize,
}

impl Window {
    pub fn new(size: usize) -> Window {
        Window {
            values: VecDeque::with_capacity(size),
            size,
        }
    }
    pub fn push(&mut self, v: f64) {
        if self.values.len() == self.size {
            self.values.pop_front();
        }
        self.values.push_back(v);
    }
    pub fn quantile(&self, q: f64) -> f64 {
        if self.values.is_empty() {
            return 0.0;
        }
        let mut v: Vec<f64> = self.values.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * q).round() as usize]
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn frame(i: u64) -> Frame {
        Frame {
            camera: "c".into(),
            index: i,
            name: format!("{i}"),
            image: Err("x".into()),
            captured: Instant::now(),
            captured_ms: 0,
            capture_ms: 0.0,
            sample: false,
        }
    }

    #[test]
    fn full_queue_drops_the_oldest_and_counts() {
        let q = FrameQueue::new(2);
        for i in 0..5 {
            q.push(frame(i));
        }
        assert_eq!(q.dropped.load(Ordering::Relaxed), 3);
        q.close();
        assert_eq!(q.pop().unwrap().index, 3);
        assert_eq!(q.pop().unwrap().index, 4);
        assert!(q.pop().is_none());
    }

    #[test]
    fn folder_source_replays_and_survives_a_vanished_folder() {
        let dir = tempfile::tempdir().unwrap();
        let cam = dir.path().join("cam");
        std::fs::create_dir(&cam).unwrap();
        for n in ["b.png", "a.png"] {
            image::RgbImage::new(4, 4).save(cam.join(n)).unwrap();
        }
        let mut src = FolderSource::new(&cam, true);
        let names: Vec<String> = (0..3)
            .map(|_| src.next_frame().unwrap().unwrap().0)
            .collect();
        assert_eq!(names, ["a.png", "b.png", "a.png"]);
        std::fs::remove_dir_all(&cam).unwrap();
        assert!(src.next_frame().is_err());
        assert!(src.next_frame().is_err());
        std::fs::create_dir(&cam).unwrap();
        image::RgbImage::new(4, 4).save(cam.join("c.png")).unwrap();
        assert_eq!(src.next_frame().unwrap().unwrap().0, "c.png");

        let mut glob = FolderSource::new(&cam.join("*.png"), false);
        assert_eq!(glob.next_frame().unwrap().unwrap().0, "c.png");
        assert!(glob.next_frame().unwrap().is_none());
    }

    #[test]
    fn window_quantiles() {
        let mut w = Window::new(3);
        for v in [10.0, 1.0, 2.0, 3.0] {
            w.push(v);
        }
        assert_eq!(w.quantile(0.5), 2.0);
        assert_eq!(w.quantile(1.0), 3.0);
    }
}
