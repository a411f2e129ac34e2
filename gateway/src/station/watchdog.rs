//! The inspection stage's watchdog. The worker says which frame it is on; a frame held longer
//! than `station.stall_s` (a model run that hangs, a machine starved of memory) is taken from
//! it: the part gets its fail-safe verdict (and its reject pulse), an alarm goes out, and a
//! fresh worker takes the queue. The stuck worker, if it ever returns, finds its frame taken
//! and retires without publishing (a thread cannot be killed; it can be left behind).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::parts::Frame;

/// The frame a worker is on.
pub(super) struct InFlight {
    pub generation: u64,
    pub since: Instant,
    /// The frame without its image (the worker holds that).
    pub frame: Frame,
    pub queue_ms: f64,
}

#[derive(Default)]
pub(super) struct Watch {
    current: Mutex<Option<InFlight>>,
    /// The worker that owns the queue; a stuck one is retired by bumping it.
    pub generation: AtomicU64,
    /// Stalls since the last frame decided in time (systemd pings stop at 3).
    pub stalls_in_a_row: AtomicU32,
    pub restarts: AtomicU64,
}

impl Watch {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<InFlight>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Worker `generation` starts on `frame`.
    pub fn begin(&self, generation: u64, frame: &Frame, queue_ms: f64) {
        *self.lock() = Some(InFlight {
            generation,
            since: Instant::now(),
            frame: Frame {
                camera: frame.camera.clone(),
                index: frame.index,
                name: frame.name.clone(),
                image: Err("held by the stalled worker".into()),
                captured: frame.captured,
                captured_ms: frame.captured_ms,
                capture_ms: frame.capture_ms,
                sample: false,
            },
            queue_ms,
        });
    }

    /// Worker `generation` decided its frame. `None`: the watchdog took the frame (the
    /// worker must retire). `Some(recovered)`: the frame is the worker's to publish;
    /// `recovered` when it is the first decided in time after a stall.
    pub fn end(&self, generation: u64) -> Option<bool> {
        let mut current = self.lock();
        match current.as_ref() {
            Some(f) if f.generation == generation => {
                *current = None;
                Some(self.stalls_in_a_row.swap(0, Ordering::Relaxed) > 0)
            }
            // Idle (never begun) counts as ours; a newer generation means we were retired.
            None if self.generation.load(Ordering::Relaxed) == generation => Some(false),
            _ => None,
        }
    }

    /// Takes the frame of a worker stuck on it for longer than `stall`, retiring that
    /// worker; the caller publishes its fail-safe result and starts worker
    /// `self.generation`.
    pub fn take_stalled(&self, stall: Duration) -> Option<InFlight> {
        let mut current = self.lock();
        if current.as_ref().is_some_and(|f| f.since.elapsed() > stall) {
            self.generation.fetch_add(1, Ordering::Relaxed);
            self.stalls_in_a_row.fetch_add(1, Ordering::Relaxed);
            self.restarts.fetch_add(1, Ordering::Relaxed);
            current.take()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn frame() -> Frame {
        Frame {
            camera: "c".into(),
            index: 7,
            name: "p".into(),
            image: Err("x".into()),
            captured: Instant::now(),
            captured_ms: 1,
            capture_ms: 0.5,
            sample: false,
        }
    }

    #[test]
    fn a_frame_decided_in_time_stays_with_its_worker() {
        let w = Watch::default();
        w.begin(0, &frame(), 1.0);
        assert!(w.take_stalled(Duration::from_secs(10)).is_none());
        assert_eq!(w.end(0), Some(false));
        assert_eq!(w.restarts.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_stalled_frame_is_taken_and_its_worker_retired() {
        let w = Watch::default();
        w.begin(0, &frame(), 1.0);
        std::thread::sleep(Duration::from_millis(30));
        let stuck = w.take_stalled(Duration::from_millis(10)).unwrap();
        assert_eq!((stuck.frame.index, stuck.generation), (7, 0));
        assert_eq!(w.generation.load(Ordering::Relaxed), 1);
        // The old worker comes back late: not its frame any more.
        assert_eq!(w.end(0), None);
        // The new worker works normally; its first frame in time ends the stall.
        assert_eq!(w.stalls_in_a_row.load(Ordering::Relaxed), 1);
        w.begin(1, &frame(), 1.0);
        assert_eq!(w.end(1), Some(true));
        assert_eq!(w.stalls_in_a_row.load(Ordering::Relaxed), 0);
        w.begin(1, &frame(), 1.0);
        assert_eq!(w.end(1), Some(false));
        assert_eq!(w.end(0), None, "a retired worker stays retired while idle");
    }
}
