//! The station daemon: camera → inspection → decision → reject signal → MQTT.
//!
//! Threads: one capture thread per camera pushes frames into a bounded queue (oldest dropped
//! when inference falls behind); one inspection thread runs the model (tract uses the board's
//! threads inside), decides, publishes the result through the gateway spool, schedules the
//! reject pulse and picks samples; one actuator thread fires pulses at capture time + the
//! conveyor delay. Commands (pause, threshold, capture now, new model) arrive from the gateway.

#[cfg(feature = "camera")]
pub mod camera;
pub mod config;
pub mod gpio;
pub mod parts;
mod sensors;
mod watchdog;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use neo_runtime::anomaly::Verdict;
use neo_runtime::Model;
use serde_json::json;

use crate::command::Action;
use crate::deploy::Slots;
use crate::message::{now_ms, Class};
use crate::{Gateway, GatewayError, Result};
use config::{StationConfig, Trigger};
use parts::{Frame, FrameQueue, ModelKind, Window};

/// How a run ends (besides SIGTERM / Ctrl-C).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop after this many frames were inspected.
    pub max_frames: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// One line per result on stdout.
    pub print: bool,
}

/// Totals of a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    pub frames: u64,
    pub ok: u64,
    pub ng: u64,
    pub fail_safe: u64,
    pub dropped: u64,
    pub rejects: u64,
    pub late_rejects: u64,
    pub seconds: f64,
    pub frames_per_s: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    pub spool_queued_at_exit: u64,
    /// Sensor windows scored, and Healthy/Warning/Alarm changes published.
    pub sensor_windows: u64,
    pub sensor_state_changes: u64,
}

struct LoadedModel {
    model: Model,
    kind: ModelKind,
    name: String,
    path: PathBuf,
}

/// State shared by the station's threads.
struct Shared {
    config: StationConfig,
    gateway: Gateway,
    model: RwLock<Result<Arc<LoadedModel>, String>>,
    /// f32 bits; 0 = the model kind's default.
    threshold: AtomicU32,
    paused: AtomicBool,
    stop: AtomicBool,
    /// Cameras and sensor sources still running; the station stops when the last one ends
    /// (non-looping replays).
    live_sources: AtomicUsize,
    capture_now: AtomicU64,
    queue: FrameQueue,
    summary: Mutex<Summary>,
    latency: Mutex<[Window; 5]>,
    started: Instant,
    /// The inspection stage's watchdog, the current worker, and whether the vision threads
    /// are done (set at shutdown once the last worker has drained the queue).
    watch: watchdog::Watch,
    inspector: Mutex<Option<JoinHandle<()>>>,
    vision_done: AtomicBool,
    /// Where a model deployed for a sensor source is handed to its thread.
    sensor_swaps: Mutex<std::collections::HashMap<String, mpsc::Sender<sensors::SensorSwap>>>,
}

fn load_model(path: &std::path::Path, threads: Option<usize>) -> Result<LoadedModel, String> {
    let model = Model::load_with_threads(path, threads).map_err(|e| e.to_string())?;
    for w in model.warnings() {
        tracing::warn!(model = %path.display(), "{w}");
    }
    let kind = parts::model_kind(&model);
    let name = model.manifest().name.clone();
    Ok(LoadedModel {
        model,
        kind,
        name,
        path: path.to_path_buf(),
    })
}

impl Shared {
    fn threshold(&self, kind: ModelKind) -> f32 {
        match f32::from_bits(self.threshold.load(Ordering::Relaxed)) {
            t if t > 0.0 && t.is_finite() => t,
            _ => self
                .config
                .inspection
                .as_ref()
                .and_then(|i| i.threshold)
                .unwrap_or_else(|| parts::default_threshold(kind)),
        }
    }

    fn current_model(&self) -> Result<Arc<LoadedModel>, String> {
        match self.model.read() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// A camera or sensor source has ended for good: the last one stops the station.
    fn source_ended(&self) {
        if self.live_sources.fetch_sub(1, Ordering::Relaxed) <= 1 {
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    fn summary(&self) -> std::sync::MutexGuard<'_, Summary> {
        self.summary.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Starts an embedded broker when `mqtt.host = "embedded"`; returns the address to print.
fn broker_address(config: &mut StationConfig) -> Result<String> {
    if config.mqtt.host != "embedded" {
        return Ok(format!("{}:{}", config.mqtt.host, config.mqtt.port));
    }
    #[cfg(feature = "embedded-broker")]
    {
        let port = config.mqtt.port;
        embedded_broker(port, config.mqtt.protocol)?;
        config.mqtt.host = "127.0.0.1".into();
        Ok(format!("127.0.0.1:{port}"))
    }
    #[cfg(not(feature = "embedded-broker"))]
    Err(GatewayError::Config(
        "mqtt.host = \"embedded\" needs the `embedded-broker` feature; set mqtt.host to a broker"
            .into(),
    ))
}

/// An in-process rumqttd on 127.0.0.1:port speaking `protocol` (rumqttd listens for one
/// protocol version per port), for demos.
#[cfg(feature = "embedded-broker")]
pub fn embedded_broker(port: u16, protocol: crate::config::Protocol) -> Result<()> {
    let v = match protocol {
        crate::config::Protocol::V311 => "v4",
        crate::config::Protocol::V5 => "v5",
    };
    if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", port)) {
        return Err(GatewayError::Config(format!(
            "mqtt.port {port}: cannot start the embedded broker ({e}); is another broker running? Set mqtt.port, or mqtt.host to that broker"
        )));
    }
    let text = format!(
        r#"
id = 0
[router]
max_connections = 64
max_outgoing_packet_count = 200
max_segment_size = 10485760
max_segment_count = 10
[{v}.1]
name = "{v}-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[{v}.1.connections]
connection_timeout_ms = 60000
max_payload_size = 16777216
max_inflight_count = 200
dynamic_filters = true
"#
    );
    let config: rumqttd::Config =
        toml::from_str(&text).map_err(|e| GatewayError::Config(format!("embedded broker: {e}")))?;
    std::thread::Builder::new()
        .name("neo-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!("embedded broker stopped: {e}");
            }
        })
        .map_err(|e| GatewayError::Io {
            context: "cannot start the embedded broker".into(),
            source: e,
        })?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(GatewayError::Config(format!(
                "the embedded broker did not open 127.0.0.1:{port}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Runs a station until SIGTERM/SIGINT, or the limits in `opts`. Configuration errors are
/// returned before anything starts; a model that does not load or a camera that fails puts
/// the station in its fail-safe mode instead.
pub fn run(mut config: StationConfig, opts: RunOptions) -> Result<Summary> {
    config.validate()?;
    let broker = broker_address(&mut config)?;
    let (gateway, link, commands) = Gateway::start(config.gateway())?;
    let push = config.push_cameras();
    let mut inboxes = if push.is_empty() {
        std::collections::HashMap::new()
    } else {
        let (inbox, receivers) =
            crate::inbox::FrameInbox::new(&push, config.queue_capacity().max(4));
        gateway.accept_frames(inbox)?;
        receivers
    };

    // A deployed (and confirmed) model wins over the configured one.
    let slots = Slots::open(&config.gateway().models_dir())?;
    let model = match &config.inspection {
        None => Err("this station has no camera".to_string()),
        Some(inspection) => {
            let model_path = match slots.active()? {
                Some(active) => active.path,
                None => inspection.model.clone(),
            };
            let model = load_model(&model_path, inspection.threads).map(Arc::new);
            match &model {
                Ok(m) => tracing::info!(
                    "station {}: model {} ({:?}, {} threads) from {}",
                    config.station.name,
                    m.name,
                    m.kind,
                    m.model.threads(),
                    m.path.display()
                ),
                Err(e) => {
                    tracing::error!(
                        "the model {} cannot be used: {e}; the station runs in fail-safe mode ({:?}) until a model is deployed",
                        model_path.display(),
                        config.station.fail_safe
                    );
                    gateway.publish(
                        Class::Alarm,
                        json!({ "alarm": "model_unavailable", "model": model_path, "error": e, "fail_safe": format!("{:?}", config.station.fail_safe) }),
                    )?;
                    gateway.set_problem("model", Some(format!("{}: {e}", model_path.display())));
                }
            }
            model
        }
    };
    let metrics = config
        .telemetry
        .metrics_addr
        .clone()
        .map(|a| format!("http://{a}/metrics"))
        .unwrap_or_else(|| "(telemetry.metrics_addr not set)".into());
    let base = gateway.topics().base().to_string();
    tracing::info!(
        "watch: neo-gateway watch --broker {broker}   (or: mosquitto_sub -h {} -p {} -t '{base}/#' -v)",
        config.mqtt.host, config.mqtt.port
    );
    tracing::info!("metrics: {metrics}");
    for (name, _) in &push {
        let http = match &config.telemetry.metrics_addr {
            Some(a) => format!("curl --data-binary @frame.jpg http://{a}/frames/{name}"),
            None => "(HTTP off: telemetry.metrics_addr not set)".into(),
        };
        tracing::info!(
            "push frames to {name}: mosquitto_pub -h {} -p {} -t '{base}/frames/{name}' -f frame.jpg   or: {http}",
            config.mqtt.host, config.mqtt.port
        );
    }

    let sources = config.cameras.len() + config.sensors.len();
    let shared = Arc::new(Shared {
        queue: FrameQueue::new(config.queue_capacity()),
        config,
        gateway: gateway.clone(),
        model: RwLock::new(model),
        threshold: AtomicU32::new(0),
        paused: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        live_sources: AtomicUsize::new(sources),
        capture_now: AtomicU64::new(0),
        summary: Mutex::new(Summary::default()),
        latency: Mutex::new(std::array::from_fn(|_| Window::new(200))),
        started: Instant::now(),
        sensor_swaps: Mutex::new(std::collections::HashMap::new()),
        watch: watchdog::Watch::default(),
        inspector: Mutex::new(None),
        vision_done: AtomicBool::new(false),
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| GatewayError::Io {
            context: "cannot start the async runtime".into(),
            source: e,
        })?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let link_task = rt.spawn(link.run(stop_rx.clone()));
    let telemetry_gateway = gateway.clone();
    let telemetry_rx = stop_rx.clone();
    let telemetry_task =
        rt.spawn(async move { telemetry_gateway.run_telemetry(telemetry_rx).await });
    rt.spawn(command_loop(shared.clone(), commands, slots));

    // Inspection and rejects only where a camera feeds them (a station may watch sensors
    // alone).
    let mut vision = Vec::new();
    // GPIO first: a trigger input or reject line that cannot be opened stops the start
    // before any thread runs.
    let mut edges = std::collections::HashMap::new();
    for cam in &shared.config.cameras {
        if let Some(g) = cam.gpio.as_ref().filter(|_| cam.trigger == Trigger::Gpio) {
            let queue = Arc::new(gpio::Edges::default());
            gpio::spawn_trigger(
                &cam.name,
                &g.chip,
                g.line,
                g.edge,
                Duration::from_millis(g.debounce_ms),
                queue.clone(),
            )
            .map_err(GatewayError::Config)?;
            edges.insert(cam.name.clone(), queue);
        }
    }
    if !shared.config.cameras.is_empty() {
        let out = parts::reject_output(&shared.config.reject).map_err(GatewayError::Config)?;
        tracing::info!("reject output: {}", out.describe());
        let (reject_tx, reject_rx) = mpsc::channel::<(Instant, String)>();
        let s = shared.clone();
        vision.push(spawn("neo-reject", move || actuator(s, out, reject_rx))?);
        let s = shared.clone();
        let print = opts.print;
        let tx = reject_tx.clone();
        *shared.inspector.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(spawn("neo-inspect", move || inspect_loop(s, tx, print, 0))?);
        let s = shared.clone();
        vision.push(spawn("neo-watchdog", move || {
            watchdog_loop(s, reject_tx, print)
        })?);
    }
    let models_dir = shared.config.gateway().models_dir();
    let sensors: Vec<JoinHandle<()>> = shared
        .config
        .sensors
        .iter()
        .cloned()
        .map(|s| {
            // A deployed (and confirmed) sensor model wins over the configured one.
            let slots = Slots::open(&crate::deploy::slots_dir(&models_dir, Some(&s.name)))?;
            let model = slots.active()?.map_or_else(|| s.model.clone(), |a| a.path);
            let (swap_tx, swaps) = mpsc::channel();
            shared
                .sensor_swaps
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(s.name.clone(), swap_tx);
            let shared = shared.clone();
            let print = opts.print;
            spawn(&format!("neo-sensor-{}", s.name), move || {
                sensors::sensor_loop(shared, s, model, swaps, print)
            })
        })
        .collect::<Result<_>>()?;
    let cameras: Vec<JoinHandle<()>> = shared
        .config
        .cameras
        .iter()
        .cloned()
        .map(|cam| {
            let shared = shared.clone();
            let inbox = inboxes.remove(&cam.name);
            let edges = edges.remove(&cam.name).unwrap_or_default();
            spawn(&format!("neo-cam-{}", cam.name), move || match inbox {
                Some(rx) => capture_pushed(shared, cam, rx),
                None => capture(shared, cam, &edges),
            })
        })
        .collect::<Result<_>>()?;

    // Wait for a signal or a limit; under systemd, say ready and ping its watchdog while the
    // inspection stage makes progress (after three stalls in a row without a frame decided in
    // time, the pings stop and systemd restarts the daemon).
    let deadline = opts.duration.map(|d| Instant::now() + d);
    crate::systemd::notify("READY=1\nSTATUS=inspecting");
    let ping_every = crate::systemd::watchdog_interval().map(|d| d / 2);
    let mut next_ping = Instant::now();
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        loop {
            if let Some(every) = ping_every {
                if Instant::now() >= next_ping
                    && shared.watch.stalls_in_a_row.load(Ordering::Relaxed) < 3
                {
                    crate::systemd::notify("WATCHDOG=1");
                    next_ping = Instant::now() + every;
                }
            }
            let frames = shared.summary().frames;
            if opts.max_frames.is_some_and(|m| frames >= m)
                || deadline.is_some_and(|d| Instant::now() >= d)
                || shared.stop.load(Ordering::Relaxed)
            {
                break;
            }
            tokio::select! {
                _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted: stopping"); break; }
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {
                    tracing::info!("SIGTERM: stopping"); break;
                }
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    });

    // Graceful stop: no new frames, finish the queued ones, fire due pulses, flush the spool,
    // send what the broker will take, say offline.
    shared.stop.store(true, Ordering::Relaxed);
    crate::systemd::notify("STOPPING=1");
    for c in cameras.into_iter().chain(sensors) {
        let _ = c.join();
    }
    shared.queue.close();
    // The current worker drains the queue; the watchdog may replace a stuck one meanwhile,
    // so wait for whichever is current (a stuck one left behind is not waited for).
    // At most 20 s, within the bundles' TimeoutStopSec=30.
    let drain_deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let current = shared
            .inspector
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(worker) = current else { break };
        let replaced = || {
            shared
                .inspector
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
        };
        while !worker.is_finished() && !replaced() && Instant::now() < drain_deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if worker.is_finished() {
            let _ = worker.join();
        } else if !replaced() {
            tracing::warn!("the inspection worker did not finish within 20 s; leaving it behind");
            break;
        }
        // Replaced by the watchdog: the stuck one is left behind; wait for the new one.
    }
    shared.vision_done.store(true, Ordering::Relaxed);
    for v in vision {
        let _ = v.join();
    }
    gateway.flush()?;
    let _ = stop_tx.send(true);
    let _ = rt.block_on(link_task);
    let _ = rt.block_on(telemetry_task);
    let mut summary = shared.summary().clone();
    summary.dropped = shared.queue.dropped.load(Ordering::Relaxed);
    summary.seconds = shared.started.elapsed().as_secs_f64();
    summary.frames_per_s = summary.frames as f64 / summary.seconds.max(1e-9);
    if let Ok(l) = shared.latency.lock() {
        summary.latency_ms_p50 = l[4].quantile(0.5);
        summary.latency_ms_p99 = l[4].quantile(0.99);
    }
    summary.spool_queued_at_exit = gateway.spool().queued();
    rt.shutdown_timeout(Duration::from_secs(1));
    drop(shared);
    if !gateway.close(Duration::from_secs(5)) {
        tracing::warn!("the spool did not close within 5 s");
    }
    Ok(summary)
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| GatewayError::Io {
            context: format!("cannot start thread {name}"),
            source: e,
        })
}

/// A folder camera. `edges`: debounced GPIO trigger edges (`trigger = "gpio"`), one frame
/// each, the part timed from its edge.
fn capture(shared: Arc<Shared>, cam: config::CameraConfig, edges: &gpio::Edges) {
    let mut source = match cam.kind {
        #[cfg(feature = "camera")]
        config::SourceKind::Camera => match camera::CameraSource::new(&cam) {
            Ok(c) => Source::Camera(Box::new(c)),
            Err(e) => {
                tracing::error!("camera {}: {e}", cam.name);
                return;
            }
        },
        _ => {
            let Some(path) = cam.path.clone() else { return };
            Source::Folder(parts::FolderSource::new(&path, cam.repeat))
        }
    };
    let period = Duration::from_secs_f64(1.0 / cam.fps);
    let mut next_due = Instant::now();
    let mut index = 0u64;
    let mut failing: Option<String> = None;
    let mut triggers_seen = shared.capture_now.load(Ordering::Relaxed);
    while !shared.stop.load(Ordering::Relaxed) {
        let mut sample = false;
        // A GPIO-triggered part is timed from its edge (its reject pulse is due at edge +
        // reject.delay_ms), not from when the frame was read.
        let mut edge_at = None;
        match cam.trigger {
            Trigger::Gpio => {
                // One frame per edge, none skipped when edges come faster than frames.
                let lost = edges.dropped.swap(0, Ordering::Relaxed);
                if lost > 0 {
                    tracing::warn!(
                        "camera {}: {lost} trigger edges dropped: parts come faster than frames",
                        cam.name
                    );
                    shared.queue.dropped.fetch_add(lost, Ordering::Relaxed);
                }
                let Some(at) = edges.pop() else {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                };
                edge_at = Some(at);
                let t = shared.capture_now.load(Ordering::Relaxed);
                sample = t != triggers_seen;
                triggers_seen = t;
            }
            Trigger::FreeRun => {
                let now = Instant::now();
                if now < next_due {
                    std::thread::sleep((next_due - now).min(Duration::from_millis(50)));
                    continue;
                }
                next_due += period;
                if next_due < now {
                    next_due = now + period; // fell behind: do not burst
                }
                let t = shared.capture_now.load(Ordering::Relaxed);
                if t != triggers_seen {
                    triggers_seen = t;
                    sample = true;
                }
            }
            Trigger::Software => {
                let t = shared.capture_now.load(Ordering::Relaxed);
                if t == triggers_seen {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                triggers_seen = t;
                sample = true;
            }
        }
        if shared.paused.load(Ordering::Relaxed) {
            continue;
        }
        let t0 = edge_at.unwrap_or_else(Instant::now);
        let captured_ms = now_ms().saturating_sub(t0.elapsed().as_millis() as u64);
        let (name, image) = match source.next_frame() {
            Ok(Some((name, img))) => {
                if let Some(why) = failing.take() {
                    tracing::info!("camera {}: recovered (was: {why})", cam.name);
                    shared
                        .gateway
                        .set_problem(&format!("camera {}", cam.name), None);
                    let _ = shared.gateway.publish(
                        Class::Alarm,
                        json!({ "alarm": "camera_recovered", "camera": cam.name }),
                    );
                }
                (name, Ok(img))
            }
            Ok(None) => {
                tracing::info!("camera {}: no more images", cam.name);
                shared.source_ended();
                break;
            }
            Err(e) => {
                if failing.is_none() {
                    tracing::error!("camera {}: {e}", cam.name);
                    shared
                        .gateway
                        .set_problem(&format!("camera {}", cam.name), Some(e.clone()));
                    let _ = shared.gateway.publish(
                        Class::Alarm,
                        json!({ "alarm": "camera_failed", "camera": cam.name, "error": e, "fail_safe": format!("{:?}", shared.config.station.fail_safe) }),
                    );
                }
                failing = Some(e.clone());
                (String::new(), Err(format!("camera {}: {e}", cam.name)))
            }
        };
        shared.queue.push(Frame {
            camera: cam.name.clone(),
            index,
            name,
            image,
            captured: t0,
            captured_ms,
            capture_ms: t0.elapsed().as_secs_f64() * 1e3,
            sample,
        });
        index += 1;
    }
}

/// Where a capture thread's frames come from.
enum Source {
    Folder(parts::FolderSource),
    #[cfg(feature = "camera")]
    Camera(Box<camera::CameraSource>),
}

impl Source {
    fn next_frame(&mut self) -> Result<Option<(String, image::DynamicImage)>, String> {
        match self {
            Source::Folder(f) => f.next_frame(),
            #[cfg(feature = "camera")]
            Source::Camera(c) => c.next_frame(),
        }
    }
}

/// A push camera: each frame another program sent (MQTT or HTTP) becomes one part. A payload
/// that is not an image still is a part: it gets the fail-safe verdict and says why.
fn capture_pushed(
    shared: Arc<Shared>,
    cam: config::CameraConfig,
    rx: mpsc::Receiver<crate::inbox::PushedFrame>,
) {
    let mut index = 0u64;
    let mut triggers_seen = shared.capture_now.load(Ordering::Relaxed);
    while !shared.stop.load(Ordering::Relaxed) {
        let pushed = match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(p) => p,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        if shared.paused.load(Ordering::Relaxed) {
            // Not inspected while paused: counted with the frames dropped.
            shared.queue.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let t0 = Instant::now();
        let image = image::load_from_memory(&pushed.bytes).map_err(|e| {
            format!(
                "camera {}: frame pushed over {} is not an image: {e}",
                cam.name, pushed.via
            )
        });
        let t = shared.capture_now.load(Ordering::Relaxed);
        let sample = t != triggers_seen;
        triggers_seen = t;
        shared.queue.push(Frame {
            camera: cam.name.clone(),
            index,
            name: pushed
                .name
                .unwrap_or_else(|| format!("{}-{index}", pushed.via)),
            image,
            captured: t0,
            captured_ms: pushed.received_ms,
            capture_ms: t0.elapsed().as_secs_f64() * 1e3,
            sample,
        });
        index += 1;
    }
}

/// An inspection worker. `generation` identifies it to the watchdog, which retires a worker
/// stuck on a frame and starts the next one.
fn inspect_loop(
    shared: Arc<Shared>,
    rejects: mpsc::Sender<(Instant, String)>,
    print: bool,
    generation: u64,
) {
    let cfg = &shared.config;
    // The app metrics (percentiles over the last frames) are refreshed at most once a second.
    let mut metrics_due = Instant::now();
    while let Some(frame) = shared.queue.pop() {
        let dequeued = Instant::now();
        let queue_ms = (dequeued - frame.captured).as_secs_f64() * 1e3 - frame.capture_ms;
        shared.watch.begin(generation, &frame, queue_ms);
        let model = shared.current_model();
        let (decision, stages, model_name) = match (&frame.image, &model) {
            (Ok(img), Ok(m)) => {
                let threshold = shared.threshold(m.kind);
                let ng_labels = cfg.inspection.as_ref().map_or(&[][..], |i| &i.ng_labels);
                match parts::inspect(&m.model, img, threshold, ng_labels) {
                    Ok((d, stages)) => (d, stages, Some(m.name.clone())),
                    Err(e) => (
                        parts::fail_safe(
                            cfg.station.fail_safe,
                            &format!("model failed: {e}"),
                            threshold,
                        ),
                        [0.0; 3],
                        Some(m.name.clone()),
                    ),
                }
            }
            (Err(e), m) => {
                let t = m
                    .as_ref()
                    .map(|m| shared.threshold(m.kind))
                    .unwrap_or(f32::NAN);
                (
                    parts::fail_safe(cfg.station.fail_safe, e, t),
                    [0.0; 3],
                    None,
                )
            }
            (Ok(_), Err(e)) => (
                parts::fail_safe(
                    cfg.station.fail_safe,
                    &format!("model unavailable: {e}"),
                    f32::NAN,
                ),
                [0.0; 3],
                None,
            ),
        };
        match shared.watch.end(generation) {
            // The watchdog gave this frame its fail-safe verdict and started another worker.
            None => return,
            Some(true) => shared.gateway.set_problem("inspection", None),
            Some(false) => {}
        }
        publish_result(
            &shared,
            &frame,
            queue_ms,
            (decision, stages, model_name),
            &rejects,
            print,
            &mut metrics_due,
        );
    }
}

/// Watches the inspection worker: a frame held longer than `station.stall_s` gets its
/// fail-safe verdict here, an alarm goes out, and a fresh worker takes over the queue.
fn watchdog_loop(shared: Arc<Shared>, rejects: mpsc::Sender<(Instant, String)>, print: bool) {
    let stall = Duration::from_secs_f64(shared.config.station.stall_s);
    let tick = (stall / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut metrics_due = Instant::now();
    while !shared.vision_done.load(Ordering::Relaxed) {
        std::thread::sleep(tick);
        let Some(stuck) = shared.watch.take_stalled(stall) else {
            continue;
        };
        let part = format!("{}-{:06}", stuck.frame.camera, stuck.frame.index);
        let seconds = stuck.since.elapsed().as_secs_f64();
        let restarts = shared.watch.restarts.load(Ordering::Relaxed);
        let why = format!(
            "inspection stalled for {seconds:.1} s on {part} (station.stall_s = {}); the worker was restarted",
            shared.config.station.stall_s
        );
        tracing::error!("{why}");
        shared.gateway.set_problem("inspection", Some(why.clone()));
        let _ = shared.gateway.publish(
            Class::Alarm,
            json!({ "alarm": "stage_stuck", "stage": "inspection", "part": part, "seconds": seconds, "restarts": restarts }),
        );
        let threshold = shared
            .current_model()
            .map(|m| shared.threshold(m.kind))
            .unwrap_or(f32::NAN);
        let decision = parts::fail_safe(shared.config.station.fail_safe, &why, threshold);
        publish_result(
            &shared,
            &stuck.frame,
            stuck.queue_ms,
            (decision, [0.0; 3], None),
            &rejects,
            print,
            &mut metrics_due,
        );
        let generation = shared.watch.generation.load(Ordering::Relaxed);
        let (s, tx) = (shared.clone(), rejects.clone());
        match spawn("neo-inspect", move || {
            inspect_loop(s, tx, print, generation)
        }) {
            Ok(worker) => {
                // The stuck worker's handle is dropped: it is left behind.
                *shared.inspector.lock().unwrap_or_else(|p| p.into_inner()) = Some(worker);
            }
            Err(e) => {
                tracing::error!("cannot restart the inspection worker: {e}");
                return;
            }
        }
    }
}

/// Publishes a decided frame: the result, its reject pulse, a sample if chosen, the totals and
/// (at most once a second) the app metrics.
fn publish_result(
    shared: &Arc<Shared>,
    frame: &Frame,
    queue_ms: f64,
    (decision, stages, model_name): (parts::Decision, [f64; 3], Option<String>),
    rejects: &mpsc::Sender<(Instant, String)>,
    print: bool,
    metrics_due: &mut Instant,
) {
    let cfg = &shared.config;
    let total_ms = frame.captured.elapsed().as_secs_f64() * 1e3;
    let part = format!("{}-{:06}", frame.camera, frame.index);
    let ng = decision.verdict == Verdict::Ng;
    let failed = decision.score.is_nan();
    if ng {
        let due = frame.captured + Duration::from_millis(cfg.reject.delay_ms);
        let _ = rejects.send((due, part.clone()));
    }
    let result = json!({
        "station": cfg.station.name,
        "camera": frame.camera,
        "part": part,
        "frame": frame.index,
        "image": frame.name,
        "model": model_name,
        "verdict": decision.verdict,
        "score": if failed { None } else { Some(decision.score) },
        "raw_score": if failed { None } else { Some(decision.raw_score) },
        "threshold": decision.threshold,
        "reason": decision.reason,
        "label": decision.label,
        "regions": decision.regions,
        "fail_safe": failed,
        "captured_ms": frame.captured_ms,
        "latency_ms": {
            "capture": frame.capture_ms,
            "queue": queue_ms.max(0.0),
            "preprocess": stages[0],
            "inference": stages[1],
            "decide": stages[2],
            "total": total_ms,
        },
    });
    if let Err(e) = shared.gateway.publish(Class::Inspection, result.clone()) {
        tracing::error!("cannot spool a result: {e}");
    }
    if let Ok(img) = &frame.image {
        let reason = if frame.sample {
            Some("capture_now")
        } else if failed {
            None
        } else {
            cfg.samples.choose(ng, decision.score).map(|r| r.name())
        };
        if let Some(reason) = reason {
            let mut meta = result.clone();
            meta["reason_sampled"] = json!(reason);
            match crate::samples::encode_jpeg(img, 85)
                .and_then(|jpeg| shared.gateway.publish_sample("image/jpeg", &jpeg, meta))
            {
                Ok(_) => {}
                Err(e) => tracing::warn!("sample of {part} not sent: {e}"),
            }
        }
    }
    if print {
        println!(
            "{part}  {:<28} {:>2}  {:>6}  {:>7.1} ms  {}",
            frame.name,
            if ng { "NG" } else { "OK" },
            if failed {
                "-".to_string()
            } else {
                format!("{:.2}", decision.score)
            },
            total_ms,
            decision.reason
        );
    }
    {
        let mut s = shared.summary();
        s.frames += 1;
        if failed {
            s.fail_safe += 1;
        }
        if ng {
            s.ng += 1;
        } else {
            s.ok += 1;
        }
    }
    let totals = shared.summary().clone();
    let fps = totals.frames as f64 / shared.started.elapsed().as_secs_f64().max(1e-9);
    if let Ok(mut l) = shared.latency.lock() {
        for (w, v) in
            l.iter_mut()
                .zip([queue_ms.max(0.0), stages[0], stages[1], stages[2], total_ms])
        {
            w.push(v);
        }
        if Instant::now() < *metrics_due {
            return;
        }
        *metrics_due = Instant::now() + Duration::from_secs(1);
        let q = |i: usize, p: f64| l[i].quantile(p);
        shared.gateway.set_app_metrics(vec![
            ("frames_per_s".into(), fps),
            ("frames_total".into(), totals.frames as f64),
            (
                "frames_dropped_total".into(),
                shared.queue.dropped.load(Ordering::Relaxed) as f64,
            ),
            ("queue_depth".into(), shared.queue.len() as f64),
            ("ng_total".into(), totals.ng as f64),
            ("fail_safe_total".into(), totals.fail_safe as f64),
            ("preprocess_ms_p50".into(), q(1, 0.5)),
            ("preprocess_ms_p99".into(), q(1, 0.99)),
            ("inference_ms_p50".into(), q(2, 0.5)),
            ("inference_ms_p99".into(), q(2, 0.99)),
            ("latency_ms_p50".into(), q(4, 0.5)),
            ("latency_ms_p99".into(), q(4, 0.99)),
        ]);
    }
}

fn actuator(
    shared: Arc<Shared>,
    mut out: Box<dyn parts::RejectOutput>,
    rx: mpsc::Receiver<(Instant, String)>,
) {
    let pulse = Duration::from_millis(shared.config.reject.pulse_ms);
    // Pulses come in capture order with one delay, so they are due in order. A worker left
    // behind by the watchdog still holds a sender, so the loop also ends once the vision
    // threads are done and nothing is pending.
    loop {
        let (due, part) = match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(p) => p,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if shared.vision_done.load(Ordering::Relaxed) {
                    break;
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let now = Instant::now();
        let late = now > due + Duration::from_millis(20);
        if let Some(wait) = due.checked_duration_since(now) {
            std::thread::sleep(wait);
        }
        if late {
            tracing::warn!(
                "reject for {part} is {} ms late: inference is slower than the conveyor delay",
                (now - due).as_millis()
            );
        }
        match out.pulse(&part, pulse) {
            Ok(()) => {
                let mut s = shared.summary();
                s.rejects += 1;
                if late {
                    s.late_rejects += 1;
                }
            }
            Err(e) => {
                tracing::error!("reject output {}: {e}", out.describe());
                let _ = shared.gateway.publish(
                    Class::Alarm,
                    json!({ "alarm": "reject_failed", "part": part, "error": e }),
                );
            }
        }
    }
}

async fn command_loop(shared: Arc<Shared>, mut commands: crate::command::Commands, slots: Slots) {
    let g = shared.gateway.clone();
    while let Some(cmd) = commands.recv().await {
        let id = Some(cmd.id.as_str());
        match cmd.action {
            Action::Pause => {
                shared.paused.store(true, Ordering::Relaxed);
                g.ack(id, "pause", true, "paused");
            }
            Action::Resume => {
                shared.paused.store(false, Ordering::Relaxed);
                g.ack(id, "resume", true, "inspecting");
            }
            Action::SetThreshold { value, .. } => {
                shared.threshold.store(value.to_bits(), Ordering::Relaxed);
                g.ack(id, "set_threshold", true, &format!("threshold {value}"));
            }
            Action::CaptureNow => {
                shared.capture_now.fetch_add(1, Ordering::Relaxed);
                g.ack(
                    id,
                    "capture_now",
                    true,
                    "the next frame is sent as a sample",
                );
            }
            Action::ModelActivated {
                path,
                name,
                sensor: Some(sensor),
                ..
            } => sensor_model_activated(&shared, id, path, name, sensor).await,
            Action::ModelActivated { name, .. } if shared.config.cameras.is_empty() => {
                let back = slots.rollback();
                g.ack(
                    id,
                    "deploy",
                    false,
                    &format!("{name}: this station has no camera for a vision model (deploy a sensor model with \"sensor\": NAME); rolled back: {back:?}"),
                );
            }
            Action::ModelActivated { path, name, .. } => {
                let threads = shared.config.inspection.as_ref().and_then(|i| i.threads);
                let p = path.clone();
                let loaded = tokio::task::spawn_blocking(move || load_model(&p, threads)).await;
                match loaded {
                    Ok(Ok(m)) => {
                        match shared.model.write() {
                            Ok(mut slot) => *slot = Ok(Arc::new(m)),
                            Err(p) => *p.into_inner() = Ok(Arc::new(m)),
                        }
                        g.set_problem("model", None);
                        confirm_and_ack(&g, &slots, id, format!("{name} is inspecting"));
                    }
                    other => {
                        let why = match other {
                            Ok(Err(e)) => e,
                            Err(e) => e.to_string(),
                            Ok(Ok(_)) => String::new(),
                        };
                        let back = slots.rollback();
                        g.ack(
                            id,
                            "deploy",
                            false,
                            &format!("{name} failed to load ({why}); rolled back: {back:?}"),
                        );
                    }
                }
            }
        }
    }
}

/// A model deployed for a sensor source: the source's thread opens it and takes over, then
/// the slot is confirmed; anything else rolls the slot back.
async fn sensor_model_activated(
    shared: &Arc<Shared>,
    id: Option<&str>,
    path: PathBuf,
    name: String,
    sensor: String,
) {
    let g = &shared.gateway;
    let slots = match Slots::at(&crate::deploy::slots_dir(
        &shared.config.gateway().models_dir(),
        Some(&sensor),
    )) {
        Ok(s) => s,
        Err(e) => {
            g.ack(id, "deploy", false, &format!("{name}: {e}"));
            return;
        }
    };
    let sender = shared
        .sensor_swaps
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&sensor)
        .cloned();
    let answer = match sender {
        None => {
            let known: Vec<&str> = shared
                .config
                .sensors
                .iter()
                .map(|s| s.name.as_str())
                .collect();
            Err(format!(
                "this station has no sensor source {sensor:?} (it has: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ))
        }
        Some(tx) => {
            let (reply, rx) = mpsc::channel();
            if tx.send(sensors::SensorSwap { path, reply }).is_err() {
                Err(format!("sensor source {sensor} has stopped"))
            } else {
                tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| {
                        r.map_err(|_| format!("sensor source {sensor} did not answer within 30 s"))
                    })
                    .and_then(|r| r)
            }
        }
    };
    match answer {
        Ok(model) => confirm_and_ack(g, &slots, id, format!("{model} is watching {sensor}")),
        Err(why) => {
            let back = slots.rollback();
            g.ack(
                id,
                "deploy",
                false,
                &format!("{name} for sensor {sensor}: {why}; rolled back: {back:?}"),
            );
        }
    }
}

/// A deployed model runs: keeps it (confirms its slot) and acknowledges the deployment.
fn confirm_and_ack(g: &Gateway, slots: &Slots, id: Option<&str>, running: String) {
    match slots.confirm() {
        Ok(()) => g.ack(id, "deploy", true, &running),
        Err(e) => g.ack(
            id,
            "deploy",
            false,
            &format!("{running}, but the slot could not be confirmed: {e}"),
        ),
    }
}
