//! `neo-gateway`: the device daemon's MQTT side as a command-line tool.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use ed25519_dalek::{Signer, SigningKey};
use neo_gateway::{Class, Gateway, GatewayConfig, ReceivedEnvelope};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sha2::{Digest, Sha256};

#[derive(Parser)]
#[command(
    name = "neo-gateway",
    version,
    about = "neo device gateway: MQTT, spool, commands"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// Log lines on stderr: `text` for people, `json` (one object per line, with level,
    /// target, fields and timestamp) for a log collector.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// What to log: a level (error, warn, info, debug, trace) or per-module levels such as
    /// `info,neo_gateway::link=debug`. Default: $NEO_LOG, else info (rumqttd off).
    #[arg(long, global = true)]
    log: Option<String>,
}

/// Sends the library's `tracing` events to stderr in the chosen format.
fn init_logs(format: &str, filter: Option<&str>) -> Result<()> {
    use tracing_subscriber::prelude::*;
    let (spec, from) = match (filter, std::env::var("NEO_LOG").ok()) {
        (Some(f), _) => (f.to_string(), "--log"),
        (None, Some(env)) => (env, "NEO_LOG"),
        // The embedded broker's own logs and the MQTT client's are noise at info: the
        // link reports what matters.
        (None, None) => ("info,rumqttd=off,rumqttc=error".to_string(), "the default"),
    };
    let targets: tracing_subscriber::filter::Targets = spec.parse().with_context(|| {
        format!(
            "{from} {spec:?}: expected a level (error, warn, info, debug, trace) or module=level pairs"
        )
    })?;
    let registry = tracing_subscriber::registry().with(targets);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    if format == "json" {
        registry.with(fmt.json().with_target(true)).init();
    } else {
        registry.with(fmt.with_ansi(false)).init();
    }
    Ok(())
}

#[derive(clap::Args, Clone)]
struct Conn {
    /// Broker as HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:1883")]
    broker: String,
    /// Gateway config (TOML with [mqtt] and [spool]); overrides --broker/--device/--spool.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, default_value = "gw1")]
    device: String,
    /// Spool folder.
    #[arg(long, default_value = "spool")]
    spool: PathBuf,
    /// Spool budget, MiB.
    #[arg(long)]
    spool_mb: Option<f64>,
    /// MQTT protocol version: 3.1.1 or 5.
    #[arg(long, default_value = "3.1.1", value_parser = ["3.1.1", "5"])]
    protocol: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run an inspection station: cameras -> model -> decision -> reject -> MQTT. Without
    /// --config, the embedded demo station (run it from the repository root after
    /// ./scripts/demo.sh has compiled the model).
    Run {
        /// station.toml (see the commented example at the repository root).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Stop after this many frames.
        #[arg(long)]
        max_frames: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<f64>,
        /// No line per result on stdout.
        #[arg(long)]
        quiet: bool,
        /// Override mqtt.port (e.g. when 1883 is taken).
        #[arg(long)]
        mqtt_port: Option<u16>,
    },
    /// Print what a station publishes, one line per message.
    Watch {
        #[arg(long, default_value = "127.0.0.1:1883")]
        broker: String,
        #[arg(long, default_value = "neo/#")]
        filter: String,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// One JSON object per message: {"rx_ms", "topic", "payload"} (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Publish synthetic inspection results until the stream holds COUNT, resuming after a
    /// crash where the spool left off, then wait until the broker has them all.
    Loadgen {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, default_value_t = 10_000)]
        count: u64,
        /// Results per second (0: as fast as the spool takes them).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// Seconds to wait for delivery at the end.
        #[arg(long, default_value_t = 120.0)]
        wait: f64,
    },
    /// Throughput and publish-to-receive latency against a broker (QoS 1, through the spool).
    Bench {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, default_value_t = 50_000)]
        count: u64,
        /// Results per second (0: all at once, which measures the maximum throughput; latency
        /// then includes the queueing).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
    },
    /// Print telemetry (JSON) of a spool without connecting.
    Spool {
        #[command(flatten)]
        conn: Conn,
    },
    /// Make an ed25519 key pair for signing model deployments.
    Keygen {
        /// Where to write the secret key (hex); the public key is printed.
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Sign an artifact for deployment: prints size, sha256 and signature as JSON.
    Sign {
        #[arg(long)]
        key: PathBuf,
        artifact: PathBuf,
    },
}

fn config_of(conn: &Conn) -> Result<GatewayConfig> {
    if let Some(path) = &conn.config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        return GatewayConfig::from_toml(&text).with_context(|| format!("in {}", path.display()));
    }
    let (host, port) = conn
        .broker
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
        .with_context(|| format!("--broker {:?}: expected HOST:PORT", conn.broker))?;
    let mut config = GatewayConfig::local(&host, port, &conn.device, conn.spool.clone());
    if let Some(mb) = conn.spool_mb {
        config.spool.max_mb = mb;
    }
    if conn.protocol == "5" {
        config.mqtt.protocol = neo_gateway::config::Protocol::V5;
    }
    config.validate()?;
    Ok(config)
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    init_logs(&cli.log_format, cli.log.as_deref())?;
    match cli.command {
        Cmd::Run {
            config,
            max_frames,
            duration,
            quiet,
            mqtt_port,
        } => {
            use neo_gateway::station::{self, config::StationConfig};
            let config = match &config {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    let base = path.parent().unwrap_or(Path::new("."));
                    StationConfig::from_toml(&text, base)
                        .with_context(|| format!("in {}", path.display()))?
                }
                None => StationConfig::from_toml(
                    station::config::DEFAULT_STATION,
                    &std::env::current_dir()?,
                )
                .context("in the embedded default station")?,
            };
            let mut config = config;
            if let Some(port) = mqtt_port {
                config.mqtt.port = port;
            }
            let summary = station::run(
                config,
                station::RunOptions {
                    max_frames,
                    duration: duration.map(Duration::from_secs_f64),
                    print: !quiet,
                },
            )?;
            eprintln!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
        Cmd::Watch {
            broker,
            filter,
            count,
            json,
        } => watch(&broker, &filter, count, json),
        Cmd::Loadgen {
            conn,
            count,
            rate,
            wait,
        } => loadgen(&conn, count, rate, wait),
        Cmd::Bench { conn, count, rate } => bench(&conn, count, rate),
        Cmd::Spool { conn } => {
            let config = config_of(&conn)?;
            let (gateway, _link, _commands) = Gateway::start(config)?;
            println!("{}", serde_json::to_string_pretty(&gateway.telemetry())?);
            Ok(())
        }
        Cmd::Keygen { out } => {
            let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
            write_secret(&out, &hex::encode(key.to_bytes()))?;
            println!("{}", hex::encode(key.verifying_key().to_bytes()));
            eprintln!(
                "secret key written to {}; put the public key above in [commands] trusted_keys",
                out.display()
            );
            Ok(())
        }
        Cmd::Sign { key, artifact } => {
            let text = std::fs::read_to_string(&key)
                .with_context(|| format!("cannot read {}", key.display()))?;
            let secret: [u8; 32] = hex::decode(text.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .with_context(|| format!("{} is not a 64-hex-digit secret key", key.display()))?;
            let bytes = std::fs::read(&artifact)
                .with_context(|| format!("cannot read {}", artifact.display()))?;
            let digest: [u8; 32] = Sha256::digest(&bytes).into();
            let signature = SigningKey::from_bytes(&secret).sign(&digest);
            println!(
                "{}",
                serde_json::json!({
                    "size": bytes.len(),
                    "sha256": hex::encode(digest),
                    "signature": hex::encode(signature.to_bytes()),
                })
            );
            Ok(())
        }
    }
}

fn write_secret(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options
        .open(path)
        .with_context(|| format!("cannot create {} (it must not exist yet)", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn loadgen(conn: &Conn, count: u64, rate: f64, wait: f64) -> Result<()> {
    let config = config_of(conn)?;
    let (gateway, link, _commands) = Gateway::start(config)?;
    let rt = runtime()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let link_task = rt.spawn(link.run(stop_rx));
    let start = gateway.spool().next_seqs()[Class::Inspection as usize];
    if start > 0 {
        eprintln!("resuming at result {start}");
    }
    let t0 = Instant::now();
    for n in start..count {
        if rate > 0.0 {
            let due = t0 + Duration::from_secs_f64((n - start) as f64 / rate);
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
        gateway.publish(
            Class::Inspection,
            serde_json::json!({ "n": n, "verdict": if n % 7 == 0 { "NG" } else { "OK" }, "score": (n % 100) as f64 / 50.0 }),
        )?;
    }
    gateway.flush()?;
    eprintln!(
        "{} results spooled in {:.1} s; waiting for the broker",
        count - start,
        t0.elapsed().as_secs_f64()
    );
    let delivered = gateway.wait_delivered(Duration::from_secs_f64(wait))?;
    let _ = stop_tx.send(true);
    let _ = rt.block_on(link_task);
    println!("{}", serde_json::to_string(&gateway.telemetry())?);
    if !delivered {
        bail!(
            "{} messages still in the spool after {wait} s",
            gateway.spool().queued()
        );
    }
    Ok(())
}

/// Publishes COUNT results through the spool and receives them on a second connection.
fn bench(conn: &Conn, count: u64, rate: f64) -> Result<()> {
    let config = config_of(conn)?;
    let topic = config.topics()?.data("inspection");
    let (host, port) = (config.mqtt.host.clone(), config.mqtt.port);
    let rt = runtime()?;
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(count as usize)));
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let (sub_ready_tx, sub_ready_rx) = std::sync::mpsc::channel();
    {
        let latencies = latencies.clone();
        let seen = seen.clone();
        let topic = topic.clone();
        rt.spawn(async move {
            let mut opts = MqttOptions::new("neo-bench-sub", host, port);
            opts.set_keep_alive(Duration::from_secs(30))
                .set_max_packet_size(1 << 20, 1 << 20);
            let (client, mut events) = AsyncClient::new(opts, 64);
            let mut subscribed = false;
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.subscribe(topic.clone(), QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) if !subscribed => {
                        subscribed = true;
                        let _ = sub_ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let now = neo_gateway::message::now_ms();
                        if let Ok(env) = serde_json::from_slice::<ReceivedEnvelope>(&p.payload) {
                            if let Ok(mut l) = latencies.lock() {
                                l.push(now.saturating_sub(env.ts_ms));
                            }
                            if let Ok(mut s) = seen.lock() {
                                s.insert(env.seq);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
    }
    sub_ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("the bench subscriber could not subscribe: is the broker running?")?;
    let (gateway, link, _commands) = Gateway::start(config)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let link_task = rt.spawn(link.run(stop_rx));
    let start = gateway.spool().next_seqs()[Class::Inspection as usize];
    let t0 = Instant::now();
    for n in 0..count {
        if rate > 0.0 {
            let due = t0 + Duration::from_secs_f64(n as f64 / rate);
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
        gateway.publish(
            Class::Inspection,
            serde_json::json!({ "n": n, "verdict": "OK", "score": 0.42, "regions": [] }),
        )?;
    }
    let spooled = t0.elapsed();
    let delivered = gateway.wait_delivered(Duration::from_secs(300))?;
    let acked = t0.elapsed();
    // Wait for the subscriber to see the last one.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let n = seen.lock().map(|s| s.range(start..).count()).unwrap_or(0) as u64;
        if n >= count {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let received_all = t0.elapsed();
    let _ = stop_tx.send(true);
    let _ = rt.block_on(link_task);
    let baseline = rt.block_on(plain_rumqttc(&gateway, count))?;
    let mut lat = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    lat.sort_unstable();
    let q = |p: f64| lat.get(((lat.len() as f64 - 1.0) * p) as usize).copied();
    let received = seen.lock().map(|s| s.range(start..).count()).unwrap_or(0);
    let s = gateway.stats();
    let report = serde_json::json!({
        "count": count,
        "rate": if rate > 0.0 { serde_json::json!(rate) } else { serde_json::json!("burst") },
        "delivered": delivered,
        "received": received,
        "spool_s": spooled.as_secs_f64(),
        "acked_s": acked.as_secs_f64(),
        "received_all_s": received_all.as_secs_f64(),
        "results_per_s": count as f64 / received_all.as_secs_f64(),
        "latency_ms_p50": q(0.5),
        "latency_ms_p99": q(0.99),
        "latency_ms_max": lat.last(),
        "sent": s.sent.load(Ordering::Relaxed),
        "acked": s.acked.load(Ordering::Relaxed),
        "process": neo_gateway::metrics::process_stats(),
        "baseline_plain_rumqttc_qos1_per_s": baseline,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if !delivered || (received as u64) < count {
        bail!("only {received} of {count} results arrived");
    }
    Ok(())
}

/// The same number of QoS 1 publishes straight through rumqttc (same in-flight window, no
/// spool), acknowledged by the broker: what the spool costs.
async fn plain_rumqttc(gateway: &Gateway, count: u64) -> Result<f64> {
    let m = &gateway.config().mqtt;
    let mut opts = MqttOptions::new("neo-bench-plain", m.host.clone(), m.port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_inflight(m.inflight);
    let (client, mut events) = AsyncClient::new(opts, 1024);
    let topic = gateway.topics().data("baseline");
    let payload = serde_json::to_vec(&serde_json::json!({
        "v": 1, "kind": "inspection", "id": "gw1-000000000000-0", "device": "gw1", "seq": 0,
        "ts_ms": 0, "data": { "n": 0, "verdict": "OK", "score": 0.42, "regions": [] }
    }))?;
    let t0 = Instant::now();
    let producer = tokio::spawn(async move {
        for _ in 0..count {
            if client
                .publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
                .await
                .is_err()
            {
                break;
            }
        }
        client
    });
    let mut acked = 0;
    while acked < count {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("baseline connection failed: {e}"),
            Err(_) => bail!("baseline: no progress for 10 s ({acked} of {count} acknowledged)"),
        }
    }
    let per_s = count as f64 / t0.elapsed().as_secs_f64();
    let _ = producer.await;
    Ok(per_s)
}

fn watch(broker: &str, filter: &str, count: Option<u64>, json: bool) -> Result<()> {
    let (host, port) = broker
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
        .with_context(|| format!("--broker {broker:?}: expected HOST:PORT"))?;
    let rt = runtime()?;
    rt.block_on(async {
        let mut opts = MqttOptions::new(format!("neo-watch-{}", std::process::id()), host, port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut events) = AsyncClient::new(opts, 64);
        let mut seen = 0u64;
        let mut warned = false;
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client.subscribe(filter, QoS::AtLeastOnce).await?;
                    eprintln!("watching {filter} on {broker} (Ctrl-C to stop)");
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if json {
                        let payload = serde_json::from_slice::<serde_json::Value>(&p.payload)
                            .unwrap_or_else(|_| {
                                serde_json::Value::String(
                                    String::from_utf8_lossy(&p.payload).into(),
                                )
                            });
                        println!(
                            "{}",
                            serde_json::json!({
                                "rx_ms": neo_gateway::message::now_ms(),
                                "topic": p.topic,
                                "payload": payload,
                            })
                        );
                    } else {
                        println!("{}", watch_line(&p.topic, &p.payload));
                    }
                    seen += 1;
                    if count.is_some_and(|c| seen >= c) {
                        return Ok(());
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if !warned {
                        eprintln!("cannot reach {broker}: {e} (retrying; is the station running?)");
                        warned = true;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    })
}

fn watch_line(topic: &str, payload: &[u8]) -> String {
    let leaf = topic.rsplit('/').next().unwrap_or(topic);
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return format!("{topic}  ({} bytes, not JSON)", payload.len());
    };
    let d = &v["data"];
    match v["kind"].as_str() {
        Some("inspection") => format!(
            "{topic}  #{}  {}  {}  score {}  {}",
            v["seq"],
            d["verdict"].as_str().unwrap_or("?"),
            d["image"].as_str().unwrap_or(""),
            d["score"]
                .as_f64()
                .map_or("-".into(), |s| format!("{s:.2}")),
            d["reason"].as_str().unwrap_or("")
        ),
        Some("samples") => format!(
            "{topic}  chunk {}/{}  {} bytes",
            d["chunk"], d["chunks"], d["bytes"]
        ),
        Some("telemetry") => format!(
            "{topic}  up {:.0} s  fps {}  spool {} queued  connected {}",
            d["uptime_s"].as_f64().unwrap_or(0.0),
            d["app"]["frames_per_s"]
                .as_f64()
                .map_or("-".into(), |f| format!("{f:.1}")),
            d["spool"]["streams"]["inspection"]["queued"],
            d["link"]["connected"]
        ),
        _ if leaf == "status" => format!("{topic}  {}", v["state"].as_str().unwrap_or("?")),
        _ => format!("{topic}  {}", serde_json::to_string(d).unwrap_or_default()),
    }
}
