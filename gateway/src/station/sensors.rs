//! The station's sensor pipeline: each `[[sensors]]` entry replays a recording (CSV or
//! MATLAB v5; the firmware serial link comes later) through its sensor model, publishes a
//! `sensor` reading every `publish_every` windows and an `alarm` at every
//! Healthy/Warning/Alarm change, with the top contributing features. A model deployed for
//! the source (`cmd/deploy` with `"sensor"`) replaces the running one between two frames, once
//! it has opened and its channels are in the recording.

use super::config::SensorSourceConfig;
use super::Shared;
use crate::message::Class;
use neo_runtime::sensor::neo_sensor::{self, Event};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A deployed model for a running sensor source; the reply is the model's name, or why it
/// cannot take over.
pub(super) struct SensorSwap {
    pub path: PathBuf,
    pub reply: mpsc::Sender<Result<String, String>>,
}

/// A sensor model with the recording it watches.
struct Loaded {
    name: String,
    monitor: neo_sensor::Monitor,
    rec: neo_sensor::recording::Recording,
}

/// Opens a model and the recording with the model's channels; the error is (alarm, why).
fn open(cfg: &SensorSourceConfig, model: &Path) -> Result<Loaded, (&'static str, String)> {
    let unavailable = |e: String| ("sensor_model_unavailable", e);
    let artifact =
        neo_runtime::SensorArtifact::open(model).map_err(|e| unavailable(e.to_string()))?;
    let spec = artifact.spec().clone();
    let rec = match neo_sensor::recording::load(&cfg.path, Some(&spec.channels)) {
        Ok(r) if r.frames() > 0 => r,
        Ok(_) => return Err(("sensor_source_failed", "the recording is empty".into())),
        Err(e) => return Err(("sensor_source_failed", e.to_string())),
    };
    let monitor = artifact.monitor().map_err(|e| unavailable(e.to_string()))?;
    tracing::info!(
        "sensor {}: model {} ({:?}, {} channels) from {} replaying {} ({} frames at {} frames/s)",
        cfg.name,
        artifact.manifest.name,
        spec.model,
        spec.channels.len(),
        model.display(),
        cfg.path.display(),
        rec.frames(),
        cfg.rate_hz
    );
    Ok(Loaded {
        name: artifact.manifest.name.clone(),
        monitor,
        rec,
    })
}

/// Runs one sensor source until the station stops or a non-looping replay ends. Errors
/// (model or recording unusable) are published as alarms and end this source only.
pub(super) fn sensor_loop(
    shared: Arc<Shared>,
    cfg: SensorSourceConfig,
    model: PathBuf,
    swaps: mpsc::Receiver<SensorSwap>,
    print: bool,
) {
    // Only a replay that reached its end counts as finished for the station's stop rule; a
    // failed source has raised its alarm and must not stop the station (under systemd that
    // would become a restart loop).
    if run_source(&shared, &cfg, &model, &swaps, print) {
        shared.source_ended();
    }
}

/// Runs the source; true when a non-looping replay reached its end.
fn run_source(
    shared: &Arc<Shared>,
    cfg: &SensorSourceConfig,
    model: &Path,
    swaps: &mpsc::Receiver<SensorSwap>,
    print: bool,
) -> bool {
    let fail = |what: &str, error: String| {
        tracing::error!("sensor {}: {what}: {error}", cfg.name);
        let _ = shared.gateway.publish(
            Class::Alarm,
            json!({"alarm": what, "sensor": cfg.name, "error": error}),
        );
    };
    let Loaded {
        mut name,
        mut monitor,
        mut rec,
    } = match open(cfg, model) {
        Ok(l) => l,
        Err((what, e)) => {
            fail(what, e);
            // A model deployed for this source can still bring it up.
            match wait_for_model(shared, cfg, swaps) {
                Some(l) => l,
                None => return false,
            }
        }
    };
    let period = Duration::from_secs_f64(1.0 / cfg.rate_hz);
    let mut next = Instant::now();
    let mut windows = 0u64;
    let mut i = 0usize;
    // Timestamps of replayed rows move on by the recording's length at each repeat, so the
    // extractor sees time go forward.
    let (mut offset, span) = match &rec.times {
        Some(t) => {
            // From the finite timestamps only (one bad stamp must not make every later
            // repeat NaN), plus one median period.
            let finite: Vec<f64> = t.iter().copied().filter(|v| v.is_finite()).collect();
            let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let mut steps: Vec<f64> = finite
                .windows(2)
                .map(|w| w[1] - w[0])
                .filter(|d| *d > 0.0)
                .collect();
            steps.sort_by(f64::total_cmp);
            let period = steps.get(steps.len() / 2).copied().unwrap_or(1.0);
            (0.0, if hi >= lo { hi - lo + period } else { 0.0 })
        }
        None => (0.0, 0.0),
    };
    let mut pending: Option<SensorSwap> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        if let Some(swap) = pending.take().or_else(|| swaps.try_recv().ok()) {
            match open(cfg, &swap.path) {
                // Taken over only if the station is still waiting for the answer (it rolls
                // the slot back when it gave up).
                Ok(new) if swap.reply.send(Ok(new.name.clone())).is_ok() => {
                    // The new model starts on a fresh window; the replay goes on where it is
                    // when the recording is the same length (it is the same file).
                    if new.rec.frames() != rec.frames() {
                        i = 0;
                    }
                    (name, monitor, rec) = (new.name, new.monitor, new.rec);
                }
                Ok(_) => {}
                Err((_, e)) => {
                    let _ = swap.reply.send(Err(e));
                }
            }
        }
        if i == rec.frames() {
            if !cfg.repeat {
                break;
            }
            i = 0;
            offset += span;
        }
        let t = rec.times.as_ref().map(|t| t[i] + offset);
        let event = monitor.push(rec.frame(i), t);
        i += 1;
        match event {
            Ok(Some(Event::Assessed(a))) => {
                windows += 1;
                let reading = json!({
                    "sensor": cfg.name,
                    "model": name,
                    "window_end": a.end,
                    "health": a.transition.health.as_str(),
                    "score": a.score.normalized,
                    "zone": a.transition.zone.map(String::from),
                    "vel_rms_mm_s": a.vel_rms_mm_s,
                    "top": a.score.top,
                });
                if a.transition.changed() {
                    if print {
                        let top: Vec<String> = a
                            .score
                            .top
                            .iter()
                            .map(|c| format!("{} {:+.1} sd", c.feature, c.z))
                            .collect();
                        println!(
                            "SENSOR {} {} -> {} (score {:.2}; {})",
                            cfg.name,
                            a.transition.previous.as_str(),
                            a.transition.health.as_str(),
                            a.score.normalized,
                            top.join(", ")
                        );
                    }
                    let _ = shared.gateway.publish(
                        Class::Alarm,
                        json!({
                            "alarm": "sensor_state",
                            "sensor": cfg.name,
                            "health": a.transition.health.as_str(),
                            "previous": a.transition.previous.as_str(),
                            "cause": a.transition.cause,
                            "score": a.score.normalized,
                            "zone": a.transition.zone.map(String::from),
                            "top": a.score.top,
                        }),
                    );
                    if let Ok(mut s) = shared.summary.lock() {
                        s.sensor_state_changes += 1;
                    }
                }
                if windows.is_multiple_of(cfg.publish_every) {
                    let _ = shared.gateway.publish(Class::Sensor, reading);
                }
                if let Ok(mut s) = shared.summary.lock() {
                    s.sensor_windows += 1;
                }
            }
            Ok(Some(Event::Skipped { end, reason })) => {
                let _ = shared.gateway.publish(
                    Class::Sensor,
                    json!({"sensor": cfg.name, "window_end": end, "skipped": reason}),
                );
            }
            Ok(Some(Event::Learned {
                threshold, report, ..
            })) => {
                tracing::info!(
                    "sensor {}: baseline learned from {} windows, threshold {threshold:.4}",
                    cfg.name,
                    report.windows
                );
            }
            Ok(Some(Event::Learning { .. }) | None) => {}
            Err(e) => {
                fail("sensor_model_failed", e.to_string());
                return false;
            }
        }
        next += period;
        if i == rec.frames() && !cfg.repeat {
            tracing::info!("sensor {}: end of the recording", cfg.name);
        }
        let now = Instant::now();
        if next > now {
            // Waits for the next frame, or for a deployed model, whichever comes first.
            if let Ok(swap) = swaps.recv_timeout(next - now) {
                pending = Some(swap);
            }
        } else if now - next > Duration::from_secs(1) {
            // Far behind (the machine was busy): do not burst to catch up.
            next = now;
        }
    }
    i == rec.frames() && !cfg.repeat
}

/// A source whose model could not be opened waits for one deployed for it; `None` when the
/// station stops first.
fn wait_for_model(
    shared: &Arc<Shared>,
    cfg: &SensorSourceConfig,
    swaps: &mpsc::Receiver<SensorSwap>,
) -> Option<Loaded> {
    while !shared.stop.load(Ordering::Relaxed) {
        let Ok(swap) = swaps.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        match open(cfg, &swap.path) {
            Ok(new) if swap.reply.send(Ok(new.name.clone())).is_ok() => return Some(new),
            Ok(_) => {}
            Err((_, e)) => {
                let _ = swap.reply.send(Err(e));
            }
        }
    }
    None
}
