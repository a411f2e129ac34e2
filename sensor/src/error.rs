/// Everything that can go wrong in sensor feature extraction, model fitting and scoring.
#[derive(Debug, thiserror::Error)]
pub enum SensorError {
    #[error("sensor configuration: {0}")]
    Config(String),
    #[error("cannot read {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {reason}")]
    Input { file: String, reason: String },
    #[error("column '{column}' is missing from {file}; it has: {present}")]
    MissingColumn {
        file: String,
        column: String,
        present: String,
    },
    #[error("not enough normal data: {0}")]
    TooLittleData(String),
    #[error("model parameters are invalid: {0}")]
    BadModel(String),
}

pub type Result<T, E = SensorError> = std::result::Result<T, E>;
