use std::path::PathBuf;

/// Everything `neoc` can refuse, each with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an ONNX model: {reason}")]
    NotOnnx { path: String, reason: String },
    #[error("unsupported ONNX operator '{op}' at node '{node}'{more}; tract {tract} cannot run it (replace or remove that node before export)")]
    UnsupportedOp {
        op: String,
        node: String,
        more: String,
        tract: String,
    },
    #[error("input '{name}' has a dynamic shape {shape}; give a fixed one with --input-shape {hint} (or `shape` under [input] in model.toml)")]
    DynamicShape {
        name: String,
        shape: String,
        hint: String,
    },
    #[error("invalid option: {0}")]
    Options(String),
    #[error("model card {path}: {message}")]
    Card { path: String, message: String },
    #[error(transparent)]
    Board(#[from] neo_boards::BoardError),
    #[error("tract could not {stage}: {message}")]
    Tract { stage: String, message: String },
    #[error(transparent)]
    Runtime(#[from] neo_runtime::RuntimeError),
    #[error(transparent)]
    Sensor(#[from] neo_sensor::SensorError),
    #[error("calibration: {0}")]
    Calibration(String),
    #[error("quantization: {0}")]
    Quantize(String),
    #[error("the int8 model misses the accuracy budget on the held-out calibration images; nothing was written:\n{table}{hint}")]
    AccuracyGate { table: String, hint: String },
    #[error("the compiled artifact disagrees with the source model (max abs diff {diff:e} on output '{output}'); please report this model")]
    Mismatch { output: String, diff: f32 },
}

pub type Result<T, E = CompileError> = std::result::Result<T, E>;

/// Wraps a tract error with the stage it happened in.
pub(crate) fn tract(stage: &str) -> impl Fn(tract_onnx::prelude::TractError) -> CompileError + '_ {
    move |e| CompileError::Tract {
        stage: stage.to_string(),
        message: format!("{e:#}"),
    }
}
