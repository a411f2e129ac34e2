//! neoc, the neo model compiler: imports ONNX with tract, declutters it, and writes a
//! verified, self-contained `.neo` artifact for a target board.

pub mod anomaly;
pub mod baseline;
pub mod bundle;
pub mod card;
pub mod compile;
mod error;
pub mod import;
pub mod inspect;
pub mod quantize;
pub mod sensor;

pub use compile::{compile, CompileOptions, CompileReport};
pub use error::{CompileError, Result};
pub use inspect::{inspect, Inspection};
