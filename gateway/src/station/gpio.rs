//! The station's GPIO: the reject output pulses a line, and an external trigger input (a light
//! barrier, a PLC output) fires a capture on each edge.
//!
//! The reject output is generic over embedded-hal 1.0's `OutputPin`, so it is tested with
//! embedded-hal-mock; on a board the pin is a line of a Linux GPIO character device
//! (`/dev/gpiochipN`) through linux-embedded-hal's `CdevPin`. The trigger reads the same
//! character device's edge events (timestamped by the kernel) and debounces them.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use embedded_hal::digital::OutputPin;
use linux_embedded_hal::gpio_cdev::{Chip, EventRequestFlags, EventType, LineRequestFlags};
use linux_embedded_hal::CdevPin;

use super::config::Edge;
use super::parts::RejectOutput;

/// Pulses an output pin: active for the pulse, then inactive.
pub struct GpioReject<P> {
    pin: P,
    name: String,
}

impl<P: OutputPin> GpioReject<P> {
    /// Takes the pin (already inactive) by value, as embedded-hal drivers do.
    pub fn new(pin: P, name: String) -> GpioReject<P> {
        GpioReject { pin, name }
    }

    pub fn release(self) -> P {
        self.pin
    }
}

impl<P: OutputPin + Send> RejectOutput for GpioReject<P> {
    fn pulse(&mut self, _part: &str, duration: Duration) -> Result<(), String> {
        self.pin
            .set_high()
            .map_err(|e| format!("cannot activate {}: {e:?}", self.name))?;
        std::thread::sleep(duration);
        // Retried once: a line left active would hold the ejector out.
        if let Err(e) = self.pin.set_low() {
            std::thread::sleep(Duration::from_millis(1));
            self.pin.set_low().map_err(|e2| {
                format!(
                    "cannot release {} ({e:?}, then {e2:?}): the ejector may be stuck out",
                    self.name
                )
            })?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

fn open_chip(chip: &Path, key: &str) -> Result<Chip, String> {
    Chip::new(chip).map_err(|e| {
        format!(
            "{key}.chip {}: {e}; is it this board's GPIO chip? (`ls /dev/gpiochip*` lists them, the board profile's [gpio] chip names the header's)",
            chip.display()
        )
    })
}

/// The reject output on `line` of `chip`, inactive until the first pulse. `active_low`: the
/// ejector fires on a low level (the kernel inverts the line for us).
pub fn open_reject(
    chip: &Path,
    line: u32,
    active_low: bool,
) -> Result<GpioReject<CdevPin>, String> {
    let mut c = open_chip(chip, "reject")?;
    let lines = c.num_lines();
    let l = c.get_line(line).map_err(|e| {
        format!(
            "reject.line {line}: {e} ({} has lines 0 … {})",
            chip.display(),
            lines.saturating_sub(1)
        )
    })?;
    let mut flags = LineRequestFlags::OUTPUT;
    if active_low {
        flags |= LineRequestFlags::ACTIVE_LOW;
    }
    let handle = l.request(flags, 0, "neo-reject").map_err(|e| {
        let user = l
            .info()
            .ok()
            .and_then(|i| i.consumer().map(String::from))
            .map(|c| format!(" (in use by {c:?})"))
            .unwrap_or_default();
        format!("reject.line {line} of {}: {e}{user}", chip.display())
    })?;
    let pin = CdevPin::new(handle).map_err(|e| format!("reject.line {line}: {e}"))?;
    Ok(GpioReject::new(
        pin,
        format!("gpio {}:{line}", chip.display()),
    ))
}

/// Drops edges that follow the last accepted one by less than the debounce time (contact
/// bounce, a light barrier flickering at a part's edge).
pub struct Debounce {
    min_gap_ns: u64,
    last_ns: Option<u64>,
}

impl Debounce {
    pub fn new(debounce: Duration) -> Debounce {
        Debounce {
            min_gap_ns: debounce.as_nanos().min(u128::from(u64::MAX)) as u64,
            last_ns: None,
        }
    }

    /// Whether an edge at `ts_ns` (kernel timestamp) is a new trigger.
    pub fn accept(&mut self, ts_ns: u64) -> bool {
        match self.last_ns {
            Some(last) if ts_ns.saturating_sub(last) < self.min_gap_ns => false,
            _ => {
                self.last_ns = Some(ts_ns);
                true
            }
        }
    }
}

/// Trigger edges waiting for their frame, each with the moment it was read (within a
/// millisecond of the edge: the reader thread blocks on the kernel's queue). Bounded: when
/// frames fall behind by more than `EDGE_BACKLOG` edges, the oldest are dropped and counted.
#[derive(Default)]
pub struct Edges {
    times: Mutex<VecDeque<Instant>>,
    pub dropped: AtomicU64,
}

pub const EDGE_BACKLOG: usize = 64;

impl Edges {
    pub fn push(&self, at: Instant) {
        let mut q = self.times.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == EDGE_BACKLOG {
            q.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        q.push_back(at);
    }

    /// The oldest edge still without a frame.
    pub fn pop(&self) -> Option<Instant> {
        self.times
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }
}

/// Opens `line` of `chip` for edge events and starts a thread that queues debounced edges
/// into `edges` (the camera takes one frame per edge, timed from the edge). The thread blocks
/// on the kernel's event queue and ends with the process; an error reading events ends it
/// with a message.
pub fn spawn_trigger(
    camera: &str,
    chip: &Path,
    line: u32,
    edge: Edge,
    debounce: Duration,
    edges: Arc<Edges>,
) -> Result<(), String> {
    let key = format!("cameras[{camera}].gpio");
    let mut c = open_chip(chip, &key)?;
    let l = c
        .get_line(line)
        .map_err(|e| format!("{key}.line {line}: {e}"))?;
    let flags = match edge {
        Edge::Rising => EventRequestFlags::RISING_EDGE,
        Edge::Falling => EventRequestFlags::FALLING_EDGE,
    };
    let events = l
        .events(LineRequestFlags::INPUT, flags, "neo-trigger")
        .map_err(|e| format!("{key}.line {line} of {}: {e}", chip.display()))?;
    let name = camera.to_string();
    std::thread::Builder::new()
        .name(format!("neo-trigger-{camera}"))
        .spawn(move || {
            let mut debounce = Debounce::new(debounce);
            for event in events {
                match event {
                    Ok(e) => {
                        let wanted = matches!(
                            (e.event_type(), edge),
                            (EventType::RisingEdge, Edge::Rising)
                                | (EventType::FallingEdge, Edge::Falling)
                        );
                        if wanted && debounce.accept(e.timestamp()) {
                            edges.push(Instant::now());
                        }
                    }
                    Err(e) => {
                        tracing::error!("camera {name}: trigger input failed: {e}");
                        return;
                    }
                }
            }
        })
        .map_err(|e| format!("cannot start the trigger thread: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use embedded_hal_mock::eh1::digital::{Mock, State, Transaction};

    #[test]
    fn a_pulse_activates_then_releases_the_line() {
        let expectations = [
            Transaction::set(State::High),
            Transaction::set(State::Low),
            Transaction::set(State::High),
            Transaction::set(State::Low),
        ];
        let mut reject = GpioReject::new(Mock::new(&expectations), "gpio test:27".into());
        let t0 = std::time::Instant::now();
        reject
            .pulse("cam0-000001", Duration::from_millis(30))
            .unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(30));
        reject
            .pulse("cam0-000002", Duration::from_millis(1))
            .unwrap();
        assert_eq!(reject.describe(), "gpio test:27");
        reject.release().done();
    }

    #[test]
    fn a_line_that_will_not_release_is_reported() {
        let err = || embedded_hal_mock::eh1::MockError::Io(std::io::ErrorKind::Other);
        let expectations = [
            Transaction::set(State::High),
            Transaction::set(State::Low).with_error(err()),
            Transaction::set(State::Low).with_error(err()),
        ];
        let mut reject = GpioReject::new(Mock::new(&expectations), "gpio test:27".into());
        let e = reject.pulse("p", Duration::from_millis(1)).unwrap_err();
        assert!(e.contains("stuck out"), "{e}");
        reject.release().done();
    }

    #[test]
    fn bounces_within_the_debounce_time_are_one_trigger() {
        let mut d = Debounce::new(Duration::from_millis(20));
        let ms = 1_000_000;
        let accepted: Vec<u64> = [0, 2, 5, 19, 20, 21, 100, 119, 150]
            .into_iter()
            .filter(|t| d.accept(t * ms))
            .collect();
        assert_eq!(accepted, vec![0, 20, 100, 150]);
    }

    #[test]
    fn edges_wait_in_order_and_a_backlog_drops_the_oldest() {
        let edges = Edges::default();
        let t0 = Instant::now();
        for i in 0..(EDGE_BACKLOG as u64 + 3) {
            edges.push(t0 + Duration::from_millis(i));
        }
        assert_eq!(edges.dropped.load(Ordering::Relaxed), 3);
        assert_eq!(edges.pop(), Some(t0 + Duration::from_millis(3)));
        assert_eq!(edges.pop(), Some(t0 + Duration::from_millis(4)));
    }

    #[test]
    fn a_missing_chip_says_what_to_check() {
        let e = open_reject(Path::new("/dev/gpiochip-not-here"), 27, false)
            .err()
            .unwrap();
        assert!(e.starts_with("reject.chip /dev/gpiochip-not-here"), "{e}");
        assert!(e.contains("ls /dev/gpiochip*"), "{e}");
        let e = spawn_trigger(
            "top",
            Path::new("/dev/gpiochip-not-here"),
            17,
            Edge::Rising,
            Duration::from_millis(20),
            Arc::new(Edges::default()),
        )
        .unwrap_err();
        assert!(e.starts_with("cameras[top].gpio.chip"), "{e}");
    }
}
