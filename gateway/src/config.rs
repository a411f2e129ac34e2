//! The gateway's part of the station configuration (`[mqtt]`, `[spool]`, `[samples]`,
//! `[telemetry]`, `[commands]` tables of `station.toml`).

use std::path::PathBuf;

use serde::Deserialize;

use crate::message::Topics;
use crate::{GatewayError, Result};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    pub mqtt: MqttConfig,
    pub spool: SpoolConfig,
    #[serde(default)]
    pub samples: SamplesConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub commands: CommandsConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// MQTT protocol version: `"3.1.1"` (default) or `"5"`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Topic tree: `<prefix>/<site>/<line>/<device>/…`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    pub site: String,
    pub line: String,
    pub device: String,
    /// Defaults to `neo-<device>`.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
    /// QoS 1 messages sent and not yet acknowledged.
    #[serde(default = "default_inflight")]
    pub inflight: u16,
    /// Largest MQTT packet sent or accepted (AWS IoT Core allows 128 KiB).
    #[serde(default = "default_max_packet")]
    pub max_packet_bytes: usize,
    /// Largest MQTT packet accepted from the broker; defaults to `max_packet_bytes`, raised
    /// to the largest `cameras[].max_bytes` when a camera has kind = "push".
    #[serde(default)]
    pub max_incoming_bytes: Option<usize>,
    /// Reconnect backoff: doubles from the minimum to the maximum, with ±50 % jitter.
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_ms: u64,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// The MQTT protocol version the link speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5: the broker says why it refuses a publish (a PUBACK reason code such as
    /// "not authorized"), and the link keeps such a message instead of taking the ack as
    /// delivery; payloads carry a content type.
    #[serde(rename = "5")]
    V5,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::V311 => "3.1.1",
            Protocol::V5 => "5",
        }
    }
}

/// TLS with a private CA and, for brokers that require it, a client certificate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the CA certificate(s) that signed the broker's certificate.
    pub ca: PathBuf,
    /// PEM client certificate chain and its private key (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// Bound on queued messages, MiB.
    #[serde(default = "default_spool_mb")]
    pub max_mb: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplesConfig {
    /// Upper bound on sample bytes sent per second, so samples never starve results.
    #[serde(default = "default_sample_rate")]
    pub max_bytes_per_s: u64,
    /// Send NG frames.
    #[serde(default = "yes")]
    pub ng: bool,
    /// Send frames whose normalized score is within this distance of the threshold (1.0).
    #[serde(default = "default_uncertain")]
    pub uncertain_band: f32,
    /// Fraction of OK frames to send (0 … 1).
    #[serde(default = "default_ok_fraction")]
    pub ok_fraction: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    #[serde(default = "default_telemetry_interval")]
    pub interval_s: f64,
    /// `host:port` of the local Prometheus endpoint (`/metrics`, `/healthz`); none if unset.
    #[serde(default)]
    pub metrics_addr: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandsConfig {
    /// Hex ed25519 public keys whose signatures a model deployment must carry. With none, the
    /// gateway refuses every deployment.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// Where model slots live; defaults to `<spool.dir>/models`.
    #[serde(default)]
    pub models_dir: Option<PathBuf>,
    /// Largest model accepted by a deployment, MiB.
    #[serde(default = "default_max_model_mb")]
    pub max_model_mb: f64,
    /// PEM CA certificate(s) trusted for `deploy` by https URL (a plant's own update server);
    /// without it, the public web roots (Mozilla's list, built in).
    #[serde(default)]
    pub url_ca: Option<PathBuf>,
    /// Longest a `deploy` by URL may take to download, seconds.
    #[serde(default = "default_download_timeout")]
    pub download_timeout_s: f64,
    /// The station's sensor sources (set by the station, not the file): a sensor-model
    /// deployment for another name is refused before anything is fetched. `None`: not
    /// checked.
    #[serde(skip)]
    pub sensor_sources: Option<Vec<String>>,
}

fn default_port() -> u16 {
    1883
}
fn default_prefix() -> String {
    "neo".into()
}
fn default_keep_alive() -> u64 {
    30
}
fn default_inflight() -> u16 {
    100
}
fn default_max_packet() -> usize {
    128 * 1024
}
fn default_reconnect_min() -> u64 {
    200
}
fn default_reconnect_max() -> u64 {
    30_000
}
fn default_spool_mb() -> f64 {
    64.0
}
fn default_sample_rate() -> u64 {
    256 * 1024
}
fn yes() -> bool {
    true
}
fn default_uncertain() -> f32 {
    0.1
}
fn default_ok_fraction() -> f64 {
    0.01
}
fn default_telemetry_interval() -> f64 {
    10.0
}
fn default_max_model_mb() -> f64 {
    256.0
}
fn default_download_timeout() -> f64 {
    600.0
}

impl Default for SamplesConfig {
    fn default() -> Self {
        SamplesConfig {
            max_bytes_per_s: default_sample_rate(),
            ng: true,
            uncertain_band: default_uncertain(),
            ok_fraction: default_ok_fraction(),
        }
    }
}

impl Default for CommandsConfig {
    fn default() -> Self {
        CommandsConfig {
            trusted_keys: Vec::new(),
            models_dir: None,
            max_model_mb: default_max_model_mb(),
            url_ca: None,
            download_timeout_s: default_download_timeout(),
            sensor_sources: None,
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            interval_s: default_telemetry_interval(),
            metrics_addr: None,
        }
    }
}

impl GatewayConfig {
    pub fn from_toml(text: &str) -> Result<GatewayConfig> {
        let config: GatewayConfig =
            toml::from_str(text).map_err(|e| GatewayError::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values serde cannot, naming the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: &str| Err(GatewayError::Config(format!("{key}: {why}")));
        self.topics()?;
        if self.mqtt.host.trim().is_empty() {
            return bad("mqtt.host", "must not be empty");
        }
        if self.mqtt.inflight == 0 {
            return bad("mqtt.inflight", "must be at least 1");
        }
        if self.mqtt.max_packet_bytes < 1024 {
            return bad("mqtt.max_packet_bytes", "must be at least 1024");
        }
        if self.mqtt.keep_alive_s == 0 || self.mqtt.keep_alive_s > 65_535 {
            return bad("mqtt.keep_alive_s", "must be 1 … 65535 seconds");
        }
        if self.mqtt.reconnect_min_ms == 0
            || self.mqtt.reconnect_min_ms > self.mqtt.reconnect_max_ms
        {
            return bad(
                "mqtt.reconnect_min_ms",
                "must be at least 1 and not above mqtt.reconnect_max_ms",
            );
        }
        if let Some(tls) = &self.mqtt.tls {
            if tls.cert.is_some() != tls.key.is_some() {
                return bad("mqtt.tls", "give both cert and key, or neither");
            }
        }
        if !(self.spool.max_mb.is_finite() && self.spool.max_mb > 0.0) {
            return bad("spool.max_mb", "must be a positive number");
        }
        if self.samples.max_bytes_per_s < 1024 {
            return bad("samples.max_bytes_per_s", "must be at least 1024");
        }
        if !(0.0..=1.0).contains(&self.samples.ok_fraction) {
            return bad("samples.ok_fraction", "must be between 0 and 1");
        }
        if !(self.telemetry.interval_s.is_finite() && self.telemetry.interval_s > 0.0) {
            return bad("telemetry.interval_s", "must be a positive number");
        }
        for (i, k) in self.commands.trusted_keys.iter().enumerate() {
            crate::deploy::parse_public_key(k)
                .map_err(|e| GatewayError::Config(format!("commands.trusted_keys[{i}]: {e}")))?;
        }
        if !(self.commands.download_timeout_s.is_finite() && self.commands.download_timeout_s > 0.0)
        {
            return bad("commands.download_timeout_s", "must be a positive number");
        }
        if let Some(ca) = &self.commands.url_ca {
            if !ca.is_file() {
                return bad(
                    "commands.url_ca",
                    &format!("{} is not a readable file", ca.display()),
                );
            }
        }
        Ok(())
    }

    pub fn topics(&self) -> Result<Topics> {
        Topics::new(
            &self.mqtt.prefix,
            &self.mqtt.site,
            &self.mqtt.line,
            &self.mqtt.device,
        )
    }

    pub fn spool_max_bytes(&self) -> u64 {
        (self.spool.max_mb * 1024.0 * 1024.0) as u64
    }

    pub fn models_dir(&self) -> PathBuf {
        self.commands
            .models_dir
            .clone()
            .unwrap_or_else(|| self.spool.dir.join("models"))
    }

    /// A configuration for tests and tools: a local broker, defaults elsewhere.
    pub fn local(host: &str, port: u16, device: &str, spool_dir: PathBuf) -> GatewayConfig {
        GatewayConfig {
            mqtt: MqttConfig {
                host: host.into(),
                port,
                protocol: Protocol::default(),
                prefix: default_prefix(),
                site: "site".into(),
                line: "line".into(),
                device: device.into(),
                client_id: None,
                keep_alive_s: default_keep_alive(),
                inflight: default_inflight(),
                max_packet_bytes: default_max_packet(),
                max_incoming_bytes: None,
                reconnect_min_ms: 50,
                reconnect_max_ms: 1_000,
                username: None,
                password: None,
                tls: None,
            },
            spool: SpoolConfig {
                dir: spool_dir,
                max_mb: default_spool_mb(),
            },
            samples: SamplesConfig::default(),
            telemetry: TelemetryConfig::default(),
            commands: CommandsConfig::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_minimal_and_names_bad_keys() {
        let ok = GatewayConfig::from_toml(
            r#"
            [mqtt]
            host = "localhost"
            site = "plant1"
            line = "l3"
            device = "cam1"
            [spool]
            dir = "/var/lib/neo/spool"
            "#,
        )
        .unwrap();
        assert_eq!(ok.mqtt.port, 1883);
        assert_eq!(ok.spool_max_bytes(), 64 << 20);
        assert_eq!(ok.models_dir(), PathBuf::from("/var/lib/neo/spool/models"));

        let unknown = GatewayConfig::from_toml(
            "[mqtt]\nhost='h'\nsite='s'\nline='l'\ndevice='d'\nqos=2\n[spool]\ndir='x'",
        )
        .unwrap_err();
        assert!(unknown.to_string().contains("qos"), "{unknown}");

        let bad_device = GatewayConfig::from_toml(
            "[mqtt]\nhost='h'\nsite='s'\nline='l'\ndevice='a/b'\n[spool]\ndir='x'",
        )
        .unwrap_err();
        assert!(
            bad_device.to_string().contains("mqtt.device"),
            "{bad_device}"
        );

        let bad_key = GatewayConfig::from_toml(
            "[mqtt]\nhost='h'\nsite='s'\nline='l'\ndevice='d'\n[spool]\ndir='x'\n[commands]\ntrusted_keys=['abcd']",
        )
        .unwrap_err();
        assert!(
            bad_key.to_string().contains("commands.trusted_keys[0]"),
            "{bad_key}"
        );
        let half_tls = GatewayConfig::from_toml(
            "[mqtt]\nhost='h'\nsite='s'\nline='l'\ndevice='d'\ntls={ca='ca.pem', cert='c.pem'}\n[spool]\ndir='x'",
        )
        .unwrap_err();
        assert!(half_tls.to_string().contains("mqtt.tls"), "{half_tls}");
    }
}
