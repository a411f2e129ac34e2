//! Integration tests of the device runtime and the `neo-run` CLI, on an artifact built here
//! from a small real tract graph: per-channel sums of the preprocessed image, so a red image
//! must come out as class "red" (this checks decoding, resize, channel order, normalization,
//! NNEF loading and the artifact checks together).

#![allow(clippy::unwrap_used)]

use neo_runtime::artifact::MODEL_FILE;
use neo_runtime::manifest::*;
use neo_runtime::{Artifact, Model, FORMAT_VERSION};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tract_nnef::prelude::*;
use tract_nnef::tract_core::ops::nn::{Reduce, Reducer};

fn color_graph_nnef() -> Vec<u8> {
    let mut model = TypedModel::default();
    let x = model.add_source("input", f32::fact([1, 3, 4, 4])).unwrap();
    let y = model
        .wire_node("channel_sums", Reduce::new(tvec![2, 3], Reducer::Sum), &[x])
        .unwrap();
    model.select_output_outlets(&y).unwrap();
    tract_nnef::nnef().write_to_tar(&model, Vec::new()).unwrap()
}

fn manifest(channels: ChannelOrder) -> Manifest {
    Manifest {
        format_version: FORMAT_VERSION,
        name: "color".into(),
        compiler: CompilerInfo {
            name: "test".into(),
            version: "0".into(),
            tract_version: "0.23.9".into(),
        },
        source: SourceInfo {
            file: "none".into(),
            format: "nnef".into(),
            sha256: "0".into(),
            bytes: 0,
        },
        target: TargetInfo {
            board: "x86_64".into(),
            triple: "x86_64-unknown-linux-gnu".into(),
            cpu: "x86-64-v3".into(),
            precision: "f32".into(),
            threads: 1,
            memory_budget_mb: 64,
        },
        inputs: vec![InputSpec {
            name: "input".into(),
            shape: vec![1, 3, 4, 4],
            dtype: DType::F32,
            layout: Layout::Nchw,
            preprocess: Some(Preprocess {
                resize: Resize::Exact {
                    width: 4,
                    height: 4,
                },
                interpolation: Interpolation::Bilinear,
                crop: None,
                channels,
                scale: 1.0 / 255.0,
                mean: vec![0.0; 3],
                std: vec![1.0; 3],
                standardize: false,
                flatten: None,
            }),
        }],
        outputs: vec![OutputSpec {
            name: "channel_sums".into(),
            shape: vec![1, 3, 1, 1],
            dtype: DType::F32,
            task: Task::Classification,
            scores: Some(Scores::Logits),
            labels: vec!["red".into(), "green".into(), "blue".into()],
        }],
        files: BTreeMap::new(),
        anomaly: None,
        sensor: None,
        quantization: None,
    }
}

fn write_artifact(dir: &Path, m: Manifest) -> PathBuf {
    let files = BTreeMap::from([(MODEL_FILE.to_string(), color_graph_nnef())]);
    let path = dir.join(format!(
        "{}-{:?}.neo",
        m.name,
        m.inputs[0].preprocess.as_ref().map(|p| p.channels)
    ));
    Artifact::new(m, files).unwrap().write(&path).unwrap();
    path
}

fn solid(dir: &Path, name: &str, rgb: [u8; 3], w: u32, h: u32) -> PathBuf {
    let path = dir.join(name);
    image::RgbImage::from_pixel(w, h, image::Rgb(rgb))
        .save(&path)
        .unwrap();
    path
}

fn neo_run(args: &[&str]) -> (i32, String, String) {
    // Cross-built tests run under qemu-user, which does not follow exec: the binary needs the
    // same runner (scripts/cross.sh sets NEO_TEST_RUNNER, e.g. "qemu-aarch64-static -L ...").
    let runner = std::env::var("NEO_TEST_RUNNER").unwrap_or_default();
    let mut runner = runner.split_whitespace();
    let mut cmd = match runner.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(runner).arg(env!("CARGO_BIN_EXE_neo-run"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_neo-run")),
    };
    let out = cmd.args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn classifies_by_color_with_any_image_size() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(&write_artifact(dir.path(), manifest(ChannelOrder::Rgb))).unwrap();
    for (rgb, want, w, h) in [
        ([250, 10, 10], "red", 4, 4),
        ([0, 200, 30], "green", 640, 480),
        ([5, 5, 90], "blue", 3, 7),
    ] {
        let img =
            image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(w, h, image::Rgb(rgb)));
        let (preds, _) = model.predict(&img, 3).unwrap();
        assert_eq!(preds[0].top_k[0].label.as_deref(), Some(want), "{rgb:?}");
        let sum: f32 = preds[0].top_k.iter().map(|c| c.score).sum();
        assert!((sum - 1.0).abs() < 1e-5, "logits are softmaxed: {sum}");
    }
    // The same pixels through a BGR contract swap red and blue.
    let bgr = Model::load(&write_artifact(dir.path(), manifest(ChannelOrder::Bgr))).unwrap();
    let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
        4,
        4,
        image::Rgb([250, 10, 10]),
    ));
    assert_eq!(
        bgr.predict(&img, 1).unwrap().0[0].top_k[0].label.as_deref(),
        Some("blue")
    );
}

#[test]
fn cli_prints_one_json_line_per_image_of_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    let artifact = write_artifact(dir.path(), manifest(ChannelOrder::Rgb));
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    solid(&images, "a_red.png", [255, 0, 0], 32, 16);
    solid(&images, "b_blue.jpg", [0, 0, 255], 20, 20);
    let gray = images.join("c_gray.png");
    image::GrayImage::from_pixel(9, 9, image::Luma([128]))
        .save(&gray)
        .unwrap();
    let (code, stdout, stderr) = neo_run(&[
        "classify",
        artifact.to_str().unwrap(),
        images.to_str().unwrap(),
        "--top-k",
        "2",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[0]["file"].as_str().unwrap().ends_with("a_red.png"));
    assert_eq!(lines[0]["predictions"][0]["top_k"][0]["label"], "red");
    assert_eq!(lines[1]["predictions"][0]["top_k"][0]["label"], "blue");
    assert_eq!(
        lines[0]["predictions"][0]["top_k"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert!(lines[0]["latency_ms"]["inference"].as_f64().unwrap() >= 0.0);
    // A gray image feeds the RGB model as three equal channels.
    let s = &lines[2]["predictions"][0]["top_k"];
    assert!((s[0]["score"].as_f64().unwrap() - s[1]["score"].as_f64().unwrap()).abs() < 1e-6);
}

#[test]
fn an_undecodable_image_is_reported_and_the_rest_still_run() {
    let dir = tempfile::tempdir().unwrap();
    let artifact = write_artifact(dir.path(), manifest(ChannelOrder::Rgb));
    let bad = dir.path().join("broken.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff\xe0 this is not really a jpeg").unwrap();
    let good = solid(dir.path(), "ok.png", [255, 0, 0], 4, 4);
    let (code, stdout, stderr) = neo_run(&[
        "classify",
        artifact.to_str().unwrap(),
        bad.to_str().unwrap(),
        good.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "a failed image makes the run fail");
    assert!(
        stderr.contains("cannot decode image") && stderr.contains("broken.jpg"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        stdout.lines().count(),
        2,
        "one line per image, errors included: {stdout}"
    );
    assert!(stdout.lines().nth(1).unwrap().contains("\"red\""));
}

#[test]
fn a_changed_byte_anywhere_in_the_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_artifact(dir.path(), manifest(ChannelOrder::Rgb));
    let bytes = std::fs::read(&path).unwrap();
    let img = solid(dir.path(), "x.png", [1, 2, 3], 4, 4);
    // One byte in the middle of the NNEF graph, one in the manifest.
    let manifest_at = bytes.windows(8).position(|w| w == b"\"format_").unwrap() + 20;
    for at in [bytes.len() / 2, manifest_at] {
        let mut bad = bytes.clone();
        bad[at] ^= 0x01;
        let bad_path = dir.path().join("bad.neo");
        std::fs::write(&bad_path, &bad).unwrap();
        let (code, _, stderr) = neo_run(&[
            "classify",
            bad_path.to_str().unwrap(),
            img.to_str().unwrap(),
        ]);
        assert_eq!(code, 2, "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "one-line error: {stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn a_newer_format_version_is_refused_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manifest(ChannelOrder::Rgb);
    m.format_version = FORMAT_VERSION + 1;
    let path = write_artifact(dir.path(), m);
    let (code, _, stderr) = neo_run(&["verify", path.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains(&format!("format version {}", FORMAT_VERSION + 1)),
        "{stderr}"
    );
    assert!(stderr.contains("update the device runtime"), "{stderr}");
}

#[test]
fn a_graph_that_disagrees_with_its_manifest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manifest(ChannelOrder::Rgb);
    m.inputs[0].shape = vec![1, 3, 8, 8];
    let err = Model::load(&write_artifact(dir.path(), m))
        .unwrap_err()
        .to_string();
    assert!(err.contains("manifest says"), "{err}");
}
