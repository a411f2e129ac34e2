//! `neo-run`: the device-side CLI. Classifies image files or folders with a `.neo` artifact
//! and prints one JSON line per image.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use neo_runtime::preprocess::{self, IMAGE_EXTENSIONS};
use neo_runtime::{anomaly, tensor_to_f32, Model};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "neo-run",
    version,
    about = "Run compiled neo models (.neo artifacts) on a device"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Classify images: one JSON line per image (file, top-k labels and scores, latency).
    ///
    /// Example: neo-run classify squeezenet.neo photos/ --top-k 3
    Classify {
        /// The compiled model (`neoc compile ... -o MODEL.neo`).
        model: PathBuf,
        /// Image files or folders of images (jpg, png, bmp, tiff, webp).
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// For anomaly detectors: write each image with its heat map and defect regions
        /// drawn over it to DIR/<name>.overlay.png.
        #[arg(long, value_name = "DIR")]
        overlay: Option<PathBuf>,
        /// Inference threads [default: the board profile's, at most this machine's cores].
        #[arg(long)]
        threads: Option<usize>,
        /// How many classes to print per image.
        #[arg(long, default_value_t = 5)]
        top_k: usize,
        /// `json` (one object per line) or `text` (file, best class, score, latency).
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
    /// Verify an artifact (format version, every hash) and print its manifest as JSON.
    Verify { model: PathBuf },
    /// Save the preprocessed input and the raw outputs for one image as .npy files, to compare
    /// with another runtime on exactly the same input.
    Dump {
        model: PathBuf,
        image: PathBuf,
        /// Folder for input.npy and output_<n>.npy.
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Measure load time and per-image latency (p50, p99) on this device; prints JSON.
    Bench {
        model: PathBuf,
        /// Image to run on (decoded once; preprocessing and inference are timed).
        #[arg(long)]
        image: PathBuf,
        /// Timed runs after warm-up.
        #[arg(long, default_value_t = 50)]
        runs: usize,
        /// Untimed runs first.
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// How many times to time the model load.
        #[arg(long, default_value_t = 3)]
        loads: usize,
        /// Inference threads [default: the board profile's, at most this machine's cores].
        #[arg(long)]
        threads: Option<usize>,
    },
}

/// Writes a little-endian f32 tensor as a NumPy .npy (format 1.0) file.
fn write_npy(path: &Path, shape: &[usize], values: &[f32]) -> Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' must be a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    for v in values {
        bytes.extend(v.to_le_bytes());
    }
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn bench(
    threads: Option<usize>,
    model_path: &Path,
    image: &Path,
    runs: usize,
    warmup: usize,
    loads: usize,
) -> Result<serde_json::Value> {
    let mut load_ms = Vec::new();
    let mut model = None;
    for _ in 0..loads.max(1) {
        let m = Model::load_with_threads(model_path, threads)?;
        load_ms.push(m.load_time().as_secs_f64() * 1e3);
        model = Some(m);
    }
    let model = model.context("no model loaded")?;
    let bytes = std::fs::read(image).with_context(|| format!("cannot read {}", image.display()))?;
    let img = preprocess::decode(&image.display().to_string(), &bytes)?;
    let (mut pre, mut inf, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..warmup + runs.max(1) {
        let (_, t) = model.predict(&img, 1)?;
        if i >= warmup {
            pre.push(t.preprocess_ms);
            inf.push(t.inference_ms);
            total.push(t.preprocess_ms + t.inference_ms);
        }
    }
    for v in [&mut load_ms, &mut pre, &mut inf, &mut total] {
        v.sort_by(f64::total_cmp);
    }
    let stats = |v: &[f64]| serde_json::json!({"p50": percentile(v, 50.0), "p99": percentile(v, 99.0), "min": v[0]});
    Ok(serde_json::json!({
        "model": model.manifest().name,
        "artifact": model_path.display().to_string(),
        "image": image.display().to_string(),
        "runs": runs.max(1),
        "threads": model.threads(),
        "load_ms": stats(&load_ms),
        "preprocess_ms": stats(&pre),
        "inference_ms": stats(&inf),
        "end_to_end_ms": stats(&total),
    }))
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Json,
    Text,
}

/// One result as a text line: file, best class of each output (or value count), latency.
fn text_line(r: &serde_json::Value) -> String {
    let file = r["file"].as_str().unwrap_or("?");
    if let Some(e) = r["error"].as_str() {
        return format!("{file:<44} ERROR {e}");
    }
    let mut parts = Vec::new();
    for p in r["predictions"].as_array().into_iter().flatten() {
        if let Some(a) = p.get("anomaly").filter(|a| !a.is_null()) {
            let regions = a["regions"].as_array().map_or(0, Vec::len);
            parts.push(format!(
                "{:<3} score {:.2} ({regions} region{})",
                a["verdict"].as_str().unwrap_or("?"),
                a["score"].as_f64().unwrap_or(f64::NAN),
                if regions == 1 { "" } else { "s" }
            ));
        } else if let Some(top) = p["top_k"].get(0) {
            let name = top["label"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("class {}", top["class"]));
            parts.push(format!(
                "{name:<10} {:.3}",
                top["score"].as_f64().unwrap_or(f64::NAN)
            ));
        } else if let Some(v) = p["values"].as_array() {
            parts.push(format!(
                "{}: {} values",
                p["output"].as_str().unwrap_or("?"),
                v.len()
            ));
        }
    }
    let ms = r["latency_ms"]["total"].as_f64().unwrap_or(f64::NAN);
    format!("{file:<44} {}  {ms:>7.1} ms", parts.join("  "))
}

/// Expands folders into their image files (sorted), keeps files as given.
fn collect_images(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for path in paths {
        if path.is_dir() {
            let found = preprocess::list_images(path)
                .with_context(|| format!("cannot list {}", path.display()))?;
            if found.is_empty() {
                anyhow::bail!(
                    "{} holds no images ({})",
                    path.display(),
                    IMAGE_EXTENSIONS.join(", ")
                );
            }
            out.extend(found);
        } else if path.exists() {
            out.push(path.clone());
        } else {
            anyhow::bail!("{} does not exist", path.display());
        }
    }
    Ok(out)
}

fn classify_one(
    model: &Model,
    path: &Path,
    top_k: usize,
    overlay: Option<&Path>,
) -> Result<serde_json::Value> {
    let start = Instant::now();
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let name = path.display().to_string();
    let image = preprocess::decode(&name, &bytes)?;
    let decode_ms = start.elapsed().as_secs_f64() * 1e3;
    let (predictions, timings) = model.predict(&image, top_k)?;
    let mut overlay_file = None;
    if let (Some(dir), Some(result)) =
        (overlay, predictions.iter().find_map(|p| p.anomaly.as_ref()))
    {
        let window = model.input_window(image.width(), image.height());
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let file = dir.join(format!("{stem}.overlay.png"));
        anomaly::overlay(&image, result, window)
            .save(&file)
            .with_context(|| format!("cannot write {}", file.display()))?;
        overlay_file = Some(file.display().to_string());
    }
    Ok(serde_json::json!({
        "file": name,
        "overlay": overlay_file,
        "width": image.width(),
        "height": image.height(),
        "predictions": predictions,
        "latency_ms": {
            "decode": decode_ms,
            "preprocess": timings.preprocess_ms,
            "inference": timings.inference_ms,
            "total": start.elapsed().as_secs_f64() * 1e3,
        },
    }))
}

fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Verify { model } => {
            let artifact = neo_runtime::Artifact::open(&model)?;
            println!("{}", serde_json::to_string_pretty(&artifact.manifest)?);
            Ok(true)
        }
        Command::Dump { model, image, out } => {
            let model = Model::load(&model)?;
            let bytes = std::fs::read(&image)
                .with_context(|| format!("cannot read {}", image.display()))?;
            let img = preprocess::decode(&image.display().to_string(), &bytes)?;
            let input = model.image_tensor(&img)?;
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            write_npy(
                &out.join("input.npy"),
                input.shape(),
                &tensor_to_f32(&input)?,
            )?;
            for (i, t) in model.run(vec![input])?.iter().enumerate() {
                write_npy(
                    &out.join(format!("output_{i}.npy")),
                    t.shape(),
                    &tensor_to_f32(t)?,
                )?;
            }
            Ok(true)
        }
        Command::Bench {
            model,
            image,
            runs,
            warmup,
            loads,
            threads,
        } => {
            println!("{}", bench(threads, &model, &image, runs, warmup, loads)?);
            Ok(true)
        }
        Command::Classify {
            model,
            images,
            top_k,
            format,
            overlay,
            threads,
        } => {
            let images = collect_images(&images)?;
            if let Some(dir) = &overlay {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            let model = Model::load_with_threads(&model, threads)?;
            eprintln!(
                "loaded {} ({} on {}, {} thread{}) in {:.1} ms",
                model.manifest().name,
                model.manifest().target.precision,
                model.manifest().target.board,
                model.threads(),
                if model.threads() == 1 { "" } else { "s" },
                model.load_time().as_secs_f64() * 1e3
            );
            let mut all_ok = true;
            let mut out = std::io::stdout().lock();
            for path in &images {
                let record = match classify_one(&model, path, top_k, overlay.as_deref()) {
                    Ok(record) => record,
                    Err(e) => {
                        all_ok = false;
                        let msg = format!("{e:#}");
                        eprintln!("error: {msg}");
                        serde_json::json!({"file": path.display().to_string(), "error": msg})
                    }
                };
                let line = match format {
                    Format::Json => record.to_string(),
                    Format::Text => text_line(&record),
                };
                writeln!(out, "{line}")?;
            }
            Ok(all_ok)
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        // The reader went away (`neo-run classify ... | head`): stop quietly.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
