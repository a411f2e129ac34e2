//! Frames pushed by another program (a PLC-triggered grabber, a vision controller, a test
//! rig) instead of captured by the station: over MQTT as the payload of
//! `<base>/frames/<camera>`, or as the body of `POST /frames/<camera>` on the telemetry
//! endpoint (`telemetry.metrics_addr`). The payload is the encoded image (JPEG, PNG …).
//!
//! Each camera of kind `push` has a bounded inbox; when its station falls behind, new frames
//! are refused and counted (the station's own queue already drops the oldest), so a flood of
//! pushes never grows memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};

use bytes::Bytes;

use crate::message::now_ms;

/// One pushed frame, still encoded.
#[derive(Debug)]
pub struct PushedFrame {
    pub bytes: Bytes,
    /// When it arrived (ms since the epoch): the frame's capture time as far as the station
    /// can know.
    pub received_ms: u64,
    /// `mqtt` or `http`.
    pub via: &'static str,
    /// A name the sender gave (`POST /frames/cam0?name=part-17.jpg`), if any.
    pub name: Option<String>,
}

/// Why a push was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("no camera {0:?} of kind \"push\" (pushable: {1})")]
    UnknownCamera(String, String),
    #[error("frame of {0} bytes is over the {1}-byte limit (cameras[].max_bytes)")]
    TooLarge(usize, usize),
    #[error("empty frame")]
    Empty,
    #[error("camera {0:?} is behind: its inbox is full")]
    Full(String),
}

/// The inboxes of every push camera; the link and the HTTP endpoint deliver into it.
pub struct FrameInbox {
    senders: HashMap<String, (SyncSender<PushedFrame>, usize)>,
    pub received: AtomicU64,
    pub refused: AtomicU64,
    /// HTTP uploads being read now (bounded: each may buffer up to `max_bytes`).
    pub uploads: std::sync::atomic::AtomicUsize,
}

/// HTTP uploads read at the same time, at most; more are answered 503.
pub const MAX_UPLOADS: usize = 4;

impl FrameInbox {
    /// Inboxes for `cameras` (name, largest frame in bytes), each holding `capacity` frames;
    /// the receivers go to the station's capture threads.
    pub fn new(
        cameras: &[(String, usize)],
        capacity: usize,
    ) -> (FrameInbox, HashMap<String, Receiver<PushedFrame>>) {
        let mut senders = HashMap::new();
        let mut receivers = HashMap::new();
        for (name, max_bytes) in cameras {
            let (tx, rx) = sync_channel(capacity.max(1));
            senders.insert(name.clone(), (tx, *max_bytes));
            receivers.insert(name.clone(), rx);
        }
        (
            FrameInbox {
                senders,
                received: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                uploads: std::sync::atomic::AtomicUsize::new(0),
            },
            receivers,
        )
    }

    /// The largest frame `camera` takes; an unknown camera is refused (and counted), naming
    /// those that can be pushed to.
    pub fn limit(&self, camera: &str) -> Result<usize, PushError> {
        self.entry(camera).map(|(_, max_bytes)| *max_bytes)
    }

    /// `camera`'s queue and frame limit; an unknown camera is refused as in [`Self::limit`].
    fn entry(&self, camera: &str) -> Result<&(SyncSender<PushedFrame>, usize), PushError> {
        match self.senders.get(camera) {
            Some(entry) => Ok(entry),
            None => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                let mut known: Vec<&str> = self.senders.keys().map(String::as_str).collect();
                known.sort_unstable();
                Err(PushError::UnknownCamera(camera.into(), known.join(", ")))
            }
        }
    }

    /// Queues a frame for `camera`'s station thread; the error says why it was not taken
    /// (counted in `refused`).
    pub fn deliver(
        &self,
        camera: &str,
        bytes: Bytes,
        via: &'static str,
        name: Option<String>,
    ) -> Result<(), PushError> {
        let (tx, max_bytes) = self.entry(camera)?;
        let max_bytes = *max_bytes;
        let refuse = |e: PushError| {
            self.refused.fetch_add(1, Ordering::Relaxed);
            Err(e)
        };
        if bytes.is_empty() {
            return refuse(PushError::Empty);
        }
        if bytes.len() > max_bytes {
            return refuse(PushError::TooLarge(bytes.len(), max_bytes));
        }
        let frame = PushedFrame {
            bytes,
            received_ms: now_ms(),
            via,
            name,
        };
        // A station that stopped reading is as good as a full one.
        match tx.try_send(frame) {
            Ok(()) => {
                self.received.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                refuse(PushError::Full(camera.into()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn delivers_to_the_named_camera_and_refuses_the_rest() {
        let (inbox, rx) = FrameInbox::new(&[("top".into(), 10), ("side".into(), 10)], 2);
        inbox
            .deliver("top", Bytes::from_static(b"jpeg"), "mqtt", None)
            .unwrap();
        let f = rx["top"].try_recv().unwrap();
        assert_eq!((&f.bytes[..], f.via), (&b"jpeg"[..], "mqtt"));
        assert!(rx["side"].try_recv().is_err());
        let unknown = inbox
            .deliver("front", Bytes::from_static(b"x"), "http", None)
            .unwrap_err();
        assert_eq!(
            unknown.to_string(),
            "no camera \"front\" of kind \"push\" (pushable: side, top)"
        );
        assert_eq!(
            inbox.deliver("top", Bytes::from(vec![0; 11]), "http", None),
            Err(PushError::TooLarge(11, 10))
        );
        assert_eq!(
            inbox.deliver("top", Bytes::new(), "http", None),
            Err(PushError::Empty)
        );
        // Bounded: the third frame waiting is refused, not queued.
        for _ in 0..2 {
            inbox
                .deliver("side", Bytes::from_static(b"x"), "mqtt", None)
                .unwrap();
        }
        assert_eq!(
            inbox.deliver("side", Bytes::from_static(b"x"), "mqtt", None),
            Err(PushError::Full("side".into()))
        );
        assert_eq!(inbox.received.load(Ordering::Relaxed), 3);
        assert_eq!(inbox.refused.load(Ordering::Relaxed), 4);
    }
}
