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

/// Training options for an EfficientNet-Lite0 stage3+stage5 detector at 224x224 with the
/// default coreset, threshold and scoring, writing `out` (images still to be given).
fn effnet_detector(out: &std::path::Path) -> neoc::anomaly::TrainOptions {
    neoc::anomaly::TrainOptions {
        compile: CompileOptions {
            model: data().join("models/efficientnet_lite0/efficientnet_lite0_derived.onnx"),
            target: "x86_64".into(),
            output: out.to_path_buf(),
            card: Some(repo().join("models/cards/efficientnet_lite0.toml")),
            resize: Some(neoc::card::ResizeSpec::Exact([224, 224])),
            ..Default::default()
        },
        layers: vec!["stage3".into(), "stage5".into()],
        normal: vec![],
        dataset: None,
        train_good: None,
        defects: None,
        memory_budget_mb: 16.0,
        coreset_ratio: 0.02,
        aggregation: 3,
        percentile: 99.5,
        score_border: 0,
        score_top_k: 1,
        defect_types: None,
    }
}

#[test]
#[ignore = "needs ../shared/data (run by .ci/run)"]
fn bottle_detector_from_good_images_reaches_auroc_099() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bottle-detector.neo");
    let bottle = data().join("images/mvtec_bottle");
    let mut opts = effnet_detector(&out);
    opts.normal = vec![bottle.join("train/good")];
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

#[test]
#[ignore = "needs ../shared/data (run by .ci/run)"]
fn magnetic_tile_detector_with_flattening_reaches_auroc_090_and_names_defect_types() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tile.neo");
    let tile = data().join("images/magnetic_tile");
    // The defect-type head learns from the first 5 images of each type (sorted by name);
    // eval leaves those out of its type accuracy.
    let types = dir.path().join("types");
    let kinds = ["Blowhole", "Break", "Crack", "Fray", "Uneven"];
    for kind in kinds {
        let folder = types.join(kind);
        std::fs::create_dir_all(&folder).unwrap();
        let mut images: Vec<_> = std::fs::read_dir(tile.join(format!("MT_{kind}/Imgs")))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
            .collect();
        images.sort();
        for p in &images[..5] {
            std::fs::copy(p, folder.join(p.file_name().unwrap())).unwrap();
        }
    }
    let mut opts = effnet_detector(&out);
    opts.compile.standardize = true;
    opts.compile.flatten = Some(15);
    opts.dataset = Some(tile.clone());
    opts.score_border = 2;
    opts.defect_types = Some(types);
    neoc::anomaly::train_anomaly(&opts, &Boards::shipped()).expect("trains");
    let report = neoc::anomaly::eval_anomaly(&out, &tile, None).expect("evaluates");
    assert_eq!((report.images, report.defective), (100, 50));
    assert!(
        report.image_auroc >= 0.90,
        "image AUROC {}",
        report.image_auroc
    );
    let t = report.defect_types.expect("the head is evaluated");
    assert_eq!((t.images, t.skipped_trained, t.unknown_kind), (25, 25, 0));
    // Five types: chance is 0.2.
    let accuracy = t.accuracy.unwrap_or(0.0);
    assert!(accuracy >= 0.4, "defect type accuracy {accuracy}");
}

// ---- The station daemon end to end: real Mosquitto, folder camera, compiled model ----

mod station {
    use super::repo;
    use neo_e2e::{Broker, Subscriber};
    use neo_gateway::station::config::{SensorSourceConfig, StationConfig};
    use neo_gateway::station::{self, RunOptions};
    use std::path::Path;
    use std::time::Duration;

    /// The shipped bottle classifier, compiled for x86_64.
    fn compiled_classifier(dir: &Path) -> std::path::PathBuf {
        let out = dir.join("bottle.neo");
        neoc::compile(
            &neoc::CompileOptions {
                model: repo().join("models/bottle-classifier/model.onnx"),
                target: "x86_64".into(),
                output: out.clone(),
                ..Default::default()
            },
            &neo_boards::Boards::shipped(),
        )
        .unwrap();
        out
    }

    fn station_toml(dir: &Path, port: u16, frames: &str, extra_camera: &str) -> StationConfig {
        let text = format!(
            r#"
[station]
name = "e2e"
fail_safe = "reject_all"
[[cameras]]
name = "cam0"
path = "{frames}"
fps = 10.0
{extra_camera}
[inspection]
model = "bottle.neo"
ng_labels = ["defect"]
queue = 16
[reject]
kind = "file"
path = "rejects.jsonl"
delay_ms = 300
pulse_ms = 50
[mqtt]
host = "127.0.0.1"
port = {port}
site = "e2e"
line = "l1"
device = "st1"
reconnect_min_ms = 50
reconnect_max_ms = 500
[spool]
dir = "spool"
[samples]
ok_fraction = 0.0
"#
        );
        StationConfig::from_toml(&text, dir).unwrap()
    }

    /// The demo's pump sensor model, trained on the shipped recording (window 5, mean + std).
    fn pump_model(out: &Path) {
        let mut opts = super::sensor::options(&repo().join("models/pump-sensor/normal.csv"), out);
        opts.window = Some(5);
        opts.stats = vec![
            neo_sensor::features::ProcessStat::Mean,
            neo_sensor::features::ProcessStat::Std,
        ];
        neoc::sensor::train_sensor(&opts, &neo_boards::Boards::shipped()).unwrap();
    }

    fn copy_samples(to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(repo().join("models/samples")).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }

    /// Runs the station of `dir` (its model `bottle.neo`) once over the shipped samples, with
    /// a real Mosquitto and a subscriber to everything it publishes.
    fn inspect_the_samples_once(dir: &Path) -> (Broker, Subscriber, station::Summary) {
        copy_samples(&dir.join("frames"));
        let broker = Broker::start();
        let sub = Subscriber::start(broker.port, "e2e-sub", "neo/e2e/l1/st1/#");
        let config = station_toml(dir, broker.port, "frames", "loop = false");
        let summary = station::run(
            config,
            RunOptions {
                duration: Some(Duration::from_secs(60)),
                ..Default::default()
            },
        )
        .unwrap();
        (broker, sub, summary)
    }

    #[test]
    fn every_part_gets_one_result_and_each_ng_a_delayed_reject() {
        let dir = tempfile::tempdir().unwrap();
        compiled_classifier(dir.path());
        let (_broker, sub, summary) = inspect_the_samples_once(dir.path());
        assert_eq!(summary.frames, 5, "{summary:?}");
        assert_eq!((summary.ng, summary.ok, summary.fail_safe), (3, 2, 0));
        assert_eq!(summary.dropped, 0);
        assert_eq!(summary.spool_queued_at_exit, 0, "results left undelivered");

        let results = sub.wait_for("inspection", 5, Duration::from_secs(10));
        assert_eq!(results.len(), 5, "exactly one result per image");
        let mut ng_parts = Vec::new();
        for r in &results {
            let image = r.data["image"].as_str().unwrap();
            let expected = if image.contains("good") { "OK" } else { "NG" };
            assert_eq!(r.data["verdict"], expected, "{image}: {}", r.data);
            assert!(r.data["latency_ms"]["inference"].as_f64().unwrap() > 0.0);
            if expected == "NG" {
                ng_parts.push((
                    r.data["part"].as_str().unwrap().to_string(),
                    r.data["captured_ms"].as_u64().unwrap(),
                ));
            }
        }
        let pulses: Vec<serde_json::Value> =
            std::fs::read_to_string(dir.path().join("rejects.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
        assert_eq!(pulses.len(), ng_parts.len(), "{pulses:?}");
        for (part, captured) in ng_parts {
            let p = pulses.iter().find(|p| p["part"] == part.as_str()).unwrap();
            let after = p["ts_ms"].as_u64().unwrap() - captured;
            assert!(
                (300..1000).contains(&after),
                "{part}: pulse {after} ms after capture"
            );
        }
        // NG frames went out as samples too.
        let samples = sub
            .got
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t.contains("/samples/"))
            .count();
        assert_eq!(samples, 3);
    }

    /// Six variants of the shipped sample `file` (as is, mirrored, rotated, rescaled) in `to`.
    fn variants(file: &str, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        let img = image::open(repo().join("models/samples").join(file)).unwrap();
        for (i, v) in [
            img.clone(),
            img.fliph(),
            img.flipv(),
            img.rotate90(),
            img.rotate270(),
            img.resize_exact(280, 300, image::imageops::FilterType::Triangle),
        ]
        .iter()
        .enumerate()
        {
            v.save(to.join(format!("{i}-{file}"))).unwrap();
        }
    }

    #[test]
    fn a_detector_with_defect_types_names_the_type_in_its_ng_results() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        variants("bottle_good_000.png", &good);
        variants("bottle_good_003.png", &good);
        let types = dir.path().join("types");
        let kinds = [
            ("broken_large", "bottle_broken_large_000.png"),
            ("broken_small", "bottle_broken_small_001.png"),
            ("contamination", "bottle_contamination_000.png"),
        ];
        for (kind, file) in kinds {
            variants(file, &types.join(kind));
        }
        let opts = neoc::anomaly::TrainOptions {
            compile: neoc::CompileOptions {
                model: repo().join("models/bottle-classifier/model.onnx"),
                target: "x86_64".into(),
                output: dir.path().join("bottle.neo"),
                ..Default::default()
            },
            layers: vec!["stage3".into(), "stage4".into()],
            normal: vec![good],
            dataset: None,
            train_good: None,
            defects: None,
            memory_budget_mb: 16.0,
            coreset_ratio: 0.1,
            aggregation: 3,
            percentile: 99.5,
            score_border: 0,
            score_top_k: 1,
            defect_types: Some(types),
        };
        neoc::anomaly::train_anomaly(&opts, &neo_boards::Boards::shipped()).unwrap();
        let (_broker, sub, summary) = inspect_the_samples_once(dir.path());
        assert_eq!((summary.frames, summary.fail_safe), (5, 0), "{summary:?}");
        let results = sub.wait_for("inspection", 5, Duration::from_secs(10));
        let mut named = 0;
        for r in &results {
            let image = r.data["image"].as_str().unwrap();
            match (r.data["verdict"].as_str(), r.data["label"].as_str()) {
                (Some("NG"), Some(label)) => {
                    // The head was trained on these very images: it must know them.
                    assert!(image.contains(label), "{image}: {}", r.data);
                    assert!(r.data["reason"].as_str().unwrap().contains(label));
                    named += 1;
                }
                (Some("OK"), None) => {}
                _ => panic!(
                    "{image}: an NG part without its type, or an OK one with one: {}",
                    r.data
                ),
            }
        }
        assert!(named >= 1, "no NG part named: {results:?}");
    }

    /// `POST path` with `body` under a Content-Length of `claimed` bytes; the final status
    /// code. `expect`: ask for `100 Continue` first, as curl does for large bodies, and send
    /// the body only once it came.
    fn http_post(port: u16, path: &str, body: &[u8], claimed: usize, expect: bool) -> u16 {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let expect_header = if expect {
            "Expect: 100-continue\r\n"
        } else {
            ""
        };
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/png\r\nContent-Length: {claimed}\r\n{expect_header}\r\n"
        )
        .unwrap();
        if expect {
            let mut interim = [0u8; 25];
            s.read_exact(&mut interim).unwrap();
            assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        s.write_all(body).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP status in {answer:?}"))
    }

    /// A camera of kind "push": frames another program sends over MQTT and HTTP each become
    /// one result with the right verdict; a payload that is not an image becomes a fail-safe
    /// part; an unknown camera and an oversize frame are refused with their HTTP status.
    #[test]
    fn frames_pushed_over_mqtt_and_http_each_become_one_result() {
        use neo_gateway::station::config::SourceKind;
        let dir = tempfile::tempdir().unwrap();
        compiled_classifier(dir.path());
        let broker = Broker::start();
        let sub = Subscriber::start(broker.port, "e2e-push", "neo/e2e/l1/st1/#");
        let http = neo_e2e::free_port();
        let mut config = station_toml(dir.path(), broker.port, "unused", "");
        config.cameras[0].kind = SourceKind::Push;
        config.cameras[0].path = None;
        config.cameras[0].max_bytes = 1 << 20;
        config.telemetry.metrics_addr = Some(format!("127.0.0.1:{http}"));
        let station = std::thread::spawn(move || {
            station::run(
                config,
                RunOptions {
                    max_frames: Some(5),
                    duration: Some(Duration::from_secs(90)),
                    ..Default::default()
                },
            )
        });
        // Online, and subscribed to its frames topic a moment after.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !sub
            .got
            .lock()
            .unwrap()
            .iter()
            .any(|(t, _)| t.ends_with("/status"))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the station never came online"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(500));
        let sample = |name: &str| std::fs::read(repo().join("models/samples").join(name)).unwrap();

        let topic = "neo/e2e/l1/st1/frames/cam0".to_string();
        let pushes: [(Vec<u8>, &str); 3] = [
            (sample("bottle_good_000.png"), "OK"),
            (sample("bottle_broken_large_000.png"), "NG"),
            (b"these bytes are no image".to_vec(), "NG"),
        ];
        for (n, (bytes, _)) in pushes.iter().enumerate() {
            neo_e2e::publish_all(broker.port, vec![(topic.clone(), bytes.clone())]);
            sub.wait_for("inspection", n + 1, Duration::from_secs(20));
        }
        for (name, expect) in [
            ("bottle_good_003.png", true),
            ("bottle_contamination_000.png", false),
        ] {
            let body = sample(name);
            let path = format!("/frames/cam0?name={name}");
            assert_eq!(http_post(http, &path, &body, body.len(), expect), 202);
        }
        assert_eq!(http_post(http, "/frames/side", b"x", 1, false), 404);
        // Oversize: refused from its Content-Length; the body already on its way is read
        // and dropped, so the client gets the answer instead of a reset.
        assert_eq!(
            http_post(http, "/frames/cam0", &[0; 256 << 10], 2 << 20, false),
            413
        );

        let summary = station.join().unwrap().unwrap();
        assert_eq!(summary.frames, 5, "{summary:?}");
        let results = sub.wait_for("inspection", 5, Duration::from_secs(10));
        assert_eq!(results.len(), 5, "one result per pushed frame");
        let by_image = |image: &str| {
            results
                .iter()
                .find(|r| r.data["image"] == image)
                .unwrap_or_else(|| panic!("no result for {image}: {results:?}"))
                .data
                .clone()
        };
        for (n, (_, verdict)) in pushes.iter().enumerate() {
            let r = by_image(&format!("mqtt-{n}"));
            assert_eq!(r["verdict"], *verdict, "{r}");
        }
        let garbage = by_image("mqtt-2");
        assert_eq!(garbage["fail_safe"], true);
        assert!(
            garbage["reason"].as_str().unwrap().contains("not an image"),
            "{garbage}"
        );
        assert_eq!(by_image("bottle_good_003.png")["verdict"], "OK");
        assert_eq!(by_image("bottle_contamination_000.png")["verdict"], "NG");
    }

    #[test]
    fn sensor_source_raises_and_clears_an_alarm_naming_the_features() {
        let dir = tempfile::tempdir().unwrap();
        compiled_classifier(dir.path());
        copy_samples(&dir.path().join("frames"));
        let pump = dir.path().join("pump.neo");
        pump_model(&pump);
        let broker = Broker::start();
        let sub = Subscriber::start(broker.port, "e2e-sensor", "neo/e2e/l1/st1/#");
        let mut config = station_toml(dir.path(), broker.port, "frames", "loop = false");
        config.sensors.push(SensorSourceConfig {
            name: "pump1".into(),
            model: pump,
            path: repo().join("models/pump-sensor/replay.csv"),
            rate_hz: 1000.0,
            repeat: false,
            publish_every: 10,
        });
        let summary = station::run(
            config,
            RunOptions {
                duration: Some(Duration::from_secs(60)),
                ..Default::default()
            },
        )
        .unwrap();
        // 240 rows, windows of 5 with hop 1.
        assert_eq!(
            (summary.sensor_windows, summary.sensor_state_changes),
            (236, 2),
            "{summary:?}"
        );
        let alarms = sub.wait_for("alarm", 2, Duration::from_secs(10));
        let states: Vec<&serde_json::Value> = alarms
            .iter()
            .map(|a| &a.data)
            .filter(|d| d["alarm"] == "sensor_state")
            .collect();
        assert_eq!(states.len(), 2, "{alarms:?}");
        // The valve closes at row 80 and reopens at row 160 (models/tools/make_pump_sample.py).
        assert_eq!(
            (&states[0]["previous"], &states[0]["health"]),
            (&"healthy".into(), &"alarm".into())
        );
        let top = states[0]["top"][0]["feature"].as_str().unwrap();
        assert!(
            [
                "Volume Flow RateRMS",
                "Pressure",
                "Accelerometer1RMS",
                "Current"
            ]
            .iter()
            .any(|c| top.starts_with(c)),
            "{top}"
        );
        assert_eq!(states[1]["health"], "healthy");
        let readings = sub.wait_for("sensor", 23, Duration::from_secs(10));
        assert_eq!(readings.len(), 23, "a reading every 10 windows");
        assert!(readings
            .iter()
            .all(|r| r.data["sensor"] == "pump1" && r.data["score"].as_f64().is_some()));
    }

    /// A station that watches a sensor alone (no camera, no vision model) takes a sensor
    /// model deployed over MQTT for its source: verified, health-checked, handed to the
    /// running source, confirmed; readings then name the new model. A vision model deployed
    /// for that source, and a sensor model for a source the station lacks, are refused and
    /// rolled back.
    #[test]
    fn a_sensor_only_station_takes_a_sensor_model_deployed_for_its_source() {
        use ed25519_dalek::{Signer, SigningKey};
        use sha2::Digest;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        pump_model(&d.join("pump.neo"));
        let mut opts = super::sensor::options(
            &repo().join("models/pump-sensor/normal.csv"),
            &d.join("pump-v2.neo"),
        );
        opts.window = Some(5);
        opts.stats = vec![neo_sensor::features::ProcessStat::Mean];
        opts.name = Some("pump-v2".into());
        neoc::sensor::train_sensor(&opts, &neo_boards::Boards::shipped()).unwrap();
        compiled_classifier(d);

        let key = SigningKey::from_bytes(&[3; 32]);
        let broker = Broker::start();
        let sub = Subscriber::start(broker.port, "e2e-sdeploy", "neo/e2e/l1/st1/#");
        let text = format!(
            r#"
[station]
name = "pumps"
[[sensors]]
name = "pump1"
model = "pump.neo"
path = "{replay}"
rate_hz = 400.0
loop = true
publish_every = 10
[mqtt]
host = "127.0.0.1"
port = {port}
site = "e2e"
line = "l1"
device = "st1"
[spool]
dir = "spool"
[commands]
trusted_keys = ["{key}"]
"#,
            replay = repo().join("models/pump-sensor/replay.csv").display(),
            port = broker.port,
            key = hex::encode(key.verifying_key().to_bytes()),
        );
        let config = StationConfig::from_toml(&text, d).unwrap();
        assert!(config.cameras.is_empty() && config.inspection.is_none());
        let station = std::thread::spawn(move || {
            station::run(
                config,
                RunOptions {
                    duration: Some(Duration::from_secs(10)),
                    ..Default::default()
                },
            )
        });
        let first = sub.wait_for("sensor", 1, Duration::from_secs(30));
        assert_eq!(first[0].data["model"], "normal", "{:?}", first[0]);

        let deploy = |id: &str, file: &str, sensor: &str| {
            let bytes = std::fs::read(d.join(file)).unwrap();
            let digest: [u8; 32] = sha2::Sha256::digest(&bytes).into();
            neo_e2e::publish_all(
                broker.port,
                vec![(
                    "neo/e2e/l1/st1/cmd/deploy".into(),
                    serde_json::json!({
                        "id": id, "name": file, "size": bytes.len(), "sensor": sensor,
                        "path": d.join(file),
                        "sha256": hex::encode(digest),
                        "signature": hex::encode(key.sign(&digest).to_bytes()),
                    })
                    .to_string()
                    .into_bytes(),
                )],
            );
        };
        let last_ack = |id: &str, n: usize| {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let acks: Vec<serde_json::Value> = sub
                    .envelopes("ack")
                    .into_iter()
                    .map(|e| e.data)
                    .filter(|a| a["cmd_id"] == id)
                    .collect();
                if acks.len() >= n {
                    return acks[n - 1].clone();
                }
                assert!(std::time::Instant::now() < deadline, "{id}: {acks:?}");
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        // Installed (first ack), then taken over by the running source (second).
        deploy("s-1", "pump-v2.neo", "pump1");
        assert_eq!(last_ack("s-1", 1)["ok"], true);
        let taken = last_ack("s-1", 2);
        assert_eq!(taken["ok"], true, "{taken}");
        assert!(
            taken["message"]
                .as_str()
                .unwrap()
                .contains("pump-v2 is watching pump1"),
            "{taken}"
        );
        let slots = neo_gateway::deploy::Slots::at(&d.join("spool/models/sensors/pump1")).unwrap();
        assert!(!slots.on_trial().unwrap());
        let v2_sha = hex::encode(sha2::Sha256::digest(
            std::fs::read(d.join("pump-v2.neo")).unwrap(),
        ));
        assert_eq!(slots.active().unwrap().unwrap().sha256, v2_sha);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !sub
            .envelopes("sensor")
            .iter()
            .any(|r| r.data["model"] == "pump-v2")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "no reading from the new model"
            );
            std::thread::sleep(Duration::from_millis(20));
        }

        // Refused: a vision model (its sensor health check fails), and a source the station
        // does not have (before anything is fetched or installed).
        for (id, file, sensor, why) in [
            ("s-2", "bottle.neo", "pump1", "health check"),
            ("s-3", "pump.neo", "fan7", "no sensor source \"fan7\""),
        ] {
            deploy(id, file, sensor);
            let refused = last_ack(id, 1);
            assert_eq!(refused["ok"], false, "{refused}");
            assert!(
                refused["message"].as_str().unwrap().contains(why),
                "{refused}"
            );
        }
        assert!(!d.join("spool/models/sensors/fan7").exists());
        assert_eq!(slots.active().unwrap().unwrap().sha256, v2_sha);

        let summary = station.join().unwrap().unwrap();
        assert_eq!(summary.frames, 0);
        assert!(summary.sensor_windows > 100, "{summary:?}");
    }

    /// `neoc bundle` for the x86_64 board with the real daemon, installed into an empty root
    /// by the bundle's own install script; the installed daemon then runs the station from the
    /// installed files only (its config's /opt/neo and /var/lib/neo prefixed with the root,
    /// as a chroot would see them).
    #[test]
    fn a_bundle_installs_into_an_empty_root_and_its_daemon_runs_the_station() {
        use std::os::unix::fs::PermissionsExt;
        use std::process::Command;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        compiled_classifier(d);
        copy_samples(&d.join("frames"));
        pump_model(&d.join("pump.neo"));
        std::fs::copy(
            repo().join("models/pump-sensor/replay.csv"),
            d.join("replay.csv"),
        )
        .unwrap();
        let broker = Broker::start();
        let sub = Subscriber::start(broker.port, "bundle-sub", "neo/site/line/boxdev/#");
        // The update server's CA (for deployments by https URL) travels with the bundle.
        std::fs::write(d.join("updates-ca.pem"), "-----BEGIN CERTIFICATE-----\n").unwrap();
        std::fs::write(
            d.join("station.toml"),
            format!(
                r#"
[station]
name = "boxed"
[[cameras]]
name = "cam0"
path = "frames"
fps = 10.0
loop = false
[inspection]
model = "bottle.neo"
ng_labels = ["defect"]
[[sensors]]
name = "pump1"
model = "pump.neo"
path = "replay.csv"
rate_hz = 1000.0
loop = false
[reject]
kind = "file"
path = "rejects.jsonl"
[mqtt]
host = "127.0.0.1"
port = {}
site = "site"
line = "line"
device = "boxdev"
[spool]
dir = "spool"
[commands]
url_ca = "updates-ca.pem"
"#,
                broker.port
            ),
        )
        .unwrap();
        // The daemon cargo built beside this test binary (target/<profile>/neo-gateway).
        let exe = std::env::current_exe().unwrap();
        let daemon = exe.parent().unwrap().parent().unwrap().join("neo-gateway");
        assert!(
            daemon.exists(),
            "{} missing: run `cargo build --workspace` first",
            daemon.display()
        );
        let tarball = d.join("gateway-x86_64.tar");
        let manifest = neoc::bundle::bundle(
            &neoc::bundle::BundleOptions {
                board: "x86_64".into(),
                config: d.join("station.toml"),
                daemon: Some(daemon),
                output: tarball.clone(),
                strip: true,
            },
            &neo_boards::Boards::shipped(),
        )
        .unwrap();
        assert!(
            manifest.files.contains_key("opt/neo/models/bottle.neo")
                && manifest
                    .files
                    .contains_key("opt/neo/data/sensor-pump1/replay.csv")
                && manifest.files.contains_key("etc/neo/tls/updates-ca.pem")
        );

        let unpacked = d.join("unpacked");
        let root = d.join("root");
        std::fs::create_dir_all(&unpacked).unwrap();
        std::fs::create_dir_all(&root).unwrap();
        assert!(Command::new("tar")
            .arg("xf")
            .arg(&tarball)
            .arg("-C")
            .arg(&unpacked)
            .status()
            .unwrap()
            .success());
        let install = Command::new("sh")
            .arg(unpacked.join("opt/neo/install.sh"))
            .arg(&root)
            .output()
            .unwrap();
        assert!(
            install.status.success(),
            "{}",
            String::from_utf8_lossy(&install.stderr)
        );

        // Laid out to boot into the daemon: executable, enabled unit, hashes as listed.
        let bin = root.join("opt/neo/bin/neo-gateway");
        assert!(std::fs::metadata(&bin).unwrap().permissions().mode() & 0o111 != 0);
        let wants = root.join("etc/systemd/system/multi-user.target.wants/neo-gateway.service");
        assert_eq!(
            std::fs::read_link(&wants).unwrap(),
            Path::new("../neo-gateway.service")
        );
        let unit = std::fs::read_to_string(&wants).unwrap();
        assert!(
            unit.contains(
                "ExecStart=/opt/neo/bin/neo-gateway run --quiet --config /etc/neo/station.toml"
            ),
            "{unit}"
        );
        for (name, h) in &manifest.files {
            let bytes = std::fs::read(root.join(name)).unwrap();
            assert_eq!(
                neo_runtime::artifact::sha256_hex(&bytes),
                h.sha256,
                "{name}"
            );
        }
        let config = std::fs::read_to_string(root.join("etc/neo/station.toml")).unwrap();
        assert!(
            config.contains("\"/opt/neo/models/bottle.neo\"")
                && config.contains("\"/var/lib/neo/spool\"")
                && config.contains("\"/etc/neo/tls/updates-ca.pem\""),
            "{config}"
        );

        // The installed daemon runs the station from the installed files alone.
        let local = config
            .replace("\"/opt/neo", &format!("\"{}/opt/neo", root.display()))
            .replace("\"/etc/neo", &format!("\"{}/etc/neo", root.display()))
            .replace(
                "\"/var/lib/neo",
                &format!("\"{}/var/lib/neo", root.display()),
            );
        let local_config = root.join("etc/neo/station.local.toml");
        std::fs::write(&local_config, local).unwrap();
        let run = Command::new(&bin)
            .args(["run", "--quiet", "--duration", "60", "--config"])
            .arg(&local_config)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{log}");
        let summary: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
        assert_eq!(
            (
                summary["frames"].as_u64(),
                summary["sensor_state_changes"].as_u64()
            ),
            (Some(5), Some(2)),
            "{log}"
        );
        assert_eq!(
            sub.wait_for("inspection", 5, Duration::from_secs(10)).len(),
            5
        );
        assert!(
            root.join("var/lib/neo/rejects.jsonl").exists(),
            "NG parts pulsed the installed reject output"
        );

        // A bundle damaged in transit is refused by the install script.
        let model = unpacked.join("opt/neo/models/pump.neo");
        let mut bytes = std::fs::read(&model).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&model, bytes).unwrap();
        let again = Command::new("sh")
            .arg(unpacked.join("opt/neo/install.sh"))
            .arg(d.join("root2"))
            .output()
            .unwrap();
        assert!(!again.status.success());
        assert!(
            String::from_utf8_lossy(&again.stderr).contains("corrupt"),
            "{}",
            String::from_utf8_lossy(&again.stderr)
        );
    }

    #[test]
    fn corrupt_model_and_vanished_camera_fail_safe_and_a_dead_broker_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        copy_samples(&dir.path().join("frames"));
        // A corrupt artifact: the station starts, says why, and rejects every part.
        std::fs::write(dir.path().join("bottle.neo"), b"this is not an artifact").unwrap();
        let mut broker = Broker::start();
        broker.stop(); // the broker is down for the whole first run
        let config = station_toml(dir.path(), broker.port, "frames", "loop = false");
        let summary = station::run(
            config.clone(),
            RunOptions {
                duration: Some(Duration::from_secs(30)),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            (summary.frames, summary.ng, summary.fail_safe),
            (5, 5, 5),
            "{summary:?}"
        );
        assert!(
            summary.spool_queued_at_exit >= 6,
            "results and the alarm wait in the spool: {summary:?}"
        );

        // The broker comes back; the next run (a camera that only takes frames on command)
        // delivers what the first one spooled.
        broker.restart();
        let sub = Subscriber::start(broker.port, "e2e-sub2", "neo/e2e/l1/st1/#");
        compiled_classifier(dir.path());
        let idle = station_toml(dir.path(), broker.port, "frames", "trigger = \"software\"");
        station::run(
            idle,
            RunOptions {
                duration: Some(Duration::from_secs(3)),
                ..Default::default()
            },
        )
        .unwrap();
        let results = sub.wait_for("inspection", 5, Duration::from_secs(10));
        assert_eq!(results.len(), 5);
        assert!(results
            .iter()
            .all(|r| r.data["fail_safe"] == true && r.data["verdict"] == "NG"));
        assert!(results[0].data["reason"]
            .as_str()
            .unwrap()
            .contains("model unavailable"));
        let alarms = sub.envelopes("alarm");
        assert!(
            alarms
                .iter()
                .any(|a| a.data["alarm"] == "model_unavailable"),
            "{alarms:?}"
        );

        // The camera folder vanishes mid-run and comes back: parts in between are rejected
        // (fail-safe), then inspection resumes.
        let frames = dir.path().join("frames");
        let hidden = dir.path().join("frames-away");
        let running = {
            let config = station_toml(dir.path(), broker.port, "frames", "loop = true");
            std::thread::spawn(move || {
                station::run(
                    config,
                    RunOptions {
                        duration: Some(Duration::from_secs(4)),
                        ..Default::default()
                    },
                )
            })
        };
        std::thread::sleep(Duration::from_millis(1200));
        std::fs::rename(&frames, &hidden).unwrap();
        std::thread::sleep(Duration::from_millis(1000));
        std::fs::rename(&hidden, &frames).unwrap();
        let summary = running.join().unwrap().unwrap();
        assert!(summary.fail_safe >= 3, "{summary:?}");
        assert!(summary.ok >= 2, "{summary:?}");
        let alarms = sub.wait_for("alarm", 3, Duration::from_secs(10));
        assert!(
            alarms.iter().any(|a| a.data["alarm"] == "camera_failed"),
            "{alarms:?}"
        );
        assert!(
            alarms.iter().any(|a| a.data["alarm"] == "camera_recovered"),
            "{alarms:?}"
        );
        let all = sub.wait_for(
            "inspection",
            5 + summary.frames as usize,
            Duration::from_secs(10),
        );
        assert_eq!(
            all.len() as u64,
            5 + summary.frames,
            "every part has its result"
        );
    }
}

/// Sensor models on the real datasets (issue 5's measures).
mod sensor {
    use super::data;
    use neo_boards::Boards;
    use neo_sensor::features::{AccelUnit, Bearing, ProcessStat};
    use neo_sensor::{AlarmPolicy, ModelKind, ThresholdRule};
    use neoc::sensor::{eval_sensor, train_sensor, SensorEvalReport, SensorTrainOptions};
    use std::path::Path;

    pub(super) fn options(normal: &Path, out: &Path) -> SensorTrainOptions {
        SensorTrainOptions {
            normal: vec![normal.to_path_buf()],
            channels: None,
            use_fraction: 1.0,
            sample_rate_hz: None,
            units: AccelUnit::G,
            window: None,
            hop: None,
            bearing: None,
            stats: Vec::new(),
            model: ModelKind::Pca,
            threshold: ThresholdRule::default(),
            commission_frames: None,
            alarm: AlarmPolicy::default(),
            target: "x86_64".into(),
            name: None,
            output: out.to_path_buf(),
        }
    }

    #[test]
    #[ignore = "needs ../shared/data (run by .ci/run)"]
    fn cwru_every_fault_detected_with_at_most_1pct_false_alarms() {
        let dir = tempfile::tempdir().unwrap();
        let root = data().join("sensors/cwru_12k_0hp");
        let out = dir.path().join("bearing.neo");
        let mut opts = options(&root.join("Normal/97_Normal_0.mat"), &out);
        opts.channels = Some(vec!["DE".into()]);
        opts.sample_rate_hz = Some(12_000.0);
        opts.bearing = Some(Bearing::cwru_drive_end(1797.0));
        opts.use_fraction = 0.5;
        train_sensor(&opts, &Boards::shipped()).expect("trains");
        let SensorEvalReport::Cwru {
            false_alarm_pct,
            faults,
            normal_windows,
            ..
        } = eval_sensor(&out, &root).expect("evaluates")
        else {
            panic!("CWRU layout expected")
        };
        assert!(normal_windows > 400, "{normal_windows}");
        assert!(false_alarm_pct <= 1.0, "false alarms {false_alarm_pct} %");
        assert_eq!(faults.len(), 9);
        for f in &faults {
            assert!(f.detected_pct >= 99.0, "{}: {} %", f.fault, f.detected_pct);
        }
    }

    #[test]
    #[ignore = "needs ../shared/data (run by .ci/run)"]
    fn skab_valve1_with_commissioning_beats_f1_080_at_far_15pct() {
        let dir = tempfile::tempdir().unwrap();
        let root = data().join("sensors/skab/data");
        let out = dir.path().join("pump.neo");
        let mut opts = options(&root.join("anomaly-free/anomaly-free.csv"), &out);
        // The thermal channels drift through every run (see docs/benchmarks.md).
        opts.channels = Some(
            [
                "Accelerometer1RMS",
                "Accelerometer2RMS",
                "Current",
                "Pressure",
                "Voltage",
                "Volume Flow RateRMS",
            ]
            .map(String::from)
            .to_vec(),
        );
        opts.window = Some(5);
        opts.stats = vec![ProcessStat::Mean, ProcessStat::Std];
        opts.commission_frames = Some(400);
        train_sensor(&opts, &Boards::shipped()).expect("trains");
        let SensorEvalReport::Skab { alarm, files, .. } =
            eval_sensor(&out, &root.join("valve1")).expect("evaluates")
        else {
            panic!("SKAB layout expected")
        };
        assert_eq!(files.len(), 16);
        assert!(
            alarm.f1 >= 0.80 && alarm.far_pct <= 15.0,
            "F1 {} FAR {} % MAR {} %",
            alarm.f1,
            alarm.far_pct,
            alarm.mar_pct
        );
    }
}

/// Issue 3's targets on the real models, for both schemes (int8 weights; int8 compute, what
/// dot-product boards get): `--quantize int8` calibrated on mvtec_bottle passes its own gate,
/// the artifact is at most 30 % of the f32 one, the outputs on images the calibration never
/// saw keep a cosine of at least 0.99 to f32 (int8 compute: on average, and at least 0.9 on
/// every image: its int8 activations flip near-tied ImageNet classes on some bottle photos),
/// and the sanity classes hold.
#[test]
#[ignore = "needs ../shared/data (run by .ci/run)"]
fn int8_squeezenet_and_efficientnet_meet_the_size_and_cosine_targets() {
    let dir = tempfile::tempdir().unwrap();
    for (name, model, card, mixed) in [
        (
            "squeezenet",
            "models/squeezenet1.1/squeezenet1.1_fp32_derived.onnx",
            "squeezenet1.1.toml",
            false,
        ),
        (
            "effnet",
            "models/efficientnet_lite0/efficientnet_lite0_derived.onnx",
            "efficientnet_lite0.toml",
            true,
        ),
    ] {
        let f32_out = dir.path().join(format!("{name}.neo"));
        let f32_model = compile(model, card, &f32_out);
        for compute in [false, true] {
            let out = dir.path().join(format!("{name}-int8-{compute}.neo"));
            let mut q =
                neoc::quantize::QuantizeOptions::new(data().join("images/mvtec_bottle/train/good"));
            q.max_images = 100;
            q.mixed_precision = mixed;
            q.int8_compute = Some(compute);
            let opts = CompileOptions {
                model: data().join(model),
                target: "x86_64".into(),
                output: out.clone(),
                card: Some(repo().join("models/cards").join(card)),
                labels: Some(data().join("models/squeezenet1.1/squeeze-labels.txt")),
                quantize: Some(q),
                ..Default::default()
            };
            let report = neoc::compile(&opts, &Boards::shipped()).expect("int8 compiles");
            let quant = report.quantization.expect("a quantization report");
            assert!(
                quant.accuracy.iter().all(|a| a.passed),
                "{}",
                quant.summary()
            );
            let ratio = std::fs::metadata(&out).unwrap().len() as f64
                / std::fs::metadata(&f32_out).unwrap().len() as f64;
            assert!(
                ratio <= 0.30,
                "{name}: int8 artifact is {:.1} % of f32",
                ratio * 100.0
            );

            let int8_model = Model::load(&out).unwrap();
            assert_eq!(int8_model.int8_kernel().is_some(), compute, "{name}");
            assert_eq!(top1(&int8_model, "bald_eagle.jpeg").0, 22, "{name}");
            assert_eq!(top1(&int8_model, "pelican.jpeg").0, 144, "{name}");
            let (mut worst, mut sum, mut n) = (1f64, 0f64, 0usize);
            for kind in ["good", "broken_large", "contamination"] {
                let folder = data().join("images/mvtec_bottle/test").join(kind);
                for path in preprocess::list_images(&folder).unwrap() {
                    let img = preprocess::load(&path).unwrap();
                    let run = |m: &Model| {
                        let out = m.run(vec![m.image_tensor(&img).unwrap()]).unwrap();
                        neo_runtime::tensor_to_f32(&out[0]).unwrap()
                    };
                    let (a, b) = (run(&f32_model), run(&int8_model));
                    let dot: f64 = a
                        .iter()
                        .zip(&b)
                        .map(|(x, y)| (*x as f64) * (*y as f64))
                        .sum();
                    let norm =
                        |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                    let cosine = dot / (norm(&a) * norm(&b));
                    worst = worst.min(cosine);
                    sum += cosine;
                    n += 1;
                }
            }
            let mean = sum / n as f64;
            let floor = if compute { 0.9 } else { 0.99 };
            assert!(
            mean >= 0.99 && worst >= floor,
            "{name} (int8 compute {compute}): cosine to f32 on unseen images mean {mean}, worst {worst}"
        );
        }
    }
}
