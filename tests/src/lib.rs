//! Helpers the end-to-end and gateway tests share: a real Mosquitto on a free loopback port
//! (Debian package `mosquitto`, installed by `.ci/run`) and a recording MQTT subscriber.
//! The end-to-end tests themselves are in `tests/`.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Deserialize;

/// A message envelope as subscribers read it (the gateway's `docs/mqtt.md` contract).
#[derive(Debug, Clone, Deserialize)]
pub struct ReceivedEnvelope {
    pub v: u32,
    pub kind: String,
    pub id: String,
    pub device: String,
    pub seq: u64,
    pub ts_ms: u64,
    pub data: serde_json::Value,
}

pub fn mosquitto_binary() -> PathBuf {
    if let Ok(p) = std::env::var("MOSQUITTO") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/local/sbin"])
    {
        let p = Path::new(dir).join("mosquitto");
        if p.is_file() {
            return p;
        }
    }
    panic!("these tests need a real MQTT broker: install mosquitto (apt-get install mosquitto) or set MOSQUITTO=/path/to/mosquitto");
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Mosquitto with persistence (so a graceful stop keeps the messages queued for a
/// persistent subscriber, as a production broker would).
pub struct Broker {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    /// More configuration (e.g. a TLS listener).
    extra: String,
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_with(|_| String::new())
    }

    /// `extra` gets the broker's folder and returns configuration lines to add.
    pub fn start_with(extra: impl FnOnce(&Path) -> String) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let extra = extra(dir.path());
        let mut b = Broker {
            port,
            dir,
            child: None,
            extra,
        };
        b.restart();
        b
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {dir}/\nmax_queued_messages 1000000\nuser root\nlog_dest none\n{extra}\n",
                port = self.port,
                dir = self.dir.path().display(),
                extra = self.extra,
            ),
        )
        .unwrap();
        let child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGHUP: Mosquitto reloads its configuration files (an ACL, say) without dropping
    /// connections.
    pub fn reload(&self) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .arg("-HUP")
                .arg(child.id().to_string())
                .status();
        }
    }

    /// Graceful stop (SIGTERM): Mosquitto saves its sessions and queued messages.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A subscriber with a persistent session (clean_session = false, QoS 1) that records every
/// message it gets, by topic.
/// (topic, payload) of every message received.
pub type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

pub struct Subscriber {
    pub got: Received,
    _rt: tokio::runtime::Runtime,
}

impl Subscriber {
    pub fn start(port: u16, id: &str, filter: &str) -> Subscriber {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let g = got.clone();
        let filter = filter.to_string();
        let id = id.to_string();
        rt.spawn(async move {
            let mut opts = MqttOptions::new(id, "127.0.0.1", port);
            opts.set_clean_session(false)
                .set_keep_alive(Duration::from_secs(5))
                .set_max_packet_size(1 << 20, 1 << 20);
            let (client, mut events) = AsyncClient::new(opts, 64);
            let mut ready = Some(ready_tx);
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        g.lock()
                            .unwrap()
                            .push((p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("subscriber could not subscribe");
        Subscriber { got, _rt: rt }
    }

    pub fn envelopes(&self, leaf: &str) -> Vec<ReceivedEnvelope> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t.ends_with(&format!("/{leaf}")))
            .map(|(_, p)| serde_json::from_slice(p).unwrap())
            .collect()
    }

    pub fn wait_for(&self, leaf: &str, n: usize, timeout: Duration) -> Vec<ReceivedEnvelope> {
        let deadline = Instant::now() + timeout;
        loop {
            let e = self.envelopes(leaf);
            let distinct: std::collections::BTreeSet<u64> = e.iter().map(|e| e.seq).collect();
            if distinct.len() >= n || Instant::now() > deadline {
                return e;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Publishes messages in order on one connection (QoS 1) and waits for every PUBACK.
pub fn publish_all(port: u16, messages: Vec<(String, Vec<u8>)>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    rt.block_on(async {
        let mut opts = MqttOptions::new(format!("pub-{id}"), "127.0.0.1", port);
        opts.set_max_packet_size(16 << 20, 16 << 20);
        let (client, mut events) = AsyncClient::new(opts, 16);
        let n = messages.len();
        tokio::spawn(async move {
            for (topic, payload) in messages {
                client
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .unwrap();
            }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut acked = 0;
        while acked < n {
            match tokio::time::timeout_at(deadline, events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
                Err(_) => panic!("only {acked} of {n} messages acknowledged by the broker"),
                _ => {}
            }
        }
    });
}
