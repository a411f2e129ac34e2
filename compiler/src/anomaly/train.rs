//! `neoc train anomaly`: good images in, a detector artifact out.

use super::coreset::greedy_k_center;
use super::head::{self, LayerShape, ANOMALY_MAP};
use crate::card::Card;
use crate::compile::{compile_imported, fix_input, CompileOptions};
use crate::error::{tract, CompileError, Result};
use crate::import;
use neo_boards::Boards;
use neo_runtime::artifact::Artifact;
use neo_runtime::manifest::{AnomalySpec, Manifest, Task};
use neo_runtime::{preprocess, tensor_to_f32, Model};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;
use tract_onnx::prelude::*;

/// Fewest good images a detector is trained from.
pub const MIN_GOOD_IMAGES: usize = 10;

/// What `neoc train anomaly` takes.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Backbone model, board, output and preprocessing, as for `neoc compile`.
    pub compile: CompileOptions,
    /// Backbone tensors to take patch features from, finest grid first.
    pub layers: Vec<String>,
    /// Folders (or files) of good images.
    pub normal: Vec<PathBuf>,
    /// Or a labelled dataset (MVTec or magnetic-tile layout) whose good training split is used.
    pub dataset: Option<PathBuf>,
    /// With a magnetic-tile dataset: how many good images to train on (the rest are tested).
    pub train_good: Option<usize>,
    /// Optional folder of defective images (or of one folder per defect type) to set the
    /// threshold by best F1.
    pub defects: Option<PathBuf>,
    /// Memory bank size limit, MiB (f32 rows).
    pub memory_budget_mb: f64,
    /// Share of all training patches kept in the bank, before the budget caps it.
    pub coreset_ratio: f64,
    /// Local neighbourhood averaged into each patch (3 = 3x3).
    pub aggregation: usize,
    /// Percentile of held-out good scores used as threshold when no defects are given.
    pub percentile: f64,
    /// Map cells at each edge left out of the image score.
    pub score_border: usize,
    /// Image score = mean of this many largest map cells (0 or 1: the largest).
    pub score_top_k: usize,
    /// One folder per defect type: trains the defect-type head (see `super::types`).
    pub defect_types: Option<PathBuf>,
}

/// What a training run did.
#[derive(Debug)]
pub struct TrainReport {
    pub manifest: Manifest,
    pub notes: Vec<String>,
    pub training_images: usize,
    pub held_out_images: usize,
    pub patches: usize,
    pub held_out_good_scores: Vec<f32>,
    pub defect_scores: Vec<f32>,
    pub seconds: f64,
    /// What quantization did (`--quantize`), with the detector's AUROC check.
    pub quantization: Option<crate::quantize::QuantReport>,
}

fn opt(msg: String) -> CompileError {
    CompileError::Options(msg)
}

/// Image files from folders (recursively one level: a folder of per-type folders works) and
/// plain files.
pub fn collect_images(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_file() {
            out.push(p.clone());
            continue;
        }
        let io = |source| CompileError::Io {
            path: p.clone(),
            source,
        };
        let mut found = preprocess::list_images(p).map_err(io)?;
        if found.is_empty() {
            let mut subdirs: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(io)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|d| d.is_dir())
                .collect();
            subdirs.sort();
            for d in subdirs {
                found.extend(
                    preprocess::list_images(&d).map_err(|source| CompileError::Io {
                        path: d.clone(),
                        source,
                    })?,
                );
            }
        }
        out.extend(found);
    }
    Ok(out)
}

/// Shapes of `layers` for the given input shape, by typing the backbone with them as outputs.
fn layer_shapes(
    imported: &import::Imported,
    layers: &[String],
    given: Option<Vec<usize>>,
) -> Result<Vec<LayerShape>> {
    let mut model = imported.model.clone();
    model
        .select_outputs_by_name(layers)
        .map_err(tract("select the layers"))?;
    fix_input(&mut model, given, &mut vec![])?;
    let typed = model
        .into_typed()
        .map_err(tract("infer the layers' shapes"))?;
    typed
        .outputs
        .iter()
        .zip(layers)
        .map(|(o, name)| {
            let fact = typed.outlet_fact(*o).map_err(tract("read a layer shape"))?;
            match fact.shape.as_concrete() {
                Some(&[1, c, h, w]) => Ok(LayerShape {
                    channels: c,
                    height: h,
                    width: w,
                }),
                other => Err(opt(format!(
                    "layer '{name}' has shape {other:?}; a feature map [1, C, H, W] is needed"
                ))),
            }
        })
        .collect()
}

/// Largest patch distance of each image (the raw image score).
fn raw_scores(model: &Model, spec: &AnomalySpec, images: &[PathBuf]) -> Result<Vec<f32>> {
    images
        .iter()
        .map(|p| {
            let img = preprocess::load(p)?;
            let out = model.run(vec![model.image_tensor(&img)?])?;
            let (h, w) = match out[0].shape() {
                [.., h, w] => (*h, *w),
                _ => (1, out[0].len()),
            };
            Ok(neo_runtime::anomaly::image_score(
                spec,
                &tensor_to_f32(&out[0])?,
                h,
                w,
            ))
        })
        .collect()
}

/// Threshold maximizing F1 (defects positive) over the midpoints between sorted scores.
fn best_f1_threshold(good: &[f32], bad: &[f32]) -> (f32, f64) {
    let mut all: Vec<f32> = good.iter().chain(bad).copied().collect();
    all.sort_by(f32::total_cmp);
    let mut best = (all[0], -1.0);
    for w in all.windows(2) {
        let t = 0.5 * (w[0] + w[1]);
        let tp = bad.iter().filter(|s| **s > t).count() as f64;
        let fp = good.iter().filter(|s| **s > t).count() as f64;
        let fneg = bad.len() as f64 - tp;
        let f1 = if tp == 0.0 {
            0.0
        } else {
            2.0 * tp / (2.0 * tp + fp + fneg)
        };
        if f1 > best.1 {
            best = (t, f1);
        }
    }
    best
}

/// Percentile (0-100) by linear interpolation.
fn percentile(values: &[f32], p: f64) -> f32 {
    let mut v = values.to_vec();
    v.sort_by(f32::total_cmp);
    let pos = (p / 100.0).clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let frac = (pos - lo as f64) as f32;
    v[lo] + (v[hi] - v[lo]) * frac
}

/// Trains a detector and writes it to `opts.compile.output`.
pub fn train_anomaly(opts: &TrainOptions, boards: &Boards) -> Result<TrainReport> {
    let start = Instant::now();
    let backbone = &opts.compile.model;
    if opts.layers.is_empty() {
        return Err(opt(
            "give the backbone layers to use, e.g. --layers stage3,stage5".into(),
        ));
    }
    if opts.aggregation.is_multiple_of(2) {
        return Err(opt(format!(
            "--aggregation must be odd (1, 3, 5 …), not {}",
            opts.aggregation
        )));
    }

    // Images first: a missing folder is the cheapest thing to report.
    let (normal, source) = match &opts.dataset {
        Some(d) => (
            super::dataset::Dataset::open(d, opts.train_good)?.train_good,
            d.display().to_string(),
        ),
        None if opts.normal.is_empty() => {
            return Err(opt(
                "give good images with --normal DIR (or a dataset with --dataset DIR)".into(),
            ))
        }
        None => (
            collect_images(&opts.normal)?,
            opts.normal
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        ),
    };
    if normal.len() < MIN_GOOD_IMAGES {
        return Err(opt(format!(
            "found {} good image(s) in {}; at least {MIN_GOOD_IMAGES} are needed to learn what normal looks like and to set a threshold",
            normal.len(),
            source
        )));
    }
    let defects = match &opts.defects {
        Some(d) => collect_images(std::slice::from_ref(d))?,
        None => vec![],
    };
    let type_folders = match &opts.defect_types {
        Some(d) => Some(super::types::type_folders(d)?),
        None => None,
    };
    // Every tenth good image is held out to set the threshold.
    let (held_out, train): (Vec<_>, Vec<_>) = normal
        .iter()
        .cloned()
        .enumerate()
        .partition(|(i, _)| i % 10 == 9);
    let held_out: Vec<PathBuf> = held_out.into_iter().map(|(_, p)| p).collect();
    let train: Vec<PathBuf> = train.into_iter().map(|(_, p)| p).collect();

    let mut imported = import::import(backbone)?;
    let (card, _) = Card::for_model(backbone, opts.compile.card.as_deref())?;
    let given = opts
        .compile
        .input_shape
        .clone()
        .or(card.input.shape.clone());
    let mut notes = Vec::new();
    if let Some(shape) = &opts.compile.input_shape {
        // Feature layers of a convolutional backbone work at any resolution: take the shape
        // asked for even where the model declares a fixed one.
        let mut proto = imported.proto.clone();
        head::set_input_shape(&mut proto, shape)?;
        imported = import::from_proto(
            proto,
            imported.bytes,
            backbone.parent(),
            &backbone.display().to_string(),
        )?;
        notes.push(format!("backbone input set to {shape:?}"));
    }
    let known = head::tensor_names(&imported.proto);
    if let Some(missing) = opts.layers.iter().find(|l| !known.contains(l)) {
        let outputs: Vec<String> = imported
            .proto
            .graph
            .iter()
            .flat_map(|g| g.output.iter().map(|o| o.name.clone()))
            .collect();
        return Err(opt(format!(
            "the backbone has no layer '{missing}'; its outputs are {outputs:?} (any of its {} intermediate tensor names works too)",
            known.len()
        )));
    }
    let shapes = layer_shapes(&imported, &opts.layers, given)?;

    // Patch feature model.
    let mut patch_proto = imported.proto.clone();
    let (gh, gw, dim) =
        head::add_patch_head(&mut patch_proto, &opts.layers, &shapes, opts.aggregation)?;
    let cells = gh * gw;
    // An int8 bank row: `dim` bytes and its scale.
    let int8_bank = opts.compile.quantize.is_some();
    let row_bytes = if int8_bank { dim + 4 } else { dim * 4 };
    let budget_rows = (opts.memory_budget_mb * 1024.0 * 1024.0 / row_bytes as f64) as usize;
    if budget_rows < cells {
        return Err(opt(format!(
            "a memory budget of {} MB holds {budget_rows} patches of {dim} {}, fewer than one image's {cells}; raise --memory-budget to at least {:.1}",
            opts.memory_budget_mb,
            if int8_bank { "int8 values" } else { "floats" },
            (cells * row_bytes) as f64 / (1024.0 * 1024.0)
        )));
    }
    // The backbone with a head, compiled like any model (the source hash stays the backbone's).
    let compile_proto = |proto, opts: &CompileOptions, spec: Option<AnomalySpec>| {
        compile_imported(
            import::from_proto(
                proto,
                imported.bytes.clone(),
                backbone.parent(),
                &backbone.display().to_string(),
            )?,
            opts,
            boards,
            spec,
        )
    };
    let mut feature_opts = opts.compile.clone();
    // The bank is built from f32 features; only the detector's backbone is quantized, so
    // int8 and f32 detectors share the bank and can be compared.
    feature_opts.quantize = None;
    // Explicit outputs: a card's `[output] names` describe the backbone, not this head.
    feature_opts.outputs = vec![head::PATCHES.to_string()];
    feature_opts.task = Some(Task::Features);
    feature_opts.labels = None;
    let features = compile_proto(patch_proto.clone(), &feature_opts, None)?;
    notes.extend(features.notes.iter().cloned());

    let mut bank_source = Vec::with_capacity(train.len() * cells * dim);
    for p in &train {
        let img = preprocess::load(p)?;
        let out = features
            .model
            .run(vec![features.model.image_tensor(&img)?])?;
        bank_source.extend(tensor_to_f32(&out[0])?);
    }
    let patches = bank_source.len() / dim;
    let wanted = ((patches as f64 * opts.coreset_ratio).ceil() as usize).max(1);
    let rows = wanted.min(budget_rows);
    if rows < wanted {
        notes.push(format!(
            "memory budget caps the bank at {rows} patches (coreset ratio asked {wanted})"
        ));
    }
    let picks = greedy_k_center(&bank_source, dim, rows, 128);
    let mut bank = Vec::with_capacity(picks.len() * dim);
    for i in &picks {
        bank.extend_from_slice(&bank_source[i * dim..(i + 1) * dim]);
    }
    drop(bank_source);

    // Detector: the same head plus the nearest-neighbour search. Quantized, the bank is int8
    // per row (norms taken from the int8 rows, so distances stay consistent; the artifact
    // stores it packed); the f32 detector it is checked against keeps the f32 bank.
    let mut f32_proto = patch_proto.clone();
    head::add_knn(&mut f32_proto, &bank, picks.len(), dim, (gh, gw))?;
    let mut detector_proto = patch_proto;
    if int8_bank {
        let int8_rows = head::int8_rows(&bank, dim);
        head::add_knn(&mut detector_proto, &int8_rows, picks.len(), dim, (gh, gw))?;
        notes.push(format!(
            "memory bank: {} rows of {dim} stored int8 per row ({:.2} MiB, f32 would be {:.2})",
            picks.len(),
            (picks.len() * row_bytes) as f64 / (1024.0 * 1024.0),
            (picks.len() * dim * 4) as f64 / (1024.0 * 1024.0)
        ));
    } else {
        detector_proto = f32_proto.clone();
    }
    let mut det_opts = opts.compile.clone();
    if let Some(q) = det_opts.quantize.as_mut() {
        // The bank is quantized above, per row, with norms to match.
        q.exclude_prefixes.push("neo_knn/".into());
    }
    det_opts.name = opts.compile.name.clone().or_else(|| {
        opts.compile
            .output
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
    });
    det_opts.outputs = vec![ANOMALY_MAP.to_string()];
    if type_folders.is_some() {
        // The defect-type head reads the patch features beside the map.
        det_opts.outputs.push(head::PATCHES.to_string());
    }
    det_opts.task = Some(Task::Anomaly);
    det_opts.labels = None;
    let spec = AnomalySpec {
        map_output: ANOMALY_MAP.into(),
        layers: opts.layers.clone(),
        feature_dim: dim,
        aggregation: opts.aggregation,
        memory_rows: picks.len(),
        threshold: 1.0,
        threshold_method: String::new(),
        training_images: train.len(),
        score_border: opts.score_border,
        score_top_k: opts.score_top_k,
        defect_types: None,
    };
    let detector = compile_proto(detector_proto, &det_opts, Some(spec.clone()))?;

    let good_scores = raw_scores(&detector.model, &spec, &held_out)?;
    let defect_scores = raw_scores(&detector.model, &spec, &defects)?;
    let choose = |good: &[f32], bad: &[f32]| {
        if bad.is_empty() {
            percentile(good, opts.percentile)
        } else {
            best_f1_threshold(good, bad).0
        }
    };
    // An int8 detector is held against the same detector in f32 (same bank): AUROC and
    // threshold, on the held-out good and the defective images.
    let mut detector = detector;
    if let (Some(q), Some(report)) = (&det_opts.quantize, detector.quantization.as_mut()) {
        let mut f32_opts = det_opts.clone();
        f32_opts.quantize = None;
        let reference = compile_proto(f32_proto, &f32_opts, Some(spec.clone()))?;
        let good32 = raw_scores(&reference.model, &spec, &held_out)?;
        let bad32 = raw_scores(&reference.model, &spec, &defects)?;
        let labels: Vec<bool> = good32
            .iter()
            .map(|_| false)
            .chain(bad32.iter().map(|_| true))
            .collect();
        let auc = |g: &[f32], b: &[f32]| {
            (!b.is_empty()).then(|| {
                let all: Vec<f32> = g.iter().chain(b).copied().collect();
                super::eval::auroc(&all, &labels)
            })
        };
        let (auroc_f32, auroc_int8) = (auc(&good32, &bad32), auc(&good_scores, &defect_scores));
        let (t32, t8) = (
            choose(&good32, &bad32),
            choose(&good_scores, &defect_scores),
        );
        let max_change = good32
            .iter()
            .chain(&bad32)
            .zip(good_scores.iter().chain(&defect_scores))
            .map(|(a, b)| ((b - a) / a.abs().max(1e-12)).abs() as f64)
            .fold(0.0, f64::max);
        let passed = match (auroc_f32, auroc_int8) {
            (Some(a), Some(b)) => a - b <= q.max_auroc_drop + 1e-12,
            _ => true,
        };
        let agreement = crate::quantize::AnomalyAgreement {
            good_images: good32.len(),
            defect_images: bad32.len(),
            auroc_f32,
            auroc_int8,
            max_auroc_drop: q.max_auroc_drop,
            threshold_f32: t32,
            threshold_int8: t8,
            threshold_shift: if t32 > 0.0 && t8.is_finite() {
                (t8 / t32 - 1.0) as f64
            } else {
                0.0
            },
            max_score_change: max_change,
            passed,
        };
        report.anomaly = Some(agreement.clone());
        if !passed {
            return Err(CompileError::AccuracyGate {
                table: report.summary(),
                hint: format!(
                    "the int8 detector's image AUROC drops {:.4} (budget {}): add \
                     --mixed-precision with a stricter --min-cosine, or train without --quantize",
                    auroc_f32.unwrap_or(0.0) - auroc_int8.unwrap_or(0.0),
                    q.max_auroc_drop
                ),
            });
        }
    }
    let (threshold, method) = if defect_scores.is_empty() {
        let t = percentile(&good_scores, opts.percentile);
        (
            t,
            format!(
                "{} percentile of {} held-out good images",
                opts.percentile,
                held_out.len()
            ),
        )
    } else {
        let (t, f1) = best_f1_threshold(&good_scores, &defect_scores);
        (
            t,
            format!(
                "best F1 ({f1:.3}) on {} held-out good and {} defective images",
                held_out.len(),
                defect_scores.len()
            ),
        )
    };
    if !(threshold.is_finite() && threshold > 0.0) {
        return Err(opt(format!(
            "the threshold came out as {threshold}; are the held-out images all identical?"
        )));
    }
    let mut manifest = detector.artifact.manifest.clone();
    let mut files: BTreeMap<String, Vec<u8>> = detector
        .artifact
        .file_names()
        .filter_map(|n| {
            detector
                .artifact
                .file(n)
                .map(|d| (n.to_string(), d.to_vec()))
        })
        .collect();
    if let Some(report) = &detector.quantization {
        let json = serde_json::to_vec_pretty(report)
            .map_err(|e| CompileError::Quantize(format!("writing the report: {e}")))?;
        files.insert(crate::quantize::REPORT_FILE.to_string(), json);
    }
    if let Some(folders) = &type_folders {
        let head = super::types::train_head(&detector.model, &spec, folders)?;
        notes.push(format!(
            "defect types {:?} from {} labelled images: {} accuracy {:.3} ({}/{})",
            head.types.labels,
            head.images,
            head.validation,
            head.cv_correct as f64 / head.images.max(1) as f64,
            head.cv_correct,
            head.images
        ));
        if let Some(a) = manifest.anomaly.as_mut() {
            a.defect_types = Some(head.types);
        }
        // An older runtime would ignore the head and report its patch features as values.
        manifest.format_version =
            manifest
                .format_version
                .max(neo_runtime::manifest::format_version_for(
                    false,
                    false,
                    &manifest.inputs,
                    manifest.anomaly.as_ref(),
                ));
    }
    if let Some(a) = manifest.anomaly.as_mut() {
        a.threshold = threshold;
        a.threshold_method = method;
    }
    let artifact = Artifact::new(manifest, files)?;
    artifact.write(&opts.compile.output)?;
    if let Some(file) = detector.qdq_file.take() {
        file.keep();
    }
    Ok(TrainReport {
        manifest: artifact.manifest,
        notes,
        training_images: train.len(),
        held_out_images: held_out.len(),
        patches,
        held_out_good_scores: good_scores,
        defect_scores,
        seconds: start.elapsed().as_secs_f64(),
        quantization: detector.quantization,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_helpers() {
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0, 5.0], 50.0), 3.0);
        assert!((percentile(&[0.0, 10.0], 99.5) - 9.95).abs() < 1e-5);
        let (t, f1) = best_f1_threshold(&[1.0, 2.0, 3.0], &[5.0, 6.0]);
        assert_eq!((t, f1), (4.0, 1.0));
    }
}
