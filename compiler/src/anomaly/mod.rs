//! Visual anomaly detection from good images: a memory-bank detector (PatchCore family)
//! trained on a compiled backbone's patch features, packaged as an ordinary `.neo` artifact.

pub mod coreset;
pub mod dataset;
pub mod eval;
pub mod head;
pub mod report;
pub mod train;
pub mod types;

pub use eval::{eval_anomaly, EvalReport};
pub use train::{train_anomaly, TrainOptions, TrainReport};
