//! The gateway against a real Mosquitto (Debian package `mosquitto`, installed by `.ci/run`),
//! started on a free loopback port, stopped and restarted as each test needs (helpers in
//! `neo-e2e`, shared with the end-to-end tests).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use neo_e2e::{free_port, publish_all, Broker, ReceivedEnvelope, Subscriber};
use neo_gateway::{Class, Gateway, GatewayConfig};

/// The repository root (fixtures and samples live there).
fn repo() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Copies the shipped compiled fixture `models/fixtures/<name>.neo` to `to`.
fn fixture(name: &str, to: &Path) {
    std::fs::copy(repo().join(format!("models/fixtures/{name}.neo")), to).unwrap();
}

fn gateway_bin() -> &'static str {
    env!("CARGO_BIN_EXE_neo-gateway")
}

/// Runs the link of an in-process gateway on its own runtime until dropped.
struct Running {
    gateway: Gateway,
    commands: neo_gateway::command::Commands,
    stop: tokio::sync::watch::Sender<bool>,
    rt: tokio::runtime::Runtime,
    link: Option<tokio::task::JoinHandle<neo_gateway::Result<()>>>,
}

fn start_gateway(config: GatewayConfig) -> Running {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (gateway, link, commands) = Gateway::start(config).unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let link = Some(rt.spawn(link.run(rx)));
    Running {
        gateway,
        commands,
        stop,
        rt,
        link,
    }
}

impl Running {
    fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(l) = self.link.take() {
            self.rt.block_on(l).unwrap().unwrap();
        }
    }
}

#[test]
fn nothing_is_lost_across_broker_restarts_and_a_gateway_kill() {
    loss_test("3.1.1", "lossdev");
}

#[test]
fn nothing_is_lost_with_mqtt5_either() {
    loss_test("5", "loss5dev");
}

fn loss_test(protocol: &str, device: &str) {
    const COUNT: u64 = 10_000;
    let mut broker = Broker::start();
    let sub = Subscriber::start(
        broker.port,
        &format!("{device}-sub"),
        &format!("neo/site/line/{device}/inspection"),
    );
    let spool = tempfile::tempdir().unwrap();
    let broker_addr = format!("127.0.0.1:{}", broker.port);
    let spawn = || {
        Command::new(gateway_bin())
            .args([
                "loadgen",
                "--broker",
                &broker_addr,
                "--device",
                device,
                "--protocol",
                protocol,
                "--spool",
            ])
            .arg(spool.path())
            .args([
                "--count",
                &COUNT.to_string(),
                "--rate",
                "1500",
                "--wait",
                "90",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut gw = spawn();
    let t0 = Instant::now();
    let at = |s: f64| {
        let due = t0 + Duration::from_secs_f64(s);
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    };
    at(1.0);
    broker.stop();
    at(2.0);
    broker.restart();
    at(3.0);
    assert!(
        gw.try_wait().unwrap().is_none(),
        "the gateway finished before it could be killed"
    );
    gw.kill().unwrap(); // SIGKILL: no chance to flush anything
    gw.wait().unwrap();
    let gw = spawn();
    at(4.5);
    broker.stop();
    at(5.5);
    broker.restart();
    let out = gw.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "loadgen failed: {log}");
    assert!(
        log.contains("resuming at result"),
        "no resume after the kill: {log}"
    );
    let got = sub.wait_for("inspection", COUNT as usize, Duration::from_secs(60));
    let mut counts: BTreeMap<u64, u32> = BTreeMap::new();
    for e in &got {
        *counts.entry(e.seq).or_default() += 1;
        assert_eq!(
            e.data["n"].as_u64(),
            Some(e.seq),
            "payload and sequence disagree"
        );
        assert_eq!(e.device, device);
    }
    let missing: Vec<u64> = (0..COUNT).filter(|n| !counts.contains_key(n)).collect();
    let duplicates: u32 = counts.values().map(|c| c - 1).sum();
    eprintln!(
        "loss test (MQTT {protocol}): {} received, {} distinct, {} duplicates, {} missing",
        got.len(),
        counts.len(),
        duplicates,
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "lost {} results, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(counts.len() as u64, COUNT, "ids outside 0..{COUNT}");
}

/// MQTT 5: Mosquitto answers a publish its ACL forbids with a PUBACK carrying "not
/// authorized". The link must not take that as delivery: the alarms the ACL forbids stay in
/// the spool (counted, named) and are retried on the same connection, while the results it
/// allows keep flowing and the device never looks offline; once the ACL is fixed (reloaded
/// live), the alarms arrive. (Over 3.1.1 the broker acknowledges and drops such a publish;
/// the protocol has no way to say so.)
#[test]
fn mqtt5_a_publish_the_broker_refuses_stays_spooled_until_it_is_allowed() {
    let acl = |allow_alarms: bool| {
        let base = "neo/site/line/acldev";
        let mut text = format!(
            "topic readwrite #\nuser gw\ntopic readwrite {base}/status\ntopic readwrite {base}/cmd/#\ntopic readwrite {base}/inspection\n"
        );
        if allow_alarms {
            text.push_str(&format!("topic readwrite {base}/alarm\n"));
        }
        text
    };
    let broker = Broker::start_with(|dir| {
        std::fs::write(dir.join("acl"), acl(false)).unwrap();
        format!("acl_file {}/acl", dir.display())
    });
    let sub = Subscriber::start(broker.port, "acl-sub", "neo/site/line/acldev/#");
    let spool = tempfile::tempdir().unwrap();
    let mut config = GatewayConfig::local("127.0.0.1", broker.port, "acldev", spool.path().into());
    config.mqtt.protocol = neo_gateway::config::Protocol::V5;
    config.mqtt.username = Some("gw".into());
    config.mqtt.reconnect_min_ms = 100;
    config.mqtt.reconnect_max_ms = 400;
    let run = start_gateway(config);
    for n in 0..5 {
        run.gateway
            .publish(Class::Alarm, serde_json::json!({"alarm": "test", "n": n}))
            .unwrap();
    }
    for n in 0..20 {
        run.gateway
            .publish(Class::Inspection, serde_json::json!({"n": n}))
            .unwrap();
    }
    // The allowed stream flows; the refused one is retried, never delivered, never removed.
    let results = sub.wait_for("inspection", 20, Duration::from_secs(10));
    assert_eq!(results.len(), 20, "the allowed results must not wait");
    let deadline = Instant::now() + Duration::from_secs(10);
    while run.gateway.telemetry()["link"]["refused"]
        .as_u64()
        .unwrap_or(0)
        < 15
    {
        assert!(
            Instant::now() < deadline,
            "not retried: {}",
            run.gateway.telemetry()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let telemetry = run.gateway.telemetry();
    assert_eq!(telemetry["link"]["protocol"], "5");
    assert_eq!(
        telemetry["spool"]["streams"]["alarm"]["queued"].as_u64(),
        Some(5),
        "{telemetry}"
    );
    assert_eq!(
        telemetry["link"]["connects"].as_u64(),
        Some(1),
        "retries reconnected: {telemetry}"
    );
    let last_error = run.gateway.stats().last_error.lock().unwrap().clone();
    assert!(
        last_error
            .as_deref()
            .is_some_and(|e| e.contains("NotAuthorized") && e.contains("kept in the spool")),
        "{last_error:?}"
    );
    assert!(sub.envelopes("alarm").is_empty());
    let states: Vec<String> = sub
        .got
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| t.ends_with("/status"))
        .map(|(_, p)| serde_json::from_slice::<serde_json::Value>(p).unwrap()["state"].to_string())
        .collect();
    assert_eq!(
        states,
        vec!["\"online\""],
        "the device must not flap offline"
    );

    // The operator fixes the ACL; Mosquitto reloads it; the alarms arrive on the same
    // connection.
    std::fs::write(broker.dir.path().join("acl"), acl(true)).unwrap();
    broker.reload();
    let got = sub.wait_for("alarm", 5, Duration::from_secs(20));
    let seqs: std::collections::BTreeSet<u64> = got.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (0..5).collect());
    assert!(run.gateway.wait_delivered(Duration::from_secs(10)).unwrap());
    assert_eq!(
        run.gateway.telemetry()["link"]["connects"].as_u64(),
        Some(1)
    );
    run.shutdown();
}

#[test]
fn full_spool_drops_telemetry_first_and_every_result_arrives() {
    let broker = Broker::start();
    let spool = tempfile::tempdir().unwrap();
    let mut config = GatewayConfig::local("127.0.0.1", broker.port, "fulldev", spool.path().into());
    config.spool.max_mb = 0.05; // about 52 KB
                                // Fill the spool before the link runs (as during a long outage).
    let (gateway, link, _commands) = Gateway::start(config.clone()).unwrap();
    for n in 0..300 {
        gateway
            .publish(
                Class::Telemetry,
                serde_json::json!({"n": n, "pad": "t".repeat(100)}),
            )
            .unwrap();
    }
    for n in 0..200 {
        gateway
            .publish(
                Class::Inspection,
                serde_json::json!({"n": n, "verdict": "OK"}),
            )
            .unwrap();
    }
    gateway.flush().unwrap();
    let stats = gateway.spool().stats();
    let tele = &stats[Class::Telemetry as usize].1;
    let insp = &stats[Class::Inspection as usize].1;
    assert_eq!(insp.queued, 200, "a result was dropped: {insp:?}");
    assert_eq!(insp.dropped_budget, 0);
    assert!(tele.dropped_budget > 0, "{tele:?}");
    assert_eq!(tele.queued + tele.dropped_budget, 300);
    assert!(gateway.spool().total_bytes() <= 52_428);
    let telemetry = gateway.telemetry();
    assert_eq!(
        telemetry["spool"]["streams"]["telemetry"]["dropped_budget"].as_u64(),
        Some(tele.dropped_budget)
    );
    drop(link);
    assert!(
        gateway.close(Duration::from_secs(5)),
        "the spool did not close"
    );

    let sub = Subscriber::start(broker.port, "full-sub", "neo/site/line/fulldev/#");
    let run = start_gateway(config);
    let results = sub.wait_for("inspection", 200, Duration::from_secs(30));
    let seqs: std::collections::BTreeSet<u64> = results.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (0..200).collect());
    let tele_got = sub.wait_for("telemetry", 300, Duration::from_secs(2));
    assert!(
        !tele_got.is_empty() && tele_got.len() < 300,
        "{}",
        tele_got.len()
    );
    // The surviving telemetry is the newest: its sequence numbers end at 299.
    assert_eq!(tele_got.iter().map(|e| e.seq).max(), Some(299));
    assert!(run.gateway.wait_delivered(Duration::from_secs(10)).unwrap());
    run.shutdown();
}

#[test]
fn status_is_retained_online_and_the_will_says_offline_after_a_crash() {
    let broker = Broker::start();
    let spool = tempfile::tempdir().unwrap();
    let mut config =
        GatewayConfig::local("127.0.0.1", broker.port, "statusdev", spool.path().into());
    config.mqtt.keep_alive_s = 1;
    let run = start_gateway(config.clone());
    // A late subscriber gets the retained status.
    std::thread::sleep(Duration::from_millis(500));
    let sub = Subscriber::start(broker.port, "status-sub", "neo/site/line/statusdev/status");
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = |sub: &Subscriber| -> Vec<serde_json::Value> {
        sub.got
            .lock()
            .unwrap()
            .iter()
            .map(|(_, p)| serde_json::from_slice(p).unwrap())
            .collect()
    };
    while status(&sub).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let first = status(&sub);
    assert_eq!(first[0]["state"], "online", "{first:?}");
    assert_eq!(first[0]["versions"]["schema"], 1);
    // Dropping the runtime without a goodbye is a crash as far as the broker can tell.
    std::mem::forget(run.stop);
    drop(run.rt);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(&sub);
        if s.last().map(|v| v["state"] == "offline").unwrap_or(false) {
            break;
        }
        assert!(Instant::now() < deadline, "no offline will: {s:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn publish_raw(port: u16, topic: &str, payload: &[u8]) {
    publish_all(port, vec![(topic.to_string(), payload.to_vec())]);
}

#[test]
fn commands_are_validated_and_bad_deployments_refused() {
    use ed25519_dalek::{Signer, SigningKey};
    use sha2::Digest;
    let broker = Broker::start();
    let spool = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[42; 32]);
    let mut config = GatewayConfig::local("127.0.0.1", broker.port, "cmddev", spool.path().into());
    config.commands.trusted_keys = vec![hex::encode(key.verifying_key().to_bytes())];
    let mut run = start_gateway(config.clone());
    let sub = Subscriber::start(broker.port, "cmd-sub", "neo/site/line/cmddev/ack");
    std::thread::sleep(Duration::from_millis(300)); // the gateway subscribes after connecting
    let cmd = |name: &str, body: &str| {
        publish_raw(
            broker.port,
            &format!("neo/site/line/cmddev/cmd/{name}"),
            body.as_bytes(),
        )
    };
    cmd("set_threshold", "{not json");
    cmd("set_threshold", r#"{"id":"t1","value":-3}"#);
    cmd("reboot", r#"{"id":"r1"}"#);
    cmd("set_threshold", r#"{"id":"t2","value":1.25,"model":"det"}"#);
    cmd("pause", r#"{"id":"p1","v":2}"#);

    // A deployment signed by an unknown key, one whose bytes do not match its hash, and one
    // that is fine but not a model.
    let artifact = spool.path().join("incoming.neo");
    std::fs::write(&artifact, b"definitely not a neo artifact").unwrap();
    let bytes = std::fs::read(&artifact).unwrap();
    let digest: [u8; 32] = sha2::Sha256::digest(&bytes).into();
    let stranger = SigningKey::from_bytes(&[9; 32]).sign(&digest);
    let good = key.sign(&digest);
    let deploy = |id: &str, sha: &[u8], sig: &ed25519_dalek::Signature| {
        serde_json::json!({
            "id": id, "name": "det", "size": bytes.len(),
            "sha256": hex::encode(sha), "signature": hex::encode(sig.to_bytes()),
            "path": artifact.to_str().unwrap(),
        })
        .to_string()
    };
    cmd("deploy", &deploy("d1", &digest, &stranger));
    let mut wrong = digest;
    wrong[0] ^= 0xff;
    cmd("deploy", &deploy("d2", &wrong, &key.sign(&wrong)));
    cmd("deploy", &deploy("d3", &digest, &good));
    cmd("status", r#"{"id":"s1"}"#);
    // A path that is not a regular file of the announced size is refused before any read.
    let dev_zero = serde_json::json!({
        "id": "d4", "name": "det", "size": bytes.len(),
        "sha256": hex::encode(digest), "signature": hex::encode(good.to_bytes()),
        "path": "/dev/zero",
    });
    cmd("deploy", &dev_zero.to_string());

    let acks = sub.wait_for("ack", 9, Duration::from_secs(20));
    let by_id = |id: Option<&str>| -> Vec<serde_json::Value> {
        acks.iter()
            .filter(|e| e.data["cmd_id"].as_str() == id)
            .map(|e| e.data.clone())
            .collect()
    };
    let refused = |id: Option<&str>, why: &str| {
        let a = by_id(id);
        assert_eq!(a.len(), 1, "{id:?}: {acks:?}");
        assert_eq!(a[0]["ok"], false, "{id:?}: {a:?}");
        let m = a[0]["message"].as_str().unwrap();
        assert!(m.contains(why), "{id:?}: {m}");
    };
    refused(None, "not JSON");
    refused(Some("t1"), "positive number");
    refused(Some("r1"), "unknown command");
    refused(Some("p1"), "schema version");
    refused(Some("d1"), "signature");
    refused(Some("d2"), "sha256");
    refused(Some("d3"), "health check");
    refused(Some("d4"), "not a regular file");
    let status = by_id(Some("s1"));
    assert_eq!(status[0]["ok"], true);
    let s: serde_json::Value =
        serde_json::from_str(status[0]["message"].as_str().unwrap()).unwrap();
    assert_eq!(
        s["model"],
        serde_json::Value::Null,
        "a refused model became active: {s}"
    );
    assert!(neo_gateway::deploy::Slots::peek(&config.models_dir())
        .unwrap()
        .is_none());

    // The one valid command reached the application, which acknowledges it.
    let c = run
        .commands
        .try_recv()
        .expect("set_threshold did not arrive");
    assert_eq!(
        c.action,
        neo_gateway::command::Action::SetThreshold {
            model: Some("det".into()),
            value: 1.25
        }
    );
    assert!(
        run.commands.try_recv().is_none(),
        "a refused command reached the application"
    );
    run.gateway
        .ack(Some(&c.id), "set_threshold", true, "threshold 1.25");
    let acks = sub.wait_for("ack", 10, Duration::from_secs(10));
    assert!(acks
        .iter()
        .any(|e| e.data["cmd_id"] == "t2" && e.data["ok"] == true));
    run.shutdown();
}

#[test]
fn samples_are_chunked_under_the_packet_limit_and_never_starve_results() {
    use base64::Engine;
    use sha2::Digest;
    let broker = Broker::start();
    let spool = tempfile::tempdir().unwrap();
    let mut config =
        GatewayConfig::local("127.0.0.1", broker.port, "sampledev", spool.path().into());
    config.mqtt.max_packet_bytes = 32 * 1024;
    config.samples.max_bytes_per_s = 100 * 1024;
    let sub = Subscriber::start(broker.port, "sample-sub", "neo/site/line/sampledev/#");
    let run = start_gateway(config);
    // A noisy 256x256 frame: its JPEG is far larger than one 32 KiB packet.
    let frame = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(256, 256, |x, y| {
        let h = (x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503)).wrapping_mul(2246822519);
        image::Rgb([(h >> 8) as u8, (h >> 16) as u8, (h >> 24) as u8])
    }));
    let jpeg = neo_gateway::samples::encode_jpeg(&frame, 90).unwrap();
    assert!(jpeg.len() > 64 * 1024, "{}", jpeg.len());
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(
            run.gateway
                .publish_sample(
                    "image/jpeg",
                    &jpeg,
                    serde_json::json!({"frame": i, "verdict": "NG"}),
                )
                .unwrap(),
        );
    }
    // Results published after the samples still go first.
    for n in 0..50 {
        run.gateway
            .publish(Class::Inspection, serde_json::json!({ "n": n }))
            .unwrap();
    }
    let results = sub.wait_for("inspection", 50, Duration::from_secs(10));
    assert_eq!(results.len(), 50);
    assert!(run.gateway.wait_delivered(Duration::from_secs(60)).unwrap());
    let got = sub.got.lock().unwrap().clone();
    let last_result = got
        .iter()
        .rposition(|(t, _)| t.ends_with("/inspection"))
        .unwrap();
    let last_chunk = got
        .iter()
        .rposition(|(t, _)| t.contains("/samples/"))
        .unwrap();
    assert!(last_result < last_chunk, "samples delayed the results");
    for id in &ids {
        let mut chunks: Vec<ReceivedEnvelope> = got
            .iter()
            .filter(|(t, _)| t.ends_with(&format!("/samples/{id}")))
            .map(|(_, p)| {
                assert!(p.len() <= 32 * 1024, "chunk of {} bytes", p.len());
                serde_json::from_slice(p).unwrap()
            })
            .collect();
        chunks.sort_by_key(|c| c.data["chunk"].as_u64());
        chunks.dedup_by_key(|c| c.data["chunk"].as_u64());
        let n = chunks[0].data["chunks"].as_u64().unwrap() as usize;
        assert!(n >= 3, "{n} chunks");
        assert_eq!(chunks.len(), n);
        let bytes: Vec<u8> = chunks
            .iter()
            .flat_map(|c| {
                base64::engine::general_purpose::STANDARD
                    .decode(c.data["data"].as_str().unwrap())
                    .unwrap()
            })
            .collect();
        assert_eq!(bytes, jpeg);
        assert_eq!(
            chunks[0].data["sha256"].as_str().unwrap(),
            hex::encode(sha2::Sha256::digest(&bytes))
        );
        assert!(chunks[0].data["meta"]["verdict"] == "NG");
        image::load_from_memory(&bytes).unwrap();
    }
    run.shutdown();
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("these tests need the openssl command to make certificates");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private CA, a server certificate for localhost and a client certificate, as PEM files.
fn make_certs(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=neo test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ];
    ca.extend(ec);
    openssl(dir, &ca);
    for (name, cn, ext) in [
        (
            "server",
            "localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ),
        ("client", "cam1", "extendedKeyUsage=clientAuth"),
    ] {
        let mut req = vec!["req", "-new", "-subj"];
        let subj = format!("/CN={cn}");
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        req.extend([subj.as_str(), "-keyout", &key, "-out", &csr]);
        req.extend(ec);
        openssl(dir, &req);
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        let ext_file = format!("{name}.ext");
        let pem = format!("{name}.pem");
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext_file,
                "-out",
                &pem,
            ],
        );
    }
}

#[test]
fn tls_with_a_client_certificate_and_without_one() {
    let tls_port = free_port();
    let broker = Broker::start_with(|dir| {
        make_certs(dir);
        format!(
            "listener {tls_port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\nrequire_certificate true\nuse_identity_as_username true\n",
            d = dir.display()
        )
    });
    let certs = broker.dir.path();
    let sub = Subscriber::start(broker.port, "tls-sub", "neo/site/line/+/inspection");
    let spool = tempfile::tempdir().unwrap();
    let mut config = GatewayConfig::local("localhost", tls_port, "tlsdev", spool.path().join("a"));
    config.mqtt.tls = Some(neo_gateway::config::TlsConfig {
        ca: certs.join("ca.pem"),
        cert: Some(certs.join("client.pem")),
        key: Some(certs.join("client.key")),
    });
    let run = start_gateway(config.clone());
    run.gateway
        .publish(Class::Inspection, serde_json::json!({"n": 1}))
        .unwrap();
    let got = sub.wait_for("inspection", 1, Duration::from_secs(10));
    assert_eq!(got.len(), 1, "nothing arrived over TLS");
    assert_eq!(got[0].device, "tlsdev");
    run.shutdown();

    // Without a client certificate the broker refuses the handshake; the result waits.
    config.mqtt.device = "nocert".into();
    config.spool.dir = spool.path().join("b");
    if let Some(tls) = config.mqtt.tls.as_mut() {
        tls.cert = None;
        tls.key = None;
    }
    let run = start_gateway(config.clone());
    run.gateway
        .publish(Class::Inspection, serde_json::json!({"n": 2}))
        .unwrap();
    assert!(!run.gateway.wait_delivered(Duration::from_secs(2)).unwrap());
    let stats = run.gateway.stats();
    assert!(
        stats
            .connection_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    assert!(!stats.connected.load(std::sync::atomic::Ordering::Relaxed));
    assert_eq!(run.gateway.spool().queued(), 1);
    assert!(sub
        .envelopes("inspection")
        .iter()
        .all(|e| e.device != "nocert"));
    run.shutdown();

    // A CA file that holds no certificate is a clear configuration error.
    std::fs::write(spool.path().join("empty.pem"), "").unwrap();
    config.mqtt.tls = Some(neo_gateway::config::TlsConfig {
        ca: spool.path().join("empty.pem"),
        cert: None,
        key: None,
    });
    config.spool.dir = spool.path().join("c");
    let err = Gateway::start(config).err().unwrap();
    assert!(err.to_string().contains("no PEM certificate"), "{err}");
}

/// A gateway that trusts the key made from `seed`, with its broker and a subscriber to its
/// acks: what the deployment tests start from.
fn deploy_setup(
    work: &Path,
    device: &str,
    seed: u8,
    adjust: impl FnOnce(&mut GatewayConfig),
) -> (
    Broker,
    ed25519_dalek::SigningKey,
    GatewayConfig,
    Running,
    Subscriber,
) {
    let broker = Broker::start();
    let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
    let mut config = GatewayConfig::local("127.0.0.1", broker.port, device, work.join("spool"));
    config.commands.trusted_keys = vec![hex::encode(key.verifying_key().to_bytes())];
    adjust(&mut config);
    let run = start_gateway(config.clone());
    let sub = Subscriber::start(
        broker.port,
        &format!("{device}-sub"),
        &format!("neo/site/line/{device}/ack"),
    );
    std::thread::sleep(Duration::from_millis(300));
    (broker, key, config, run, sub)
}

#[test]
fn a_signed_model_deployed_in_chunks_becomes_active_and_a_tampered_one_does_not() {
    use base64::Engine;
    use ed25519_dalek::Signer;
    use sha2::Digest;
    // A real artifact: the shipped compiled fixture (models/fixtures/tiny_conv.neo, kept equal
    // to what neoc compiles by neoc's tests), so these tests need no ONNX compiler.
    let work = tempfile::tempdir().unwrap();
    let artifact = work.path().join("bottle.neo");
    let repo = repo();
    std::fs::copy(repo.join("models/fixtures/tiny_conv.neo"), &artifact).unwrap();
    let bytes = std::fs::read(&artifact).unwrap();

    let (broker, key, config, mut run, sub) = deploy_setup(work.path(), "deploydev", 5, |c| {
        c.mqtt.max_packet_bytes = 64 * 1024;
    });

    let send = |id: &str, bytes: &[u8], tamper: bool| {
        let digest: [u8; 32] = sha2::Sha256::digest(bytes).into();
        // Small chunks: the fixture is 8.5 KiB, so this sends five.
        let parts: Vec<&[u8]> = bytes.chunks(2 * 1024).collect();
        assert!(parts.len() > 3, "the tampering below needs a fourth chunk");
        let mut msgs = vec![(
            "neo/site/line/deploydev/cmd/deploy".to_string(),
            serde_json::json!({
                "id": id, "name": "bottle", "size": bytes.len(), "chunks": parts.len(),
                "sha256": hex::encode(digest), "signature": hex::encode(key.sign(&digest).to_bytes()),
            })
            .to_string()
            .into_bytes(),
        )];
        for (i, part) in parts.iter().enumerate() {
            let mut part = part.to_vec();
            if tamper && i == 3 {
                part[100] ^= 1;
            }
            msgs.push((
                "neo/site/line/deploydev/cmd/deploy_chunk".to_string(),
                serde_json::json!({
                    "id": format!("{id}-{i}"), "deploy_id": id, "index": i,
                    "data": base64::engine::general_purpose::STANDARD.encode(&part),
                })
                .to_string()
                .into_bytes(),
            ));
        }
        publish_all(broker.port, msgs);
    };
    send("dep-1", &bytes, false);
    let acks = sub.wait_for("ack", 1, Duration::from_secs(60));
    let ack = &acks
        .iter()
        .find(|e| e.data["cmd_id"] == "dep-1")
        .unwrap()
        .data;
    assert_eq!(ack["ok"], true, "{ack}");

    // The application hears of it, loads it and confirms.
    let deadline = Instant::now() + Duration::from_secs(10);
    let cmd = loop {
        if let Some(c) = run.commands.try_recv() {
            break c;
        }
        assert!(Instant::now() < deadline, "no ModelActivated");
        std::thread::sleep(Duration::from_millis(20));
    };
    let neo_gateway::command::Action::ModelActivated { path, sha256, .. } = cmd.action else {
        panic!("{cmd:?}")
    };
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(sha256, hex::encode(sha2::Sha256::digest(&bytes)));
    neo_runtime::Model::load(&path).unwrap();
    // A daemon restarting before it confirmed goes back to the previous model (none here).
    assert!(neo_gateway::deploy::Slots::peek(&config.models_dir())
        .unwrap()
        .is_some());
    let slots = neo_gateway::deploy::Slots::open(&config.models_dir()).unwrap();
    assert!(slots.active().unwrap().is_none());
    // Deploy again; this time the daemon confirms.
    send("dep-2", &bytes, false);
    let acks = sub.wait_for("ack", 2, Duration::from_secs(60));
    assert!(acks
        .iter()
        .any(|e| e.data["cmd_id"] == "dep-2" && e.data["ok"] == true));
    assert!(slots.on_trial().unwrap());
    slots.confirm().unwrap();
    let active = slots.active().unwrap().unwrap();

    // A deployment with one flipped byte in one chunk is refused; the active model stays.
    send("dep-3", &bytes, true);
    let acks = sub.wait_for("ack", 3, Duration::from_secs(60));
    let ack = &acks
        .iter()
        .find(|e| e.data["cmd_id"] == "dep-3")
        .unwrap()
        .data;
    assert_eq!(ack["ok"], false);
    assert!(ack["message"].as_str().unwrap().contains("sha256"), "{ack}");
    assert_eq!(slots.active().unwrap().unwrap(), active);
    assert!(!slots.on_trial().unwrap());
    assert_eq!(std::fs::read(&active.path).unwrap(), bytes);
    run.shutdown();
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn telemetry_is_published_and_served_on_metrics() {
    let broker = Broker::start();
    let spool = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let mut config = GatewayConfig::local("127.0.0.1", broker.port, "teledev", spool.path().into());
    config.telemetry.interval_s = 0.2;
    config.telemetry.metrics_addr = Some(format!("127.0.0.1:{metrics_port}"));
    let sub = Subscriber::start(broker.port, "tele-sub", "neo/site/line/teledev/telemetry");
    let run = start_gateway(config);
    run.gateway.set_app_metrics(vec![
        ("frames_per_s".into(), 9.5),
        ("bad name!".into(), 1.0),
    ]);
    let (stop, rx) = tokio::sync::watch::channel(false);
    let g = run.gateway.clone();
    let telemetry = run.rt.spawn(async move { g.run_telemetry(rx).await });
    let got = sub.wait_for("telemetry", 2, Duration::from_secs(10));
    assert!(got.len() >= 2, "{}", got.len());
    let t = &got.last().unwrap().data;
    assert_eq!(t["link"]["connected"], true, "{t}");
    assert_eq!(t["app"]["frames_per_s"], 9.5);
    assert!(t["app"].get("bad name!").is_none());
    assert!(t["process"]["rss_bytes"].as_f64().unwrap() > 0.0);
    assert!(t["spool"]["streams"]["inspection"]["next_seq"].is_u64());

    let deadline = Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let m = http_get(metrics_port, "/metrics");
        if m.contains("neo_mqtt_connected 1") || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.contains("neo_mqtt_connected 1"), "{metrics}");
    assert!(
        metrics.contains("neo_spool_queued{stream=\"inspection\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("neo_app_frames_per_s 9.5"), "{metrics}");
    let health = http_get(metrics_port, "/healthz");
    assert!(
        health.starts_with("HTTP/1.1 200") && health.contains("\"ok\":true"),
        "{health}"
    );
    assert!(http_get(metrics_port, "/nope").starts_with("HTTP/1.1 404"));
    let _ = stop.send(true);
    run.rt.block_on(telemetry).unwrap().unwrap();
    run.shutdown();
}

#[test]
fn the_station_daemon_drains_and_says_offline_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo();
    fixture("tiny_conv", &dir.path().join("bottle.neo"));
    let broker = Broker::start();
    let sub = Subscriber::start(broker.port, "term-sub", "neo/site/line/termdev/#");
    let config = dir.path().join("station.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[station]
name = "term"
[[cameras]]
name = "cam0"
path = "{samples}"
fps = 8.0
[inspection]
model = "bottle.neo"
ng_labels = ["defect"]
[mqtt]
host = "127.0.0.1"
port = {port}
site = "site"
line = "line"
device = "termdev"
[spool]
dir = "spool"
"#,
            samples = repo.join("models/samples").display(),
            port = broker.port
        ),
    )
    .unwrap();
    let child = Command::new(gateway_bin())
        .args(["run", "--quiet", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    sub.wait_for("inspection", 6, Duration::from_secs(30));
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("SIGTERM: stopping"), "{log}");
    let summary: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(summary["spool_queued_at_exit"], 0, "{summary}");
    let frames = summary["frames"].as_u64().unwrap();
    let results = sub.wait_for("inspection", frames as usize, Duration::from_secs(5));
    assert_eq!(
        results.len() as u64,
        frames,
        "every inspected part was published"
    );
    let last: Vec<serde_json::Value> = sub
        .got
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| t.ends_with("/status"))
        .map(|(_, p)| serde_json::from_slice(p).unwrap())
        .collect();
    assert_eq!(last.last().unwrap()["state"], "offline", "{last:?}");
}

/// The demo's in-process broker listens for the protocol the station is configured for.
#[test]
fn the_embedded_broker_speaks_the_configured_protocol() {
    use neo_gateway::config::Protocol;
    for protocol in [Protocol::V311, Protocol::V5] {
        let port = free_port();
        neo_gateway::station::embedded_broker(port, protocol).unwrap();
        let spool = tempfile::tempdir().unwrap();
        let mut config = GatewayConfig::local("127.0.0.1", port, "embdev", spool.path().into());
        config.mqtt.protocol = protocol;
        let run = start_gateway(config);
        for n in 0..50 {
            run.gateway
                .publish(Class::Inspection, serde_json::json!({"n": n}))
                .unwrap();
        }
        assert!(
            run.gateway.wait_delivered(Duration::from_secs(10)).unwrap(),
            "MQTT {}: not delivered: {}",
            protocol.name(),
            run.gateway.telemetry()
        );
        assert_eq!(
            run.gateway.telemetry()["link"]["acked"].as_u64(),
            Some(50),
            "MQTT {}",
            protocol.name()
        );
        run.shutdown();
    }
}

/// A small file server on a free loopback port (plain, or TLS with `server.pem`/`server.key`
/// from `tls_dir`): `/model.neo` is `body`, `/tampered.neo` the same with one byte flipped,
/// anything else 404.
fn serve_artifact(body: Vec<u8>, tls_dir: Option<&Path>) -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let tls = tls_dir.map(|dir| {
        use rustls::pki_types::pem::PemObject;
        let chain = rustls::pki_types::CertificateDer::pem_file_iter(dir.join("server.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        std::sync::Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap(),
        )
    });
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(tcp) = stream else { continue };
            let mut stream: Box<dyn ReadWrite> = match &tls {
                Some(config) => {
                    let conn = rustls::ServerConnection::new(config.clone()).unwrap();
                    Box::new(rustls::StreamOwned::new(conn, tcp))
                }
                None => Box::new(tcp),
            };
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") {
                match stream.read(&mut byte) {
                    Ok(1) => request.push(byte[0]),
                    _ => break,
                }
            }
            let request = String::from_utf8_lossy(&request);
            let path = request.split(' ').nth(1).unwrap_or("");
            let (status, content) = match path {
                "/model.neo" => ("200 OK", body.clone()),
                "/tampered.neo" => {
                    let mut b = body.clone();
                    b[100] ^= 1;
                    ("200 OK", b)
                }
                _ => ("404 Not Found", b"no such file".to_vec()),
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                content.len()
            );
            let _ = stream.write_all(&content);
            let _ = stream.flush();
        }
    });
    port
}

trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

#[test]
fn a_model_deployed_by_url_over_http_and_https() {
    use ed25519_dalek::Signer;
    use sha2::Digest;
    let work = tempfile::tempdir().unwrap();
    make_certs(work.path());
    let repo = repo();
    let bytes = std::fs::read(repo.join("models/fixtures/tiny_conv.neo")).unwrap();
    let http = serve_artifact(bytes.clone(), None);
    let https = serve_artifact(bytes.clone(), Some(work.path()));

    let ca = work.path().join("ca.pem");
    let (broker, key, config, mut run, sub) =
        deploy_setup(work.path(), "urldev", 9, |c| c.commands.url_ca = Some(ca));

    let digest: [u8; 32] = sha2::Sha256::digest(&bytes).into();
    let deploy = |id: &str, url: &str| {
        publish_raw(
            broker.port,
            "neo/site/line/urldev/cmd/deploy",
            serde_json::json!({
                "id": id, "name": "tiny", "size": bytes.len(), "url": url,
                "sha256": hex::encode(digest), "signature": hex::encode(key.sign(&digest).to_bytes()),
            })
            .to_string()
            .as_bytes(),
        );
    };
    let mut seen = 0;
    let mut answer = |id: &str| -> serde_json::Value {
        seen += 1;
        let acks = sub.wait_for("ack", seen, Duration::from_secs(30));
        acks.iter()
            .find(|e| e.data["cmd_id"] == id)
            .unwrap_or_else(|| panic!("no ack for {id}: {acks:?}"))
            .data
            .clone()
    };
    let activated = |run: &mut Running| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(c) = run.commands.try_recv() {
                let neo_gateway::command::Action::ModelActivated { path, .. } = c.action else {
                    panic!("{c:?}")
                };
                return path;
            }
            assert!(Instant::now() < deadline, "no ModelActivated");
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    // Over plain http: the signature, not the transport, vouches for the artifact.
    deploy("u-1", &format!("http://127.0.0.1:{http}/model.neo"));
    let ack = answer("u-1");
    assert_eq!(ack["ok"], true, "{ack}");
    let path = activated(&mut run);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    let slots = neo_gateway::deploy::Slots::open(&config.models_dir()).unwrap();
    slots.confirm().unwrap();

    // Over https from a server whose certificate the plant's own CA (commands.url_ca) signed.
    deploy("u-2", &format!("https://localhost:{https}/model.neo"));
    let ack = answer("u-2");
    assert_eq!(ack["ok"], true, "{ack}");
    let path = activated(&mut run);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    slots.confirm().unwrap();
    let active = slots.active().unwrap().unwrap();

    // Refused, the running model untouched: a tampered file, a missing one, another scheme.
    for (id, url, why) in [
        (
            "u-3",
            format!("http://127.0.0.1:{http}/tampered.neo"),
            "sha256",
        ),
        (
            "u-4",
            format!("http://127.0.0.1:{http}/gone.neo"),
            "HTTP 404",
        ),
        (
            "u-5",
            "ftp://127.0.0.1/model.neo".to_string(),
            "http:// or https://",
        ),
    ] {
        deploy(id, &url);
        let ack = answer(id);
        assert_eq!(ack["ok"], false, "{ack}");
        assert!(ack["message"].as_str().unwrap().contains(why), "{ack}");
        assert_eq!(slots.active().unwrap().unwrap(), active);
    }
    run.shutdown();

    // Without the plant's CA the https server is not trusted; more bytes than announced are
    // refused while downloading.
    let timeout = Duration::from_secs(10);
    let err = neo_gateway::deploy::fetch(
        &format!("https://localhost:{https}/model.neo"),
        bytes.len() as u64,
        None,
        timeout,
    )
    .unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
    let err = neo_gateway::deploy::fetch(
        &format!("http://127.0.0.1:{http}/model.neo"),
        bytes.len() as u64 - 1,
        None,
        timeout,
    )
    .unwrap_err();
    assert!(err.contains("more than the announced"), "{err}");
    let err = neo_gateway::deploy::fetch(
        &format!("http://127.0.0.1:{}/model.neo", free_port()),
        bytes.len() as u64,
        None,
        timeout,
    )
    .unwrap_err();
    assert!(err.contains("cannot download"), "{err}");
}

/// A station whose reject line or trigger input is on a GPIO chip the board does not have
/// does not start (it could not reject NG parts): the daemon exits non-zero and says which
/// key and what to check.
#[test]
fn a_station_with_a_gpio_chip_the_board_lacks_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo();
    fixture("tiny_conv", &dir.path().join("bottle.neo"));
    let station = |camera_extra: &str, reject: &str| {
        format!(
            r#"
[station]
name = "gpio"
[[cameras]]
name = "cam0"
path = "{samples}"
{camera_extra}
[inspection]
model = "bottle.neo"
[reject]
{reject}
[mqtt]
host = "127.0.0.1"
port = {port}
site = "site"
line = "line"
device = "gpiodev"
[spool]
dir = "spool"
"#,
            samples = repo.join("models/samples").display(),
            port = free_port(),
        )
    };
    for (text, expected) in [
        (
            station(
                "",
                "kind = \"gpio\"\nchip = \"/dev/gpiochip-none\"\nline = 27",
            ),
            "reject.chip /dev/gpiochip-none",
        ),
        (
            station(
                "trigger = \"gpio\"\ngpio = { chip = \"/dev/gpiochip-none\", line = 17 }",
                "kind = \"log\"",
            ),
            "cameras[cam0].gpio.chip /dev/gpiochip-none",
        ),
        (
            station("", "kind = \"gpio\"\nline = 27"),
            "kind = \"gpio\" needs chip",
        ),
    ] {
        let config = dir.path().join("station.toml");
        std::fs::write(&config, text).unwrap();
        let out = Command::new(gateway_bin())
            .args(["run", "--quiet", "--duration", "10", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started anyway: {stderr}");
        assert!(stderr.contains(expected), "{expected:?} not in: {stderr}");
    }
}

/// The watchdog: a model run that takes far longer than `station.stall_s` (the shipped
/// `slow_matmul` fixture, about 0.8 s a frame, against 0.2 s) gives each stuck part its
/// fail-safe verdict and reject pulse, raises `stage_stuck`, restarts the worker, and turns
/// `/healthz` to 503; under systemd the daemon says READY=1 and pings the watchdog.
#[test]
fn a_stalled_inspection_gets_fail_safe_verdicts_alarms_and_a_fresh_worker() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = repo();
    fixture("slow_matmul", &d.join("slow.neo"));
    std::fs::create_dir(d.join("frames")).unwrap();
    for name in [
        "bottle_good_000.png",
        "bottle_good_003.png",
        "bottle_broken_large_000.png",
    ] {
        std::fs::copy(
            repo.join("models/samples").join(name),
            d.join("frames").join(name),
        )
        .unwrap();
    }
    let broker = Broker::start();
    let sub = Subscriber::start(broker.port, "stall-sub", "neo/site/line/stalldev/#");
    let http = free_port();
    std::fs::write(
        d.join("station.toml"),
        format!(
            r#"
[station]
name = "stall"
stall_s = 0.2
[[cameras]]
name = "cam0"
path = "frames"
fps = 2.0
loop = false
[inspection]
model = "slow.neo"
[reject]
kind = "file"
path = "rejects.jsonl"
delay_ms = 0
pulse_ms = 1
[mqtt]
host = "127.0.0.1"
port = {port}
site = "site"
line = "line"
device = "stalldev"
[spool]
dir = "spool"
[telemetry]
metrics_addr = "127.0.0.1:{http}"
"#,
            port = broker.port
        ),
    )
    .unwrap();
    let notify = UnixDatagram::bind(d.join("notify.sock")).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut child = Command::new(gateway_bin())
        .args(["run", "--quiet", "--duration", "60", "--config"])
        .arg(d.join("station.toml"))
        .env("NOTIFY_SOCKET", d.join("notify.sock"))
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = Vec::new();
    let mut unhealthy = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the station did not stop");
        let mut buf = [0u8; 256];
        if let Ok(n) = notify.recv(&mut buf) {
            said.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        if unhealthy.is_none() {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", http)) {
                use std::io::{Read, Write};
                let _ = write!(s, "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n");
                let mut answer = String::new();
                let _ = s.read_to_string(&mut answer);
                if answer.starts_with("HTTP/1.1 503") {
                    unhealthy = Some(answer);
                }
            }
        }
    }
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(said.iter().any(|m| m.contains("READY=1")), "{said:?}");
    assert!(said.iter().any(|m| m == "WATCHDOG=1"), "{said:?}");
    let unhealthy = unhealthy.expect("/healthz never said 503");
    assert!(unhealthy.contains("inspection stalled"), "{unhealthy}");

    let results = sub.wait_for("inspection", 3, Duration::from_secs(10));
    assert_eq!(results.len(), 3, "one result per part: {results:?}");
    for r in &results {
        assert_eq!(r.data["verdict"], "NG", "{:?}", r.data);
        assert_eq!(r.data["fail_safe"], true);
        assert!(
            r.data["reason"]
                .as_str()
                .unwrap()
                .contains("inspection stalled"),
            "{:?}",
            r.data
        );
    }
    let alarms = sub.wait_for("alarm", 3, Duration::from_secs(5));
    let stuck = alarms
        .iter()
        .filter(|a| a.data["alarm"] == "stage_stuck")
        .count();
    assert_eq!(stuck, 3, "{alarms:?}");
    let pulses = std::fs::read_to_string(d.join("rejects.jsonl")).unwrap();
    assert_eq!(pulses.lines().count(), 3, "{pulses}");
    assert!(log.contains("inspection stalled"), "{log}");
}

/// `--log-format json`: every log line is one JSON object with its level and message, so a
/// log collector can filter the daemon's errors (here: a model that cannot be loaded).
#[test]
fn logs_are_json_lines_with_levels_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo();
    std::fs::write(dir.path().join("broken.neo"), b"not an artifact").unwrap();
    let config = dir.path().join("station.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[station]
name = "logs"
[[cameras]]
name = "cam0"
path = "{samples}"
fps = 5.0
[inspection]
model = "broken.neo"
[mqtt]
host = "127.0.0.1"
port = {port}
site = "site"
line = "line"
device = "logdev"
[spool]
dir = "spool"
"#,
            samples = repo.join("models/samples").display(),
            port = free_port(),
        ),
    )
    .unwrap();
    let out = Command::new(gateway_bin())
        .args([
            "--log-format",
            "json",
            "run",
            "--quiet",
            "--duration",
            "1",
            "--config",
        ])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    let logs: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("level").is_some()).collect();
    let error = logs
        .iter()
        .find(|l| l["level"] == "ERROR")
        .unwrap_or_else(|| panic!("no ERROR line: {stderr}"));
    assert!(
        error["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot be used"),
        "{error}"
    );
    assert!(logs.iter().any(|l| l["level"] == "INFO"), "{stderr}");
    // The run's summary is the last line, JSON too.
    assert!(
        lines.last().unwrap()["frames"].as_u64().is_some(),
        "{stderr}"
    );
}
