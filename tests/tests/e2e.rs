//! End-to-end checks on the real models in the shared data folder (`../shared/data`, or
//! `$NEO_DATA`). They are `#[ignore]`d because a fresh clone does not have that folder:
//! `.ci/run` runs them with `cargo test -p neo-e2e -- --ignored` when it is present, and then
//! a missing file is a failure, not a skip.

#![allow(clippy::unwrap_used)]

use neo_boards::Boards;
use neo_runtime::{preprocess, Model};
use neoc::CompileOptions;
use std::path::{Path, PathBuf};

fn data() -> PathBuf {
    std::env::var_os("NEO_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn compile(model: &str, card: &str, out: &Path) -> Model {
    let opts = CompileOptions {
        model: data().join(model),
        target: "x86_64".into(),
        output: out.to_path_buf(),
        card: Some(repo().join("models/cards").join(card)),
        labels: Some(data().join("models/squeezenet1.1/squeeze-labels.txt")),
        ..Default::default()
    };
    let report = neoc::compile(&opts, &Boards::shipped()).expect("compiles");
    assert_eq!(
        report.self_check_max_diff, 0.0,
        "artifact reproduces the source graph"
    );
    Model::load(out).expect("artifact loads")
}

fn top1(model: &Model, image: &str) -> (usize, String, f32) {
    let path = data().join("models/squeezenet1.1/sanity").join(image);
    let bytes = std::fs::read(&path).expect("sanity image");
    let img = preprocess::decode(image, &bytes).unwrap();
    let (preds, _) = model.predict(&img, 1).unwrap();
    let c = &preds[0].top_k[0];
    (c.class, c.label.clone().unwrap_or_default(), c.score)
}

#[test]
#[ignore = "needs ../shared/data (run by .ci/run)"]
fn squeezenet_artifact_classifies_the_sanity_images() {
    let dir = tempfile::tempdir().unwrap();
    let model = compile(
        "models/squeezenet1.1/squeezenet1.1_fp32_derived.onnx",
        "squeezenet1.1.toml",
        &dir.path().join("squeezenet.neo"),
    );
    let (class, label, _) = top1(&model, "bald_eagle.jpeg");
    assert_eq!(class, 22, "{label}");
    assert!(label.contains("bald eagle"));
    assert_eq!(top1(&model, "pelican.jpeg").0, 144);
}

#[test]
#[ignore = "needs ../shared/data (run by .ci/run)"]
fn efficientnet_artifact_classifies_the_sanity_images() {
    let dir = tempfile::tempdir().unwrap();
    let model = compile(
        "models/efficientnet_lite0/efficientnet_lite0_derived.onnx",
        "efficientnet_lite0.toml",
        &dir.path().join("effnet.neo"),
    );
    assert_eq!(model.manifest().outputs.len(), 1, "only logits kept");
    assert_eq!(top1(&model, "bald_eagle.jpeg").0, 22);
    assert_eq!(top1(&model, "pelican.jpeg").0, 144);
}

#[test]
#[ignore = "needs ../shared/data (run by .ci/run)"]
fn bottle_detector_from_good_images_reaches_auroc_099() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bottle-detector.neo");
    let bottle = data().join("images/mvtec_bottle");
    let opts = neoc::anomaly::TrainOptions {
        compile: CompileOptions {
            model: data().join("models/efficientnet_lite0/efficientnet_lite0_derived.onnx"),
            target: "x86_64".into(),
            output: out.clone(),
            card: Some(repo().join("models/cards/efficientnet_lite0.toml")),
            resize: Some(neoc::card::ResizeSpec::Exact([224, 224])),
            ..Default::default()
        },
        layers: vec!["stage3".into(), "stage5".into()],
        normal: vec![bottle.join("train/good")],
        dataset: None,
        train_good: None,
        defects: None,
        memory_budget_mb: 16.0,
        coreset_ratio: 0.02,
        aggregation: 3,
        percentile: 99.5,
        score_border: 0,
    };
    let trained = neoc::anomaly::train_anomaly(&opts, &Boards::shipped()).expect("trains");
    assert_eq!(trained.training_images + trained.held_out_images, 209);
    let report = neoc::anomaly::eval_anomaly(&out, &bottle, None).expect("evaluates");
    assert_eq!(report.images, 83);
    assert!(
        report.image_auroc >= 0.99,
        "image AUROC {}",
        report.image_auroc
    );
}
