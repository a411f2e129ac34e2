//! `neoc`: the neo model compiler's command line.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use neo_boards::Boards;
use neo_runtime::manifest::{ChannelOrder, Interpolation, Layout, Scores, Task};
use neoc::anomaly::TrainOptions;
use neoc::card::{parse_floats, parse_resize, parse_shape, parse_size};
use neoc::CompileOptions;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "neoc",
    version,
    about = "neo model compiler: turns a trained ONNX model into a .neo artifact for a board",
    long_about = "neo model compiler: turns a trained ONNX model into a verified .neo artifact \
                  (tract NNEF graph + manifest with the preprocessing contract) that the device \
                  runtime loads without any ONNX code.\n\nQuick start:\n  \
                  neoc compile model.onnx --target x86_64 -o model.neo\n  \
                  neoc inspect model.neo\n  \
                  neo-run classify model.neo image.jpg"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LayoutArg {
    Nchw,
    Nhwc,
}

#[derive(Clone, Copy, ValueEnum)]
enum ChannelsArg {
    Rgb,
    Bgr,
    Gray,
}

#[derive(Clone, Copy, ValueEnum)]
enum InterpArg {
    Nearest,
    Bilinear,
    Bicubic,
    Lanczos3,
}

#[derive(Clone, Copy, ValueEnum)]
enum TaskArg {
    Classification,
    Features,
    Anomaly,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScoresArg {
    Logits,
    Probabilities,
}

/// The model's input contract: shape and preprocessing (flags override the model card).
#[derive(Args)]
struct InputArgs {
    /// Model card (TOML); default: model.toml beside the model, if present.
    #[arg(long)]
    card: Option<PathBuf>,
    /// Model name stored in the manifest (default: card name or file name).
    #[arg(long)]
    name: Option<String>,
    /// Fixed input shape for models with dynamic dimensions, e.g. 1,3,224,224.
    #[arg(long)]
    input_shape: Option<String>,
    /// Input layout (default: guessed from where the channel dimension is).
    #[arg(long, value_enum)]
    layout: Option<LayoutArg>,
    /// Resize: 256 scales the shorter side to 256; 224x224 stretches to exactly that.
    #[arg(long)]
    resize: Option<String>,
    /// Center crop after resizing: 224 or 224x224 (must equal the input size).
    #[arg(long)]
    crop: Option<String>,
    /// Resize interpolation [default: bilinear].
    #[arg(long, value_enum)]
    interpolation: Option<InterpArg>,
    /// Channel order the model expects [default: rgb, or gray for 1 channel].
    #[arg(long, value_enum)]
    channels: Option<ChannelsArg>,
    /// Multiplies 0..255 pixel values before mean/std (e.g. 0.00392157 for 1/255).
    #[arg(long)]
    scale: Option<f32>,
    /// Per-channel mean subtracted after scaling, e.g. 0.485,0.456,0.406.
    #[arg(long)]
    mean: Option<String>,
    /// Per-channel divisor after the mean, e.g. 0.229,0.224,0.225.
    #[arg(long)]
    std: Option<String>,
    /// Standardize each image first (channels to mean 128, std 48): exposure and lighting
    /// changes between frames stop looking like defects.
    #[arg(long)]
    standardize: bool,
    /// Subtract each pixel's local mean over a KxK window (pixels at the model's input size)
    /// before --standardize: uneven lighting and shading across the part stop looking like
    /// defects, while texture and defects smaller than the window stay.
    #[arg(long, value_name = "K")]
    flatten: Option<u32>,
}

#[derive(Args)]
struct CompileArgs {
    /// The trained model (ONNX).
    model: PathBuf,
    /// Board to compile for (see `neoc boards`).
    #[arg(long, short)]
    target: String,
    /// Where to write the artifact.
    #[arg(long, short)]
    output: PathBuf,
    #[command(flatten)]
    input: InputArgs,
    /// Keep only these outputs (repeatable; intermediate tensor names work too).
    #[arg(long = "output-name")]
    outputs: Vec<String>,
    /// What the first output means [default: classification for vectors, else features].
    #[arg(long, value_enum)]
    task: Option<TaskArg>,
    /// Whether classification outputs are logits or probabilities [default: detected].
    #[arg(long, value_enum)]
    scores: Option<ScoresArg>,
    /// Class labels, one per line, in class order.
    #[arg(long)]
    labels: Option<PathBuf>,
    #[command(flatten)]
    quant: QuantArgs,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum QuantizeArg {
    /// int8, in the scheme the board profile picks (see `neoc boards`).
    Int8,
}

#[derive(Clone, Copy, ValueEnum)]
enum CalibMethodArg {
    Minmax,
    Percentile,
    Entropy,
}

/// Post-training quantization.
#[derive(Args)]
struct QuantArgs {
    /// Quantize the model; needs --calibration.
    #[arg(long, value_enum)]
    quantize: Option<QuantizeArg>,
    /// Folder of images like the ones the device will see (at least 15; 100+ is better);
    /// part of them is held out to check accuracy.
    #[arg(long, requires = "quantize")]
    calibration: Option<PathBuf>,
    /// How activation ranges are chosen.
    #[arg(long, value_enum, default_value = "percentile", requires = "quantize")]
    calibration_method: CalibMethodArg,
    /// Percentile of |x| for --calibration-method percentile.
    #[arg(long, default_value_t = 99.99, requires = "quantize")]
    calibration_percentile: f64,
    /// Share of the calibration images held out for the accuracy check.
    #[arg(long, default_value_t = 0.2, requires = "quantize")]
    holdout: f64,
    /// Read at most this many calibration images (evenly spread over the folder).
    #[arg(long, default_value_t = 200, requires = "quantize")]
    max_images: usize,
    /// Largest loss of top-1 agreement with the f32 model allowed, in percent.
    #[arg(long, default_value_t = 1.0, requires = "quantize")]
    max_drop: f64,
    /// Smallest cosine similarity to the f32 outputs allowed on feature outputs.
    #[arg(long, default_value_t = 0.99, requires = "quantize")]
    min_cosine: f64,
    /// When the budget is missed, keep the most sensitive layers in f32 until it holds.
    #[arg(long, requires = "quantize")]
    mixed_precision: bool,
    /// Skip bias correction (the mean output shift of int8 weights taken back through each
    /// layer's bias); for comparing, it costs accuracy.
    #[arg(long, requires = "quantize")]
    no_bias_correction: bool,
    /// Also write the calibrated model as standard QDQ ONNX (for onnxruntime, TensorRT).
    #[arg(long, requires = "quantize", value_name = "FILE.onnx")]
    emit_qdq: Option<PathBuf>,
    /// Whose conventions the QDQ file follows [default: tensorrt for boards with a GPU,
    /// onnxruntime otherwise]: tensorrt = int8 symmetric activations; onnxruntime = uint8
    /// activations with every layer output quantized, which its CPU kernels fuse.
    #[arg(long, value_enum, requires = "emit_qdq")]
    qdq_for: Option<QdqForArg>,
    /// int8-compute: convolutions run on neo's int8 kernels (AVX-512 VNNI, Arm dot product);
    /// int8-weights: weights stored int8, computed in f32 [default: int8-compute for boards
    /// whose profile says int8_compute = true, int8-weights otherwise].
    #[arg(long, value_enum, requires = "quantize")]
    scheme: Option<SchemeArg>,
}

#[derive(Clone, Copy, ValueEnum)]
enum SchemeArg {
    Int8Compute,
    Int8Weights,
}

#[derive(Clone, Copy, ValueEnum)]
enum QdqForArg {
    Tensorrt,
    Onnxruntime,
}

impl QuantArgs {
    fn options(self) -> Result<Option<neoc::quantize::QuantizeOptions>> {
        use neoc::quantize::{Budget, Method, QuantizeOptions};
        let Some(QuantizeArg::Int8) = self.quantize else {
            return Ok(None);
        };
        let dir = self.calibration.context(
            "--quantize int8 needs --calibration DIR: a folder of images like the ones the \
             device will see (at least 15)",
        )?;
        if !(0.0..100.0).contains(&self.max_drop) {
            anyhow::bail!("--max-drop is a percentage: 0 up to (not including) 100");
        }
        if !(0.0..=1.0).contains(&self.min_cosine) {
            anyhow::bail!("--min-cosine is between 0 and 1");
        }
        if !(0.0..1.0).contains(&self.holdout) || self.holdout == 0.0 {
            anyhow::bail!("--holdout is a fraction between 0 and 1, e.g. 0.2");
        }
        if !(50.0..=100.0).contains(&self.calibration_percentile) {
            anyhow::bail!("--calibration-percentile is between 50 and 100, e.g. 99.99");
        }
        let mut q = QuantizeOptions::new(dir);
        q.method = match self.calibration_method {
            CalibMethodArg::Minmax => Method::MinMax,
            CalibMethodArg::Percentile => Method::Percentile(self.calibration_percentile),
            CalibMethodArg::Entropy => Method::Entropy,
        };
        q.holdout = self.holdout;
        q.max_images = self.max_images;
        q.budget = Budget {
            max_top1_drop: self.max_drop / 100.0,
            min_cosine: self.min_cosine,
        };
        q.mixed_precision = self.mixed_precision;
        q.emit_qdq = self.emit_qdq;
        q.qdq_style = self.qdq_for.map(|f| match f {
            QdqForArg::Tensorrt => neoc::quantize::qdq::QdqStyle::TensorRt,
            QdqForArg::Onnxruntime => neoc::quantize::qdq::QdqStyle::OnnxRuntime,
        });
        q.bias_correction = !self.no_bias_correction;
        q.int8_compute = self.scheme.map(|s| matches!(s, SchemeArg::Int8Compute));
        Ok(Some(q))
    }
}

#[derive(Args)]
struct TrainAnomalyArgs {
    /// Pretrained backbone (ONNX), e.g. EfficientNet-Lite0.
    #[arg(long)]
    backbone: PathBuf,
    /// Backbone tensors for patch features, finest grid first, e.g. stage3,stage5.
    #[arg(long, value_delimiter = ',', required = true)]
    layers: Vec<String>,
    /// Folder of good images (repeatable). Every tenth is held out to set the threshold.
    #[arg(long, required_unless_present = "dataset")]
    normal: Vec<PathBuf>,
    /// Or a labelled dataset (MVTec: train/good; magnetic tile: the first --train-good of
    /// MT_Free) to take the good training images from.
    #[arg(long, conflicts_with = "normal")]
    dataset: Option<PathBuf>,
    /// Good images to train on in a magnetic-tile dataset [default: 100].
    #[arg(long)]
    train_good: Option<usize>,
    /// Folder of defective images (or of one folder per defect type): the threshold then
    /// maximizes F1 instead of taking a percentile of good scores.
    #[arg(long)]
    defects: Option<PathBuf>,
    /// Folder with one subfolder of images per defect type (crack/, scratch/ …): also trains
    /// a defect-type head, so NG results name the type ("NG: crack 0.91").
    #[arg(long, value_name = "DIR")]
    defect_types: Option<PathBuf>,
    /// Board to compile for (see `neoc boards`).
    #[arg(long, short, default_value = "x86_64")]
    target: String,
    /// Where to write the detector.
    #[arg(long, short)]
    output: PathBuf,
    /// Memory bank limit in MB (f32 patch rows).
    #[arg(long, default_value_t = 16.0)]
    memory_budget: f64,
    /// Share of training patches kept by the coreset (before the budget caps it).
    #[arg(long, default_value_t = 0.02)]
    coreset_ratio: f64,
    /// Neighbourhood averaged into each patch (odd: 1, 3, 5).
    #[arg(long, default_value_t = 3)]
    aggregation: usize,
    /// Percentile of held-out good image scores taken as threshold (without --defects).
    #[arg(long, default_value_t = 99.5)]
    percentile: f64,
    /// Map cells at each edge left out of the image score and regions (part borders that
    /// vary from part to part).
    #[arg(long, default_value_t = 0)]
    score_border: usize,
    /// Image score = mean of the N largest map cells (default 1: the largest), so one odd
    /// cell weighs less than a few agreeing ones.
    #[arg(long, default_value_t = 1)]
    score_top_k: usize,
    #[command(flatten)]
    input: InputArgs,
    #[command(flatten)]
    quant: QuantArgs,
    /// Largest image-AUROC loss of the int8 detector against f32 (with --defects).
    #[arg(long, default_value_t = 0.01, requires = "quantize")]
    max_auroc_drop: f64,
}

#[derive(Args)]
struct TrainSensorArgs {
    /// Normal recordings (repeatable): .csv process data (SKAB format: `;`-separated, a
    /// datetime column) or .mat vibration (MATLAB v5, e.g. CWRU).
    #[arg(long, required = true)]
    normal: Vec<PathBuf>,
    /// Channels: CSV column names, or for .mat the variable or its position (DE, FE, BA)
    /// [default: every sensor column / every *_time vector].
    #[arg(long, value_delimiter = ',')]
    channels: Option<Vec<String>>,
    /// Train on this share of each recording, from its start (leave the rest for eval).
    #[arg(long, default_value_t = 1.0)]
    use_fraction: f64,
    /// Vibration: sampling rate in Hz (required for .mat input; CWRU: 12000).
    #[arg(long)]
    sample_rate: Option<f64>,
    /// Vibration: unit of the samples.
    #[arg(long, value_enum, default_value_t = UnitArg::G)]
    units: UnitArg,
    /// Samples (vibration) or rows (process) per window [default: about 1/6 s; 1 row].
    #[arg(long)]
    window: Option<usize>,
    /// Samples/rows between window starts [default: window/8; 1 row].
    #[arg(long)]
    hop: Option<usize>,
    /// Vibration: bearing for envelope features: `cwru-de` (SKF 6205 of the CWRU rig) or
    /// `balls=9,ball=0.3126,pitch=1.537,angle=0`.
    #[arg(long)]
    bearing: Option<String>,
    /// Shaft speed for the bearing frequencies [default: the recording's RPM variable].
    #[arg(long)]
    rpm: Option<f64>,
    /// Process: statistics per window and channel (mean, std, min, max, slope).
    #[arg(long, value_delimiter = ',')]
    stats: Vec<String>,
    /// mahalanobis (shrunk covariance) or pca (T² + Q).
    #[arg(long, default_value = "mahalanobis")]
    model: String,
    /// Share of normal windows held out (the tail of each recording) to set the threshold.
    #[arg(long, default_value_t = 0.2)]
    holdout: f64,
    /// Threshold at this quantile of the held-out normal scores...
    #[arg(long, default_value_t = 0.995)]
    quantile: f64,
    /// ...times this factor.
    #[arg(long, default_value_t = 1.0)]
    margin: f64,
    /// Alarm persistence: N of the last M windows must reach a level, as N/M.
    #[arg(long, default_value = "3/5")]
    persistence: String,
    /// Normalized score (1 = threshold) where Alarm starts (Warning starts at 1).
    #[arg(long, default_value_t = 2.0)]
    alarm_level: f64,
    /// ISO 20816 machine class for the absolute velocity guard (I, II, III, IV).
    #[arg(long)]
    iso_class: Option<String>,
    /// Learn the baseline on the device: each stream's first N frames (samples or rows) are
    /// taken as normal, the model and threshold are refitted on them, then scoring starts
    /// (how SKAB's own notebooks fit each experiment's first 400 rows).
    #[arg(long, value_name = "N")]
    commission: Option<u64>,
    /// Board the model is packaged for.
    #[arg(long, short, default_value = "x86_64")]
    target: String,
    #[arg(long)]
    name: Option<String>,
    #[arg(long, short)]
    output: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum UnitArg {
    G,
    Ms2,
}

#[derive(Subcommand)]
enum TrainKind {
    /// Learn "normal" from good images: a memory-bank (PatchCore-style) detector that scores
    /// each image, maps where it differs and says OK or NG.
    ///
    /// Example (MVTec-style folders):
    ///   neoc train anomaly --backbone efficientnet_lite0.onnx --layers stage3,stage5 \
    ///     --card models/cards/efficientnet_lite0.toml --resize 224x224 \
    ///     --normal bottle/train/good -o bottle-detector.neo
    #[command(verbatim_doc_comment)]
    Anomaly(Box<TrainAnomalyArgs>),
    /// Learn an asset's normal behaviour from vibration or process recordings: streaming
    /// features, a Mahalanobis or PCA T²+Q baseline, a threshold from held-out normal data
    /// and Healthy/Warning/Alarm rules. Packaged as a .neo artifact.
    ///
    /// Examples:
    ///   neoc train sensor --normal skab/anomaly-free/anomaly-free.csv -o pump.neo
    ///   neoc train sensor --normal cwru/Normal/97_Normal_0.mat --channels DE \
    ///     --sample-rate 12000 --bearing cwru-de --use-fraction 0.5 -o bearing.neo
    #[command(verbatim_doc_comment)]
    Sensor(Box<TrainSensorArgs>),
}

#[derive(Subcommand)]
enum Command {
    /// Compile an ONNX model into a .neo artifact for a target board.
    ///
    /// Preprocessing is part of the model's contract: give it with flags or in a model card
    /// (`model.toml` beside the model, or --card). Flags override the card. The device then
    /// feeds raw camera frames and the model sees exactly what it was trained on.
    ///
    /// Example (SqueezeNet 1.1, Caffe-style BGR input):
    ///   neoc compile squeezenet.onnx --target rpi4 -o squeezenet.neo \
    ///     --resize 256 --crop 224 --channels bgr --mean 104,117,123 --labels labels.txt
    #[command(verbatim_doc_comment)]
    Compile(Box<CompileArgs>),
    /// Train a model on the dev machine and package it as a .neo artifact.
    Train {
        #[command(subcommand)]
        kind: TrainKind,
    },
    /// Evaluate a detector on a labelled dataset (MVTec layout: test/good, test/<type>/):
    /// image AUROC, precision/recall/F1 at its threshold, confusion matrix, latency. JSON.
    ///
    /// Sensor models: `neoc eval [sensor] MODEL.neo --dataset DIR` on SKAB (CSV files with
    /// an `anomaly` column: F1, FAR, MAR as SKAB defines them) or CWRU (Normal/*.mat and
    /// fault folders: detection rate per fault type, false alarms on held-out normal data).
    Eval {
        /// `sensor` or `anomaly` (optional: the artifact says which it is), then the model.
        #[arg(num_args = 1..=2, required = true, value_name = "[KIND] MODEL")]
        detector: Vec<String>,
        #[arg(long)]
        dataset: PathBuf,
        /// Good images the detector was trained on in a magnetic-tile dataset (not tested)
        /// [default: 100].
        #[arg(long)]
        train_good: Option<usize>,
        /// Also write an HTML report (ROC curve, score histogram, worst misses with heat maps).
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
    },
    /// Verify an artifact and show its manifest, operators, parameter count and sizes.
    Inspect {
        artifact: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the known target boards (shipped profiles, plus $NEO_BOARDS_DIR).
    Boards,
    /// Pack a board's station: the cross-built daemon, the models and recordings the station
    /// file names, that file (paths rewritten to the installed ones), an enabled systemd unit,
    /// an install script and hashes. Install: unpack, then `sh opt/neo/install.sh [ROOT]`.
    ///
    /// Example:
    ///   scripts/cross.sh aarch64-unknown-linux-gnu build
    ///   neoc compile model.onnx --target rpi4 -o out/model.neo
    ///   neoc bundle --board rpi4 --config station.toml -o gateway-rpi4.tar
    #[command(verbatim_doc_comment)]
    Bundle {
        #[arg(long)]
        board: String,
        /// The station file (`station.toml`).
        #[arg(long)]
        config: PathBuf,
        /// The daemon built for the board [default: target/cross/<triple>/release/neo-gateway].
        #[arg(long)]
        daemon: Option<PathBuf>,
        /// Keep the daemon's symbols (by default they are stripped when the board's strip
        /// tool, e.g. aarch64-linux-gnu-strip, is installed).
        #[arg(long)]
        no_strip: bool,
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Time plain tract-onnx on the source model (load + optimize, inference p50/p99): the
    /// baseline that `neo-run bench` on the compiled artifact is compared with. Prints JSON.
    Baseline {
        model: PathBuf,
        /// Fixed input shape for models with dynamic dimensions, e.g. 1,3,224,224.
        #[arg(long)]
        input_shape: Option<String>,
        #[arg(long, default_value_t = 3)]
        loads: usize,
        #[arg(long, default_value_t = 50)]
        runs: usize,
        /// Also time every node of the optimized plan and print where the time goes, per
        /// operator kind (adds the timing overhead of one clock read per node).
        #[arg(long)]
        profile: bool,
    },
}

/// Compile options from the common input flags.
fn options(
    model: PathBuf,
    target: String,
    output: PathBuf,
    a: InputArgs,
) -> Result<CompileOptions> {
    Ok(CompileOptions {
        model,
        target,
        output,
        card: a.card,
        name: a.name,
        input_shape: a.input_shape.as_deref().map(parse_shape).transpose()?,
        layout: a.layout.map(|l| match l {
            LayoutArg::Nchw => Layout::Nchw,
            LayoutArg::Nhwc => Layout::Nhwc,
        }),
        resize: a.resize.as_deref().map(parse_resize).transpose()?,
        crop: a.crop.as_deref().map(parse_size).transpose()?,
        interpolation: a.interpolation.map(|i| match i {
            InterpArg::Nearest => Interpolation::Nearest,
            InterpArg::Bilinear => Interpolation::Bilinear,
            InterpArg::Bicubic => Interpolation::Bicubic,
            InterpArg::Lanczos3 => Interpolation::Lanczos3,
        }),
        channels: a.channels.map(|c| match c {
            ChannelsArg::Rgb => ChannelOrder::Rgb,
            ChannelsArg::Bgr => ChannelOrder::Bgr,
            ChannelsArg::Gray => ChannelOrder::Gray,
        }),
        scale: a.scale,
        mean: a
            .mean
            .as_deref()
            .map(|m| parse_floats("--mean", m))
            .transpose()?,
        standardize: a.standardize,
        flatten: a.flatten,
        std: a
            .std
            .as_deref()
            .map(|s| parse_floats("--std", s))
            .transpose()?,
        ..Default::default()
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn run(cli: Cli) -> Result<()> {
    let boards = Boards::from_env()?;
    match cli.command {
        Command::Bundle {
            board,
            config,
            daemon,
            no_strip,
            output,
        } => {
            let m = neoc::bundle::bundle(
                &neoc::bundle::BundleOptions {
                    board,
                    config,
                    daemon,
                    output: output.clone(),
                    strip: !no_strip,
                },
                &boards,
            )?;
            let bytes: u64 = m.files.values().map(|f| f.bytes).sum();
            eprintln!(
                "bundled {} files ({:.1} MiB{}) for {} ({}): {}\ninstall: tar xf {} -C DIR && sh DIR/opt/neo/install.sh [ROOT]",
                m.files.len(),
                mib(bytes),
                m.stripped_with.as_deref().map_or(String::new(), |t| format!(", daemon stripped with {t}")),
                m.board,
                m.triple,
                output.display(),
                output.display()
            );
        }
        Command::Boards => {
            for b in boards.iter() {
                println!(
                    "{:<18} {:<28} {:<13} {:>2} threads {:>5} MiB  {}",
                    b.name, b.triple, b.cpu, b.threads, b.memory_budget_mb, b.description
                );
            }
        }
        Command::Baseline {
            model,
            input_shape,
            loads,
            runs,
            profile,
        } => {
            let shape = input_shape.as_deref().map(parse_shape).transpose()?;
            let b = neoc::baseline::baseline(&model, shape, loads, runs, profile)
                .with_context(|| format!("benchmarking {}", model.display()))?;
            let pct = |v: &[f64], p: f64| v[((p / 100.0) * (v.len() - 1) as f64).round() as usize];
            println!(
                "{}",
                serde_json::json!({
                    "model": b.model,
                    "input_shape": b.input_shape,
                    "load_ms": {"p50": pct(&b.load_ms, 50.0), "min": b.load_ms[0]},
                    "inference_ms": {"p50": pct(&b.inference_ms, 50.0), "p99": pct(&b.inference_ms, 99.0), "min": b.inference_ms[0]},
                    "profile": b.profile,
                })
            );
        }
        Command::Inspect { artifact, json } => {
            let report = neoc::inspect(&artifact)
                .with_context(|| format!("inspecting {}", artifact.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
        }
        Command::Eval {
            detector,
            dataset,
            train_good,
            html,
        } => {
            let (kind, detector) = match detector.as_slice() {
                [k, m] if k == "sensor" || k == "anomaly" => (Some(k.as_str()), PathBuf::from(m)),
                [m] => (None, PathBuf::from(m)),
                [k, _] => anyhow::bail!("unknown model kind '{k}': use `neoc eval sensor MODEL` or `neoc eval anomaly MODEL`"),
                _ => anyhow::bail!("give the model to evaluate"),
            };
            let is_sensor = neo_runtime::Artifact::open(&detector)
                .with_context(|| format!("opening {}", detector.display()))?
                .manifest
                .sensor
                .is_some();
            match (kind, is_sensor) {
                (Some("anomaly"), true) => anyhow::bail!(
                    "{} is a sensor model: use `neoc eval sensor`",
                    detector.display()
                ),
                (Some("sensor"), false) => anyhow::bail!(
                    "{} is a vision model: use `neoc eval anomaly`",
                    detector.display()
                ),
                _ => {}
            }
            if is_sensor {
                let report = neoc::sensor::eval_sensor(&detector, &dataset).with_context(|| {
                    format!("evaluating {} on {}", detector.display(), dataset.display())
                })?;
                eprint!("{}", sensor_summary(&report));
                println!("{}", serde_json::to_string_pretty(&report)?);
                return Ok(());
            }
            let report = neoc::anomaly::eval_anomaly(&detector, &dataset, train_good)?;
            if let Some(path) = &html {
                let model = neo_runtime::Model::load(&detector)?;
                let page = neoc::anomaly::report::html(&report, &model)?;
                std::fs::write(path, page)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                eprintln!("report: {}", path.display());
            }
            eprintln!(
                "{} images ({} defective): image AUROC {:.4}, pixel AUROC {}; at the threshold precision {:.3} recall {:.3} F1 {:.3}; latency p50 {:.1} ms p99 {:.1} ms",
                report.images,
                report.defective,
                report.image_auroc,
                report.pixel_auroc.map_or("n/a (no masks)".to_string(), |a| format!("{a:.4}")),
                report.precision,
                report.recall,
                report.f1,
                report.latency_ms_p50,
                report.latency_ms_p99
            );
            if let Some(t) = &report.defect_types {
                match t.accuracy {
                    Some(acc) => eprintln!(
                        "defect type right on {}/{} defective images the head was not trained on ({acc:.3}; {} trained on and {} of kinds it has no label for left out)",
                        t.correct, t.images, t.skipped_trained, t.unknown_kind
                    ),
                    None => eprintln!(
                        "defect type not measured: none of the {} unseen defective images is of a kind the head knows (its folders must be named like the dataset's defect kinds)",
                        t.unknown_kind
                    ),
                }
            }
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Train {
            kind: TrainKind::Anomaly(args),
        } => {
            let TrainAnomalyArgs {
                backbone,
                layers,
                normal,
                dataset,
                train_good,
                defects,
                defect_types,
                target,
                output,
                memory_budget,
                coreset_ratio,
                aggregation,
                percentile,
                score_border,
                score_top_k,
                input,
                quant,
                max_auroc_drop,
            } = *args;
            let mut compile = options(backbone, target, output.clone(), input)?;
            compile.quantize = quant.options()?;
            if let Some(q) = compile.quantize.as_mut() {
                if !(0.0..=1.0).contains(&max_auroc_drop) {
                    anyhow::bail!("--max-auroc-drop is between 0 and 1, e.g. 0.01");
                }
                q.max_auroc_drop = max_auroc_drop;
            }
            let opts = TrainOptions {
                compile,
                layers,
                normal,
                dataset,
                train_good,
                defects,
                memory_budget_mb: memory_budget,
                coreset_ratio,
                aggregation,
                percentile,
                score_border,
                score_top_k,
                defect_types,
            };
            let r = neoc::anomaly::train_anomaly(&opts, &boards)?;
            for note in &r.notes {
                eprintln!("note: {note}");
            }
            if let Some(q) = &r.quantization {
                print!("{}", q.summary());
            }
            let a = r
                .manifest
                .anomaly
                .as_ref()
                .context("no anomaly spec written")?;
            eprintln!(
                "trained on {} good images ({} patches of {} values) in {:.1} s: memory bank {} rows, threshold {:.4} ({}); wrote {}",
                r.training_images,
                r.patches,
                a.feature_dim,
                r.seconds,
                a.memory_rows,
                a.threshold,
                a.threshold_method,
                output.display()
            );
        }
        Command::Train {
            kind: TrainKind::Sensor(args),
        } => {
            let opts = sensor_options(*args)?;
            let r = neoc::sensor::train_sensor(&opts, &boards)?;
            if !r.constant_features.is_empty() {
                eprintln!(
                    "note: constant in the normal data, left out of the model: {}",
                    r.constant_features.join(", ")
                );
            }
            if r.skipped_windows > 0 || r.repaired_samples > 0 {
                eprintln!(
                    "note: {} windows skipped and {} samples repaired (NaN, inf or empty values)",
                    r.skipped_windows, r.repaired_samples
                );
            }
            eprintln!(
                "trained {:?} on {} windows of {} ({} features, {} used) in {:.0} ms; threshold {:.4} ({}); wrote {}",
                r.model,
                r.windows,
                r.channels.join(", "),
                r.features,
                r.features_used,
                r.train_ms,
                r.threshold,
                r.threshold_method,
                r.output
            );
        }
        Command::Compile(args) => {
            let CompileArgs {
                model,
                target,
                output,
                input,
                outputs,
                task,
                scores,
                labels,
                quant,
            } = *args;
            let mut opts = options(model.clone(), target, output.clone(), input)?;
            opts.outputs = outputs;
            opts.task = task.map(|t| match t {
                TaskArg::Classification => Task::Classification,
                TaskArg::Features => Task::Features,
                TaskArg::Anomaly => Task::Anomaly,
            });
            opts.scores = scores.map(|s| match s {
                ScoresArg::Logits => Scores::Logits,
                ScoresArg::Probabilities => Scores::Probabilities,
            });
            opts.labels = labels;
            opts.quantize = quant.options()?;
            let report = neoc::compile(&opts, &boards)?;
            if let Some(q) = &report.quantization {
                print!("{}", q.summary());
            }
            for note in &report.notes {
                eprintln!("note: {note}");
            }
            let m = &report.manifest;
            eprintln!(
                "compiled {} for {} in {:.1} s: {} ({:.2} MiB), self-check max abs diff {:.1e}",
                model.display(),
                m.target.board,
                report.seconds,
                output.display(),
                mib(report.artifact_bytes),
                report.self_check_max_diff
            );
        }
    }
    Ok(())
}

fn sensor_options(a: TrainSensorArgs) -> Result<neoc::sensor::SensorTrainOptions> {
    use neo_sensor::features::{AccelUnit, Bearing, ProcessStat};
    let (n, m) = a
        .persistence
        .split_once('/')
        .and_then(|(n, m)| Some((n.trim().parse().ok()?, m.trim().parse().ok()?)))
        .with_context(|| format!("--persistence '{}': write N/M, e.g. 3/5", a.persistence))?;
    let iso_class = a
        .iso_class
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let rpm = match a.rpm {
        Some(r) => Some(r),
        None if a.bearing.is_some() => {
            // CWRU files carry the shaft speed as `X<id>RPM`.
            let first = a.normal.first().context("no --normal recording")?;
            let arrays = neo_sensor::mat::read_mat(first).ok();
            arrays
                .as_deref()
                .and_then(|arr| arr.iter().find(|v| v.name.ends_with("RPM")))
                .and_then(|v| v.values.first().copied())
        }
        None => None,
    };
    let bearing = match a.bearing.as_deref() {
        None => None,
        Some(b) => {
            let rpm = rpm.context("the bearing frequencies need the shaft speed: give --rpm")?;
            Some(if b == "cwru-de" {
                Bearing::cwru_drive_end(rpm)
            } else {
                let mut v = std::collections::HashMap::new();
                for kv in b.split(',') {
                    let (k, x) = kv
                        .split_once('=')
                        .with_context(|| format!("--bearing: '{kv}' is not key=value"))?;
                    let x: f64 = x
                        .parse()
                        .with_context(|| format!("--bearing: '{x}' is not a number"))?;
                    v.insert(k.trim().to_string(), x);
                }
                let get = |k: &str| {
                    v.get(k).copied().with_context(|| {
                        format!("--bearing needs {k}= (balls, ball, pitch, angle)")
                    })
                };
                Bearing {
                    balls: get("balls")? as u32,
                    ball_diameter: get("ball")?,
                    pitch_diameter: get("pitch")?,
                    contact_angle_deg: v.get("angle").copied().unwrap_or(0.0),
                    shaft_hz: rpm / 60.0,
                }
            })
        }
    };
    let stats = a
        .stats
        .iter()
        .map(|s| {
            Ok(match s.as_str() {
                "mean" => ProcessStat::Mean,
                "std" => ProcessStat::Std,
                "min" => ProcessStat::Min,
                "max" => ProcessStat::Max,
                "slope" => ProcessStat::Slope,
                other => anyhow::bail!(
                    "--stats: unknown statistic '{other}' (mean, std, min, max, slope)"
                ),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(neoc::sensor::SensorTrainOptions {
        normal: a.normal,
        channels: a.channels,
        use_fraction: a.use_fraction,
        sample_rate_hz: a.sample_rate,
        units: match a.units {
            UnitArg::G => AccelUnit::G,
            UnitArg::Ms2 => AccelUnit::MS2,
        },
        window: a.window,
        hop: a.hop,
        bearing,
        stats,
        model: a.model.parse().map_err(anyhow::Error::msg)?,
        threshold: neo_sensor::ThresholdRule {
            holdout: a.holdout,
            quantile: a.quantile,
            margin: a.margin,
        },
        commission_frames: a.commission,
        alarm: neo_sensor::AlarmPolicy {
            alarm: a.alarm_level,
            n,
            m,
            iso_class,
            ..neo_sensor::AlarmPolicy::default()
        },
        target: a.target,
        name: a.name,
        output: a.output,
    })
}

/// A few human lines about a sensor evaluation.
fn sensor_summary(r: &neoc::sensor::SensorEvalReport) -> String {
    use neoc::sensor::SensorEvalReport as R;
    let mut s = String::new();
    match r {
        R::Skab {
            model,
            files,
            alarm,
            window,
            auroc,
            throughput,
        } => {
            s += &format!(
                "SKAB, {} files, {model:?}: alarm state F1 {:.2}, FAR {:.2} %, MAR {:.2} % | window score F1 {:.2}, FAR {:.2} %, MAR {:.2} % | AUROC {:.3} | {:.0} windows/s\n",
                files.len(), alarm.f1, alarm.far_pct, alarm.mar_pct, window.f1, window.far_pct, window.mar_pct, auroc, throughput.windows_per_s
            );
        }
        R::Cwru {
            model,
            normal_file,
            normal_windows,
            false_alarm_pct,
            false_alarm_state_pct,
            faults,
            throughput,
            ..
        } => {
            s += &format!("CWRU, {model:?}: false alarms {false_alarm_pct:.2} % of {normal_windows} held-out windows of {normal_file} ({false_alarm_state_pct:.2} % in Warning/Alarm)\n");
            s += &format!(
                "  {:<10} {:>8} {:>9} {:>12} {:>8}  top feature\n",
                "fault", "windows", "detected", "at 1% FAR", "alarm"
            );
            for f in faults {
                s += &format!(
                    "  {:<10} {:>8} {:>8.1}% {:>11.1}% {:>7.1}%  {}\n",
                    f.fault,
                    f.windows,
                    f.detected_pct,
                    f.detected_pct_at_1pct_far,
                    f.alarm_pct,
                    f.top_feature
                );
            }
            if let Some(p) = throughput.core_pct_at_stream_rate {
                s += &format!(
                    "  {:.0} windows/s ({:.0} us each): a live stream at this rate uses {:.2} % of one core\n",
                    throughput.windows_per_s, throughput.us_per_window, p
                );
            }
        }
    }
    s
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
