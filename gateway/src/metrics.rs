//! Telemetry: a periodic `telemetry` message and a local Prometheus endpoint (`/metrics`,
//! `/healthz`) built from the same numbers — the link's counters, the spool per stream, the
//! process (CPU, memory), the board (temperature where it has a sensor) and whatever the
//! application reports with [`Gateway::set_app_metrics`] (frames/s, per-stage latency …).

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::message::Class;
use crate::{Gateway, GatewayError, Result};

impl Gateway {
    /// Replaces the application's metrics (name → value), e.g. `frames_per_s`,
    /// `inference_ms_p99`. Names must be Prometheus-safe (`[a-z_][a-z0-9_]*`); others are
    /// ignored.
    pub fn set_app_metrics(&self, metrics: Vec<(String, f64)>) {
        let ok = |n: &str| {
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && !n.starts_with(|c: char| c.is_ascii_digit())
        };
        let clean = metrics.into_iter().filter(|(n, _)| ok(n)).collect();
        match self.shared().app_metrics.lock() {
            Ok(mut m) => *m = clean,
            Err(p) => *p.into_inner() = clean,
        }
    }

    fn app_metrics(&self) -> Vec<(String, f64)> {
        match self.shared().app_metrics.lock() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The telemetry document (what the `telemetry` stream carries).
    pub fn telemetry(&self) -> Value {
        let s = self.stats();
        let streams = self.spool().stats();
        let now = crate::message::now_ms();
        let oldest = streams.iter().filter_map(|(_, st)| st.oldest_ts_ms).min();
        let spool: Map<String, Value> = streams
            .into_iter()
            .map(|(c, st)| (c.name().to_string(), json!(st)))
            .collect();
        let app: Map<String, Value> = self
            .app_metrics()
            .into_iter()
            .map(|(k, v)| (k, json!(v)))
            .collect();
        let proc = process_stats();
        json!({
            "uptime_s": self.uptime().as_secs_f64(),
            "link": {
                "connected": s.connected.load(Ordering::Relaxed),
                "connects": s.connects.load(Ordering::Relaxed),
                "connection_errors": s.connection_errors.load(Ordering::Relaxed),
                "sent": s.sent.load(Ordering::Relaxed),
                "acked": s.acked.load(Ordering::Relaxed),
                "refused": s.refused.load(Ordering::Relaxed),
                "protocol": self.config().mqtt.protocol.name(),
                "commands_accepted": s.commands_accepted.load(Ordering::Relaxed),
                "commands_refused": s.commands_refused.load(Ordering::Relaxed),
            },
            "spool": {
                "bytes": self.spool().total_bytes(),
                "max_bytes": self.spool().max_bytes(),
                "oldest_age_s": oldest.map(|t| now.saturating_sub(t) as f64 / 1e3),
                "streams": spool,
                "errors": s.spool_errors.load(Ordering::Relaxed),
            },
            "process": proc,
            "temperature_c": board_temperature(),
            "app": app,
            "versions": {"neo-gateway": env!("CARGO_PKG_VERSION"), "tract": neo_runtime::TRACT_VERSION},
            "model": crate::deploy::Slots::peek(&self.config().models_dir()).ok().flatten(),
            "problems": self.problems(),
            "pushed_frames": self.shared().inbox.get().map(|i| json!({
                "received": i.received.load(Ordering::Relaxed),
                "refused": i.refused.load(Ordering::Relaxed),
            })),
        })
    }

    /// Prometheus text exposition of the same numbers.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, samples: Vec<(String, f64)>| {
            out.push_str(&format!(
                "# HELP neo_{name} {help}\n# TYPE neo_{name} gauge\n"
            ));
            for (labels, v) in samples {
                out.push_str(&format!("neo_{name}{labels} {v}\n"));
            }
        };
        let s = self.stats();
        let one = |v: f64| vec![(String::new(), v)];
        gauge(
            "up_seconds",
            "Seconds since the gateway started.",
            one(self.uptime().as_secs_f64()),
        );
        gauge(
            "mqtt_connected",
            "1 while connected to the broker.",
            one(if s.connected.load(Ordering::Relaxed) {
                1.0
            } else {
                0.0
            }),
        );
        for (name, help, v) in [
            (
                "mqtt_connects_total",
                "Successful connections.",
                &s.connects,
            ),
            (
                "mqtt_connection_errors_total",
                "Connection errors.",
                &s.connection_errors,
            ),
            (
                "mqtt_sent_total",
                "Messages handed to MQTT (including resends).",
                &s.sent,
            ),
            (
                "mqtt_acked_total",
                "Messages acknowledged by the broker.",
                &s.acked,
            ),
            (
                "mqtt_refused_total",
                "Publishes the broker refused with an MQTT 5 reason code (kept and resent).",
                &s.refused,
            ),
            (
                "spool_errors_total",
                "Failed spool writes.",
                &s.spool_errors,
            ),
            (
                "commands_accepted_total",
                "Commands accepted.",
                &s.commands_accepted,
            ),
            (
                "commands_refused_total",
                "Commands refused.",
                &s.commands_refused,
            ),
        ] {
            gauge(name, help, one(v.load(Ordering::Relaxed) as f64));
        }
        let stats = self.spool().stats();
        let per = |f: &dyn Fn(&crate::StreamStats) -> f64| {
            stats
                .iter()
                .map(|(c, st)| (format!("{{stream=\"{}\"}}", c.name()), f(st)))
                .collect::<Vec<_>>()
        };
        gauge(
            "spool_queued",
            "Messages waiting in the spool.",
            per(&|s| s.queued as f64),
        );
        gauge(
            "spool_bytes",
            "Bytes waiting in the spool.",
            per(&|s| s.bytes as f64),
        );
        gauge(
            "spool_dropped_total",
            "Messages dropped because the spool was full.",
            per(&|s| s.dropped_budget as f64),
        );
        gauge(
            "spool_too_large_total",
            "Messages refused for exceeding the MQTT packet size.",
            per(&|s| s.dropped_too_large as f64),
        );
        let now = crate::message::now_ms();
        gauge(
            "spool_oldest_age_seconds",
            "Age of the oldest waiting message.",
            per(&|s| {
                s.oldest_ts_ms
                    .map_or(0.0, |t| now.saturating_sub(t) as f64 / 1e3)
            }),
        );
        let proc = process_stats();
        for (key, name, help) in [
            ("rss_bytes", "process_rss_bytes", "Resident memory."),
            (
                "peak_rss_bytes",
                "process_peak_rss_bytes",
                "Peak resident memory.",
            ),
            ("cpu_seconds", "process_cpu_seconds_total", "CPU time used."),
        ] {
            if let Some(v) = proc.get(key).and_then(Value::as_f64) {
                gauge(name, help, one(v));
            }
        }
        if let Some(t) = board_temperature() {
            gauge("board_temperature_celsius", "Board temperature.", one(t));
        }
        for (name, v) in self.app_metrics() {
            gauge(
                &format!("app_{name}"),
                "Reported by the application.",
                one(v),
            );
        }
        out
    }

    /// Publishes telemetry every `telemetry.interval_s` and serves `/metrics` and `/healthz`
    /// on `telemetry.metrics_addr` (if set) until `shutdown` turns true.
    pub async fn run_telemetry(&self, mut shutdown: watch::Receiver<bool>) -> Result<()> {
        let period = Duration::from_secs_f64(self.config().telemetry.interval_s);
        let listener = match &self.config().telemetry.metrics_addr {
            // Telemetry over MQTT goes on without the local endpoint.
            Some(addr) => match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => Some(l),
                Err(e) => {
                    let e = GatewayError::Io {
                        context: format!("cannot listen on telemetry.metrics_addr {addr}"),
                        source: e,
                    };
                    tracing::warn!("{e}; /metrics is off");
                    self.stats().note_error(&e);
                    None
                }
            },
            None => None,
        };
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return Ok(());
                    }
                }
                _ = tick.tick() => {
                    let _ = self.try_publish(Class::Telemetry, self.telemetry());
                }
                conn = async {
                    match &listener {
                        Some(l) => l.accept().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Ok((stream, _)) = conn {
                        let this = self.clone();
                        tokio::spawn(async move { this.serve_http(stream).await });
                    }
                }
            }
        }
    }

    async fn serve_http(&self, mut stream: tokio::net::TcpStream) {
        const HEAD_MAX: usize = 16 * 1024;
        let mut buf = Vec::with_capacity(2048);
        let mut chunk = [0u8; 4096];
        // The request line and headers.
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break Some(at + 4);
            }
            if buf.len() > HEAD_MAX {
                break None;
            }
            match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break None,
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let Some(head_end) = head_end else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut words = head.split_whitespace();
        let method = words.next().unwrap_or("");
        let target = words.next().unwrap_or("");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let (status, ctype, body) = match (method, path) {
            ("POST", p) if p.starts_with("/frames/") => {
                let camera = &p["/frames/".len()..];
                let body_start = buf.split_off(head_end);
                let answer = self
                    .receive_frame(&mut stream, &head, camera, query, body_start)
                    .await;
                match answer {
                    Ok(()) => (
                        "202 Accepted",
                        "application/json",
                        json!({"queued": true}).to_string(),
                    ),
                    Err((status, why)) => (
                        status,
                        "application/json",
                        json!({"queued": false, "error": why}).to_string(),
                    ),
                }
            }
            (_, "/metrics") => ("200 OK", "text/plain; version=0.0.4", self.prometheus()),
            (_, "/healthz") => {
                let problems = self.problems();
                let ok =
                    self.stats().spool_errors.load(Ordering::Relaxed) == 0 && problems.is_empty();
                let body = json!({
                    "ok": ok,
                    "connected": self.stats().connected.load(Ordering::Relaxed),
                    "spool_queued": self.spool().queued(),
                    "problems": problems,
                })
                .to_string();
                (
                    if ok {
                        "200 OK"
                    } else {
                        "503 Service Unavailable"
                    },
                    "application/json",
                    body,
                )
            }
            _ => (
                "404 Not Found",
                "text/plain",
                "try /metrics, /healthz or POST /frames/<camera>\n".into(),
            ),
        };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
        // Read what the client still sends (the body of a refused upload) for a moment, so
        // closing does not reset the connection before it has read the answer.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let mut sink = [0u8; 8192];
            let mut total = 0usize;
            while total < 1 << 20 {
                match stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
        })
        .await;
    }

    /// Reads the body of `POST /frames/<camera>` (Content-Length required, at most the
    /// camera's `max_bytes`) and hands it to the camera's inbox; the error is an HTTP status
    /// and why.
    async fn receive_frame(
        &self,
        stream: &mut tokio::net::TcpStream,
        head: &str,
        camera: &str,
        query: &str,
        mut body: Vec<u8>,
    ) -> std::result::Result<(), (&'static str, String)> {
        let Some(inbox) = self.shared().inbox.get() else {
            return Err((
                "404 Not Found",
                "this station has no camera of kind \"push\"".into(),
            ));
        };
        let max = inbox
            .limit(camera)
            .map_err(|e| ("404 Not Found", e.to_string()))?;
        // Each upload may buffer up to max_bytes: only a few at a time.
        struct Slot<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Slot<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let _slot = Slot(&inbox.uploads);
        if inbox.uploads.fetch_add(1, Ordering::Relaxed) >= crate::inbox::MAX_UPLOADS {
            inbox.refused.fetch_add(1, Ordering::Relaxed);
            return Err((
                "503 Service Unavailable",
                format!(
                    "{} uploads already in progress; retry",
                    crate::inbox::MAX_UPLOADS
                ),
            ));
        }
        let header = |name: &str| {
            head.lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_string())
        };
        let length = header("content-length").and_then(|v| v.parse::<usize>().ok());
        let Some(length) = length else {
            return Err((
                "411 Length Required",
                "send Content-Length with the image".into(),
            ));
        };
        if length > max {
            inbox.refused.fetch_add(1, Ordering::Relaxed);
            return Err((
                "413 Content Too Large",
                crate::inbox::PushError::TooLarge(length, max).to_string(),
            ));
        }
        // curl and others wait for this before sending a large body.
        if header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
            let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut chunk = vec![0u8; 64 * 1024];
        while body.len() < length {
            match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    return Err(("400 Bad Request", "the body ended early".into()))
                }
                Err(_) => return Err(("408 Request Timeout", "the body took over 30 s".into())),
                Ok(Ok(n)) => body.extend_from_slice(&chunk[..n]),
            }
        }
        body.truncate(length);
        let name = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("name="))
            .filter(|n| !n.is_empty())
            .map(|n| n.chars().take(200).collect::<String>());
        inbox
            .deliver(camera, bytes::Bytes::from(body), "http", name)
            .map_err(|e| match e {
                crate::inbox::PushError::Full(_) => ("503 Service Unavailable", e.to_string()),
                e => ("400 Bad Request", e.to_string()),
            })
    }
}

/// RSS, peak RSS and CPU seconds of this process (Linux /proc; empty elsewhere).
pub fn process_stats() -> Value {
    let mut out = Map::new();
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        for line in status.lines() {
            let kb = |l: &str| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
                    .map(|v| v * 1024.0)
            };
            if line.starts_with("VmRSS:") {
                if let Some(v) = kb(line) {
                    out.insert("rss_bytes".into(), json!(v));
                }
            } else if line.starts_with("VmHWM:") {
                if let Some(v) = kb(line) {
                    out.insert("peak_rss_bytes".into(), json!(v));
                }
            }
        }
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the parenthesized command name; utime and stime are the 12th and 13th.
        if let Some(rest) = stat.rsplit(')').next() {
            let f: Vec<&str> = rest.split_whitespace().collect();
            if let (Some(u), Some(s)) = (f.get(11), f.get(12)) {
                if let (Ok(u), Ok(s)) = (u.parse::<f64>(), s.parse::<f64>()) {
                    // USER_HZ is 100 on every Linux the boards run.
                    out.insert("cpu_seconds".into(), json!((u + s) / 100.0));
                }
            }
        }
    }
    Value::Object(out)
}

/// The highest thermal-zone temperature, °C, where the board exposes one.
pub fn board_temperature() -> Option<f64> {
    let dir = std::fs::read_dir("/sys/class/thermal").ok()?;
    dir.filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("thermal_zone"))
        .filter_map(|e| std::fs::read_to_string(e.path().join("temp")).ok())
        .filter_map(|t| t.trim().parse::<f64>().ok())
        .map(|milli| milli / 1000.0)
        .reduce(f64::max)
}

#[cfg(test)]
mod tests {
    #[test]
    fn process_stats_reads_proc() {
        let p = super::process_stats();
        if std::path::Path::new("/proc/self/status").exists() {
            assert!(p["rss_bytes"].as_f64().unwrap_or(0.0) > 0.0, "{p}");
            assert!(p["cpu_seconds"].as_f64().is_some(), "{p}");
        }
    }
}
