//! `station.toml`: everything one inspection station runs, in one file. `station.toml` at the
//! repository root is the commented example and the embedded default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{
    CommandsConfig, GatewayConfig, MqttConfig, SamplesConfig, SpoolConfig, TelemetryConfig,
};
use crate::{GatewayError, Result};

/// The default station (the demo): the shipped classifier on the shipped sample images, an
/// in-process broker.
pub const DEFAULT_STATION: &str = include_str!("../../../station.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StationConfig {
    pub station: StationSection,
    #[serde(default)]
    pub cameras: Vec<CameraConfig>,
    /// The vision model the cameras feed; none for a station that watches sensors only.
    #[serde(default)]
    pub inspection: Option<InspectionConfig>,
    /// Sensor sources, each with its sensor model (vibration or process anomaly detection).
    #[serde(default)]
    pub sensors: Vec<SensorSourceConfig>,
    #[serde(default)]
    pub reject: RejectConfig,
    pub mqtt: MqttConfig,
    pub spool: SpoolConfig,
    #[serde(default)]
    pub samples: SamplesConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub commands: CommandsConfig,
}

/// One sensor source and the model that watches it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorSourceConfig {
    pub name: String,
    /// A sensor model (`neoc train sensor`).
    pub model: PathBuf,
    /// Recording replayed as the live source: .csv (process data) or .mat (vibration).
    pub path: PathBuf,
    /// Frames (rows or samples) per second.
    #[serde(default = "default_sensor_rate")]
    pub rate_hz: f64,
    /// Start again after the last frame.
    #[serde(default = "yes", rename = "loop")]
    pub repeat: bool,
    /// Publish a `sensor` reading every this many windows (state changes always go out
    /// at once as `alarm`).
    #[serde(default = "default_publish_every")]
    pub publish_every: u64,
}

fn default_sensor_rate() -> f64 {
    1.0
}
fn default_publish_every() -> u64 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StationSection {
    pub name: String,
    /// What every part gets while the model or the camera is unusable.
    #[serde(default)]
    pub fail_safe: FailSafe,
    /// Watchdog: a frame held by the inspection stage longer than this gets the fail-safe
    /// verdict, an alarm goes out and the stage is restarted.
    #[serde(default = "default_stall")]
    pub stall_s: f64,
}

fn default_stall() -> f64 {
    30.0
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum FailSafe {
    /// Reject every part (nothing unchecked passes).
    #[default]
    RejectAll,
    /// Let every part pass (the line keeps moving).
    PassAll,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraConfig {
    pub name: String,
    #[serde(default)]
    pub kind: SourceKind,
    /// `folder`: a folder of images, or a glob such as `frames/*.png`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Frames per second in free-run mode.
    #[serde(default = "default_fps")]
    pub fps: f64,
    /// `folder`: start again at the first image after the last.
    #[serde(default = "yes", rename = "loop")]
    pub repeat: bool,
    #[serde(default)]
    pub trigger: Trigger,
    /// `trigger = "gpio"`: the input line.
    #[serde(default)]
    pub gpio: Option<GpioTrigger>,
    /// `camera`: the V4L2 device, `/dev/videoN` (default `/dev/video0`).
    #[serde(default)]
    pub device: Option<String>,
    /// `camera`: the resolution asked for (the closest the device offers is used).
    #[serde(default = "default_width")]
    pub width: u32,
    #[serde(default = "default_height")]
    pub height: u32,
    /// `camera`: `mjpeg` (most USB cameras at full rate) or `yuyv` (uncompressed).
    #[serde(default)]
    pub pixel_format: PixelFormat,
    /// `push`: the largest frame accepted, bytes.
    #[serde(default = "default_push_max_bytes")]
    pub max_bytes: usize,
}

/// A camera device, `/dev/videoN` (or `N`) → N.
pub fn device_index(device: &str) -> std::result::Result<u32, String> {
    device
        .trim_start_matches("/dev/video")
        .parse()
        .map_err(|_| format!("camera device {device:?}: expected /dev/videoN or N"))
}

fn default_width() -> u32 {
    1280
}
fn default_height() -> u32 {
    720
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum PixelFormat {
    #[default]
    Mjpeg,
    Yuyv,
}

fn default_push_max_bytes() -> usize {
    8 * 1024 * 1024
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// Images from a folder or glob, replayed at `fps` (demos, tests, offline replays).
    #[default]
    Folder,
    /// A V4L2/UVC camera (`device`, `width`, `height`, `pixel_format`, `fps`); needs the
    /// gateway built with the `camera` feature.
    Camera,
    /// Frames pushed by another program: the encoded image as the payload of MQTT
    /// `<base>/frames/<name>` or the body of HTTP `POST /frames/<name>` on
    /// `telemetry.metrics_addr`. Each pushed frame is one part.
    Push,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// A frame every 1/fps seconds.
    #[default]
    FreeRun,
    /// A frame when the `capture_now` command arrives.
    Software,
    /// A frame per edge on a GPIO input (`gpio = { chip, line, edge, debounce_ms }`): a light
    /// barrier or a PLC output saying a part is in front of the camera.
    Gpio,
}

/// The GPIO input that triggers a camera.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpioTrigger {
    /// The character device, e.g. `/dev/gpiochip0`.
    pub chip: PathBuf,
    /// The line offset on that chip (the board profile's `trigger_line`).
    pub line: u32,
    #[serde(default)]
    pub edge: Edge,
    /// Edges closer than this to the last accepted one are bounce.
    #[serde(default = "default_debounce")]
    pub debounce_ms: u64,
}

fn default_debounce() -> u64 {
    20
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Edge {
    #[default]
    Rising,
    Falling,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InspectionConfig {
    /// The compiled artifact (`.neo`): a classifier or an anomaly detector.
    pub model: PathBuf,
    /// Classifier labels that mean NG (a detector decides by its own threshold).
    #[serde(default)]
    pub ng_labels: Vec<String>,
    /// Classifier: NG when the NG labels' probability is at least this (default 0.5).
    /// Detector: NG when the normalized score is above this (default 1.0, the trained
    /// threshold). The `set_threshold` command changes it at run time.
    #[serde(default)]
    pub threshold: Option<f32>,
    /// Inference threads; the board profile's (capped at the cores) when unset.
    #[serde(default)]
    pub threads: Option<usize>,
    /// Frames waiting for inference; beyond it the oldest are dropped (and counted).
    #[serde(default = "default_queue")]
    pub queue: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RejectConfig {
    #[serde(default)]
    pub kind: RejectKind,
    /// `file`: where each pulse is appended as a JSON line.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// From the frame's capture to the pulse: the conveyor's travel time to the ejector.
    #[serde(default = "default_delay")]
    pub delay_ms: u64,
    #[serde(default = "default_pulse")]
    pub pulse_ms: u64,
    /// `gpio`: the character device, e.g. `/dev/gpiochip0`.
    #[serde(default)]
    pub chip: Option<PathBuf>,
    /// `gpio`: the line offset on that chip (the board page lists the header pin's).
    #[serde(default)]
    pub line: Option<u32>,
    /// `gpio`: the ejector fires on a low level.
    #[serde(default)]
    pub active_low: bool,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RejectKind {
    /// Log each pulse (boards without an ejector, demos).
    #[default]
    Log,
    /// Append each pulse to `path` as a JSON line (tests, or a PLC bridge watching the file).
    File,
    /// Pulse `line` of the GPIO character device `chip` (the board profile's `[gpio]`).
    Gpio,
}

impl Default for RejectConfig {
    fn default() -> Self {
        RejectConfig {
            kind: RejectKind::Log,
            path: None,
            delay_ms: default_delay(),
            pulse_ms: default_pulse(),
            chip: None,
            line: None,
            active_low: false,
        }
    }
}

fn default_fps() -> f64 {
    2.0
}
fn yes() -> bool {
    true
}
fn default_queue() -> usize {
    4
}
fn default_delay() -> u64 {
    500
}
fn default_pulse() -> u64 {
    100
}

impl StationConfig {
    /// Parses and checks a station file; relative paths are taken from `base` (the file's
    /// folder). Errors name the key.
    pub fn from_toml(text: &str, base: &Path) -> Result<StationConfig> {
        let mut c: StationConfig =
            toml::from_str(text).map_err(|e| GatewayError::Config(e.to_string()))?;
        let rebase = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(i) = c.inspection.as_mut() {
            rebase(&mut i.model);
        }
        rebase(&mut c.spool.dir);
        for cam in &mut c.cameras {
            if let Some(p) = cam.path.as_mut() {
                rebase(p);
            }
        }
        if let Some(p) = c.reject.path.as_mut() {
            rebase(p);
        }
        for s in &mut c.sensors {
            rebase(&mut s.model);
            rebase(&mut s.path);
        }
        if let Some(p) = c.commands.models_dir.as_mut() {
            rebase(p);
        }
        if let Some(p) = c.commands.url_ca.as_mut() {
            rebase(p);
        }
        if let Some(tls) = c.mqtt.tls.as_mut() {
            rebase(&mut tls.ca);
            for p in [tls.cert.as_mut(), tls.key.as_mut()].into_iter().flatten() {
                rebase(p);
            }
        }
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |key: String, why: &str| Err(GatewayError::Config(format!("{key}: {why}")));
        if !(self.station.stall_s.is_finite() && (0.1..=3600.0).contains(&self.station.stall_s)) {
            return bad("station.stall_s".into(), "must be 0.1 … 3600 seconds");
        }
        if self.cameras.is_empty() && self.sensors.is_empty() {
            return bad(
                "cameras".into(),
                "a station needs at least one [[cameras]] or [[sensors]] entry",
            );
        }
        match (&self.inspection, self.cameras.is_empty()) {
            (None, false) => {
                return bad(
                    "inspection".into(),
                    "cameras need an [inspection] table naming the model",
                )
            }
            (Some(_), true) => {
                return bad(
                    "inspection".into(),
                    "no camera feeds it: add a [[cameras]] entry or remove [inspection]",
                )
            }
            _ => {}
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, cam) in self.cameras.iter().enumerate() {
            let key = |k: &str| format!("cameras[{i}].{k}");
            if !names.insert(cam.name.as_str()) {
                return bad(key("name"), "used twice");
            }
            if !(cam.fps.is_finite() && cam.fps > 0.0 && cam.fps <= 1000.0) {
                return bad(key("fps"), "must be between 0 and 1000");
            }
            match cam.kind {
                SourceKind::Folder if cam.path.is_none() => {
                    return bad(key("path"), "a folder source needs a folder or glob")
                }
                SourceKind::Camera if !cfg!(feature = "camera") => {
                    return bad(
                        key("kind"),
                        "this neo-gateway was built without cameras: build it with `--features camera` (needs libclang-dev), or use kind = \"folder\" or \"push\"",
                    )
                }
                SourceKind::Camera if cam.path.is_some() => {
                    return bad(key("path"), "a camera has a device, not a path")
                }
                SourceKind::Camera if cam.width == 0 || cam.height == 0 => {
                    return bad(key("width"), "width and height must be positive")
                }
                SourceKind::Camera => {
                    if let Some(device) = &cam.device {
                        if let Err(e) = device_index(device) {
                            return bad(key("device"), &e);
                        }
                    }
                }
                SourceKind::Push if cam.path.is_some() => {
                    return bad(
                        key("path"),
                        "a push camera receives its frames over MQTT or HTTP; remove path",
                    )
                }
                SourceKind::Push if cam.trigger != Trigger::FreeRun => {
                    return bad(key("trigger"), "each pushed frame is its own trigger; remove trigger")
                }
                SourceKind::Push if cam.max_bytes < 1024 || cam.max_bytes > 256 << 20 => {
                    return bad(key("max_bytes"), "must be 1 KiB … 256 MiB")
                }
                _ => {}
            }
            match (cam.trigger, &cam.gpio) {
                (Trigger::Gpio, None) => {
                    return bad(
                        key("gpio"),
                        "trigger = \"gpio\" needs gpio = { chip = \"/dev/gpiochip0\", line = N }",
                    )
                }
                (Trigger::Gpio, Some(_)) | (_, None) => {}
                (_, Some(_)) => return bad(key("gpio"), "is only used with trigger = \"gpio\""),
            }
        }
        let mut sensor_names = std::collections::BTreeSet::new();
        for (i, s) in self.sensors.iter().enumerate() {
            let key = |k: &str| format!("sensors[{i}].{k}");
            if !sensor_names.insert(s.name.as_str()) {
                return bad(key("name"), "used twice");
            }
            if let Err(e) = crate::deploy::check_sensor_name(&s.name) {
                return bad(key("name"), &e.replace("\"sensor\"", "the name"));
            }
            if !(s.rate_hz.is_finite() && s.rate_hz > 0.0 && s.rate_hz <= 1_000_000.0) {
                return bad(
                    key("rate_hz"),
                    "must be between 0 and 1,000,000 frames per second",
                );
            }
            if s.publish_every == 0 {
                return bad(key("publish_every"), "must be at least 1");
            }
        }
        if let (Some(largest), Some(incoming)) = (
            self.push_cameras().iter().map(|(_, m)| *m).max(),
            self.mqtt.max_incoming_bytes,
        ) {
            if incoming < largest + 1024 {
                return bad(
                    "mqtt.max_incoming_bytes".into(),
                    &format!("{incoming} is below the largest push camera's max_bytes ({largest}) plus 1024 for the topic and header: a frame that size would drop the MQTT connection"),
                );
            }
        }
        if let Some(inspection) = &self.inspection {
            if inspection.queue == 0 {
                return bad("inspection.queue".into(), "must be at least 1");
            }
            if let Some(t) = inspection.threshold {
                if !(t.is_finite() && t > 0.0) {
                    return bad("inspection.threshold".into(), "must be a positive number");
                }
            }
        }
        if self.reject.kind == RejectKind::File && self.reject.path.is_none() {
            return bad("reject.path".into(), "kind = \"file\" needs a path");
        }
        if self.reject.kind == RejectKind::Gpio
            && (self.reject.chip.is_none() || self.reject.line.is_none())
        {
            return bad(
                "reject".into(),
                "kind = \"gpio\" needs chip (e.g. \"/dev/gpiochip0\") and line (the board profile's [gpio] reject_line)",
            );
        }
        self.gateway().validate()
    }

    /// Frames waiting for inference (1 for a station without cameras).
    pub fn queue_capacity(&self) -> usize {
        self.inspection.as_ref().map_or(1, |i| i.queue)
    }

    /// Push cameras: (name, largest frame in bytes).
    pub fn push_cameras(&self) -> Vec<(String, usize)> {
        self.cameras
            .iter()
            .filter(|c| c.kind == SourceKind::Push)
            .map(|c| (c.name.clone(), c.max_bytes))
            .collect()
    }

    /// The gateway's part of the configuration.
    pub fn gateway(&self) -> GatewayConfig {
        let mut mqtt = self.mqtt.clone();
        if let Some(largest) = self.push_cameras().iter().map(|(_, m)| *m).max() {
            // Room for the frame, the topic and the MQTT header.
            let needed = largest + 1024;
            mqtt.max_incoming_bytes
                .get_or_insert(mqtt.max_packet_bytes.max(needed));
        }
        let mut commands = self.commands.clone();
        commands.sensor_sources = Some(self.sensors.iter().map(|s| s.name.clone()).collect());
        GatewayConfig {
            mqtt,
            spool: self.spool.clone(),
            samples: self.samples.clone(),
            telemetry: self.telemetry.clone(),
            commands,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_embedded_default_parses() {
        let c = StationConfig::from_toml(DEFAULT_STATION, Path::new("/repo")).unwrap();
        assert_eq!(c.cameras.len(), 1);
        assert!(c.inspection.as_ref().unwrap().model.starts_with("/repo"));
        assert_eq!(c.mqtt.host, "embedded");
        assert_eq!(c.sensors.len(), 1);
        assert!(c.sensors[0].path.starts_with("/repo/models"));
    }

    #[test]
    fn bad_values_name_their_key() {
        let with = |from: &str, to: &str| {
            assert!(DEFAULT_STATION.contains(from), "{from}");
            let text = DEFAULT_STATION.replacen(from, to, 1);
            StationConfig::from_toml(&text, Path::new("/"))
                .unwrap_err()
                .to_string()
        };
        assert!(with("fps = 2.0", "fps = -1.0").contains("cameras[0].fps"));
        assert!(with("kind = \"folder\"", "kind = \"camera\"").contains("cameras[0].kind"));
        assert!(with("queue = 4", "queue = 0").contains("inspection.queue"));
        assert!(with("fail_safe = \"reject_all\"", "fail_safe = \"maybe\"").contains("fail_safe"));
        assert!(with("[station]", "[station]\ncolour = 1").contains("colour"));
        assert!(with("rate_hz = 20.0", "rate_hz = 0.0").contains("sensors[0].rate_hz"));
        assert!(
            with("publish_every = 10", "publish_every = 0").contains("sensors[0].publish_every")
        );
        assert!(with("name = \"pump1\"", "name = \"pump1\"\nrate = 3").contains("rate"));
        assert!(with("name = \"pump1\"", "name = \"pump 1\"").contains("sensors[0].name"));
        assert!(with("kind = \"folder\"", "kind = \"push\"").contains("cameras[0].path"));
        assert_eq!(device_index("/dev/video2"), Ok(2));
        assert_eq!(device_index("3"), Ok(3));
        assert!(device_index("/dev/cam")
            .unwrap_err()
            .contains("/dev/videoN"));
    }

    /// Cameras need the vision model and the vision model needs a camera; a station without
    /// either watches its sensors alone.
    #[test]
    fn a_station_may_watch_sensors_alone() {
        let parse = |text: &str| StationConfig::from_toml(text, Path::new("/"));
        let cut = |text: &str, from: &str, to: &str| -> String {
            let (a, b) = (text.find(from).unwrap(), text.find(to).unwrap());
            format!("{}{}", &text[..a], &text[b..])
        };
        let no_cameras = cut(DEFAULT_STATION, "[[cameras]]", "[inspection]");
        let err = parse(&no_cameras).unwrap_err().to_string();
        assert!(err.contains("inspection: no camera feeds it"), "{err}");
        let sensors_only = cut(&no_cameras, "[inspection]", "# Sensor sources");
        let c = parse(&sensors_only).unwrap();
        assert!(c.cameras.is_empty() && c.inspection.is_none() && c.sensors.len() == 1);
        let no_inspection = cut(DEFAULT_STATION, "[inspection]", "# Sensor sources");
        let err = parse(&no_inspection).unwrap_err().to_string();
        assert!(err.contains("cameras need an [inspection]"), "{err}");
        let nothing = cut(&sensors_only, "[[sensors]]", "[reject]");
        let err = parse(&nothing).unwrap_err().to_string();
        assert!(
            err.contains("at least one [[cameras]] or [[sensors]]"),
            "{err}"
        );
    }
}
