//! A loaded, verified, optimized model ready to run on CPU.

use crate::anomaly::{self, AnomalyResult};
use crate::artifact::{Artifact, MODEL_FILE};
use crate::error::{Result, RuntimeError};
use crate::manifest::{DType, Manifest, Scores, Task};
use crate::preprocess;
use image::DynamicImage;
use serde::Serialize;
use std::io::Cursor;
use std::path::Path;
use std::time::{Duration, Instant};
use tract_nnef::prelude::*;

/// One class and its score.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Classification {
    pub class: usize,
    pub label: Option<String>,
    pub score: f32,
}

/// What one output of the model says about one input.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub output: String,
    /// Best classes first (classification outputs only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_k: Vec<Classification>,
    /// The raw values (feature outputs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<f32>>,
    /// Verdict, score and regions (anomaly detectors).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anomaly: Option<AnomalyResult>,
}

/// Time spent in each stage of one inference.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Timings {
    pub preprocess_ms: f64,
    pub inference_ms: f64,
}

/// A model loaded from a `.neo` artifact.
#[derive(Debug)]
pub struct Model {
    manifest: Manifest,
    plan: Arc<TypedSimplePlan>,
    threads: usize,
    load_time: Duration,
}

fn model_err(context: &str) -> impl Fn(TractError) -> RuntimeError + '_ {
    move |e| RuntimeError::Model(format!("{context}: {e:#}"))
}

impl Model {
    /// Reads, verifies and prepares an artifact file, with the board profile's threads (at
    /// most this machine's cores).
    pub fn load(path: &Path) -> Result<Model> {
        Self::load_with_threads(path, None)
    }

    /// Like [`Model::load`], with an explicit thread count (`None`: the board's).
    pub fn load_with_threads(path: &Path, threads: Option<usize>) -> Result<Model> {
        let start = Instant::now();
        let artifact = Artifact::open(path)?;
        let mut model = Self::from_artifact_with_threads(&artifact, threads)?;
        model.load_time = start.elapsed();
        Ok(model)
    }

    /// Prepares a verified artifact: loads the NNEF graph, checks it against the manifest and
    /// optimizes it for this CPU.
    pub fn from_artifact(artifact: &Artifact) -> Result<Model> {
        Self::from_artifact_with_threads(artifact, None)
    }

    /// Threads inference will use: asked for, else the board profile's, never more than this
    /// machine's cores, at least one.
    pub fn threads_for(manifest: &Manifest, asked: Option<usize>) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        asked.unwrap_or(manifest.target.threads).clamp(1, cores)
    }

    /// Like [`Model::from_artifact`], with an explicit thread count (`None`: the board's).
    pub fn from_artifact_with_threads(
        artifact: &Artifact,
        threads: Option<usize>,
    ) -> Result<Model> {
        let start = Instant::now();
        let manifest = artifact.manifest.clone();
        if manifest.sensor.is_some() {
            return Err(RuntimeError::BadManifest(format!(
                "'{}' is a sensor model (no graph to run on images): use `neo-run sensor`, \
                 or `neo_runtime::SensorArtifact` from code",
                manifest.name
            )));
        }
        let nnef_bytes = artifact
            .file(MODEL_FILE)
            .ok_or_else(|| RuntimeError::BadManifest(format!("no {MODEL_FILE} in the artifact")))?;
        let nnef_bytes = crate::int8::unpack(nnef_bytes)?;
        let typed = crate::nnef()
            .model_for_read(&mut Cursor::new(&*nnef_bytes))
            .map_err(model_err("loading the NNEF graph"))?;
        check_against_manifest(&typed, &manifest)?;
        let threads = Self::threads_for(&manifest, threads);
        let options = RunOptions {
            executor: (threads > 1).then(|| {
                tract_linalg::multithread::Executor::multithread_with_name(threads, "neo-infer")
            }),
            ..Default::default()
        };
        let plan = typed
            .into_optimized()
            .map_err(model_err("optimizing the graph"))?
            .into_runnable_with_options(&options)
            .map_err(model_err("planning the graph"))?;
        Ok(Model {
            manifest,
            plan,
            threads,
            load_time: start.elapsed(),
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Where the model input lies in an image of `width` x `height`, as fractions
    /// (x0, y0, x1, y1): the whole image unless the preprocessing crops.
    pub fn input_window(&self, width: u32, height: u32) -> (f32, f32, f32, f32) {
        self.manifest
            .inputs
            .first()
            .and_then(|i| i.preprocess.as_ref())
            .map_or((0.0, 0.0, 1.0, 1.0), |p| {
                anomaly::input_window(p, width, height)
            })
    }

    /// Threads inference runs on.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The int8 kernel this CPU runs the model's `neo_q8_conv` convolutions on (`None`: the
    /// model has none).
    pub fn int8_kernel(&self) -> Option<crate::q8::Kernel> {
        let has = self
            .plan
            .model()
            .nodes()
            .iter()
            .any(|n| n.op_is::<crate::q8::Q8Conv>());
        has.then(crate::q8::Kernel::detect)
    }

    /// What the device should hear about running this model here: an int8-compute model on a
    /// CPU without an int8 dot product runs slower than its f32 form would.
    pub fn warnings(&self) -> Vec<String> {
        match self.int8_kernel() {
            Some(k) if !k.is_dot_product() => vec![format!(
                "the model's int8 convolutions run on the {} kernel here, without an int8 \
                 dot-product instruction (AVX-512 VNNI, Arm dotprod): several times slower \
                 than f32; compile it for a board profile with int8_compute = false (e.g. \
                 x86_64, rpi4)",
                k.name()
            )],
            _ => Vec::new(),
        }
    }

    /// Time `load`/`from_artifact` took (verify + parse + optimize).
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// Runs the model on ready-made input tensors, one per manifest input, in order.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        if inputs.len() != self.manifest.inputs.len() {
            return Err(RuntimeError::Input(format!(
                "the model takes {} inputs, got {}",
                self.manifest.inputs.len(),
                inputs.len()
            )));
        }
        for (t, spec) in inputs.iter().zip(&self.manifest.inputs) {
            if t.shape() != spec.shape.as_slice() {
                return Err(RuntimeError::Input(format!(
                    "input '{}' must have shape {:?}, got {:?}",
                    spec.name,
                    spec.shape,
                    t.shape()
                )));
            }
        }
        let outputs = self
            .plan
            .run(inputs.into_iter().map(|t| t.into_tvalue()).collect())
            .map_err(model_err("running"))?;
        Ok(outputs.into_iter().map(|v| v.into_tensor()).collect())
    }

    /// The input tensor for one image, preprocessed as the manifest says.
    pub fn image_tensor(&self, image: &DynamicImage) -> Result<Tensor> {
        let spec = self.single_input()?;
        let values = preprocess::image_to_input(spec, image)?;
        let tensor = Tensor::from_shape(&spec.shape, &values)
            .map_err(model_err("building the input tensor"))?;
        if spec.dtype == DType::F32 {
            return Ok(tensor);
        }
        tensor
            .cast_to_dt(datum(spec.dtype))
            .map(|t| t.into_owned())
            .map_err(model_err("converting the input tensor"))
    }

    fn single_input(&self) -> Result<&crate::manifest::InputSpec> {
        match self.manifest.inputs.as_slice() {
            [one] => Ok(one),
            many => Err(RuntimeError::Input(format!(
                "image inference needs a model with one input; this one has {}",
                many.len()
            ))),
        }
    }

    /// Preprocesses an image, runs the model and interprets every output.
    pub fn predict(
        &self,
        image: &DynamicImage,
        top_k: usize,
    ) -> Result<(Vec<Prediction>, Timings)> {
        let t0 = Instant::now();
        let input = self.image_tensor(image)?;
        let t1 = Instant::now();
        let outputs = self.run(vec![input])?;
        let t2 = Instant::now();
        let predictions = self.interpret(&outputs, top_k, (image.width(), image.height()))?;
        let timings = Timings {
            preprocess_ms: (t1 - t0).as_secs_f64() * 1e3,
            inference_ms: (t2 - t1).as_secs_f64() * 1e3,
        };
        Ok((predictions, timings))
    }

    /// Turns raw output tensors into predictions, following each output's task. `image_size`
    /// is the original image's (width, height), to place defect regions on it.
    pub fn interpret(
        &self,
        outputs: &[Tensor],
        top_k: usize,
        image_size: (u32, u32),
    ) -> Result<Vec<Prediction>> {
        let types = self
            .manifest
            .anomaly
            .as_ref()
            .and_then(|a| a.defect_types.as_ref());
        // The defect-type head's patch features are read with the map, not reported.
        let type_features = types.and_then(|t| {
            self.manifest
                .outputs
                .iter()
                .zip(outputs)
                .find(|(o, _)| o.name == t.features_output)
                .map(|(_, tensor)| tensor)
        });
        self.manifest
            .outputs
            .iter()
            .zip(outputs)
            .filter(|(spec, _)| types.is_none_or(|t| t.features_output != spec.name))
            .map(|(spec, tensor)| {
                let values = tensor_to_f32(tensor)?;
                Ok(match spec.task {
                    Task::Classification => {
                        let scores = match spec.scores {
                            Some(Scores::Logits) => softmax(&values),
                            _ => values,
                        };
                        Prediction {
                            output: spec.name.clone(),
                            top_k: top_k_of(&scores, top_k, &spec.labels),
                            values: None,
                            anomaly: None,
                        }
                    }
                    Task::Anomaly if self.is_anomaly_map(&spec.name) => {
                        let (h, w) = match tensor.shape() {
                            [.., h, w] => (*h, *w),
                            _ => (1, values.len()),
                        };
                        let pre = self
                            .manifest
                            .inputs
                            .first()
                            .and_then(|i| i.preprocess.as_ref());
                        let analysed = match self.manifest.anomaly.as_ref() {
                            Some(a) => {
                                let mut r = anomaly::analyse(a, pre, &values, h, w, image_size);
                                if let (Some(t), Some(f)) = (a.defect_types.as_ref(), type_features)
                                {
                                    // Read in place: ~120k values every frame.
                                    let view = f
                                        .to_plain_array_view::<f32>()
                                        .map_err(model_err("reading the patch features"))?;
                                    let copied;
                                    let f = match view.as_slice() {
                                        Some(f) => f,
                                        None => {
                                            copied = view.iter().copied().collect::<Vec<f32>>();
                                            &copied
                                        }
                                    };
                                    r.defect_type = anomaly::defect_type(a, t, &values, h, w, f)?;
                                }
                                Some(r)
                            }
                            None => None,
                        };
                        Prediction {
                            output: spec.name.clone(),
                            top_k: vec![],
                            values: None,
                            anomaly: analysed,
                        }
                    }
                    Task::Features | Task::Anomaly => Prediction {
                        output: spec.name.clone(),
                        top_k: vec![],
                        values: Some(values),
                        anomaly: None,
                    },
                })
            })
            .collect()
    }
}

impl Model {
    /// A detector's raw map (values, height, width) and the patch features of
    /// `features_output` from its raw outputs: what the defect-type head reads.
    pub fn map_and_features(
        &self,
        outputs: &[Tensor],
        features_output: &str,
    ) -> Result<(Vec<f32>, usize, usize, Vec<f32>)> {
        let find = |name: &str| {
            self.manifest
                .outputs
                .iter()
                .zip(outputs)
                .find(|(o, _)| o.name == name)
                .map(|(_, t)| t)
                .ok_or_else(|| {
                    RuntimeError::BadManifest(format!("the model has no output '{name}'"))
                })
        };
        let map_name = self
            .manifest
            .anomaly
            .as_ref()
            .map(|a| a.map_output.as_str())
            .ok_or_else(|| {
                RuntimeError::BadManifest("the model is not an anomaly detector".into())
            })?;
        let map = find(map_name)?;
        let (h, w) = match map.shape() {
            [.., h, w] => (*h, *w),
            _ => (1, map.len()),
        };
        Ok((
            tensor_to_f32(map)?,
            h,
            w,
            tensor_to_f32(find(features_output)?)?,
        ))
    }

    fn is_anomaly_map(&self, output: &str) -> bool {
        self.manifest
            .anomaly
            .as_ref()
            .is_some_and(|a| a.map_output == output)
    }
}

/// The graph must take and give exactly what the manifest promises.
fn check_against_manifest(model: &TypedModel, manifest: &Manifest) -> Result<()> {
    let bad = |m: String| RuntimeError::BadManifest(m);
    if model.inputs.len() != manifest.inputs.len() || model.outputs.len() != manifest.outputs.len()
    {
        return Err(bad(format!(
            "the graph has {} inputs and {} outputs, the manifest {} and {}",
            model.inputs.len(),
            model.outputs.len(),
            manifest.inputs.len(),
            manifest.outputs.len()
        )));
    }
    for (ix, spec) in manifest.inputs.iter().enumerate() {
        let fact = model
            .input_fact(ix)
            .map_err(model_err("reading input facts"))?;
        let shape = fact.shape.as_concrete().map(|s| s.to_vec());
        if shape.as_deref() != Some(spec.shape.as_slice()) || fact.datum_type != datum(spec.dtype) {
            return Err(bad(format!(
                "input '{}': graph has {:?} {:?}, manifest says {:?} {:?}",
                spec.name, fact.datum_type, fact.shape, spec.dtype, spec.shape
            )));
        }
    }
    for spec in &manifest.inputs {
        if let Some(k) = spec.preprocess.as_ref().and_then(|p| p.flatten) {
            if k < 3 || k % 2 == 0 {
                return Err(bad(format!(
                    "input '{}': flatten window {k} (it must be odd and at least 3)",
                    spec.name
                )));
            }
        }
    }
    if let Some(a) = &manifest.anomaly {
        if let Some(t) = &a.defect_types {
            let k = t.labels.len();
            // The features output: [cells, feature_dim] where the graph's shape is known.
            let features_fit = manifest
                .outputs
                .iter()
                .position(|o| o.name == t.features_output)
                .is_some_and(|ix| {
                    model.output_fact(ix).is_ok_and(|f| {
                        f.shape
                            .as_concrete()
                            .is_none_or(|s| s.last() == Some(&a.feature_dim))
                    })
                });
            if k < 2
                || t.bias.len() != k
                || t.weights.len() != k * a.feature_dim
                || t.features_output == a.map_output
                || !features_fit
            {
                return Err(bad(format!(
                    "the defect-type head does not fit: {k} labels (at least 2), {} biases, {} weights for {}-value features, features from output '{}' (not the map '{}', last dimension {})",
                    t.bias.len(),
                    t.weights.len(),
                    a.feature_dim,
                    t.features_output,
                    a.map_output,
                    a.feature_dim
                )));
            }
        }
    }
    Ok(())
}

fn datum(d: DType) -> DatumType {
    match d {
        DType::F32 => f32::datum_type(),
        DType::F16 => DatumType::F16,
        DType::U8 => u8::datum_type(),
        DType::I8 => i8::datum_type(),
        DType::I32 => i32::datum_type(),
        DType::I64 => i64::datum_type(),
    }
}

/// A tensor's values as f32, whatever its numeric type.
pub fn tensor_to_f32(tensor: &Tensor) -> Result<Vec<f32>> {
    let t = tensor
        .cast_to::<f32>()
        .map_err(model_err("reading a tensor"))?;
    let view = t
        .to_plain_array_view::<f32>()
        .map_err(model_err("reading a tensor"))?;
    Ok(view.iter().copied().collect())
}

/// Numerically stable softmax.
pub fn softmax(values: &[f32]) -> Vec<f32> {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = values.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// The `k` best classes, best first; NaN scores sort last.
pub fn top_k_of(scores: &[f32], k: usize, labels: &[String]) -> Vec<Classification> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]));
    order.retain(|i| !scores[*i].is_nan());
    order
        .into_iter()
        .take(k)
        .map(|class| Classification {
            class,
            label: labels.get(class).cloned(),
            score: scores[class],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let s = softmax(&[1.0, 3.0, 2.0]);
        assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(s[1] > s[2] && s[2] > s[0]);
        // Large logits do not overflow.
        let s = softmax(&[1000.0, 0.0]);
        assert!((s[0] - 1.0).abs() < 1e-6 && s.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn top_k_is_best_first_with_labels() {
        let labels = vec!["a".to_string(), "b".to_string()];
        let top = top_k_of(&[0.1, 0.7, f32::NAN, 0.2], 3, &labels);
        assert_eq!(top.iter().map(|c| c.class).collect::<Vec<_>>(), [1, 3, 0]);
        assert_eq!(top[0].label.as_deref(), Some("b"));
        assert_eq!(top[1].label, None);
    }
}
