use std::path::PathBuf;

/// Everything that can go wrong on the device side.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a neo artifact: {1}")]
    NotAnArtifact(String, String),
    #[error("artifact is corrupt: {0} (re-copy it, or recompile with `neoc compile`)")]
    Corrupt(String),
    #[error(
        "artifact format version {found} is newer than this runtime supports ({supported}); \
         update the device runtime, or compile with a matching neoc"
    )]
    NewerFormat { found: u32, supported: u32 },
    #[error("artifact format version {found} is too old (this runtime reads version {supported} and newer); recompile the model with this neoc")]
    OlderFormat { found: u32, supported: u32 },
    #[error("manifest is invalid: {0}")]
    BadManifest(String),
    #[error("cannot decode image {name}: {reason}")]
    Image { name: String, reason: String },
    #[error("input does not fit the model: {0}")]
    Input(String),
    #[error("model failed: {0}")]
    Model(String),
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
