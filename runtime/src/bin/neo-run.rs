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
    /// with another runtime on exactly the same input. Given a folder of images, one
    /// subfolder per image, named after its file.
    Dump {
        model: PathBuf,
        image: PathBuf,
        /// Folder for input.npy and output_<n>.npy.
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Replay a recording through a sensor model (features → score → Healthy/Warning/Alarm):
    /// one JSON line per state change (or per window with --all), then a summary line.
    ///
    /// Example: neo-run sensor pump.neo skab/valve1/0.csv
    Sensor {
        model: PathBuf,
        /// Recording: .csv (process data, `;` or `,` separated) or .mat (MATLAB v5).
        input: PathBuf,
        /// Print every window, not only state changes.
        #[arg(long)]
        all: bool,
    },
    /// Measure load time and per-image latency (p50, p99) on this device; prints JSON.
    /// Sensor models: replays --input as fast as possible (windows/s, share of one core a
    /// live stream at the model's sampling rate needs).
    Bench {
        model: PathBuf,
        /// Image to run on (decoded once; preprocessing and inference are timed).
        #[arg(long, required_unless_present = "input")]
        image: Option<PathBuf>,
        /// Sensor models: the recording to replay.
        #[arg(long)]
        input: Option<PathBuf>,
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
    for w in model.warnings() {
        eprintln!("warning: {w}");
    }
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
        "int8_kernel": model.int8_kernel().map(|k| k.name()),
        "load_ms": stats(&load_ms),
        "preprocess_ms": stats(&pre),
        "inference_ms": stats(&inf),
        "end_to_end_ms": stats(&total),
        "peak_rss_mib": peak_rss_mib(),
    }))
}

/// This process's peak resident memory (Linux `VmHWM`), in MiB; None elsewhere.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn assessment_json(a: &neo_sensor::Assessment) -> serde_json::Value {
    serde_json::json!({
        "end": a.end,
        "time_s": a.time_s,
        "health": a.transition.health.as_str(),
        "previous": a.transition.previous.as_str(),
        "cause": a.transition.cause,
        "score": a.score.normalized,
        "zone": a.transition.zone.map(String::from),
        "vel_rms_mm_s": a.vel_rms_mm_s,
        "top": a.score.top,
    })
}

/// `neo-run sensor`: replay a recording, print state changes (or every window).
fn sensor_replay(model: &Path, input: &Path, all: bool) -> Result<bool> {
    use neo_sensor::Event;
    let artifact = neo_runtime::SensorArtifact::open(model)?;
    let spec = artifact.spec();
    let rec = neo_sensor::recording::load(input, Some(&spec.channels))
        .with_context(|| format!("reading {}", input.display()))?;
    let mut monitor = artifact.monitor()?;
    let mut out = std::io::stdout().lock();
    let (mut windows, mut skipped, mut changes) = (0u64, 0u64, 0u64);
    let mut worst = neo_sensor::Health::Healthy;
    for i in 0..rec.frames() {
        let t = rec.times.as_ref().map(|t| t[i]);
        match monitor.push(rec.frame(i), t)? {
            Some(Event::Assessed(a)) => {
                windows += 1;
                worst = worst.max(a.transition.health);
                if a.transition.changed() {
                    changes += 1;
                }
                if all || a.transition.changed() {
                    writeln!(out, "{}", assessment_json(&a))?;
                }
            }
            Some(Event::Skipped { end, reason }) => {
                skipped += 1;
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"end": end, "skipped": reason})
                )?;
            }
            Some(Event::Learned {
                end,
                report,
                threshold,
            }) => {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"end": end, "commissioned": {"windows": report.windows, "threshold": threshold, "method": report.threshold_method, "constant_features": report.constant}})
                )?;
            }
            Some(Event::Learning { .. }) | None => {}
        }
    }
    let ex = monitor.extractor();
    writeln!(
        out,
        "{}",
        serde_json::json!({
            "summary": {
                "file": rec.file,
                "frames": rec.frames(),
                "windows": windows,
                "skipped_windows": skipped,
                "state_changes": changes,
                "worst": worst.as_str(),
                "final": monitor.health().as_str(),
                "bad_values": rec.bad_values,
                "out_of_order_rows": ex.out_of_order,
                "gaps": ex.gaps,
                "still_learning": monitor.is_learning(),
            }
        })
    )?;
    Ok(true)
}

/// `neo-run bench` on a sensor model: replays the recording `runs` times (at most 5).
fn sensor_bench(model: &Path, input: &Path, runs: usize) -> Result<serde_json::Value> {
    let artifact = neo_runtime::SensorArtifact::open(model)?;
    let spec = artifact.spec();
    let rec = neo_sensor::recording::load(input, Some(&spec.channels))
        .with_context(|| format!("reading {}", input.display()))?;
    let mut best = f64::INFINITY;
    let mut windows = 0u64;
    for _ in 0..runs.clamp(1, 5) {
        let mut monitor = artifact.monitor()?;
        let start = Instant::now();
        let mut n = 0u64;
        for i in 0..rec.frames() {
            let t = rec.times.as_ref().map(|t| t[i]);
            if let Some(neo_sensor::Event::Assessed(_)) = monitor.push(rec.frame(i), t)? {
                n += 1;
            }
        }
        best = best.min(start.elapsed().as_secs_f64());
        windows = n;
    }
    let rate = match &spec.features {
        neo_sensor::FeatureConfig::Vibration(c) => Some(c.sample_rate_hz),
        neo_sensor::FeatureConfig::Process(_) => None,
    };
    let stream_s = rate.map(|r| rec.frames() as f64 / r);
    Ok(serde_json::json!({
        "model": artifact.manifest.name,
        "input": input.display().to_string(),
        "channels": spec.channels,
        "frames": rec.frames(),
        "windows": windows,
        "seconds": best,
        "windows_per_s": windows as f64 / best.max(1e-12),
        "us_per_window": 1e6 * best / (windows.max(1) as f64),
        "signal_seconds": stream_s,
        "core_pct_at_stream_rate": stream_s.map(|s| 100.0 * best / s),
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
            let kind = a
                .get("defect_type")
                .filter(|t| !t.is_null() && a["verdict"] == "NG")
                .map(|t| {
                    format!(
                        ": {} {:.2}",
                        t["label"].as_str().unwrap_or("?"),
                        t["probability"].as_f64().unwrap_or(f64::NAN)
                    )
                })
                .unwrap_or_default();
            parts.push(format!(
                "{:<3} score {:.2} ({regions} region{}){kind}",
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

/// Writes one image's preprocessed input and raw outputs as .npy files into `out`.
fn dump_one(model: &Model, image: &std::path::Path, out: &std::path::Path) -> Result<()> {
    let bytes = std::fs::read(image).with_context(|| format!("cannot read {}", image.display()))?;
    let img = preprocess::decode(&image.display().to_string(), &bytes)?;
    let input = model.image_tensor(&img)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
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
    Ok(())
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
            if image.is_dir() {
                let images = preprocess::list_images(&image)
                    .with_context(|| format!("cannot list {}", image.display()))?;
                anyhow::ensure!(!images.is_empty(), "{} holds no images", image.display());
                for path in images {
                    // The file name (not the stem): a.jpg and a.png get folders of their own.
                    let name = path.file_name().unwrap_or_default().to_string_lossy();
                    dump_one(&model, &path, &out.join(name.as_ref()))?;
                }
            } else {
                dump_one(&model, &image, &out)?;
            }
            Ok(true)
        }
        Command::Sensor { model, input, all } => sensor_replay(&model, &input, all),
        Command::Bench {
            model,
            image,
            input,
            runs,
            warmup,
            loads,
            threads,
        } => {
            let is_sensor = neo_runtime::Artifact::open(&model)?
                .manifest
                .sensor
                .is_some();
            let report = match (is_sensor, image, input) {
                (true, _, Some(input)) => sensor_bench(&model, &input, runs)?,
                (true, _, None) => anyhow::bail!(
                    "{} is a sensor model: give --input RECORDING",
                    model.display()
                ),
                (false, Some(image), _) => bench(threads, &model, &image, runs, warmup, loads)?,
                (false, None, _) => {
                    anyhow::bail!("{} is a vision model: give --image FILE", model.display())
                }
            };
            println!("{report}");
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
            for w in model.warnings() {
                eprintln!("warning: {w}");
            }
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
