//! The MQTT link: sends what the spool holds, removes what the broker acknowledged,
//! reconnects with backoff and jitter, keeps the retained status, and receives commands.
//!
//! The spool is the only retry buffer. Each connection gets a fresh rumqttc client and event
//! loop with a clean MQTT session, polled in a task of its own, so nothing of an old
//! connection (queued requests, packet ids, buffered events, a packet-id collision) survives a
//! reconnect; the link rewinds each stream to its oldest queued message and sends again. A message whose PUBACK was lost with the connection is sent twice
//! (the subscriber sees the same `id` and `seq` again); none is lost.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::TlsConfiguration;
use tokio::sync::{mpsc, watch};

use crate::command::{self, Commands};
use crate::config::TlsConfig;
use crate::message::{now_ms, Class, SCHEMA_VERSION};
use crate::session::{Client, LinkEvent, Options};
use crate::{Gateway, GatewayError, Result, Shared};

/// How long a graceful stop keeps sending what the spool still holds.
const DRAIN_ON_STOP: Duration = Duration::from_secs(2);

pub struct Link {
    gateway: Gateway,
    options: Options,
    /// In-flight window (`mqtt.inflight`).
    window: usize,
    /// The current connection's client; `None` between connections.
    client: Option<Client>,
    /// Events of every connection, tagged with its number; events of an old one are ignored.
    events_tx: mpsc::Sender<(u64, Result<LinkEvent, String>)>,
    events: mpsc::Receiver<(u64, Result<LinkEvent, String>)>,
    epoch: u64,
    poller: Option<tokio::task::JoinHandle<()>>,
    commands: command::Dispatcher,
}

/// Per-connection bookkeeping.
struct State {
    connected: bool,
    /// Next sequence number to send, per stream; rewound to 0 (the oldest queued) on connect.
    next: [u64; Class::COUNT],
    /// Publishes handed to rumqttc that have no packet id yet, in order (`None`: not spooled).
    unassigned: VecDeque<Option<(Class, u64)>>,
    inflight: HashMap<u16, (Class, u64)>,
    attempt: u32,
    /// Refusals (MQTT 5 PUBACK error codes) in a row of the same messages; spaces out their
    /// retries. Reset only when a message that was refused is finally accepted.
    refusals: u32,
    /// Messages the broker refused, waiting for their retry on this same connection (a
    /// reconnect would make the broker publish the offline will every time).
    refused: Vec<(Class, u64)>,
    /// Refused messages ever accepted later: the streak ends when one of them is acked.
    was_refused: std::collections::HashSet<(Class, u64)>,
    retry_at: Option<Instant>,
    samples: TokenBucket,
}

struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u64) -> TokenBucket {
        TokenBucket {
            rate: rate as f64,
            tokens: rate as f64,
            last: Instant::now(),
        }
    }

    /// Takes `n` tokens if there are enough (a message larger than a second's worth passes
    /// once the bucket is full).
    fn take(&mut self, n: usize) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + (now - self.last).as_secs_f64() * self.rate).min(self.rate);
        self.last = now;
        let n = n as f64;
        if self.tokens >= n.min(self.rate) {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// A rustls client configuration from PEM files (ring provider).
pub fn tls_configuration(tls: &TlsConfig) -> Result<TlsConfiguration> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pem_err = |what: &str, path: &std::path::Path, e: &dyn std::fmt::Display| {
        GatewayError::Tls(format!("{what} {}: {e}", path.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(&tls.ca)
        .map_err(|e| pem_err("cannot read the CA file", &tls.ca, &e))?;
    for ca in cas {
        let ca = ca.map_err(|e| pem_err("bad certificate in", &tls.ca, &e))?;
        roots
            .add(ca)
            .map_err(|e| pem_err("unusable CA certificate in", &tls.ca, &e))?;
    }
    if roots.is_empty() {
        return Err(GatewayError::Tls(format!(
            "{} holds no PEM certificate",
            tls.ca.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| GatewayError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let config = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| pem_err("cannot read the client certificate", cert, &e))?
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| pem_err("bad client certificate", cert, &e))?;
            let key_der = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| pem_err("cannot read the client key", key, &e))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| GatewayError::Tls(format!("client certificate and key: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(TlsConfiguration::Rustls(Arc::new(config)))
}

fn status_payload(shared: &Shared, state: &str) -> Vec<u8> {
    let c = &shared.config.mqtt;
    let mut status = serde_json::json!({
        "v": SCHEMA_VERSION,
        "state": state,
        "device": c.device,
        "site": c.site,
        "line": c.line,
        "ts_ms": now_ms(),
        "versions": {
            "neo-gateway": env!("CARGO_PKG_VERSION"),
            "tract": neo_runtime::TRACT_VERSION,
            "schema": SCHEMA_VERSION,
        },
    });
    if let Ok(Some(active)) = crate::deploy::Slots::peek(&shared.config.models_dir()) {
        status["model"] = serde_json::json!({
            "name": active.name,
            "sha256": active.sha256,
            "slot": active.slot,
        });
    }
    serde_json::to_vec(&status).unwrap_or_default()
}

impl Link {
    pub(crate) fn new(gateway: Gateway) -> Result<(Link, Commands)> {
        let shared = gateway.shared().clone();
        let offline = status_payload(&shared, "offline");
        let options = Options::new(&shared.config, shared.topics.status(), offline)?;
        let (commands, receiver) = command::Dispatcher::new(gateway.clone());
        let (events_tx, events) = mpsc::channel(1024);
        Ok((
            Link {
                gateway,
                options,
                window: shared.config.mqtt.inflight as usize,
                client: None,
                events_tx,
                events,
                epoch: 0,
                poller: None,
                commands,
            },
            receiver,
        ))
    }

    /// Starts a connection: a fresh rumqttc client and event loop, polled in a task of its own
    /// (a `poll` future must never be dropped half way) that forwards every event and ends at
    /// the first error. Nothing of an old connection (queued requests, packet ids, buffered
    /// events) can leak into the new one.
    fn connect(&mut self) {
        self.disconnect();
        self.epoch += 1;
        let epoch = self.epoch;
        let cap = self.window * 2 + 16;
        let (client, poller) = self.options.connect(cap, epoch, self.events_tx.clone());
        self.client = Some(client);
        self.poller = Some(poller);
    }

    fn disconnect(&mut self) {
        self.client = None;
        if let Some(p) = self.poller.take() {
            p.abort();
        }
    }

    /// Runs until `shutdown` turns true (or its sender is dropped). Connection errors are not
    /// returned: the link retries forever and counts them.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<()> {
        let shared = self.gateway.shared().clone();
        let cfg = shared.config.mqtt.clone();
        let mut st = State {
            connected: false,
            next: [0; Class::COUNT],
            unassigned: VecDeque::new(),
            inflight: HashMap::new(),
            attempt: 0,
            refusals: 0,
            refused: Vec::new(),
            was_refused: std::collections::HashSet::new(),
            retry_at: None,
            samples: TokenBucket::new(shared.config.samples.max_bytes_per_s),
        };
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping: Option<Instant> = None;
        let mut reconnect_at: Option<tokio::time::Instant> = None;
        self.connect();
        loop {
            // Refused messages are sent again after a backoff, on the same connection: each
            // stream rewinds to its oldest refused message.
            if st.retry_at.is_some_and(|at| Instant::now() >= at) {
                st.retry_at = None;
                for (class, seq) in std::mem::take(&mut st.refused) {
                    let next = &mut st.next[class as usize];
                    *next = (*next).min(seq);
                }
            }
            if st.connected {
                self.fill(&shared, &mut st, cfg.inflight as usize);
            }
            if let Some(since) = stopping {
                let drained = shared.spool.queued() == 0 && st.inflight.is_empty();
                if !st.connected || drained || since.elapsed() > DRAIN_ON_STOP {
                    self.goodbye(&shared, &mut st).await;
                    return Ok(());
                }
            }
            tokio::select! {
                changed = shutdown.changed(), if stopping.is_none() => {
                    if changed.is_err() || *shutdown.borrow() {
                        stopping = Some(Instant::now());
                    }
                }
                Some((epoch, event)) = self.events.recv() => {
                    if epoch != self.epoch {
                        continue; // a connection already given up
                    }
                    match event {
                        Ok(event) => self.on_event(&shared, &mut st, event),
                        Err(e) => {
                            if st.connected {
                                tracing::warn!("connection to {}:{} lost: {e}", cfg.host, cfg.port);
                            } else if st.attempt == 0 {
                                tracing::warn!("cannot connect to {}:{}: {e} (retrying)", cfg.host, cfg.port);
                            }
                            self.disconnect();
                            st.connected = false;
                            shared.stats.connected.store(false, Ordering::Relaxed);
                            shared.stats.connection_errors.fetch_add(1, Ordering::Relaxed);
                            shared.stats.note_error(&e);
                            let delay = backoff(cfg.reconnect_min_ms, cfg.reconnect_max_ms, st.attempt);
                            st.attempt = st.attempt.saturating_add(1);
                            reconnect_at = Some(tokio::time::Instant::now() + delay);
                        }
                    }
                }
                _ = async {
                    match reconnect_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                }, if stopping.is_none() => {
                    reconnect_at = None;
                    self.connect();
                }
                _ = shared.wake.notified() => {}
                _ = tick.tick() => {}
            }
        }
    }

    fn on_event(&mut self, shared: &Arc<Shared>, st: &mut State, event: LinkEvent) {
        match event {
            LinkEvent::Connected => {
                st.connected = true;
                st.refused.clear(); // the rewind to 0 below resends them anyway
                st.retry_at = None;
                st.attempt = 0;
                st.next = [0; Class::COUNT];
                st.unassigned.clear();
                st.inflight.clear();
                shared.stats.connected.store(true, Ordering::Relaxed);
                shared.stats.connects.fetch_add(1, Ordering::Relaxed);
                let Some(client) = self.client.as_ref() else {
                    return;
                };
                let online = status_payload(shared, "online");
                if client.publish(shared.topics.status(), true, online).is_ok() {
                    st.unassigned.push_back(None);
                }
                if let Err(e) = client.subscribe(shared.topics.commands()) {
                    shared
                        .stats
                        .note_error(format!("cannot subscribe to commands: {e}"));
                }
                if shared.inbox.get().is_some() {
                    if let Err(e) = client.subscribe(shared.topics.frames()) {
                        shared
                            .stats
                            .note_error(format!("cannot subscribe to pushed frames: {e}"));
                    }
                }
            }
            LinkEvent::Sent(pkid) => {
                if let Some(Some(key)) = st.unassigned.pop_front() {
                    st.inflight.insert(pkid, key);
                }
            }
            LinkEvent::Acked(pkid) => {
                if let Some(key) = st.inflight.remove(&pkid) {
                    if st.was_refused.remove(&key) && st.was_refused.is_empty() {
                        st.refusals = 0;
                    }
                    shared.stats.acked.fetch_add(1, Ordering::Relaxed);
                    match shared.acked.lock() {
                        Ok(mut a) => a.push(key),
                        Err(p) => p.into_inner().push(key),
                    }
                }
            }
            LinkEvent::Refused { pkid, reason } => {
                // The message stays in the spool; it is sent again after a reconnect.
                if let Some((class, seq)) = st.inflight.remove(&pkid) {
                    shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                    let note = format!(
                        "the broker refused {} message seq {seq}: {reason}; kept in the spool and retried (check the broker's ACL or quota for this client)",
                        class.name()
                    );
                    if st.refusals == 0 {
                        tracing::warn!("{note}");
                    }
                    shared.stats.note_error(note);
                    if st.was_refused.len() > 100_000 {
                        st.was_refused.clear(); // evicted from the spool meanwhile
                    }
                    st.was_refused.insert((class, seq));
                    st.refused.push((class, seq));
                    // One backoff step per retry round, however many messages it refuses.
                    if st.retry_at.is_none() {
                        let m = &shared.config.mqtt;
                        let delay = backoff(m.reconnect_min_ms, m.reconnect_max_ms, st.refusals);
                        st.refusals = st.refusals.saturating_add(1);
                        st.retry_at = Some(Instant::now() + delay);
                    }
                }
            }
            LinkEvent::Message { topic, payload } => {
                if let Some(name) = shared.topics.command_name(&topic) {
                    let name = name.to_string();
                    self.commands.handle(&name, &payload);
                } else if let (Some(camera), Some(inbox)) =
                    (shared.topics.frame_camera(&topic), shared.inbox.get())
                {
                    if let Err(e) = inbox.deliver(camera, payload, "mqtt", None) {
                        shared
                            .stats
                            .note_error(format!("pushed frame on {topic}: {e}"));
                    }
                }
            }
            LinkEvent::DisconnectSent | LinkEvent::Other => {}
        }
    }

    /// Hands queued messages to rumqttc until the in-flight window is full.
    fn fill(&mut self, shared: &Arc<Shared>, st: &mut State, window: usize) {
        let Some(client) = self.client.as_ref() else {
            return;
        };
        let next_seqs = shared.spool.next_seqs();
        for class in Class::SEND_ORDER {
            let room = window.saturating_sub(st.inflight.len() + st.unassigned.len());
            if room == 0 {
                return;
            }
            if st.next[class as usize] >= next_seqs[class as usize] {
                continue;
            }
            let records = match shared.spool.read(class, st.next[class as usize], room) {
                Ok(r) => r,
                Err(e) => {
                    shared.stats.spool_errors.fetch_add(1, Ordering::Relaxed);
                    shared.stats.note_error(&e);
                    return;
                }
            };
            if records.is_empty() {
                st.next[class as usize] = next_seqs[class as usize];
            }
            for r in records {
                if class == Class::Sample && !st.samples.take(r.payload.len()) {
                    break;
                }
                let topic = shared.topics.data(&r.topic);
                if client.publish(topic, false, r.payload).is_err() {
                    return;
                }
                shared.stats.sent.fetch_add(1, Ordering::Relaxed);
                st.unassigned.push_back(Some((r.class, r.seq)));
                st.next[class as usize] = r.seq + 1;
            }
        }
    }

    /// Publishes the retained offline status and disconnects cleanly; PUBACKs that arrive
    /// meanwhile still remove their messages from the spool.
    async fn goodbye(&mut self, shared: &Arc<Shared>, st: &mut State) {
        if st.connected {
            if let Some(client) = self.client.as_ref() {
                let offline = status_payload(shared, "offline");
                if client
                    .publish(shared.topics.status(), true, offline)
                    .is_ok()
                {
                    st.unassigned.push_back(None);
                }
                client.disconnect();
            }
            let deadline = tokio::time::sleep(Duration::from_secs(1));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = &mut deadline => break,
                    Some((epoch, ev)) = self.events.recv() => {
                        if epoch != self.epoch {
                            continue;
                        }
                        match ev {
                            Ok(LinkEvent::DisconnectSent) | Err(_) => break,
                            Ok(ev) => self.on_event(shared, st, ev),
                        }
                    }
                }
            }
        }
        self.disconnect();
        st.connected = false;
        shared.stats.connected.store(false, Ordering::Relaxed);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.disconnect();
    }
}

/// Exponential backoff from `min_ms` doubling to `max_ms`, with ±50 % jitter so a fleet of
/// devices does not reconnect in lockstep after a broker restart.
pub fn backoff(min_ms: u64, max_ms: u64, attempt: u32) -> Duration {
    let base = min_ms.saturating_mul(1u64 << attempt.min(20)).min(max_ms);
    let jitter = rand::random::<f64>() + 0.5; // 0.5 … 1.5
    Duration::from_millis(((base as f64) * jitter) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        for attempt in 0..30 {
            let d = backoff(100, 10_000, attempt).as_millis() as u64;
            let base = (100u64 << attempt.min(20)).min(10_000);
            assert!(d >= base / 2 && d <= base * 3 / 2, "{attempt}: {d}");
        }
        let spread: std::collections::HashSet<u128> = (0..20)
            .map(|_| backoff(1000, 1000, 0).as_millis())
            .collect();
        assert!(spread.len() > 1, "no jitter");
    }

    #[test]
    fn sample_bucket_limits_bytes_per_second() {
        let mut b = TokenBucket::new(1000);
        assert!(b.take(600));
        assert!(!b.take(600));
        b.last -= Duration::from_millis(300);
        assert!(b.take(600));
    }
}
