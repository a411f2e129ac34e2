//! `neoc compile`: ONNX → decluttered tract graph → NNEF → verified `.neo` artifact.

use crate::card::{Card, ResizeSpec, SizeSpec};
use crate::error::{tract, CompileError, Result};
use crate::import::{self, Imported};
use crate::quantize::{self, QuantReport};
use neo_boards::{BoardProfile, Boards};
use neo_runtime::artifact::{sha256_hex, MODEL_FILE};
use neo_runtime::manifest::*;
use neo_runtime::{Artifact, Model, TRACT_VERSION};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

/// What the user asked for: flags, each overriding the model card.
#[derive(Debug, Clone, Default)]
pub struct CompileOptions {
    pub model: PathBuf,
    pub target: String,
    pub output: PathBuf,
    pub card: Option<PathBuf>,
    pub name: Option<String>,
    pub input_shape: Option<Vec<usize>>,
    pub layout: Option<Layout>,
    pub resize: Option<ResizeSpec>,
    pub crop: Option<SizeSpec>,
    pub interpolation: Option<Interpolation>,
    pub channels: Option<ChannelOrder>,
    pub scale: Option<f32>,
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    /// Per-image standardization (ORed with the card's).
    pub standardize: bool,
    /// Local-mean subtraction window (overrides the card's).
    pub flatten: Option<u32>,
    pub outputs: Vec<String>,
    pub task: Option<Task>,
    pub scores: Option<Scores>,
    pub labels: Option<PathBuf>,
    /// `--quantize int8 --calibration DIR …`: calibrated int8 with an accuracy gate.
    pub quantize: Option<crate::quantize::QuantizeOptions>,
}

/// What a compile did.
#[derive(Debug)]
pub struct CompileReport {
    pub manifest: Manifest,
    pub artifact_bytes: u64,
    /// Notes the user should read (defaults taken, shapes fixed).
    pub notes: Vec<String>,
    /// Max abs difference between the source graph and the reloaded artifact on a test input.
    pub self_check_max_diff: f32,
    pub seconds: f64,
    /// What quantization did (`--quantize`).
    pub quantization: Option<QuantReport>,
}

/// Compiles one model for one board and writes the artifact.
pub fn compile(opts: &CompileOptions, boards: &Boards) -> Result<CompileReport> {
    let start = Instant::now();
    let compiled = compile_imported(import::import(&opts.model)?, opts, boards, None)?;
    compiled.artifact.write(&opts.output)?;
    if let Some(file) = compiled.qdq_file {
        file.keep();
    }
    Ok(CompileReport {
        manifest: compiled.artifact.manifest,
        artifact_bytes: compiled.bytes,
        notes: compiled.notes,
        self_check_max_diff: compiled.self_check_max_diff,
        seconds: start.elapsed().as_secs_f64(),
        quantization: compiled.quantization,
    })
}

/// A compiled, self-checked artifact in memory, with the device model it loads as.
pub struct Compiled {
    pub artifact: Artifact,
    pub model: Model,
    pub bytes: u64,
    pub notes: Vec<String>,
    pub self_check_max_diff: f32,
    pub quantization: Option<QuantReport>,
    /// The QDQ export, removed if this compile is dropped without being kept.
    pub qdq_file: Option<quantize::qdq::Written>,
}

/// Compiles an imported model (from a file, or edited in memory) into an artifact; `anomaly`
/// is stored in the manifest of detectors. `opts.output` is not written.
pub fn compile_imported(
    imported: Imported,
    opts: &CompileOptions,
    boards: &Boards,
    anomaly: Option<AnomalySpec>,
) -> Result<Compiled> {
    let board = boards.get(&opts.target)?.clone();
    let (card, card_path) = Card::for_model(&opts.model, opts.card.as_deref())?;
    let mut notes = Vec::new();
    if let Some(p) = &card_path {
        notes.push(format!("model card: {}", p.display()));
    }

    let Imported {
        proto,
        mut model,
        bytes,
    } = imported;
    let graph = proto.graph.as_ref().ok_or_else(|| CompileError::NotOnnx {
        path: opts.model.display().to_string(),
        reason: "no graph".into(),
    })?;

    // Outputs to keep.
    let wanted = if !opts.outputs.is_empty() {
        Some(opts.outputs.clone())
    } else {
        card.output.names.clone()
    };
    if let Some(names) = &wanted {
        model.select_outputs_by_name(names).map_err(|_| {
            let have: Vec<String> =
                graph.output.iter().map(|o| o.name.clone()).collect();
            CompileError::Options(format!(
                "output {names:?} not found; the model's outputs are {have:?} (intermediate tensors can be named too)"
            ))
        })?;
    }

    // Input shape: fixed, or given.
    if model.inputs.len() != 1 {
        return Err(CompileError::Options(format!(
            "the model has {} inputs; neoc supports single-input image models for now",
            model.inputs.len()
        )));
    }
    let given = opts.input_shape.clone().or(card.input.shape.clone());
    let (input_name, shape, dt) = fix_input(&mut model, given, &mut notes)?;
    let dtype = dtype_of(dt)?;

    // The parsed ONNX graph, kept for the QDQ export (which edits the ONNX itself).
    let onnx_model = opts
        .quantize
        .as_ref()
        .and_then(|q| q.emit_qdq.as_ref())
        .map(|_| model.clone());
    let raw = model
        .into_typed()
        .map_err(tract("infer the graph's types and shapes"))?;
    let typed = raw
        .clone()
        .into_decluttered()
        .map_err(tract("declutter the graph"))?;

    // Input spec with preprocessing.
    let layout = opts.layout.or(card.input.layout);
    let input = input_spec(opts, &card, input_name, shape, dtype, layout, &mut notes)?;

    // Output specs.
    let labels_path = opts.labels.clone().or(card.output.labels.clone());
    let labels = match &labels_path {
        Some(p) => read_labels(p)?,
        None => vec![],
    };
    let mut outputs = Vec::new();
    for (ix, outlet) in typed.outputs.iter().enumerate() {
        let fact = typed
            .outlet_fact(*outlet)
            .map_err(tract("read the output shapes"))?;
        let name = typed
            .outlet_label(*outlet)
            .map(str::to_string)
            .unwrap_or_else(|| typed.node(outlet.node).name.clone());
        let shape: Vec<usize> = fact
            .shape
            .as_concrete()
            .ok_or_else(|| CompileError::Options(format!("output '{name}' has no fixed shape")))?
            .to_vec();
        let classes: usize = shape.iter().skip(1).product();
        let vector_like = shape.iter().filter(|d| **d > 1).count() == 1;
        let task = match (ix, opts.task.or(card.output.task)) {
            (0, Some(t)) => t,
            _ if vector_like => Task::Classification,
            _ => Task::Features,
        };
        let mut spec = OutputSpec {
            name: name.clone(),
            shape,
            dtype: dtype_of(fact.datum_type)?,
            task,
            scores: None,
            labels: vec![],
        };
        if task == Task::Classification {
            spec.scores = Some(opts.scores.or(card.output.scores).unwrap_or_else(|| {
                if import::output_is_softmax(graph, &name) {
                    Scores::Probabilities
                } else {
                    Scores::Logits
                }
            }));
            if !labels.is_empty() {
                if labels.len() != classes {
                    return Err(CompileError::Options(format!(
                        "the labels file has {} labels but output '{name}' has {classes} classes",
                        labels.len()
                    )));
                }
                spec.labels = labels.clone();
            }
        }
        outputs.push(spec);
    }

    // Check that the graph optimizes here as it will on the device, and keep the plan as the
    // reference for the self-check.
    let reference = typed
        .clone()
        .into_optimized()
        .map_err(tract("optimize the graph"))?
        .into_runnable()
        .map_err(tract("plan the graph"))?;

    let nnef = neo_runtime::nnef();
    let write_nnef = |model: &TypedModel| {
        nnef.write_to_tar_with_config(model, Vec::new(), false, true)
            .map_err(tract("write the graph as NNEF"))
    };
    let nnef_bytes;
    let mut files = BTreeMap::new();
    let mut quantization = None;
    let mut qdq_file = None;
    let mut precision = "f32".to_string();
    // What the reloaded artifact must reproduce: the f32 plan, or the quantized graph's.
    let mut expected_plan = reference.clone();
    if let Some(q) = &opts.quantize {
        // int8 compute rewrites convolutions before decluttering splits and reshapes them.
        let (scheme, _, _) = quantize::scheme_for(&board, q.int8_compute);
        let source = if scheme == quantize::SCHEME_INT8_COMPUTE {
            &quantize::compute::prepare(&raw)?
        } else {
            &typed
        };
        let mut quantized = quantize::quantize(source, &reference, &input, &outputs, &board, q)?;
        let (bytes, packed) = neo_runtime::int8::pack(&write_nnef(&quantized.model)?, 64)?;
        quantized.report.packed_tensors = packed.len();
        // The same graph with every tensor as f32: what the device unpacks it to (int8
        // compute keeps int8 on the device: there, the f32 graph itself).
        quantized.report.graph_bytes_f32 = if scheme == quantize::SCHEME_INT8_COMPUTE {
            write_nnef(&typed)?.len() as u64
        } else {
            neo_runtime::int8::unpack(&bytes)?.len() as u64
        };
        quantized.report.graph_bytes = bytes.len() as u64;
        nnef_bytes = bytes;
        expected_plan = quantized.plan.clone();
        precision = quantized.report.scheme.clone();
        if let (Some(path), Some(onnx_model)) = (&q.emit_qdq, &onnx_model) {
            let f32_layers = quantized.report.info().f32_layers;
            quantized.report.qdq = Some(quantize::qdq::export(
                &proto,
                onnx_model,
                &quantized.set.calibration,
                &quantize::qdq::ExportPlan {
                    method: q.method,
                    style: q
                        .qdq_style
                        .unwrap_or_else(|| quantize::qdq::QdqStyle::for_board(&board)),
                    f32_layers: &f32_layers,
                    bias_shifts: &quantized.bias_shifts,
                },
                path,
            )?);
            qdq_file = Some(quantize::qdq::Written::new(path));
            let holdout: Vec<Tensor> = quantized
                .set
                .holdout
                .iter()
                .map(|(_, t)| t.clone())
                .collect();
            if let Some(summary) = quantized.report.qdq.as_mut() {
                summary.accuracy = quantize::qdq::check(
                    path,
                    &input.shape,
                    &outputs,
                    &holdout,
                    &reference,
                    q.budget,
                )?;
            }
        }
        let json = serde_json::to_vec_pretty(&quantized.report)
            .map_err(|e| CompileError::Quantize(format!("writing the report: {e}")))?;
        files.insert(quantize::REPORT_FILE.to_string(), json);
        quantization = Some(quantized.report);
    } else {
        nnef_bytes = write_nnef(&typed)?;
    }
    files.insert(MODEL_FILE.to_string(), nnef_bytes);

    let name = opts
        .name
        .clone()
        .or(card.name.clone())
        .unwrap_or_else(|| file_stem(&opts.model));
    let manifest = Manifest {
        format_version: neo_runtime::manifest::format_version_for(
            quantization.as_ref().is_some_and(|q| q.packed_tensors > 0),
            quantization
                .as_ref()
                .is_some_and(|q| q.scheme == quantize::SCHEME_INT8_COMPUTE),
            std::slice::from_ref(&input),
            anomaly.as_ref(),
        ),
        name,
        compiler: compiler_info(),
        source: SourceInfo {
            file: opts
                .model
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            format: "onnx".into(),
            sha256: sha256_hex(&bytes),
            bytes: bytes.len() as u64,
        },
        target: TargetInfo {
            precision,
            ..target_info(&board)
        },
        inputs: vec![input],
        outputs,
        files: BTreeMap::new(),
        anomaly,
        sensor: None,
        quantization: quantization.as_ref().map(QuantReport::info),
    };
    let artifact = Artifact::new(manifest, files)?;
    let artifact_bytes = artifact.to_bytes()?;

    // Self-check: the artifact as the device will load it must agree with the source graph.
    let reloaded = Artifact::from_bytes("compiled artifact", &artifact_bytes)?;
    let device_model = Model::from_artifact(&reloaded)?;
    let test_input = test_input(&reloaded.manifest.inputs[0])?;
    let expected = expected_plan
        .run(tvec!(test_input.clone().into_tvalue()))
        .map_err(tract("run the source graph"))?;
    let got = device_model.run(vec![test_input])?;
    let mut max_diff = 0f32;
    for ((e, g), spec) in expected.iter().zip(&got).zip(&reloaded.manifest.outputs) {
        let (e, g) = (as_f32(e)?, as_f32(g)?);
        let scale = e.iter().fold(1f32, |m, v| m.max(v.abs()));
        let diff = e
            .iter()
            .zip(&g)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        if diff.is_nan() || diff > 1e-4 * scale {
            return Err(CompileError::Mismatch {
                output: spec.name.clone(),
                diff,
            });
        }
        max_diff = max_diff.max(diff);
    }

    Ok(Compiled {
        artifact: reloaded,
        model: device_model,
        bytes: artifact_bytes.len() as u64,
        notes,
        self_check_max_diff: max_diff,
        quantization,
        qdq_file,
    })
}

fn file_stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// Who wrote an artifact: this neoc, and the tract it imported the graph with.
pub(crate) fn compiler_info() -> CompilerInfo {
    CompilerInfo {
        name: "neoc".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        tract_version: TRACT_VERSION.into(),
    }
}

pub(crate) fn target_info(board: &BoardProfile) -> TargetInfo {
    TargetInfo {
        board: board.name.clone(),
        triple: board.triple.clone(),
        cpu: board.cpu.clone(),
        // Quantized schemes arrive with `--quantize`; everything compiles to f32 for now.
        precision: "f32".into(),
        threads: board.threads,
        memory_budget_mb: board.memory_budget_mb,
    }
}

/// Fixes the model's first input to a concrete shape (see [`resolve_shape`]), keeping its
/// element type; returns the input's name, shape and type.
pub(crate) fn fix_input(
    model: &mut InferenceModel,
    given: Option<Vec<usize>>,
    notes: &mut Vec<String>,
) -> Result<(String, Vec<usize>, DatumType)> {
    let name = model.node(model.inputs[0].node).name.clone();
    let dims = import::input_dims(model, 0)?;
    let shape = resolve_shape(&name, &dims, given, notes)?;
    let dt = model
        .input_fact(0)
        .map_err(tract("read the input type"))?
        .datum_type
        .concretize()
        .unwrap_or(f32::datum_type());
    model
        .set_input_fact(0, InferenceFact::dt_shape(dt, shape.clone()))
        .map_err(tract("set the input shape"))?;
    Ok((name, shape, dt))
}

pub(crate) fn resolve_shape(
    name: &str,
    dims: &[Option<usize>],
    given: Option<Vec<usize>>,
    notes: &mut Vec<String>,
) -> Result<Vec<usize>> {
    if let Some(shape) = given {
        let fits = shape.len() == dims.len()
            && shape
                .iter()
                .zip(dims)
                .all(|(s, d)| d.is_none_or(|d| d == *s));
        if !fits {
            return Err(CompileError::Options(format!(
                "--input-shape {shape:?} does not fit input '{name}' of shape {}",
                import::format_dims(dims, "?")
            )));
        }
        return Ok(shape);
    }
    if dims.iter().all(Option::is_some) {
        return Ok(dims.iter().flatten().copied().collect());
    }
    // A symbolic batch dimension alone is common and unambiguous: compile for batch 1.
    if dims.len() > 1 && dims[0].is_none() && dims[1..].iter().all(Option::is_some) {
        notes.push(format!(
            "input '{name}' has a dynamic batch dimension {}: compiled for batch 1 (use --input-shape to change)",
            import::format_dims(dims, "N")
        ));
        let mut shape = vec![1];
        shape.extend(dims[1..].iter().flatten());
        return Ok(shape);
    }
    let hint: Vec<String> = dims
        .iter()
        .enumerate()
        .map(|(i, d)| {
            d.map_or(if i == 0 { "1".into() } else { "224".into() }, |d| {
                d.to_string()
            })
        })
        .collect();
    Err(CompileError::DynamicShape {
        name: name.to_string(),
        shape: import::format_dims(dims, "?"),
        hint: hint.join(","),
    })
}

fn dtype_of(dt: DatumType) -> Result<DType> {
    Ok(match dt {
        DatumType::F32 => DType::F32,
        DatumType::F16 => DType::F16,
        DatumType::U8 => DType::U8,
        DatumType::I8 => DType::I8,
        DatumType::I32 => DType::I32,
        DatumType::I64 => DType::I64,
        other => {
            return Err(CompileError::Options(format!(
                "tensors of type {other:?} are not supported"
            )))
        }
    })
}

#[allow(clippy::too_many_arguments)]
fn input_spec(
    opts: &CompileOptions,
    card: &Card,
    name: String,
    shape: Vec<usize>,
    dtype: DType,
    layout: Option<Layout>,
    notes: &mut Vec<String>,
) -> Result<InputSpec> {
    let pre = &card.preprocess;
    let opt = |msg: String| CompileError::Options(msg);
    if shape.len() != 4 {
        return Err(opt(format!(
            "input '{name}' of shape {shape:?} is not an image (N,C,H,W or N,H,W,C); neoc compiles image models for now"
        )));
    }
    let layout = match layout {
        Some(l) => l,
        None if matches!(shape[1], 1 | 3) => Layout::Nchw,
        None if matches!(shape[3], 1 | 3) => Layout::Nhwc,
        None => {
            return Err(opt(format!(
                "cannot tell the layout of input shape {shape:?}; pass --layout NCHW or NHWC"
            )))
        }
    };
    let (c, h, w) = match layout {
        Layout::Nchw => (shape[1], shape[2], shape[3]),
        Layout::Nhwc => (shape[3], shape[1], shape[2]),
    };
    let channels = match opts.channels.or(pre.channels) {
        Some(ch) => ch,
        None if c == 1 => ChannelOrder::Gray,
        None => ChannelOrder::Rgb,
    };
    if channels.count() != c {
        return Err(opt(format!(
            "channel order {channels:?} gives {} channels but the input has {c}",
            channels.count()
        )));
    }
    let (w32, h32) = (w as u32, h as u32);
    let resize = opts.resize.or(pre.resize).map(ResizeSpec::to_resize);
    let crop = opts.crop.or(pre.crop).map(SizeSpec::wh);
    let resize = match (resize, crop) {
        (Some(r), _) => r,
        (None, None) => Resize::Exact {
            width: w32,
            height: h32,
        },
        (None, Some(_)) => {
            return Err(opt(
                "--crop needs --resize (e.g. --resize 256 --crop 224)".into()
            ))
        }
    };
    match (resize, crop) {
        (_, Some(cr)) if cr != [w32, h32] => {
            return Err(opt(format!("crop {}x{} must equal the input size {w}x{h}", cr[0], cr[1])))
        }
        (Resize::Exact { width, height }, None) if (width, height) != (w32, h32) => {
            return Err(opt(format!(
                "resize to {width}x{height} does not give the input size {w}x{h}; add --crop {w}x{h}"
            )))
        }
        (Resize::ShorterSide { size }, None) => {
            return Err(opt(format!(
                "resizing the shorter side to {size} gives a variable size; add --crop {w}x{h}"
            )))
        }
        _ => {}
    }
    let explicit_norm = opts.mean.is_some()
        || opts.std.is_some()
        || opts.scale.is_some()
        || pre.mean.is_some()
        || pre.std.is_some()
        || pre.scale.is_some();
    if !explicit_norm {
        notes.push(
            "no --mean/--std/--scale given: the model receives raw 0..255 pixel values".into(),
        );
    }
    let mean = opts
        .mean
        .clone()
        .or(pre.mean.clone())
        .unwrap_or(vec![0.0; c]);
    let std = opts.std.clone().or(pre.std.clone()).unwrap_or(vec![1.0; c]);
    let scale = opts.scale.or(pre.scale).unwrap_or(1.0);
    let flatten = opts.flatten.or(pre.flatten);
    if let Some(k) = flatten.filter(|&k| k < 3 || k.is_multiple_of(2)) {
        return Err(opt(format!(
            "a flatten window of {k} pixels: use an odd size of 3 or more, wider than the defects and narrower than the lighting changes (e.g. 15)"
        )));
    }
    if mean.len() != c || std.len() != c {
        return Err(opt(format!(
            "--mean and --std need {c} values each (one per channel)"
        )));
    }
    if std.contains(&0.0) || scale == 0.0 {
        return Err(opt("--std and --scale values must not be zero".into()));
    }
    Ok(InputSpec {
        name,
        shape,
        dtype,
        layout,
        preprocess: Some(Preprocess {
            resize,
            interpolation: opts
                .interpolation
                .or(pre.interpolation)
                .unwrap_or(Interpolation::Bilinear),
            crop,
            channels,
            scale,
            mean,
            std,
            standardize: opts.standardize || pre.standardize.unwrap_or(false),
            flatten,
        }),
    })
}

fn read_labels(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|source| CompileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

/// A deterministic input in the range preprocessing produces (pixels 0..255 normalized).
fn test_input(spec: &InputSpec) -> Result<Tensor> {
    let count: usize = spec.shape.iter().product();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let values: Vec<f32> = (0..count)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let pixel = (state % 256) as f32;
            match &spec.preprocess {
                Some(p) => {
                    let c = i % p.mean.len();
                    (pixel * p.scale - p.mean[c]) / p.std[c]
                }
                None => pixel / 255.0,
            }
        })
        .collect();
    let t = Tensor::from_shape(&spec.shape, &values).map_err(tract("build a test input"))?;
    let dt = match spec.dtype {
        DType::F16 => DatumType::F16,
        _ => DatumType::F32,
    };
    t.cast_to_dt(dt)
        .map(|c| c.into_owned())
        .map_err(tract("build a test input"))
}

fn as_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(neo_runtime::tensor_to_f32(t)?)
}
