//! Store-and-forward spool: every outgoing message is written here, and made durable, before
//! it is handed to MQTT; it is removed only when the broker has acknowledged it (PUBACK).
//!
//! One redb table holds all messages, keyed by stream (class) and that stream's sequence
//! number, so each stream resumes in order after a broker outage or a crash. The spool is
//! bounded by bytes; when a new message does not fit, the oldest messages of the least
//! important streams are dropped first (telemetry, then samples, then sensor results), and a
//! message never pushes out one more important than itself. What was dropped is counted, per
//! stream, in the spool itself so the counters survive restarts.
//!
//! Durability: appends are committed with `Durability::Immediate` (fsync) in groups — a caller
//! that needs to know waits on [`crate::Gateway::flush`]. Removals after PUBACK are committed
//! without fsync and made durable by the next append; a crash can therefore resend a message
//! the broker already had (at-least-once: duplicates possible, loss not).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;

use crate::message::{Class, Envelope};
use crate::{GatewayError, Result};

const MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("messages");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Per-message bookkeeping overhead counted against the budget (key, lengths, B-tree slack).
const RECORD_OVERHEAD: u64 = 64;

fn key(class: Class, seq: u64) -> u64 {
    ((class as u64) << 56) | (seq & ((1 << 56) - 1))
}

fn split_key(key: u64) -> Result<(Class, u64)> {
    let class = Class::from_index((key >> 56) as u8)
        .ok_or_else(|| GatewayError::Corrupt(format!("spool key {key:#x} has no known class")))?;
    Ok((class, key & ((1 << 56) - 1)))
}

/// The timestamp of a stored value (u16 topic length, topic, envelope).
fn stored_ts(value: &[u8]) -> Option<u64> {
    let n = u16::from_le_bytes([*value.first()?, *value.get(1)?]) as usize;
    Envelope::ts_of(value.get(2 + n..)?)
}

fn store<E: Into<redb::Error>>(e: E) -> GatewayError {
    GatewayError::Store(e.into())
}

/// A message waiting in the spool.
#[derive(Debug, Clone)]
pub struct Record {
    pub class: Class,
    pub seq: u64,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// What a producer hands to the spool; the spool gives it its sequence number and envelope.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub class: Class,
    /// Topic under the device's base topic, e.g. `inspection` or `samples/<id>/3`.
    pub topic: String,
    pub data: serde_json::Value,
    /// Milliseconds since the Unix epoch when the producer made it.
    pub ts_ms: u64,
}

/// Counts for one stream.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct StreamStats {
    pub queued: u64,
    pub bytes: u64,
    pub next_seq: u64,
    pub dropped_budget: u64,
    pub dropped_too_large: u64,
    /// Timestamp (ms) of the oldest queued message, if any.
    pub oldest_ts_ms: Option<u64>,
}

#[derive(Debug, Default)]
struct State {
    streams: [StreamStats; Class::COUNT],
}

impl State {
    fn total_bytes(&self) -> u64 {
        self.streams.iter().map(|s| s.bytes).sum()
    }
}

/// The on-disk spool. Thread-safe: appends and removals are serialized by redb's single
/// writer; reads run beside them.
pub struct Spool {
    db: Database,
    path: PathBuf,
    max_bytes: u64,
    max_payload: usize,
    device: String,
    epoch: u64,
    state: Mutex<State>,
    committing: Mutex<()>,
}

fn meta_key(class: Class, what: &str) -> String {
    format!("{}.{what}", class.name())
}

impl Spool {
    /// Opens (or creates) the spool in `dir`. `max_bytes` bounds the queued payloads;
    /// `max_payload` is the largest single payload the link can send (larger ones are refused).
    pub fn open(dir: &Path, device: &str, max_bytes: u64, max_payload: usize) -> Result<Spool> {
        std::fs::create_dir_all(dir).map_err(|e| GatewayError::Io {
            context: format!("cannot create the spool folder {}", dir.display()),
            source: e,
        })?;
        let path = dir.join("spool.redb");
        let mut builder = Database::builder();
        builder.set_cache_size(8 << 20);
        let db = builder.create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => GatewayError::SpoolBusy(path.clone()),
            other => GatewayError::Store(other.into()),
        })?;
        let mut state = State::default();
        let epoch;
        {
            let tx = db.begin_write().map_err(store)?;
            {
                let mut meta = tx.open_table(META).map_err(store)?;
                let existing = meta.get("epoch").map_err(store)?.map(|g| g.value());
                epoch = match existing {
                    Some(e) => e,
                    None => {
                        // A new spool gets a random epoch so message ids stay unique even if a
                        // device's spool is wiped and its sequence numbers start again.
                        let e = rand::random::<u64>() >> 16;
                        meta.insert("epoch", e).map_err(store)?;
                        e
                    }
                };
                for class in Class::ALL {
                    let s = &mut state.streams[class as usize];
                    s.next_seq = meta
                        .get(meta_key(class, "next_seq").as_str())
                        .map_err(store)?
                        .map_or(0, |g| g.value());
                    s.dropped_budget = meta
                        .get(meta_key(class, "dropped_budget").as_str())
                        .map_err(store)?
                        .map_or(0, |g| g.value());
                    s.dropped_too_large = meta
                        .get(meta_key(class, "dropped_too_large").as_str())
                        .map_err(store)?
                        .map_or(0, |g| g.value());
                }
                let messages = tx.open_table(MESSAGES).map_err(store)?;
                for item in messages.iter().map_err(store)? {
                    let (k, v) = item.map_err(store)?;
                    let (class, _) = split_key(k.value())?;
                    let s = &mut state.streams[class as usize];
                    s.queued += 1;
                    s.bytes += v.value().len() as u64 + RECORD_OVERHEAD;
                    if s.oldest_ts_ms.is_none() {
                        s.oldest_ts_ms = stored_ts(v.value());
                    }
                }
            }
            tx.commit().map_err(store)?;
        }
        Ok(Spool {
            db,
            path,
            max_bytes,
            max_payload,
            device: device.to_string(),
            epoch,
            state: Mutex::new(state),
            committing: Mutex::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves counters that are still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends messages and removes acknowledged ones in one transaction. Appends make the
    /// commit durable (fsync); a commit with removals only is not. Returns, per new message,
    /// its stream and sequence number, or `None` where it was dropped (too large, or no room
    /// even after dropping less important messages).
    pub fn commit(
        &self,
        new: &[NewMessage],
        acked: &[(Class, u64)],
    ) -> Result<Vec<Option<(Class, u64)>>> {
        if new.is_empty() && acked.is_empty() {
            return Ok(Vec::new());
        }
        // One committer at a time; readers of the counters are not held up by the fsync.
        let _committing = self.committing.lock().unwrap_or_else(|p| p.into_inner());
        let state = State {
            streams: self.lock().streams.clone(),
        };
        let mut next = state.streams.clone();
        let mut tx = self.db.begin_write().map_err(store)?;
        if new.is_empty() {
            tx.set_durability(Durability::None).map_err(store)?;
        }
        let mut out = Vec::with_capacity(new.len());
        {
            let mut messages = tx.open_table(MESSAGES).map_err(store)?;
            for &(class, seq) in acked {
                if let Some(v) = messages.remove(key(class, seq)).map_err(store)? {
                    let s = &mut next[class as usize];
                    s.queued = s.queued.saturating_sub(1);
                    s.bytes = s
                        .bytes
                        .saturating_sub(v.value().len() as u64 + RECORD_OVERHEAD);
                }
            }
            for m in new {
                let class = m.class;
                let seq = next[class as usize].next_seq;
                let payload = Envelope {
                    v: crate::message::SCHEMA_VERSION,
                    kind: class.name(),
                    id: format!("{}-{:012x}-{}", self.device, self.epoch, seq),
                    device: &self.device,
                    seq,
                    ts_ms: m.ts_ms,
                    data: &m.data,
                }
                .to_bytes()?;
                let topic_len = m.topic.len();
                if payload.len() + topic_len + 1 > self.max_payload {
                    next[class as usize].dropped_too_large += 1;
                    out.push(None);
                    continue;
                }
                let mut value = Vec::with_capacity(2 + topic_len + payload.len());
                value.extend_from_slice(&(topic_len as u16).to_le_bytes());
                value.extend_from_slice(m.topic.as_bytes());
                value.extend_from_slice(&payload);
                let size = value.len() as u64 + RECORD_OVERHEAD;
                if !make_room(&mut messages, &mut next, class, size, self.max_bytes)? {
                    next[class as usize].dropped_budget += 1;
                    next[class as usize].next_seq += 1; // the gap shows subscribers the drop
                    out.push(None);
                    continue;
                }
                messages
                    .insert(key(class, seq), value.as_slice())
                    .map_err(store)?;
                let s = &mut next[class as usize];
                s.next_seq += 1;
                s.queued += 1;
                s.bytes += size;
                if s.oldest_ts_ms.is_none() {
                    s.oldest_ts_ms = Some(m.ts_ms);
                }
                out.push(Some((class, seq)));
            }
            // Oldest timestamps move when the head of a stream was removed.
            for class in Class::ALL {
                let s = &mut next[class as usize];
                if s.queued == 0 {
                    s.oldest_ts_ms = None;
                } else if acked.iter().any(|&(c, _)| c == class)
                    || s.dropped_budget != state.streams[class as usize].dropped_budget
                {
                    let lo = key(class, 0);
                    let hi = key(class, (1 << 56) - 1);
                    s.oldest_ts_ms = match messages.range(lo..=hi).map_err(store)?.next() {
                        Some(item) => {
                            let (_, v) = item.map_err(store)?;
                            stored_ts(v.value())
                        }
                        None => None,
                    };
                }
            }
            let mut meta = tx.open_table(META).map_err(store)?;
            for class in Class::ALL {
                let (old, new) = (&state.streams[class as usize], &next[class as usize]);
                for (what, o, n) in [
                    ("next_seq", old.next_seq, new.next_seq),
                    ("dropped_budget", old.dropped_budget, new.dropped_budget),
                    (
                        "dropped_too_large",
                        old.dropped_too_large,
                        new.dropped_too_large,
                    ),
                ] {
                    if o != n {
                        meta.insert(meta_key(class, what).as_str(), n)
                            .map_err(store)?;
                    }
                }
            }
        }
        tx.commit().map_err(store)?;
        self.lock().streams = next;
        Ok(out)
    }

    /// Up to `limit` queued messages of one stream with a sequence number of at least `from`,
    /// in order.
    pub fn read(&self, class: Class, from: u64, limit: usize) -> Result<Vec<Record>> {
        let tx = self.db.begin_read().map_err(store)?;
        let messages = tx.open_table(MESSAGES).map_err(store)?;
        let lo = key(class, from);
        let hi = key(class, (1 << 56) - 1);
        let mut out = Vec::new();
        for item in messages.range(lo..=hi).map_err(store)?.take(limit) {
            let (k, v) = item.map_err(store)?;
            let (class, seq) = split_key(k.value())?;
            let value = v.value();
            if value.len() < 2 {
                return Err(GatewayError::Corrupt(format!(
                    "spool record {}#{seq} is {} bytes",
                    class.name(),
                    value.len()
                )));
            }
            let topic_len = u16::from_le_bytes([value[0], value[1]]) as usize;
            let topic = value
                .get(2..2 + topic_len)
                .and_then(|t| std::str::from_utf8(t).ok())
                .ok_or_else(|| {
                    GatewayError::Corrupt(format!("spool record {}#{seq}: bad topic", class.name()))
                })?
                .to_string();
            out.push(Record {
                class,
                seq,
                topic,
                payload: value[2 + topic_len..].to_vec(),
            });
        }
        Ok(out)
    }

    /// Counts per stream, indexed like [`Class::ALL`].
    pub fn stats(&self) -> Vec<(Class, StreamStats)> {
        let state = self.lock();
        Class::ALL
            .iter()
            .map(|&c| (c, state.streams[c as usize].clone()))
            .collect()
    }

    /// The next sequence number of every stream, indexed like [`Class::ALL`].
    pub fn next_seqs(&self) -> [u64; Class::COUNT] {
        let state = self.lock();
        std::array::from_fn(|i| state.streams[i].next_seq)
    }

    pub fn total_bytes(&self) -> u64 {
        self.lock().total_bytes()
    }

    pub fn queued(&self) -> u64 {
        self.lock().streams.iter().map(|s| s.queued).sum()
    }
}

/// Drops the oldest messages of streams less important than (or as important as) `class`,
/// least important first, until `size` more bytes fit. False when they cannot.
fn make_room(
    messages: &mut redb::Table<'_, u64, &[u8]>,
    streams: &mut [StreamStats; Class::COUNT],
    class: Class,
    size: u64,
    max_bytes: u64,
) -> Result<bool> {
    let total = |s: &[StreamStats; Class::COUNT]| s.iter().map(|x| x.bytes).sum::<u64>();
    if size > max_bytes {
        return Ok(false);
    }
    // Evict nothing when even evicting everything allowed would not make room.
    let evictable: u64 = Class::ALL
        .iter()
        .filter(|c| c.importance() <= class.importance())
        .map(|&c| streams[c as usize].bytes)
        .sum();
    if total(streams) - evictable + size > max_bytes {
        return Ok(false);
    }
    for victim in Class::EVICTION_ORDER {
        if victim.importance() > class.importance() {
            break;
        }
        while total(streams) + size > max_bytes && streams[victim as usize].queued > 0 {
            let lo = key(victim, 0);
            let hi = key(victim, (1 << 56) - 1);
            let first = match messages.range(lo..=hi).map_err(store)?.next() {
                Some(item) => {
                    let (k, v) = item.map_err(store)?;
                    Some((k.value(), v.value().len() as u64))
                }
                None => None,
            };
            let Some((k, len)) = first else {
                streams[victim as usize].queued = 0;
                streams[victim as usize].bytes = 0;
                break;
            };
            messages.remove(k).map_err(store)?;
            let s = &mut streams[victim as usize];
            s.queued -= 1;
            s.bytes = s.bytes.saturating_sub(len + RECORD_OVERHEAD);
            s.dropped_budget += 1;
        }
        if total(streams) + size <= max_bytes {
            return Ok(true);
        }
    }
    Ok(total(streams) + size <= max_bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn msg(class: Class, n: u64, pad: usize) -> NewMessage {
        NewMessage {
            class,
            topic: class.name().to_string(),
            data: serde_json::json!({ "n": n, "pad": "x".repeat(pad) }),
            ts_ms: 1_000 + n,
        }
    }

    #[test]
    fn appends_read_back_in_order_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path(), "cam1", 1 << 20, 64 << 10).unwrap();
            let ids = spool
                .commit(
                    &(0..5)
                        .map(|n| msg(Class::Inspection, n, 10))
                        .collect::<Vec<_>>(),
                    &[],
                )
                .unwrap();
            assert_eq!(ids.len(), 5);
            assert_eq!(ids[4], Some((Class::Inspection, 4)));
            spool
                .commit(
                    &[msg(Class::Telemetry, 0, 10)],
                    &[(Class::Inspection, 0), (Class::Inspection, 1)],
                )
                .unwrap();
        }
        let spool = Spool::open(dir.path(), "cam1", 1 << 20, 64 << 10).unwrap();
        let recs = spool.read(Class::Inspection, 0, 100).unwrap();
        assert_eq!(
            recs.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        let env: serde_json::Value = serde_json::from_slice(&recs[0].payload).unwrap();
        assert_eq!(env["seq"], 2);
        assert_eq!(env["kind"], "inspection");
        assert_eq!(env["data"]["n"], 2);
        assert_eq!(env["ts_ms"], 1002);
        // Sequence numbers continue after a reopen.
        let ids = spool.commit(&[msg(Class::Inspection, 9, 1)], &[]).unwrap();
        assert_eq!(ids[0], Some((Class::Inspection, 5)));
        let stats = spool.stats();
        assert_eq!(stats[Class::Inspection as usize].1.queued, 4);
        assert_eq!(stats[Class::Telemetry as usize].1.queued, 1);
        assert_eq!(stats[Class::Inspection as usize].1.oldest_ts_ms, Some(1002));
    }

    #[test]
    fn full_spool_drops_telemetry_first_and_never_a_result_for_telemetry() {
        let dir = tempfile::tempdir().unwrap();
        // Room for about ten 400-byte messages.
        let spool = Spool::open(dir.path(), "cam1", 5_000, 64 << 10).unwrap();
        spool
            .commit(
                &(0..6)
                    .map(|n| msg(Class::Telemetry, n, 300))
                    .collect::<Vec<_>>(),
                &[],
            )
            .unwrap();
        spool
            .commit(
                &(0..3)
                    .map(|n| msg(Class::Sample, n, 300))
                    .collect::<Vec<_>>(),
                &[],
            )
            .unwrap();
        // Results arrive until the spool is full of results.
        for n in 0..12 {
            spool
                .commit(&[msg(Class::Inspection, n, 300)], &[])
                .unwrap();
        }
        let s = |c: Class| spool.stats()[c as usize].1.clone();
        assert_eq!(s(Class::Telemetry).queued, 0);
        assert_eq!(s(Class::Telemetry).dropped_budget, 6);
        assert_eq!(s(Class::Sample).queued, 0);
        assert_eq!(s(Class::Sample).dropped_budget, 3);
        assert!(
            s(Class::Inspection).queued >= 9,
            "{:?}",
            s(Class::Inspection)
        );
        assert!(spool.total_bytes() <= 5_000);
        // Telemetry cannot push a result out: it is dropped itself.
        let before = s(Class::Inspection).queued;
        let out = spool
            .commit(&[msg(Class::Telemetry, 99, 300)], &[])
            .unwrap();
        assert_eq!(out, vec![None]);
        assert_eq!(s(Class::Inspection).queued, before);
        assert_eq!(s(Class::Telemetry).dropped_budget, 7);
        // When only results remain, the oldest result goes and is counted.
        let dropped_before = s(Class::Inspection).dropped_budget;
        spool
            .commit(&[msg(Class::Inspection, 50, 300)], &[])
            .unwrap();
        assert_eq!(s(Class::Inspection).dropped_budget, dropped_before + 1);
        let first = spool.read(Class::Inspection, 0, 1).unwrap();
        assert!(first[0].seq > 0);
        // Counters survive a reopen.
        drop(spool);
        let spool = Spool::open(dir.path(), "cam1", 5_000, 64 << 10).unwrap();
        assert_eq!(spool.stats()[Class::Telemetry as usize].1.dropped_budget, 7);
    }

    #[test]
    fn nothing_is_evicted_for_a_message_that_cannot_fit_anyway() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), "cam1", 3_000, 64 << 10).unwrap();
        spool
            .commit(
                &(0..3)
                    .map(|n| msg(Class::Alarm, n, 300))
                    .collect::<Vec<_>>(),
                &[],
            )
            .unwrap();
        spool.commit(&[msg(Class::Telemetry, 0, 300)], &[]).unwrap();
        // A 2 KB result would need the alarms' room too, which it may not take.
        let out = spool
            .commit(&[msg(Class::Inspection, 0, 2_000)], &[])
            .unwrap();
        assert_eq!(out, vec![None]);
        let s = spool.stats();
        assert_eq!(
            s[Class::Telemetry as usize].1.queued,
            1,
            "telemetry evicted for nothing"
        );
        assert_eq!(s[Class::Alarm as usize].1.queued, 3);
        assert_eq!(s[Class::Inspection as usize].1.dropped_budget, 1);
    }

    #[test]
    fn too_large_payload_is_refused_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), "cam1", 1 << 20, 1_000).unwrap();
        let out = spool
            .commit(&[msg(Class::Inspection, 0, 2_000)], &[])
            .unwrap();
        assert_eq!(out, vec![None]);
        assert_eq!(
            spool.stats()[Class::Inspection as usize]
                .1
                .dropped_too_large,
            1
        );
    }

    #[test]
    fn a_second_open_of_the_same_spool_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _a = Spool::open(dir.path(), "cam1", 1 << 20, 1_000).unwrap();
        let err = Spool::open(dir.path(), "cam1", 1 << 20, 1_000)
            .err()
            .unwrap();
        assert!(err.to_string().contains("in use"), "{err}");
    }
}
