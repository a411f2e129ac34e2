//! Model deployment: verify (size, SHA-256, ed25519 signature), install into the inactive of
//! two slots, health-check, switch atomically, roll back.
//!
//! The signature is ed25519 over the artifact's 32-byte SHA-256 digest, so a signing tool can
//! sign a large artifact without holding it in memory; `neo-gateway sign` makes one.
//!
//! On disk (`models_dir`): `slot-a/model.neo`, `slot-b/model.neo` and `active.json`, which says
//! which slot is active, which was active before, and whether the active one is still on trial.
//! A switch writes `active.json` to a temporary file, fsyncs it and renames it over the old
//! one, so a power cut leaves either the old or the new state. A model on trial that was never
//! confirmed (the daemon crashed or the device lost power while trying it) is rolled back the
//! next time the slots are opened.

use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{GatewayError, Result};

pub fn parse_public_key(text: &str) -> std::result::Result<VerifyingKey, String> {
    let bytes: [u8; 32] = hex::decode(text.trim())
        .map_err(|e| format!("not hex: {e}"))?
        .try_into()
        .map_err(|_| "an ed25519 public key is 32 bytes (64 hex digits)".to_string())?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not an ed25519 public key: {e}"))
}

pub fn parse_signature(text: &str) -> std::result::Result<Signature, String> {
    let bytes: [u8; 64] = hex::decode(text.trim())
        .map_err(|e| format!("signature is not hex: {e}"))?
        .try_into()
        .map_err(|_| "an ed25519 signature is 64 bytes (128 hex digits)".to_string())?;
    Ok(Signature::from_bytes(&bytes))
}

pub fn parse_sha256(text: &str) -> std::result::Result<[u8; 32], String> {
    hex::decode(text.trim())
        .map_err(|e| format!("sha256 is not hex: {e}"))?
        .try_into()
        .map_err(|_| "sha256 must be 64 hex digits".to_string())
}

/// Downloads an artifact from an http(s) URL: the whole body, at most `size` bytes (the
/// caller then checks size, digest and signature as for any deployment, so a plain-http
/// server or a redirect cannot slip in another artifact). `ca`: PEM roots for https; without
/// it, the built-in public web roots.
pub fn fetch(
    url: &str,
    size: u64,
    ca: Option<&Path>,
    timeout: std::time::Duration,
) -> std::result::Result<Vec<u8>, String> {
    use std::time::Duration;
    use ureq::tls::{PemItem, RootCerts, TlsConfig};
    let mut tls = TlsConfig::builder();
    if let Some(ca) = ca {
        let pem = std::fs::read(ca)
            .map_err(|e| format!("cannot read commands.url_ca {}: {e}", ca.display()))?;
        let mut roots = Vec::new();
        for item in ureq::tls::parse_pem(&pem) {
            match item {
                Ok(PemItem::Certificate(c)) => roots.push(c),
                Ok(_) => {}
                Err(e) => return Err(format!("commands.url_ca {}: {e}", ca.display())),
            }
        }
        if roots.is_empty() {
            return Err(format!(
                "commands.url_ca {} holds no PEM certificate",
                ca.display()
            ));
        }
        tls = tls.root_certs(RootCerts::new_with_certs(&roots));
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(tls.build())
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(15)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .timeout_global(Some(timeout))
        .build()
        .into();
    let mut response = agent
        .get(url)
        .call()
        .map_err(|e| format!("cannot download {url}: {e}"))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("{url} answered HTTP {status}"));
    }
    response
        .body_mut()
        .with_config()
        .limit(size)
        .read_to_vec()
        .map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => {
                format!("{url} sends more than the announced {size} bytes")
            }
            e => format!("download of {url} failed: {e}"),
        })
}

/// What a deployment claims about the artifact it brings.
#[derive(Debug, Clone)]
pub struct DeploySpec {
    pub name: String,
    /// The sensor source the model is for; `None`: the station's vision model.
    pub sensor: Option<String>,
    pub size: u64,
    pub sha256: [u8; 32],
    pub signature: Signature,
}

/// Checks size, digest and signature; the error says which failed.
pub fn verify(
    spec: &DeploySpec,
    bytes: &[u8],
    keys: &[VerifyingKey],
) -> std::result::Result<(), String> {
    if bytes.len() as u64 != spec.size {
        return Err(format!(
            "artifact is {} bytes, the deployment said {}",
            bytes.len(),
            spec.size
        ));
    }
    let digest: [u8; 32] = Sha256::digest(bytes).into();
    if digest != spec.sha256 {
        return Err(format!(
            "sha256 mismatch: artifact {}, deployment {}",
            hex::encode(digest),
            hex::encode(spec.sha256)
        ));
    }
    if keys.is_empty() {
        return Err("no trusted keys configured (commands.trusted_keys)".into());
    }
    if keys
        .iter()
        .any(|k| k.verify_strict(&digest, &spec.signature).is_ok())
    {
        Ok(())
    } else {
        Err("signature does not verify with any trusted key".into())
    }
}

/// Loads the artifact with the device runtime and runs it once on a blank frame: it must load
/// and give finite outputs.
pub fn health_check(path: &Path) -> std::result::Result<(), String> {
    let model = neo_runtime::Model::load_with_threads(path, Some(1)).map_err(|e| e.to_string())?;
    let input = model
        .manifest()
        .inputs
        .first()
        .ok_or("the model has no input")?;
    let (w, h) = input
        .nchw()
        .map(|(_, _, h, w)| (w as u32, h as u32))
        .unwrap_or((64, 64));
    let frame = image::DynamicImage::new_rgb8(w.max(1), h.max(1));
    let tensor = model.image_tensor(&frame).map_err(|e| e.to_string())?;
    let outputs = model.run(vec![tensor]).map_err(|e| e.to_string())?;
    for (i, t) in outputs.iter().enumerate() {
        let values = neo_runtime::tensor_to_f32(t).map_err(|e| e.to_string())?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(format!("output {i} has non-finite values on a blank frame"));
        }
    }
    Ok(())
}

/// A sensor model's health check: it opens, its spec is usable and a monitor can be built.
pub fn sensor_health_check(path: &Path) -> std::result::Result<(), String> {
    let artifact = neo_runtime::SensorArtifact::open(path).map_err(|e| e.to_string())?;
    if artifact.spec().channels.is_empty() {
        return Err("the sensor model names no channel".into());
    }
    artifact.monitor().map(|_| ()).map_err(|e| e.to_string())
}

/// Where the slots of a deployment target live: `models_dir` for the vision model,
/// `models_dir/sensors/<name>` for a sensor source's model.
pub fn slots_dir(models_dir: &Path, sensor: Option<&str>) -> PathBuf {
    match sensor {
        None => models_dir.to_path_buf(),
        Some(name) => models_dir.join("sensors").join(name),
    }
}

/// A sensor source name as a deployment may give it (it becomes a folder name).
pub fn check_sensor_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "\"sensor\" = {name:?}: must be a sensor source's name (1-64 letters, digits, - or _)"
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ActiveModel {
    pub slot: String,
    pub name: String,
    pub sha256: String,
    pub path: PathBuf,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SlotState {
    active: Option<ActiveModel>,
    previous: Option<ActiveModel>,
    trial: bool,
}

pub struct Slots {
    dir: PathBuf,
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> GatewayError {
    move |source| GatewayError::Io { context, source }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::File::create(&tmp).map_err(io(format!("cannot write {}", tmp.display())))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(io(format!("cannot write {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("cannot replace {}", path.display())))?;
    if let Some(parent) = path.parent() {
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

impl Slots {
    /// Opens the slot folder; rolls back a model left on trial.
    pub fn open(dir: &Path) -> Result<Slots> {
        std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
        let slots = Slots {
            dir: dir.to_path_buf(),
        };
        if slots.state()?.trial {
            tracing::warn!("the model on trial was never confirmed; rolling back");
            slots.rollback()?;
        }
        Ok(slots)
    }

    /// The slots as they are, without the boot-time rollback of [`Slots::open`] (for
    /// installing while the daemon runs).
    pub fn at(dir: &Path) -> Result<Slots> {
        std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
        Ok(Slots {
            dir: dir.to_path_buf(),
        })
    }

    /// The active model without opening (or repairing) the slots.
    pub fn peek(dir: &Path) -> Result<Option<ActiveModel>> {
        Ok(Slots {
            dir: dir.to_path_buf(),
        }
        .state()?
        .active)
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("active.json")
    }

    fn state(&self) -> Result<SlotState> {
        match std::fs::read(self.state_path()) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                GatewayError::Corrupt(format!("{}: {e}", self.state_path().display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SlotState::default()),
            Err(e) => Err(io(format!("cannot read {}", self.state_path().display()))(
                e,
            )),
        }
    }

    fn save(&self, state: &SlotState) -> Result<()> {
        let bytes =
            serde_json::to_vec_pretty(state).map_err(|e| GatewayError::Encode(e.to_string()))?;
        write_atomically(&self.state_path(), &bytes)
    }

    pub fn active(&self) -> Result<Option<ActiveModel>> {
        Ok(self.state()?.active)
    }

    pub fn on_trial(&self) -> Result<bool> {
        Ok(self.state()?.trial)
    }

    /// Verifies, writes into the inactive slot, health-checks and switches. On any failure the
    /// active model is untouched.
    pub fn install(
        &self,
        spec: &DeploySpec,
        bytes: &[u8],
        keys: &[VerifyingKey],
        health: impl Fn(&Path) -> std::result::Result<(), String>,
    ) -> Result<ActiveModel> {
        verify(spec, bytes, keys).map_err(GatewayError::Deploy)?;
        let mut state = self.state()?;
        let slot = match state.active.as_ref().map(|a| a.slot.as_str()) {
            Some("a") => "b",
            _ => "a",
        };
        let slot_dir = self.dir.join(format!("slot-{slot}"));
        std::fs::create_dir_all(&slot_dir)
            .map_err(io(format!("cannot create {}", slot_dir.display())))?;
        let path = slot_dir.join("model.neo");
        write_atomically(&path, bytes)?;
        health(&path).map_err(|e| GatewayError::Deploy(format!("health check failed: {e}")))?;
        let new = ActiveModel {
            slot: slot.to_string(),
            name: spec.name.clone(),
            sha256: hex::encode(spec.sha256),
            path,
        };
        state.previous = state.active.take();
        state.active = Some(new.clone());
        state.trial = true;
        self.save(&state)?;
        Ok(new)
    }

    /// The daemon runs the new model fine: keep it.
    pub fn confirm(&self) -> Result<()> {
        let mut state = self.state()?;
        state.trial = false;
        self.save(&state)
    }

    /// Goes back to the previous model (none if there was none). Returns what is now active.
    pub fn rollback(&self) -> Result<Option<ActiveModel>> {
        let mut state = self.state()?;
        state.active = state.previous.take();
        state.trial = false;
        self.save(&state)?;
        Ok(state.active)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn signed(bytes: &[u8], key: &SigningKey) -> DeploySpec {
        let digest: [u8; 32] = Sha256::digest(bytes).into();
        DeploySpec {
            name: "det".into(),
            sensor: None,
            size: bytes.len() as u64,
            sha256: digest,
            signature: key.sign(&digest),
        }
    }

    #[test]
    fn verify_names_what_is_wrong() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let other = SigningKey::from_bytes(&[8; 32]);
        let bytes = b"artifact bytes".to_vec();
        let spec = signed(&bytes, &key);
        let keys = [key.verifying_key()];
        assert!(verify(&spec, &bytes, &keys).is_ok());
        let mut tampered = bytes.clone();
        tampered[0] ^= 1;
        assert!(verify(&spec, &tampered, &keys)
            .unwrap_err()
            .contains("sha256"));
        assert!(verify(&spec, &bytes[1..], &keys)
            .unwrap_err()
            .contains("bytes"));
        let wrong = signed(&bytes, &other);
        assert!(verify(&wrong, &bytes, &keys)
            .unwrap_err()
            .contains("signature"));
        assert!(verify(&spec, &bytes, &[]).unwrap_err().contains("trusted"));
        assert!(parse_public_key("abcd").is_err());
        assert_eq!(
            parse_public_key(&hex::encode(key.verifying_key().to_bytes())).unwrap(),
            key.verifying_key()
        );
    }

    #[test]
    fn slots_switch_confirm_and_roll_back() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[7; 32]);
        let keys = [key.verifying_key()];
        let slots = Slots::open(dir.path()).unwrap();
        assert_eq!(slots.active().unwrap(), None);
        let v1 = b"model one".to_vec();
        let a = slots
            .install(&signed(&v1, &key), &v1, &keys, |_| Ok(()))
            .unwrap();
        assert_eq!(a.slot, "a");
        assert_eq!(std::fs::read(&a.path).unwrap(), v1);
        slots.confirm().unwrap();

        // A failing health check leaves the active model alone.
        let v2 = b"model two".to_vec();
        let err = slots
            .install(&signed(&v2, &key), &v2, &keys, |_| Err("no".into()))
            .unwrap_err();
        assert!(err.to_string().contains("health check"), "{err}");
        assert_eq!(slots.active().unwrap().unwrap(), a);

        // A switch that is never confirmed is rolled back at the next open.
        let b = slots
            .install(&signed(&v2, &key), &v2, &keys, |_| Ok(()))
            .unwrap();
        assert_eq!(b.slot, "b");
        assert!(slots.on_trial().unwrap());
        let reopened = Slots::open(dir.path()).unwrap();
        assert_eq!(reopened.active().unwrap().unwrap(), a);
        assert!(!reopened.on_trial().unwrap());
        assert_eq!(std::fs::read(&a.path).unwrap(), v1);
    }

    #[test]
    fn health_check_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("bad.neo");
        std::fs::write(&garbage, b"not an artifact").unwrap();
        assert!(health_check(&garbage).is_err());
    }
}
