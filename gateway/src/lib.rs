//! neo-gateway: the device's link to the plant and the cloud.
//!
//! Like rumqttc, it is a handle plus an event loop the caller drives: [`Gateway::start`]
//! returns a [`Gateway`] (cheap to clone; producers call [`Gateway::publish`]) and a
//! [`link::Link`] whose `run` future talks MQTT. Every message goes through the on-disk
//! [`spool::Spool`] first and leaves it only when the broker acknowledged it, so broker
//! outages, link drops and crashes lose nothing (at-least-once delivery).
//!
//! The MQTT contract (topics, envelope, commands) is in `docs/mqtt.md`.

pub mod command;
pub mod config;
pub mod deploy;
pub mod inbox;
pub mod link;
pub mod message;
pub mod metrics;
pub mod samples;
pub mod session;
pub mod spool;
pub mod station;
pub mod systemd;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use config::GatewayConfig;
pub use message::{Class, ReceivedEnvelope, Topics};
pub use spool::{NewMessage, Spool, StreamStats};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("spool store: {0}")]
    Store(#[from] redb::Error),
    #[error(
        "the spool {} is in use by another process: is another neo-gateway running with the same spool.dir?",
        .0.display()
    )]
    SpoolBusy(PathBuf),
    #[error("the spool is corrupt: {0}")]
    Corrupt(String),
    #[error("cannot encode a message: {0}")]
    Encode(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("the gateway has stopped: {0}")]
    Stopped(String),
    #[error("deployment refused: {0}")]
    Deploy(String),
}

pub type Result<T, E = GatewayError> = std::result::Result<T, E>;

/// Counters the link and the spool writer keep; telemetry and `/metrics` read them.
#[derive(Debug, Default)]
pub struct LinkStats {
    pub connected: AtomicBool,
    pub connects: AtomicU64,
    pub connection_errors: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    /// Publishes an MQTT 5 broker acknowledged with an error reason code (kept in the spool).
    pub refused: AtomicU64,
    pub spool_errors: AtomicU64,
    pub commands_accepted: AtomicU64,
    pub commands_refused: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl LinkStats {
    pub fn note_error(&self, e: impl std::fmt::Display) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(e.to_string());
        }
    }
}

enum Op {
    Append(NewMessage),
    Flush(mpsc::Sender<Result<(), String>>),
}

/// What the spool writer thread and the link share.
pub(crate) struct Shared {
    pub spool: Spool,
    pub topics: Topics,
    pub config: GatewayConfig,
    pub stats: LinkStats,
    /// Acknowledged messages waiting to be removed from the spool.
    pub acked: Mutex<Vec<(Class, u64)>>,
    /// Wakes the link when new messages are in the spool.
    pub wake: tokio::sync::Notify,
    pub started: Instant,
    pub app_metrics: Mutex<Vec<(String, f64)>>,
    /// Inboxes of the station's push cameras, once it has set them up.
    pub inbox: std::sync::OnceLock<inbox::FrameInbox>,
    /// What the application reports as wrong (a stalled stage, no usable model, a failing
    /// camera), by what; `/healthz` answers 503 while any is set.
    pub problems: Mutex<std::collections::BTreeMap<String, String>>,
}

/// The producer handle. Clone it into every thread that produces results.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
    ops: SyncSender<Op>,
    /// Set by the spool writer once it stopped and let go of the spool.
    writer_done: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

/// How many messages may wait for the spool writer before `publish` blocks.
const WRITER_QUEUE: usize = 8192;
/// Longest a removal after PUBACK waits to be committed.
const ACK_COMMIT_INTERVAL: Duration = Duration::from_millis(20);

impl Gateway {
    /// Opens the spool, starts its writer thread and prepares the MQTT link. Nothing connects
    /// until the returned link's `run` is polled; messages published before that wait in the
    /// spool.
    pub fn start(config: GatewayConfig) -> Result<(Gateway, link::Link, command::Commands)> {
        config.validate()?;
        let topics = config.topics()?;
        // What a message may carry once the base topic, the separator and the MQTT fixed
        // header (at most 5 bytes), topic length and packet id are counted.
        let max_payload = config
            .mqtt
            .max_packet_bytes
            .saturating_sub(topics.base().len() + 1 + 9);
        let spool = Spool::open(
            &config.spool.dir,
            &config.mqtt.device,
            config.spool_max_bytes(),
            max_payload,
        )?;
        let shared = Arc::new(Shared {
            spool,
            topics,
            config,
            stats: LinkStats::default(),
            acked: Mutex::new(Vec::new()),
            wake: tokio::sync::Notify::new(),
            started: Instant::now(),
            app_metrics: Mutex::new(Vec::new()),
            inbox: std::sync::OnceLock::new(),
            problems: Mutex::new(std::collections::BTreeMap::new()),
        });
        let (ops, rx) = mpsc::sync_channel(WRITER_QUEUE);
        let writer_shared = shared.clone();
        let writer_done = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let done = writer_done.clone();
        std::thread::Builder::new()
            .name("neo-spool".into())
            .spawn(move || {
                writer(writer_shared, rx);
                let (flag, cv) = &*done;
                *flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
                cv.notify_all();
            })
            .map_err(|e| GatewayError::Io {
                context: "cannot start the spool writer thread".into(),
                source: e,
            })?;
        let gateway = Gateway {
            shared,
            ops,
            writer_done,
        };
        let (link, commands) = link::Link::new(gateway.clone())?;
        Ok((gateway, link, commands))
    }

    /// Queues a message for the spool; it is durable after the next group commit (at most a
    /// few milliseconds; [`Gateway::flush`] waits for it). Blocks while the writer is
    /// `WRITER_QUEUE` messages behind.
    pub fn publish(&self, class: Class, data: serde_json::Value) -> Result<()> {
        self.publish_to(class, class.name().to_string(), data)
    }

    /// Like [`Gateway::publish`] with a topic leaf of its own (under the device's base topic).
    pub fn publish_to(&self, class: Class, leaf: String, data: serde_json::Value) -> Result<()> {
        if leaf.is_empty()
            || leaf.len() > 1024
            || leaf.contains(['+', '#', '\0'])
            || leaf.starts_with('/')
        {
            return Err(GatewayError::Config(format!(
                "topic leaf {leaf:?}: must be 1-1024 characters without '+', '#' or a leading '/'"
            )));
        }
        let msg = NewMessage {
            class,
            topic: leaf,
            data,
            ts_ms: message::now_ms(),
        };
        self.ops
            .send(Op::Append(msg))
            .map_err(|_| GatewayError::Stopped("the spool writer has stopped".into()))
    }

    /// Non-blocking [`Gateway::publish`]: false when the writer queue is full.
    pub fn try_publish(&self, class: Class, data: serde_json::Value) -> Result<bool> {
        let msg = NewMessage {
            class,
            topic: class.name().to_string(),
            data,
            ts_ms: message::now_ms(),
        };
        match self.ops.try_send(Op::Append(msg)) {
            Ok(()) => Ok(true),
            Err(TrySendError::Full(_)) => Ok(false),
            Err(TrySendError::Disconnected(_)) => {
                Err(GatewayError::Stopped("the spool writer has stopped".into()))
            }
        }
    }

    /// Waits until everything published so far is durable in the spool.
    pub fn flush(&self) -> Result<()> {
        let (tx, rx) = mpsc::channel();
        self.ops
            .send(Op::Flush(tx))
            .map_err(|_| GatewayError::Stopped("the spool writer has stopped".into()))?;
        match rx.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(GatewayError::Stopped(format!("spool write failed: {e}"))),
            Err(_) => Err(GatewayError::Stopped("the spool writer has stopped".into())),
        }
    }

    /// Drops this handle and waits (up to `timeout`) until the spool writer has committed
    /// everything and closed the spool, so another gateway can open it. Only useful when this
    /// is the last handle (the link and every clone are gone); false on timeout.
    pub fn close(self, timeout: Duration) -> bool {
        let done = self.writer_done.clone();
        drop(self);
        let (flag, cv) = &*done;
        let mut closed = flag.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = Instant::now() + timeout;
        while !*closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            closed = cv
                .wait_timeout(closed, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        true
    }

    /// Waits until the broker acknowledged everything in the spool, or the timeout passes.
    /// True when the spool is empty.
    pub fn wait_delivered(&self, timeout: Duration) -> Result<bool> {
        self.flush()?;
        let deadline = Instant::now() + timeout;
        loop {
            if self.shared.spool.queued() == 0 {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn spool(&self) -> &Spool {
        &self.shared.spool
    }

    pub fn topics(&self) -> &Topics {
        &self.shared.topics
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.shared.config
    }

    pub fn stats(&self) -> &LinkStats {
        &self.shared.stats
    }

    /// Routes frames pushed over MQTT (`<base>/frames/<camera>`) and HTTP
    /// (`POST /frames/<camera>`) into `inbox`. Set once, before the link runs.
    pub fn accept_frames(&self, inbox: inbox::FrameInbox) -> Result<()> {
        self.shared
            .inbox
            .set(inbox)
            .map_err(|_| GatewayError::Config("frame inboxes are already set".into()))
    }

    /// Reports (`Some(why)`) or clears (`None`) a problem of the application's; `/healthz`
    /// is 503 and lists them while any is set.
    pub fn set_problem(&self, what: &str, problem: Option<String>) {
        let mut p = self
            .shared
            .problems
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match problem {
            Some(why) => {
                p.insert(what.to_string(), why);
            }
            None => {
                p.remove(what);
            }
        }
    }

    /// The problems set with [`Gateway::set_problem`].
    pub fn problems(&self) -> std::collections::BTreeMap<String, String> {
        self.shared
            .problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn uptime(&self) -> Duration {
        self.shared.started.elapsed()
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// The spool writer: group-commits appends (fsync) and removals, then wakes the link. A
/// failed commit (a full disk, say) is retried with the same messages; meanwhile producers
/// block on the full queue instead of losing results.
fn writer(shared: Arc<Shared>, rx: mpsc::Receiver<Op>) {
    const BATCH: usize = 1024;
    let mut done = false;
    let mut new: Vec<NewMessage> = Vec::new();
    let mut acked: Vec<(Class, u64)> = Vec::new();
    let mut flushes: Vec<mpsc::Sender<Result<(), String>>> = Vec::new();
    while !(done && new.is_empty() && acked.is_empty()) {
        if new.len() < BATCH && !done {
            match rx.recv_timeout(ACK_COMMIT_INTERVAL) {
                Ok(op) => {
                    let mut next = Some(op);
                    while let Some(op) = next.take() {
                        match op {
                            Op::Append(m) => new.push(m),
                            Op::Flush(tx) => flushes.push(tx),
                        }
                        if new.len() < BATCH {
                            next = rx.try_recv().ok();
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => done = true,
            }
        }
        match shared.acked.lock() {
            Ok(mut a) => acked.append(&mut a),
            Err(p) => acked.append(&mut p.into_inner()),
        }
        let result = if new.is_empty() && acked.is_empty() {
            Ok(Vec::new())
        } else {
            shared.spool.commit(&new, &acked)
        };
        match result {
            Ok(ids) => {
                new.clear();
                acked.clear();
                if !ids.is_empty() {
                    shared.wake.notify_one();
                }
                for f in flushes.drain(..) {
                    let _ = f.send(Ok(()));
                }
            }
            Err(e) => {
                shared.stats.spool_errors.fetch_add(1, Ordering::Relaxed);
                shared.stats.note_error(&e);
                tracing::error!("spool write failed (retrying): {e}");
                for f in flushes.drain(..) {
                    let _ = f.send(Err(e.to_string()));
                }
                std::thread::sleep(Duration::from_millis(200));
                if done {
                    // Shutting down with a spool that cannot be written: give up after saying so.
                    tracing::error!(
                        "{} messages could not be written before stopping",
                        new.len()
                    );
                    return;
                }
            }
        }
    }
}
