//! The artifact manifest: the versioned contract between `neoc` and the device.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Artifact format version this runtime writes and reads. Bump on any incompatible change.
pub const FORMAT_VERSION: u32 = 4;
/// Oldest format this runtime still reads.
pub const MIN_FORMAT_VERSION: u32 = 1;
/// The oldest format that can express an artifact, so older devices keep reading what they
/// can run: 4 when its graph computes in int8 (`neo_q8_conv` nodes, see [`crate::q8`], which a
/// v3 runtime cannot load), 3 when an input is preprocessed with `flatten` (a v2 runtime would skip the step
/// and compute on different pixels) or a detector has a defect-type head (a v2 runtime would
/// report its patch features as raw values), 2 when its graph holds int8-packed weights
/// (`model.nnef.tar` entries `NAME.dat.q8`, see [`crate::int8`]), which a v1 runtime would not
/// find; 1 otherwise.
pub fn format_version_for(
    int8_packed: bool,
    int8_compute: bool,
    inputs: &[InputSpec],
    anomaly: Option<&AnomalySpec>,
) -> u32 {
    let flattened = inputs
        .iter()
        .any(|i| i.preprocess.as_ref().is_some_and(|p| p.flatten.is_some()));
    let typed = anomaly.is_some_and(|a| a.defect_types.is_some());
    if int8_compute {
        4
    } else if flattened || typed {
        3
    } else if int8_packed {
        2
    } else {
        1
    }
}

/// Everything the device needs to know about a compiled model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// Human-readable model name (from the model card or the file name).
    pub name: String,
    pub compiler: CompilerInfo,
    pub source: SourceInfo,
    pub target: TargetInfo,
    pub inputs: Vec<InputSpec>,
    pub outputs: Vec<OutputSpec>,
    /// Every other file in the artifact, by name, with its hash and size.
    pub files: BTreeMap<String, FileEntry>,
    /// For anomaly detectors: how to read the anomaly map and where the threshold lies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomaly: Option<AnomalySpec>,
    /// For sensor models (vibration / process anomaly detection): channels, feature
    /// configuration, model kind, alarm policy and training data. Such artifacts carry
    /// `sensor_model.json` instead of a graph.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensor: Option<neo_sensor::SensorSpec>,
    /// For quantized models: the scheme and where the compile report is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<QuantizationInfo>,
}

/// How a model was quantized (`neoc compile --quantize`); the details (per-layer precision,
/// ranges, scales, accuracy table) are in the artifact's `report` file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizationInfo {
    /// `int8-weights`: weights stored int8 per output channel, dequantized at load.
    pub scheme: String,
    /// Arithmetic the device runs in (`f32`).
    pub compute: String,
    /// Activation calibration method.
    pub method: String,
    pub calibration_images: usize,
    /// Images kept out of calibration for the accuracy check.
    pub holdout_images: usize,
    pub int8_layers: usize,
    /// Layers kept in f32 (mixed precision).
    pub f32_layers: Vec<String>,
    /// File in the artifact with the full compile report.
    pub report: String,
}

/// A memory-bank anomaly detector (PatchCore family): the graph ends in an anomaly map of
/// nearest-neighbour patch distances; the manifest says where the decision threshold is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnomalySpec {
    /// Output holding the map, shape [1, 1, H, W], raw patch distances.
    pub map_output: String,
    /// Backbone tensors the patch features come from.
    pub layers: Vec<String>,
    /// Patch feature length (sum of the layers' channels).
    pub feature_dim: usize,
    /// Side of the local average that aggregates each patch's neighbourhood.
    pub aggregation: usize,
    /// Patches kept in the memory bank (coreset size).
    pub memory_rows: usize,
    /// Raw map value at the decision threshold: scores are divided by it, so 1.0 is the
    /// threshold and anything above is NG.
    pub threshold: f32,
    /// How the threshold was chosen, in words.
    pub threshold_method: String,
    /// Good images the memory bank was built from.
    pub training_images: usize,
    /// Cells at each edge of the map left out of the image score and of defect regions
    /// (image borders that vary from part to part rather than defects).
    #[serde(default)]
    pub score_border: usize,
    /// The image score is the mean of this many largest map values (0 or 1: the largest).
    /// A few cells agreeing count more than one outlier cell.
    #[serde(default)]
    pub score_top_k: usize,
    /// Names the defect type of a part: a linear head on the patch features of the map's most
    /// anomalous cells (absent: the detector only says OK/NG).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defect_types: Option<DefectTypes>,
}

/// A defect-type classifier on top of an anomaly detector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DefectTypes {
    /// Graph output with the patch features, [map cells, feature_dim], in map order.
    pub features_output: String,
    /// Type names, one per row of `weights`.
    pub labels: Vec<String>,
    /// The features of this many most anomalous scored cells are averaged.
    pub pool_cells: usize,
    /// Row-major [labels, feature_dim] (feature standardization folded in).
    pub weights: Vec<f32>,
    pub bias: Vec<f32>,
    /// The labelled images the head was trained on (`type/file name`), for evaluation to
    /// leave out.
    #[serde(default)]
    pub trained_on: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompilerInfo {
    pub name: String,
    pub version: String,
    /// tract version the graph was imported and decluttered with.
    pub tract_version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// File name of the source model (no directories: they are machine-specific).
    pub file: String,
    pub format: String,
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetInfo {
    pub board: String,
    pub triple: String,
    pub cpu: String,
    pub precision: String,
    pub threads: usize,
    pub memory_budget_mb: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub sha256: String,
    pub bytes: u64,
}

/// Element type of a tensor at the model boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    U8,
    I8,
    I32,
    I64,
}

/// Axis order of an image input tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Layout {
    Nchw,
    Nhwc,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub layout: Layout,
    /// How a raw image becomes this tensor. `None` for non-image inputs.
    pub preprocess: Option<Preprocess>,
}

impl InputSpec {
    /// (batch, channels, height, width) from the shape and layout.
    pub fn nchw(&self) -> Option<(usize, usize, usize, usize)> {
        match (self.layout, self.shape.as_slice()) {
            (Layout::Nchw, &[n, c, h, w]) => Some((n, c, h, w)),
            (Layout::Nhwc, &[n, h, w, c]) => Some((n, c, h, w)),
            _ => None,
        }
    }
}

/// Image preprocessing, applied in this order: decode → channel order → resize → center crop →
/// optional local-mean subtraction (`flatten`) → optional per-image standardization →
/// `(pixel * scale - mean[c]) / std[c]` → layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    pub resize: Resize,
    pub interpolation: Interpolation,
    /// Center crop to (width, height) after resizing; `None` if the resize gives the input size.
    pub crop: Option<[u32; 2]>,
    pub channels: ChannelOrder,
    /// Multiplies raw 0..255 pixel values first (e.g. 1/255).
    pub scale: f32,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Before `scale`/`mean`/`std`: shift and stretch each image's channels to mean 128 and
    /// standard deviation 48 (pixel units), so lighting and exposure changes between frames
    /// do not look like defects.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub standardize: bool,
    /// After resizing and before `standardize`: subtract from each pixel the mean of the
    /// `flatten`×`flatten` window around it (then add 128), which removes uneven lighting and
    /// shading across the part and keeps local texture and defects. Odd, at least 3; windows
    /// are cut at the image's edges. Artifacts using it are format 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flatten: Option<u32>,
}

/// How the decoded image is resized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum Resize {
    /// Stretch to exactly this size (aspect ratio not kept).
    Exact { width: u32, height: u32 },
    /// Scale so the shorter side has this length, keeping the aspect ratio.
    ShorterSide { size: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    Nearest,
    Bilinear,
    Bicubic,
    Lanczos3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    Rgb,
    Bgr,
    /// Single luminance channel.
    Gray,
}

impl ChannelOrder {
    pub fn count(self) -> usize {
        match self {
            ChannelOrder::Rgb | ChannelOrder::Bgr => 3,
            ChannelOrder::Gray => 1,
        }
    }
}

/// What an output means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Classification,
    Features,
    Anomaly,
}

/// How classification scores are stored in the output tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scores {
    /// Raw logits: the runtime applies softmax.
    Logits,
    /// Already probabilities (the model ends in softmax).
    Probabilities,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub task: Task,
    /// For classification: what the values are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scores: Option<Scores>,
    /// For classification: one label per class, in class order (may be empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}
