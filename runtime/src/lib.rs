//! neo device runtime: loads `.neo` artifacts written by `neoc`, checks them, turns raw images
//! into the model's input exactly as the manifest says, and runs the model on CPU with tract.
//!
//! This crate never links the ONNX importer: artifacts carry the model as tract NNEF.

pub mod anomaly;
pub mod artifact;
mod error;
pub mod int8;
pub mod manifest;
pub mod model;
pub mod preprocess;
pub mod q8;
pub mod sensor;

pub use artifact::Artifact;
pub use error::{Result, RuntimeError};
pub use manifest::{Manifest, FORMAT_VERSION};
pub use model::{tensor_to_f32, Classification, Model, Prediction, Timings};
pub use q8::nnef;
pub use sensor::SensorArtifact;
/// tract's tensor type, as models take and return it.
pub use tract_nnef::prelude::Tensor;

/// tract version this runtime executes models with.
pub const TRACT_VERSION: &str = "0.23.9";
