//! Samples for retraining: chosen frames, JPEG-encoded with their result, sent in chunks that
//! fit the broker's packet limit, at a bounded byte rate (the link's token bucket) so they
//! never starve results.
//!
//! A sample `<id>` is published as `chunks` messages on `<base>/samples/<id>`, each
//! `{"sample_id", "chunk", "chunks", "bytes", "sha256", "content_type", "data" (base64), "meta"
//! (first chunk only)}`; a subscriber concatenates the decoded `data` in `chunk` order and
//! checks the SHA-256.

use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::config::SamplesConfig;
use crate::message::Class;
use crate::{Gateway, GatewayError, Result};

/// Room kept in each packet for the envelope, the topic and the chunk's fields.
const CHUNK_OVERHEAD: usize = 1024;

/// Why a frame was chosen as a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Ng,
    Uncertain,
    Random,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::Ng => "ng",
            Reason::Uncertain => "uncertain",
            Reason::Random => "random_ok",
        }
    }
}

impl SamplesConfig {
    /// Whether a frame with this verdict and normalized score (1.0 = threshold) is sent.
    pub fn choose(&self, ng: bool, score: f32) -> Option<Reason> {
        if ng && self.ng {
            Some(Reason::Ng)
        } else if (score - 1.0).abs() <= self.uncertain_band {
            Some(Reason::Uncertain)
        } else if !ng && rand::random::<f64>() < self.ok_fraction {
            Some(Reason::Random)
        } else {
            None
        }
    }
}

/// JPEG-encodes a frame.
pub fn encode_jpeg(image: &image::DynamicImage, quality: u8) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let rgb = image.to_rgb8();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100))
        .encode_image(&rgb)
        .map_err(|e| GatewayError::Encode(format!("JPEG: {e}")))?;
    Ok(out)
}

impl Gateway {
    /// Spools a sample (already encoded, e.g. by [`encode_jpeg`]) in chunks under the MQTT
    /// packet limit. Returns the sample id.
    pub fn publish_sample(&self, content_type: &str, bytes: &[u8], meta: Value) -> Result<String> {
        let max = self.config().mqtt.max_packet_bytes;
        let raw_per_chunk = (max.saturating_sub(CHUNK_OVERHEAD + meta.to_string().len()) / 4) * 3;
        if raw_per_chunk < 256 {
            return Err(GatewayError::Config(format!(
                "mqtt.max_packet_bytes = {max} leaves no room for sample chunks"
            )));
        }
        let sha = hex::encode(Sha256::digest(bytes));
        let sample_id = format!("{}-{}", crate::message::now_ms(), &sha[..12]);
        let chunks = bytes.len().div_ceil(raw_per_chunk).max(1);
        let b64 = base64::engine::general_purpose::STANDARD;
        for (i, part) in bytes.chunks(raw_per_chunk).enumerate() {
            let mut data = json!({
                "sample_id": sample_id,
                "chunk": i,
                "chunks": chunks,
                "bytes": bytes.len(),
                "sha256": sha,
                "content_type": content_type,
                "data": b64.encode(part),
            });
            if i == 0 {
                data["meta"] = meta.clone();
            }
            self.publish_to(Class::Sample, format!("samples/{sample_id}"), data)?;
        }
        Ok(sample_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_follows_the_config() {
        let c = SamplesConfig {
            max_bytes_per_s: 1,
            ng: true,
            uncertain_band: 0.1,
            ok_fraction: 0.0,
        };
        assert_eq!(c.choose(true, 3.0), Some(Reason::Ng));
        assert_eq!(c.choose(false, 0.95), Some(Reason::Uncertain));
        assert_eq!(c.choose(false, 0.5), None);
        let all = SamplesConfig {
            ok_fraction: 1.0,
            ..c
        };
        assert_eq!(all.choose(false, 0.5), Some(Reason::Random));
    }
}
