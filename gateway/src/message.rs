//! The MQTT contract: streams (classes), the topic tree and the JSON envelope every message
//! carries. `docs/mqtt.md` describes it for dashboard authors; change both together and bump
//! [`SCHEMA_VERSION`] when a field changes meaning.

use serde::{Deserialize, Serialize};

use crate::{GatewayError, Result};

/// Version of the envelope and of every payload under it.
pub const SCHEMA_VERSION: u32 = 1;

/// A stream of messages. Each has its own sequence numbers (so a subscriber of one topic sees
/// 0, 1, 2, … and can detect gaps and duplicates) and its own importance when the spool is
/// full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Alarm = 0,
    CommandResult = 1,
    Inspection = 2,
    Sensor = 3,
    Sample = 4,
    Telemetry = 5,
}

impl Class {
    pub const COUNT: usize = 6;
    pub const ALL: [Class; Class::COUNT] = [
        Class::Alarm,
        Class::CommandResult,
        Class::Inspection,
        Class::Sensor,
        Class::Sample,
        Class::Telemetry,
    ];
    /// Which stream loses its oldest messages first when the spool is full.
    pub const EVICTION_ORDER: [Class; Class::COUNT] = [
        Class::Telemetry,
        Class::Sample,
        Class::Sensor,
        Class::Inspection,
        Class::CommandResult,
        Class::Alarm,
    ];
    /// Which stream is sent first when several have messages waiting.
    pub const SEND_ORDER: [Class; Class::COUNT] = [
        Class::Alarm,
        Class::CommandResult,
        Class::Inspection,
        Class::Sensor,
        Class::Telemetry,
        Class::Sample,
    ];

    pub fn from_index(i: u8) -> Option<Class> {
        Class::ALL.get(i as usize).copied()
    }

    /// The stream's name: the `kind` field of its envelope and its topic leaf.
    pub fn name(self) -> &'static str {
        match self {
            Class::Alarm => "alarm",
            Class::CommandResult => "ack",
            Class::Inspection => "inspection",
            Class::Sensor => "sensor",
            Class::Sample => "samples",
            Class::Telemetry => "telemetry",
        }
    }

    /// A message may only push out messages of streams at most as important as its own.
    pub fn importance(self) -> u8 {
        match self {
            Class::Telemetry => 0,
            Class::Sample => 1,
            Class::Sensor => 2,
            Class::Inspection | Class::CommandResult => 3,
            Class::Alarm => 4,
        }
    }
}

/// What every message on a data topic looks like.
#[derive(Debug, Serialize)]
pub struct Envelope<'a> {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub v: u32,
    /// The stream: `inspection`, `sensor`, `alarm`, `samples`, `telemetry`, `ack`.
    pub kind: &'a str,
    /// Unique message id: `<device>-<spool epoch, hex>-<seq>`.
    pub id: String,
    pub device: &'a str,
    /// The stream's sequence number: consecutive per device and stream.
    pub seq: u64,
    /// When the producer made it, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    pub data: &'a serde_json::Value,
}

impl Envelope<'_> {
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| GatewayError::Encode(e.to_string()))
    }

    /// The `ts_ms` field of an encoded envelope.
    pub fn ts_of(payload: &[u8]) -> Option<u64> {
        #[derive(Deserialize)]
        struct Ts {
            ts_ms: u64,
        }
        serde_json::from_slice::<Ts>(payload).ok().map(|t| t.ts_ms)
    }
}

/// A received envelope, as a subscriber (or a test) reads it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct ReceivedEnvelope {
    pub v: u32,
    pub kind: String,
    pub id: String,
    pub device: String,
    pub seq: u64,
    pub ts_ms: u64,
    pub data: serde_json::Value,
}

/// The device's topics: `<prefix>/<site>/<line>/<device>/…`.
#[derive(Debug, Clone)]
pub struct Topics {
    base: String,
}

impl Topics {
    pub fn new(prefix: &str, site: &str, line: &str, device: &str) -> Result<Topics> {
        for (what, value) in [
            ("prefix", prefix),
            ("site", site),
            ("line", line),
            ("device", device),
        ] {
            check_segment(what, value)?;
        }
        Ok(Topics {
            base: format!("{prefix}/{site}/{line}/{device}"),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Full topic of a stream message; `leaf` is what the spool stored (`inspection`,
    /// `samples/<id>/<chunk>` …).
    pub fn data(&self, leaf: &str) -> String {
        format!("{}/{leaf}", self.base)
    }

    /// Retained online/offline status (also the last will).
    pub fn status(&self) -> String {
        format!("{}/status", self.base)
    }

    /// Commands for this device: `…/cmd/<name>`.
    pub fn commands(&self) -> String {
        format!("{}/cmd/#", self.base)
    }

    /// Frames pushed to this device's cameras of kind `push`: `…/frames/<camera>`.
    pub fn frames(&self) -> String {
        format!("{}/frames/+", self.base)
    }

    /// The camera a topic under `…/frames/` is for, if it is one.
    pub fn frame_camera<'t>(&self, topic: &'t str) -> Option<&'t str> {
        topic
            .strip_prefix(self.base.as_str())?
            .strip_prefix("/frames/")
            .filter(|c| !c.is_empty() && !c.contains('/'))
    }

    /// The command name of a topic under `…/cmd/`, if it is one.
    pub fn command_name<'t>(&self, topic: &'t str) -> Option<&'t str> {
        topic
            .strip_prefix(self.base.as_str())?
            .strip_prefix("/cmd/")
    }
}

fn check_segment(what: &str, value: &str) -> Result<()> {
    if value.is_empty() || value.contains(['/', '+', '#', '\0']) || value.len() > 64 {
        return Err(GatewayError::Config(format!(
            "mqtt.{what} = {value:?}: must be 1-64 characters without '/', '+', '#'"
        )));
    }
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn topics_and_bad_segments() {
        let t = Topics::new("neo", "plant1", "line-3", "cam1").unwrap();
        assert_eq!(t.data("inspection"), "neo/plant1/line-3/cam1/inspection");
        assert_eq!(t.commands(), "neo/plant1/line-3/cam1/cmd/#");
        assert_eq!(
            t.command_name("neo/plant1/line-3/cam1/cmd/set_threshold"),
            Some("set_threshold")
        );
        assert_eq!(t.command_name("neo/plant1/line-3/cam2/cmd/x"), None);
        assert_eq!(
            t.frame_camera("neo/plant1/line-3/cam1/frames/top"),
            Some("top")
        );
        assert_eq!(t.frame_camera("neo/plant1/line-3/cam1/frames/a/b"), None);
        assert_eq!(t.frame_camera("neo/plant1/line-3/cam1/cmd/top"), None);
        let err = Topics::new("neo", "a/b", "l", "d").unwrap_err();
        assert!(err.to_string().contains("mqtt.site"), "{err}");
        assert!(Topics::new("neo", "s", "l", "").is_err());
        assert!(Topics::new("neo", "s", "+", "d").is_err());
    }

    #[test]
    fn envelope_round_trip_and_timestamp() {
        let data = serde_json::json!({"verdict": "NG", "score": 1.7});
        let e = Envelope {
            v: SCHEMA_VERSION,
            kind: "inspection",
            id: "cam1-0000000000ab-7".into(),
            device: "cam1",
            seq: 7,
            ts_ms: 1_700_000_000_123,
            data: &data,
        };
        let bytes = e.to_bytes().unwrap();
        let back: ReceivedEnvelope = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back.seq, 7);
        assert_eq!(back.data["verdict"], "NG");
        assert_eq!(Envelope::ts_of(&bytes), Some(1_700_000_000_123));
    }
}
