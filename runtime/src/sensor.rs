//! Sensor model artifacts: the same `.neo` container as vision models, with the
//! [`SensorSpec`] in the manifest and the fitted parameters in `sensor_model.json`.

use crate::artifact::Artifact;
use crate::error::{Result, RuntimeError};
use crate::manifest::Manifest;
use neo_sensor::{Monitor, SensorModel, SensorSpec};
use std::path::Path;

pub use neo_sensor;

/// File holding the fitted [`SensorModel`] inside a sensor artifact.
pub const SENSOR_MODEL_FILE: &str = "sensor_model.json";

/// A verified sensor model artifact.
#[derive(Debug, Clone)]
pub struct SensorArtifact {
    pub manifest: Manifest,
    pub model: SensorModel,
}

impl SensorArtifact {
    pub fn open(path: &Path) -> Result<Self> {
        Self::from_artifact(&Artifact::open(path)?)
    }

    pub fn from_artifact(artifact: &Artifact) -> Result<Self> {
        let manifest = artifact.manifest.clone();
        if manifest.sensor.is_none() {
            return Err(RuntimeError::BadManifest(format!(
                "'{}' is a vision model, not a sensor model (run it with `neo-run classify`)",
                manifest.name
            )));
        }
        let bytes = artifact.file(SENSOR_MODEL_FILE).ok_or_else(|| {
            RuntimeError::BadManifest(format!("no {SENSOR_MODEL_FILE} in the sensor artifact"))
        })?;
        let model: SensorModel = serde_json::from_slice(bytes)
            .map_err(|e| RuntimeError::BadManifest(format!("{SENSOR_MODEL_FILE}: {e}")))?;
        let out = SensorArtifact { manifest, model };
        out.monitor()?;
        Ok(out)
    }

    pub fn spec(&self) -> &SensorSpec {
        // Checked in `from_artifact`.
        self.manifest
            .sensor
            .as_ref()
            .unwrap_or_else(|| unreachable!("checked on load"))
    }

    /// A fresh streaming monitor (features → score → alarm state).
    pub fn monitor(&self) -> Result<Monitor> {
        Monitor::new(self.spec(), self.model.clone())
            .map_err(|e| RuntimeError::BadManifest(e.to_string()))
    }

    /// Packs a manifest (with `sensor` set) and a fitted model into an artifact.
    pub fn to_artifact(manifest: Manifest, model: &SensorModel) -> Result<Artifact> {
        let json =
            serde_json::to_vec(model).map_err(|e| RuntimeError::BadManifest(e.to_string()))?;
        let mut files = std::collections::BTreeMap::new();
        files.insert(SENSOR_MODEL_FILE.to_string(), json);
        let artifact = Artifact::new(manifest, files)?;
        Self::from_artifact(&artifact)?;
        Ok(artifact)
    }
}
