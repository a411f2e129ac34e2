//! `neoc` end to end on the fixtures shipped in `models/`: the real bottle classifier compiles,
//! inspects and classifies its held-out samples; bad input gets one clear line and exit 1.

#![allow(clippy::unwrap_used)]

use neo_runtime::{preprocess, Model};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn neoc(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_neoc"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts a failed run with exactly one `error:` line containing every `needle`.
fn assert_clear_error(args: &[&str], needles: &[&str]) {
    let (code, _, stderr) = neoc(args);
    assert_eq!(code, 1, "expected failure for {args:?}: {stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for n in needles {
        assert!(errors[0].contains(n), "missing '{n}' in: {stderr}");
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn shipped_bottle_classifier_compiles_and_classifies_its_samples() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bottle.neo");
    let model = repo().join("models/bottle-classifier/model.onnx");
    let (code, _, stderr) = neoc(&[
        "compile",
        path_str(&model),
        "--target",
        "rpi4",
        "-o",
        path_str(&out),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("dynamic batch dimension"),
        "batch note: {stderr}"
    );

    let (code, stdout, stderr) = neoc(&["inspect", path_str(&out)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("bottle-classifier (artifact format v1)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("rpi4 (aarch64-unknown-linux-gnu"),
        "{stdout}"
    );
    assert!(stdout.contains("Conv"), "op histogram: {stdout}");
    // Backbone (stages 1-4 of EfficientNet-Lite0, ~250k weights) plus a 2x160 head.
    let params: u64 = stdout
        .split("parameters ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!((240_000..270_000).contains(&params), "{params}");

    let model = Model::load(&out).unwrap();
    let m = model.manifest();
    assert_eq!(m.inputs[0].shape, [1, 3, 224, 224]);
    assert_eq!(m.outputs[0].labels, ["good", "defect"]);
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("models/bottle-classifier/holdout.json")).unwrap(),
    )
    .unwrap();
    let samples = expected["samples"].as_object().unwrap();
    assert_eq!(samples.len(), 5);
    for (file, want) in samples {
        let bytes = std::fs::read(repo().join("models/samples").join(file)).unwrap();
        let img = preprocess::decode(file, &bytes).unwrap();
        let (preds, _) = model.predict(&img, 2).unwrap();
        let top = &preds[0].top_k[0];
        assert_eq!(top.label.as_deref(), want.as_str(), "{file}: {preds:?}");
        assert!(top.score > 0.9, "{file} confidently classified: {preds:?}");
    }
}

#[test]
fn compiling_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let model = repo().join("models/fixtures/tiny_conv.onnx");
    let a = dir.path().join("a.neo");
    let b = dir.path().join("b.neo");
    for out in [&a, &b] {
        let (code, _, stderr) = neoc(&[
            "compile",
            path_str(&model),
            "-t",
            "x86_64",
            "-o",
            path_str(out),
        ]);
        assert_eq!(code, 0, "{stderr}");
    }
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

#[test]
fn a_file_that_is_not_onnx_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("model.onnx");
    std::fs::write(&fake, "this is a text file, not a model\n").unwrap();
    let out = dir.path().join("x.neo");
    assert_clear_error(
        &[
            "compile",
            path_str(&fake),
            "-t",
            "x86_64",
            "-o",
            path_str(&out),
        ],
        &["is not an ONNX model"],
    );
    // A PNG is not a model either.
    let png = repo().join("models/samples/bottle_good_000.png");
    assert_clear_error(
        &[
            "compile",
            path_str(&png),
            "-t",
            "x86_64",
            "-o",
            path_str(&out),
        ],
        &["is not an ONNX model"],
    );
    assert!(!out.exists(), "nothing written on failure");
}

#[test]
fn a_truncated_onnx_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(repo().join("models/bottle-classifier/model.onnx")).unwrap();
    let out = dir.path().join("x.neo");
    for keep in [bytes.len() / 2, bytes.len() - 100, 1000] {
        let cut = dir.path().join("cut.onnx");
        std::fs::write(&cut, &bytes[..keep]).unwrap();
        assert_clear_error(
            &[
                "compile",
                path_str(&cut),
                "-t",
                "x86_64",
                "-o",
                path_str(&out),
            ],
            &["cut.onnx"],
        );
    }
}

#[test]
fn an_unsupported_operator_is_named_with_its_node() {
    let model = repo().join("models/fixtures/unsupported_op.onnx");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.neo");
    assert_clear_error(
        &[
            "compile",
            path_str(&model),
            "-t",
            "x86_64",
            "-o",
            path_str(&out),
        ],
        &[
            "unsupported ONNX operator 'Det'",
            "node 'determinant_of_features'",
        ],
    );
}

#[test]
fn a_dynamic_input_shape_needs_input_shape() {
    let model = repo().join("models/fixtures/dynamic_hw.onnx");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.neo");
    assert_clear_error(
        &[
            "compile",
            path_str(&model),
            "-t",
            "x86_64",
            "-o",
            path_str(&out),
        ],
        &["dynamic shape [1,3,?,?]", "--input-shape 1,3,224,224"],
    );
    let (code, _, stderr) = neoc(&[
        "compile",
        path_str(&model),
        "-t",
        "x86_64",
        "-o",
        path_str(&out),
        "--input-shape",
        "1,3,32,48",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        Model::load(&out).unwrap().manifest().inputs[0].shape,
        [1, 3, 32, 48]
    );
    // A shape that contradicts the model's fixed dims is refused.
    assert_clear_error(
        &[
            "compile",
            path_str(&model),
            "-t",
            "x86_64",
            "-o",
            path_str(&out),
            "--input-shape",
            "1,4,32,48",
        ],
        &["does not fit input"],
    );
}

#[test]
fn an_unknown_board_lists_the_known_ones() {
    let model = repo().join("models/fixtures/tiny_conv.onnx");
    assert_clear_error(
        &[
            "compile",
            path_str(&model),
            "-t",
            "rpi3",
            "-o",
            "/tmp/never.neo",
        ],
        &[
            "unknown board 'rpi3'",
            "jetson-orin-nano, rpi4, rpi4-32, rpi5, x86_64",
        ],
    );
}

#[test]
fn inconsistent_preprocessing_and_labels_are_refused() {
    let model = repo().join("models/fixtures/tiny_conv.onnx");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.neo");
    let o = path_str(&out);
    let m = path_str(&model);
    assert_clear_error(
        &["compile", m, "-t", "x86_64", "-o", o, "--resize", "16"],
        &["add --crop 8x8"],
    );
    assert_clear_error(
        &["compile", m, "-t", "x86_64", "-o", o, "--mean", "1,2"],
        &["need 3 values"],
    );
    let labels = dir.path().join("labels.txt");
    std::fs::write(&labels, "a\nb\n").unwrap();
    assert_clear_error(
        &[
            "compile",
            m,
            "-t",
            "x86_64",
            "-o",
            o,
            "--labels",
            path_str(&labels),
        ],
        &["2 labels but output 'y' has 4 classes"],
    );
}

#[test]
fn inspect_refuses_a_changed_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.neo");
    let model = repo().join("models/fixtures/tiny_conv.onnx");
    let (code, _, stderr) = neoc(&[
        "compile",
        path_str(&model),
        "-t",
        "x86_64",
        "-o",
        path_str(&out),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let mut bytes = std::fs::read(&out).unwrap();
    let at = bytes.len() - 1500;
    bytes[at] ^= 0x40;
    std::fs::write(&out, &bytes).unwrap();
    assert_clear_error(&["inspect", path_str(&out)], &["t.neo"]);
}

/// Twelve good training images of different sizes: the two good samples, mirrored, rotated
/// and rescaled (real frames, varied the way a line camera varies them).
fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `dir/few/` with `n` copies of one good sample (too few for training or calibration).
fn copies_of_a_good_sample(dir: &Path, n: usize) -> PathBuf {
    let few = dir.join("few");
    std::fs::create_dir_all(&few).unwrap();
    for i in 0..n {
        std::fs::copy(
            repo().join("models/samples/bottle_good_000.png"),
            few.join(format!("{i}.png")),
        )
        .unwrap();
    }
    few
}

fn good_folder(dir: &Path) -> PathBuf {
    augmented_folder(dir, "good", &["bottle_good_000.png", "bottle_good_003.png"])
}

/// `dir/name/` with six variants of each shipped sample in `files`: as is, mirrored both
/// ways, rotated both ways and rescaled.
fn augmented_folder(dir: &Path, name: &str, files: &[&str]) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    let mut n = 0;
    for file in files {
        let img = image::open(repo().join("models/samples").join(file)).unwrap();
        for v in [
            img.clone(),
            img.fliph(),
            img.flipv(),
            img.rotate90(),
            img.rotate270(),
            img.resize_exact(280, 300, image::imageops::FilterType::Triangle),
        ] {
            v.save(out.join(format!("{name}_{n:02}.png"))).unwrap();
            n += 1;
        }
    }
    out
}

/// Trains a stage3,stage4 detector on the shipped bottle classifier's backbone from `good`,
/// with a 10 % coreset plus `extra` flags, writing `out`.
fn train_bottle_detector(good: &Path, out: &Path, extra: &[&str]) -> (i32, String, String) {
    let backbone = repo().join("models/bottle-classifier/model.onnx");
    let mut args = vec![
        "train",
        "anomaly",
        "--backbone",
        path_str(&backbone),
        "--layers",
        "stage3,stage4",
        "--normal",
        path_str(good),
        "-o",
        path_str(out),
        "--coreset-ratio",
        "0.1",
    ];
    args.extend_from_slice(extra);
    neoc(&args)
}

#[test]
fn anomaly_detector_trains_from_good_images_and_flags_defects() {
    let dir = tempfile::tempdir().unwrap();
    let good = good_folder(dir.path());
    let out = dir.path().join("detector.neo");
    let train = |out: &Path, extra: &[&str]| train_bottle_detector(&good, out, extra);
    let (code, _, stderr) = train(&out, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("trained on 11 good images"), "{stderr}");

    let model = Model::load(&out).unwrap();
    let spec = model.manifest().anomaly.clone().unwrap();
    assert_eq!(spec.layers, ["stage3", "stage4"]);
    assert_eq!(spec.feature_dim, 40 + 80);
    assert!(spec.threshold > 0.0);
    let score = |file: &str| {
        let img = image::open(repo().join("models/samples").join(file)).unwrap();
        let (preds, _) = model.predict(&img, 1).unwrap();
        preds[0].anomaly.clone().unwrap()
    };
    let broken = score("bottle_broken_large_000.png");
    assert_eq!(
        broken.verdict,
        neo_runtime::anomaly::Verdict::Ng,
        "{broken:?}"
    );
    assert!(!broken.regions.is_empty());
    let good_result = score("bottle_good_003.png");
    assert!(
        good_result.score < broken.score,
        "{good_result:?} vs {broken:?}"
    );

    // With defective examples the threshold is the best-F1 one, and it separates them.
    let defects = dir.path().join("defects");
    std::fs::create_dir(&defects).unwrap();
    for f in [
        "bottle_broken_large_000.png",
        "bottle_broken_small_001.png",
        "bottle_contamination_000.png",
    ] {
        std::fs::copy(repo().join("models/samples").join(f), defects.join(f)).unwrap();
    }
    let out2 = dir.path().join("detector-f1.neo");
    let (code, _, stderr) = train(&out2, &["--defects", path_str(&defects)]);
    assert_eq!(code, 0, "{stderr}");
    let m = Model::load(&out2).unwrap();
    let a = m.manifest().anomaly.clone().unwrap();
    assert!(
        a.threshold_method.starts_with("best F1 (1.000)"),
        "{}",
        a.threshold_method
    );

    // Local-mean subtraction before standardization: format 3, shown by inspect, and the
    // detector still tells the broken bottle from the good one.
    let out3 = dir.path().join("detector-flat.neo");
    let (code, _, stderr) = train(&out3, &["--standardize", "--flatten", "15"]);
    assert_eq!(code, 0, "{stderr}");
    let m = Model::load(&out3).unwrap();
    assert_eq!(m.manifest().format_version, 3);
    let p = m.manifest().inputs[0].preprocess.clone().unwrap();
    assert_eq!((p.flatten, p.standardize), (Some(15), true));
    let score = |file: &str| {
        let img = image::open(repo().join("models/samples").join(file)).unwrap();
        let (preds, _) = m.predict(&img, 1).unwrap();
        preds[0].anomaly.clone().unwrap().score
    };
    let (good_score, broken_score) = (
        score("bottle_good_003.png"),
        score("bottle_broken_large_000.png"),
    );
    assert!(good_score < broken_score, "{good_score} vs {broken_score}");
    let (code, stdout, stderr) = neoc(&["inspect", path_str(&out3)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("local mean over 15x15 subtracted after resizing"),
        "{stdout}"
    );
}

#[test]
fn a_defect_type_head_names_the_type_of_unseen_defects() {
    let dir = tempfile::tempdir().unwrap();
    let good = good_folder(dir.path());
    // Six variants of each shipped defect sample: four per type train the head, two go to an
    // MVTec-style test folder it never sees.
    let types = dir.path().join("types");
    let ds = dir.path().join("ds");
    let kinds = [
        ("broken_large", "bottle_broken_large_000.png"),
        ("broken_small", "bottle_broken_small_001.png"),
        ("contamination", "bottle_contamination_000.png"),
    ];
    for (kind, file) in kinds {
        let folder = augmented_folder(&types, kind, &[file]);
        let test = ds.join("test").join(kind);
        std::fs::create_dir_all(&test).unwrap();
        for n in ["00", "03"] {
            let name = format!("{kind}_{n}.png");
            std::fs::rename(folder.join(&name), test.join(&name)).unwrap();
        }
    }
    let test_good = ds.join("test/good");
    std::fs::create_dir_all(&test_good).unwrap();
    std::fs::copy(
        repo().join("models/samples/bottle_good_003.png"),
        test_good.join("good.png"),
    )
    .unwrap();
    let det = dir.path().join("typed.neo");
    let (code, _, stderr) =
        train_bottle_detector(&good, &det, &["--defect-types", path_str(&types)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains(
            "defect types [\"broken_large\", \"broken_small\", \"contamination\"] from 12 labelled images"
        ),
        "{stderr}"
    );
    let model = Model::load(&det).unwrap();
    let spec = model.manifest().anomaly.clone().unwrap();
    let head = spec.defect_types.clone().unwrap();
    assert_eq!((head.labels.len(), head.trained_on.len()), (3, 12));
    assert_eq!(
        model.manifest().format_version,
        3,
        "older runtimes must refuse it"
    );
    assert_eq!(head.weights.len(), 3 * spec.feature_dim);
    // The patch features feed the head; they are not reported as a prediction.
    let img = image::open(repo().join("models/samples/bottle_broken_large_000.png")).unwrap();
    let (preds, _) = model.predict(&img, 1).unwrap();
    assert_eq!(preds.len(), 1);
    let a = preds[0].anomaly.clone().unwrap();
    assert_eq!(a.verdict, neo_runtime::anomaly::Verdict::Ng);
    assert_eq!(
        a.defect_type.map(|t| t.label).as_deref(),
        Some("broken_large")
    );

    let (code, stdout, stderr) = neoc(&["inspect", path_str(&det)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("types       broken_large, broken_small, contamination"),
        "{stdout}"
    );
    let (code, stdout, stderr) = neoc(&["eval", path_str(&det), "--dataset", path_str(&ds)]);
    assert_eq!(code, 0, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let t = &report["defect_types"];
    assert_eq!(t["images"], 6, "{t}");
    assert_eq!(t["skipped_trained"], 0, "{t}");
    assert_eq!(t["unknown_kind"], 0, "{t}");
    let correct = t["correct"].as_u64().unwrap();
    assert!(
        correct >= 4,
        "better than chance (2 of 6) on unseen variants: {t}"
    );
    assert!(stderr.contains("defect type right on"), "{stderr}");
}

#[test]
fn anomaly_training_refuses_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let backbone = repo().join("models/bottle-classifier/model.onnx");
    let out = dir.path().join("d.neo");
    let train = |normal: &Path, layers: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "anomaly",
            "--backbone",
            path_str(&backbone),
            "--layers",
            layers,
            "--normal",
            path_str(normal),
            "-o",
            path_str(&out),
        ];
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_string).collect::<Vec<_>>()
    };
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_clear_error(
        &refs(&train(&empty, "stage3", &[])),
        &["found 0 good image(s)", "at least 10"],
    );
    let few = copies_of_a_good_sample(dir.path(), 4);
    assert_clear_error(
        &refs(&train(&few, "stage3", &[])),
        &["found 4 good image(s)"],
    );
    let good = good_folder(dir.path());
    assert_clear_error(
        &refs(&train(&good, "stage3,stage9", &[])),
        &["no layer 'stage9'", "\"scores\""],
    );
    assert_clear_error(
        &refs(&train(&good, "stage3", &["--memory-budget", "0.01"])),
        &[
            "holds 65 patches",
            "fewer than one image's 784",
            "at least 0.1",
        ],
    );
    assert_clear_error(
        &refs(&train(&good, "stage3", &["--flatten", "1"])),
        &["flatten window of 1 pixels", "odd size of 3 or more"],
    );
    assert_clear_error(
        &refs(&train(&good, "stage3", &["--flatten", "16"])),
        &["flatten window of 16 pixels", "odd size of 3 or more"],
    );
    assert!(!out.exists());
}

#[test]
fn train_and_eval_on_an_mvtec_layout_with_an_html_report() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("bottle");
    let train_good = good_folder(dir.path());
    std::fs::create_dir_all(ds.join("train")).unwrap();
    std::fs::rename(&train_good, ds.join("train/good")).unwrap();
    for (kind, files) in [
        ("good", &["bottle_good_000.png", "bottle_good_003.png"][..]),
        (
            "broken",
            &[
                "bottle_broken_large_000.png",
                "bottle_broken_small_001.png",
                "bottle_contamination_000.png",
            ][..],
        ),
    ] {
        let d = ds.join("test").join(kind);
        std::fs::create_dir_all(&d).unwrap();
        for f in files {
            std::fs::copy(repo().join("models/samples").join(f), d.join(f)).unwrap();
        }
    }
    let backbone = repo().join("models/bottle-classifier/model.onnx");
    let det = dir.path().join("det.neo");
    let (code, _, stderr) = neoc(&[
        "train",
        "anomaly",
        "--backbone",
        path_str(&backbone),
        "--layers",
        "stage3,stage4",
        "--dataset",
        path_str(&ds),
        "-o",
        path_str(&det),
        "--coreset-ratio",
        "0.1",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let html = dir.path().join("report.html");
    let (code, stdout, stderr) = neoc(&[
        "eval",
        path_str(&det),
        "--dataset",
        path_str(&ds),
        "--html",
        path_str(&html),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["images"], 5);
    assert_eq!(report["defective"], 3);
    let auroc = report["image_auroc"].as_f64().unwrap();
    assert!(
        auroc > 0.5,
        "defects score above good ones more often than not: {auroc}"
    );
    assert!(report["pixel_auroc"].is_null(), "no masks in this layout");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        page.contains("<svg") && page.contains("ROC (image AUROC"),
        "plots inline"
    );
    assert!(
        page.matches("data:image/png;base64,").count() >= 4,
        "worst misses with overlays"
    );
}

/// Sensor models on generated pump data (process signals at 1 Hz, SKAB's CSV format): the
/// real datasets are exercised by the ignored tests in `tests/` and by `.ci/run`.
mod sensor {
    use super::{assert_clear_error, neoc};
    use std::fmt::Write as _;
    use std::path::Path;

    /// Deterministic noise, roughly normal.
    struct Noise(u64);
    impl Noise {
        fn next(&mut self) -> f64 {
            let mut acc = 0.0;
            for _ in 0..6 {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                acc += (self.0 >> 11) as f64 / (1u64 << 53) as f64;
            }
            acc - 3.0
        }
    }

    /// `rows` rows from 2020-03-09 10:00:00, 1 s apart. Flow and pressure are coupled;
    /// rows in `anomaly` get a partly closed valve: flow falls and pressure rises.
    fn pump_csv(
        path: &Path,
        rows: usize,
        seed: u64,
        anomaly: std::ops::Range<usize>,
        damage: bool,
    ) {
        let mut n = Noise(seed);
        let mut s = String::from("datetime;Flow;Pressure;Current;Const;anomaly;changepoint\n");
        for i in 0..rows {
            let bad = anomaly.contains(&i);
            let flow = 32.0 + 0.4 * n.next() - if bad { 2.5 } else { 0.0 };
            let pressure =
                0.1 + 0.05 * (flow - 32.0) + 0.01 * n.next() + if bad { 0.15 } else { 0.0 };
            let current = 1.0 + 0.02 * n.next();
            let t = 36_000 + i;
            let mut flow_cell = format!("{flow:.4}");
            if damage && i == 50 {
                flow_cell = "NaN".into();
            }
            let _ = writeln!(
                s,
                "2020-03-09 {:02}:{:02}:{:02};{flow_cell};{pressure:.5};{current:.4};5.0;{};0",
                t / 3600,
                (t / 60) % 60,
                t % 60,
                u8::from(bad)
            );
        }
        std::fs::write(path, s).unwrap();
    }

    #[test]
    fn train_then_eval_on_skab_style_csv_finds_the_valve_fault() {
        let dir = tempfile::tempdir().unwrap();
        let normal = dir.path().join("normal.csv");
        pump_csv(&normal, 900, 1, 0..0, true);
        let test_dir = dir.path().join("valve");
        std::fs::create_dir(&test_dir).unwrap();
        for (k, seed) in [(0, 2u64), (1, 3)] {
            pump_csv(
                &test_dir.join(format!("{k}.csv")),
                700,
                seed,
                300..500,
                false,
            );
        }
        let model = dir.path().join("pump.neo");
        let (code, _, stderr) = neoc(&[
            "train",
            "sensor",
            "--normal",
            normal.to_str().unwrap(),
            "--window",
            "5",
            "--stats",
            "mean,std",
            "--model",
            "pca",
            "-o",
            model.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{stderr}");
        // The constant column is named and left out; the NaN cell was repaired and counted.
        assert!(
            stderr.contains("left out of the model: Const.mean, Const.std"),
            "{stderr}"
        );
        assert!(stderr.contains("samples repaired"), "{stderr}");
        let (code, stdout, stderr) = neoc(&[
            "eval",
            "sensor",
            model.to_str().unwrap(),
            "--dataset",
            test_dir.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{stderr}");
        let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(r["dataset"], "skab");
        let f1 = r["alarm"]["f1"].as_f64().unwrap();
        let far = r["alarm"]["far_pct"].as_f64().unwrap();
        assert!(f1 > 0.9 && far < 5.0, "F1 {f1}, FAR {far}: {stdout}");
        // The same model streams: Healthy until the valve closes, then an alarm naming flow
        // or pressure, then Healthy again after it reopens.
        let artifact = neo_runtime::SensorArtifact::open(&model).unwrap();
        let rec =
            neo_sensor::recording::load(&test_dir.join("0.csv"), Some(&artifact.spec().channels))
                .unwrap();
        let mut monitor = artifact.monitor().unwrap();
        let mut changes = Vec::new();
        for i in 0..rec.frames() {
            if let Some(neo_sensor::Event::Assessed(a)) = monitor
                .push(rec.frame(i), rec.times.as_ref().map(|t| t[i]))
                .unwrap()
            {
                if a.transition.changed() {
                    changes.push((a.end, a.transition.health, a.score.top[0].feature.clone()));
                }
            }
        }
        let first = &changes[0];
        assert!((300..310).contains(&first.0), "{changes:?}");
        assert!(
            first.2.starts_with("Flow") || first.2.starts_with("Pressure"),
            "{changes:?}"
        );
        assert!(
            changes.iter().any(|c| c.1 == neo_sensor::Health::Alarm),
            "{changes:?}"
        );
        let last = changes.last().unwrap();
        assert!(
            last.1 == neo_sensor::Health::Healthy && (500..515).contains(&last.0),
            "{changes:?}"
        );
    }

    #[test]
    fn commissioning_learns_each_stream_and_scores_only_after() {
        let dir = tempfile::tempdir().unwrap();
        let normal = dir.path().join("normal.csv");
        pump_csv(&normal, 300, 5, 0..0, false);
        let test_dir = dir.path().join("runs");
        std::fs::create_dir(&test_dir).unwrap();
        pump_csv(&test_dir.join("0.csv"), 700, 6, 450..600, false);
        let model = dir.path().join("pump.neo");
        // A commissioning period too short to fit on is refused at training time.
        assert_clear_error(
            &[
                "train",
                "sensor",
                "--normal",
                normal.to_str().unwrap(),
                "--commission",
                "8",
                "-o",
                model.to_str().unwrap(),
            ],
            &[
                "--commission 8 gives 8 windows",
                "commission on at least 14 frames",
            ],
        );
        let (code, _, stderr) = neoc(&[
            "train",
            "sensor",
            "--normal",
            normal.to_str().unwrap(),
            "--commission",
            "300",
            "-o",
            model.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{stderr}");
        let (code, stdout, stderr) = neoc(&[
            "eval",
            model.to_str().unwrap(),
            "--dataset",
            test_dir.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{stderr}");
        let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        // The first 300 rows were learned from, not scored.
        assert_eq!(r["files"][0]["rows"], 400);
        assert!(r["alarm"]["f1"].as_f64().unwrap() > 0.9, "{stdout}");
        // A recording shorter than the commissioning period is refused with what to do.
        pump_csv(&test_dir.join("0.csv"), 200, 7, 0..0, false);
        assert_clear_error(
            &[
                "eval",
                "sensor",
                model.to_str().unwrap(),
                "--dataset",
                test_dir.to_str().unwrap(),
            ],
            &["ended before commissioning", "--commission"],
        );
    }

    #[test]
    fn bad_sensor_input_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let normal = dir.path().join("normal.csv");
        pump_csv(&normal, 100, 9, 0..0, false);
        let out = dir.path().join("m.neo");
        let (n, o) = (normal.to_str().unwrap(), out.to_str().unwrap());
        // A missing column: named, with the ones the file has.
        assert_clear_error(
            &[
                "train",
                "sensor",
                "--normal",
                n,
                "--channels",
                "Flow,Temperature",
                "-o",
                o,
            ],
            &["'Temperature'", "datetime, Flow, Pressure"],
        );
        // Raw samples at 1 kHz cannot give the 10-1,000 Hz band.
        assert_clear_error(
            &[
                "train",
                "sensor",
                "--normal",
                n,
                "--sample-rate",
                "1000",
                "-o",
                o,
            ],
            &["at least 2000 Hz", "1000 Hz"],
        );
        // Every channel constant: refused, not a model of NaNs.
        assert_clear_error(
            &[
                "train",
                "sensor",
                "--normal",
                n,
                "--channels",
                "Const",
                "-o",
                o,
            ],
            &["constant"],
        );
        // Too few windows.
        assert_clear_error(
            &["train", "sensor", "--normal", n, "--window", "95", "-o", o],
            &["at least 10"],
        );
        // Not a recording.
        let junk = dir.path().join("x.parquet");
        std::fs::write(&junk, b"PAR1").unwrap();
        assert_clear_error(
            &[
                "train",
                "sensor",
                "--normal",
                junk.to_str().unwrap(),
                "-o",
                o,
            ],
            &["unknown file type"],
        );
        // A corrupt MATLAB file.
        let mat = dir.path().join("x.mat");
        std::fs::write(&mat, b"MATLAB 5.0 MAT-file").unwrap();
        assert_clear_error(
            &[
                "train",
                "sensor",
                "--normal",
                mat.to_str().unwrap(),
                "--sample-rate",
                "12000",
                "-o",
                o,
            ],
            &["MATLAB v5"],
        );
        // Evaluating a vision model as a sensor model, and a folder without labels.
        let (code, _, stderr) = neoc(&["train", "sensor", "--normal", n, "-o", o]);
        assert_eq!(code, 0, "{stderr}");
        let empty = dir.path().join("unlabelled");
        std::fs::create_dir(&empty).unwrap();
        std::fs::write(
            empty.join("a.csv"),
            "time,Flow,Pressure,Current,Const\n1,2,3,4,5\n",
        )
        .unwrap();
        assert_clear_error(
            &["eval", "sensor", o, "--dataset", empty.to_str().unwrap()],
            &["has an `anomaly` column"],
        );
    }
}

/// `neoc bundle` refuses what would not run on the board, saying what to do. (The full
/// bundle → install → run path is tested in `tests/` with the real daemon.)
#[test]
fn bundle_refuses_a_daemon_or_model_for_another_board() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("bottle.neo");
    let (code, _, stderr) = neoc(&[
        "compile",
        path_str(&repo().join("models/bottle-classifier/model.onnx")),
        "--target",
        "x86_64",
        "-o",
        path_str(&model),
    ]);
    assert_eq!(code, 0, "{stderr}");
    std::fs::create_dir(d.join("frames")).unwrap();
    std::fs::write(
        d.join("station.toml"),
        "[station]\nname = \"s\"\n[[cameras]]\nname = \"c\"\npath = \"frames\"\n[inspection]\nmodel = \"bottle.neo\"\n[mqtt]\nhost = \"embedded\"\nport = 1883\nsite = \"s\"\nline = \"l\"\ndevice = \"d\"\n[spool]\ndir = \"spool\"\n",
    )
    .unwrap();
    let config = d.join("station.toml");
    let out = d.join("b.tar");
    // This machine's neoc binary is an x86_64 ELF: not a daemon for a Raspberry Pi.
    let x86_elf = env!("CARGO_BIN_EXE_neoc");
    assert_clear_error(
        &[
            "bundle",
            "--board",
            "rpi4",
            "--config",
            path_str(&config),
            "--daemon",
            x86_elf,
            "-o",
            path_str(&out),
        ],
        &[
            "another CPU",
            "scripts/cross.sh aarch64-unknown-linux-gnu build",
        ],
    );
    assert_clear_error(
        &[
            "bundle",
            "--board",
            "rpi4",
            "--config",
            path_str(&config),
            "--daemon",
            path_str(&d.join("nope")),
            "-o",
            path_str(&out),
        ],
        &["no daemon at", "--daemon"],
    );
    // An x86_64 daemon for the x86_64 board, but the model was compiled for another board.
    let (code, _, stderr) = neoc(&[
        "compile",
        path_str(&repo().join("models/bottle-classifier/model.onnx")),
        "--target",
        "rpi4",
        "-o",
        path_str(&model),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_clear_error(
        &[
            "bundle",
            "--board",
            "x86_64",
            "--config",
            path_str(&config),
            "--daemon",
            x86_elf,
            "-o",
            path_str(&out),
        ],
        &["compiled for rpi4", "--target x86_64"],
    );
    assert!(!out.exists(), "nothing written on refusal");
}

/// The gateway's tests deploy `models/fixtures/tiny_conv.neo` and run the station on
/// `models/fixtures/slow_matmul.neo` (so they need no ONNX compiler, also when cross-built for
/// ARM): each must be exactly what this neoc compiles.
#[test]
fn the_shipped_compiled_fixtures_are_current() {
    let dir = tempfile::tempdir().unwrap();
    for (name, extra) in [
        ("tiny_conv", &[][..]),
        ("slow_matmul", &["--scale", "0.00392157"][..]),
    ] {
        let out = dir.path().join(format!("{name}.neo"));
        let onnx = repo().join(format!("models/fixtures/{name}.onnx"));
        let mut args = vec!["compile", path_str(&onnx), "--target", "x86_64"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-o", path_str(&out)]);
        let (code, _, stderr) = neoc(&args);
        assert_eq!(code, 0, "{stderr}");
        assert!(
            std::fs::read(&out).unwrap()
                == std::fs::read(repo().join(format!("models/fixtures/{name}.neo"))).unwrap(),
            "models/fixtures/{name}.neo is stale: regenerate it with \
             `neoc compile models/fixtures/{name}.onnx --target x86_64 {} -o models/fixtures/{name}.neo`",
            extra.join(" ")
        );
    }
}

/// Thirty calibration images from the shipped samples (all five, each mirrored, rotated and
/// rescaled): real bottle frames, varied the way a line camera varies them.
fn calibration_folder(dir: &Path) -> PathBuf {
    augmented_folder(
        dir,
        "calibration",
        &[
            "bottle_broken_large_000.png",
            "bottle_broken_small_001.png",
            "bottle_contamination_000.png",
            "bottle_good_000.png",
            "bottle_good_003.png",
        ],
    )
}

#[test]
fn int8_bottle_classifier_passes_its_gate_and_keeps_its_answers() {
    let dir = tempfile::tempdir().unwrap();
    let calib = calibration_folder(dir.path());
    let model = repo().join("models/bottle-classifier/model.onnx");
    let f32_out = dir.path().join("f32.neo");
    let q_out = dir.path().join("int8.neo");
    let qdq_out = dir.path().join("int8-qdq.onnx");
    let (code, _, stderr) = neoc(&[
        "compile",
        path_str(&model),
        "--target",
        "x86_64",
        "-o",
        path_str(&f32_out),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let (code, stdout, stderr) = neoc(&[
        "compile",
        path_str(&model),
        "--target",
        "x86_64",
        "-o",
        path_str(&q_out),
        "--quantize",
        "int8",
        "--calibration",
        path_str(&calib),
        "--emit-qdq",
        path_str(&qdq_out),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("quantization: int8-weights (f32 compute) for x86_64"),
        "{stdout}"
    );
    assert!(stdout.contains("QDQ ONNX: "), "{stdout}");
    assert!(
        stdout.contains("24 images from"),
        "30 images, 6 held out: {stdout}"
    );
    assert!(!stdout.contains("FAIL"), "{stdout}");

    // A quarter of the weight bytes: the whole artifact well under 40 % of the f32 one.
    let (f32_bytes, q_bytes) = (
        std::fs::metadata(&f32_out).unwrap().len(),
        std::fs::metadata(&q_out).unwrap().len(),
    );
    assert!(
        (q_bytes as f64) < 0.4 * f32_bytes as f64,
        "int8 {q_bytes} vs f32 {f32_bytes}"
    );

    // The report inside the artifact: every layer int8, the classifier agreeing with f32.
    let artifact = neo_runtime::Artifact::open(&q_out).unwrap();
    let q = artifact.manifest.quantization.clone().unwrap();
    assert_eq!(artifact.manifest.target.precision, "int8-weights");
    assert!(q.int8_layers > 10 && q.f32_layers.is_empty(), "{q:?}");
    let report: serde_json::Value =
        serde_json::from_slice(artifact.file(&q.report).unwrap()).unwrap();
    assert_eq!(report["accuracy"][0]["top1_agreement"], 1.0, "{report}");
    assert!(report["accuracy"][0]["cosine_min"].as_f64().unwrap() > 0.999);
    let layers = report["layers"].as_array().unwrap();
    assert!(layers.iter().all(|l| l["precision"] == "int8"));
    assert!(layers
        .iter()
        .all(|l| l["activation"]["scale"].as_f64().unwrap() > 0.0));

    // `inspect` shows the precision of each layer.
    let (code, stdout, stderr) = neoc(&["inspect", path_str(&q_out)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("precision int8-weights"), "{stdout}");
    // Packed weights need a runtime that unpacks them: format 2 (f32 artifacts stay 1).
    assert!(stdout.contains("(artifact format v2)"), "{stdout}");
    assert!(stdout.contains("w rel.err"), "{stdout}");

    // The device loads it (int8 weights folded) and gives the f32 model's answers.
    let (f32_model, q_model) = (Model::load(&f32_out).unwrap(), Model::load(&q_out).unwrap());
    for file in [
        "bottle_good_000.png",
        "bottle_broken_large_000.png",
        "bottle_contamination_000.png",
    ] {
        let img = image::open(repo().join("models/samples").join(file)).unwrap();
        let (a, _) = f32_model.predict(&img, 1).unwrap();
        let (b, _) = q_model.predict(&img, 1).unwrap();
        assert_eq!(a[0].top_k[0].label, b[0].top_k[0].label, "{file}");
        assert!(
            (a[0].top_k[0].score - b[0].top_k[0].score).abs() < 0.02,
            "{file}: {a:?} {b:?}"
        );
    }

    // The QDQ export, read back by tract-onnx with its int8 activations: same answers on the
    // held-out images, outputs close (onnxruntime reads it too: scripts/check_onnxruntime.py).
    assert!(qdq_out.exists());
    let qdq = &report["qdq"]["accuracy"][0];
    assert_eq!(qdq["top1_agreement"], 1.0, "{report}");
    assert!(qdq["cosine_mean"].as_f64().unwrap() > 0.95, "{report}");
    // x86_64 has no GPU: the file follows onnxruntime's conventions, which quantize each
    // layer's output too (at least as many activations as the TensorRT-style file).
    assert_eq!(report["qdq"]["style"], "onnxruntime", "{report}");
    let ort_acts = report["qdq"]["quantized_activations"].as_u64().unwrap();
    let trt_out = dir.path().join("int8-trt.neo");
    let trt_qdq = dir.path().join("int8-trt.onnx");
    let (code, _, stderr) = neoc(&[
        "compile",
        path_str(&repo().join("models/bottle-classifier/model.onnx")),
        "-t",
        "x86_64",
        "-o",
        path_str(&trt_out),
        "--quantize",
        "int8",
        "--calibration",
        path_str(&calib),
        "--emit-qdq",
        path_str(&trt_qdq),
        "--qdq-for",
        "tensorrt",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let trt = neo_runtime::Artifact::open(&trt_out).unwrap();
    let trt_q = trt.manifest.quantization.clone().unwrap();
    let trt_report: serde_json::Value =
        serde_json::from_slice(trt.file(&trt_q.report).unwrap()).unwrap();
    assert_eq!(trt_report["qdq"]["style"], "tensorrt");
    assert!(trt_report["qdq"]["quantized_activations"].as_u64().unwrap() <= ort_acts);
    // What each file holds: uint8 activation zero points (ONNX type 2) for onnxruntime, int8
    // (type 3, all zero) for TensorRT.
    let zero_point_types = |path: &Path| {
        let proto = neoc::import::import(path).unwrap().proto;
        let mut types: Vec<i32> = proto
            .graph
            .unwrap()
            .initializer
            .iter()
            .filter(|t| t.name.ends_with("_act_zero_point"))
            .map(|t| t.data_type)
            .collect();
        types.dedup();
        types
    };
    assert_eq!(zero_point_types(&qdq_out), [2]);
    assert_eq!(zero_point_types(&trt_qdq), [3]);
}

#[test]
fn a_dot_product_board_gets_convolutions_computed_in_int8() {
    let dir = tempfile::tempdir().unwrap();
    let calib = calibration_folder(dir.path());
    let model = repo().join("models/bottle-classifier/model.onnx");
    let f32_out = dir.path().join("f32.neo");
    let q_out = dir.path().join("int8-compute.neo");
    let (code, _, stderr) = neoc(&[
        "compile",
        path_str(&model),
        "-t",
        "rpi5",
        "-o",
        path_str(&f32_out),
    ]);
    assert_eq!(code, 0, "{stderr}");
    // rpi5's Cortex-A76 has the dot product: its profile says int8_compute = true.
    let (code, stdout, stderr) = neoc(&[
        "compile",
        path_str(&model),
        "-t",
        "rpi5",
        "-o",
        path_str(&q_out),
        "--quantize",
        "int8",
        "--calibration",
        path_str(&calib),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("quantization: int8-compute (int8 compute) for rpi5"),
        "{stdout}"
    );
    assert!(!stdout.contains("FAIL"), "{stdout}");
    let artifact = neo_runtime::Artifact::open(&q_out).unwrap();
    // A v3 runtime cannot load neo_q8_conv: format 4.
    assert_eq!(artifact.manifest.format_version, 4);
    assert_eq!(artifact.manifest.target.precision, "int8-compute");
    let q = artifact.manifest.quantization.clone().unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(artifact.file(&q.report).unwrap()).unwrap();
    let layers = report["layers"].as_array().unwrap();
    // Every plain convolution computes in int8; what cannot (depthwise convolutions, the
    // classifier's matrix product) keeps int8 weights and says why.
    let computed = layers.iter().filter(|l| l["int8_compute"] == true).count();
    assert!(computed >= 5, "{report}");
    for l in layers.iter().filter(|l| l["int8_compute"] != true) {
        let reason = l["reason"].as_str().unwrap_or_default();
        assert!(reason.starts_with("int8 weight, f32 compute: "), "{l}");
    }
    assert!(
        report["accuracy"][0]["cosine_min"].as_f64().unwrap() > 0.99,
        "{report}"
    );

    // The stored graph holds the int8 convolutions; inspect marks their layers.
    let (code, stdout, stderr) = neoc(&["inspect", path_str(&q_out)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("(artifact format v4)"), "{stdout}");
    assert!(
        stdout.contains(&format!("{computed:>7}  Q8Conv")),
        "{stdout}"
    );
    assert!(stdout.contains("int8 comp"), "{stdout}");

    // The device runs it and gives the f32 model's answers on the samples.
    let (f32_model, q_model) = (Model::load(&f32_out).unwrap(), Model::load(&q_out).unwrap());
    for file in [
        "bottle_good_000.png",
        "bottle_broken_large_000.png",
        "bottle_contamination_000.png",
    ] {
        let img = image::open(repo().join("models/samples").join(file)).unwrap();
        let (a, _) = f32_model.predict(&img, 1).unwrap();
        let (b, _) = q_model.predict(&img, 1).unwrap();
        assert_eq!(a[0].top_k[0].label, b[0].top_k[0].label, "{file}");
        assert!(
            (a[0].top_k[0].score - b[0].top_k[0].score).abs() < 0.05,
            "{file}: {a:?} {b:?}"
        );
    }

    // --scheme overrides the board: int8 weights only on rpi5.
    let w_out = dir.path().join("int8-weights.neo");
    let (code, stdout, stderr) = neoc(&[
        "compile",
        path_str(&model),
        "-t",
        "rpi5",
        "-o",
        path_str(&w_out),
        "--quantize",
        "int8",
        "--calibration",
        path_str(&calib),
        "--scheme",
        "int8-weights",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("int8-weights (f32 compute)"), "{stdout}");
    assert_eq!(
        neo_runtime::Artifact::open(&w_out)
            .unwrap()
            .manifest
            .format_version,
        2
    );
}

#[test]
fn quantization_refuses_bad_calibration_input() {
    let dir = tempfile::tempdir().unwrap();
    let model = repo().join("models/fixtures/tiny_conv.onnx");
    let out = dir.path().join("q.neo");
    let compile = |extra: &[&str], needles: &[&str]| {
        let mut args = vec![
            "compile",
            path_str(&model),
            "--target",
            "x86_64",
            "-o",
            path_str(&out),
            "--quantize",
            "int8",
        ];
        args.extend_from_slice(extra);
        assert_clear_error(&args, needles);
        assert!(!out.exists(), "nothing written for {extra:?}");
    };
    compile(&[], &["needs --calibration DIR"]);
    compile(
        &["--calibration", "/no/such/folder"],
        &["is not a folder", "at least 15"],
    );
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("notes.txt"), "not an image").unwrap();
    compile(
        &["--calibration", path_str(&empty)],
        &["holds no images", "1 other files"],
    );
    let few = copies_of_a_good_sample(dir.path(), 3);
    compile(
        &["--calibration", path_str(&few)],
        &["holds 3 images", "at least 15"],
    );
    let calib = calibration_folder(dir.path());
    std::fs::write(calib.join("broken.png"), b"\x89PNG but not really").unwrap();
    compile(
        &["--calibration", path_str(&calib)],
        &["1 of 31 calibration images cannot be read", "broken.png"],
    );
    std::fs::remove_file(calib.join("broken.png")).unwrap();
    compile(
        &["--calibration", path_str(&calib), "--max-drop", "120"],
        &["--max-drop is a percentage"],
    );

    // A model with nothing to quantize.
    assert_clear_error(
        &[
            "compile",
            path_str(&repo().join("models/fixtures/no_weights.onnx")),
            "--target",
            "x86_64",
            "-o",
            path_str(&out),
            "--quantize",
            "int8",
            "--calibration",
            path_str(&calib),
        ],
        &["no quantizable layer", "without --quantize"],
    );
    assert!(!out.exists());
}

#[test]
fn the_accuracy_gate_fails_readably_and_mixed_precision_keeps_the_sensitive_layer() {
    let dir = tempfile::tempdir().unwrap();
    let calib = calibration_folder(dir.path());
    let model = repo().join("models/fixtures/outlier_weights.onnx");
    let out = dir.path().join("q.neo");
    let args = [
        "compile",
        path_str(&model),
        "--target",
        "rpi5",
        "-o",
        path_str(&out),
        "--quantize",
        "int8",
        "--calibration",
        path_str(&calib),
        "--calibration-method",
        "entropy",
    ];
    let (code, _, stderr) = neoc(&args);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("misses the accuracy budget"), "{stderr}");
    assert!(stderr.contains("FAIL: cosine"), "{stderr}");
    assert!(stderr.contains("--mixed-precision"), "{stderr}");
    assert!(!out.exists(), "nothing written when the gate fails");

    let mut mixed = args.to_vec();
    mixed.push("--mixed-precision");
    let (code, stdout, stderr) = neoc(&mixed);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("layers: 1 of 2 int8 (kept in f32: conv_b)"),
        "{stdout}"
    );
    assert!(stdout.contains("entropy"), "{stdout}");
    assert!(
        stdout.contains("cortex-a76 has fast int8 dot products"),
        "{stdout}"
    );
    let artifact = neo_runtime::Artifact::open(&out).unwrap();
    let q = artifact.manifest.quantization.clone().unwrap();
    assert_eq!(q.f32_layers, ["conv_b"]);
    let report: serde_json::Value =
        serde_json::from_slice(artifact.file(&q.report).unwrap()).unwrap();
    let layers = report["layers"].as_array().unwrap();
    let sens = |i: usize| layers[i]["sensitivity"].as_f64().unwrap();
    assert!(
        sens(1) > 100.0 * sens(0),
        "conv_b is the sensitive one: {report}"
    );
    assert_eq!(layers[0]["precision"], "int8");
}

#[test]
fn an_int8_anomaly_detector_is_checked_against_f32_by_auroc() {
    let dir = tempfile::tempdir().unwrap();
    let good = good_folder(dir.path());
    let calib = calibration_folder(dir.path());
    let defects = dir.path().join("defects");
    std::fs::create_dir(&defects).unwrap();
    for f in [
        "bottle_broken_large_000.png",
        "bottle_broken_small_001.png",
        "bottle_contamination_000.png",
    ] {
        std::fs::copy(repo().join("models/samples").join(f), defects.join(f)).unwrap();
    }
    let out = dir.path().join("detector-int8.neo");
    let backbone = repo().join("models/bottle-classifier/model.onnx");
    let args = [
        "train",
        "anomaly",
        "--backbone",
        path_str(&backbone),
        "--layers",
        "stage3,stage4",
        "--normal",
        path_str(&good),
        "--defects",
        path_str(&defects),
        "-o",
        path_str(&out),
        "--coreset-ratio",
        "0.1",
        "--quantize",
        "int8",
        "--calibration",
        path_str(&calib),
    ];
    let (code, stdout, stderr) = neoc(&args);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("detector: int8 vs f32 on 1 good + 3 defective"),
        "{stdout}"
    );
    assert!(
        stderr.contains("stored int8 per row"),
        "int8 bank: {stderr}"
    );
    let artifact = neo_runtime::Artifact::open(&out).unwrap();
    assert_eq!(artifact.manifest.target.precision, "int8-weights");
    let q = artifact.manifest.quantization.clone().unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(artifact.file(&q.report).unwrap()).unwrap();
    let a = &report["anomaly"];
    assert_eq!(a["auroc_f32"], 1.0, "{a}");
    assert_eq!(a["auroc_int8"], 1.0, "{a}");
    assert!(a["threshold_shift"].as_f64().unwrap().abs() < 0.05, "{a}");
    // The memory bank stays f32: no layer of the nearest-neighbour search is int8.
    let layers = report["layers"].as_array().unwrap();
    assert!(layers
        .iter()
        .all(|l| !l["name"].as_str().unwrap().starts_with("neo_knn/")));
    // The device flags the defect with the int8 detector.
    let model = Model::load(&out).unwrap();
    let img = image::open(repo().join("models/samples/bottle_broken_large_000.png")).unwrap();
    let (preds, _) = model.predict(&img, 1).unwrap();
    let verdict = preds[0].anomaly.clone().unwrap().verdict;
    assert_eq!(verdict, neo_runtime::anomaly::Verdict::Ng);
}
