//! Remote commands on `<base>/cmd/<name>`. Each is answered on `<base>/ack` (stream `ack`)
//! with `{"cmd_id", "cmd", "ok", "message"}`. A malformed or unknown command, or a deployment
//! with a bad hash or signature, is refused there and never reaches the application.
//!
//! The link handles `status` and `deploy`/`deploy_chunk` itself; the rest (and the news that a
//! new model is active) reach the application through [`Commands`], which acknowledges with
//! [`Gateway::ack`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use base64::Engine;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::deploy::{self, DeploySpec, Slots};
use crate::message::Class;
use crate::Gateway;

/// A command for the application.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The sender's id, echoed in the acknowledgement.
    pub id: String,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// New decision threshold in the model's own units (a detector's normalized score, 1.0 =
    /// the trained threshold; a classifier's probability of its NG labels) for one model, or
    /// all when `model` is `None`.
    SetThreshold {
        model: Option<String>,
        value: f32,
    },
    Pause,
    Resume,
    /// Take a frame now (software trigger) and send it as a sample.
    CaptureNow,
    /// A deployed model was verified, health-checked and is now active in its slot: load it,
    /// then call [`Slots::confirm`] (or [`Slots::rollback`] if it fails on real frames).
    ModelActivated {
        name: String,
        path: PathBuf,
        sha256: String,
        /// The sensor source this model is for; `None`: the vision model.
        sensor: Option<String>,
    },
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::SetThreshold { .. } => "set_threshold",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::CaptureNow => "capture_now",
            Action::ModelActivated { .. } => "deploy",
        }
    }
}

/// The application's end of the command channel.
pub struct Commands {
    rx: mpsc::Receiver<Command>,
}

impl Commands {
    pub async fn recv(&mut self) -> Option<Command> {
        self.rx.recv().await
    }

    pub fn try_recv(&mut self) -> Option<Command> {
        self.rx.try_recv().ok()
    }
}

impl Gateway {
    /// Acknowledges a command on `<base>/ack`.
    pub fn ack(&self, cmd_id: Option<&str>, cmd: &str, ok: bool, message: &str) {
        let stats = &self.shared().stats;
        if ok {
            stats.commands_accepted.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.commands_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("refused command {cmd} ({cmd_id:?}): {message}");
        }
        let data = json!({ "cmd_id": cmd_id, "cmd": cmd, "ok": ok, "message": message });
        if let Err(e) = self.publish(Class::CommandResult, data) {
            stats.note_error(format!("cannot acknowledge command: {e}"));
        }
    }
}

enum Source {
    Bytes(Vec<u8>),
    File(PathBuf),
    Url(String),
}

static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct PendingDeploy {
    cmd_id: String,
    spec: DeploySpec,
    chunks: u32,
    parts: BTreeMap<u32, Vec<u8>>,
    received: u64,
}

/// Parses and routes commands for the link.
pub(crate) struct Dispatcher {
    gateway: Gateway,
    tx: mpsc::Sender<Command>,
    pending: Option<PendingDeploy>,
}

/// Largest base64 chunk accepted in one `deploy_chunk` message is bounded by the MQTT packet
/// size; the whole artifact by `commands.max_model_mb`.
const MAX_ID: usize = 128;

type Refusal = (Option<String>, String);

fn field<'v>(obj: &'v Value, key: &str) -> Option<&'v Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn str_field(obj: &Value, key: &str) -> Result<String, String> {
    match field(obj, key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(_) => Err(format!("\"{key}\" must be a non-empty string")),
        None => Err(format!("\"{key}\" is missing")),
    }
}

impl Dispatcher {
    pub(crate) fn new(gateway: Gateway) -> (Dispatcher, Commands) {
        let (tx, rx) = mpsc::channel(64);
        (
            Dispatcher {
                gateway,
                tx,
                pending: None,
            },
            Commands { rx },
        )
    }

    pub(crate) fn handle(&mut self, name: &str, payload: &[u8]) {
        if let Err((id, why)) = self.dispatch(name, payload) {
            self.gateway.ack(id.as_deref(), name, false, &why);
        }
    }

    fn dispatch(&mut self, name: &str, payload: &[u8]) -> Result<(), Refusal> {
        let body: Value = serde_json::from_slice(payload)
            .map_err(|e| (None, format!("payload is not JSON: {e}")))?;
        if !body.is_object() {
            return Err((None, "payload must be a JSON object".into()));
        }
        let id = str_field(&body, "id").map_err(|e| (None, e))?;
        if id.len() > MAX_ID || id.chars().any(|c| c.is_control()) {
            return Err((
                None,
                format!("\"id\" must be at most {MAX_ID} printable characters"),
            ));
        }
        let refuse = |why: String| (Some(id.clone()), why);
        match field(&body, "v") {
            None => {}
            Some(v) if v.as_u64() == Some(u64::from(crate::message::SCHEMA_VERSION)) => {}
            Some(v) => {
                return Err(refuse(format!(
                    "schema version {v} is not supported (this device speaks {})",
                    crate::message::SCHEMA_VERSION
                )))
            }
        }
        let action = match name {
            "set_threshold" => {
                let value = field(&body, "value")
                    .and_then(Value::as_f64)
                    .filter(|v| v.is_finite() && *v > 0.0 && *v < 1e6)
                    .ok_or_else(|| refuse("\"value\" must be a positive number".into()))?;
                let model = match field(&body, "model") {
                    None => None,
                    Some(Value::String(m)) => Some(m.clone()),
                    Some(_) => return Err(refuse("\"model\" must be a string".into())),
                };
                Action::SetThreshold {
                    model,
                    value: value as f32,
                }
            }
            "pause" => Action::Pause,
            "resume" => Action::Resume,
            "capture_now" => Action::CaptureNow,
            "status" => {
                self.status(&id);
                return Ok(());
            }
            "deploy" => return self.deploy(&id, &body).map_err(refuse),
            "deploy_chunk" => return self.chunk(&id, &body).map_err(refuse),
            other => {
                return Err(refuse(format!(
                    "unknown command {other:?} (known: set_threshold, pause, resume, capture_now, status, deploy, deploy_chunk)"
                )))
            }
        };
        let name = action.name();
        self.tx
            .try_send(Command {
                id: id.clone(),
                action,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    refuse("the device is busy with earlier commands; try again".into())
                }
                mpsc::error::TrySendError::Closed(_) => {
                    refuse(format!("{name} is not handled by this device"))
                }
            })
    }

    /// Answers with the telemetry document (uptime, link, spool per stream, model …).
    fn status(&self, id: &str) {
        let message = self.gateway.telemetry().to_string();
        self.gateway.ack(Some(id), "status", true, &message);
    }

    fn deploy(&mut self, id: &str, body: &Value) -> Result<(), String> {
        let name = str_field(body, "name")?;
        let size = field(body, "size")
            .and_then(Value::as_u64)
            .ok_or("\"size\" must be the artifact's size in bytes")?;
        let max = (self.gateway.config().commands.max_model_mb * 1024.0 * 1024.0) as u64;
        if size == 0 || size > max {
            return Err(format!(
                "size {size} is outside 1 … {max} bytes (commands.max_model_mb)"
            ));
        }
        let sensor = match field(body, "sensor") {
            None => None,
            Some(Value::String(s)) => {
                deploy::check_sensor_name(s)?;
                if let Some(known) = &self.gateway.config().commands.sensor_sources {
                    if !known.contains(s) {
                        return Err(format!(
                            "this station has no sensor source {s:?} (it has: {})",
                            if known.is_empty() {
                                "none".into()
                            } else {
                                known.join(", ")
                            }
                        ));
                    }
                }
                Some(s.clone())
            }
            Some(_) => return Err("\"sensor\" must be a sensor source's name".into()),
        };
        let spec = DeploySpec {
            name,
            sensor,
            size,
            sha256: deploy::parse_sha256(&str_field(body, "sha256")?)?,
            signature: deploy::parse_signature(&str_field(body, "signature")?)?,
        };
        if let Some(old) = self.pending.take() {
            self.gateway.ack(
                Some(&old.cmd_id),
                "deploy",
                false,
                &format!("superseded by deployment {id}"),
            );
        }
        match (field(body, "path"), field(body, "chunks"), field(body, "url")) {
            (None, None, Some(Value::String(url))) => {
                let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
                if !matches!(scheme.as_deref(), Some("http" | "https")) {
                    return Err(format!(
                        "\"url\" must be http:// or https:// (got {url:?}); a file on the device goes in \"path\""
                    ));
                }
                self.install(id.to_string(), spec, Source::Url(url.clone()));
                Ok(())
            }
            (Some(Value::String(path)), None, None) => {
                let path = PathBuf::from(path.strip_prefix("file://").unwrap_or(path));
                let meta = std::fs::metadata(&path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                if !meta.is_file() || meta.len() != size {
                    return Err(format!(
                        "{} is not a regular file of {size} bytes",
                        path.display()
                    ));
                }
                self.install(id.to_string(), spec, Source::File(path));
                Ok(())
            }
            (None, Some(chunks), None) => {
                let chunks = chunks
                    .as_u64()
                    .filter(|&c| c >= 1 && c <= size && c <= 1 << 20)
                    .ok_or("\"chunks\" must be a count of at least 1")?
                    as u32;
                self.pending = Some(PendingDeploy {
                    cmd_id: id.to_string(),
                    spec,
                    chunks,
                    parts: BTreeMap::new(),
                    received: 0,
                });
                Ok(())
            }
            _ => Err("give one of \"url\" (http or https, fetched by the device), \"path\" (a file on the device) or \"chunks\" (then send deploy_chunk messages)".into()),
        }
    }

    fn chunk(&mut self, _chunk_msg_id: &str, body: &Value) -> Result<(), String> {
        let deploy_id = str_field(body, "deploy_id")?;
        let pending = match &mut self.pending {
            Some(p) if p.cmd_id == deploy_id => p,
            _ => return Err(format!("no deployment {deploy_id:?} is waiting for chunks")),
        };
        let index = field(body, "index")
            .and_then(Value::as_u64)
            .filter(|&i| i < u64::from(pending.chunks))
            .ok_or_else(|| format!("\"index\" must be 0 … {}", pending.chunks - 1))?
            as u32;
        let data = base64::engine::general_purpose::STANDARD
            .decode(str_field(body, "data")?.as_bytes())
            .map_err(|e| format!("\"data\" is not base64: {e}"))?;
        if let Some(old) = pending.parts.insert(index, data) {
            pending.received -= old.len() as u64;
        }
        pending.received += pending.parts[&index].len() as u64;
        if pending.received > pending.spec.size {
            let id = pending.cmd_id.clone();
            self.pending = None;
            self.gateway.ack(
                Some(&id),
                "deploy",
                false,
                "chunks add up to more than the announced size",
            );
            return Ok(());
        }
        if pending.parts.len() == pending.chunks as usize {
            if let Some(p) = self.pending.take() {
                let bytes: Vec<u8> = p.parts.into_values().flatten().collect();
                self.install(p.cmd_id, p.spec, Source::Bytes(bytes));
            }
        }
        Ok(())
    }

    /// Verifies, installs and health-checks on a thread of its own (loading a model takes a
    /// while), then acknowledges and tells the application.
    fn install(&self, id: String, spec: DeploySpec, source: Source) {
        let gateway = self.gateway.clone();
        let tx = self.tx.clone();
        let spawned = std::thread::Builder::new()
            .name("neo-deploy".into())
            .spawn(move || {
                // One installation at a time: two would write the same slot.
                let _one = INSTALLING.lock().unwrap_or_else(|p| p.into_inner());
                let config = gateway.config();
                let bytes = match source {
                    Source::Bytes(b) => b,
                    Source::Url(url) => {
                        let timeout =
                            std::time::Duration::from_secs_f64(config.commands.download_timeout_s);
                        match deploy::fetch(
                            &url,
                            spec.size,
                            config.commands.url_ca.as_deref(),
                            timeout,
                        ) {
                            Ok(b) => b,
                            Err(e) => {
                                gateway.ack(Some(&id), "deploy", false, &e);
                                return;
                            }
                        }
                    }
                    Source::File(path) => match std::fs::read(&path) {
                        Ok(b) => b,
                        Err(e) => {
                            gateway.ack(
                                Some(&id),
                                "deploy",
                                false,
                                &format!("cannot read {}: {e}", path.display()),
                            );
                            return;
                        }
                    },
                };
                let keys: Vec<_> = config
                    .commands
                    .trusted_keys
                    .iter()
                    .filter_map(|k| deploy::parse_public_key(k).ok())
                    .collect();
                let dir = deploy::slots_dir(&config.models_dir(), spec.sensor.as_deref());
                let health = match spec.sensor {
                    None => deploy::health_check,
                    Some(_) => deploy::sensor_health_check,
                };
                let result =
                    Slots::at(&dir).and_then(|slots| slots.install(&spec, &bytes, &keys, health));
                match result {
                    Ok(active) => {
                        let target = match &spec.sensor {
                            Some(s) => format!(" for sensor {s}"),
                            None => String::new(),
                        };
                        gateway.ack(
                            Some(&id),
                            "deploy",
                            true,
                            &format!("{}{target} active in slot {}", active.name, active.slot),
                        );
                        let _ = tx.blocking_send(Command {
                            id,
                            action: Action::ModelActivated {
                                name: active.name,
                                path: active.path,
                                sha256: active.sha256,
                                sensor: spec.sensor.clone(),
                            },
                        });
                    }
                    Err(e) => gateway.ack(Some(&id), "deploy", false, &e.to_string()),
                }
            });
        if let Err(e) = spawned {
            self.gateway.ack(
                None,
                "deploy",
                false,
                &format!("cannot start the install: {e}"),
            );
        }
    }
}
